"""One structural view of a Llama-style model, whether it is our Megatron GPT model or an HF export.

Quantization, rotations and activation statistics all need the same map of a decoder: which norm
feeds which linears, which linears write into the residual stream, where K and V are formed. Reading
that map once here lets every analysis run unchanged on ``OSPGPTModel`` built at TP=1 (Megatron's
``ColumnParallelLinear``/``RowParallelLinear``/TE linears, whose forward returns ``(out, bias)``)
and on ``transformers``' ``LlamaForCausalLM`` (plain ``nn.Linear``). Everything is found by module
attribute names, so a model of another shape is refused with the name it lacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LayerParts", "ModelParts", "model_parts", "logits"]


@dataclass
class LayerParts:
    """The modules of one decoder layer, by role.

    ``attn_in``/``mlp_in`` read the output of ``attn_norm``/``mlp_norm``; ``attn_out``/``mlp_out`` write
    into the residual stream. A norm is ``None`` when its gain lives inside the following linear
    (Transformer Engine's fused ``layer_norm_weight``).
    """

    layer: nn.Module
    attn_norm: nn.Module | None
    attn_in: list[nn.Module]
    attn_out: nn.Module
    mlp_norm: nn.Module | None
    mlp_in: list[nn.Module]
    mlp_out: nn.Module
    kv_module: nn.Module  # Megatron: core_attention (gets post-RoPE q, k, v); HF: the attention module
    value_rows: list[tuple[nn.Module, slice]] = field(default_factory=list)  # where V's rows live

    def linears(self) -> list[tuple[str, nn.Module]]:
        names = ["qkv"] if len(self.attn_in) == 1 else ["q_proj", "k_proj", "v_proj"]
        mlp_names = ["fc1"] if len(self.mlp_in) == 1 else ["gate_proj", "up_proj"]
        return (
            list(zip(names, self.attn_in))
            + [("o_proj", self.attn_out)]
            + list(zip(mlp_names, self.mlp_in))
            + [("down_proj", self.mlp_out)]
        )


@dataclass
class ModelParts:
    """The whole decoder: ``kind`` is "megatron" or "hf"; heads and embeddings by role."""

    kind: str
    model: nn.Module
    embedding: nn.Module  # holds the (vocab, hidden) ``weight``
    embedding_projection: nn.Module | None  # EmbProj after the embedding (writes the residual)
    layers: list[LayerParts]
    final_norm: nn.Module
    output_projection: nn.Module | None  # EmbProj after the final norm (reads it)
    output_layer: nn.Module  # holds the (vocab, hidden) ``weight``
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied: bool
    # The tokenizer's vocabulary when the output layer has padding rows past it (Megatron pads to a
    # multiple of make_vocab_size_divisible_by x TP); None: every output row is a token.
    vocab_size: int | None = None

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return [lp.layer for lp in self.layers]

    @property
    def residual_writers_in(self) -> nn.Module:
        """The module whose output starts the residual stream (its weight maps into it)."""
        return self.embedding_projection if self.embedding_projection is not None else self.embedding

    @property
    def final_readers(self) -> list[nn.Module]:
        """The linears that read the final norm's output."""
        return [self.output_projection] if self.output_projection is not None else [self.output_layer]

    def require_unfused_norms(self, purpose: str) -> None:
        """Hooks on a linear's input see what its matmul multiplies only when the norm before it is a
        module of its own: Transformer Engine's LayerNormLinear receives the *pre-norm* hidden state."""
        if any(lp.attn_norm is None or lp.mlp_norm is None for lp in self.layers):
            raise ValueError(
                f"{purpose} needs each norm outside the linear that reads it, but this model fuses them "
                "(Transformer Engine's LayerNormLinear sees the pre-norm input): build it with "
                "model.transformer_impl=local, as megatron_osp.analysis.loading does"
            )

    def named_linears(self) -> list[tuple[str, nn.Module]]:
        """Every linear layer inside the decoder layers, named ``layer_{k}.{role}`` (k from 1)."""
        return [
            (f"layer_{i + 1}.{name}", mod) for i, lp in enumerate(self.layers) for name, mod in lp.linears()
        ]


def _need(obj, path: str):
    cur = obj
    for part in path.split("."):
        if not hasattr(cur, part):
            raise ValueError(f"{type(obj).__name__} has no '{path}': not a Llama-style model this tool knows")
        cur = getattr(cur, part)
    return cur


def _norm_or_fused(norm: nn.Module, linear: nn.Module) -> nn.Module | None:
    """``None`` when the norm is fused into the linear (TE LayerNormLinear: IdentityOp + layer_norm_weight)."""
    if getattr(linear, "layer_norm_weight", None) is not None:
        if getattr(linear, "zero_centered_gamma", False):
            raise ValueError("zero-centred norm gains are not supported by the analysis tools")
        return None
    if not hasattr(norm, "weight"):
        raise ValueError(f"norm {type(norm).__name__} has no weight and no fused gain in {type(linear).__name__}")
    return norm


def _megatron_parts(model) -> ModelParts:
    from megatron.core.transformer.module import Float16Module

    core = model
    while isinstance(core, Float16Module) or hasattr(core, "module") and not hasattr(core, "decoder"):
        core = core.module
    if not (core.pre_process and core.post_process):
        raise ValueError("analysis needs the whole model on one rank (pipeline_parallel_size=1)")
    cfg = core.config
    if cfg.tensor_model_parallel_size != 1:
        raise ValueError("analysis needs a model built at tensor_parallel_size=1")
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    layers = []
    for layer in core.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        qkv = attn.linear_qkv
        # Megatron's fused QKV is grouped: for each query group, [q heads of the group, k, v].
        per_group = (heads // groups + 2) * head_dim
        v_start = (heads // groups + 1) * head_dim
        value_rows = [
            (qkv, slice(g * per_group + v_start, g * per_group + v_start + head_dim)) for g in range(groups)
        ]
        layers.append(
            LayerParts(
                layer=layer,
                attn_norm=_norm_or_fused(layer.input_layernorm, qkv),
                attn_in=[qkv],
                attn_out=attn.linear_proj,
                mlp_norm=_norm_or_fused(layer.pre_mlp_layernorm, mlp.linear_fc1),
                mlp_in=[mlp.linear_fc1],
                mlp_out=mlp.linear_fc2,
                kv_module=attn.core_attention,
                value_rows=value_rows,
            )
        )
    tied = core.share_embeddings_and_output_weights
    return ModelParts(
        kind="megatron",
        model=core,
        embedding=core.embedding.word_embeddings,
        embedding_projection=getattr(core, "embedding_projection", None),
        layers=layers,
        final_norm=core.decoder.final_layernorm,
        output_projection=getattr(core, "output_projection", None),
        output_layer=core.output_layer,
        hidden_size=cfg.hidden_size,
        num_heads=heads,
        num_kv_heads=groups,
        head_dim=head_dim,
        tied=bool(tied),
        vocab_size=getattr(core, "unpadded_vocab_size", None),
    )


def _hf_parts(model) -> ModelParts:
    inner = _need(model, "model")
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = []
    for layer in _need(inner, "layers"):
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            LayerParts(
                layer=layer,
                attn_norm=layer.input_layernorm,
                attn_in=[attn.q_proj, attn.k_proj, attn.v_proj],
                attn_out=attn.o_proj,
                mlp_norm=layer.post_attention_layernorm,
                mlp_in=[mlp.gate_proj, mlp.up_proj],
                mlp_out=mlp.down_proj,
                kv_module=attn,
                value_rows=[(attn.v_proj, slice(h * head_dim, (h + 1) * head_dim)) for h in range(kv)],
            )
        )
    head = _need(model, "lm_head")
    emb = _need(inner, "embed_tokens")
    return ModelParts(
        kind="hf",
        model=model,
        embedding=emb,
        embedding_projection=None,
        layers=layers,
        final_norm=_need(inner, "norm"),
        output_projection=None,
        output_layer=head,
        hidden_size=cfg.hidden_size,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        tied=head.weight is emb.weight,
    )


def model_parts(model: nn.Module) -> ModelParts:
    """The structural view of an OSP Megatron GPT model (TP=1, PP=1) or an HF Llama-style CausalLM."""
    if isinstance(model, ModelParts):
        return model
    if hasattr(model, "decoder") or hasattr(getattr(model, "module", None), "decoder"):
        return _megatron_parts(model)
    if hasattr(model, "lm_head") and hasattr(model, "model"):
        return _hf_parts(model)
    raise ValueError(f"{type(model).__name__} is neither a Megatron GPT model nor an HF Llama-style CausalLM")


def logits(parts: ModelParts, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` for ``tokens [batch, seq]`` (causal, no padding).

    A Megatron model's padding rows are cut off, so perplexities are over the tokenizer's vocabulary,
    as for the model's HF export (which drops those rows), not over the padded one training used.
    """
    if parts.kind == "megatron":
        pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        out = parts.model(tokens, pos, None)
        return out if parts.vocab_size is None else out[..., : parts.vocab_size]
    return parts.model(input_ids=tokens, use_cache=False).logits
