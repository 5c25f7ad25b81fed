"""tools/compare_runs.py from the outside: what its --output may not replace."""

import json
import os
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


def test_one_run_given_twice_is_refused(tmp_path):
    """The same run directory given twice (as another path to it) used to be shown as two runs with
    identical results, exit 0. Now: exit 2 naming it."""
    run = _run_dir(tmp_path / "run")
    (tmp_path / "link").symlink_to(run)
    for args in ((run, run), (run, f"{run}/"), (run, tmp_path / "link")):
        result = _compare(*args)
        assert result.returncode == 2, result.stdout
        assert f"error: the run {run} is given twice" in result.stderr and "Traceback" not in result.stderr
