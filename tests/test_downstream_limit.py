"""tools/evaluate_downstream.py --limit: a count of examples (>= 1) or a fraction (< 1)."""

from __future__ import annotations

import sys

from hf_run_fixtures import REPO


def test_a_limit_that_is_neither_a_count_nor_a_fraction_is_refused(tmp_path, capsys):
    """--limit 2.5 was cut to 2 examples per task without a word (the report said limit: 2). It is
    refused before any model or task is looked at, and nothing is written."""
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    out = tmp_path / "out"
    rc = evaluate_downstream.main([str(tmp_path / "model"), "--tasks", "anything", "--settings", "fp",
                                   "--limit", "2.5", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--limit 2.5: a number of examples must be whole" in err and not out.exists(), err


def test_a_limit_that_is_not_finite_is_refused(tmp_path, capsys):
    """--limit inf ended in an OverflowError traceback; --limit nan was taken (as a fraction: NaN is
    neither <= 0 nor >= 1) and reached the harness. Both are refused before anything is looked at."""
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_downstream

    out = tmp_path / "out"
    for value in ("inf", "nan"):
        rc = evaluate_downstream.main([str(tmp_path / "model"), "--tasks", "anything", "--settings", "fp",
                                       "--limit", value, "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"--limit must be a number, got {value}" in err and not out.exists(), err
