"""tools/compare_runs.py from the outside: what its --output may not replace."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compare_runs.py"


def _compare(*args):
    env = dict(os.environ, PYTHONPATH=str(TOOL.parents[1]))
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, env=env)


def _run_dir(d: Path) -> Path:
    d.mkdir()
    (d / "summary.json").write_text(json.dumps(dict(
        optimizer="adam", normalization="rmsnorm", embedding_projection=False, tokens=1000, train_loss=1.0,
        val_loss=2.0, kurtosis_mean=0.5, kurtosis_max=0.7)))
    (d / "kurtosis.json").write_text(json.dumps(dict(names=["embedding"], values=[0.5], max_abs=[3.0])))
    return d


def test_output_that_is_an_input_is_refused_and_left_as_it_was(tmp_path):
    """--output naming the --quantization/--downstream report, or a file of a run (its summary.json), used to
    be replaced by the table: the report or the run's summary was lost, exit 0. An existing directory
    ended in an IsADirectoryError traceback. Now: exit 2 naming it, every file as it was."""
    run = _run_dir(tmp_path / "run")
    report = tmp_path / "quantization.json"
    report.write_text(json.dumps({"complete": True, "meta": {}, "models": [{"path": str(run),
                                                                              "perplexity": {"fp": 9.0}}]}))
    down = tmp_path / "downstream.json"
    down.write_text(json.dumps({"complete": True, "models": [{"path": str(run), "settings": {}}]}))
    before = {p: p.read_bytes() for p in (report, down, run / "summary.json", run / "kurtosis.json")}
    for output, words in ((report, "is the report --quantization reads"),
                          (down, "is the report --downstream reads"),
                          (run / "summary.json", f"is a file of the run {run}"),
                          (run / "kurtosis.json", f"is a file of the run {run}"),
                          (tmp_path, "is a directory")):
        result = _compare(run, "--quantization", report, "--downstream", down, "--output", output)
        assert result.returncode == 2, (output, result.stdout, result.stderr[-2000:])
        assert f"--output {output} {words}" in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert {p: p.read_bytes() for p in before} == before
    # a new file, also inside a run directory, is written
    for output in (tmp_path / "comparison.txt", run / "comparison.txt"):
        result = _compare(run, "--quantization", report, "--output", output)
        assert result.returncode == 0, result.stderr[-2000:]
        assert output.read_text().startswith("run ")


def test_runs_of_one_recipe_are_told_apart_by_their_directories(tmp_path):
    """Two runs of the same optimizer/norm/EmbProj (other seeds, sizes or data) used to get the same
    label, so the table's rows and the per-layer columns could not be told apart. A shared label now
    carries each run's directory as given; a label of its own stays as it was."""
    a, b, c = _run_dir(tmp_path / "seed1"), _run_dir(tmp_path / "seed2"), _run_dir(tmp_path / "osp")
    summary = json.loads((c / "summary.json").read_text())
    summary.update(optimizer="muon", normalization="ssnorm", embedding_projection=True)
    (c / "summary.json").write_text(json.dumps(summary))
    result = _compare(a, b, c)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("Adam", "OSP"))]
    assert rows[0].startswith(f"Adam + RMSNorm ({a})") and rows[1].startswith(f"Adam + RMSNorm ({b})"), rows
    assert rows[2].startswith("OSP (Muon + SSNorm + EmbProj) ") and str(c) not in rows[2], rows
    per_layer_header = lines[lines.index("excess kurtosis per hidden state (held-out batch):") + 1]
    assert f"Adam + RMSNorm ({a})" in per_layer_header and f"Adam + RMSNorm ({b})" in per_layer_header


def _checkpoint(run: Path, iteration: int, tokenizer_sha256: str) -> None:
    """checkpoints/latest -> iter_N with the train state and run config a save writes (no weights: the
    table reads only which tokenizer the model learned)."""
    from megatron_osp.training.config import RunConfig, save_config

    it = run / "checkpoints" / f"iter_{iteration:07d}"
    it.mkdir(parents=True)
    (it / "train_state.json").write_text(json.dumps({
        "format": "megatron-osp/torch_dist", "version": 1, "iteration": iteration,
        "tokenizer": {"tokenizer_sha256": tokenizer_sha256, "source": f"/data/{tokenizer_sha256[:4]}.model"}}))
    save_config(RunConfig(), it / "run_config.yaml")
    (run / "checkpoints" / "latest").write_text(it.name + "\n")


def test_one_run_given_twice_is_refused(tmp_path):
    """The same run directory given twice (as another path to it) used to be shown as two runs with
    identical results, exit 0. Now: exit 2 naming it."""
    run = _run_dir(tmp_path / "run")
    (tmp_path / "link").symlink_to(run)
    for args in ((run, run), (run, f"{run}/"), (run, tmp_path / "link")):
        result = _compare(*args)
        assert result.returncode == 2, result.stdout
        assert f"error: the run {run} is given twice" in result.stderr and "Traceback" not in result.stderr


def _notes(runs, *reports, setting="4-4-4"):
    """The notes compare_runs.py prints under its table, in-process (a run with checkpoints loads Megatron-Core)."""
    from megatron_osp.analysis.compare import load_run, report_notes, tokenizer_note

    loaded = [load_run(r) for r in runs]
    return [n for n in [tokenizer_note(loaded)] + [x for r in reports for x in report_notes(r, loaded, setting)] if n]


def test_runs_of_different_tokenizers_are_said_not_comparable(tmp_path):
    """Runs whose models learned the ids of different tokenizers (their checkpoints' records) used to be
    tabled side by side without a word, their losses per token of different vocabularies. Now a note under
    the table names both tokenizers; runs of one tokenizer get none."""
    a, b, c = _run_dir(tmp_path / "a"), _run_dir(tmp_path / "b"), _run_dir(tmp_path / "c")
    _checkpoint(a, 3, "aa" * 32)
    _checkpoint(b, 3, "aa" * 32)
    _checkpoint(c, 3, "cc" * 32)
    assert _notes([a, b]) == []
    assert _notes([a, b, c]) == [
        f"note: {a} and {c} were trained on different tokenizers (/data/aaaa.model (sha256 aaaaaaaaaaaa) and "
        "/data/cccc.model (sha256 cccccccccccc)): their losses and perplexities are per token of different "
        "vocabularies and are not comparable"]
    result = _compare(a, c)  # the tool prints it under the table
    assert result.returncode == 0 and f"note: {a} and {c} were trained on different tokenizers" in result.stdout


def test_report_columns_not_of_the_rows_are_said_so(tmp_path):
    """--quantization/--downstream reports that did not evaluate a run, evaluated it at an earlier
    checkpoint than the run's latest, or lack --setting used to fill the table with '-' or another
    model's numbers without a word. Now a note says which."""
    run, other = _run_dir(tmp_path / "run"), _run_dir(tmp_path / "other")
    _checkpoint(run, 3, "aa" * 32)
    for name, key, cell in (("quantization.json", "perplexity", 9.0),
                            ("downstream.json", "settings", {"average": 0.5})):
        report = tmp_path / name
        report.write_text(json.dumps({
            "complete": True, "request": {"models": [{"path": str(run), "identity": {"iteration": "iter_0000001"}}]},
            "models": [{"path": str(run), key: {"fp": cell, "4-4-4": cell}}]}))
        assert _notes([run, other], report, setting="8-8-8") == [
            f"note: {report} evaluated {run} at iter_0000001, its latest checkpoint is now iter_0000003: the "
            "report's columns are of another model than the row's losses",
            f"note: {report} has no results of {other} ('-' in its row): it evaluated {run}",
            f"note: {report} has no 8-8-8 results ('-' in its columns): it evaluated 4-4-4, fp; --setting chooses "
            "one of them"]
    # a report of the run's current checkpoint, of every run and the setting asked: no note
    report = tmp_path / "current.json"
    report.write_text(json.dumps({
        "complete": True, "request": {"models": [{"path": str(run), "identity": {"iteration": "iter_0000003"}}]},
        "models": [{"path": str(run), "perplexity": {"fp": 9.0, "4-4-4": 12.0}}]}))
    assert _notes([run], report) == []
    result = _compare(run, other, "--quantization", report)  # the tool prints them under the table
    assert result.returncode == 0 and f"note: {report} has no results of {other}" in result.stdout, result.stdout


def test_a_damaged_or_foreign_run_file_is_named(tmp_path):
    """A summary.json or kurtosis.json that is not JSON, not an object or lacks a field the table shows
    (damaged, another tool's or version's) used to end in a traceback (KeyError 'normalization', TypeError)
    or a JSON error that named no file. Now: exit 2 naming the file and the field."""
    import pytest

    from megatron_osp.analysis.compare import load_run

    run = _run_dir(tmp_path / "run")
    good = {name: (run / name).read_text() for name in ("summary.json", "kurtosis.json")}
    cases = [("summary.json", '{"optim', "summary.json is not readable JSON ("),
             ("summary.json", json.dumps({"optimizer": "adam"}), "summary.json: field 'normalization' is missing, "
                                                                 "expected str"),
             ("summary.json", json.dumps({**json.loads(good["summary.json"]), "val_loss": None}),
              "summary.json: field 'val_loss' is None, expected a number"),
             ("kurtosis.json", "[1, 2]", "kurtosis.json holds a JSON list, not the object a finished run writes")]
    for name, text, words in cases:
        (run / name).write_text(text)
        with pytest.raises(ValueError, match="^" + re.escape(f"{run / name}"[: -len(name)] + words)):
            load_run(run)
        (run / name).write_text(good[name])
    (run / "summary.json").write_text(json.dumps({"optimizer": "adam"}))
    result = _compare(run)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"error: {run / 'summary.json'}: field 'normalization' is missing" in result.stderr
