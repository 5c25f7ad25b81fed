"""Where an export or import may write, checked before anything is read, built, written or deleted.

- The output of ``convert_to_hf`` may not equal, contain or lie inside its inputs: the checkpoint
  (the ``iter_N`` directory and its save directory), the run directory holding that save directory
  (``config.yaml`` / ``metrics.jsonl`` beside ``checkpoints/``), and the tokenizer it copies. Paths
  are compared with symlinks resolved. (``convert_to_hf.py RUN/checkpoints RUN --overwrite`` used to
  replace the whole run with the export.)
- ``--overwrite`` replaces only a previous HF export: a directory of plain files with config.json,
  model.safetensors (or its index) and nothing an export does not write. Anything else is refused,
  naming what is there.
- The output of ``convert_from_hf`` may not overlap the HF directory it reads, and must be new or
  empty (an existing checkpoint or run is never written into).
- Either output must be a directory this process can create or write (a path under a file, a
  read-only directory): found out only when writing, after the model was read and built.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from megatron_osp.convert.llama import ExportError
from megatron_osp.fileio import unwritable_reason

__all__ = ["export_inputs", "tokenizer_input", "check_outside", "check_replaceable_export", "check_import_output",
           "EXPORT_FILE_PATTERNS"]

# Every file write_hf_directory can produce (save_tokenizer copies tokenizer*/special_tokens_map*).
EXPORT_FILE_PATTERNS = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                        "model.safetensors.index.json", "tokenizer*", "special_tokens_map*", "added_tokens*",
                        "chat_template*")
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json")


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "is inside"
    return None


def export_inputs(checkpoint_arg, iteration_dir, tokenizer=None) -> list[tuple[str, Path, bool]]:
    """(what, resolved path, may the output lie inside it) for every input of an export."""
    it = _real(iteration_dir)
    inputs = [("checkpoint", _real(checkpoint_arg), False), ("checkpoint", it, False)]
    save_dir = it.parent
    if (save_dir / "latest").exists() or any(save_dir.glob("iter_*")):
        inputs.append(("checkpoint directory", save_dir, False))
        run_dir = save_dir.parent
        if any((run_dir / m).exists() for m in RUN_MARKERS):
            inputs.append(("run directory", run_dir, False))
    return inputs + tokenizer_input(tokenizer)


def tokenizer_input(tokenizer) -> list[tuple[str, Path, bool]]:
    if tokenizer is None:
        return []
    tok = _real(tokenizer)
    return [("tokenizer", tok, not tok.is_dir())]  # beside a tokenizer file is fine


def check_outside(output, inputs, action: str = "export") -> None:
    """ExportError naming both paths when ``output`` equals, contains or is inside an input."""
    out = _real(output)
    hits = [(rel, what, inp) for what, inp, inside_ok in inputs
            if (rel := _relation(out, inp)) is not None and not (rel == "is inside" and inside_ok)]
    hits.sort(key=lambda h: h[0] != "is")  # name the input it is, if any, before one it contains
    for rel, what, inp in hits[:1]:
        shown = f"{output}" + (f" ({out})" if str(out) != os.path.abspath(output) else "")
        raise ExportError(
            f"refusing to {action} into {shown}: it {rel} the {what} {inp} it reads"
            + (" (--overwrite would delete it)" if rel in ("is", "contains") else "")
            + "; choose an output directory outside it")


def check_replaceable_export(output, overwrite: bool) -> None:
    """An existing non-empty ``output`` needs --overwrite and must be a previous HF export."""
    out = Path(output)
    if not os.path.lexists(out):
        _check_writable(out)
        return
    if not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory; it is never replaced")
    _check_writable(out.resolve().parent)  # the export is written beside it, then renamed into place
    entries = sorted(out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"output {out} exists and is not empty (pass --overwrite to replace it)")
    names = {e.name for e in entries}
    has_weights = "model.safetensors" in names or "model.safetensors.index.json" in names
    foreign = [e.name + ("/" if e.is_dir() else "") for e in entries
               if e.is_dir() or e.is_symlink() or not any(fnmatch.fnmatch(e.name, p) for p in EXPORT_FILE_PATTERNS)]
    if "config.json" not in names or not has_weights or foreign:
        why = (f"it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which an export "
               "does not write" if foreign else "it has no config.json and model.safetensors*")
        raise ExportError(
            f"--overwrite replaces only a previous Hugging Face export; {out} is not one ({why}): "
            "refusing to delete it")


def check_import_output(hf_dir, output) -> None:
    """convert_from_hf: the output is new or empty and does not overlap the HF directory."""
    check_outside(output, [("Hugging Face directory", _real(hf_dir), False)], action="import")
    out = Path(output)
    if os.path.lexists(out) and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    _check_writable(out)
    if out.is_dir():
        from megatron_osp.training.checkpoint import has_checkpoint

        if has_checkpoint(out):
            raise FileExistsError(f"{out} already holds a checkpoint; choose an empty directory")
        entries = sorted(e.name for e in out.iterdir())
        if entries:
            raise FileExistsError(
                f"output {out} exists and is not empty ({', '.join(entries[:5])}"
                f"{' ...' if len(entries) > 5 else ''}); the import writes a new checkpoint directory, "
                "choose an empty or new one")


def _check_writable(out: Path) -> None:
    reason = unwritable_reason(out)
    if reason is not None:
        raise PermissionError(f"output {out} cannot be written: {reason}")
