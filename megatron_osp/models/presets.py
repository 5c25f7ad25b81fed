"""Named model sizes. The 1.4B preset is the OSP paper's model; `osp-8b` and `osp-70b` have Llama 3's
shapes for cluster runs (examples/pretrain_osp_8b_slurm.sh); `tiny` trains on 2 CPU cores.

Every preset keeps ModelConfig's OSP defaults (SSNorm, EmbProj); the Adam baseline of the paper sets
``model.normalization=rmsnorm model.embedding_projection=false`` on top of the same preset."""

from __future__ import annotations

import dataclasses

from megatron_osp.models.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Park et al. (2025): Llama-style, 24 x 2048, 16 heads without GQA, SwiGLU 5504, RoPE 1e4,
    # untied embeddings, vocab 49152 (SmolLM tokenizer), trained on 1T tokens at seq 2048.
    "osp-1.4b": ModelConfig(
        num_layers=24,
        hidden_size=2048,
        num_attention_heads=16,
        ffn_hidden_size=5504,
        vocab_size=49152,
        seq_length=2048,
        rotary_base=10000,
        untie_embeddings_and_output_weights=True,
    ),
    # Llama-3-8B's shapes (Meta, 2024): 32 x 4096, 32 heads in 8 KV groups (GQA, head dim 128), SwiGLU
    # 14336, vocab 128256 (a multiple of 128, so no padding at TP <= 2), seq 8192, RoPE base 5e5,
    # untied embeddings. With normalization=rmsnorm and embedding_projection=false it is Llama-3-8B:
    # 8,030,261,248 parameters; the OSP defaults (one scale per SSNorm, two 4096^2 EmbProj matrices)
    # add 2*4096^2 - 65*4095 of them.
    "osp-8b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=14336,
        vocab_size=128256,
        seq_length=8192,
        rotary_base=500000,
        untie_embeddings_and_output_weights=True,
    ),
    # Llama-3-70B's shapes: 80 x 8192, 64 heads in 8 KV groups, SwiGLU 28672, vocab 128256, seq 8192,
    # RoPE 5e5, untied: 70,553,706,496 parameters with rmsnorm and no EmbProj.
    "osp-70b": ModelConfig(
        num_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_query_groups=8,
        ffn_hidden_size=28672,
        vocab_size=128256,
        seq_length=8192,
        rotary_base=500000,
        untie_embeddings_and_output_weights=True,
    ),
    # A few million parameters: minutes on 2 CPU cores, enough for the OSP kurtosis gap to show.
    "tiny": ModelConfig(
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        ffn_hidden_size=344,
        vocab_size=2048,
        seq_length=128,
    ),
    # For unit and multi-rank tests.
    "test": ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=96,
        vocab_size=256,
        seq_length=32,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], **overrides)
