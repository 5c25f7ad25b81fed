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


def test_a_model_given_twice_is_refused_by_both_tools(tmp_path, capsys):
    """One model given twice (another path to it, or a run and the iteration directory its ``latest``
    names) used to be evaluated twice and reported as two models of identical results. Now refused by
    name before anything loads; two iterations of one run, or two HF directories, are two models."""
    from megatron_osp.analysis.loading import models_problem

    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream
    import evaluate_quantization

    run = tmp_path / "run"
    for it in ("iter_0000002", "iter_0000003"):
        (run / "checkpoints" / it).mkdir(parents=True)
        (run / "checkpoints" / it / "metadata.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("iter_0000003\n")
    (tmp_path / "hf1").mkdir(), (tmp_path / "hf2").mkdir()
    latest, older = str(run / "checkpoints" / "iter_0000003"), str(run / "checkpoints" / "iter_0000002")
    assert models_problem([str(run), older, str(tmp_path / "hf1"), str(tmp_path / "hf2")]) is None
    assert models_problem([str(run), latest]) == (
        f"the model {latest} is given twice (as {run} and {latest}, both {latest}): give each model once")
    for models in ([str(run), f"{run}/"], [str(run / "checkpoints"), latest], [str(tmp_path / "hf1")] * 2):
        out = tmp_path / "out"
        rc = evaluate_quantization.main(models + ["--data", str(tmp_path / "held"), "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"error: the model {models[1]} is given twice (as {models[0]} and" in err, err
        rc = evaluate_downstream.main(models + ["--tasks", "anything", "--settings", "fp", "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"error: the model {models[1]} is given twice (as {models[0]} and" in err, err
        assert not out.exists()
