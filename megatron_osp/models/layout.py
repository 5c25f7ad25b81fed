"""Map between a rank's local parameters and the logical (TP=1, PP=1) model.

Tensor parallelism splits Megatron weights along ``param.partition_dim``; the fused SwiGLU
``linear_fc1`` is the exception: each TP shard holds [gate_r; up_r], so the logical [gate; up]
is split per half. Pipeline parallelism renumbers layers from 0 on every stage, and on every model
chunk of a stage with virtual pipeline stages; the global number is the local one plus
:func:`layer_offset`. Tests compare layouts through these functions, and checkpoint conversion uses
them too.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

_LAYER = re.compile(r"^(.*decoder\.layers\.)(\d+)(\..*)$")


def _is_gated_fc1(name: str, model) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit


def unwrap(module):
    """The model inside DDP / Float16Module wrappers (the end of the ``.module`` chain)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def partition_dim(param) -> int | None:
    """The dim tensor parallelism splits ``param`` along (Megatron marks it at every TP size), or None."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def layer_offset(model) -> int:
    """Global number of this model chunk's first layer (0-based), at this pipeline rank.

    ``model`` may be wrapped (DDP, Float16Module): the chunk index (``vp_stage``) is looked up on the
    first module in the ``.module`` chain that has one."""
    core = model
    while getattr(core, "vp_stage", None) is None and hasattr(core, "module"):
        core = core.module
    return get_transformer_layer_offset(model.config, vp_stage=getattr(core, "vp_stage", None))


def to_global_name(name: str, offset: int) -> str:
    m = _LAYER.match(name)
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}" if m else name


def split_for_rank(full: torch.Tensor, param, name: str, model, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a logical tensor."""
    dim = partition_dim(param)
    if dim is None or size == 1:
        return full
    if _is_gated_fc1(name, model):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]


def merge_shards(shards: list[torch.Tensor], param, name: str, model) -> torch.Tensor:
    """The logical tensor from all TP ranks' slices (inverse of split_for_rank)."""
    dim = partition_dim(param)
    if dim is None or len(shards) == 1:
        return shards[0]
    if _is_gated_fc1(name, model):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def load_logical_state_dict(model, logical: dict[str, torch.Tensor]):
    """Copy a logical (TP=1, PP=1) state dict into this rank's stage and TP slice."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    offset = layer_offset(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = to_global_name(name, offset)
            if key not in logical:
                raise KeyError(f"logical state dict has no entry {key!r} for parameter {name!r}")
            param.copy_(split_for_rank(logical[key], param, name, model, rank, size))


def gather_logical(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather per-parameter tensors (weights or grads, by local name) over TP into logical ones."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    offset = layer_offset(model)
    out = {}
    for name, param in model.named_parameters():
        local = tensors[name].detach().contiguous()
        if size > 1 and partition_dim(param) is not None:
            shards = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(shards, local, group=group)
        else:
            shards = [local]
        out[to_global_name(name, offset)] = merge_shards(shards, param, name, model)
    return out
