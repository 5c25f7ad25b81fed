"""The model half of a run's configuration: architecture plus the two OSP switches.

``normalization`` and ``embedding_projection`` are the paper's ablation axes (the optimizer is the
third, in the optimizer config), so an Adam+RMSNorm baseline and every OSP ablation differ by flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_osp.models.ssnorm import SSNORM_KERNELS


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None = no GQA (as many KV heads as query heads)
    ffn_hidden_size: int = 172
    vocab_size: int = 512  # the tokenizer's; the embedding is padded (see padded_vocab_size)
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 128
    rotary_base: int = 10000
    normalization: str = "ssnorm"  # "rmsnorm" | "ssnorm"
    ssnorm_kernel: str = "auto"  # "auto" (fused on GPU, eager elsewhere) | "eager" | "fused" (models/ssnorm.py)
    embedding_projection: bool = True
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: str = "auto"  # "auto" | "local" | "transformer_engine"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={groups}"
            )
        if self.normalization not in ("rmsnorm", "ssnorm"):
            raise ValueError(
                f"model.normalization must be 'rmsnorm' or 'ssnorm', got {self.normalization!r}"
            )
        if self.ssnorm_kernel not in SSNORM_KERNELS:
            raise ValueError(f"model.ssnorm_kernel must be one of {tuple(SSNORM_KERNELS)}, got {self.ssnorm_kernel!r}")

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocab rounded up so every TP rank holds an equal, aligned slice of the embedding."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def num_parameters(self) -> int:
        """Parameter count of the unpadded model (for logs and presets' sanity)."""
        h, f, v, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        kv = h // self.num_attention_heads * (self.num_query_groups or self.num_attention_heads)
        norm = 1 if self.normalization == "ssnorm" else h
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * norm
        heads = v * h * (2 if self.untie_embeddings_and_output_weights else 1)
        proj = 2 * h * h if self.embedding_projection else 0
        return L * per_layer + heads + norm + proj
