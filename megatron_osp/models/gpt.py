"""The OSP GPT model: Megatron-Core's GPTModel with SSNorm by spec and EmbProj by hooks.

``build_gpt_model`` is the one place where a ``ModelConfig`` becomes Megatron objects, so the
config's ``normalization`` and ``embedding_projection`` reach the layer spec in two hops.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_osp.models.config import ModelConfig
from megatron_osp.models.embproj import EmbeddingProjection, attach_after
from megatron_osp.models.init import initialize_layout_independent
from megatron_osp.models.layer_specs import gpt_block_spec, resolve_backend

# Offsets from the run seed for the two projections' private generators.
_INPUT_PROJECTION_SEED_OFFSET = 7919
_OUTPUT_PROJECTION_SEED_OFFSET = 104729


class OSPGPTModel(GPTModel):
    """GPTModel plus the optional EmbProj pair.

    ``embedding_projection`` (first stage) acts on the embedding output before layer 1;
    ``output_projection`` (last stage) on the final norm's output before the output layer.
    Both are parameters of this module, so checkpoints and optimizers see them like any other.
    """

    def __init__(self, *args, embedding_projection: bool = False, projection_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.unpadded_vocab_size: int | None = None  # the tokenizer's (build_gpt_model sets it)
        self.has_embedding_projection = embedding_projection
        if not embedding_projection:
            return
        cfg = self.config
        make = lambda offset: EmbeddingProjection(  # noqa: E731
            cfg.hidden_size,
            seed=projection_seed + offset,
            params_dtype=cfg.params_dtype,
            sequence_parallel=cfg.sequence_parallel,
        )
        if self.pre_process:
            self.embedding_projection = make(_INPUT_PROJECTION_SEED_OFFSET)
            attach_after(self.embedding, self.embedding_projection)
        if self.post_process:
            if self.decoder.final_layernorm is None:
                raise ValueError("embedding_projection needs the final norm on the last stage")
            self.output_projection = make(_OUTPUT_PROJECTION_SEED_OFFSET)
            attach_after(self.decoder.final_layernorm, self.output_projection)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Megatron-Core's vocab-parallel cross entropy over the tokenizer's vocabulary only.

        The output layer has ``padded_vocab_size(TP)`` rows (a multiple of
        make_vocab_size_divisible_by x TP); the rows past the tokenizer's vocabulary are never a
        target, and evaluation and the HF export drop them. Left in the softmax they took
        probability in the loss, so the loss depended on the TP size (vocab 350: 384 rows at TP=1,
        512 at TP=2, step-1 loss 5.970 against 6.257) and was not the loss evaluation reports.
        Their logits are set to the dtype's lowest value here: they take no probability and get no
        gradient, on every layout.
        """
        return super().compute_language_model_loss(labels, mask_padded_vocab(logits, self.unpadded_vocab_size))

    # Top-level children in the order the forward pass runs them (EmbProj is registered last).
    FORWARD_ORDER = ("embedding", "embedding_projection", "decoder", "output_projection", "output_layer")

    def named_parameters_in_forward_order(self):
        """``named_parameters()`` sorted by when the forward pass first uses them, so that reversed
        it is the order their gradients become ready (what gradient buckets must follow: with
        registration order the input EmbProj, whose gradient comes last, would hold back every
        bucket after the output layer's). Children not in FORWARD_ORDER keep their place at the end."""
        rank = {name: i for i, name in enumerate(self.FORWARD_ORDER)}
        named = list(self.named_parameters())
        order = sorted(range(len(named)), key=lambda i: (rank.get(named[i][0].split(".", 1)[0], len(rank)), i))
        return [named[i] for i in order]


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """``logits`` (this TP rank's slice of the padded vocabulary, last dimension) with the entries
    of rows ``>= vocab_size`` set to the dtype's lowest value, in place (the loss is the logits'
    last use, and a copy would be one more logits-sized tensor at the step's peak); untouched when
    this rank holds no padding or ``vocab_size`` is None."""
    if vocab_size is None:
        return logits
    local = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * local
    if first + local <= vocab_size:
        return logits
    padded = torch.arange(first, first + local, device=logits.device) >= vocab_size
    return logits.masked_fill_(padded, torch.finfo(logits.dtype).min)


def _importable(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def transformer_config(
    model: ModelConfig,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    virtual_pipeline_size: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool | None = None,
    recompute: str = "none",
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    **overrides,
) -> TransformerConfig:
    """Megatron's TransformerConfig for a Llama-style model (RMSNorm, SwiGLU, RoPE, no biases).

    ``recompute`` and its two options are ``train.recompute*`` (see :func:`recompute_settings`).
    ``virtual_pipeline_size`` > 1 splits each pipeline stage into that many model chunks
    (interleaved 1F1B, see :func:`virtual_pipeline_settings`).
    """
    on_cpu = not torch.cuda.is_available()
    groups = model.num_query_groups or model.num_attention_heads
    if groups % tensor_parallel_size:
        raise ValueError(
            f"parallel.tensor_parallel_size={tensor_parallel_size} does not divide the number of "
            f"query groups ({groups}) of the model"
        )
    if model.num_layers % pipeline_parallel_size:
        raise ValueError(
            f"parallel.pipeline_parallel_size={pipeline_parallel_size} does not divide "
            f"model.num_layers={model.num_layers}"
        )
    if model.num_layers % (pipeline_parallel_size * virtual_pipeline_size):
        raise ValueError(
            f"parallel.pipeline_parallel_size={pipeline_parallel_size} x parallel.virtual_pipeline_size="
            f"{virtual_pipeline_size} does not divide model.num_layers={model.num_layers}"
        )
    fused = not on_cpu
    # Megatron's fused softmax needs its own CUDA extension (built with Apex/Megatron-LM); without
    # it, FusedScaleMaskSoftmax imports it anyway and fails on the first forward on a GPU.
    softmax_kernel = fused and _importable("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=groups,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.layernorm_epsilon,
        qk_layernorm=model.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        sequence_parallel=sequence_parallel and tensor_parallel_size > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu if use_cpu_initialization is None else use_cpu_initialization,
        bias_activation_fusion=False,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=softmax_kernel,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(recompute_settings(recompute, recompute_method, recompute_num_layers))
    kwargs.update(virtual_pipeline_settings(pipeline_parallel_size, virtual_pipeline_size))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def recompute_settings(recompute: str, method: str | None = None, num_layers: int | None = None) -> dict:
    """``train.recompute`` as Megatron's TransformerConfig fields (validation.py checks the values).

    - ``none``: every activation is kept (``recompute_granularity=None``).
    - ``selective``: core attention (the softmax(QK^T)V part, whose activations grow with seq^2) is
      recomputed in the backward pass; ``recompute_granularity="selective"`` with Megatron's default
      ``recompute_modules=["core_attn"]``.
    - ``full``: whole transformer layers are recomputed from their saved inputs;
      ``recompute_method`` (default uniform) and ``recompute_num_layers`` (default 1) say which.
    Recompute applies in training mode only; evaluation and kurtosis measurement never recompute.
    """
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": method or "uniform",
            "recompute_num_layers": num_layers or 1,
        }
    raise ValueError(f"train.recompute must be none, selective or full, got {recompute!r}")


def virtual_pipeline_settings(pipeline_parallel_size: int, virtual_pipeline_size: int) -> dict:
    """``parallel.virtual_pipeline_size`` as TransformerConfig fields (none when it is 1).

    Like Megatron-LM's defaults for the interleaved schedule, point-to-point transfers are posted one
    by one and overlapped with compute (``overlap_p2p_comm``) instead of batched: batched, PP=2 on
    gloo gave other losses than one process (docs/design.md, "Virtual pipeline stages"); the two
    sends of a batch to the one peer (activation forward, gradient backward) are posted in the other
    order than the peer's matching receives.
    """
    if virtual_pipeline_size == 1:
        return {}
    if pipeline_parallel_size == 1:
        raise ValueError(
            f"parallel.virtual_pipeline_size={virtual_pipeline_size} needs parallel.pipeline_parallel_size > 1"
        )
    return {
        "virtual_pipeline_model_parallel_size": virtual_pipeline_size,
        "overlap_p2p_comm": True,
        "batch_p2p_comm": False,
    }


def build_gpt_model(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    seed: int = 1234,
    layout_independent_init: bool = True,
    vp_stage: int | None = None,
) -> OSPGPTModel:
    """Build this rank's pipeline stage of the OSP GPT model (parallel state must be initialised).

    With ``layout_independent_init`` the initial weights depend only on ``seed``, not on the TP/PP
    layout (see models/init.py); otherwise Megatron-Core's own per-rank initialisation is kept.
    With virtual pipeline stages (``config.virtual_pipeline_model_parallel_size``) this builds model
    chunk ``vp_stage`` of the stage (see :func:`build_model_chunks`).
    """
    if (config.virtual_pipeline_model_parallel_size is None) != (vp_stage is None):
        raise ValueError(
            f"vp_stage={vp_stage} with virtual_pipeline_model_parallel_size="
            f"{config.virtual_pipeline_model_parallel_size}: give a chunk index exactly when the model has chunks"
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    backend = resolve_backend(model.transformer_impl)
    block = gpt_block_spec(
        model.normalization,
        backend,
        num_layers_in_stage=get_num_layers_to_build(config, vp_stage=vp_stage),
        qk_layernorm=model.qk_layernorm,
        ssnorm_kernel=model.ssnorm_kernel,
    )
    gpt = OSPGPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=model.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        embedding_projection=model.embedding_projection,
        projection_seed=seed,
        vp_stage=vp_stage,
    )
    # The tokenizer's vocabulary: rows past it are padding (never a target, dropped by the HF export),
    # so the loss masks them (compute_language_model_loss) and whatever reads logits as a
    # distribution over tokens slices to it (analysis.model_parts.logits); in muon_only, Muon's
    # embedding and output matrices are these rows only (optimizer/logical.vocab_rows).
    gpt.unpadded_vocab_size = model.vocab_size
    if layout_independent_init:
        initialize_layout_independent(gpt, seed)
    return gpt


def build_model_chunks(model: ModelConfig, config: TransformerConfig, *, seed: int = 1234) -> list[OSPGPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (a list of one without them).

    Chunk ``v`` of pipeline rank ``p`` holds layers ``[(v * PP + p) * n, (v * PP + p + 1) * n)`` with
    ``n = num_layers / (PP * V)``; the embedding is on chunk 0 of the first rank, the final norm and
    output layer on the last chunk of the last rank.
    """
    vp = config.virtual_pipeline_model_parallel_size
    if vp is None:
        return [build_gpt_model(model, config, seed=seed)]
    return [build_gpt_model(model, config, seed=seed, vp_stage=v) for v in range(vp)]
