"""Newton–Schulz against an SVD polar factor; Muon's step against a float64 reference."""

import math

import pytest
import torch

from megatron_osp.optimizer import Muon, logical_blocks, newton_schulz


def _scalar_map(x, steps=5):
    for _ in range(steps):
        x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
    return x


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (4, 128, 48)])
def test_newton_schulz_against_float64_svd(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape, dtype=torch.float64)
    X = newton_schulz(G.float(), steps=5).double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    # NS keeps G's singular vectors (U^T X V is diagonal) ...
    core = U.mT @ X @ Vh.mT
    diag = torch.diagonal(core, dim1=-2, dim2=-1)
    assert (core - torch.diag_embed(diag)).abs().max() < 1e-4
    # ... and maps each singular value s by the scalar quintic applied to s / ||G||_F.
    rel = S / G.norm(dim=(-2, -1), keepdim=True).squeeze(-1)
    torch.testing.assert_close(diag, _scalar_map(rel), rtol=0, atol=2e-4)
    # The band Keller's coefficients promise after 5 steps: [0.68, 1.21] for s/||G||_F >= 2e-3.
    banded = diag[rel >= 2e-3]
    assert banded.min() > 0.68 and banded.max() < 1.21
    # So the result is close to the exact polar factor U V^T in direction.
    polar = U @ Vh
    cos = (X * polar).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.97).all(), cos


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(8))


def _ns64(u, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = u.T if u.shape[0] > u.shape[1] else u
    X = X / (X.norm() + 1e-8)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if u.shape[0] > u.shape[1] else X


def test_muon_two_steps_match_float64_reference_with_blocks():
    torch.manual_seed(1)
    W0 = torch.randn(48, 16)
    blocks = [torch.arange(0, 32), torch.arange(32, 40), torch.arange(40, 48)]
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([{"params": [p], "blocks": [blocks]}], lr=0.05, momentum=0.95, weight_decay=0.1)
    W, buf = W0.double(), torch.zeros(48, 16, dtype=torch.float64)
    for _ in range(2):
        g = torch.randn(48, 16)
        p.grad = g.clone()
        opt.step()
        g = g.double()
        buf = g + 0.95 * buf
        u = g + 0.95 * buf
        upd = torch.empty_like(u)
        for idx in blocks:
            blk = u[idx]
            upd[idx] = _ns64(blk) * 0.2 * math.sqrt(max(blk.shape))
        W = W * (1 - 0.05 * 0.1) - 0.05 * upd
    torch.testing.assert_close(p.detach().double(), W, rtol=0, atol=2e-5)


def test_qkv_blocks_follow_megatron_group_layout():
    class Cfg:
        kv_channels, num_attention_heads, num_query_groups = 4, 4, 2
        gated_linear_unit, ffn_hidden_size = True, 10

    q, k, v = logical_blocks("decoder.layers.0.self_attention.linear_qkv.weight", Cfg())
    # per group: [q0 q1 | k | v] of 4 rows each -> 16 rows per group
    assert q.tolist() == list(range(0, 8)) + list(range(16, 24))
    assert k.tolist() == list(range(8, 12)) + list(range(24, 28))
    assert v.tolist() == list(range(12, 16)) + list(range(28, 32))
    heads = logical_blocks("x.self_attention.linear_qkv.weight", Cfg(), qkv_split="per_head")
    assert len(heads) == 4 + 2 + 2
    gate, up = logical_blocks("decoder.layers.1.mlp.linear_fc1.weight", Cfg())
    assert gate.tolist() == list(range(10)) and up.tolist() == list(range(10, 20))
    assert logical_blocks("decoder.layers.1.mlp.linear_fc2.weight", Cfg()) is None
