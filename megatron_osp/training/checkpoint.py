"""Checkpoints through Megatron-Core's ``dist_checkpointing`` (torch_dist format), resharded on load.

Every tensor is saved as a global ShardedTensor, so a checkpoint written at one TP/PP/DP layout loads
at any other: ``dist_checkpointing`` reads each rank's slice of the global tensors. A save is made
visible only once it is complete, so a job killed in the middle of one resumes from the previous one.

On-disk layout::

    <save_dir>/
      latest                  one line "iter_0000200": the newest COMPLETE checkpoint. Written last,
                              atomically (temp file + os.replace), after the directory below is final.
      iter_0000200/           one checkpoint (its name is the number of optimizer steps done)
        metadata.json         dist_checkpointing's backend marker (torch_dist)
        .metadata             torch.distributed.checkpoint index: which file holds which shard
        __<rank>_<n>.distcp   the shards: model weights, optimizer state (fp32 master weights, Adam
                              moments, Muon momentum), each rank's RNG states
        common.pt             replicated state: LR scheduler, iteration, consumed samples,
                              optimizer hyperparameters
        run_config.yaml       the RunConfig of the run that saved it (read_run_config)
        train_state.json      iteration, consumed samples, contents, the saving layout, the
                              tokenizer whose ids the model learned (human-readable)
        checksums.json        size and CRC-32 of every file above (checkpoint_integrity.py), written
                              last inside iter_N.tmp/; verified before anything is loaded
      iter_0000300.tmp/       a save in progress (or killed half way): never loaded, removed by the
                              next save
      iter_0000200.old/       while step 200 is saved again, its earlier save (see _publish)

A save writes everything into ``iter_N.tmp/``, hashes it into ``checksums.json``, renames it to
``iter_N/`` once every rank has finished, then moves ``latest``; with ``keep_last=K`` the older
``iter_*`` directories are deleted after that (the ``iter_N.tmp/`` target and the message of a
failed save: save_target.py).
Loading takes either ``<save_dir>`` (follows ``latest``) or one ``iter_N`` directory. Like
``dist_checkpointing`` itself, this needs ``save_dir`` on a filesystem that every rank sees.
Every open verifies the manifest and the small files; ``load_checkpoint`` (resume, export) all
shards too, before reading any weights. A mismatch is a CheckpointError naming the file.

Public API (all ranks call the save/load functions; the parallel state must be initialised):
``save_checkpoint``, ``load_checkpoint`` (full training state), ``load_model_weights`` (weights only,
for export and evaluation), ``read_run_config``, ``read_train_state``, ``resolve_checkpoint``,
``has_checkpoint``. Whether a run may load or continue a checkpoint: resume_check.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_osp.fileio import atomic_write_json, atomic_write_text, fsync_dir
from megatron_osp.models.layout import unwrap
from megatron_osp.training import checkpoint_integrity as integrity
from megatron_osp.training.checkpoint_integrity import CheckpointError
from megatron_osp.training.checkpoint_shapes import check_shapes
from megatron_osp.training.results_queue import ensure_results_queue
from megatron_osp.training.save_target import (  # noqa: F401 - re-exported
    SaveTarget, begin_save, iteration_dir_name, save_failed_message)

LATEST = "latest"
RUN_CONFIG = "run_config.yaml"
TRAIN_STATE = "train_state.json"
FORMAT = "megatron-osp/torch_dist"
FORMAT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
# Files every complete iteration directory has (besides its .distcp shards).
_REQUIRED = ("metadata.json", ".metadata", "common.pt", RUN_CONFIG, TRAIN_STATE)
# Megatron matches saved optimizer param groups to live ones by these keys (optimizer.py).
_GROUP_KEYS_DEFAULTS = {"lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False}
# Param-group entries that describe this rank's layout rather than hyperparameters: never taken from
# a checkpoint (rank 0's values there belong to rank 0's pipeline stage and layout).
_LAYOUT_GROUP_KEYS = ("blocks",)


# ---------------------------------------------------------------------------------- finding
def has_checkpoint(save_dir: str | os.PathLike) -> bool:
    """True when ``save_dir`` has a ``latest`` pointer (auto-resume uses this)."""
    return (Path(save_dir) / LATEST).is_file()


def newest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The iteration directory ``save_dir``'s ``latest`` names, or None when it has none."""
    return find_iteration_dir(save_dir) if has_checkpoint(save_dir) else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The complete iteration directory that ``path`` names (a save dir, following ``latest``, or one
    ``iter_N`` directory); CheckpointError naming the path otherwise. Checks every file's presence
    and size and all but the shards' checksums (``load_checkpoint`` checks the shards')."""
    path = find_iteration_dir(path)
    integrity.check_complete(path, _REQUIRED)
    return path


def checkpoints_of(path: str | os.PathLike) -> Path:
    """``path``, or for a run directory (no ``latest`` of its own, a ``checkpoints/`` in it) its checkpoints."""
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints").is_dir() and not (p / LATEST).exists() else p


def find_iteration_dir(path: str | os.PathLike) -> Path:
    """The iteration directory ``path`` names, without checking its files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    pointer = path / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _ITER_RE.match(name):
            raise CheckpointError(f"{pointer}: expected a line like 'iter_0000100', got {name!r}")
        target = path / name
        if not target.is_dir() and target.with_name(name + ".old").is_dir():
            target = target.with_name(name + ".old")  # killed while saving that step again (_publish)
        if not target.is_dir():
            raise CheckpointError(f"{pointer} points to {target}, which does not exist")
        path = target
    elif not (path / "metadata.json").is_file():
        partial = sorted(p.name for p in path.glob("iter_*.tmp"))
        hint = f" (only incomplete saves: {', '.join(partial)})" if partial else ""
        if (path / "checkpoints" / LATEST).is_file():  # a run directory
            hint += f"; it looks like a run directory: its checkpoints are {path / 'checkpoints'}"
        raise CheckpointError(
            f"{path} is not a checkpoint: it has neither a '{LATEST}' pointer file nor the "
            f"checkpoint files of one iteration directory (metadata.json){hint}"
        )
    return path


def read_train_state(path: str | os.PathLike, *, resolved: bool = False) -> dict:
    """``train_state.json`` of a checkpoint: iteration, consumed_samples, contents, layout.
    ``resolved``: ``path`` is what ``resolve_checkpoint`` returned (not checked again: that stats
    every shard)."""
    ckpt = Path(path) if resolved else resolve_checkpoint(path)
    try:
        state = json.loads((ckpt / TRAIN_STATE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / TRAIN_STATE}: invalid JSON: {e}") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / TRAIN_STATE}: not a {FORMAT} checkpoint (format={state.get('format')!r})")
    if state.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt / TRAIN_STATE}: checkpoint format version {state['version']} is newer than this "
            f"code's ({FORMAT_VERSION})"
        )
    return state


def read_run_config(path: str | os.PathLike, *, resolved: bool = False):
    """The RunConfig saved with a checkpoint (``path`` = save dir or iteration directory; ``resolved``:
    as ``read_train_state``'s)."""
    return load_config_file((Path(path) if resolved else resolve_checkpoint(path)) / RUN_CONFIG)


def model_config_for_one_process(path: str | os.PathLike):
    """The saved model's config for rebuilding it at TP=1 in one process (export, evaluation).

    Vocabulary padding depends on the saving TP size (Megatron pads to a multiple of
    make_vocab_size_divisible_by x TP), so the multiple is scaled to pad the TP=1 model the same.
    """
    import dataclasses

    saved_tp = read_train_state(path).get("layout", {}).get("tensor_parallel_size", 1)
    model = read_run_config(path).model
    return dataclasses.replace(
        model, make_vocab_size_divisible_by=model.make_vocab_size_divisible_by * saved_tp
    )


# ---------------------------------------------------------------------------------- state dicts
def _model_keys(model_chunks) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _model_sharded_state_dict(model_chunks) -> dict:
    return {key: unwrap(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(model_chunks), model_chunks)}


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    layout = {
        "tensor_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }
    vp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vp is not None:  # recorded only when set, so checkpoints without it compare as before
        layout["virtual_pipeline_size"] = vp
    return layout


def _rng_sharded_object(data):
    """This rank's RNG states as one cell of a (PP, TP, DP) grid of objects."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", data, shape, offset, replica_id=0)


def _rng_states() -> dict:
    from megatron.core import tensor_parallel

    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _add_group_identifiers(groups) -> None:
    """Megatron's loader matches param groups by (wd_mult, lr_mult, is_expert_parallel,
    is_decoupled_lr); give groups that lack the last three their neutral values."""
    for group in groups:
        group.setdefault("wd_mult", 1.0)
        for key, value in _GROUP_KEYS_DEFAULTS.items():
            group.setdefault(key, value)


def _optimizer_groups(state) -> list:
    """The torch param groups inside one sub-optimizer's (loaded) state dict."""
    inner = state.get("optimizer", state) if isinstance(state, dict) else state
    return inner.get("param_groups", []) if isinstance(inner, dict) else []


def _load_optimizer(optimizer, state) -> None:
    subs = _sub_optimizers(optimizer)
    layout_values = [[{k: g[k] for k in _LAYOUT_GROUP_KEYS if k in g} for g in sub.param_groups] for sub in subs]
    for sub in subs:
        _add_group_identifiers(sub.param_groups)
    per_sub = [state] if len(subs) == 1 else [state[k] for k in sorted(state)]
    for sub_state in per_sub:
        _add_group_identifiers(_optimizer_groups(sub_state))
    optimizer.load_state_dict(state)
    for sub, saved in zip(subs, layout_values):
        for group, values in zip(sub.param_groups, saved):
            group.update(values)


# ---------------------------------------------------------------------------------- save
def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    model_chunks,
    config,
    *,
    optimizer=None,
    scheduler=None,
    consumed_samples: int = 0,
    keep_last: int = 0,
    save_rng: bool = True,
    log=None,
    tokenizer: dict | None = None,
) -> Path:
    """Save a checkpoint of ``iteration`` under ``save_dir`` (collective: every rank calls it).

    ``model_chunks`` are the model (DDP/Float16Module-wrapped or not). Without ``optimizer`` and
    ``scheduler`` this writes a weights-only checkpoint (e.g. one converted from Hugging Face), which
    training loads with a fresh optimizer. ``tokenizer``: the record (training/tokenizer_record.py) of
    the tokenizer whose ids the model learned, where ``config`` does not name it (an HF import's
    tokenizer.json). Returns the final iteration directory.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    start = time.perf_counter()
    target = begin_save(save_dir, iteration)
    state, contents = training_state(model_chunks, optimizer, scheduler, save_rng, iteration, consumed_samples)
    try:
        _write_shards(state, target.tmp)
        write_small_files(target, config, consumed_samples, contents, tokenizer)
    except (OSError, RuntimeError, CheckpointException) as e:  # a full disk, a lost mount (a BaseException)
        raise CheckpointError(save_failed_message(target, e)) from e
    dist.barrier()
    integrity.write_manifest_collective(target.tmp)  # collective; rank 0 writes it before publishing below
    return finish_save(target, keep_last, log, start)


def training_state(model_chunks, optimizer, scheduler, save_rng: bool, iteration: int, consumed_samples: int):
    """The sharded state dict a save writes, and the names of its contents."""
    contents = ["model"]
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        for sub in _sub_optimizers(optimizer):
            _add_group_identifiers(sub.param_groups)
        state["optimizer"] = optimizer.sharded_state_dict(dict(state))
        subs = _sub_optimizers(optimizer)
        for sub_state in [state["optimizer"]] if len(subs) == 1 else state["optimizer"].values():
            for group in _optimizer_groups(sub_state):
                for key in _LAYOUT_GROUP_KEYS:
                    group.pop(key, None)  # per-rank layout, not state: differs between stages
        contents.append("optimizer")
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
        contents.append("scheduler")
    if save_rng:
        state["rng_state"] = _rng_sharded_object(_rng_states())
        contents.append("rng")
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    return state, contents


def write_small_files(target: SaveTarget, config, consumed_samples: int, contents: list[str],
                      tokenizer: dict | None = None) -> None:
    """Rank 0 writes the run config and the train state into the save's ``tmp`` directory, with the
    record of the tokenizer whose ids the model learned (``tokenizer``, else the run's)."""
    if dist.get_rank() != 0:
        return
    from megatron_osp.training.config import save_config
    from megatron_osp.training.tokenizer_record import KEY, run_record

    save_config(config, target.tmp / RUN_CONFIG)
    atomic_write_json(
        target.tmp / TRAIN_STATE,
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "iteration": target.iteration,
            "consumed_samples": consumed_samples,
            "contents": contents,
            "layout": _layout(),
            **({KEY: record} if (record := tokenizer or run_record(config)) else {}),
        },
    )


def finish_save(target: SaveTarget, keep_last: int, log, start: float, how: str = "") -> Path:
    """Publish a save whose files and manifest are complete (collective), prune, and log."""
    if dist.get_rank() == 0:
        _publish(target.tmp, target.final, target.save_dir)
        if keep_last > 0:
            _prune(target.save_dir, keep_last, keep=target.final)
        if log is not None:
            log(f"saved checkpoint {target.final} in {time.perf_counter() - start:.2f} s{how}")
    dist.barrier()
    return target.final


def _write_shards(state: dict, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    ensure_results_queue()
    dist_checkpointing.save(state, str(directory))


def _publish(tmp: Path, final: Path, save_dir: Path) -> None:
    """Make a complete save visible: rename its directory into place, then move ``latest``. A step saved
    again moves its earlier save to ``iter_N.old`` first (read instead of a missing ``iter_N``, see
    find_iteration_dir, if a kill comes before the new one is in place; renamed back by later saves)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    for aside in save_dir.glob("iter_*.old"):
        if _ITER_RE.match(aside.stem) and not aside.with_suffix("").exists():
            os.replace(aside, aside.with_suffix(""))
    fsync_dir(save_dir)  # the renames reach the disk before the pointer that names it
    atomic_write_text(save_dir / LATEST, final.name + "\n")  # fsyncs the file and save_dir


def _prune(save_dir: Path, keep_last: int, keep: Path) -> None:
    found = sorted(
        (int(m.group(1)), p) for p in save_dir.iterdir() if p.is_dir() and (m := _ITER_RE.match(p.name))
    )
    for _, path in found[:-keep_last]:
        if path != keep:
            shutil.rmtree(path)


# ---------------------------------------------------------------------------------- load
def load_checkpoint(path, model_chunks, optimizer=None, scheduler=None, *, load_rng: bool = True,
                    weights_only: bool = False, log=None) -> dict:
    """Load a checkpoint into a built model (and optimizer / scheduler) at any TP/PP/DP layout.

    Parts the checkpoint lacks (a weights-only checkpoint has no optimizer) are left as they are, and
    so are the optimizer and scheduler with ``weights_only`` (its master weights are made from the model's).
    RNG states are restored only when the layout is the one that saved them (they are per rank).
    Returns the checkpoint's train state (iteration, consumed_samples, contents, layout, path).
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt = resolve_checkpoint(path)
    integrity.verify_checkpoint(ckpt, collective=True)  # every shard's checksum, before any is read
    train_state = read_train_state(ckpt, resolved=True)
    contents = set(train_state.get("contents", ["model"]))
    _check_vocab_padding(ckpt, train_state, model_chunks)
    state = _model_sharded_state_dict(model_chunks)
    use_optimizer = optimizer is not None and "optimizer" in contents and not weights_only
    if use_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=True)
    same_layout = train_state.get("layout") == _layout()
    use_rng = load_rng and "rng" in contents and same_layout
    if use_rng:
        state["rng_state"] = _rng_sharded_object(None)
    check_shapes(ckpt, state)  # another layout or version, told apart from damage (collective)
    try:
        loaded = dist_checkpointing.load(state, str(ckpt))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        raise CheckpointError(integrity.describe_load_failure(ckpt, e)) from e
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if use_optimizer:
        _load_optimizer(optimizer, loaded["optimizer"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp32 master weights from the loaded bf16/fp32 weights
    use_scheduler = scheduler is not None and "scheduler" in contents and not weights_only
    if use_scheduler:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if use_rng:
        _set_rng_states(loaded["rng_state"])
    if log is not None:
        restored = {"model"} | {name for name, used in (
            ("optimizer", use_optimizer), ("scheduler", use_scheduler), ("rng", use_rng)) if used}
        skipped = sorted(contents - restored)
        note = f" (not restored: {', '.join(skipped)})" if skipped else ""
        log(f"loaded checkpoint {ckpt} at iteration {train_state['iteration']}{note}")
    return dict(train_state, path=str(ckpt))


def _check_vocab_padding(ckpt: Path, train_state: dict, model_chunks) -> None:
    """The padded vocabulary depends on the TP size; layouts that pad differently cannot reshard."""
    for chunk in model_chunks:
        vocab = getattr(unwrap(chunk), "vocab_size", None)
        if vocab is not None and (problem := vocab_padding_problem(ckpt, train_state, vocab)):
            raise CheckpointError(problem)


def vocab_padding_problem(ckpt: Path, train_state: dict, vocab: int) -> str | None:
    """Why a model whose vocabulary is padded to ``vocab`` rows cannot load the checkpoint ``ckpt``
    (an iteration directory with its ``train_state``), or None when it pads as the checkpoint did."""
    saved_model = load_config_file(ckpt / RUN_CONFIG).model
    saved_tp = train_state.get("layout", {}).get("tensor_parallel_size", 1)
    saved_vocab = saved_model.padded_vocab_size(saved_tp)
    if vocab == saved_vocab:
        return None
    return (f"checkpoint {ckpt} has a vocabulary padded to {saved_vocab} (vocab_size "
            f"{saved_model.vocab_size} at tensor_parallel_size={saved_tp}), this model to {vocab}; "
            "choose model.make_vocab_size_divisible_by so both layouts pad to the same size")


def load_config_file(path: Path):
    from megatron_osp.training.config import load_config

    return load_config(path, saved=True)


def load_model_weights(path, model_chunks) -> dict:
    """Load only the model weights of a checkpoint into ``model_chunks`` (any TP/PP layout: the
    shards are resharded). For export and evaluation. Returns the checkpoint's train state.

    Build the model from ``read_run_config(path).model`` after ``parallel.init_distributed``; to run
    it, seed Megatron's RNG tracker too (``platform.seed_everything``)."""
    return load_checkpoint(path, model_chunks, load_rng=False)
