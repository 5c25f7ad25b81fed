"""tools/evaluate_quantization.py keeps what it has done: the report is rewritten after every finished
(model, setting) unit, marked partial, so a model that fails to load (simulated) stops the run
with its error but leaves the earlier models' results on disk, equal to what a complete run writes.
Too many --calibration-windows is refused before any model loads. On tiny saved HF Llamas, in-process.
"""

import json
import sys
from pathlib import Path

import numpy as np

from test_quantization import _tiny_llama, _two_models_and_held_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def _without_seconds(model: dict) -> dict:
    return {k: v for k, v in model.items() if k != "seconds"}


def failing_load(monkeypatch, bad: str) -> set[str]:
    """``bad``'s load fails (as one that runs out of memory does) where every check before it passed: a
    damaged weights file is refused before any model loads (test_model_files_precheck.py). Returns the
    set of failing paths (empty it to let the model load)."""
    import megatron_osp.analysis.loading as loading

    real, failing = loading.load_for_analysis, {bad}

    def load(path, **kw):
        if str(path) in failing:
            raise ValueError(f"{path}: cannot be loaded (a failure only its load finds)")
        return real(path, **kw)

    monkeypatch.setattr(loading, "load_for_analysis", load)
    return failing


def test_a_failing_model_leaves_the_earlier_ones_in_a_partial_report(tmp_path, capsys, monkeypatch):
    import evaluate_quantization

    from megatron_osp.data.indexed import IndexedDatasetWriter

    _tiny_llama(0).save_pretrained(tmp_path / "good")
    _tiny_llama(1).save_pretrained(tmp_path / "bad")
    failing_load(monkeypatch, str(tmp_path / "bad"))
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        for _ in range(10):
            writer.add_document(rng.integers(0, 96, 40))
    common = ["--data", str(tmp_path / "held"), "--seq-length", "8", "--num-windows", "2", "--batch-size", "2",
              "--documents", "0.5:1", "--device", "cpu", "--settings", "fp", "4-4-4", "--stats-windows", "1",
              "--weight-error-windows", "1", "--no-plots"]
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")

    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "perplexity_vs_bits.png").write_bytes(b"an earlier run's plot")
    rc = evaluate_quantization.main([good, bad, *common, "--output-dir", str(tmp_path / "partial")])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {bad}: cannot be loaded" in err, err  # the error, as before
    partial = json.loads((tmp_path / "partial" / "quantization.json").read_text())
    assert partial["complete"] is False
    assert partial["progress"] == [
        {"model": good, "done": ["fp", "4-4-4", "weight rounding"], "pending": []},
        {"model": bad, "done": [], "pending": ["fp", "4-4-4", "weight rounding"]},
    ]
    md = (tmp_path / "partial" / "quantization.md").read_text()
    assert "**Partial report**" in md and f"Not done: {bad} (fp, 4-4-4, weight rounding)" in md, md
    assert "| good |" in md
    assert not (tmp_path / "partial" / "perplexity_vs_bits.png").exists()  # plots come with the complete report

    assert evaluate_quantization.main([good, *common, "--output-dir", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "quantization.json").read_text())
    assert full["complete"] is True and full["progress"][0]["pending"] == []
    assert "Complete:" in (tmp_path / "full" / "quantization.md").read_text()
    assert [_without_seconds(m) for m in partial["models"]] == [_without_seconds(m) for m in full["models"]]
    assert partial["meta"] == full["meta"]


def test_too_many_calibration_windows_are_refused_before_any_model_loads(tmp_path, capsys):
    """GPTQ used to calibrate on fewer sequences than --calibration-windows asked for, without a word,
    when the calibration documents held fewer."""
    import evaluate_quantization

    from megatron_osp.data.indexed import IndexedDatasetWriter

    _tiny_llama(0).save_pretrained(tmp_path / "m")
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        for _ in range(10):
            writer.add_document(np.arange(40) % 96)
    rc = evaluate_quantization.main([str(tmp_path / "m"), "--data", str(tmp_path / "held"), "--seq-length", "8",
                                     "--documents", "0.5:1", "--settings", "fp", "4-4-4+gptq", "--device", "cpu",
                                     "--calibration-windows", "30", "--output-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    # documents 0..4 (the share before the held-out 0.5:1) hold 200 tokens: 22 windows of 9
    assert rc == 2 and "== " not in out, out
    assert f"--calibration-windows 30: documents 0..4 of {tmp_path / 'held'} hold only 22 windows of 9" in err, err
    assert not (tmp_path / "out").exists()


def test_resume_evaluates_only_what_the_report_lacks(tmp_path, capsys):
    """--resume keeps the settings a report holds (a sentinel perplexity stays as it was: not measured
    again) and measures the rest, to the values a complete run gives; a run without --resume or
    --overwrite leaves an earlier report alone; other options, another version of transformers (or of
    torch, or of this package), or a model rewritten since, are refused."""
    import evaluate_quantization

    _two_models_and_held_data(tmp_path, 10)
    common = [str(tmp_path / "m0"), str(tmp_path / "m1"), "--data", str(tmp_path / "held"), "--seq-length", "8",
              "--num-windows", "2", "--batch-size", "2", "--documents", "0.5:1", "--device", "cpu", "--settings",
              "fp", "4-4-4", "--stats-windows", "1", "--weight-error-windows", "1", "--no-plots"]
    full_dir, out = tmp_path / "full", tmp_path / "out"
    assert evaluate_quantization.main([*common, "--output-dir", str(full_dir)]) == 0
    full = json.loads((full_dir / "quantization.json").read_text())

    # what a run stopped after m0's fp leaves (m0: fp done; m1: nothing), with a sentinel fp perplexity
    cut = json.loads(json.dumps(full))
    m0 = cut["models"][0]
    m0["perplexity"] = {"fp": 123.0}
    m0["nll"] = {"fp": m0["nll"]["fp"]}
    m0["weight_error"] = None
    cut["models"] = [m0]
    cut["complete"] = False
    cut["progress"][0].update(done=["fp"], pending=["4-4-4", "weight rounding"])
    cut["progress"][1].update(done=[], pending=["fp", "4-4-4", "weight rounding"])
    out.mkdir()
    (out / "quantization.json").write_text(json.dumps(cut))
    capsys.readouterr()

    assert evaluate_quantization.main([*common, "--output-dir", str(out)]) == 2
    assert "already holds a partial report (1 of 6 units done)" in capsys.readouterr().err
    assert json.loads((out / "quantization.json").read_text()) == cut
    other = [("16" if a == "1" and common[i - 1] == "--weight-error-windows" else a) for i, a in enumerate(common)]
    assert evaluate_quantization.main([*other, "--output-dir", str(out), "--resume"]) == 2
    assert "was made with options.weight_error_windows = " in capsys.readouterr().err
    other = [("0.4:1" if a == "0.5:1" else a) for a in common]  # other held-out tokens
    assert evaluate_quantization.main([*other, "--output-dir", str(out), "--resume"]) == 2
    assert "was made with tokens." in capsys.readouterr().err

    assert evaluate_quantization.main([*common, "--output-dir", str(out), "--resume"]) == 0
    resumed = json.loads((out / "quantization.json").read_text())
    assert resumed["complete"] is True
    assert resumed["models"][0]["perplexity"]["fp"] == 123.0  # kept, not measured again
    resumed["models"][0]["perplexity"]["fp"] = full["models"][0]["perplexity"]["fp"]
    assert [_without_seconds(m) for m in resumed["models"]] == [_without_seconds(m) for m in full["models"]]
    assert resumed["meta"] == full["meta"]

    capsys.readouterr()  # a complete report resumed: nothing to do, no model loads
    assert evaluate_quantization.main([*common, "--output-dir", str(out), "--resume"]) == 0
    assert capsys.readouterr().out.count("done in the earlier run") == 2
    on_gpu = json.loads((out / "quantization.json").read_text())
    on_gpu["request"]["options"]["device"] = "cuda"  # measured with another device's kernels: not mixed
    (out / "quantization.json").write_text(json.dumps(on_gpu))
    assert evaluate_quantization.main([*common, "--output-dir", str(out), "--resume"]) == 2
    assert 'options.device = "cuda", this run asks for "cpu"' in capsys.readouterr().err
    on_gpu["request"]["options"]["device"] = "cpu"
    import transformers

    other = json.loads(json.dumps(on_gpu))  # made with another transformers: its numbers are not mixed in
    other["request"]["versions"]["transformers"] = "0.0.1"
    (out / "quantization.json").write_text(json.dumps(other))
    assert evaluate_quantization.main([*common, "--output-dir", str(out), "--resume"]) == 2
    assert (f'was made with versions.transformers = "0.0.1", this run has "{transformers.__version__}": its '
            "results would be mixed with another version's") in capsys.readouterr().err
    other["request"]["version"] = 1  # a report of before the versions were recorded
    del other["request"]["versions"]
    (out / "quantization.json").write_text(json.dumps(other))
    assert evaluate_quantization.main([*common, "--output-dir", str(out), "--resume"]) == 2
    assert "was written by an earlier version of this tool" in capsys.readouterr().err
    (out / "quantization.json").write_text(json.dumps(on_gpu))
    _tiny_llama(0).save_pretrained(tmp_path / "m0")  # rewritten after its results were kept
    assert evaluate_quantization.main([*common, "--output-dir", str(out), "--resume"]) == 2
    assert "model 1 (" in capsys.readouterr().err


def test_a_foreign_report_in_the_output_dir_is_refused_in_one_line(tmp_path):
    """A quantization.json that is JSON but not this tool's report (another tool's, with a "progress"
    of its own shape) was refused without --resume through a TypeError/KeyError traceback from
    counting its units; with --resume it must be refused as not resumable, not crash either."""
    import pytest

    from megatron_osp.analysis.report_resume import open_report

    request = {"models": [{"path": "m", "identity": {"kind": "hf", "files": "x"}}], "options": {}}
    path = tmp_path / "quantization.json"
    for foreign in ({"progress": 0.5}, {"progress": [{"step": 3}]}, {"progress": [{"done": 1, "pending": []}]},
                    {"request": {"version": 1, **request}, "progress": [{"model": "m"}]}):
        path.write_text(json.dumps(foreign))
        with pytest.raises(ValueError, match="already holds a report of an earlier run"):
            open_report(path, resume=False, overwrite=False, request=request)
        with pytest.raises(ValueError, match="--resume: .* was written by an earlier version of this tool"):
            open_report(path, resume=True, overwrite=False, request=request)
        assert json.loads(path.read_text()) == foreign


def test_the_checkpoint_evaluated_is_the_one_the_report_records(megatron_single_rank, tmp_path, monkeypatch):
    """A Megatron run directory is pinned to the iteration ``latest`` names when the run starts: the
    report records that iteration, and it is the one loaded, even when training saves a newer
    checkpoint (moving ``latest``) while the evaluation runs. Before, the report recorded one iteration
    and the model loaded could be the next."""
    import evaluate_quantization

    import megatron_osp.analysis.loading as loading
    from megatron_osp.data.indexed import IndexedDatasetWriter
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import RunConfig

    cfg = get_preset("test")
    config = RunConfig(model=cfg)
    save_dir = tmp_path / "run" / "checkpoints"
    save_checkpoint(save_dir, 1, [build_gpt_model(cfg, transformer_config(cfg), seed=1).eval()], config, save_rng=False)
    with IndexedDatasetWriter(tmp_path / "held") as writer:
        for _ in range(6):
            writer.add_document(np.arange(40) % cfg.vocab_size)
    real, loaded_from = loading.load_for_analysis, []

    def training_goes_on(path, **kw):  # a newer checkpoint lands between the start and the load
        if not (save_dir / "iter_0000002").exists():
            save_checkpoint(save_dir, 2, [build_gpt_model(cfg, transformer_config(cfg), seed=2).eval()], config,
                            save_rng=False)
        loaded_from.append(path)
        return real(path, **kw)

    monkeypatch.setattr(loading, "load_for_analysis", training_goes_on)
    rc = evaluate_quantization.main([str(tmp_path / "run"), "--data", str(tmp_path / "held"), "--documents", "0:1",
                                     "--settings", "fp", "--num-windows", "2", "--stats-windows", "1",
                                     "--weight-error-windows", "0", "--device", "cpu", "--no-plots",
                                     "--output-dir", str(tmp_path / "out")])
    assert rc == 0 and (save_dir / "latest").read_text().strip() == "iter_0000002"
    assert loaded_from == [str(save_dir / "iter_0000001")]
    report = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert report["request"]["models"][0]["identity"]["iteration"] == "iter_0000001"


def test_resume_refuses_other_weights_copied_in_with_the_same_size_and_time(tmp_path, capsys):
    """An HF model was known by its files' names, sizes and modification times: other weights of the same
    layout copied over it with the times kept (``cp -p``, ``rsync -a``: a re-export copied in) were taken
    for the model the report's results were made from, and resumed. A sample of the weights files' bytes
    and their safetensors headers are part of its identity now (a few chunks read, not the file)."""
    import os

    import evaluate_quantization

    from megatron_osp.analysis.report_resume import SAMPLE_BYTES, SAMPLE_CHUNKS

    _two_models_and_held_data(tmp_path, 10)
    out = tmp_path / "out"
    common = [str(tmp_path / "m0"), "--data", str(tmp_path / "held"), "--seq-length", "8", "--num-windows", "2",
              "--documents", "0.5:1", "--device", "cpu", "--settings", "fp", "--stats-windows", "1",
              "--weight-error-windows", "0", "--no-plots", "--output-dir", str(out)]
    assert evaluate_quantization.main(common) == 0
    assert evaluate_quantization.main([*common, "--resume"]) == 0  # the same files: resumed, nothing to do
    ours, theirs = tmp_path / "m0" / "model.safetensors", tmp_path / "m1" / "model.safetensors"
    st = ours.stat()
    assert theirs.stat().st_size == st.st_size > SAMPLE_CHUNKS * SAMPLE_BYTES  # sampled, not read whole
    ours.write_bytes(theirs.read_bytes())
    os.utime(ours, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert evaluate_quantization.main([*common, "--resume"]) == 2
    assert f"--resume: model 1 ({tmp_path / 'm0'}) has changed since the report's results" in capsys.readouterr().err
