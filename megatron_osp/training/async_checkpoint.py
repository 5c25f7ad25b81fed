"""Checkpoints written in the background while training goes on (``train.async_save``).

A save of a 7B+ model with its fp32 master weights and optimizer state is hundreds of GB; written
synchronously it stops every rank for minutes at each ``save_interval``. With ``train.async_save`` an
interval save costs the training loop only what must happen at the step it names:

1. the same sharded state dict as a synchronous save (``checkpoint.training_state``), planned by
   Megatron-Core's ``dist_checkpointing.save(..., async_sharded_save=True)`` (collective; rank 0 writes
   ``common.pt`` at once) into ``iter_N.tmp/``, with the run config and train state beside it;
2. a snapshot of every tensor to write: Megatron's preload copies GPU tensors to host memory, and the
   writer is a process forked right after it (Megatron-Core's ``AsyncCallsQueue``), so tensors already
   on the host are that fork's copy-on-write image of this moment. Later steps change the live
   tensors, never the snapshot;
3. the forked writer writes this rank's shards, fsyncs them, and hashes them for the checksum
   manifest (``checkpoint_integrity.own_shards``), so the finalization does not read them again.

Training continues. Each step, while a save is in flight, :meth:`AsyncSaver.poll` asks every rank
whether its writer is done (one all-reduce of a flag); once all are, the save is finalized on every
rank: Megatron writes the shard index (``.metadata``), ranks' digests are gathered into
``checksums.json``, and the directory is renamed into place and ``latest`` moved exactly as a
synchronous save does (``checkpoint.finish_save``), then older ones are pruned. So everything
``checkpoint.py`` promises holds: a save is visible only once complete; a job killed while a writer
runs resumes from the previous checkpoint, and the next save removes the unfinished ``iter_N.tmp``.

At most one save is in flight: a new one, a synchronous save (the end of the run, SIGTERM, the time
limit) and the end of the run first wait for it. A writer that fails (disk full, killed) makes the
finalization raise a CheckpointError on every rank, naming the save, as a synchronous save would.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch.distributed as dist

from megatron_osp.fileio import atomic_write_json
from megatron_osp.training import checkpoint as ckpt
from megatron_osp.training import checkpoint_integrity as integrity
from megatron_osp.training import save_target
from megatron_osp.training.checkpoint_integrity import CheckpointError
from megatron_osp.training.results_queue import ensure_results_queue

__all__ = ["AsyncSaver"]

_DIGESTS = ".digests-rank{rank}.json.tmp"  # a writer's hashes of its shards (never in a manifest)


def _write_then_hash(write, directory: str, rank: int, world: int, *args, **kwargs) -> None:
    """The forked writer: Megatron's shard writer, then this rank's shard digests into a file the
    training process reads at finalization (``.tmp``: never listed in the manifest)."""
    write(*args, **kwargs)
    try:
        result: dict | str = integrity.own_shards(directory, rank, world)
    except OSError as e:
        result = f"rank {rank}: {e}"
    atomic_write_json(Path(directory) / _DIGESTS.format(rank=rank), result)


class AsyncSaver:
    """One run's background checkpoint saves (every rank holds one; its calls are collective)."""

    def __init__(self, log=None):
        self.log = log
        self._queue = None
        self._pending = None  # (SaveTarget, keep_last, started, paused seconds, writer forked)

    @property
    def in_flight(self) -> int | None:
        """The iteration being saved in the background, or None."""
        return self._pending[0].iteration if self._pending else None

    def start(self, save_dir, iteration: int, model_chunks, config, *, optimizer, scheduler,
              consumed_samples: int, keep_last: int = 0) -> None:
        """Begin saving ``iteration`` (collective); returns once the state is snapshotted."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.wait()
        started = time.perf_counter()
        target = save_target.begin_save(save_dir, iteration)
        state, contents = ckpt.training_state(model_chunks, optimizer, scheduler, True, iteration, consumed_samples)
        ensure_results_queue()  # its helper process exits with this one
        request = dist_checkpointing.save(state, str(target.tmp), async_sharded_save=True)
        ckpt.write_small_files(target, config, consumed_samples, contents)
        forked = request.async_fn is not None  # None: this rank holds no shard to write
        if forked:
            request = request._replace(async_fn=partial(
                _write_then_hash, request.async_fn, str(target.tmp), dist.get_rank(), dist.get_world_size()))
        if self._queue is None:
            self._queue = AsyncCallsQueue(persistent=False)
        self._queue.schedule_async_request(request)
        self._pending = (target, keep_last, started, time.perf_counter() - started, forked)

    def poll(self) -> None:
        """Finalize the save in flight if every rank's writer is done (collective while one is)."""
        if self._pending is not None:
            self._finalize(blocking=False)

    def wait(self) -> None:
        """Wait for the save in flight and finalize it (collective; nothing to do without one)."""
        if self._pending is not None:
            self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        from torch.distributed.checkpoint.api import CheckpointException

        target = self._pending[0]
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
            self._pending = None
            raise CheckpointError(self._failed(target, e)) from e
        if not done:
            return
        target, keep_last, started, paused, forked = self._pending
        self._pending = None
        hashed = self._digests(target, forked)
        integrity.write_manifest_collective(target.tmp, hashed)
        ckpt.finish_save(target, keep_last, self.log, started,
                         how=f" (in the background; training paused {paused:.2f} s for it)")

    @staticmethod
    def _digests(target, forked: bool) -> dict | str:
        rank = dist.get_rank()
        if not forked:
            return integrity.own_shards(target.tmp, rank, dist.get_world_size())
        path = target.tmp / _DIGESTS.format(rank=rank)
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            result = f"rank {rank}: the background writer left no digests of its shards ({e})"
        path.unlink(missing_ok=True)
        return result

    @staticmethod
    def _failed(target, error: BaseException) -> str:
        return save_target.save_failed_message(target, error, how="background save")
