"""Held-out and calibration windows are spread over all the documents, not taken from their start.

``load_token_windows`` took the first ``--num-windows`` windows of the held-out documents: of a sharded
output (or any corpus preprocessed file after file), the start of the first shard's share only, so a
report's perplexity spoke for one part of the corpus. Now (``selection="spread"``, the tools' default)
the n windows are evenly spaced over the W whole windows the documents hold; ``"first"`` keeps the
earlier choice (``--window-selection first`` reproduces a report made before)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_shard_families import SEQ, _docs, _windows, family, family_run  # noqa: F401 (family: the fixture)

from megatron_osp.analysis.evaluation import load_token_windows
from megatron_osp.data.indexed import IndexedDatasetWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


@pytest.mark.parametrize("seed", range(6))
def test_windows_equal_the_reference_on_random_documents(tmp_path, seed):
    """Random document lengths (empty ones too), fraction ranges, window lengths and counts: exactly the
    reference's windows (tolerance: none, token ids), with either selection."""
    rng = np.random.default_rng(seed)
    prefix = tmp_path / "d"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(int(rng.integers(5, 60))):
            w.add_document(rng.integers(0, 60000, int(rng.integers(0, 80)), dtype=np.int64))
    lo = float(rng.choice([0.0, 0.3, 0.5]))
    docs = _docs(str(prefix), lo, 1.0)
    seq = int(rng.integers(1, 30))
    have = len(np.concatenate(docs)) // (seq + 1)
    for num in sorted({1, 2, max(1, have // 3), max(1, have - 1), have, have + 5}):
        for selection in ("spread", "first"):
            got = load_token_windows(str(prefix), seq, num, (lo, 1.0), selection=selection)
            torch.testing.assert_close(got, _windows(docs, num, selection, seq), rtol=0, atol=0)
    with pytest.raises(ValueError, match="window selection 'random'"):
        load_token_windows(str(prefix), seq, 1, (lo, 1.0), selection="random")


def test_a_few_windows_reach_every_shard(family):
    """Three windows of a 3-shard family's held-out documents (706, 553 and 452 tokens, 190 windows of 9):
    spread, they are windows 31, 95 and 158, one in each shard's share; the first three all lie in the
    first shard's."""
    shards = family["shards"]
    per_shard = [np.concatenate(_docs(s, 0.7, 1.0)) for s in shards]
    joined, bounds = np.concatenate(per_shard), np.cumsum([0] + [len(t) for t in per_shard])
    window = SEQ + 1
    assert len(joined) // window == 190 and list(bounds) == [0, 706, 1259, 1711]

    def shards_of(windows, picks):
        for w, k in zip(windows.numpy(), picks):
            assert np.array_equal(w, joined[k * window:(k + 1) * window])
        return [int(np.searchsorted(bounds, k * window, side="right")) - 1 for k in picks]

    spread = load_token_windows(family["prefix"], SEQ, 3, (0.7, 1.0))
    first = load_token_windows(family["prefix"], SEQ, 3, (0.7, 1.0), selection="first")
    assert shards_of(first, [0, 1, 2]) == [0, 0, 0]
    assert shards_of(spread, [31, 95, 158]) == [0, 1, 2]


def test_the_report_records_the_selection_and_a_resume_across_it_is_refused(family, megatron_single_rank, tmp_path,
                                                                            capsys):
    import evaluate_quantization

    from megatron_osp.analysis.report_resume import tokens_identity

    common = [family_run(family, tmp_path), "--data", family["prefix"], "--settings", "fp", "--num-windows", "4",
              "--stats-windows", "1", "--weight-error-windows", "0", "--device", "cpu", "--no-plots",
              "--output-dir", str(tmp_path / "out")]
    held = [d for s in family["shards"] for d in _docs(s, 0.7, 1.0)]
    for selection in ("first", "spread"):
        extra = ["--overwrite"] + (["--window-selection", selection] if selection == "first" else [])
        assert evaluate_quantization.main([*common, *extra]) == 0
        report = json.loads((tmp_path / "out" / "quantization.json").read_text())
        assert report["meta"]["window_selection"] == selection
        assert report["request"]["tokens"]["held_out"] == tokens_identity(_windows(held, 4, selection))
    assert evaluate_quantization.main([*common, "--resume", "--window-selection", "first"]) == 2
    assert "error:" in capsys.readouterr().err
