"""Process groups: torch.distributed from torchrun's environment, then Megatron's TP/PP/DP grid."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_osp import platform


def init_distributed(
    tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, virtual_pipeline_size: int = 1
) -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on CUDA) and Megatron's parallel groups.

    Works under torchrun (RANK/WORLD_SIZE/MASTER_* set) and as a plain single process, which
    becomes a world of one. Re-initialising with another layout destroys the old groups first.
    ``virtual_pipeline_size`` > 1 (model chunks per pipeline stage) makes
    ``get_forward_backward_func()`` pick Megatron's interleaved 1F1B schedule.
    """
    if virtual_pipeline_size > 1 and pipeline_parallel_size == 1:
        raise ValueError(
            f"parallel.virtual_pipeline_size={virtual_pipeline_size} needs parallel.pipeline_parallel_size > 1"
        )
    vp = virtual_pipeline_size if virtual_pipeline_size > 1 else None
    platform.setup_platform()
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # not launched by torchrun
            # A world of one needs no rendezvous: an in-process store cannot lose a port race
            # with another job on the machine, as picking a free TCP port and binding it later can.
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            dist.init_process_group(
                backend=platform.distributed_backend(), store=dist.HashStore(), rank=0, world_size=1
            )
        else:
            dist.init_process_group(backend=platform.distributed_backend())
    world = dist.get_world_size()
    if world % (tensor_parallel_size * pipeline_parallel_size):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel_size={tensor_parallel_size} "
            f"x pipeline_parallel_size={pipeline_parallel_size}"
        )
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel_size
            and parallel_state.get_pipeline_model_parallel_world_size() == pipeline_parallel_size
            and parallel_state.get_virtual_pipeline_model_parallel_world_size() == vp
        )
        if same:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=vp,
    )


def process_rank() -> int:
    """This process's rank, known before ``init_distributed`` (the one it will have: torchrun's RANK, or 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if "MASTER_ADDR" in os.environ else 0


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(device, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any rank: one all-reduce over the world, so that every rank
    takes the same branch (a stop, a refusal) whatever it saw itself."""
    values = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]
