"""An evaluation report already in --output-dir: kept, continued (``--resume``) or replaced (``--overwrite``).

tools/evaluate_quantization.py and tools/evaluate_downstream.py rewrite their report after every finished
unit (report_progress.py). A second run into the same directory would replace an earlier report as soon as
its first unit finished, and lose it for good if that run then failed. So a report already there is:

- refused by default, naming it and how far it got;
- continued with ``--resume``: the report must be of the same request (the options that decide the numbers,
  the versions of the code that computes them: this package, torch, transformers and, for the downstream
  report, lm-evaluation-harness (``software_versions``), the token windows measured on, the models by
  position, and what each model with results in the report
  is: the checkpoint a Megatron path resolves to and its checksum manifest, or an HF directory's files by
  name, size and time, and its weights files by a sample of their bytes: ``weights_sample``). Its finished units are kept as they are and only the others are evaluated, so a
  run stopped by a job time limit or a failing model goes on where it stopped; a model with nothing done
  may have changed (a damaged download replaced). ``--resume`` with no report there starts a new one;
- replaced with ``--overwrite``.

A report is only ever replaced by a later write of the same atomic kind, so nothing here deletes one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["pin_model", "files_identity", "weights_sample", "tokens_identity", "software_versions", "EarlierReport",
           "open_report"]

REQUEST_VERSION = 3  # 2: the request records software_versions; 3: an HF model's weights_sample
SAMPLE_CHUNKS, SAMPLE_BYTES = 16, 4096
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def software_versions(harness: bool = False) -> dict:
    """The versions of what computes a report's numbers: this package, torch, transformers (loading,
    the harness's tokenization) and, with ``harness``, lm-evaluation-harness (prompts, scoring). A
    resumed report of other versions would mix two of them without a word in it."""
    import torch

    import megatron_osp

    try:  # optional: a Megatron checkpoint's quantization evaluation runs without it (the quickstart's install)
        import transformers
    except ImportError:
        transformers = None
    versions = {"megatron_osp": megatron_osp.__version__, "torch": torch.__version__,
                "transformers": getattr(transformers, "__version__", None)}
    if harness:
        import lm_eval

        versions["lm_eval"] = getattr(lm_eval, "__version__", None)
    return versions


def files_identity(paths) -> str:
    """A digest of the files' names, sizes and modification times: changes when any is rewritten."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def weights_sample(paths) -> str:
    """sha256 of weights files' names, safetensors headers (tensor names, dtypes, shapes, offsets) and
    ``SAMPLE_CHUNKS`` chunks of ``SAMPLE_BYTES`` spread evenly over each file (all of a smaller one):
    a few hundred KiB read, not gigabytes. Other weights of the same layout differ in nearly every
    chunk, so a re-export or copy of another model that kept the sizes and modification times
    (``cp -p``, ``rsync -a``) is caught; a few changed bytes in one place may not be (that is not
    what it is for: the checks before loading and the files' times are)."""
    from megatron_osp.analysis.loading import safetensors_header

    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\n".encode())
        if p.suffix == ".safetensors":
            h.update(safetensors_header(p))
        with open(p, "rb") as f:
            if size <= SAMPLE_CHUNKS * SAMPLE_BYTES:
                h.update(f.read())
                continue
            for i in range(SAMPLE_CHUNKS):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLE_CHUNKS - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def tokens_identity(windows) -> str | None:
    """sha256 of token windows (a tensor or array) and their shape: the data a report's numbers were
    measured on, whatever files it came from (a re-tokenized corpus with the same tokens is the same)."""
    if windows is None:
        return None
    import numpy as np

    a = np.ascontiguousarray(windows.cpu().numpy() if hasattr(windows, "cpu") else windows).astype(np.int64)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def pin_model(path: str) -> tuple[str, dict]:
    """(the path to load, what it holds) now, cheaply (no weights read). A Megatron run or save directory
    is pinned to the iteration directory ``latest`` names now, so that the model evaluated is the one
    the report records even if training moves ``latest`` on while the evaluation runs; its identity is
    that iteration and the sha256 of its checksum manifest. An HF directory is loaded as it is; its
    identity is ``files_identity`` of its files and ``weights_sample`` of its weights files."""
    p = Path(path)
    if (p / "config.json").exists():
        files = [f for f in p.iterdir() if f.is_file()]
        return str(path), {"kind": "hf", "files": files_identity(files),
                           "weights": weights_sample(f for f in files if f.suffix in WEIGHTS_SUFFIXES)}
    from megatron_osp.training.checkpoint import checkpoints_of, find_iteration_dir
    from megatron_osp.training.checkpoint_integrity import MANIFEST

    it = find_iteration_dir(checkpoints_of(p))
    manifest = it / MANIFEST
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return str(it), {"kind": "megatron", "iteration": it.name, "manifest_sha256": digest}


def _describe(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


class EarlierReport:
    """The units an earlier run finished, per model position, with its result entries."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data
        self.results = {int(r["model_index"]): r for r in data.get("models", [])}

    def done(self, index: int) -> list[str]:
        return list(self.data["progress"][index]["done"])

    def result(self, index: int) -> dict | None:
        return self.results.get(index)

    def restore(self, progress) -> list[dict]:
        """Marks the units this report has done in ``progress`` (a ReportProgress of the same request)
        and returns its result entries in model order: the results a resumed run starts from."""
        for i in range(len(progress.models)):
            for unit in self.done(i):
                progress.mark(i, unit)
        return [self.results[i] for i in sorted(self.results)]

    def summary(self) -> str:
        if self.data.get("complete"):
            return "a complete report"
        done = sum(len(p["done"]) for p in self.data["progress"])
        total = done + sum(len(p["pending"]) for p in self.data["progress"])
        return f"a partial report ({done} of {total} units done)"


def _has_progress(data: dict) -> bool:
    """Whether ``data`` holds this tool's progress (a list of {"done": [...], "pending": [...]}), and
    not a ``"progress"`` of another shape (another tool's JSON under the same name)."""
    progress = data.get("progress")
    return isinstance(progress, list) and all(
        isinstance(p, dict) and isinstance(p.get("done"), list) and isinstance(p.get("pending"), list)
        for p in progress)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable report ({e}): move it away or pass --overwrite") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a report of this tool: move it away or pass --overwrite")
    return data


def _check_same_request(path: Path, data: dict, request: dict) -> None:
    earlier = data.get("request")
    if not isinstance(earlier, dict) or earlier.get("version") != REQUEST_VERSION or not _has_progress(data):
        raise ValueError(f"--resume: {path} was written by an earlier version of this tool, without what "
                         "resuming checks: pass --overwrite to evaluate anew, or choose another --output-dir")
    for key in request:
        if key != "models" and earlier.get(key) != request[key]:
            then, now = earlier.get(key), request[key]
            if isinstance(then, dict) and isinstance(now, dict):  # name the entries that differ, not the whole
                differ = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
                key = ", ".join(f"{key}.{k}" for k in differ)
                then, now = ([d.get(k) for k in differ] if len(differ) > 1 else d.get(differ[0]) for d in (then, now))
            if key.startswith("versions"):  # not an option the user can give back: another installation
                raise ValueError(f"--resume: {path} was made with {key} = {_describe(then)}, this run has "
                                 f"{_describe(now)}: its results would be mixed with another version's; resume "
                                 "with the versions that made it, or pass --overwrite to evaluate anew")
            hint = (" (the task's data files or YAML were changed since)" if key.startswith("task_data") else "")
            raise ValueError(f"--resume: {path} was made with {key} = {_describe(then)}, this run "
                             f"asks for {_describe(now)}{hint}: resume with the same options, or pass "
                             "--overwrite to evaluate anew")
    ours, theirs = request["models"], earlier.get("models") or []
    if [m["path"] for m in ours] != [m["path"] for m in theirs]:
        raise ValueError(f"--resume: {path} is of the models {', '.join(m['path'] for m in theirs)}; this run asks "
                         f"for {', '.join(m['path'] for m in ours)}: give the same models in the same order")
    for i, (now, then) in enumerate(zip(ours, theirs)):
        # A model with nothing in the report may have changed (a damaged download replaced, say):
        # nothing of it is kept. One whose results (or a partial setting's tasks) are kept must be what
        # was evaluated.
        kept = data["progress"][i]["done"] or any(r.get("model_index") == i for r in data.get("models", []))
        if kept and now["identity"] != then["identity"]:
            raise ValueError(f"--resume: model {i + 1} ({now['path']}) has changed since the report's results for "
                             f"it were made (another checkpoint, or rewritten files): it was "
                             f"{_describe(then['identity'])}, it is now {_describe(now['identity'])}. Pass "
                             "--overwrite to evaluate anew, or choose another --output-dir")


def open_report(path: str | Path, resume: bool, overwrite: bool, request: dict) -> EarlierReport | None:
    """The earlier report at ``path`` to continue (``resume``), or None to start anew; ValueError, before
    anything is evaluated, when a report is there and neither flag allows it, or it cannot be resumed.
    ``request``: JSON-able dict of what decides the numbers, with ``"models"``: [{"path", "identity"}, ...]
    by position; written into the report (``"request"``) by the caller."""
    path = Path(path)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: choose one")
    from megatron_osp.fileio import unwritable_reason

    # The report is first written after the first finished unit (or, for a one-unit run, at the end):
    # an --output-dir that is a file or cannot be written used to stop the run there, with a traceback.
    reason = unwritable_reason(path.parent)
    if reason is not None:
        raise ValueError(f"--output-dir {path.parent}: {reason}, so the report could not be written: "
                         "choose another --output-dir")
    for m in request.get("models", []):  # an HF directory's identity is its files, the report's among them
        if (m.get("identity") or {}).get("kind") == "hf" and Path(m["path"]).resolve() == path.parent.resolve():
            raise ValueError(f"--output-dir {path.parent} is the HF model directory {m['path']}: the report's files "
                             "would change the model's files, which --resume checks; choose another --output-dir")
    if not path.exists():
        return None
    if overwrite:
        return None
    data = _read(path)
    if not resume:
        state = EarlierReport(path, data).summary() if _has_progress(data) else "a report"
        raise ValueError(f"{path} already holds {state} of an earlier run: --resume continues it "
                         "(same models and options), --overwrite replaces it, or choose another --output-dir")
    _check_same_request(path, data, {"version": REQUEST_VERSION, **request})
    return EarlierReport(path, data)
