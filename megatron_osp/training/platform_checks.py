"""Settings this machine cannot run, refused when the Trainer starts (before any model is built).

validation.py checks values against each other, the world size and the data; these need to know
the machine: whether it trains on CPU, and what is installed. Without them each failed only once
the model or optimizer was built, or at the first step, with a library's traceback:

- ``train.bf16=true`` on CPU without the distributed optimizer (Megatron's mixed-precision
  optimizer wraps only CUDA tensors; ours, optimizer/zero/, runs bf16 on CPU too);
- ``model.transformer_impl=transformer_engine`` without Transformer Engine;
- ``parallel.sequence_parallel=true`` with ``model.normalization=rmsnorm`` on the local spec
  (Megatron-Core's local RMSNorm refuses sequence parallelism when the model is built);
- ``optimizer.muon_ns_backend=triton`` where the Triton kernel cannot run (no triton, or CPU
  without its interpreter) for an optimizer with Muon.

- ``train.wandb_project`` without ``wandb`` installed (the W&B run would only fail to start after
  the data and model were built);
- a ``train.run_dir``, ``train.wandb_dir``, ``data.cache_dir`` or (when saving) ``train.save_dir``
  that cannot be created or written: the first save failed only after the training it was to keep
  (with ``save_interval=0``, all of it).

``check_launch``: a process that is one of several tasks of an ``srun`` step or an MPI launch but
was not started by torchrun (no MASTER_ADDR) would become a world of one; every task would train
alone and all would write the same run directory and checkpoints.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from megatron_osp.fileio import unwritable_reason
from megatron_osp.models.layer_specs import resolve_backend, transformer_engine_available
from megatron_osp.training.validation import ConfigError


def platform_problems(config, on_cpu: bool) -> list[str]:
    problems = []
    if config.train.bf16 and on_cpu and not config.optimizer.distributed_optimizer:
        problems.append(
            "train.bf16=true on CPU needs optimizer.distributed_optimizer=true (Megatron's mixed-precision "
            "optimizer, used without it, wraps CUDA tensors only); or leave train.bf16 null (fp32 on CPU)"
        )
    if config.model.transformer_impl == "transformer_engine" and not transformer_engine_available():
        problems.append(
            "model.transformer_impl=transformer_engine: Transformer Engine is not installed (install "
            "megatron-osp[te], or use local; auto takes it when it is importable)"
        )
    m, par = config.model, config.parallel
    if (m.normalization == "rmsnorm" and par.sequence_parallel and par.tensor_parallel_size > 1
            and m.transformer_impl != "transformer_engine" and resolve_backend(m.transformer_impl) == "local"):
        # Megatron-Core's local RMSNorm (torch's, wrapped) asserts at model build that it is not
        # sequence parallel; SSNorm and Transformer Engine's RMSNorm are.
        problems.append(
            f"parallel.sequence_parallel=true with model.normalization=rmsnorm needs Transformer Engine "
            f"(model.transformer_impl={m.transformer_impl} builds Megatron-Core's local RMSNorm here, which "
            "has no sequence parallelism): use model.normalization=ssnorm, parallel.sequence_parallel=false, "
            "or transformer_impl=transformer_engine on a GPU"
        )
    if config.optimizer.muon_ns_backend == "triton" and config.optimizer.name != "adam":
        reason = _triton_unavailable(on_cpu)
        if reason is not None:
            problems.append(f"optimizer.muon_ns_backend=triton cannot run here: {reason} (use torch or auto)")
    t = config.train
    if t.wandb_project:
        reason = _wandb_unavailable()
        if reason is not None:
            problems.append(
                f"train.wandb_project={t.wandb_project}: {reason} (pip install wandb, or "
                "pip install -e \".[wandb]\"; or leave train.wandb_project unset)"
            )
    dirs = [("train.run_dir", Path(t.run_dir))]
    if t.wandb_project and t.wandb_dir:
        dirs.append(("train.wandb_dir", Path(t.wandb_dir)))
    if t.save:
        dirs.append(("train.save_dir", Path(t.save_dir) if t.save_dir else Path(t.run_dir) / "checkpoints"))
    if config.data.cache_dir:
        dirs.append(("data.cache_dir", Path(config.data.cache_dir)))
    for name, path in dirs:
        reason = unwritable_reason(path)
        if reason is not None:
            problems.append(f"{name}={path}: {reason}")
    return problems


def _wandb_unavailable() -> str | None:
    """Why ``import wandb`` fails (None: it works)."""
    try:
        importlib.import_module("wandb")
    except ImportError as e:
        return "wandb is not installed" if e.name == "wandb" else f"wandb cannot be imported ({e})"
    except Exception as e:  # noqa: BLE001 - a broken install (e.g. a dependency of another version)
        return f"wandb cannot be imported ({type(e).__name__}: {e})"
    return None


def _triton_unavailable(on_cpu: bool) -> str | None:
    """Why the Newton-Schulz Triton kernel cannot run on this machine at all (None: it may; the
    optimizer checks dtype and compute capability on its tensors)."""
    nt = importlib.import_module("megatron_osp.optimizer.ns_triton")
    if nt.triton is None:
        return f"triton is not importable ({nt._IMPORT_ERROR})"
    if on_cpu and not nt.INTERPRET:
        return "training runs on CPU and the Triton kernel needs CUDA (or TRITON_INTERPRET=1 for its interpreter)"
    return None


def check_platform(config, on_cpu: bool) -> None:
    problems = platform_problems(config, on_cpu)
    if problems:
        raise ConfigError(problems)


# Launchers that start several copies of a command, and the variable that says how many.
_TASK_COUNTS = (("SLURM_STEP_NUM_TASKS", "srun"), ("OMPI_COMM_WORLD_SIZE", "mpirun"), ("PMI_SIZE", "an MPI launcher"))


def check_launch(environ) -> None:
    """ConfigError when this process is one of several tasks that torchrun did not start."""
    if "MASTER_ADDR" in environ:
        return
    for name, launcher in _TASK_COUNTS:
        count = environ.get(name, "")
        if count.isdigit() and int(count) > 1:
            raise ConfigError(
                f"this process is one of {count} tasks started by {launcher} ({name}={count}) but not by "
                "torchrun (no MASTER_ADDR): each would train alone and all would write the same run "
                "directory. Start one torchrun per node (examples/pretrain_slurm.sh), or a single task"
            )
