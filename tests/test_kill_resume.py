"""A real SIGKILL right after a save, and one in the middle of a save, then the same command again:
the run resumes from the last complete checkpoint (whose checksum manifest verifies) and its per-step
losses are bit-identical to an uninterrupted run's. (The other resume tests in test_checkpoint.py
simulate the killed save by leaving an ``iter_N.tmp``; this one kills the process.) With
``train.async_save`` the job is killed while its forked writer fills ``iter_N.tmp``."""

import json
import os
import signal
import time

import pytest

from test_checkpoint import _overrides, _pretrain

STEPS = 10


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _finish(overrides):
    proc = _pretrain(overrides)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    return output


def _kill_when(overrides, ready, what):
    proc = _pretrain(overrides, start_new_session=True)  # killed as a job is: its whole process group
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(toy_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    _finish(_overrides(toy_corpus, run, steps=STEPS))
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.parametrize("moment", ["right after a save", "during a save", "during a background save"])
def test_sigkill_then_rerun_gives_the_uninterrupted_losses(toy_corpus, tmp_path, reference, moment):
    run = tmp_path / "run"
    overrides = _overrides(toy_corpus, run, steps=STEPS) + ["train.save_interval=2"]
    if moment == "during a background save":  # the forked writer is killed with the job
        overrides.append("train.async_save=true")
    save_dir = run / "checkpoints"
    if moment == "right after a save":
        _kill_when(overrides, lambda: (save_dir / "latest").exists()
                   and (save_dir / "latest").read_text().strip() == "iter_0000004", "latest -> iter_0000004")
    else:
        _kill_when(overrides, lambda: any(save_dir.glob("iter_0000004.tmp/*")), "iter_0000004.tmp filling")
    latest = (save_dir / "latest").read_text().strip()
    assert latest in ("iter_0000002", "iter_0000004")  # never a half-written save
    output = _finish(overrides)
    assert f"resuming at step {int(latest[5:])}" in output
    assert _losses(run) == reference  # every step, bit for bit
    assert (save_dir / "latest").read_text().strip() == f"iter_{STEPS:07d}"
