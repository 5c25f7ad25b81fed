"""Where one checkpoint save writes, and what a failed one says (checkpoint.py's and
async_checkpoint.py's saves share both).

A save writes into ``<save_dir>/iter_N.tmp/`` (``begin_save`` makes it empty, removing saves an earlier
run left unfinished) and is renamed to ``iter_N/`` once complete (``checkpoint.finish_save``). A save
that fails is reported by ``save_failed_message``: which save, why, the newest complete checkpoint
(which is kept) and the free space where it was written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_osp.training.checkpoint_integrity import CheckpointError


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass(frozen=True)
class SaveTarget:
    """Where one save writes: ``tmp`` until it is complete, then renamed to ``final``."""

    save_dir: Path
    iteration: int
    tmp: Path
    final: Path


def begin_save(save_dir: str | os.PathLike, iteration: int) -> SaveTarget:
    """Make an empty ``iter_N.tmp/`` (collective), removing saves an earlier run left unfinished."""
    save_dir = Path(save_dir)
    final = save_dir / iteration_dir_name(iteration)
    target = SaveTarget(save_dir, iteration, save_dir / (final.name + ".tmp"), final)
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob("iter_*.tmp"):
            shutil.rmtree(stale)
        target.tmp.mkdir()
    dist.barrier()
    return target


def save_failed_message(target: SaveTarget, error: BaseException, how: str = "save") -> str:
    """What a failed save says: which one, why, the newest complete checkpoint (kept) and the free
    space where it was written (a full disk shows in the writers' errors only as short writes)."""
    from megatron_osp.training.checkpoint import newest_checkpoint  # checkpoint.py imports this module

    try:
        newest = newest_checkpoint(target.save_dir)
    except CheckpointError:  # a damaged pointer: the failure is the one to report
        newest = None
    keep = f"{newest} is the newest complete checkpoint" if newest else "no earlier checkpoint was completed"
    try:
        free = f" ({shutil.disk_usage(target.save_dir).free / 2**20:,.0f} MiB free on {target.save_dir})"
    except OSError:
        free = ""
    return (f"the {how} of step {target.iteration} into {target.tmp} failed: "
            f"{type(error).__name__}: {error}; {keep}{free}")
