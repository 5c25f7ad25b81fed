"""One job at a time in a run directory.

Two jobs started on the same ``train.run_dir`` (an sbatch submitted twice, a requeued job whose
predecessor's ranks still run) both resume from the same ``latest``: the second moves the first's
``metrics.jsonl`` lines aside, both append the same steps, and each one's save removes the other's
``iter_N.tmp`` half way. Rank 0 therefore holds an exclusive ``flock`` on ``<run_dir>/.run.lock`` for
the life of its process; a second job is refused, naming the directory and the holder (its host and
pid, written into the lock file). The kernel drops the lock when the process ends, killed or not, so
there is never a stale lock to remove. A filesystem without ``flock`` (some network mounts) runs
unguarded, as before. A process forked from the holder (Megatron-Core's checkpoint writers) closes its
copy of the descriptor at once (``_forget_in_child``): the lock lasts as long as its descriptors, and a
writer still running after its trainer was killed used to keep the next job out until it ended.

The same holds for ``train.save_dir`` where it is another directory than the run's (``claim``): two
jobs with different run directories but one save directory would each resume from, save into and
prune the other's checkpoints, so a job that saves holds ``<save_dir>/.run.lock`` too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".run.lock"
_held: dict[str, int] = {}  # resolved run dir -> descriptor this process holds (kept until exit)


def _forget_in_child() -> None:
    """In a process forked from a holder: close its copies of the lock descriptors (the holder keeps the lock)."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunDirInUse(ValueError):
    """Another process holds the run directory's lock."""


def claim(run_dir: str | os.PathLike, save_dir: str | os.PathLike | None) -> str | None:
    """Make and lock ``run_dir`` and, where given (the run saves), ``save_dir``. None when both are
    held, else the reason one is not (another job holds it)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    busy = acquire(run_dir)
    if busy is None and save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        busy = acquire(save_dir, field="train.save_dir", why="two jobs saving into one directory would "
                       "resume from, replace and prune each other's checkpoints")
    return busy


def acquire(run_dir: str | os.PathLike, field: str = "train.run_dir",
            why: str = "two jobs in one run directory would write the same steps and remove each other's "
                       "checkpoint saves") -> str | None:
    """Take ``run_dir``'s lock for this process (again: a no-op). None when held, else the reason it
    is not (another job holds it); ``field`` names the setting and ``why`` says why two jobs cannot
    share the directory."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return None
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return (f"{field}={run_dir} is in use by another job ({holder} holds {path}); {why}. "
                    f"Wait for it to end, or use another {field}")
        os.close(fd)  # no flock on this filesystem: run unguarded
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    _held[key] = fd
    return None


def holder(run_dir: str | os.PathLike) -> str | None:
    """Who holds ``run_dir``'s lock now (the lock file's "host H pid P"), without taking it; None when
    nobody does (or there is no lock file, or no ``flock`` on its filesystem)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        return None
    finally:
        os.close(fd)
    return None
