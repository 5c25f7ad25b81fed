"""One job at a time in a run directory.

Two jobs started on the same ``train.run_dir`` (an sbatch submitted twice, a requeued job whose
predecessor's ranks still run) both resume from the same ``latest``: the second moves the first's
``metrics.jsonl`` lines aside, both append the same steps, and each one's save removes the other's
``iter_N.tmp`` half way. Rank 0 therefore holds an exclusive ``flock`` on ``<run_dir>/.run.lock`` for
the life of its process; a second job is refused, naming the directory and the holder (its host and
pid, written into the lock file). The kernel drops the lock when the process ends, killed or not, so
there is never a stale lock to remove. A filesystem without ``flock`` (some network mounts) runs
unguarded, as before.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".run.lock"
_held: dict[str, int] = {}  # resolved run dir -> descriptor this process holds (kept until exit)


class RunDirInUse(ValueError):
    """Another process holds the run directory's lock."""


def acquire(run_dir: str | os.PathLike) -> str | None:
    """Take ``run_dir``'s lock for this process (again: a no-op). None when held, else the reason it
    is not (another job holds it)."""
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
            return (f"train.run_dir={run_dir} is in use by another job ({holder} holds {path}); two jobs in "
                    "one run directory would write the same steps and remove each other's checkpoint saves. "
                    "Wait for it to end, or use another train.run_dir")
        os.close(fd)  # no flock on this filesystem: run unguarded
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    _held[key] = fd
    return None
