"""The kurtosis metric matches scipy, and the recorder captures exactly the hidden states it should."""

import json

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from megatron_osp.analysis import (
    HiddenStateRecorder,
    KurtosisReport,
    excess_kurtosis,
    measure_kurtosis,
    token_excess_kurtosis,
)

SEQ, BATCH, HIDDEN = 7, 3, 64


def _samples():
    rng = np.random.default_rng(0)
    normal = rng.standard_normal((SEQ, BATCH, HIDDEN))
    heavy = rng.standard_t(df=3, size=(SEQ, BATCH, HIDDEN))
    outliers = rng.standard_normal((SEQ, BATCH, HIDDEN))
    outliers[..., [5, 17]] *= 60.0  # planted outlier channels, as in pre-trained LLMs
    return {"normal": normal, "student_t": heavy, "outlier_channels": outliers}


@pytest.mark.parametrize("kind", ["normal", "student_t", "outlier_channels"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_kurtosis_matches_scipy(kind, dtype):
    x = _samples()[kind]
    x_t = torch.from_numpy(x).to(dtype)
    want = stats.kurtosis(x_t.double().numpy(), axis=-1, fisher=True, bias=True)
    got = token_excess_kurtosis(x_t)
    assert got.shape == (SEQ, BATCH)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9)
    # along another dim too
    got0 = token_excess_kurtosis(x_t.transpose(0, 2), dim=0)
    np.testing.assert_allclose(got0.numpy(), want.T, rtol=1e-6, atol=1e-9)


def test_outlier_channels_score_high():
    s = _samples()
    assert excess_kurtosis(torch.from_numpy(s["outlier_channels"])) > 10.0
    assert excess_kurtosis(torch.from_numpy(s["normal"])) < 1.0


def test_relu_clamps_negative_kurtosis():
    # a +/-1 vector has kurtosis 1 -> excess -2; uniform has -1.2
    x = torch.tensor([[1.0, -1.0] * 8, list(np.linspace(-1, 1, 16))])
    per_token = token_excess_kurtosis(x)
    assert torch.allclose(per_token[0], torch.tensor(-2.0, dtype=torch.float64))
    assert (per_token < 0).all()
    assert excess_kurtosis(x) == 0.0
    # mean of relu, not relu of mean: one spiky token and one negative token
    spike = torch.zeros(16)
    spike[0] = 1.0
    both = torch.stack([spike, x[0]])
    k_spike = float(token_excess_kurtosis(spike))
    assert excess_kurtosis(both) == pytest.approx(k_spike / 2, rel=1e-12)


def test_constant_token_is_nan_raw_and_zero_in_metric():
    x = torch.ones(2, 8)
    x[1] = torch.randn(8)
    assert torch.isnan(token_excess_kurtosis(x)[0])
    assert np.isfinite(excess_kurtosis(x))


class ToyLayer(nn.Module):
    """Mimics Megatron-Core's TransformerLayer: [s, b, h] in, ``(hidden_states, context)`` out."""

    def __init__(self, hidden, layer_number, outlier_channel=None):
        super().__init__()
        self.layer_number = layer_number
        self.linear = nn.Linear(hidden, hidden)
        self.outlier_channel = outlier_channel

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        out = hidden_states + torch.tanh(self.linear(hidden_states))
        if self.outlier_channel is not None:
            out = out.clone()
            out[..., self.outlier_channel] += 50.0
        return out, None


class ToyStack(nn.Module):
    def __init__(self, hidden=HIDDEN, n_layers=3, vocab=50):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            [ToyLayer(hidden, i + 1, outlier_channel=3 if i == 1 else None) for i in range(n_layers)]
        )

    def forward(self, tokens, keyword=False):
        """tokens [b, s] -> hidden states [s, b, h]; returns every hidden state for reference."""
        h = self.embedding(tokens).transpose(0, 1).contiguous()
        states = [h]
        for i, layer in enumerate(self.layers):
            h, _ = layer(hidden_states=h, attention_mask=None) if keyword else layer(h, None)
            states.append(h)
        return states


@pytest.mark.parametrize("keyword", [False, True])
def test_recorder_matches_direct_computation(keyword):
    torch.manual_seed(0)
    model = ToyStack()
    batches = [torch.randint(0, 50, (BATCH, SEQ)), torch.randint(0, 50, (BATCH + 2, SEQ - 2))]
    all_states = []

    def run():
        for tokens in batches:
            all_states.append(model(tokens, keyword=keyword))

    report = measure_kurtosis(model.layers, run)
    assert report.names == ["embedding", "layer_1", "layer_2", "layer_3"]
    for i in range(len(report.names)):
        # token-weighted mean over both batches of relu'd per-token kurtosis
        per_token = torch.cat([torch.relu(token_excess_kurtosis(s[i])).flatten() for s in all_states])
        assert report.values[i] == pytest.approx(float(per_token.mean()), rel=1e-12)
        peak = max(float(s[i].abs().max()) for s in all_states)
        assert report.max_abs[i] == pytest.approx(peak, rel=1e-7)
    assert report.values[2] == max(report.values)  # the layer with the planted outlier channel
    assert report.max == report.values[2]
    assert report.mean == pytest.approx(sum(report.values) / 4)
    # hooks are gone after the context exits
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.layers)


def test_recorder_without_input_and_reset():
    torch.manual_seed(1)
    model = ToyStack(n_layers=2)
    tokens = torch.randint(0, 50, (BATCH, SEQ))
    with torch.no_grad(), HiddenStateRecorder(model.layers, record_input=False) as rec:
        states = model(tokens)
        first = rec.report()
        rec.reset()
        assert all(np.isnan(v) for v in rec.report().values)
        model(tokens)
        second = rec.report()
    assert first.names == ["layer_1", "layer_2"]
    assert first.values == pytest.approx([excess_kurtosis(s) for s in states[1:]], rel=1e-12)
    assert second.values == pytest.approx(first.values, rel=1e-12)
    with pytest.raises(ValueError):
        HiddenStateRecorder(model.layers, names=["a"])


def test_report_table_and_save(tmp_path):
    report = KurtosisReport(
        names=["embedding", "layer_1", "layer_2"], values=[0.5, 12.25, 3.0], max_abs=[1.0, 80.0, 4.5]
    )
    table = report.format_table()
    for name in report.names:
        assert name in table
    assert "mean 5.2500" in table and "max  12.2500" in table
    rows = table.splitlines()
    assert len({len(r) for r in rows[:2] + rows[2:5]}) == 1  # header and rows aligned
    titled = report.format_table(title="step 100")
    assert titled.splitlines()[0] == "step 100" and titled.splitlines()[1:] == rows

    path = tmp_path / "sub" / "kurtosis.json"
    report.save(path)
    data = json.loads(path.read_text())
    assert data["names"] == report.names and data["values"] == report.values
    assert data["mean"] == pytest.approx(5.25) and data["max"] == 12.25
    assert data["max_abs"] == report.max_abs
    assert [p.name for p in path.parent.iterdir()] == ["kurtosis.json"]  # no tmp file left behind

    assert KurtosisReport.load(path) == report


class PlainLayer(nn.Module):
    """A layer returning a bare tensor instead of a tuple."""

    def forward(self, hidden_states):
        return hidden_states * 2.0 + 1.0


def test_plain_tensor_output_and_offset_names():
    layers = nn.ModuleList([PlainLayer(), PlainLayer()])
    x = torch.randn(SEQ, BATCH, HIDDEN)
    x[..., 0] += 30.0

    def run():
        layers[1](layers[0](x))

    report = measure_kurtosis(layers, run, first_layer_offset=0)
    assert report.names == ["embedding", "layer_1", "layer_2"]
    # affine maps leave kurtosis unchanged
    assert report.values == pytest.approx([excess_kurtosis(x)] * 3, rel=1e-9)
    assert report.max_abs[2] == pytest.approx(float((x * 4 + 3).abs().max()), rel=1e-6)

    # a later pipeline stage: no "embedding", names continue after the offset
    later = measure_kurtosis(layers, run, first_layer_offset=2)
    assert later.names == ["layer_3", "layer_4"]
    joined = report.merge(later)
    assert joined.names == ["embedding", "layer_1", "layer_2", "layer_3", "layer_4"]
    assert joined.values == report.values + later.values
    assert joined.max_abs == report.max_abs + later.max_abs
    assert joined.max == max(joined.values)
    with pytest.raises(ValueError):
        report.merge(report)
    # explicit record_input on an offset stage; offset inferred from Megatron-style layer_number
    with HiddenStateRecorder(layers, first_layer_offset=4, record_input=True) as rec:
        run()
    assert rec.report().names == ["embedding", "layer_5", "layer_6"]
    stack = ToyStack(n_layers=2)
    for layer in stack.layers:
        layer.layer_number += 6
    assert HiddenStateRecorder(stack.layers).names == ["layer_7", "layer_8"]


def test_hooks_removed_when_forward_raises():
    model = ToyStack(n_layers=2)

    def boom():
        model(torch.randint(0, 50, (BATCH, SEQ)))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure_kurtosis(model.layers, boom)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.layers)
    assert torch.is_grad_enabled()
