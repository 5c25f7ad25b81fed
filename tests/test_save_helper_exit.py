"""Megatron-Core's checkpoint helper process exits when the trainer is killed with SIGKILL.

Found by the training sweep: after ``kill -9 <trainer pid>`` (outside a cgroup, not the whole process
group), the trainer's ``multiprocessing`` Manager process, which serves Megatron-Core's shard writers'
results queue (~270 MB, spawned at the first save), was left running, reparented to init, one per
killed run. training/results_queue.py starts that helper with a thread that ends it once its parent
is gone.
"""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from test_checkpoint import _overrides, _pretrain

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
        deadline = time.monotonic() + 60
        while any(map(_running, helpers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in helpers if _running(pid)]
        assert not left, f"orphaned after the trainer was killed: {[_cmdline(pid) for pid in left]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in helpers:  # a failing run leaves no orphan behind either
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
