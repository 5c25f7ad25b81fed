"""Per-role weight-rounding diagnostics (analysis/weight_error.py) against direct float64 references."""

import math

import pytest
import torch

from megatron_osp.analysis.evaluation import apply_setting, perplexity
from megatron_osp.analysis.model_parts import model_parts
from megatron_osp.analysis.quantization import fake_quant, parse_setting, quant_scale
from megatron_osp.analysis.weight_error import (
    RoundingErrorAccumulator,
    linear_weight_errors,
    role_perplexities,
    roles_of,
    rounded_roles,
    weight_error_report,
)
from test_quantization import _tiny_llama  # the tests' 2-layer HF Llama with GQA


def _reference(x: torch.Tensor, w: torch.Tensor, bits: int, group: int | None):
    """The module doc's four quantities, in float64, from all inputs at once."""
    w64, x64 = w.double(), x.double()
    e64 = w64 - fake_quant(w.float(), bits, group).double()
    return dict(
        weight_error=float(e64.norm() / w64.norm()),
        output_error=float((x64 @ e64.T).norm() / (x64 @ w64.T).norm()),
        input_gain=float((x64 @ w64.T).norm() / (x64.norm() * w64.norm() / math.sqrt(w.shape[1]))),
        stable_rank=float(w64.norm() ** 2 / torch.linalg.matrix_norm(w64, ord=2) ** 2),
    )


@pytest.mark.parametrize("bits,group", [(4, None), (3, 8), (8, None)])
def test_accumulator_streams_batches_like_the_float64_reference(bits, group):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 40, generator=gen) * torch.linspace(0.2, 3.0, 40)  # columns of unequal scale
    mix = torch.randn(40, 40, generator=gen)
    x = torch.randn(3, 50, 40, generator=gen) @ mix  # correlated inputs, [batch, tokens, in]
    acc = RoundingErrorAccumulator(w, bits, group)
    for batch in x:  # three batches, streamed
        acc.add(batch)
    got = acc.result("layer_1.fc1", "fc1")
    ref = _reference(x.reshape(-1, 40), w, bits, group)
    assert got.name == "layer_1.fc1" and got.role == "fc1"
    for key, value in ref.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-5), key
    with pytest.raises(RuntimeError, match="no inputs"):
        RoundingErrorAccumulator(w, bits).result("layer_1.fc1", "fc1")


def test_input_gain_measures_alignment_with_the_weight():
    """Inputs in the weight's strongest directions: gain > 1 and the rounding is masked (output error
    below the weight error); inputs in its weakest: the opposite. Isotropic inputs: gain ~ 1 and
    output error ~ weight error (RTN error is close to isotropic)."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen))
    s = torch.logspace(0, -1.5, 128)
    w = (u * s) @ v.T  # singular values from 1 down to 0.03
    results = {}
    for name, basis in (("strong", v[:, :8]), ("weak", v[:, -8:]), ("isotropic", torch.eye(128))):
        x = torch.randn(4000, basis.shape[1], generator=gen) @ basis.T
        acc = RoundingErrorAccumulator(w, 4)
        acc.add(x)
        results[name] = acc.result("l", "r")
    assert results["strong"].input_gain > 2.0 and results["strong"].output_error < results["strong"].weight_error / 2
    assert results["weak"].input_gain < 0.5 and results["weak"].output_error > 2 * results["weak"].weight_error
    iso = results["isotropic"]
    assert iso.input_gain == pytest.approx(1.0, abs=0.05)
    assert iso.output_error == pytest.approx(iso.weight_error / iso.input_gain, rel=0.1)


def test_rounded_roles_rounds_only_that_role_and_restores_the_model():
    parts = model_parts(_tiny_llama())
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    with rounded_roles(parts, {"up_proj"}, 4):
        for name, lin in parts.named_linears():
            w = lin.weight
            if name.endswith(".up_proj"):
                levels = w / quant_scale(w, 4)
                torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
                assert not torch.equal(w, before[_param_name(parts, lin)])
            else:
                assert torch.equal(w, before[_param_name(parts, lin)]), name
    with pytest.raises(KeyError):
        with rounded_roles(parts, {"down_proj"}, 3):
            raise KeyError("an error inside the context")
    for n, p in parts.model.named_parameters():
        assert torch.equal(p, before[n]), n


def _param_name(parts, linear):
    return next(n for n, p in parts.model.named_parameters() if p is linear.weight)


def test_all_roles_rounded_equal_the_evaluations_weight_only_setting():
    """Rounding every role here is what apply_setting('4-16-16') does: the same perplexity."""
    parts = model_parts(_tiny_llama(1))
    windows = torch.randint(0, 96, (6, 17), generator=torch.Generator().manual_seed(1))
    with rounded_roles(parts, None, 4):
        ours = perplexity(parts, windows, batch_size=3).perplexity
    with apply_setting(parts, parse_setting("4-16-16")):
        theirs = perplexity(parts, windows, batch_size=3).perplexity
    assert ours == pytest.approx(theirs, rel=1e-6)
    done = []
    per_role = role_perplexities(parts, windows, bits=4, batch_size=3, progress=done.append)
    assert list(per_role) == roles_of(parts) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sum(done) == len(per_role) * windows.shape[0]  # the tool's progress bar counts these windows
    for role, value in per_role.items():
        with rounded_roles(parts, {role}, 4):
            assert value == pytest.approx(perplexity(parts, windows, batch_size=3).perplexity, rel=1e-9), role


def test_linear_weight_errors_see_each_linears_real_inputs():
    """The hooks record what each linear receives in the model's forward pass (checked against inputs
    captured separately for one of them), batch by batch."""
    parts = model_parts(_tiny_llama(2))
    windows = torch.randint(0, 96, (5, 13), generator=torch.Generator().manual_seed(2))
    errors = linear_weight_errors(parts, windows, bits=4, batch_size=2)
    assert [e.name for e in errors] == [name for name, _ in parts.named_linears()]
    target_name, target = parts.named_linears()[-1]  # layer_2.down_proj
    seen = []
    handle = target.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        parts.model(windows[:, :-1])
    handle.remove()
    ref = _reference(torch.cat(seen), target.weight.detach(), 4, None)
    got = next(e for e in errors if e.name == target_name)
    for key, value in ref.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-4), key


def test_weight_error_report_on_a_megatron_model(megatron_single_rank):
    """Megatron's linears (fused QKV, fc1 with gate and up, forward returning (out, bias)) work too;
    the role means are the means of the per-linear rows."""
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config

    cfg = get_preset("test")
    model = build_gpt_model(cfg, transformer_config(cfg), seed=5).eval()
    windows = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(5))
    report = weight_error_report(model, windows, bits=4, batch_size=2, input_windows=2)
    assert list(report["roles"]) == ["qkv", "o_proj", "fc1", "down_proj"]
    assert len(report["linears"]) == 4 * cfg.num_layers
    for role, row in report["roles"].items():
        rows = [e for e in report["linears"] if e["role"] == role]
        assert row["output_error"] == pytest.approx(sum(e["output_error"] for e in rows) / len(rows))
        assert 0 < row["weight_error"] < 0.5 and row["ppl"] > 0
