"""Layout-independent initialisation: the same seed gives the same logical model at any TP/PP.

Megatron-Core draws initial weights from per-rank RNG streams, so a PP=2 or TP=2 run starts from
different weights than a single-GPU run with the same seed. Here every logical (TP=1, PP=1) tensor
is drawn from its own generator, seeded by the run seed and the tensor's global name, and each rank
keeps its slice. Runs are then comparable across layouts, and a layout change reproduces the loss.

Distributions follow Megatron-Core's: N(0, std) for weights, N(0, std / sqrt(2 L)) for the
residual-branch outputs (attention ``linear_proj`` and MLP ``linear_fc2``), ones for norm gains,
orthogonal for the EmbProj matrices.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core import parallel_state

from megatron_osp.models import layout

_RESIDUAL_OUTPUTS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _logical_shape(param, name: str) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return tuple(shape)


def _draw(global_name: str, shape, config, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(global_name.encode())) % 2**63)
    if global_name.endswith("projection.weight"):
        out = torch.empty(shape)
        torch.nn.init.orthogonal_(out, generator=gen)
        return out
    if "norm" in global_name or global_name.endswith(".bias"):
        return torch.ones(shape) if "norm" in global_name else torch.zeros(shape)
    std = config.init_method_std
    if global_name.endswith(_RESIDUAL_OUTPUTS):
        std = std / math.sqrt(2.0 * config.num_layers)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def initialize_layout_independent(model, seed: int):
    """Overwrite every parameter of this rank's stage with its slice of the seeded logical tensor."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    offset = layout.layer_offset(model)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, param in model.named_parameters():
        global_name = layout.to_global_name(name, offset)
        if tied and global_name == "output_layer.weight":
            # Tied embeddings at PP > 1: the last stage's copy of the word embeddings (Megatron
            # keeps it in step by all-reducing the two gradients) starts as the embedding does.
            global_name = "embedding.word_embeddings.weight"
        full = _draw(global_name, _logical_shape(param, name), model.config, seed)
        param.copy_(layout.split_for_rank(full, param, name, model, rank, size))
