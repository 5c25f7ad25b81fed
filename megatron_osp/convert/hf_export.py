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

from megatron_osp.convert.hf_tokenizer import IMPORTED_TOKENIZER, save_tokenizer, tokenizer_vocab_size
from megatron_osp.convert.llama import ExportError, check_exportable, export_model_config, llama_config_kwargs, megatron_to_hf
from megatron_osp.convert.output_safety import check_outside, check_replaceable_export, export_inputs, tokenizer_input

__all__ = ["export_checkpoint", "write_hf_directory", "save_tokenizer", "parse_size", "DTYPES", "ExportError",
           "find_run_tokenizer"]

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


def write_hf_directory(out_dir, tensors, model_cfg, *, tie_word_embeddings: bool, dtype: torch.dtype,
                       max_shard_size: str | int = "5GB", tokenizer_model=None, overwrite: bool = False,
                       eod_id: int | None = None, special_tokens_in_text: str | None = None, log=print) -> Path:
    """Write config, generation config, (sharded) safetensors and tokenizer atomically to ``out_dir``.

    The special ids (bos/eos/pad/unk) come from the tokenizer (``eod_id``, the run's end-of-document
    id, stands in for a missing eos); ``special_tokens_in_text``: how the training data encoded a special
    token written in text (data/special_text.py; None: as the tokenizer's preprocessing default). An existing ``out_dir`` is replaced only with ``overwrite`` and
    only when it is a previous export; it may not hold the tokenizer."""
    from transformers import GenerationConfig, LlamaConfig

    out = Path(out_dir)
    if tokenizer_model is not None:
        check_outside(out, tokenizer_input(tokenizer_model))
    check_replaceable_export(out, overwrite)
    if out.is_symlink():  # a link to a previous export: replace the export it names and keep the link
        out = Path(os.path.realpath(out))
    max_bytes = parse_size(max_shard_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        ids = {"bos_token_id": None, "eos_token_id": eod_id, "pad_token_id": None}
        if tokenizer_model is not None:
            ids.update(save_tokenizer(tokenizer_model, tmp, eod_id=eod_id, log=log,
                                      special_tokens_in_text=special_tokens_in_text))
        config = LlamaConfig(**llama_config_kwargs(
            model_cfg, tie_word_embeddings=tie_word_embeddings, dtype=dtype, bos_token_id=ids["bos_token_id"],
            eos_token_id=ids["eos_token_id"]))
        if ids["pad_token_id"] is not None:
            config.pad_token_id = ids["pad_token_id"]
        config.to_json_file(str(tmp / "config.json"))
        _add_legacy_keys(tmp / "config.json", config)
        GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                         pad_token_id=ids["pad_token_id"], do_sample=False).save_pretrained(str(tmp))
        _write_weights(tensors, tmp, max_bytes)
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
                      tokenizer_model=None, overwrite: bool = False, write_tokenizer: bool = True,
                      log=print) -> Path:
    """Export a megatron-osp checkpoint (save dir or ``iter_N``) to an HF Llama directory.

    ``tokenizer_model`` defaults to the run's tokenizer (``find_run_tokenizer``); a tokenizer the run
    recorded but that is not here is a FileNotFoundError (``write_tokenizer=False`` exports without
    one). Raises
    CheckpointError (not a checkpoint, missing shard), ExportError (unrepresentable config, an output
    that overlaps the input or is not a previous export) or FileExistsError before any model is built. Initialises a one-process world (TP=1, PP=1) if none is.
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
    if not write_tokenizer:
        tokenizer_model = None
    elif tokenizer_model is None:
        tokenizer_model = find_run_tokenizer(run, ckpt, log, missing_ok=False)
        if tokenizer_model is None:
            log("no tokenizer is exported: the run names none (no data.tokenizer_model, no preprocessing "
                "manifest of its data.paths here records one); pass --tokenizer PATH for AutoTokenizer to load it")
    elif not Path(tokenizer_model).exists():
        raise FileNotFoundError(f"--tokenizer: {tokenizer_model} does not exist")
    if tokenizer_model is not None and (pieces := tokenizer_vocab_size(tokenizer_model)) > model_cfg.vocab_size:
        # Its ids above the vocabulary would index rows the exported embedding does not have.
        raise ExportError(f"tokenizer {tokenizer_model} has {pieces} tokens, more than the model's vocabulary of "
                          f"{model_cfg.vocab_size} (model.vocab_size of {ckpt}): it is not this model's tokenizer")
    if tokenizer_model is not None:
        check_learned_tokenizer(ckpt, run, tokenizer_model)
    # Before anything is built or written: the output may not overlap what the export reads, and
    # --overwrite replaces only a previous export.
    check_outside(out_dir, export_inputs(ckpt_path, ckpt, tokenizer_model))
    check_replaceable_export(out_dir, overwrite)
    out = Path(out_dir)

    parallel.init_distributed(1, 1)
    platform.seed_everything(run.train.seed)
    model = build_gpt_model(model_cfg, tconfig, pre_process=True, post_process=True,
                            seed=run.train.seed, layout_independent_init=False)
    state = load_model_weights(str(ckpt), [model])
    logical = {name: p.detach() for name, p in model.named_parameters()}
    tensors, tied = megatron_to_hf(logical, run.model, DTYPES[dtype])
    path = write_hf_directory(out, tensors, run.model, tie_word_embeddings=tied, dtype=DTYPES[dtype],
                              max_shard_size=max_shard_size, tokenizer_model=tokenizer_model, overwrite=overwrite,
                              eod_id=run.data.eod_id, special_tokens_in_text=data_special_text(run, log, ckpt) if tokenizer_model else None,
                              log=log)
    layout = state.get("layout", {})
    log(f"exported {ckpt} (iteration {state.get('iteration')}, saved at TP={layout.get('tensor_parallel_size')} "
        f"PP={layout.get('pipeline_parallel_size')}) -> {path}")
    return path


def check_learned_tokenizer(ckpt: Path, run, tokenizer_model) -> None:
    """ExportError when ``tokenizer_model`` encodes otherwise than the tokenizer whose ids the
    checkpoint's model learned (its train_state.json record, training/tokenizer_record.py): of one
    vocabulary size (or a smaller one) it passes the size check, and the export would load and generate
    text from the wrong tokens without a word. Not refused where either side is unknown, or where the
    two are of different kinds (a SentencePiece model and a tokenizer.json): their fingerprints cannot be
    compared, so both encode probe texts (tokenizer_record.PROBE_TEXTS) where the learned one is here, and
    different ids are refused; a tokenizer.json converted from the .model encodes alike and passes."""
    from megatron_osp.training.checkpoint import read_train_state
    from megatron_osp.training.tokenizer_record import (checkpoint_record, describe, file_record, kinds_differ,
                                                        same, same_by_encoding)

    learned, given = checkpoint_record(read_train_state(ckpt), run), file_record(tokenizer_model)
    verdict, source = same(learned, given), None
    if verdict is None and learned and given and kinds_differ(learned, given):
        source = learned.get("source")
        if not (isinstance(source, str) and os.path.isfile(source)):
            # A record of the data's manifest: the file it names, where that is still the tokenizer.
            source = data_tokenizer(run, ckpt, log=lambda *_: None)
            if source is not None and same(file_record(source), learned) is not True:
                source = None
        if source is not None:
            verdict = same_by_encoding(source, tokenizer_model)
    if verdict is False:
        named = f" ({source})" if source and source != learned.get("source") else ""
        raise ExportError(f"tokenizer {tokenizer_model} encodes differently from {describe(learned)}{named}, whose ids "
                          f"the model of {ckpt} learned: the export would read every token as another one; "
                          "pass that tokenizer with --tokenizer (or --no-tokenizer for the model alone)")


def data_special_text(run, log=print, ckpt: Path | None = None) -> str | None:
    """How the run's training data encoded special tokens written in its text, from the manifests of
    ``data.paths`` (``split`` where any dataset was made with it: training refuses to mix it with
    ``encode``; a relative entry is also looked up under ``ckpt``'s parent directories); None where no
    manifest is here to say, which is logged."""
    from megatron_osp.data import shardset, special_text

    modes, missing = set(), []
    for prefix in run.data.paths:
        try:
            recorded = shardset.recorded_tokens(_data_prefix(prefix, ckpt) or prefix)
        except (OSError, ValueError):
            recorded = {}
        if special_text.FIELD in recorded:
            modes.add(recorded[special_text.FIELD])
        else:
            missing.append(prefix)
    if missing:
        log(f"no manifest of {', '.join(missing)} is here: the exported tokenizer encodes special tokens "
            "written in text as preprocessing does by default (--special-tokens-in-text encode)")
    return "split" if "split" in modes else None


def find_run_tokenizer(run, ckpt: Path, log=print, _depth: int = 0, missing_ok: bool = True):
    """The tokenizer a run trained with: ``data.tokenizer_model`` (a relative path recorded by a run
    started elsewhere is also looked up under the checkpoint's parent directories), else the HF
    tokenizer that ``convert_from_hf`` stored with the checkpoint this run started from (followed
    through ``train.load``). None when the run has none; when it recorded one that is not here, None
    with a warning (``missing_ok``) or FileNotFoundError: an export without it would be incomplete."""
    from megatron_osp.training.checkpoint import CheckpointError, read_run_config, resolve_checkpoint

    recorded = run.data.tokenizer_model
    if recorded:
        p = Path(recorded)
        if p.exists():
            return str(p.resolve())
        if not p.is_absolute():
            for parent in Path(ckpt).resolve().parents:
                if (parent / p).exists():
                    log(f"the run recorded the relative tokenizer path {recorded}; using {parent / p}")
                    return str(parent / p)
        if not missing_ok:
            raise FileNotFoundError(
                f"the run's tokenizer {recorded} (data.tokenizer_model of {ckpt}) does not exist here: pass "
                "--tokenizer PATH, or --no-tokenizer to export the model without one")
        log(f"warning: the run's tokenizer {recorded} does not exist here; exporting without a tokenizer "
            "(pass --tokenizer)")
        return None
    imported = Path(ckpt).parent / IMPORTED_TOKENIZER
    if imported.is_dir():
        return str(imported.resolve())
    if run.train.load and _depth < 8:
        try:
            start = resolve_checkpoint(run.train.load)
            found = find_run_tokenizer(read_run_config(start), start, log, _depth + 1, missing_ok)
            if found is not None:
                return found
        except CheckpointError:
            pass
    return data_tokenizer(run, ckpt, log, missing_ok) if _depth == 0 else None


def data_tokenizer(run, ckpt: Path, log=print, missing_ok: bool = True):
    """The tokenizer file that the preprocessing manifest of the run's first dataset records (the path
    preprocessing wrote, when it is still that tokenizer: its sha256 or id fingerprint): the tokenizer of
    a run trained with ``data.eod_id`` on a tokenizer.json's output, which names no data.tokenizer_model.
    A relative ``data.paths`` entry is also looked up under the checkpoint's parent directories. None
    when no manifest is here or it names no tokenizer; a recorded tokenizer that is not here (or no longer
    that tokenizer) is None with a warning (``missing_ok``) or FileNotFoundError."""
    from megatron_osp.data import shardset
    from megatron_osp.training.tokenizer_record import file_record, same

    for entry in run.data.paths or []:
        found = _data_prefix(entry, ckpt)
        family = shardset.family_of(found) if found is not None else None
        if family is None:
            continue
        try:
            recorded, path = shardset.recorded_tokens(family), shardset.manifest(family).get("tokenizer")
        except (OSError, ValueError):
            continue
        if not isinstance(path, str):
            continue
        record = file_record(path) if os.path.isfile(path) or os.path.isdir(path) else None
        if record is not None and same(record, recorded) is not False:
            log(f"tokenizer: {path}, which the preprocessing manifest of {family} records (the run names no "
                "data.tokenizer_model)")
            return str(Path(path).resolve())
        why = "does not exist here" if record is None else "is no longer the tokenizer the data were made with"
        message = (f"the run's data {family} were made with the tokenizer {path} (its preprocessing manifest "
                   f"records it), which {why}")
        if not missing_ok:
            raise FileNotFoundError(f"{message}: pass --tokenizer PATH, or --no-tokenizer to export the model "
                                    "without one")
        log(f"warning: {message}; exporting without a tokenizer (pass --tokenizer)")
        return None
    return None


def _data_prefix(entry: str, ckpt: Path | None) -> str | None:
    """The ``data.paths`` entry as a prefix whose preprocessing manifest is here: as given (relative to
    the working directory), else, relative, under the checkpoint's parent directories (a run trained
    from its project directory, exported from elsewhere); None where there is none."""
    from megatron_osp.data import shardset

    candidates = [Path(entry)]
    if ckpt is not None and not Path(entry).is_absolute():
        candidates += [parent / entry for parent in Path(ckpt).resolve().parents]
    return next((str(c) for c in candidates if shardset.family_of(c) is not None), None)
