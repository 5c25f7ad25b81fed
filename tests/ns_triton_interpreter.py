"""Checks of the symmetric Triton kernel in Triton's CPU interpreter (run by tests/test_ns_triton.py).

Not collected by a plain pytest run (the name has no test_ prefix): TRITON_INTERPRET=1 must be set
before triton.jit decorates the kernel, so test_ns_triton.py runs this file in a subprocess with it
set. Tolerances are explained in test_ns_triton.py's docstring.
"""

import importlib
import os

import pytest
import torch
from test_newton_schulz import BANDS, SHAPES, _random_with_spread, assert_matches_svd

from megatron_osp.optimizer import Muon, newton_schulz

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (see test_ns_triton.py)", allow_module_level=True)


def _nt():
    return importlib.import_module("megatron_osp.optimizer.ns_triton")


GRAM_CASES = [  # (shape, alpha, beta): X X^T of wide, tall and square stacks, and b A + c A A
    ((2, 40, 72), 1.0, 0.0),
    ((1, 100, 17), 1.0, 0.0),
    ((3, 64, 64), 1.0, 0.0),
    ((3, 64, 64), 2.0315, -4.775),
    ((2, 33, 33), -1.5, 0.25),
]


@pytest.mark.parametrize("shape,alpha,beta", GRAM_CASES, ids=str)
def test_kernel_sym_gram_matches_float64(shape, alpha, beta):
    g = torch.Generator().manual_seed(sum(shape))
    Y = torch.randn(*shape, generator=g)
    if beta:
        Y = Y @ Y.mT / shape[-1]  # a symmetric A, as in NS
    out = _nt().sym_gram(Y, alpha=alpha, beta=beta, config=(16, 16, 1, 1))
    Yd = Y.double()
    ref = alpha * Yd @ Yd.mT + (beta * Yd if beta else 0)
    assert out.shape == (shape[0], shape[1], shape[1]) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item())
    assert torch.equal(out, out.mT)


@pytest.mark.parametrize("config", [(32, 16, 1, 1), (64, 64, 1, 1)], ids=str)
def test_kernel_sym_gram_other_tiles(config):
    Y = torch.randn(2, 50, 40, generator=torch.Generator().manual_seed(1))  # 50 = 1.6 or 0.8 tiles
    out = _nt().sym_gram(Y, config=config)
    torch.testing.assert_close(out.double(), Y.double() @ Y.double().mT, rtol=0, atol=1e-4)
    assert torch.equal(out, out.mT)


def test_kernel_sym_gram_bf16_and_one_matrix():
    Y = torch.randn(40, 72, generator=torch.Generator().manual_seed(2)).bfloat16()
    out = _nt().sym_gram(Y, config=(16, 16, 1, 1))  # a 2-D input gives a 2-D output
    assert out.shape == (40, 40) and out.dtype == torch.bfloat16
    ref = Y.float() @ Y.float().mT  # bf16 products are exact in fp32
    assert ((out.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()
    assert torch.equal(out, out.mT)


def test_kernel_sym_gram_rejects_beta_on_non_square():
    with pytest.raises(ValueError, match="square"):
        _nt().sym_gram(torch.randn(1, 8, 16), beta=1.0)


@pytest.mark.parametrize("coefficients", ["keller", "polar_express"])
@pytest.mark.parametrize("shape", [(3, 40, 72), (64, 64), (96, 32)], ids=lambda s: "x".join(map(str, s)))
def test_kernel_newton_schulz_triton_equals_torch(shape, coefficients):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    tri = newton_schulz(G, coefficients=coefficients, backend="triton")
    ref = newton_schulz(G, coefficients=coefficients, backend="torch")
    assert tri.shape == G.shape
    torch.testing.assert_close(tri, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("coefficients,steps", list(BANDS))
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
def test_kernel_newton_schulz_triton_against_float64_svd(shape, coefficients, steps):
    G = _random_with_spread(shape, seed=sum(shape))
    X = newton_schulz(G.float(), steps=steps, coefficients=coefficients, backend="triton")
    assert_matches_svd(G, X, coefficients, steps)


def test_kernel_auto_stays_torch_on_cpu_in_interpreter():
    G = torch.randn(2, 24, 40)
    assert _nt().triton_available(G)  # the interpreter could run it ...
    torch.testing.assert_close(newton_schulz(G, backend="auto"), newton_schulz(G, backend="torch"), rtol=0, atol=0)  # ... auto won't


def test_kernel_muon_step_with_triton_backend():
    torch.manual_seed(0)
    start = [torch.randn(40, 24), torch.randn(24, 24)]
    params = {b: [torch.nn.Parameter(w.clone()) for w in start] for b in ("torch", "triton")}
    grads = [torch.randn(40, 24), torch.randn(24, 24)]
    for backend, ps in params.items():
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        Muon(ps, lr=0.02, ns_backend=backend).step()
    for a, b in zip(params["torch"], params["triton"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_kernel_auto_check_trusts_the_kernel_and_catches_a_bad_one(monkeypatch):
    ns = importlib.import_module("megatron_osp.optimizer.newton_schulz")  # the module, not the function

    monkeypatch.setattr(ns, "_CHECKED", {})
    X = torch.randn(3, 40, 72)
    assert ns._triton_checked(X)  # what "auto" does before it uses the kernel on a CUDA shape
    monkeypatch.setattr(_nt(), "sym_gram", lambda Y, alpha=1.0, beta=0.0: torch.zeros(Y.shape[0], Y.shape[1], Y.shape[1]))
    with pytest.warns(UserWarning, match="failed its check"):
        assert not ns._triton_checked(torch.randn(2, 24, 40))
    monkeypatch.setattr(_nt(), "sym_gram", lambda Y, alpha=1.0, beta=0.0: 1 / 0)
    with pytest.warns(UserWarning, match="ZeroDivisionError"):
        assert not ns._triton_checked(torch.randn(2, 16, 40))
