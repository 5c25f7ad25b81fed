"""The pretrain loop with distributed Muon at TP=2 reproduces the single-process run (losses and
logical weights after a few steps, fp32 tolerance). distributed_optimizer=true: tests/test_zero_training.py.

Reuses test_training_parallel's worker and comparison, so both files judge runs the same way.
"""

from test_training_parallel import _assert_same, _run


def test_muon_training_tp2_matches_single_process(toy_corpus, tmp_path):
    ref = _run(toy_corpus, tmp_path, "muon", world=1, name="ref")
    _assert_same(ref, _run(toy_corpus, tmp_path, "muon", world=2, tp=2, name="tp2"))
