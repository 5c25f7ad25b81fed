"""Layer specs: which module fills each norm slot of a Megatron-Core GPT layer.

SSNorm is a spec change, not a fork of Megatron's layer: we take Megatron-Core's own layer spec for
the chosen backend and put our norm class in every norm slot (input, pre-MLP, q/k, final).

Backends:
- ``local``: Megatron-Core modules only (runs anywhere, including CPU).
- ``transformer_engine``: TE linears and attention. With RMSNorm we use Megatron's TE spec as is
  (norm fused into the following linear). SSNorm cannot be fused into TE's LayerNormLinear, so
  the QKV and FC1 slots get plain TE column-parallel linears and the norms become SSNorm modules.
"""

from __future__ import annotations

import copy
import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_osp.models.ssnorm import SSNORM_KERNELS, SSNorm

NORMALIZATIONS = ("rmsnorm", "ssnorm")
BACKENDS = ("auto", "local", "transformer_engine")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(backend: str) -> str:
    """'auto' means TE when it is importable (and CUDA is there), the local spec otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"model.transformer_impl must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        import torch

        use_te = transformer_engine_available() and torch.cuda.is_available()
        return "transformer_engine" if use_te else "local"
    if backend == "transformer_engine" and not transformer_engine_available():
        raise ImportError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not installed; "
            "install megatron-osp[te] or use transformer_impl=local"
        )
    return backend


def ssnorm_class(kernel: str) -> type[SSNorm]:
    """SSNorm's module for ``model.ssnorm_kernel`` (see models/ssnorm.py)."""
    if kernel not in SSNORM_KERNELS:
        raise ValueError(f"model.ssnorm_kernel must be one of {tuple(SSNORM_KERNELS)}, got {kernel!r}")
    return SSNORM_KERNELS[kernel]


def gpt_layer_spec(normalization: str, backend: str = "local", qk_layernorm: bool = False,
                   ssnorm_kernel: str = "auto") -> ModuleSpec:
    """A TransformerLayer spec with RMSNorm (Megatron's) or SSNorm in every norm slot."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"model.normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    norm = ssnorm_class(ssnorm_kernel)
    backend = resolve_backend(backend)
    if backend == "local":
        spec = copy.deepcopy(
            get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
        )
    else:
        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm))
    if normalization == "rmsnorm":
        return spec

    layer = spec.submodules
    attention = layer.self_attention.submodules
    mlp = layer.mlp.submodules
    if backend == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        attention.linear_qkv = TEColumnParallelLinear
        mlp.linear_fc1 = TEColumnParallelLinear
    layer.input_layernorm = norm
    layer.pre_mlp_layernorm = norm
    if qk_layernorm:
        attention.q_layernorm = norm
        attention.k_layernorm = norm
    # Megatron's TE spec remaps the fused norm's checkpoint keys; the unfused norms need no remap.
    layer.sharded_state_dict_keys_map = {}
    return spec


def final_norm_class(normalization: str, backend: str, ssnorm_kernel: str = "auto"):
    if normalization == "ssnorm":
        return ssnorm_class(ssnorm_kernel)
    if resolve_backend(backend) == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider().layer_norm(rms_norm=True, for_qk=False)


def gpt_block_spec(
    normalization: str, backend: str, num_layers_in_stage: int, qk_layernorm: bool = False,
    ssnorm_kernel: str = "auto",
) -> TransformerBlockSubmodules:
    """The decoder block for one pipeline stage: its layers plus the final norm (used on the last stage)."""
    layer = gpt_layer_spec(normalization, backend, qk_layernorm, ssnorm_kernel)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * num_layers_in_stage,
        layer_norm=final_norm_class(normalization, backend, ssnorm_kernel),
    )
