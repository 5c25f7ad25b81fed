"""Megatron-OSP checkpoint (any TP/PP layout) -> Hugging Face ``LlamaForCausalLM`` directory.

The checkpoint's RunConfig rebuilds the model at TP=1, PP=1 in this one process, and
``load_model_weights`` reshards the saved shards into it, so the export never has to know the layout
that saved it. The logical weights then go through ``convert/llama.py`` (folding SSNorm and EmbProj,
un-fusing QKV and SwiGLU, dropping the vocab padding).

The directory is written under a temporary name next to the target and renamed into place once
complete, so a killed export never leaves something that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megatron_osp.convert.llama import ExportError, check_exportable, export_model_config, llama_config_kwargs, megatron_to_hf

__all__ = ["export_checkpoint", "write_hf_directory", "save_tokenizer", "parse_size", "DTYPES", "ExportError"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"--max-shard-size: expected a size like 5GB, 500MB or 2GiB, got {text!r}")
    return int(value * _UNITS[unit])


# ---------------------------------------------------------------------------------- writing
def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in key order: a new file when the next tensor would overflow the current one."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards = _shard(tensors, max_bytes)
    if len(shards) == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def save_tokenizer(tokenizer_model: str | os.PathLike, directory: Path) -> None:
    """A SentencePiece ``.model`` -> ``tokenizer.json`` + ``tokenizer_config.json`` (transformers'
    own converter, offline), plus the ``.model`` itself as ``tokenizer.model`` (llama.cpp reads it).

    A directory with a ``tokenizer.json`` (an HF tokenizer) is copied as it is."""
    src = Path(tokenizer_model)
    if src.is_dir():
        if not (src / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer directory {src} has no tokenizer.json")
        for f in src.iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens_map")):
                shutil.copy2(f, directory / f.name)
        return
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer model {src} does not exist")
    if src.suffix == ".json":
        shutil.copy2(src, directory / "tokenizer.json")
        return
    from transformers import AutoTokenizer

    staging = directory / ".tokenizer_src"
    staging.mkdir()
    try:
        shutil.copy2(src, staging / "tokenizer.model")
        # The generic converter reproduces SentencePiece's own encoding (LlamaTokenizer's
        # legacy=False rules differ on newlines and repeated spaces).
        tok = AutoTokenizer.from_pretrained(str(staging), local_files_only=True)
        tok.save_pretrained(str(directory))
    finally:
        shutil.rmtree(staging)
    shutil.copy2(src, directory / "tokenizer.model")
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # readable by transformers 4.x and 5.x
    cfg.pop("is_local", None)
    cfg.pop("local_files_only", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _special_ids(tokenizer_model) -> tuple[int | None, int | None]:
    if tokenizer_model is None or not str(tokenizer_model).endswith(".model"):
        return None, None
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    bos, eos = sp.bos_id(), sp.eos_id()
    return (bos if bos >= 0 else None), (eos if eos >= 0 else None)


def write_hf_directory(out_dir, tensors, model_cfg, *, tie_word_embeddings: bool, dtype: torch.dtype,
                       max_shard_size: str | int = "5GB", tokenizer_model=None, overwrite: bool = False) -> Path:
    """Write config, generation config, (sharded) safetensors and tokenizer atomically to ``out_dir``."""
    from transformers import GenerationConfig, LlamaConfig

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output {out} exists and is not empty (pass --overwrite to replace it)")
    max_bytes = parse_size(max_shard_size)
    bos, eos = _special_ids(tokenizer_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        config = LlamaConfig(**llama_config_kwargs(
            model_cfg, tie_word_embeddings=tie_word_embeddings, dtype=dtype, bos_token_id=bos, eos_token_id=eos))
        config.to_json_file(str(tmp / "config.json"))
        _add_legacy_keys(tmp / "config.json", config)
        GenerationConfig(bos_token_id=bos, eos_token_id=eos, do_sample=False).save_pretrained(str(tmp))
        _write_weights(tensors, tmp, max_bytes)
        if tokenizer_model is not None:
            save_tokenizer(tokenizer_model, tmp)
        _readable_by_all(tmp)
        if out.exists():  # --overwrite: swap in the complete new directory, then drop the old one
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _add_legacy_keys(path: Path, config) -> None:
    """transformers 5 writes ``rope_parameters`` and ``dtype``; transformers 4.x, vLLM and llama.cpp's
    GGUF converter read ``rope_theta`` and ``torch_dtype`` (and silently default theta to 1e4)."""
    data = json.loads(path.read_text())
    data.setdefault("rope_theta", data.get("rope_parameters", {}).get("rope_theta"))
    data.setdefault("torch_dtype", data.get("dtype"))
    path.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")


def _readable_by_all(directory: Path) -> None:
    """safetensors writes 0600 files; a published model directory gets the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


# ---------------------------------------------------------------------------------- export
def export_checkpoint(ckpt_path, out_dir, *, dtype: str = "float32", max_shard_size: str | int = "5GB",
                      tokenizer_model=None, overwrite: bool = False, log=print) -> Path:
    """Export a megatron-osp checkpoint (save dir or ``iter_N``) to an HF Llama directory.

    ``tokenizer_model`` defaults to the run's ``data.tokenizer_model`` when that file exists.
    Raises CheckpointError (not a checkpoint, missing shard) or ExportError (unrepresentable config)
    before any model is built. Initialises a one-process world (TP=1, PP=1) if none is.
    """
    from megatron_osp import parallel, platform
    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.training.checkpoint import (
        load_model_weights, model_config_for_one_process, read_run_config, resolve_checkpoint,
    )

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    parse_size(max_shard_size)
    ckpt = resolve_checkpoint(ckpt_path)
    run = read_run_config(ckpt)
    model_cfg = export_model_config(model_config_for_one_process(ckpt))
    tconfig = transformer_config(model_cfg, params_dtype=torch.float32, use_cpu_initialization=True)
    check_exportable(model_cfg, tconfig)
    if tokenizer_model is None and run.data.tokenizer_model and Path(run.data.tokenizer_model).is_file():
        tokenizer_model = run.data.tokenizer_model
    elif tokenizer_model is None and run.data.tokenizer_model:
        log(f"warning: the run's tokenizer {run.data.tokenizer_model} does not exist here; "
            "exporting without a tokenizer (pass --tokenizer)")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output {out} exists and is not empty (pass --overwrite to replace it)")

    parallel.init_distributed(1, 1)
    platform.seed_everything(run.train.seed)
    model = build_gpt_model(model_cfg, tconfig, pre_process=True, post_process=True,
                            seed=run.train.seed, layout_independent_init=False)
    state = load_model_weights(str(ckpt), [model])
    logical = {name: p.detach() for name, p in model.named_parameters()}
    tensors, tied = megatron_to_hf(logical, run.model, DTYPES[dtype])
    path = write_hf_directory(out, tensors, run.model, tie_word_embeddings=tied, dtype=DTYPES[dtype],
                              max_shard_size=max_shard_size, tokenizer_model=tokenizer_model, overwrite=overwrite)
    layout = state.get("layout", {})
    log(f"exported {ckpt} (iteration {state.get('iteration')}, saved at TP={layout.get('tensor_parallel_size')} "
        f"PP={layout.get('pipeline_parallel_size')}) -> {path}")
    return path

