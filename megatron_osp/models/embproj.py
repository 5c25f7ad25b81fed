"""EmbProj: the OSP paper's learnable d x d projections around the embedding and output matrices.

The embedding and output matrices are trained by AdamW, whose per-coordinate scaling creates
privileged directions in the residual stream. Sandwiching them with two Muon-trained d x d maps
(one after the token embedding, one after the final norm) decouples the residual stream's basis from
AdamW's. After training the maps fold into the embedding and output matrices, so the exported model
is a plain Llama.

The projections are small (d^2 each) and replicated across tensor-parallel ranks, like norm weights;
the activations they act on are replicated too (or split by sequence under sequence parallelism, where
the gradient flag below makes Megatron all-reduce them across TP).
"""

from __future__ import annotations

import torch
from torch import nn


class EmbeddingProjection(nn.Module):
    """y = x W^T with W (d x d) orthogonally initialised from its own seed (layout-independent)."""

    def __init__(self, hidden_size: int, seed: int, params_dtype=torch.float32, sequence_parallel=False):
        super().__init__()
        weight = torch.empty(hidden_size, hidden_size, dtype=torch.float32)
        nn.init.orthogonal_(weight, generator=torch.Generator().manual_seed(seed))
        self.weight = nn.Parameter(weight.to(params_dtype))
        setattr(self.weight, "sequence_parallel", bool(sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)

    def set_identity_(self):
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.weight.shape[0], dtype=self.weight.dtype))
        return self


def attach_after(module: nn.Module, projection: EmbeddingProjection):
    """Apply `projection` to `module`'s output through a forward hook.

    A hook rather than a wrapper module keeps Megatron's parameter names (and so its checkpoint
    keys and HF mappings) unchanged for everything except the new projection weights.
    """

    def _project(_mod, _inputs, output):
        return projection(output)

    return module.register_forward_hook(_project)
