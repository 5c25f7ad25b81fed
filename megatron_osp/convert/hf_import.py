"""Hugging Face Llama-architecture directory -> megatron-osp checkpoint, to continue pretraining.

The result is a weights-only checkpoint (``save_checkpoint`` without optimizer), which a run loads
with ``train.load=<dir>`` and a fresh optimizer. The model is a per-channel RMSNorm model (a Llama
has vector norm gains, which SSNorm cannot hold); ``embedding_projection=True`` adds identity EmbProj
maps, so the imported model computes exactly what the HF model does while EmbProj trains from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_osp.convert.llama import hf_to_megatron, model_config_from_llama

__all__ = ["read_hf_state_dict", "import_hf"]


def read_hf_state_dict(hf_dir) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (``model.safetensors`` or a sharded index); names the file
    that is missing."""
    from safetensors.torch import load_file

    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{d} has neither model.safetensors nor model.safetensors.index.json")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        if not (d / name).is_file():
            raise FileNotFoundError(f"{index} names {name}, which is missing from {d}")
        out.update(load_file(str(d / name)))
    return out


def import_hf(hf_dir, save_dir, *, embedding_projection: bool = False, seq_length: int | None = None,
              make_vocab_size_divisible_by: int = 128, tokenizer_model: str | None = None,
              seed: int = 1234, log=print) -> Path:
    """Write ``save_dir`` (a checkpoint save directory, iteration 0, weights only) from ``hf_dir``.

    Initialises a one-process world (TP=1, PP=1) if none is. Returns the iteration directory.
    """
    from transformers import AutoConfig

    from megatron_osp import parallel, platform
    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.models.layout import load_logical_state_dict
    from megatron_osp.training.checkpoint import has_checkpoint, save_checkpoint
    from megatron_osp.training.config import DataSettings, RunConfig, TrainSettings

    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a Hugging Face model directory (no config.json)")
    if has_checkpoint(save_dir):
        raise FileExistsError(f"{save_dir} already holds a checkpoint; choose an empty directory")
    hf_cfg = AutoConfig.from_pretrained(str(d), local_files_only=True)
    model_cfg = model_config_from_llama(hf_cfg, embedding_projection=embedding_projection,
                                        seq_length=seq_length,
                                        make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    hf = read_hf_state_dict(d)
    logical = hf_to_megatron(hf, model_cfg, model_cfg.padded_vocab_size(1))

    parallel.init_distributed(1, 1)
    platform.seed_everything(seed)
    model = build_gpt_model(model_cfg, transformer_config(model_cfg, params_dtype=torch.float32),
                            pre_process=True, post_process=True, seed=seed, layout_independent_init=False)
    load_logical_state_dict(model, logical)
    if tokenizer_model is None and (d / "tokenizer.model").is_file():
        tokenizer_model = str((d / "tokenizer.model").resolve())
    run = RunConfig(model=model_cfg, data=DataSettings(tokenizer_model=tokenizer_model),
                    train=TrainSettings(seed=seed))
    path = save_checkpoint(save_dir, 0, [model], run, save_rng=False)
    log(f"imported {d} ({model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, vocab "
        f"{model_cfg.vocab_size}, EmbProj {'identity' if embedding_projection else 'off'}) -> {path}")
    return path
