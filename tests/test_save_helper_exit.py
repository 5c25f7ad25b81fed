"""Megatron-Core's checkpoint helper process exits when the trainer is killed with SIGKILL.

Found by the training sweep: after ``kill -9 <trainer pid>`` (outside a cgroup, not the whole process
group), the trainer's ``multiprocessing`` Manager process, which serves Megatron-Core's shard writers'
results queue (~270 MB, spawned at the first save), was left running, reparented to init, one per
killed run. training/results_queue.py starts that helper with a thread that ends it once its parent
is gone.

Likewise the shard writers: with ``train.async_save`` a trainer killed during a background save left
its forked writer, the per-bucket writers it forks and multiprocessing's resource tracker running until
the write ended, and the writers' inherited copy of the run lock's descriptor made the same command
refuse to start meanwhile ("in use by another job", naming the dead trainer). Now every fork of the
saving process exits with its parent and drops the lock descriptor at once; ``latest`` still names the
previous checkpoint (the unfinished ``iter_N.tmp`` is never taken).
"""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_osp.training.checkpoint import resolve_checkpoint
from test_checkpoint import REPO, _overrides, _pretrain

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass  # ended meanwhile
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it; it holds no memory)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _still_running_after(pids: list[int], seconds: float) -> list[int]:
    """Those of ``pids`` still running after waiting up to ``seconds`` for all to end."""
    deadline = time.monotonic() + seconds
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if _running(pid)]


def _end(proc, pids: list[int]) -> None:
    """Kill the trainer and whatever of ``pids`` is left."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_save_helper_exits_when_the_trainer_is_killed(toy_corpus, tmp_path):
    run = tmp_path / "run"
    proc = _pretrain(_overrides(toy_corpus, run, steps=10_000) + ["train.save_interval=2", "train.async_save=true"])
    helpers = []
    try:
        latest = run / "checkpoints" / "latest"
        deadline = time.monotonic() + 240
        while not latest.exists():  # the first save (and so the helper) is done
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the run never published a checkpoint"
            time.sleep(0.05)
        helpers = [pid for pid in _children(proc.pid) if "multiprocessing.spawn" in _cmdline(pid)]
        assert helpers, f"no spawned helper under the trainer: {[_cmdline(p) for p in _children(proc.pid)]}"
        proc.kill()  # the trainer alone, as `kill -9 <pid>` does
        proc.communicate(timeout=60)
        left = _still_running_after(helpers, 60)
        assert not left, f"orphaned after the trainer was killed: {[_cmdline(pid) for pid in left]}"
    finally:
        _end(proc, helpers)  # a failing run leaves no orphan behind either


# The pretrain command whose shard writers hold every save after the first one for a minute.
_HELD_WRITERS = """
import os, sys, time
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
real = FileSystemWriterAsync.write_preloaded_data
def held(*args, **kwargs):
    if os.path.exists(os.environ["HOLD_AFTER"]):
        print("writer holding", flush=True)
        time.sleep(60)
    return real(*args, **kwargs)
FileSystemWriterAsync.write_preloaded_data = staticmethod(held)
from megatron_osp.training.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def _descendants(pid: int) -> list[int]:
    found = _children(pid)
    return found + [d for child in found for d in _descendants(child)]


def test_the_background_writers_exit_and_free_the_run_when_the_trainer_is_killed(toy_corpus, tmp_path):
    run = tmp_path / "run"
    save_dir = run / "checkpoints"
    env = dict(os.environ, MEGATRON_OSP_FORCE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               HOLD_AFTER=str(save_dir / "latest"))
    log = tmp_path / "output.txt"
    overrides = _overrides(toy_corpus, run, steps=10_000) + ["train.save_interval=2", "train.async_save=true"]
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _HELD_WRITERS, *overrides], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    forks = []
    try:
        deadline = time.monotonic() + 240
        while "writer holding" not in log.read_text():  # the save of step 4, after the published one of step 2
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no writer was held"
            time.sleep(0.05)
        forks = [pid for pid in _descendants(proc.pid) if "multiprocessing.spawn" not in _cmdline(pid)]
        assert len(forks) >= 3, [_cmdline(pid) for pid in forks]  # the writer, its bucket writers, the tracker
        proc.kill()  # the trainer alone, as `kill -9 <pid>` does
        proc.wait(timeout=60)
        with open(run / ".run.lock") as lock:  # at once, while the writers may still be ending
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if one of them holds it
        left = _still_running_after(forks, 10)
        assert not left, f"still running after the trainer was killed: {[_cmdline(pid)[:80] for pid in left]}"
        assert (save_dir / "latest").read_text().strip() == "iter_0000002"
        assert resolve_checkpoint(save_dir).name == "iter_0000002" and (save_dir / "iter_0000004.tmp").is_dir()
    finally:
        _end(proc, forks)  # a failing run leaves no orphan behind either
