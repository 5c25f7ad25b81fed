"""A model missing part of its weights, refused by both evaluation tools before the first model loads:
found at its own load, it stopped the run after every model before it had been evaluated. Also: an
--output-dir that is the HF model directory (the report would change the model's identity), and an HF
directory holding only tokenizer_config.json, which evaluate_downstream needs a tokenizer from."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from hf_run_fixtures import REPO
from test_quantization import _tiny_llama


def tiny_tokenizer_json(directory) -> None:
    """A small real tokenizer.json (a word-level vocabulary of a few tokens) in ``directory``."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>")).save(str(directory / "tokenizer.json"))


def _hf_models(tmp_path, tokenizer: bool = False):
    """tmp_path/good and tmp_path/broken: tiny HF Llamas saved in shards, one shard of broken deleted;
    a tokenizer_config.json in each, and a tokenizer.json where ``tokenizer``."""
    for name in ("good", "broken"):
        _tiny_llama(0).save_pretrained(tmp_path / name, max_shard_size="20KB")
        (tmp_path / name / "tokenizer_config.json").write_text("{}")
        if tokenizer:
            tiny_tokenizer_json(tmp_path / name)
    shards = sorted((tmp_path / "broken").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    return tmp_path / "good", tmp_path / "broken", shards[-1].name


def _run_downstream(monkeypatch, capsys, tmp_path, models) -> tuple[int, str, list]:
    """evaluate_downstream on ``models`` (task check skipped, any model load recorded and failing):
    (exit code, stderr, the paths it tried to load)."""
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    import megatron_osp.analysis.downstream as downstream

    loaded = []
    monkeypatch.setattr(downstream, "check_tasks", lambda *a, **k: None)  # the tasks are not the subject
    monkeypatch.setattr(downstream, "load_eval_model", lambda path, **kw: loaded.append(path) or 1 / 0)
    rc = evaluate_downstream.main([*map(str, models), "--tasks", "toy", "--settings", "fp", "--device", "cpu",
                                   "--output-dir", str(tmp_path / "out")])
    return rc, capsys.readouterr().err, loaded


def test_evaluate_quantization_names_a_missing_shard_before_any_model_loads(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_quantization

    from megatron_osp.data.indexed import IndexedDatasetWriter

    good, broken, shard = _hf_models(tmp_path)
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        writer.add_document(np.arange(90) % 96)
    rc = evaluate_quantization.main([str(good), str(broken), "--data", str(tmp_path / "held"), "--documents", "0:1",
                                     "--seq-length", "8", "--settings", "fp", "--num-windows", "2",
                                     "--weight-error-windows", "0", "--device", "cpu", "--no-plots",
                                     "--output-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 2 and "== " not in out, out  # the good model was not evaluated first
    assert f"error: {broken / 'model.safetensors.index.json'} names {shard}, missing from {broken}" in err, err
    assert not (tmp_path / "out").exists()


def test_evaluate_downstream_names_a_missing_shard_or_checkpoint_file_before_any_model_loads(
        tmp_path, capsys, monkeypatch, megatron_single_rank):
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import RunConfig

    good, broken, shard = _hf_models(tmp_path, tokenizer=True)
    cfg = get_preset("test")
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, [build_gpt_model(cfg, transformer_config(cfg), seed=1)],
                    RunConfig(model=cfg), save_rng=False)
    distcp = sorted((tmp_path / "run").glob("checkpoints/iter_*/*.distcp"))[0]
    distcp.unlink()
    for bad, expected in ((broken, f"error: {broken / 'model.safetensors.index.json'} names {shard}, missing from"),
                          (tmp_path / "run", f"missing shard file {distcp}")):
        rc, err, loaded = _run_downstream(monkeypatch, capsys, tmp_path, [good, bad])
        assert rc == 2 and expected in err and loaded == [], err
        assert not (tmp_path / "out").exists()


def test_evaluate_downstream_names_a_checkpoint_whose_tokenizer_is_gone_before_any_model_loads(
        tmp_path, capsys, monkeypatch, megatron_single_rank):
    """A Megatron run whose recorded tokenizer is not on this machine (its export would have none) was
    refused only when its turn to load came, after the models before it had been evaluated."""
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import RunConfig

    good, _, _ = _hf_models(tmp_path, tokenizer=True)
    cfg = get_preset("test")
    config = RunConfig(model=cfg)
    config.data.tokenizer_model = str(tmp_path / "gone" / "tokenizer.model")
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, [build_gpt_model(cfg, transformer_config(cfg), seed=1)],
                    config, save_rng=False)
    rc, err, loaded = _run_downstream(monkeypatch, capsys, tmp_path, [good, tmp_path / "run"])
    assert rc == 2 and f"error: {tmp_path / 'run'}: the run's tokenizer was not found" in err and loaded == [], err
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_is_the_hf_model_directory_is_refused(tmp_path, capsys):
    """A report written into the HF model directory it evaluates changed that directory's files, which are
    the model's identity: --resume then refused the run as 'model 1 has changed'. Refused at the start,
    nothing written into the model's directory."""
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_quantization

    from megatron_osp.data.indexed import IndexedDatasetWriter

    good, _, _ = _hf_models(tmp_path)
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        writer.add_document(np.arange(90) % 96)
    before = sorted(p.name for p in good.iterdir())
    rc = evaluate_quantization.main([str(good), "--data", str(tmp_path / "held"), "--documents", "0:1", "--seq-length",
                                     "8", "--settings", "fp", "--num-windows", "2", "--weight-error-windows", "0",
                                     "--device", "cpu", "--no-plots", "--output-dir", str(good)])
    out, err = capsys.readouterr()
    assert rc == 2 and f"error: --output-dir {good} is the HF model directory {good}" in err and "== " not in out, err
    assert sorted(p.name for p in good.iterdir()) == before


def test_an_hf_directory_with_only_a_tokenizer_config_is_refused_by_evaluate_downstream(tmp_path, capsys, monkeypatch):
    """An HF directory holding tokenizer_config.json but no tokenizer.json or tokenizer.model passed
    evaluate_downstream's checks and failed at its load (after the models before it). Refused before any
    model loads, naming the directory and what is missing. evaluate_quantization reads pre-tokenized
    --data and needs no tokenizer: the same directory passes its checks (it reaches the missing shard
    of the next model)."""
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_quantization

    import megatron_osp.analysis.downstream as downstream
    from megatron_osp.data.indexed import IndexedDatasetWriter

    good, broken, shard = _hf_models(tmp_path, tokenizer=True)
    _tiny_llama(0).save_pretrained(tmp_path / "notok")
    (tmp_path / "notok" / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizerFast"}')
    rc, err, loaded = _run_downstream(monkeypatch, capsys, tmp_path, [good, tmp_path / "notok"])
    assert rc == 2 and loaded == [], err
    assert (f"error: {tmp_path / 'notok'}: an HF model directory without a tokenizer: no tokenizer.json, "
            "tokenizer.model or other vocabulary file (only tokenizer_config.json)") in err, err
    assert not (tmp_path / "out").exists()
    # An older tokenizer's vocabulary (GPT-2's vocab.json + merges.txt), which AutoTokenizer loads, passes.
    _tiny_llama(0).save_pretrained(tmp_path / "oldtok")
    (tmp_path / "oldtok" / "vocab.json").write_text('{"a": 0, "b": 1}')
    (tmp_path / "oldtok" / "merges.txt").write_text("#version: 0.2\n")
    assert downstream.check_model_path(str(tmp_path / "oldtok")) == "hf"

    with IndexedDatasetWriter(tmp_path / "held") as writer:
        writer.add_document(np.arange(90) % 96)
    rc = evaluate_quantization.main([str(tmp_path / "notok"), str(broken), "--data", str(tmp_path / "held"),
                                     "--documents", "0:1", "--seq-length", "8", "--settings", "fp", "--num-windows",
                                     "2", "--weight-error-windows", "0", "--device", "cpu", "--no-plots",
                                     "--output-dir", str(tmp_path / "qout")])
    err = capsys.readouterr().err
    assert rc == 2 and f"names {shard}, missing from {broken}" in err and "tokenizer" not in err, err


def _cut(weights, how: str) -> str:
    """Damages ``weights`` (a safetensors file) as a download or copy does; the error text expected."""
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if how == "half":
        weights.write_bytes(data[: len(data) // 2])
        return f"its header declares {len(data)} bytes, the file has {len(data) // 2}"
    if how == "one byte short":
        weights.write_bytes(data[:-1])
        return f"its header declares {len(data)} bytes, the file has {len(data) - 1}"
    if how == "within the header":
        weights.write_bytes(data[: 8 + n // 2])
        return f"{8 + n // 2} bytes, shorter than the {n}-byte header it declares"
    if how == "empty":
        weights.write_bytes(b"")
        return "0 bytes, shorter than the 8-byte header length"
    if how == "appended":
        weights.write_bytes(data + b"\0" * 16)
        return f"its header declares {len(data)} bytes, the file has {len(data) + 16}"
    assert how == "header garbled"
    weights.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])
    return "its header is not a JSON object of tensors"


@pytest.mark.parametrize("how", ["half", "one byte short", "within the header", "empty", "appended",
                                 "header garbled"])
def test_a_damaged_safetensors_file_is_named_before_any_model_loads(tmp_path, capsys, monkeypatch, how):
    """A truncated or otherwise damaged model.safetensors (of a tiny checkpoint's HF export, one file)
    passed the file checks and was found at its load, after the models before it had been evaluated.
    Its header alone is read now (its declared data length against the file's size), for both tools,
    before any model loads; a shard of a sharded model is checked the same way."""
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream
    import evaluate_quantization

    import megatron_osp.analysis.downstream as downstream
    import megatron_osp.analysis.loading as loading
    from megatron_osp import parallel
    from megatron_osp.convert.hf_export import export_checkpoint
    from megatron_osp.data.indexed import IndexedDatasetWriter
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import RunConfig

    cfg = get_preset("test")
    parallel.init_distributed(1, 1)
    try:
        save_checkpoint(tmp_path / "run", 1, [build_gpt_model(cfg, transformer_config(cfg), seed=1)],
                        RunConfig(model=cfg), save_rng=False)
        export_checkpoint(tmp_path / "run", tmp_path / "hf", log=lambda *_: None)
    finally:
        parallel.shutdown()
    tiny_tokenizer_json(tmp_path / "hf")
    loading.check_model_files(str(tmp_path / "hf"))  # the export as written passes
    good, _, _ = _hf_models(tmp_path, tokenizer=True)
    weights = tmp_path / "hf" / "model.safetensors"
    expected = f"error: {weights}: not a whole safetensors file: {_cut(weights, how)}"
    loaded = []
    real_load = loading.load_for_analysis
    monkeypatch.setattr(loading, "load_for_analysis", lambda path, **kw: loaded.append(path) or real_load(path, **kw))
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        writer.add_document(np.arange(90) % 96)
    rc = evaluate_quantization.main([str(good), str(tmp_path / "hf"), "--data", str(tmp_path / "held"), "--documents",
                                     "0:1", "--seq-length", "8", "--settings", "fp", "--num-windows", "2",
                                     "--weight-error-windows", "0", "--device", "cpu", "--no-plots",
                                     "--output-dir", str(tmp_path / "qout")])
    out, err = capsys.readouterr()
    assert rc == 2 and expected in err and loaded == [] and "== " not in out, err
    assert not (tmp_path / "qout").exists()

    monkeypatch.setattr(downstream, "check_tasks", lambda *a, **k: None)  # the tasks are not the subject
    rc = evaluate_downstream.main([str(good), str(tmp_path / "hf"), "--tasks", "toy", "--settings", "fp",
                                   "--device", "cpu", "--output-dir", str(tmp_path / "dout")])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and loaded == [], err
    assert not (tmp_path / "dout").exists()

    shard = sorted(good.glob("model-*.safetensors"))[0]  # a shard of a sharded model: the same check
    expected = f"{shard}: not a whole safetensors file: {_cut(shard, how)}"
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        loading.check_model_files(str(good))


def test_a_file_declaring_a_header_over_the_safetensors_limit_is_refused_without_reading_it(tmp_path):
    """Another kind of file named model.safetensors (a GGUF model's first 8 bytes read as a header length
    of about 14 GB) is refused by the format's 100 MB header limit, not read into memory as a header."""
    from megatron_osp.analysis.loading import safetensors_header

    path = tmp_path / "model.safetensors"
    declared = 150_000_000
    with open(path, "wb") as f:  # sparse: the declared header fits in the file
        f.write(declared.to_bytes(8, "little"))
        f.truncate(8 + declared + 1024)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a whole safetensors file: it declares a "
                                                   f"{declared}-byte header, over safetensors' limit of 100000000")):
        safetensors_header(path)
