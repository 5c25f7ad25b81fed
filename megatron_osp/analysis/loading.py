"""Load a model to analyse: a Megatron checkpoint (rebuilt at TP=1, PP=1) or an HF Llama directory.

Megatron checkpoints carry their RunConfig (training/checkpoint.py ``read_run_config``), so the model
is rebuilt exactly as trained (normalization, EmbProj, sizes) in one process, on Megatron-Core's
local layer spec whatever the run used, and the sharded weights are resharded into it by
``load_model_weights``, whatever layout saved them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

__all__ = ["LoadedModel", "load_for_analysis", "describe_run", "linear_input_widths", "check_group_sizes",
           "config_facts", "check_data_tokenizer", "check_model_files", "safetensors_header",
           "models_problem"]


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # "megatron" | "hf"
    label: str
    seq_length: int
    run_config: object | None = None  # RunConfig for Megatron checkpoints

    @property
    def data_split(self) -> str | None:
        return getattr(getattr(self.run_config, "data", None), "split", None)


def describe_run(run_config) -> str:
    """"Adam + RMSNorm", "Muon + SSNorm + EmbProj", ... (the paper's ablation names)."""
    opt = run_config.optimizer.name
    parts = [{"muon": "Muon", "muon_only": "Muon-only"}.get(opt, "Adam")]
    parts.append("SSNorm" if run_config.model.normalization == "ssnorm" else "RMSNorm")
    if run_config.model.embedding_projection:
        parts.append("EmbProj")
    if parts[0] != "Adam" and parts[1] == "RMSNorm":
        parts.pop(1)  # "Muon" / "Muon + EmbProj": RMSNorm is the default
    return " + ".join(parts)


def _is_megatron_checkpoint(path: Path) -> bool:
    return (path / "latest").exists() or (path / "train_state.json").exists() or (path / "checkpoints" / "latest").exists()


def _load_megatron(path: Path, device: torch.device, dtype: torch.dtype, label: str | None) -> LoadedModel:
    from megatron_osp import parallel, platform
    from megatron_osp.models import build_gpt_model, transformer_config
    from megatron_osp.training.checkpoint import (checkpoints_of, load_model_weights, model_config_for_one_process,
                                                  read_run_config)

    path = checkpoints_of(path)  # a run directory: its checkpoints
    run_config = read_run_config(path)
    parallel.init_distributed(1, 1)
    platform.seed_everything(run_config.train.seed)
    # Always the local spec: its norms are modules of their own, so hooks on a linear's input see
    # the normalized activations (TE fuses the norm into the linear). Checkpoint keys are the same.
    mcfg = replace(model_config_for_one_process(path), transformer_impl="local")
    model = build_gpt_model(mcfg, transformer_config(mcfg, params_dtype=torch.float32), seed=run_config.train.seed)
    load_model_weights(str(path), [model])
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, "megatron", label or describe_run(run_config), mcfg.seq_length, run_config)


def _load_hf(path: Path, device: torch.device, dtype: torch.dtype, label: str | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    except SafetensorError as e:  # a truncated or damaged weights file: name the model, not a traceback
        raise ValueError(f"{path}: its safetensors weights cannot be read ({e}): a damaged or incomplete "
                         "download?") from None
    except OSError as e:  # transformers' word for a config.json that is not JSON, a missing weights file
        raise ValueError(f"{path}: {e}") from None
    model = model.to(device).eval()
    seq = int(getattr(model.config, "max_position_embeddings", 2048))
    return LoadedModel(model, "hf", label or path.name, seq)


def linear_input_widths(path: str) -> dict[str, int]:
    """The input widths of a model's decoder linears, from its config alone (no weights loaded):
    ``{"qkv/fc1": hidden, "o_proj": heads x head_dim, "down_proj": ffn}``."""
    import json

    p = Path(path)
    if (p / "config.json").exists():
        try:
            cfg = json.loads((p / "config.json").read_text())
            h, heads, ffn = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
        except KeyError as e:
            raise ValueError(f"{p / 'config.json'} has no {e.args[0]}: not a Llama-style config") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p / 'config.json'} is not valid JSON ({e})") from None
        return {"qkv/fc1": h, "o_proj": heads * (cfg.get("head_dim") or h // heads), "down_proj": ffn}
    from megatron_osp.training.checkpoint import checkpoints_of, read_run_config

    m = read_run_config(checkpoints_of(p)).model
    return {"qkv/fc1": m.hidden_size, "o_proj": m.hidden_size, "down_proj": m.ffn_hidden_size}


def config_facts(path: str) -> tuple[int, str | None, list[str] | None]:
    """(sequence length, the run's data.split or None, its data.valid_paths or None) from a model's
    config alone, as ``load_for_analysis`` will report them (``seq_length``, ``data_split``), before
    any weight loads."""
    import json

    p = Path(path)
    if (p / "config.json").exists():
        try:
            cfg = json.loads((p / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p / 'config.json'} is not valid JSON ({e})") from None
        return int(cfg.get("max_position_embeddings", 2048)), None, None
    from megatron_osp.training.checkpoint import checkpoints_of, read_run_config

    run = read_run_config(checkpoints_of(p))
    return run.model.seq_length, getattr(run.data, "split", None), getattr(run.data, "valid_paths", None)


def _model_tokenizers(path: str) -> list[dict]:
    """Records (training/tokenizer_record.py) of the tokenizer a model learned: an HF directory's
    tokenizer.model and tokenizer.json (those there), a Megatron checkpoint's own record."""
    from megatron_osp.training.tokenizer_record import checkpoint_record, file_record

    p = Path(path)
    if (p / "config.json").exists():
        return [r for name in ("tokenizer.model", "tokenizer.json") if (p / name).is_file()
                and (r := file_record(p / name)) is not None]
    from megatron_osp.training.checkpoint import checkpoints_of, read_run_config, read_train_state

    p = checkpoints_of(p)
    record = checkpoint_record(read_train_state(p), read_run_config(p))
    return [record] if record else []


def check_data_tokenizer(path: str, data: str, what: str) -> None:
    """ValueError when the dataset ``data`` (its preprocessing manifest) holds another tokenizer's ids
    than the model at ``path`` learned, before any model loads: at one vocabulary size every id is in
    range and the numbers would be of the wrong tokens. Nothing is refused where either side is
    unknown, or where one of the model's tokenizer files matches."""
    from megatron_osp.training.tokenizer_record import data_record, describe, same

    made = data_record([data])
    verdicts = [(same(m, made), m) for m in _model_tokenizers(path)]
    known = [(v, m) for v, m in verdicts if v is not None]
    if known and not any(v for v, _ in known):
        raise ValueError(f"{what} {data} was made with {describe(made)}, but {path} learned the ids of "
                         f"{describe(known[0][1])}, which encodes differently: tokenize it with the model's tokenizer")


def check_group_sizes(path: str, settings) -> None:
    """ValueError naming the model and setting whose weight group size does not divide a linear's input
    width: checked for every model before the first is evaluated (a refusal later loses the results)."""
    grouped = [s for s in settings if s.w_group_size and s.w_bits < 16]
    widths = linear_input_widths(path) if grouped else {}
    for s in grouped:
        bad = [f"{w} ({name})" for name, w in widths.items() if w % s.w_group_size]
        if bad:
            raise ValueError(f"{path}: setting {s.name}: weight group size {s.w_group_size} does not divide "
                             f"the linears' input widths {', '.join(bad)}")


def labels_problem(labels: list[str] | None, models: list[str]) -> str | None:
    """What is wrong with ``--labels`` for ``models`` (None: nothing, or no labels given): one label per
    model, none empty (an empty one fell back to the default label without a word) and none twice
    (reports and plots key models by label)."""
    if not labels:
        return None
    if len(labels) != len(models):
        return f"--labels has {len(labels)} entries for {len(models)} models"
    empty = [i + 1 for i, label in enumerate(labels) if not label.strip()]
    if empty:
        return f"--labels entry {empty[0]} (for {models[empty[0] - 1]}) is empty: give every model a label, or none"
    if len(set(labels)) != len(labels):
        return f"--labels names a model twice ({', '.join(labels)}): reports and plots key models by label"
    return None


def models_problem(models: list[str]) -> str | None:
    """A model given twice (None: none is): the same path, another path to it, or a Megatron run, its save
    directory and the iteration directory ``latest`` names, which are one checkpoint. It would be
    evaluated twice and reported as two models of identical results."""
    import os

    from megatron_osp.training.checkpoint import CheckpointError, checkpoints_of, find_iteration_dir

    seen: dict[str, str] = {}
    for m in models:
        try:
            key = os.path.realpath(find_iteration_dir(checkpoints_of(m)))
        except (CheckpointError, OSError):  # an HF directory, or what a later check refuses by name
            key = os.path.realpath(m)
        if key in seen:
            same = "" if os.path.realpath(seen[key]) == os.path.realpath(m) else f", both {key}"
            return f"the model {m} is given twice (as {seen[key]} and {m}{same}): give each model once"
        seen[key] = m
    return None


_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit (its loader refuses more)


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (its raw bytes), read without its tensors; ValueError naming
    the file when it cannot be one whole safetensors file: shorter than its 8-byte header length, a header
    that is not a JSON object of tensors, or a size other than 8 + header + the data its tensors' offsets
    declare (a download or copy cut short, or something appended)."""
    import json

    size = path.stat().st_size
    damaged = f"{path}: not a whole safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is not None and size - 8 >= n > _MAX_SAFETENSORS_HEADER:  # not read: it could be gigabytes
            raise ValueError(f"{damaged}: it declares a {n}-byte header, over safetensors' limit of "
                             f"{_MAX_SAFETENSORS_HEADER}: another kind of file?")
        if n is None or n > size - 8:
            raise ValueError(f"{damaged}: {size} bytes, " + ("shorter than the 8-byte header length" if n is None else
                             f"shorter than the {n}-byte header it declares") + ": a damaged or incomplete download?")
        header = f.read(n)
    try:
        entries = json.loads(header)
        ends = [int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, IndexError, TypeError,
            ValueError) as e:
        raise ValueError(f"{damaged}: its header is not a JSON object of tensors ({type(e).__name__}: {e}): "
                         "a damaged download, or another kind of file?") from None
    declared = 8 + n + max(ends, default=0)
    if declared != size:
        raise ValueError(f"{damaged}: its header declares {declared} bytes, the file has {size}"
                         + (": a damaged or incomplete download or copy?" if size < declared else ""))
    return header


def check_model_files(path: str) -> None:
    """ValueError / CheckpointError naming what is missing from a model, without reading its weights:
    an HF directory's weights file, or a shard its weights index names (an incomplete download or
    copy), or a safetensors file whose size is not what its header declares (``safetensors_header``:
    the header alone is read); a Megatron checkpoint's files (presence, sizes, the small files'
    checksums: ``resolve_checkpoint``). Called for every model before the first loads: found at its
    load, a damaged model stopped the run after the models before it had been evaluated."""
    import json

    p = Path(path)
    if not (p / "config.json").exists():
        from megatron_osp.training.checkpoint import checkpoints_of, resolve_checkpoint

        resolve_checkpoint(checkpoints_of(p))
        return
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = p / name
        if not index.is_file():
            continue
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a weights index (a JSON object with a weight_map): "
                             f"{type(e).__name__}: {e}") from None
        missing = sorted(str(f) for f in shards if not (p / str(f)).is_file())
        if missing:
            raise ValueError(f"{index} names {', '.join(missing)}, missing from {p}: an incomplete download or copy?")
        for shard in sorted(str(f) for f in shards if str(f).endswith(".safetensors")):
            safetensors_header(p / shard)
        return
    if not any((p / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise ValueError(f"{p}: an HF directory without weights (model.safetensors, a weights index or "
                         "pytorch_model.bin)")
    if (p / "model.safetensors").is_file():  # what transformers loads when both are there
        safetensors_header(p / "model.safetensors")


def load_for_analysis(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      label: str | None = None) -> LoadedModel:
    """Megatron checkpoint (save dir, ``iter_N`` dir or run dir) or HF directory (has config.json)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist")
    device = torch.device(device)
    if (p / "config.json").exists():
        return _load_hf(p, device, dtype, label)
    if _is_megatron_checkpoint(p):
        return _load_megatron(p, device, dtype, label)
    raise ValueError(
        f"{path}: neither an HF model directory (config.json) nor a Megatron checkpoint "
        "(latest / train_state.json, or a run directory with checkpoints/)"
    )
