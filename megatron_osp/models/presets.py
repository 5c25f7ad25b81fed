"""Named model sizes. The 1.4B preset is the OSP paper's model; `tiny` trains on 2 CPU cores."""

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
