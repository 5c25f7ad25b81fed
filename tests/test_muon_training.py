"""The pretrain loop with distributed Muon: TP=2, and DP=2 with distributed_optimizer=true (ZeRO-1),
reproduce the single-process run (losses and logical weights after a few steps, fp32 tolerance).

Reuses test_training_parallel's worker and comparison, so both files judge runs the same way.
"""

from megatron_osp.testing.distributed import run_distributed
from test_training_parallel import _assert_same, _merge, _overrides, _run, _train_worker



def test_muon_training_tp2_and_zero1_dp2_match_single_process(toy_corpus, tmp_path):
    ref = _run(toy_corpus, tmp_path, "muon", world=1, name="ref")
    _assert_same(ref, _run(toy_corpus, tmp_path, "muon", world=2, tp=2, name="tp2"))
    zero1 = _overrides(toy_corpus, "muon") + ["optimizer.distributed_optimizer=true"]
    _assert_same(ref, _merge(run_distributed(_train_worker, 2, zero1, str(tmp_path / "zero1"))))
