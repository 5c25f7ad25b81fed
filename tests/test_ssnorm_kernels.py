"""model.ssnorm_kernel: FusedSSNorm (torch's rms_norm with the scalar gain broadcast) computes SSNorm.

Against a float64 autograd reference on random inputs: fp32 within 1e-5 (outputs and both gradients),
bf16 within bf16 rounding (the output is rounded once, as the eager kernel rounds it); the model-level
switch puts it in every norm slot with the same checkpoint keys and the same logits. The default,
"auto" (AutoSSNorm), is the fused kernel for activations on a GPU and the eager one elsewhere.
"""

import warnings

import pytest
import torch

from megatron_osp.models import build_gpt_model, get_preset, transformer_config
from megatron_osp.models.ssnorm import AutoSSNorm, FusedSSNorm, SSNorm


def _reference(x, gain, eps):
    x64, g64 = x.detach().double().requires_grad_(True), gain.detach().double().requires_grad_(True)
    y = g64 * x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + eps)
    return x64, g64, y


def _run(norm, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    norm.zero_grad(set_to_none=True)
    y = norm(x)
    y.backward(upstream.to(y.dtype))
    return y.detach(), x.grad, norm.weight.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_ssnorm_matches_a_float64_reference(dtype, tol):
    torch.manual_seed(0)
    hidden = 96
    x = (torch.randn(3, 11, hidden) * 3 + 0.25).to(dtype)
    upstream = torch.randn(3, 11, hidden)
    for cls in (SSNorm, FusedSSNorm):
        norm = SSNorm.__new__(cls)
        cls.__init__(norm, None, hidden, eps=1e-5)
        with torch.no_grad():
            norm.weight.data = torch.tensor([1.7], dtype=dtype)
        y, gx, gg = _run(norm, x, upstream)
        x64, g64, want = _reference(x, norm.weight, 1e-5)
        want.backward(upstream.to(dtype).double())
        torch.testing.assert_close(y.double(), want.detach(), rtol=tol, atol=tol, msg=f"{cls.__name__} output")
        torch.testing.assert_close(gx.double(), x64.grad, rtol=tol, atol=tol, msg=f"{cls.__name__} grad x")
        # the scalar gain's gradient sums every channel of every token: compared relative to its size
        torch.testing.assert_close(gg.double(), g64.grad, rtol=tol, atol=tol * g64.grad.abs().item(),
                                   msg=f"{cls.__name__} grad gain")


def test_fused_ssnorm_with_a_gain_of_another_dtype_is_the_eager_kernel():
    """Torch's fused kernel wants the weight in the input's dtype (otherwise torch warns and takes its
    unfused path); rounding the fp32 gain to bf16 would change the result, so that case runs SSNorm's
    own ops: bit-identical, no warning."""
    torch.manual_seed(1)
    x = torch.randn(7, 64).to(torch.bfloat16)
    eager, fused = SSNorm(None, 64), FusedSSNorm(None, 64)
    with torch.no_grad():
        eager.weight.fill_(1.2345678)
        fused.weight.fill_(1.2345678)
    assert eager.weight.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(eager(x), fused(x))


def _logits(model, tokens):
    return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def test_the_config_switch_puts_fused_ssnorm_in_every_slot_with_the_same_weights(megatron_single_rank):
    eager_cfg = get_preset("test", qk_layernorm=True, ssnorm_kernel="eager")
    fused_cfg = get_preset("test", qk_layernorm=True, ssnorm_kernel="fused")
    eager = build_gpt_model(eager_cfg, transformer_config(eager_cfg))
    fused = build_gpt_model(fused_cfg, transformer_config(fused_cfg))
    norms = [m for n, m in fused.named_modules() if n.endswith("norm") and "cross_attn" not in n]
    assert len(norms) == 4 * fused_cfg.num_layers + 1 and all(type(m) is FusedSSNorm for m in norms)
    assert not any(type(m) is FusedSSNorm for m in eager.modules())
    # Same parameters and checkpoint keys: either kernel loads the other's weights.
    fused.load_state_dict(eager.state_dict(), strict=True)
    with torch.no_grad():  # gains away from 1, so the gain is really applied
        for i, m in enumerate(norms):
            m.weight.fill_(0.5 + 0.1 * i)
        eager.load_state_dict(fused.state_dict(), strict=True)
    tokens = torch.randint(0, eager_cfg.vocab_size, (2, eager_cfg.seq_length))
    torch.testing.assert_close(_logits(fused, tokens), _logits(eager, tokens), rtol=1e-4, atol=1e-4)


def test_an_unknown_kernel_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="model.ssnorm_kernel"):
        get_preset("test", ssnorm_kernel="triton")
    from megatron_osp.models import layer_specs

    with pytest.raises(ValueError, match="model.ssnorm_kernel"):
        layer_specs.gpt_layer_spec("ssnorm", "local", ssnorm_kernel="triton")


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_fused_rms_norm"), reason="this torch has no fused rms_norm")
def test_fused_ssnorm_reaches_torchs_fused_kernel_and_eager_does_not():
    """The point of the fused form: torch dispatches it to aten::_fused_rms_norm (here on the CPU, as on
    CUDA); a change that makes the weight's dtype or shape unacceptable to it would silently fall back."""
    from torch.profiler import profile

    def ops(norm, dtype):
        x = torch.randn(8, 64, dtype=dtype, requires_grad=True)
        norm = norm.to(dtype)
        with profile() as prof:
            norm(x).sum().backward()
        return {e.name for e in prof.events()}

    for dtype in (torch.float32, torch.bfloat16):
        assert "aten::_fused_rms_norm" in ops(FusedSSNorm(None, 64), dtype)
        assert "aten::_fused_rms_norm" not in ops(SSNorm(None, 64), dtype)


def test_auto_is_the_default_in_every_slot(megatron_single_rank):
    cfg = get_preset("test", qk_layernorm=True)
    assert cfg.ssnorm_kernel == "auto"
    model = build_gpt_model(cfg, transformer_config(cfg))
    norms = [m for n, m in model.named_modules() if n.endswith("norm") and "cross_attn" not in n]
    assert len(norms) == 4 * cfg.num_layers + 1 and all(type(m) is AutoSSNorm for m in norms)


def _ops(norm, x):
    from torch.profiler import profile

    with profile() as prof:
        y = norm(x)
        y.sum().backward()
    return y, {e.name for e in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_takes_the_fused_kernel_only_on_the_gpu(dtype, monkeypatch):
    """On the CPU AutoSSNorm is the eager kernel bit for bit (so CPU figures do not move); on a device
    type in ``fused_on`` (CUDA; here the CPU stands in, patched) it is FusedSSNorm bit for bit."""
    assert AutoSSNorm.fused_on == ("cuda",)  # the GPU figure that made auto the default is CUDA's
    torch.manual_seed(1)
    x = torch.randn(5, 7, 64).to(dtype)
    upstream = torch.randn(5, 7, 64)
    auto, eager, fused = (cls(None, 64).to(dtype) for cls in (AutoSSNorm, SSNorm, FusedSSNorm))
    with torch.no_grad():
        for m in (auto, eager, fused):
            m.weight.fill_(0.75)
    for got, want in zip(_run(auto, x, upstream), _run(eager, x, upstream)):
        assert torch.equal(got, want)
    monkeypatch.setattr(AutoSSNorm, "fused_on", ("cpu",))
    for got, want in zip(_run(auto, x, upstream), _run(fused, x, upstream)):
        assert torch.equal(got, want)
    if hasattr(torch.ops.aten, "_fused_rms_norm"):
        xg = x.detach().clone().requires_grad_(True)
        assert "aten::_fused_rms_norm" in _ops(auto, xg)[1]
        monkeypatch.setattr(AutoSSNorm, "fused_on", ("cuda",))
        assert "aten::_fused_rms_norm" not in _ops(auto, xg)[1]
