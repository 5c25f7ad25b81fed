"""A checkpoint's tensors of another shape than this code builds: another layout or version, not damage.

A checkpoint's ``.metadata`` (torch.distributed.checkpoint's index, checked against its manifest
before it is parsed: checkpoint_integrity.py) holds every saved tensor's global shape. A tensor this
run would load with another global shape makes ``dist_checkpointing.load`` fail ("Global shape
mismatch"), which would otherwise read like a damaged checkpoint. Two checks name it instead:

- ``old_vocab_master_problem`` (resume_check.check_compatible, before the process groups and the
  model): a ``muon_only`` checkpoint of the distributed optimizer saved before 2026-12-04 holds the
  embedding's and output layer's master weights and momentum with the vocabulary's padding rows;
  since then they are the tokenizer's vocabulary rows only (optimizer/logical.vocab_rows).
- ``shape_mismatches`` (checkpoint.load_checkpoint, before any tensor is read): any tensor of the
  state dict this run loads whose saved global shape differs.
"""

from __future__ import annotations

from pathlib import Path

from megatron_osp.optimizer.logical import VOCAB_PARAMS
from megatron_osp.training.checkpoint_integrity import CheckpointError, read_index

_ZERO_PREFIX = "optimizer.zero."  # optimizer/zero/optimizer.py: optimizer.zero.<state>.<unit key>


def saved_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """The global shape of every tensor in the checkpoint ``ckpt`` (from its .metadata; no tensor is read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_index(ckpt)
    return {key: tuple(meta.size) for key, meta in (metadata.state_dict_metadata or {}).items()
            if isinstance(meta, TensorStorageMetadata)}


def old_vocab_master_problem(ckpt: Path, config, same_run: bool = False) -> str | None:
    """Why a resume of ``ckpt`` with ``config`` cannot load its optimizer state: a ``muon_only``
    distributed-optimizer checkpoint whose vocabulary parameters' state has other rows than the
    tokenizer's vocabulary (``model.vocab_size``), as saved before 2026-12-04 (padding rows
    included). None otherwise, or when ``config`` is not such a run. ``same_run``: ``ckpt`` is the
    run's own (auto-resume), which a new run must load from another run directory."""
    opt = config.optimizer
    if opt.name != "muon_only" or not opt.distributed_optimizer:
        return None
    vocab = config.model.vocab_size
    wrong = {}  # parameter -> saved rows (its master and momentum were saved alike)
    for key, shape in saved_shapes(ckpt).items():
        if key.startswith(_ZERO_PREFIX):
            param = key[len(_ZERO_PREFIX):].split(".", 1)[-1]
            if param.endswith(VOCAB_PARAMS) and shape and shape[0] != vocab:
                wrong.setdefault(param, shape[0])
    if not wrong:
        return None
    what = ", ".join(f"{param} {rows} rows" for param, rows in sorted(wrong.items()))
    return (f"checkpoint {ckpt} holds muon_only optimizer state of the vocabulary parameters with their padding "
            f"rows ({what}; this code keeps the vocabulary's {vocab} rows): it was saved before 2026-12-04, when "
            "the embedding's and output layer's Muon matrix became the vocabulary's rows only, and its optimizer "
            "state cannot be continued; train.load_weights_only=true takes its weights with a fresh optimizer "
            "state (a new run from step 0"
            + (f": train.load={ckpt} with another train.run_dir)" if same_run else ")"))


def shape_mismatches(ckpt: Path, sharded_state: dict) -> list[str]:
    """'<key> saved (a, b), expected (c, d)' for every ShardedTensor of ``sharded_state`` (what this
    run would load) whose global shape in ``ckpt`` differs. Tensors that may differ (Megatron's
    padded vocabulary: ``allow_shape_mismatch``) and keys the checkpoint lacks are left to the load."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = saved_shapes(ckpt)
    found = {}
    for t in nested_values(sharded_state):
        if isinstance(t, ShardedTensor) and not t.allow_shape_mismatch and t.key in saved:
            if tuple(t.global_shape) != saved[t.key]:
                found[t.key] = f"{t.key} saved {saved[t.key]}, expected {tuple(t.global_shape)}"
    return [found[k] for k in sorted(found)]


def check_shapes(ckpt: Path, sharded_state: dict) -> None:
    """CheckpointError on every rank (collective) when any rank's ``shape_mismatches`` finds one."""
    import torch.distributed as dist

    problems = shape_mismatches(ckpt, sharded_state)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, problems)
        problems = sorted(set(p for part in gathered for p in part))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"checkpoint {ckpt} holds state of another layout or version than this run builds: "
            f"{'; '.join(problems[:3])}{more}. Its files match their checksums (saved so, not damaged since); "
            "nothing was loaded")
