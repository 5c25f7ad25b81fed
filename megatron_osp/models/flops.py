"""Model FLOPs of the GPT model per token: what a training log's "TFLOP/s per device" is made of.

Counted: every matrix multiplication of the forward pass (2 FLOPs per multiply-add), for one token
of a ``seq_length`` sequence, on the model the spec builds:

    per layer   QKV 2·h·(h + 2·kv), core attention 2·2·s·h (QKᵀ and AV over all ``s`` keys, as the
                unfused attention computes it: the causal mask zeroes half, it does not skip it),
                output projection 2·h·h, SwiGLU MLP 2·3·h·f
    model       EmbProj 2·2·h·h (both projections), output layer 2·h·V (V: the padded vocabulary)

with ``kv`` = head_dim × query groups. A training step is three forward passes' worth (the backward
pass computes input and weight gradients: twice the forward), the usual model-FLOPs convention
(MFU's numerator): activation recompute and the optimizer (Newton–Schulz) are not model FLOPs and
are not counted; norms, softmax, rotary and element-wise work are not matmuls. tests/test_flops.py
checks the formula against torch's FLOP counter on the built model, forward and backward.
"""

from __future__ import annotations

from megatron_osp.models.config import ModelConfig

__all__ = ["forward_flops_per_token", "training_flops_per_token"]


def forward_flops_per_token(cfg: ModelConfig, tensor_parallel_size: int = 1) -> int:
    """Forward-pass matmul FLOPs per token of a ``cfg.seq_length``-token sequence (see the module)."""
    h, f, s, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.seq_length, cfg.num_layers
    kv = h // cfg.num_attention_heads * (cfg.num_query_groups or cfg.num_attention_heads)
    per_layer = 2 * h * (h + 2 * kv) + 2 * 2 * s * h + 2 * h * h + 2 * 3 * h * f
    model = 2 * h * cfg.padded_vocab_size(tensor_parallel_size)
    if cfg.embedding_projection:
        model += 2 * 2 * h * h
    return layers * per_layer + model


def training_flops_per_token(cfg: ModelConfig, tensor_parallel_size: int = 1) -> int:
    """Model FLOPs per trained token: forward + backward (3 × forward), without recompute."""
    return 3 * forward_flops_per_token(cfg, tensor_parallel_size)
