"""Background checkpoint saves (``train.async_save``, training/async_checkpoint.py).

At DP=2 with OSP (Muon + AdamW, where DP rank 1 holds no shard of the replicated model and so forks
no writer) the same run is made with synchronous saves and with background saves whose writer is
held back 1.5 s before it writes, so that training moves on while it waits:
- the losses are identical (a background save does not disturb training);
- every checkpoint holds exactly the tensors the synchronous save of that step holds, bit for bit:
  the writer wrote the state of the step the save names, not the live tensors later steps changed;
- the save of step 2 was published after step 3 had been logged (training did not wait for it);
- each published checkpoint verifies against its manifest, keep_last pruned as it does for
  synchronous saves, nothing unfinished (``.tmp``) is left, and ``latest`` names the last step;
- a run stopped early (exit_at_step, as SIGTERM and the time limit stop it) first publishes the save
  in flight, then saves its last step at once;
- a writer that fails makes the run stop with a CheckpointError naming the step, on every rank,
  with ``latest`` still on the previous checkpoint.
A job killed while a background writer runs is in test_kill_resume.py.
"""

import time
from pathlib import Path

import pytest
import torch

from megatron_osp.testing.distributed import run_distributed
from test_checkpoint import _overrides

STEPS = 6
DELAY_S = 1.5


def _delayed_writer(delay):
    from megatron_osp.training import async_checkpoint

    real = async_checkpoint._write_then_hash

    def slow(*args, **kwargs):  # runs in the forked writer
        time.sleep(delay)
        return real(*args, **kwargs)

    async_checkpoint._write_then_hash = slow


def _tensors(iteration_dir):
    from megatron.core import dist_checkpointing

    plain = dist_checkpointing.load_plain_tensors(str(iteration_dir))
    return {k: v.clone() for k, v in plain.items() if isinstance(v, torch.Tensor)}


def _runs_worker(rank, world, corpus, root):
    from megatron_osp.training import checkpoint_integrity
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    out = {}
    for mode in ("sync", "async"):
        overrides = _overrides(corpus, f"{root}/{mode}", "muon", steps=STEPS) + [
            "train.save_interval=2", "train.keep_last=2",
            f"train.async_save={mode == 'async'}"]
        if mode == "async":
            _delayed_writer(DELAY_S)
        lines = []
        trainer = Trainer(load_config(None, overrides), log=lines.append)
        trainer.train()
        out[mode] = {"losses": [h["loss"] for h in trainer.history], "log": lines}
    # Stopped early (as SIGTERM or the time limit stops it) while the save of step 2 is in flight.
    lines = out["stop"] = []
    Trainer(load_config(None, _overrides(corpus, f"{root}/stop", "muon", steps=STEPS) + [
        "train.save_interval=2", "train.exit_at_step=3", "train.async_save=true"]), log=lines.append).train()
    torch.distributed.barrier()
    if rank == 0:
        out["stop_listing"] = sorted(p.name for p in Path(f"{root}/stop/checkpoints").iterdir())
        for mode in ("sync", "async"):
            save_dir = Path(f"{root}/{mode}/checkpoints")
            out[mode]["listing"] = sorted(p.name for p in save_dir.iterdir())
            out[mode]["latest"] = (save_dir / "latest").read_text().strip()
            out[mode]["files"] = sorted(p.name for p in (save_dir / f"iter_{STEPS:07d}").iterdir())
            for d in save_dir.glob("iter_*"):
                checkpoint_integrity.verify_checkpoint(d)
    for mode in ("sync", "async"):  # collective reads
        tensors = {d.name: _tensors(d) for d in sorted(Path(f"{root}/{mode}/checkpoints").glob("iter_*"))}
        if rank == 0:
            out[mode]["tensors"] = tensors
    return out


@pytest.fixture(scope="module")
def runs(toy_corpus, tmp_path_factory):
    return run_distributed(_runs_worker, 2, toy_corpus, str(tmp_path_factory.mktemp("async")), timeout=300)


def test_background_saves_leave_training_unchanged(runs):
    for rank_out in runs:
        assert rank_out["async"]["losses"] == rank_out["sync"]["losses"]
        assert len(rank_out["sync"]["losses"]) == STEPS


def test_background_saves_hold_the_state_of_their_step(runs):
    sync, background = runs[0]["sync"]["tensors"], runs[0]["async"]["tensors"]
    assert sorted(sync) == sorted(background) == ["iter_0000004", "iter_0000006"]  # keep_last=2
    for name in sync:
        assert sorted(sync[name]) == sorted(background[name])
        assert any("optimizer" in key for key in sync[name])  # Muon momentum / Adam moments are in
        for key, tensor in sync[name].items():
            assert torch.equal(tensor, background[name][key]), f"{name}: {key} differs from the synchronous save"


def test_training_went_on_while_the_writer_ran(runs):
    log = runs[0]["async"]["log"]
    saved = next(i for i, line in enumerate(log) if "saved checkpoint" in line and "iter_0000002" in line)
    step3 = next(i for i, line in enumerate(log) if line.split("|")[0].split() == ["step", "3"])
    assert step3 < saved, "\n".join(log)
    assert "in the background; training paused" in log[saved]


def test_published_background_saves_are_complete(runs):
    background, sync = runs[0]["async"], runs[0]["sync"]
    assert background["listing"] == sync["listing"]  # latest + the kept iterations, no .tmp left
    assert background["latest"] == sync["latest"] == f"iter_{STEPS:07d}"
    assert background["files"] == sync["files"]  # no digest files of the writers left behind


def _failing_worker(rank, world, corpus, root):
    from megatron_osp.training import async_checkpoint
    from megatron_osp.training.checkpoint_integrity import CheckpointError
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    real = async_checkpoint.AsyncSaver.start
    calls = []

    def fail_second(self, *args, **kwargs):  # the second background save's writer dies
        calls.append(1)
        if len(calls) == 2:
            def dies(*a, **k):
                raise OSError(28, "No space left on device")

            async_checkpoint._write_then_hash = dies
        return real(self, *args, **kwargs)

    async_checkpoint.AsyncSaver.start = fail_second
    overrides = _overrides(corpus, f"{root}/run", "adam", steps=STEPS) + [
        "optimizer.distributed_optimizer=true", "train.save_interval=2", "train.async_save=true"]
    with pytest.raises(CheckpointError) as e:
        Trainer(load_config(None, overrides), log=lambda *_: None).train()
    latest = (Path(root) / "run" / "checkpoints" / "latest").read_text().strip()
    return str(e.value), latest


def test_a_failed_background_writer_stops_the_run_on_every_rank(toy_corpus, tmp_path):
    results = run_distributed(_failing_worker, 2, toy_corpus, str(tmp_path), timeout=300)
    for message, latest in results:
        assert latest == "iter_0000002"
        assert "background save of step 4" in message and "iter_0000004.tmp" in message
        assert "iter_0000002 is the newest complete checkpoint" in message


def test_an_early_stop_publishes_the_save_in_flight_first(runs):
    assert runs[0]["stop_listing"] == [".run.lock", "iter_0000002", "iter_0000003", "latest"]
    saved = [line for line in runs[0]["stop"] if "saved checkpoint" in line]
    assert len(saved) == 2 and "iter_0000002" in saved[0] and "in the background" in saved[0]
    assert "iter_0000003" in saved[1] and "background" not in saved[1]
