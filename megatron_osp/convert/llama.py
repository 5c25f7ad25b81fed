"""The logical (TP=1, PP=1) Megatron GPT model <-> Hugging Face ``LlamaForCausalLM`` tensors.

Pure tensor mapping, no I/O and no process groups, so both directions are testable in memory.

Megatron -> HF folds the OSP-only pieces away, so the export is a plain Llama:

* SSNorm's scalar gain ``g`` becomes the RMSNorm vector ``g * ones(h)`` (RMSNorm weights are copied);
* EmbProj's input map ``P_in`` (x -> x P_in^T after the lookup) folds into the embedding,
  ``E' = E P_in^T``; its output map ``P_out`` (after the final norm) folds into the head,
  ``W' = W P_out``. With tied embeddings the two folded matrices differ, so the export is untied;
* the fused ``linear_qkv`` (per query group: that group's query heads, then its key head, then its
  value head) is split into ``q_proj``/``k_proj``/``v_proj``; ``linear_fc1`` = [gate; up] into
  ``gate_proj``/``up_proj``; the vocabulary padding rows are dropped.

Folds are computed in float64 and rounded once to the export dtype. HF -> Megatron is the exact
inverse for RMSNorm models (no arithmetic, only copies and concatenations), optionally with identity
EmbProj maps, so HF -> Megatron -> HF returns the same bits.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_osp.models.config import ModelConfig

__all__ = [
    "ExportError",
    "check_exportable",
    "megatron_to_hf",
    "hf_to_megatron",
    "llama_config_kwargs",
    "model_config_from_llama",
]

_EMB = "embedding.word_embeddings.weight"
_OUT = "output_layer.weight"
_FINAL_NORM = "decoder.final_layernorm.weight"
_P_IN = "embedding_projection.weight"
_P_OUT = "output_projection.weight"


class ExportError(ValueError):
    """A model or config that the Llama format cannot represent (the message names the option)."""


# ---------------------------------------------------------------------------------- checks
def check_exportable(model: ModelConfig, tconfig=None, *, position_embedding_type: str = "rope",
                     rotary_percent: float = 1.0) -> None:
    """ExportError naming every option of ``model`` / its TransformerConfig that Llama lacks."""
    problems = []
    if model.qk_layernorm:
        problems.append("model.qk_layernorm=true (Llama has no query/key norm)")
    if position_embedding_type != "rope":
        problems.append(f"position_embedding_type={position_embedding_type!r} (Llama uses RoPE)")
    if rotary_percent != 1.0:
        problems.append(f"rotary_percent={rotary_percent} (Llama rotates the whole head)")
    if tconfig is not None:
        import torch.nn.functional as F

        if tconfig.normalization != "RMSNorm":
            problems.append(f"normalization={tconfig.normalization!r} (Llama uses RMSNorm)")
        if tconfig.add_bias_linear or tconfig.add_qkv_bias:
            problems.append(
                f"add_bias_linear={tconfig.add_bias_linear}, add_qkv_bias={tconfig.add_qkv_bias} "
                "(biases: the exporter writes bias-free Llama layers)"
            )
        if not tconfig.gated_linear_unit or tconfig.activation_func is not F.silu:
            problems.append(
                f"gated_linear_unit={tconfig.gated_linear_unit}, activation_func="
                f"{getattr(tconfig.activation_func, '__name__', tconfig.activation_func)} (Llama's MLP is SwiGLU)"
            )
        if getattr(tconfig, "rotary_interleaved", False):
            problems.append("rotary_interleaved=true (HF Llama rotates halves, not interleaved pairs)")
        if getattr(tconfig, "num_moe_experts", None):
            problems.append(f"num_moe_experts={tconfig.num_moe_experts} (Llama is dense)")
    if problems:
        raise ExportError("cannot export to LlamaForCausalLM: " + "; ".join(problems))


def _groups(model: ModelConfig) -> int:
    return model.num_query_groups or model.num_attention_heads


def _head_dim(model: ModelConfig) -> int:
    return model.hidden_size // model.num_attention_heads


# ---------------------------------------------------------------------------------- QKV layout
def split_qkv(qkv: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's per-group [q heads of the group; k; v] rows -> (q, k, v) weight matrices."""
    groups, d = _groups(model), _head_dim(model)
    per_group = model.num_attention_heads // groups
    expected = (groups * (per_group + 2) * d, model.hidden_size)
    if tuple(qkv.shape) != expected:
        raise ExportError(f"linear_qkv has shape {tuple(qkv.shape)}, the config implies {expected}")
    blocks = qkv.reshape(groups, (per_group + 2) * d, -1)
    q, k, v = torch.split(blocks, [per_group * d, d, d], dim=1)
    return q.reshape(-1, qkv.shape[1]), k.reshape(-1, qkv.shape[1]), v.reshape(-1, qkv.shape[1])


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    groups, d = _groups(model), _head_dim(model)
    h = q.shape[1]
    blocks = torch.cat([q.reshape(groups, -1, h), k.reshape(groups, d, h), v.reshape(groups, d, h)], dim=1)
    return blocks.reshape(-1, h)


# ---------------------------------------------------------------------------------- Megatron -> HF
def _norm_vector(weight: torch.Tensor, hidden: int, name: str) -> torch.Tensor:
    if weight.numel() == 1:  # SSNorm: one scalar gain
        return weight.reshape(1).expand(hidden).clone()
    if tuple(weight.shape) != (hidden,):
        raise ExportError(f"{name} has shape {tuple(weight.shape)}, expected (1,) or ({hidden},)")
    return weight.clone()


def megatron_to_hf(logical: dict[str, torch.Tensor], model: ModelConfig,
                   dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], bool]:
    """HF ``LlamaForCausalLM`` state dict from a logical Megatron state dict.

    Returns ``(tensors, tie_word_embeddings)``; with tied output the state dict has no ``lm_head``.
    Every Megatron tensor must be used: anything left over (a bias, a qk norm) is an ExportError.
    """
    src = {k: v for k, v in logical.items() if not k.endswith("._extra_state")}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise ExportError(f"the checkpoint has no tensor {name!r}")
        used.add(name)
        return src[name].detach().to("cpu")

    h, v = model.hidden_size, model.vocab_size
    out: dict[str, torch.Tensor] = {}
    emb = take(_EMB)
    if emb.shape[0] < v or emb.shape[1] != h:
        raise ExportError(f"{_EMB} has shape {tuple(emb.shape)}, expected at least ({v}, {h})")
    emb = emb[:v]
    tied = not model.untie_embeddings_and_output_weights
    head = emb if tied else take(_OUT)[:v]
    if model.embedding_projection:
        p_in, p_out = take(_P_IN).double(), take(_P_OUT).double()
        out["model.embed_tokens.weight"] = (emb.double() @ p_in.T).to(dtype)
        out["lm_head.weight"] = (head.double() @ p_out).to(dtype)
        tied = False
    else:
        out["model.embed_tokens.weight"] = emb.to(dtype)
        if not tied:
            out["lm_head.weight"] = head.to(dtype)
    out["model.norm.weight"] = _norm_vector(take(_FINAL_NORM), h, _FINAL_NORM).to(dtype)
    for i in range(model.num_layers):
        m, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, vv = split_qkv(take(m + "self_attention.linear_qkv.weight"), model)
        gate, up = take(m + "mlp.linear_fc1.weight").chunk(2, dim=0)
        pieces = {
            "input_layernorm.weight": _norm_vector(take(m + "input_layernorm.weight"), h, m + "input_layernorm.weight"),
            "self_attn.q_proj.weight": q,
            "self_attn.k_proj.weight": k,
            "self_attn.v_proj.weight": vv,
            "self_attn.o_proj.weight": take(m + "self_attention.linear_proj.weight"),
            "post_attention_layernorm.weight": _norm_vector(
                take(m + "pre_mlp_layernorm.weight"), h, m + "pre_mlp_layernorm.weight"),
            "mlp.gate_proj.weight": gate,
            "mlp.up_proj.weight": up,
            "mlp.down_proj.weight": take(m + "mlp.linear_fc2.weight"),
        }
        for name, tensor in pieces.items():
            out[hf + name] = tensor.to(dtype).contiguous()
    left = sorted(set(src) - used - ({_OUT} if not model.untie_embeddings_and_output_weights else set()))
    if left:
        raise ExportError(f"cannot export to LlamaForCausalLM: no Llama tensor for {', '.join(left)}")
    bad = [k for k, t in out.items() if not bool(torch.isfinite(t).all())]
    if bad:
        source_bad = [k for k, t in src.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        why = (f"the checkpoint's {', '.join(source_bad[:3])} already hold NaN or inf (a diverged run?)" if source_bad
               else f"values exceed the range of {str(dtype).removeprefix('torch.')} (export in a wider --dtype)")
        raise ExportError(f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} would be written with NaN or inf: "
                          f"{why}")
    return {k: t.contiguous() for k, t in out.items()}, tied


# ---------------------------------------------------------------------------------- HF -> Megatron
def hf_to_megatron(hf: dict[str, torch.Tensor], model: ModelConfig, padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """Logical Megatron state dict from an HF Llama state dict (``model`` from
    :func:`model_config_from_llama`). Padding rows are zero; EmbProj maps (if configured) identity."""
    if model.normalization != "rmsnorm":
        raise ValueError("importing from Llama needs model.normalization='rmsnorm' (a vector gain per norm)")
    src = {k.removeprefix("model."): t for k, t in hf.items()}
    used: set[str] = set()
    shapes = _llama_shapes(model)

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise ValueError(f"the Hugging Face model has no tensor {name!r}")
        used.add(name)
        dims = shapes.get(name.split(".", 2)[-1] if name.startswith("layers.") else name)
        if dims is not None and tuple(src[name].shape) != tuple(v for v, _ in dims):
            raise ValueError(
                f"the Hugging Face tensor {name} has shape {tuple(src[name].shape)}, but config.json implies "
                f"({', '.join(f'{field}={v}' for v, field in dims)}): the weights and config.json do not match")
        return src[name]

    def pad(t: torch.Tensor, name: str) -> torch.Tensor:
        if tuple(t.shape) != (model.vocab_size, model.hidden_size):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({model.vocab_size}, {model.hidden_size})")
        rows = padded_vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros(rows, t.shape[1])]) if rows else t

    out = {_EMB: pad(take("embed_tokens.weight"), "embed_tokens.weight")}
    if model.untie_embeddings_and_output_weights:
        out[_OUT] = pad(take("lm_head.weight"), "lm_head.weight")
    else:
        src.pop("lm_head.weight", None)  # tied: some files repeat it
    out[_FINAL_NORM] = take("norm.weight")
    for i in range(model.num_layers):
        m, hf_ = f"decoder.layers.{i}.", f"layers.{i}."
        out[m + "input_layernorm.weight"] = take(hf_ + "input_layernorm.weight")
        out[m + "self_attention.linear_qkv.weight"] = merge_qkv(
            take(hf_ + "self_attn.q_proj.weight"), take(hf_ + "self_attn.k_proj.weight"),
            take(hf_ + "self_attn.v_proj.weight"), model)
        out[m + "self_attention.linear_proj.weight"] = take(hf_ + "self_attn.o_proj.weight")
        out[m + "pre_mlp_layernorm.weight"] = take(hf_ + "post_attention_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [take(hf_ + "mlp.gate_proj.weight"), take(hf_ + "mlp.up_proj.weight")], dim=0)
        out[m + "mlp.linear_fc2.weight"] = take(hf_ + "mlp.down_proj.weight")
    left = sorted(k for k in set(src) - used if not k.endswith("rotary_emb.inv_freq"))
    if left:
        raise ValueError(f"the Hugging Face model has tensors a Llama import cannot place: {', '.join(left)}")
    if model.embedding_projection:
        eye = torch.eye(model.hidden_size, dtype=out[_EMB].dtype)
        out[_P_IN], out[_P_OUT] = eye.clone(), eye.clone()
    return out


def _llama_shapes(model: ModelConfig) -> dict[str, tuple[tuple[int, str], ...]]:
    """HF tensor name (``layers.N.`` removed) -> its shape as (size, config.json field) pairs."""
    h, f, heads, groups, d = (model.hidden_size, model.ffn_hidden_size, model.num_attention_heads,
                              _groups(model), _head_dim(model))
    hid, ffn = (h, "hidden_size"), (f, "intermediate_size")
    q, kv = (heads * d, "num_attention_heads*head_dim"), (groups * d, "num_key_value_heads*head_dim")
    return {"norm.weight": (hid,), "input_layernorm.weight": (hid,), "post_attention_layernorm.weight": (hid,),
            "self_attn.q_proj.weight": (q, hid), "self_attn.k_proj.weight": (kv, hid),
            "self_attn.v_proj.weight": (kv, hid), "self_attn.o_proj.weight": (hid, q),
            "mlp.gate_proj.weight": (ffn, hid), "mlp.up_proj.weight": (ffn, hid), "mlp.down_proj.weight": (hid, ffn)}


# ---------------------------------------------------------------------------------- configs
def llama_config_kwargs(model: ModelConfig, *, tie_word_embeddings: bool, dtype: torch.dtype,
                        bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """Keyword arguments for ``transformers.LlamaConfig`` describing ``model``."""
    return dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=_groups(model),
        head_dim=_head_dim(model),
        hidden_act="silu",
        max_position_embeddings=model.seq_length,
        rms_norm_eps=model.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


def model_config_from_llama(cfg, *, embedding_projection: bool = False, seq_length: int | None = None,
                            make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """ModelConfig (RMSNorm, optionally identity EmbProj) for an HF ``LlamaConfig``; ValueError naming
    the HF field when the Megatron model cannot reproduce it."""
    problems = []
    if getattr(cfg, "model_type", "llama") != "llama":
        problems.append(f"model_type={cfg.model_type!r} (only 'llama' is supported)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (Megatron model uses SwiGLU: 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            problems.append(f"{flag}=true (the Megatron model has no biases)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        problems.append(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters.rope_type={rope['rope_type']!r} (only unscaled RoPE)")
    if problems:
        raise ValueError("cannot import this Hugging Face model: " + "; ".join(problems))
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return ModelConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads or cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        seq_length=cfg.max_position_embeddings if seq_length is None else seq_length,
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        normalization="rmsnorm",
        embedding_projection=embedding_projection,
        qk_layernorm=False,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        layernorm_epsilon=cfg.rms_norm_eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def export_model_config(model: ModelConfig) -> ModelConfig:
    """The config to rebuild a checkpoint's model in one CPU process for export (local kernels)."""
    return dataclasses.replace(model, transformer_impl="local", hidden_dropout=0.0, attention_dropout=0.0)
