"""--labels of evaluate_quantization.py and evaluate_downstream.py: one non-empty label per model, none
twice, refused before anything else (one check, analysis.loading.labels_problem, for both tools). An
empty label ('a,' or '' beside another) fell back to the model's default label without a word."""

from __future__ import annotations

import sys

import pytest

from hf_run_fixtures import REPO
from megatron_osp.analysis.loading import labels_problem


def test_labels_problem():
    models = ["runs/a", "runs/b"]
    assert labels_problem(None, models) is None
    assert labels_problem(["x", "y"], models) is None
    assert "2 models" in labels_problem(["x"], models)
    assert labels_problem(["x", " "], models) == ("--labels entry 2 (for runs/b) is empty: give every model a "
                                                  "label, or none")
    assert "twice" in labels_problem(["x", "x"], models)


@pytest.mark.parametrize("labels", [["a", ""], [""]])
def test_an_empty_label_is_refused_by_both_tools(tmp_path, capsys, labels):
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream
    import evaluate_quantization

    models = [str(tmp_path / "m1"), str(tmp_path / "m2")][: len(labels)]
    out = tmp_path / "out"
    rc = evaluate_quantization.main(models + ["--data", str(tmp_path / "held"), "--labels", *labels,
                                              "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--labels entry {len(labels)} (for {models[-1]}) is empty" in err and not out.exists(), err
    rc = evaluate_downstream.main(models + ["--tasks", "anything", "--settings", "fp", "--labels", ",".join(labels),
                                           "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--labels entry {len(labels)} (for {models[-1]}) is empty" in err and not out.exists(), err
