"""newton_schulz against the float64 polar factor of an SVD, for both coefficient sets.

For X = NS(G) and the SVD G = U S V^T: U^T X V must be diagonal (NS keeps G's singular vectors),
its diagonal must be the scalar polynomial map applied to s / ||G||_F, and those values must land in
the band the coefficient set promises (see newton_schulz.py's docstring):
  keller, 5 steps:         s/||G||_F >= 2e-3  ->  [0.68, 1.21]
  polar_express, 5 steps:  s/||G||_F >= 1e-3  ->  [0.84, 1.13]
  polar_express, 6 steps:  s/||G||_F >= 1e-3  ->  [0.99, 1.002]
Tolerances: fp32 work (CPU default) vs float64 truth within 2e-4 per singular value (4e-4 for the
steeper polar_express first step); bf16 work within 0.05 and the band widened by 0.05.
"""

import pytest
import torch

from megatron_osp.optimizer import newton_schulz
from megatron_osp.optimizer.newton_schulz import COEFFICIENTS, coefficient_schedule, ns_flops

BANDS = {  # (coefficients, steps): (lowest relative singular value covered, band low, band high)
    ("keller", 5): (2e-3, 0.68, 1.21),
    ("polar_express", 5): (1e-3, 0.84, 1.13),
    ("polar_express", 6): (1e-3, 0.99, 1.002),
}
SHAPES = [(64, 64), (32, 96), (96, 32), (4, 128, 48), (3, 40, 72)]


def _scalar_map(x, coefficients, steps):
    x = x / COEFFICIENTS[coefficients][1]
    for a, b, c in coefficient_schedule(coefficients, steps):
        x = a * x + b * x**3 + c * x**5
    return x


def _random_with_spread(shape, seed):
    """Random matrices whose singular values span three decades (like real gradients, not iid)."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(*shape, dtype=torch.float64, generator=g)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    k = min(shape[-2:])
    S = torch.logspace(0, -2.5, k, dtype=torch.float64).expand(*shape[:-2], k)
    return U @ torch.diag_embed(S) @ Vh


@pytest.mark.parametrize("coefficients,steps", list(BANDS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_newton_schulz_against_float64_svd(shape, coefficients, steps):
    G = _random_with_spread(shape, seed=sum(shape))
    X = newton_schulz(G.float(), steps=steps, coefficients=coefficients, backend="torch")
    assert_matches_svd(G, X, coefficients, steps)


def assert_matches_svd(G, X, coefficients, steps):
    """X = NS(G) from fp32 work against G's float64 SVD (also used by tests/test_ns_triton.py)."""
    X = X.double()
    assert X.shape == G.shape
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    core = U.mT @ X @ Vh.mT
    diag = torch.diagonal(core, dim1=-2, dim2=-1)
    assert (core - torch.diag_embed(diag)).abs().max() < 1e-4
    rel = S / G.norm(dim=(-2, -1)).unsqueeze(-1)
    atol = 2e-4 if coefficients == "keller" else 4e-4
    torch.testing.assert_close(diag, _scalar_map(rel, coefficients, steps), rtol=0, atol=atol)
    lowest, lo, hi = BANDS[(coefficients, steps)]
    banded = diag[rel >= lowest]
    assert banded.numel() > 0
    assert banded.min() > lo and banded.max() < hi, (banded.min(), banded.max())
    # Direction: close to the exact polar factor U V^T.
    polar = U @ Vh
    cos = (X * polar).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.97).all(), cos


@pytest.mark.parametrize("coefficients", ["keller", "polar_express"])
def test_newton_schulz_bf16_work_stays_in_band(coefficients):
    G = _random_with_spread((2, 96, 64), seed=3)
    X = newton_schulz(G.float(), coefficients=coefficients, dtype=torch.bfloat16).double()
    assert X.dtype == torch.float64
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    diag = torch.diagonal(U.mT @ X @ Vh.mT, dim1=-2, dim2=-1)
    rel = S / G.norm(dim=(-2, -1)).unsqueeze(-1)
    torch.testing.assert_close(diag, _scalar_map(rel, coefficients, 5), rtol=0, atol=0.05)
    lowest, lo, hi = BANDS[(coefficients, 5)]
    banded = diag[rel >= lowest]
    assert banded.min() > lo - 0.05 and banded.max() < hi + 0.05


def test_batched_equals_one_by_one():
    G = torch.randn(5, 24, 40)
    batched = newton_schulz(G, coefficients="polar_express")
    for i in range(5):
        torch.testing.assert_close(batched[i], newton_schulz(G[i], coefficients="polar_express"))


def test_newton_schulz_bad_input():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(8))
    with pytest.raises(ValueError, match="unknown Newton-Schulz coefficients 'nope'"):
        newton_schulz(torch.randn(4, 4), coefficients="nope")
    with pytest.raises(ValueError, match="steps >= 1"):
        newton_schulz(torch.randn(4, 4), steps=0)


def test_ns_flops_counts_the_three_products():
    # wide 2 x 3: X X^T 2*2*3, A A 2*2*2, B X 2*2*3 MACs per step
    assert ns_flops(2, 3, steps=1) == 2 * (12 + 8 + 12)
    assert ns_flops(3, 2, steps=5) == ns_flops(2, 3, steps=5)
    # symmetric: X X^T and A A only on/above the diagonal (3 of 4 entries of a 2 x 2)
    assert ns_flops(2, 3, steps=1, symmetric=True) == 2 * (9 + 6 + 12)
    m, n = 2048, 5504  # large m: 3 m^2 n + m^3 instead of 4 m^2 n + 2 m^3
    assert abs(ns_flops(m, n, 1, symmetric=True) / (3 * m * m * n + m**3) - 1) < 1e-3
