"""The pretrain loop at DP=2, PP=2 and TP=2 reproduces the single-process run.

Same seed, same data, same global batch: after a few optimizer steps the per-step losses and the
logical (TP=1, PP=1) weights must match the single-process run to float32 tolerance, as
megatron_osp/testing/equivalence.py compares them (with its settings; gradient norms too).
"""

import numpy as np
import pytest

from megatron_osp.testing.distributed import run_distributed
from megatron_osp.testing.equivalence import SETTINGS, assert_same_training, run_record

STEPS = 3


def _train_worker(rank, world_size, overrides, run_dir):
    from megatron_osp.models.layout import gather_logical
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer, unwrap

    config = load_config(None, overrides + [f"train.run_dir={run_dir}"])
    trainer = Trainer(config, log=lambda *_: None)
    summary = trainer.train()
    core = unwrap(trainer.model)
    weights = gather_logical(core, dict(core.named_parameters()))
    from megatron.core import parallel_state

    leader = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    return {
        **run_record(trainer),
        "val_loss": summary["val_loss"],
        "kurtosis_max": summary["kurtosis_max"],
        "weights": {k: v.detach().float() for k, v in weights.items()} if leader else {},
    }


def _overrides(corpus, optimizer, tp=1, pp=1):
    return [
        "model.preset=test",
        f"data.paths=[{corpus}]",
        "data.eod_id=255",
        f"optimizer.name={optimizer}",
        "optimizer.muon_lr=0.02",
        f"parallel.tensor_parallel_size={tp}",
        f"parallel.pipeline_parallel_size={pp}",
        f"train.train_steps={STEPS}",
        "train.warmup_steps=1",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.log_interval=1",
        "train.tensorboard=false",
        "train.progress_bar=false",
        *SETTINGS,
    ]


def _run(corpus, tmp_path, optimizer, world, tp=1, pp=1, name="run"):
    return _merge(run_distributed(_train_worker, world, _overrides(corpus, optimizer, tp, pp), str(tmp_path / name)))


def _merge(results):
    """One run's view from its ranks: the loss-reporting rank's losses, every rank's weights."""
    merged = {"weights": {}}
    for r in results:
        merged["weights"].update(r["weights"])
        if not np.isnan(r["losses"][0]):
            merged.update(losses=r["losses"], grad_norms=r["grad_norms"], val_loss=r["val_loss"])
        merged["kurtosis_max"] = r["kurtosis_max"]
    return merged


def _assert_same(ref, got):
    assert_same_training(ref, got)
    assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=2e-5)
    assert got["kurtosis_max"] == pytest.approx(ref["kurtosis_max"], rel=1e-3)


def test_muon_training_dp2_and_pp2_match_single_process(toy_corpus, tmp_path):
    ref = _run(toy_corpus, tmp_path, "muon", world=1, name="ref")
    _assert_same(ref, _run(toy_corpus, tmp_path, "muon", world=2, name="dp2"))
    _assert_same(ref, _run(toy_corpus, tmp_path, "muon", world=2, pp=2, name="pp2"))


def test_adam_training_tp2_matches_single_process(toy_corpus, tmp_path):
    ref = _run(toy_corpus, tmp_path, "adam", world=1, name="ref")
    _assert_same(ref, _run(toy_corpus, tmp_path, "adam", world=2, tp=2, name="tp2"))
