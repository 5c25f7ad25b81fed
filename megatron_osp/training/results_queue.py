"""Megatron-Core's checkpoint helper process ends with the process that started it.

A torch_dist save (synchronous or ``train.async_save``) hands each rank's shard writes to
Megatron-Core's ``FileSystemWriterAsync``, which collects the writers' results through a queue served
by a ``multiprocessing`` Manager: a separate process (spawned, so it imports this program again,
~270 MB) started at a rank's first save and kept for the life of the process. Megatron-Core starts
it plainly, so a trainer killed with SIGKILL outside a job's process group or cgroup (a plain
``kill -9 <pid>``) left it running, orphaned, one per killed run, until someone killed it by hand.

``ensure_results_queue`` (called before each ``dist_checkpointing.save``) has Megatron-Core take
that queue from a Manager started here instead, whose process runs ``_exit_with_parent``: a thread
that ends the process once its parent is gone (its parent pid changes). Nothing else differs: the
same kind of queue, made at the same moment (a rank's first save with shards to write) and kept in
the same place (``filesystem_async._results_queue``). A Megatron-Core without that function and
place (a later version) keeps its own.

The shard writers themselves are forks: the background save's writer (forked from the trainer by
``AsyncCallsQueue``) and the per-bucket writers it (or, for a synchronous save, the trainer) forks. A
trainer killed with SIGKILL left them writing into ``iter_N.tmp`` (which nothing would publish) for as
long as the write took, with Megatron-Core's resource tracker kept alive by them. So from the first
save on, every process forked from the saving process runs the same ``_exit_with_parent`` watch
(``os.register_at_fork``; a fork's own forks watch it in turn): they end within about ``POLL_S`` of
their parent, and the tracker once they are gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from multiprocessing.managers import SyncManager

POLL_S = 0.5  # how often the helper looks whether its parent is still alive
_manager = None  # the Manager whose process serves the queue (kept for the life of this process)
_forks_watched = False  # whether this process's forks exit with it (registered once)


def _exit_with_parent(parent: int) -> None:
    """In the Manager's process: exit as soon as the process ``parent`` is no longer its parent."""
    def watch():
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os._exit(0)

    if os.getppid() != parent:  # died while this process was starting
        os._exit(0)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def ensure_results_queue() -> None:
    """Have Megatron-Core's writers take their results queue from ``_write_results_queue`` (made at
    the first save that has shards to write, as Megatron-Core's own, served by a helper that exits
    with this process), and this process's forks (the shard writers) exit with it. Cheap: call it
    before every save."""
    global _forks_watched
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not _forks_watched:  # the shard writers forked from here on end with their parent
        os.register_at_fork(after_in_child=lambda: _exit_with_parent(os.getppid()))
        _forks_watched = True
    if hasattr(filesystem_async, "_get_write_results_queue") and hasattr(filesystem_async, "_results_queue"):
        filesystem_async._get_write_results_queue = _write_results_queue


def _write_results_queue():
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=_exit_with_parent, initargs=(os.getpid(),))
        _manager = manager
        filesystem_async._results_queue = manager.Queue()
    return filesystem_async._results_queue
