"""OSP model parts: SSNorm, EmbProj, layer specs, the GPT builder and presets."""

from megatron_osp.models.config import ModelConfig
from megatron_osp.models.embproj import EmbeddingProjection
from megatron_osp.models.gpt import OSPGPTModel, build_gpt_model, transformer_config
from megatron_osp.models.layer_specs import gpt_block_spec, gpt_layer_spec
from megatron_osp.models.presets import PRESETS, get_preset
from megatron_osp.models.ssnorm import SSNorm

__all__ = [
    "ModelConfig",
    "EmbeddingProjection",
    "OSPGPTModel",
    "PRESETS",
    "SSNorm",
    "build_gpt_model",
    "get_preset",
    "gpt_block_spec",
    "gpt_layer_spec",
    "transformer_config",
]
