"""Hugging Face Llama-architecture directory -> megatron-osp checkpoint, to continue pretraining.

The result is a weights-only checkpoint (``save_checkpoint`` without optimizer), which a run loads
with ``train.load=<dir>`` and a fresh optimizer. The model is a per-channel RMSNorm model (a Llama
has vector norm gains, which SSNorm cannot hold); ``embedding_projection=True`` adds identity EmbProj
maps, so the imported model computes exactly what the HF model does while EmbProj trains from there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megatron_osp.convert.hf_tokenizer import (
    IMPORTED_IDS,
    IMPORTED_TOKENIZER,
    SPECIAL_KEYS,
    copy_hf_tokenizer,
    special_ids_of_hf_dir,
    tokenizer_vocab_size,
)
from megatron_osp.convert.llama import hf_to_megatron, model_config_from_llama
from megatron_osp.convert.output_safety import check_import_output

__all__ = ["read_hf_state_dict", "import_hf"]


def read_hf_state_dict(hf_dir) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (``model.safetensors`` or a sharded index); names the file
    that is missing."""
    from safetensors import SafetensorError
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
        try:
            out.update(load_file(str(d / name)))
        except SafetensorError as e:  # truncated or not a safetensors file
            raise ValueError(f"{d / name} cannot be read as safetensors ({e}): a damaged or incomplete "
                             "download?") from None
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
    from megatron_osp.training.checkpoint import save_checkpoint
    from megatron_osp.training.config import DataSettings, RunConfig, TrainSettings
    from megatron_osp.training.tokenizer_record import file_record
    from megatron_osp.training.validation import check_config

    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a Hugging Face model directory (no config.json)")
    check_import_output(d, save_dir)
    sp_model, hf_tokenizer = _tokenizer_source(d, tokenizer_model)
    ids = _special_ids(d, hf_tokenizer)
    eos = ids.get("eos_token_id")
    eod_id = eos[0] if isinstance(eos, list) and eos else eos
    try:
        hf_cfg = AutoConfig.from_pretrained(str(d), local_files_only=True)
    except OSError as e:  # transformers' word for a config.json that is not JSON
        raise ValueError(str(e)) from None
    model_cfg = model_config_from_llama(hf_cfg, embedding_projection=embedding_projection,
                                        seq_length=seq_length,
                                        make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    # Absolute paths: the checkpoint is used from other directories (training, export).
    data = DataSettings(tokenizer_model=str(sp_model) if sp_model else None,
                        eod_id=eod_id if sp_model is None and isinstance(eod_id, int) else None)
    run = RunConfig(model=model_cfg, data=data, train=TrainSettings(seed=seed))
    # What training would refuse (--seq-length 0, --make-vocab-size-divisible-by 0, ...), refused now,
    # by field, before anything is read or written.
    check_config(run, source=f"the model imported from {d}")
    source = sp_model or hf_tokenizer  # recorded: a run started from it refuses data of another tokenizer
    # A file that is no tokenizer (a typo'd --tokenizer) or one with ids past the vocabulary used to be
    # recorded as the checkpoint's tokenizer; the export then refused the checkpoint.
    if source is not None and (pieces := tokenizer_vocab_size(source)) > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {source} has {pieces} tokens, more than the vocabulary of {model_cfg.vocab_size} "
                         f"of {d} (config.json vocab_size): it is not this model's tokenizer")
    hf = read_hf_state_dict(d)
    logical = hf_to_megatron(hf, model_cfg, model_cfg.padded_vocab_size(1))

    parallel.init_distributed(1, 1)
    platform.seed_everything(seed)
    model = build_gpt_model(model_cfg, transformer_config(model_cfg, params_dtype=torch.float32),
                            pre_process=True, post_process=True, seed=seed, layout_independent_init=False)
    load_logical_state_dict(model, logical)
    path = save_checkpoint(save_dir, 0, [model], run, save_rng=False, tokenizer=source and file_record(source))
    if hf_tokenizer is not None:
        _store_hf_tokenizer(hf_tokenizer, ids, Path(save_dir))
    log(f"imported {d} ({model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, vocab "
        f"{model_cfg.vocab_size}, EmbProj {'identity' if embedding_projection else 'off'}) -> {path}")
    return path


def _tokenizer_source(d: Path, tokenizer_model) -> tuple[Path | None, Path | None]:
    """(SentencePiece model, HF tokenizer), absolute; at most one is set. ``--tokenizer`` wins, then
    the directory's tokenizer.model, then its tokenizer.json."""
    if tokenizer_model is not None:
        p = Path(tokenizer_model)
        if not p.exists():
            raise FileNotFoundError(f"--tokenizer: {tokenizer_model} does not exist")
        if p.is_dir() and not (p / "tokenizer.json").is_file():
            raise FileNotFoundError(f"--tokenizer: directory {tokenizer_model} has no tokenizer.json")
        p = p.resolve()
        return (None, p) if p.is_dir() or p.suffix == ".json" else (p, None)
    if (d / "tokenizer.model").is_file():
        return (d / "tokenizer.model").resolve(), None
    if (d / "tokenizer.json").is_file():
        return None, d.resolve()
    return None, None


def _special_ids(d: Path, hf_tokenizer: Path | None) -> dict:
    """The model's bos/eos/pad/unk ids (its config files win), completed from the tokenizer's own."""
    if hf_tokenizer is None:
        return {}
    ids = special_ids_of_hf_dir(d)
    if hf_tokenizer.is_dir() or hf_tokenizer.name == "tokenizer.json":
        own = special_ids_of_hf_dir(hf_tokenizer if hf_tokenizer.is_dir() else hf_tokenizer.parent)
        ids = {k: ids[k] if ids.get(k) is not None else own.get(k) for k in SPECIAL_KEYS}
    return ids


def _store_hf_tokenizer(src: Path, ids: dict, save_dir: Path) -> None:
    """A copy of the HF tokenizer and the model's special ids beside the checkpoint, so an export of
    it (or of a run started from it) finds them wherever it runs."""
    dest = save_dir / IMPORTED_TOKENIZER
    tmp = save_dir / f".{IMPORTED_TOKENIZER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    copy_hf_tokenizer(src, tmp)
    (tmp / IMPORTED_IDS).write_text(json.dumps(ids, indent=2) + "\n")
    os.replace(tmp, dest)
