"""Ctrl-C (SIGINT) during training (training/stop_signals.py).

- The first SIGINT finishes the step, saves a checkpoint at it, says so in one line naming the step
  and how to continue, and exits 130; the run directory is marked interrupted, so a job script does
  not requeue it (run_state); the same command then continues from that step (and clears the mark).
- A second SIGINT during the stop's save aborts at once: exit 130, a short message and no traceback;
  the save it cut short is not published: ``latest`` still names the previous complete checkpoint.
- The handler's rules: a repeated SIGTERM (a preemption, then the time limit) is the same stop; a
  second SIGINT, or a SIGTERM after a SIGINT (torchrun's form of the second Ctrl-C), aborts; under
  torchrun a SIGINT delivered twice at once (by torchrun and by the job scheduler) is one.
- Ranks agree: a SIGINT that reaches one rank of two stops both after the same step.
- Under torchrun, the second Ctrl-C (which torchrun passes on as SIGTERM) aborts the workers at once.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_osp.testing.distributed import run_distributed
from megatron_osp.training import stop_signals
from megatron_osp.training.checkpoint import resolve_checkpoint
from megatron_osp.training.run_state import INTERRUPTED, requeue_decision, run_state
from test_checkpoint import REPO, _overrides, _pretrain
from test_save_helper_exit import _descendants

# The pretrain command with every save after the first held back, so that an interrupt can come in
# the middle of one (after its shards, before it is published).
_SLOW_SAVES = """
import sys, time
from megatron_osp.training import checkpoint
real = checkpoint.write_small_files
def slow(target, *args, **kwargs):
    real(target, *args, **kwargs)
    if target.iteration > 2:
        print(f"holding the save of step {target.iteration}", flush=True)
        time.sleep(120)
checkpoint.write_small_files = slow
from megatron_osp.training.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_for(proc, ready, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before {what}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


def _ctrl_c_during_a_held_save(proc, save_dir, log, *, first_save_timeout=120, exit_timeout=30) -> float:
    """Ctrl-C once the save of step 2 is published and step 3 is logged, and again once a later save
    is held back; seconds from the second Ctrl-C to the process's end. (Not at once after step 2's
    save: a Ctrl-C between the save's publication and the step's stop check stops the run at step 2,
    whose checkpoint exists, so no save would be held; seen in a CI run on a loaded machine.)"""
    _wait_for(proc, lambda: (save_dir / "latest").exists(), "the save of step 2", timeout=first_save_timeout)
    run_dir = save_dir.parent
    _wait_for(proc, lambda: _steps(run_dir)[-1:] >= [3], "step 3")
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, lambda: "holding the save of step" in log.read_text(), "a save held back")
    interrupted_at = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=exit_timeout)
    return time.monotonic() - interrupted_at


def _steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_first_ctrl_c_saves_at_the_step_and_the_next_run_continues(toy_corpus, tmp_path):
    run = tmp_path / "run"
    overrides = _overrides(toy_corpus, run, steps=10_000)
    proc = _pretrain(overrides)
    _wait_for(proc, lambda: (run / "metrics.jsonl").exists() and _steps(run)[-1:] >= [2], "step 2")
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == stop_signals.EXIT_INTERRUPTED, output
    stopped = _steps(run)[-1]
    assert (f"Ctrl-C (SIGINT): stopped after step {stopped} of 10000; checkpoint of step {stopped} in "
            f"{run / 'checkpoints'}. Run the same command again to continue") in output
    assert "Ctrl-C again aborts at once" in output and "Traceback" not in output
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"
    state = run_state(run)
    assert (state["state"], state["checkpoint_step"]) == ("interrupted", stopped)
    requeue, why = requeue_decision(state, None)  # progress in the job, yet the user stopped it
    assert not requeue and "stopped by an interrupt" in why

    proc = _pretrain(overrides + [f"train.exit_at_step={stopped + 1}"])
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert f"resuming at step {stopped}" in output
    assert _steps(run) == list(range(1, stopped + 2))
    assert not (run / INTERRUPTED).exists() and run_state(run)["state"] == "held"


def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_last_complete_checkpoint(toy_corpus, tmp_path):
    run = tmp_path / "run"
    save_dir = run / "checkpoints"
    overrides = _overrides(toy_corpus, run, steps=10_000) + ["train.save_interval=2"]
    env = dict(os.environ, MEGATRON_OSP_FORCE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    log = tmp_path / "output.txt"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVES, *overrides], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        took = _ctrl_c_during_a_held_save(proc, save_dir, log, exit_timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == stop_signals.EXIT_INTERRUPTED, output
    assert took < 10, f"the abort took {took:.1f} s"
    assert "Ctrl-C again: aborted without saving" in output and "Traceback" not in output
    assert (save_dir / "latest").read_text().strip() == "iter_0000002"
    assert list(save_dir.glob("iter_*.tmp")), "the held save was not cut short"  # and not published
    assert run_state(run)["state"] == "interrupted"
    assert resolve_checkpoint(save_dir).name == "iter_0000002"  # what a rerun resumes from, complete


def test_under_torchrun_a_second_ctrl_c_aborts_the_workers_at_once(toy_corpus, tmp_path):
    """torchrun starts its workers in sessions of their own: a terminal's Ctrl-C reaches only torchrun,
    which forwards the first as SIGINT and the second as SIGTERM (then SIGKILL after
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 300 s here: the abort must not wait for it)."""
    run = tmp_path / "run"
    save_dir = run / "checkpoints"
    driver = tmp_path / "driver.py"
    main = "from megatron_osp.training.pretrain import main\nsys.exit(main(sys.argv[1:]))"
    # a spawned helper imports the main module again: train only under __main__
    driver.write_text(_SLOW_SAVES.replace(main, "if __name__ == '__main__':\n    " + main.replace("\n", "\n    ")))
    env = dict(os.environ, MEGATRON_OSP_FORCE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300")
    log = tmp_path / "output.txt"
    overrides = _overrides(toy_corpus, run, steps=10_000) + ["train.save_interval=2"]
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 str(driver), *overrides], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        took = _ctrl_c_during_a_held_save(proc, save_dir, log, first_save_timeout=180, exit_timeout=120)
    finally:
        if proc.poll() is None:  # its workers first: they run in sessions of their own
            for pid in _descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
    output = log.read_text()
    assert took < 20, f"the abort took {took:.1f} s"
    assert "Ctrl-C again: aborted without saving" in output and "forcefully exiting via" not in output
    assert (save_dir / "latest").read_text().strip() == "iter_0000002"
    assert run_state(run)["state"] == "interrupted"


@pytest.fixture
def handler(tmp_path, monkeypatch):
    """StopSignals' handler called directly (nothing installed); an abort raises SystemExit instead of
    ending pytest."""
    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(stop_signals.os, "_exit", exit_)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("RANK", "1")  # quiet

    def make(torchrun=False):
        if torchrun:
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
        return stop_signals.StopSignals(tmp_path, saves=True, sigterm=True)
    return make


def test_the_handler_aborts_at_a_second_interrupt_only(handler, tmp_path):
    flags = handler()
    flags._handle(signal.SIGTERM, None)
    flags._handle(signal.SIGTERM, None)  # a preemption, then the time limit: one stop
    assert flags.sigterm and not flags.sigint and not (tmp_path / INTERRUPTED).exists()

    flags = handler()
    flags._handle(signal.SIGINT, None)
    assert flags.sigint and not flags.sigterm and (tmp_path / INTERRUPTED).exists()
    with pytest.raises(SystemExit, match="130"):
        flags._handle(signal.SIGINT, None)

    flags = handler()
    flags._handle(signal.SIGINT, None)
    with pytest.raises(SystemExit, match="130"):  # torchrun sends SIGTERM at the second Ctrl-C
        flags._handle(signal.SIGTERM, None)

    flags = handler(torchrun=True)
    flags._handle(signal.SIGINT, None)
    flags._handle(signal.SIGINT, None)  # the same Ctrl-C from torchrun and from the job scheduler
    assert flags.sigint
    with pytest.raises(SystemExit, match="130"):
        flags._handle(signal.SIGTERM, None)
    flags._first_sigint -= stop_signals.DUPLICATE_S
    with pytest.raises(SystemExit, match="130"):
        flags._handle(signal.SIGINT, None)


def _one_rank_interrupted(rank, world, corpus, root):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    trainer = Trainer(load_config(None, _overrides(corpus, f"{root}/run", steps=50)), log=lambda msg: None)
    step = trainer.train_step

    def train_step():
        stats = step()
        if rank == 1 and trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return stats

    trainer.train_step = train_step
    result = trainer.train()
    return result.get("stopped"), result["steps"]


def test_a_ctrl_c_that_reaches_one_rank_stops_every_rank_after_the_same_step(toy_corpus, tmp_path):
    results = run_distributed(_one_rank_interrupted, 2, toy_corpus, str(tmp_path), timeout=300)
    assert results == [(stop_signals.INTERRUPT, 2), (stop_signals.INTERRUPT, 2)]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    assert (tmp_path / "run" / INTERRUPTED).exists()
