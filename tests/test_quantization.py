"""RTN fake quantization against hand-computed values and its error bound; GPTQ vs RTN; perplexity."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_osp.analysis.gptq import HessianAccumulator, gptq_quantize
from megatron_osp.analysis.quantization import (
    QuantSetting,
    activation_quant_hooks,
    fake_quant,
    parse_setting,
    quant_scale,
    weight_fake_quant_,
)


def test_fake_quant_hand_computed_4bit():
    # max|x| = 7 -> qmax 7, scale 1: plain rounding to integers (half to even, as torch.round).
    x = torch.tensor([[0.2, -1.6, 3.5, 7.0, -2.49]])
    assert torch.equal(fake_quant(x, 4), torch.tensor([[0.0, -2.0, 4.0, 7.0, -2.0]]))
    # max|x| = 1.4 -> scale 0.2: 0.5 -> 2.5 -> 2 (even) -> 0.4; -0.33 -> -1.65 -> -2 -> -0.4.
    y = torch.tensor([0.5, -0.33, 1.4, 0.09])
    want = torch.tensor([0.4, -0.4, 1.4, 0.0])
    torch.testing.assert_close(fake_quant(y, 4), want, rtol=0, atol=1e-6)
    # 8 bits: qmax 127.
    z = torch.tensor([1.0, -127.0, 0.49])
    torch.testing.assert_close(fake_quant(z, 8), torch.tensor([1.0, -127.0, 0.0]))


def test_fake_quant_groups_and_zero_groups():
    x = torch.tensor([[1.0, 0.6, 100.0, -60.0], [0.0, 0.0, 0.0, 0.0]])
    got = fake_quant(x, 4, group_size=2)
    # group [1, .6]: scale 1/7 -> 0.6 * 7 = 4.2 -> 4 -> 4/7; group [100, -60]: scale 100/7, -4.2 -> -4.
    want = torch.tensor([[1.0, 4 / 7, 100.0, -400 / 7], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="group_size=3"):
        fake_quant(x, 4, group_size=3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 16])
def test_fake_quant_error_bound_and_grid(bits, group):
    torch.manual_seed(bits)
    x = torch.randn(37, 64) * torch.logspace(-2, 2, 64)  # channels of very different scales
    q = fake_quant(x, bits, group)
    scale = quant_scale(x, bits, group)
    xs = x if group is None else x.reshape(37, 64 // group, group)
    qs = q if group is None else q.reshape(37, 64 // group, group)
    assert ((xs - qs).abs() <= scale / 2 + 1e-6 * scale).all()
    levels = qs / scale
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert levels.round().abs().max() <= 2 ** (bits - 1) - 1
    # the group maximum is represented exactly
    torch.testing.assert_close(qs.abs().amax(-1), xs.abs().amax(-1))


def test_fake_quant_16_bits_is_identity_and_dtype_kept():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert fake_quant(x, 16) is x
    assert fake_quant(x, 4).dtype == torch.bfloat16


def test_parse_setting():
    s = parse_setting("4-4-4")
    assert (s.w_bits, s.a_bits, s.kv_bits, s.ffn_hadamard, s.rotate, s.gptq) == (4, 4, 4, False, False, False)
    assert s.name == "4-4-4"
    assert parse_setting("fp").is_full_precision and parse_setting("fp").name == "fp"
    t = parse_setting("4-8-8-g32+quarot+gptq")
    assert (t.w_group_size, t.rotate, t.gptq, t.uses_ffn_hadamard) == (32, True, True, True)
    assert t.name == "4-8-8-g32+quarot+gptq"
    assert parse_setting("4-4-4+had").name == "4-4-4+had"
    for bad in ("4-4", "4-4-4+foo", "1-4-4", "w4a4"):
        with pytest.raises(ValueError):
            parse_setting(bad)


def test_weight_and_activation_quantizers_on_a_linear():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False)
    w = lin.weight.detach().clone()
    weight_fake_quant_(lin, 4)
    torch.testing.assert_close(lin.weight.detach(), fake_quant(w, 4))  # per output row
    x = torch.randn(5, 3, 32)
    with activation_quant_hooks([lin], 4):
        got = lin(x)
    torch.testing.assert_close(got, fake_quant(x, 4) @ lin.weight.detach().T)
    torch.testing.assert_close(lin(x), x @ lin.weight.detach().T)  # hooks gone


def _correlated_inputs(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / math.sqrt(d)
    return torch.randn(n, d, generator=gen) @ mix + 0.1 * torch.randn(n, d, generator=gen)


@pytest.mark.parametrize("group", [None, 16])
def test_gptq_beats_rtn_on_a_layer(group):
    torch.manual_seed(1)
    x = _correlated_inputs(512, 64)
    w = torch.randn(48, 64)
    acc = HessianAccumulator(64)
    for chunk in x.split(100):
        acc.add(chunk)
    torch.testing.assert_close(acc.h, 2 * x.double().T @ x.double() / 512)
    q_gptq, scales = gptq_quantize(w, acc.h, 4, group_size=group, block_size=32, return_scales=True)
    q_rtn = fake_quant(w, 4, group)
    err = lambda q: float(((x @ w.T - x @ q.T) ** 2).sum())  # noqa: E731
    assert err(q_gptq) < 0.7 * err(q_rtn), (err(q_gptq), err(q_rtn))
    # still on a 4-bit symmetric grid per row (or group)
    assert scales.shape == (48, 64 // group if group else 1)
    qs = q_gptq.reshape(48, -1, group) if group else q_gptq.unsqueeze(1)
    levels = qs.double() / scales.unsqueeze(-1)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert levels.round().abs().max() <= 7


def test_gptq_with_identity_hessian_is_rtn():
    # Uncorrelated unit-variance inputs: no error feedback helps, GPTQ reduces to RTN.
    w = torch.randn(16, 32)
    q = gptq_quantize(w, 2 * torch.eye(32, dtype=torch.float64), 4, damp=0.0)
    torch.testing.assert_close(q, fake_quant(w, 4))


def test_perplexity_equals_exp_mean_nll(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_osp.analysis.evaluation import load_token_windows, perplexity
    from megatron_osp.data.indexed import IndexedDatasetWriter

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ).eval()
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        for n in (50, 7, 90, 33):
            writer.add_document(rng.integers(0, 96, n))
    windows = load_token_windows(str(tmp_path / "held"), seq_length=15)
    assert windows.shape == (180 // 16, 16)
    stream = np.concatenate([writer_doc for writer_doc in _docs(tmp_path / "held")])
    np.testing.assert_array_equal(windows.numpy().reshape(-1), stream[: windows.numel()])
    got = perplexity(model, windows, batch_size=4)
    with torch.no_grad():
        lg = model(input_ids=windows[:, :-1]).logits
    nll = F.cross_entropy(lg.reshape(-1, 96).double(), windows[:, 1:].reshape(-1), reduction="none")
    assert got.tokens == nll.numel()
    assert got.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-6)
    # a fraction range selects documents like the training split does (round(lo * D))
    tail = load_token_windows(str(tmp_path / "held"), seq_length=15, documents=(0.5, 1.0))
    np.testing.assert_array_equal(tail.numpy().reshape(-1), stream[57 : 57 + tail.numel()])
    with pytest.raises(ValueError, match="fewer than one window"):
        load_token_windows(str(tmp_path / "held"), seq_length=200)


def _docs(prefix):
    from megatron_osp.data.indexed import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))]


def _tiny_llama(seed=0, vocab=96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    initializer_range=0.1)
    ).eval()


def _two_models_and_held_data(tmp_path, documents: int) -> None:
    """tmp_path/m0, m1 (tiny HF Llamas of seeds 0, 1) and tmp_path/held, ``documents`` random documents
    of 40 tokens: what the evaluation tool tests run on."""
    from megatron_osp.data.indexed import IndexedDatasetWriter

    for seed in (0, 1):
        _tiny_llama(seed).save_pretrained(tmp_path / f"m{seed}")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        for _ in range(documents):
            writer.add_document(rng.integers(0, 96, 40))


def test_model_gptq_lowers_output_error_and_is_undone():
    from megatron_osp.analysis.evaluation import apply_setting
    from megatron_osp.analysis.model_parts import logits, model_parts

    parts = model_parts(_tiny_llama())
    calib = torch.randint(0, 96, (8, 33))
    tokens = calib[:, :-1]
    with torch.no_grad():
        base = logits(parts, tokens)
        before = {n: p.clone() for n, p in parts.model.named_parameters()}
        errs = {}
        for name in ("3-16-16", "3-16-16+gptq"):
            with apply_setting(parts, parse_setting(name), calibration=calib, batch_size=4):
                errs[name] = float((logits(parts, tokens) - base).pow(2).mean())
                w = parts.layers[1].mlp_out.weight
                levels = w / quant_scale(w, 3)
                torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
        for n, p in parts.model.named_parameters():
            assert torch.equal(p, before[n]), n
    assert errs["3-16-16+gptq"] < 0.8 * errs["3-16-16"], errs
    with pytest.raises(ValueError, match="calibration"):
        with apply_setting(parts, parse_setting("4-4-4+gptq")):
            pass


def test_evaluate_quantization_tool_on_hf_directories(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import evaluate_quantization

    _two_models_and_held_data(tmp_path, 20)
    rc = evaluate_quantization.main([
        str(tmp_path / "m0"), str(tmp_path / "m1"), "--labels", "a", "b", "--data", str(tmp_path / "held"),
        "--seq-length", "16", "--num-windows", "6", "--batch-size", "3", "--device", "cpu",
        "--documents", "0.5:1", "--settings", "fp", "4-4-4", "4-4-4+had", "--output-dir", str(tmp_path / "out"),
    ])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert [m["label"] for m in report["models"]] == ["a", "b"]
    assert report["meta"]["sequences"] == 6 and report["meta"]["documents"] == "0.5:1.0"
    for m in report["models"]:
        assert list(m["perplexity"]) == ["fp", "4-4-4", "4-4-4+had"]
        assert m["eval_tokens"] == 6 * 16
        assert len(m["kurtosis"]["values"]) == 3  # embedding + 2 layers
    md = (tmp_path / "out" / "quantization.md").read_text()
    assert "| a |" in md and "ppl 4-4-4" in md
    table = [line for line in md.splitlines() if line.startswith("| model | kurt")]
    row = [line for line in md.splitlines() if line.startswith("| a |")][0]
    cells = lambda line: len(re.split(r"(?<!\\)\|", line))  # noqa: E731  (unescaped pipes)
    assert cells(table[0]) == cells(row)
    for png in ("kurtosis_per_layer.png", "perplexity_vs_bits.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    # the per-role weight-rounding table: one row per model and role, in the JSON and the Markdown
    roles = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for m in report["models"]:
        assert m["weight_error"]["bits"] == 4 and list(m["weight_error"]["roles"]) == roles
    assert "## Where 4-bit weight rounding costs" in md
    section = md.split("## Where 4-bit weight rounding costs")[1].splitlines()
    assert [line.split(" | ")[1] for line in section if line.startswith("| a | ")] == roles
    # bad input is refused with the parameter's name
    assert evaluate_quantization.main([str(tmp_path / "m0"), "--data", str(tmp_path / "nope"),
                                       "--output-dir", str(tmp_path / "o2")]) == 2
    common = [str(tmp_path / "m0"), "--data", str(tmp_path / "held"), "--seq-length", "16", "--num-windows", "2",
              "--device", "cpu", "--documents", "0.5:1", "--settings", "fp", "--no-plots"]
    assert evaluate_quantization.main(common + ["--weight-error-bits", "1", "--output-dir", str(tmp_path / "o3")]) == 2
    assert evaluate_quantization.main(common + ["--weight-error-windows", "0", "--output-dir", str(tmp_path / "o4")]) == 0
    assert json.loads((tmp_path / "o4" / "quantization.json").read_text())["models"][0]["weight_error"] is None
    assert "weight rounding costs" not in (tmp_path / "o4" / "quantization.md").read_text()


def test_compare_runs_table_gets_the_quantization_columns(tmp_path):
    import json

    from megatron_osp.analysis.compare import format_comparison, load_quantization, load_run

    runs = []
    for name, opt, norm, proj, ppl in (("adam", "adam", "rmsnorm", False, (90.0, 120.5)),
                                       ("osp", "muon", "ssnorm", True, (60.0, 61.25))):
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(dict(
            optimizer=opt, normalization=norm, embedding_projection=proj, tokens=1000, train_loss=1.0,
            val_loss=2.0, kurtosis_mean=0.5, kurtosis_max=0.7, run_dir="relative/elsewhere")))
        (d / "kurtosis.json").write_text(json.dumps(dict(names=["embedding"], values=[0.5], max_abs=[3.0])))
        runs.append(dict(path=str(d), perplexity={"fp": ppl[0], "4-4-4": ppl[1]}))
    (tmp_path / "q.json").write_text(json.dumps({"meta": {}, "models": runs}))
    table = format_comparison([load_run(tmp_path / "adam"), load_run(tmp_path / "osp")],
                              load_quantization(tmp_path / "q.json"))
    lines = table.splitlines()
    assert "ppl 4-4-4" in lines[0] and "4-4-4 degradation" in lines[0]
    assert lines[2].startswith("Adam + RMSNorm") and lines[2].rstrip().endswith("+30.5")
    assert lines[3].startswith("OSP (Muon + SSNorm + EmbProj)") and lines[3].rstrip().endswith("+1.25")
    assert "4-16-16" not in table  # not measured: no column
    # with the weights-only setting measured, its degradation comes last (one model lacks it: "-")
    runs[0]["perplexity"]["4-16-16"] = 91.5
    (tmp_path / "q.json").write_text(json.dumps({"meta": {}, "models": runs}))
    lines = format_comparison([load_run(tmp_path / "adam"), load_run(tmp_path / "osp")],
                              load_quantization(tmp_path / "q.json")).splitlines()
    assert lines[0].rstrip().endswith("4-4-4 degradation  4-16-16 degradation")
    assert lines[2].split()[-2:] == ["+30.5", "+1.5"] and lines[3].split()[-2:] == ["+1.25", "-"]
    # a partial report (the evaluation stopped before osp's 4-4-4): '-', not nan, and a note saying so
    del runs[1]["perplexity"]["4-4-4"]
    progress = [{"model": r["path"], "done": list(r["perplexity"]), "pending": ["4-4-4"] * ("4-4-4" not in
                r["perplexity"])} for r in runs]
    (tmp_path / "q.json").write_text(json.dumps({"complete": False, "progress": progress, "meta": {}, "models": runs}))
    from megatron_osp.analysis.compare import partial_note

    lines = format_comparison([load_run(tmp_path / "adam"), load_run(tmp_path / "osp")],
                              load_quantization(tmp_path / "q.json")).splitlines()
    assert lines[3].split()[-4:] == ["60.00", "-", "-", "-"] and "nan" not in lines[3], lines[3]
    note = partial_note(tmp_path / "q.json")
    assert "is a partial report" in note and f"Not done: {runs[1]['path']} (4-4-4)" in note, note
    progress[1]["pending"] = []
    (tmp_path / "q.json").write_text(json.dumps({"complete": True, "progress": progress, "meta": {}, "models": runs}))
    assert partial_note(tmp_path / "q.json") is None
    # the downstream report's averages: fp, 4-4-4 and the drop, in percent; a model it lacks gets '-'
    from megatron_osp.analysis.compare import load_downstream

    down = {"complete": True, "models": [{"path": runs[1]["path"], "settings": {
        "fp": {"average": 0.5, "tasks": {}}, "4-4-4": {"average": 0.46, "tasks": {}}}}]}
    (tmp_path / "d.json").write_text(json.dumps(down))
    lines = format_comparison([load_run(tmp_path / "adam"), load_run(tmp_path / "osp")],
                              downstream=load_downstream(tmp_path / "d.json")).splitlines()
    assert lines[0].rstrip().endswith("avg fp  avg 4-4-4  avg drop"), lines[0]
    assert lines[2].split()[-3:] == ["-", "-", "-"] and lines[3].split()[-3:] == ["50.0", "46.0", "+4.0"], lines
    down["models"][0]["settings"]["4-4-4"]["partial"] = True  # a setting cut short has no average yet
    (tmp_path / "d.json").write_text(json.dumps(down))
    lines = format_comparison([load_run(tmp_path / "osp")], downstream=load_downstream(tmp_path / "d.json"))
    assert lines.splitlines()[2].split()[-3:] == ["50.0", "-", "-"]
    from megatron_osp.analysis.compare import _weights_only

    assert [_weights_only(s) for s in ("4-4-4", "4-8-8-g32", "4-16-16", "4-4-4+had", "fp", "8-8-8")] == [
        "4-16-16", "4-16-16-g32", None, None, None, "8-16-16"]


def test_compare_runs_refuses_the_other_tools_report(tmp_path):
    """compare_runs.py --quantization downstream.json ended in a KeyError traceback ('perplexity'), and
    --downstream quantization.json showed every average as '-' without a word: each flag now refuses
    the other tool's report, naming it; an empty report of the right tool still reads."""
    import json

    from megatron_osp.analysis.compare import load_downstream, load_quantization

    quant = {"complete": True, "meta": {}, "models": [{"path": "m", "perplexity": {"fp": 9.0}}]}
    down = {"complete": True, "meta": {}, "models": [{"path": "m", "settings": {"fp": {"average": 0.5}}}]}
    (tmp_path / "quantization.json").write_text(json.dumps(quant))
    (tmp_path / "downstream.json").write_text(json.dumps(down))
    with pytest.raises(ValueError, match="downstream.json is not a report of tools/evaluate_quantization.py"):
        load_quantization(tmp_path / "downstream.json")
    with pytest.raises(ValueError, match="quantization.json is not a report of tools/evaluate_downstream.py"):
        load_downstream(tmp_path / "quantization.json")
    assert list(load_quantization(tmp_path / "quantization.json").values()) == quant["models"]
    (tmp_path / "downstream.json").write_text(json.dumps({**down, "models": []}))
    assert load_downstream(tmp_path / "downstream.json") == {}


def test_megatron_checkpoint_loads_for_analysis_with_the_same_logits(megatron_single_rank, tmp_path):
    """A saved OSP checkpoint is rebuilt at TP=1 from its run config (another init seed would differ)."""
    from megatron_osp.analysis.loading import load_for_analysis
    from megatron_osp.analysis.model_parts import logits, model_parts
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import RunConfig

    cfg = get_preset("test")
    config = RunConfig(model=cfg)
    config.optimizer.name = "muon"
    model = build_gpt_model(cfg, transformer_config(cfg), seed=77).eval()
    save_checkpoint(tmp_path / "run" / "checkpoints", 3, [model], config, save_rng=False)
    loaded = load_for_analysis(str(tmp_path / "run"))  # a run directory
    assert loaded.kind == "megatron" and loaded.label == "Muon + SSNorm + EmbProj"
    assert loaded.seq_length == cfg.seq_length and loaded.data_split == config.data.split
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    with torch.no_grad():
        assert torch.equal(logits(model_parts(loaded.model), tokens), logits(model_parts(model), tokens))
    with pytest.raises(ValueError, match="neither an HF model directory"):
        load_for_analysis(str(tmp_path))


def test_analysis_builds_the_local_spec_and_refuses_fused_norms(megatron_single_rank, tmp_path):
    """A run trained with Transformer Engine is analysed on the local spec (norms as modules of their
    own: TE's LayerNormLinear would hand the input hooks the pre-norm activations), and a model with
    fused norms is refused by everything that hooks the linears' inputs, naming the fix."""
    from megatron_osp.analysis.activation_stats import ActivationStatsRecorder
    from megatron_osp.analysis.evaluation import apply_setting
    from megatron_osp.analysis.loading import load_for_analysis
    from megatron_osp.analysis.model_parts import model_parts
    from megatron_osp.analysis.weight_error import linear_weight_errors
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import RunConfig

    cfg = get_preset("test")
    cfg.normalization = "rmsnorm"
    model = build_gpt_model(cfg, transformer_config(cfg), seed=3).eval()
    config = RunConfig(model=cfg)
    config.model.transformer_impl = "transformer_engine"  # what the GPU run said (TE is not installed here)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, [model], config, save_rng=False)
    loaded = load_for_analysis(str(tmp_path / "run"))
    parts = model_parts(loaded.model)
    assert all(lp.attn_norm is not None and lp.mlp_norm is not None for lp in parts.layers)
    torch.testing.assert_close(parts.layers[0].attn_norm.weight, model.decoder.layers[0].input_layernorm.weight)

    hf = model_parts(_tiny_llama())
    hf.layers[1].mlp_norm = None  # what model_parts reports for a TE LayerNormLinear
    windows = torch.randint(0, 96, (2, 9))
    for attempt in (lambda: apply_setting(hf, parse_setting("4-4-4")).__enter__(),
                    lambda: ActivationStatsRecorder(hf).__enter__(),
                    lambda: linear_weight_errors(hf, windows)):
        with pytest.raises(ValueError, match="transformer_impl=local"):
            attempt()
    with apply_setting(hf, parse_setting("4-16-16")):  # weights only: no input hook, allowed
        pass


def test_hf_export_evaluates_like_the_megatron_model(megatron_single_rank, tmp_path):
    """The same trained weights seen through both adapters: Megatron (EmbProj, SSNorm, fused QKV) and
    its HF export (all folded) give the same perplexity, quantized or not, and the same kurtosis."""
    from megatron_osp.analysis.activation_stats import ActivationStatsRecorder
    from megatron_osp.analysis.evaluation import apply_setting, perplexity
    from megatron_osp.analysis.loading import load_for_analysis
    from megatron_osp.analysis.model_parts import logits, model_parts
    from megatron_osp.convert.hf_export import export_checkpoint
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import RunConfig

    cfg = get_preset("test")
    model = build_gpt_model(cfg, transformer_config(cfg), seed=5).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1.5)
    save_checkpoint(tmp_path / "ckpt", 1, [model], RunConfig(model=cfg), save_rng=False)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", log=lambda *_: None)
    hf = load_for_analysis(str(tmp_path / "hf")).model
    windows = torch.randint(0, cfg.vocab_size, (8, cfg.seq_length + 1))
    results = {}
    for kind, m in (("megatron", model), ("hf", hf)):
        parts = model_parts(m)
        for name in ("fp", "4-4-4", "4-4-4+quarot"):
            with apply_setting(parts, parse_setting(name)):
                results[kind, name] = perplexity(parts, windows, batch_size=4).perplexity
        with torch.no_grad(), ActivationStatsRecorder(parts) as rec:
            logits(parts, windows[:, :-1])
        results[kind, "kurtosis"] = [p.kurtosis for p in rec.stats().of_kind("residual")]
    assert results["hf", "fp"] == pytest.approx(results["megatron", "fp"], rel=1e-5)
    for name in ("4-4-4", "4-4-4+quarot"):
        assert results["hf", name] == pytest.approx(results["megatron", name], rel=2e-3), name
    np.testing.assert_allclose(results["hf", "kurtosis"], results["megatron", "kurtosis"], rtol=1e-4, atol=1e-6)


def _fake_results():
    kurt = {"mean": 0.5, "max": 1.5, "max_abs": [3.0, 4.0], "names": ["embedding", "layer_0"],
            "values": [0.5, 1.5], "gaussian_floor": 0.01}
    stats = {"points": [{"kind": "linear_input", "name": "layer_0.fc1", "kurtosis": 2.0, "max_abs": 4.0,
                         "median_channel_max": 1.0, "top_channels": [[3, 4.0]]}]}
    return [{"label": label, "kurtosis": kurt, "perplexity": {"fp": 10.0, "4-4-4": 12.0}, "activation_stats": stats}
            for label in ("adam", "osp")]


@pytest.mark.parametrize("have_matplotlib", [True, False])
def test_report_without_matplotlib_still_writes_json_and_markdown(tmp_path, monkeypatch, capsys, have_matplotlib):
    """Matplotlib is an optional extra: the quickstart, after a plain install, must not fail on it."""
    import sys

    from megatron_osp.analysis.quant_report import write_report

    if not have_matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    paths = write_report(_fake_results(), tmp_path / "q", {"data": "x"})
    names = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert sorted(p.name for p in paths) == names
    pngs = ["kurtosis_per_layer.png", "perplexity_vs_bits.png"] if have_matplotlib else []
    assert names == sorted(["quantization.json", "quantization.md"] + pngs)
    assert ("matplotlib is not installed" in capsys.readouterr().out) is not have_matplotlib
