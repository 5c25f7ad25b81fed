"""Downstream benchmarks under W-A-KV quantization, scored by lm-evaluation-harness in-process.

For each model and setting the project's own quantization (``evaluation.apply_setting``: the same code
and options as tools/evaluate_quantization.py) is applied in place to the loaded HF model, the model
object is handed to lm-evaluation-harness (``lm_eval.models.huggingface.HFLM``) and every task runs
through ``lm_eval.simple_evaluate``; leaving the setting restores the weights from their snapshot.
The harness does all prompting and scoring: nothing here scores a multiple-choice question.

Models: an HF Llama directory is loaded as the analysis tools load it (``loading.load_for_analysis``);
a Megatron checkpoint (run dir, save dir or ``iter_N``) is first exported by ``convert.hf_export``
into a temporary directory (with the run's tokenizer) and loaded from there, so the harness sees the
same model object a user's HF export gives it (SSNorm / EmbProj folded; the quantizers act on the
same linear inputs, tested in tests/test_quantization.py).

Data: tasks run offline (``offline()`` sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); ``check_tasks``
builds every task once before any model is loaded, so a dataset that is neither in the local HF
datasets cache nor a local file of an ``--include-path`` YAML is refused by task name, and so is a
task the harness would stop on or silently mis-score (``task_checks.py``: malformed local documents,
too few few-shot examples).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_osp.analysis.task_checks import (LOCAL_FORMATS, defined_twice, local_data_identity, task_problems,
                                               unreadable_yamls, yaml_problems)
from megatron_osp.analysis.task_length import length_problems, model_windows

__all__ = ["SUITES", "TaskSpec", "parse_tasks", "offline", "check_tasks", "check_model_path", "load_eval_model",
           "evaluate_downstream", "summarize", "require_harness"]

# The OSP paper's suite (dmis-lab/Outlier-Safe-Pre-Training tasks.txt) in lm-evaluation-harness's task
# names: 0-shot except GSM8K (8) and TriviaQA (5). SIQA is the harness's ``social_iqa``.
SUITES: dict[str, list[tuple[str, int]]] = {
    "osp-paper": [("arc_easy", 0), ("arc_challenge", 0), ("commonsense_qa", 0), ("gsm8k", 8), ("hellaswag", 0),
                  ("mmlu", 0), ("openbookqa", 0), ("piqa", 0), ("social_iqa", 0), ("triviaqa", 5),
                  ("winogrande", 0)],
}
# The score a task contributes to the average, first present wins (exact_match: its first filter).
HEADLINE = ("acc_norm", "acc", "exact_match")
REPORTED = ("acc", "acc_norm", "exact_match")


def require_harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError("lm-evaluation-harness is not installed: pip install -e \".[eval]\"") from None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    num_fewshot: int | None = None  # None: the task's own default

    @property
    def label(self) -> str:
        return self.name if self.num_fewshot is None else f"{self.name} ({self.num_fewshot}-shot)"


def parse_tasks(text: str) -> list[TaskSpec]:
    """``"osp-paper"``, ``"arc_easy,gsm8k:8"``, ``"osp-paper,my_task"``: suites expand, ``NAME:N`` sets shots."""
    specs: list[TaskSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in SUITES:
            specs += [TaskSpec(n, k) for n, k in SUITES[item]]
            continue
        name, _, shots = item.partition(":")
        if shots and not shots.isdigit():
            raise ValueError(f"--tasks: {item!r}: expected NAME or NAME:SHOTS with SHOTS a number")
        specs.append(TaskSpec(name, int(shots) if shots else None))
    if not specs:
        raise ValueError("--tasks: no task given")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--tasks: {', '.join(dup)} given more than once")
    return specs


@contextlib.contextmanager
def offline():
    """No network while the tasks' data loads: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE in the environment
    and in the already-imported libraries' constants (they read the environment at import)."""
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    patched = []
    for mod, attr in (("datasets.config", "HF_DATASETS_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                      ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        with contextlib.suppress(ImportError):
            m = __import__(mod, fromlist=[attr])
            if hasattr(m, attr):
                patched.append((m, attr, getattr(m, attr)))
                setattr(m, attr, True)
    try:
        yield
    finally:
        for m, attr, value in patched:
            setattr(m, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dataset_of(tm, name: str) -> tuple[str | None, str | None]:
    """(dataset_path, dataset_name) from the task's YAML (a group: its first task's)."""
    seen = set()
    while name and name not in seen:
        seen.add(name)
        entry = tm.task_index.get(name)
        cfg = (entry.cfg if entry is not None else None) or {}
        if cfg.get("dataset_path"):
            return cfg["dataset_path"], cfg.get("dataset_name")
        children = cfg.get("task")
        if isinstance(children, list) and children:
            first = children[0]
            name = first if isinstance(first, str) else (first.get("task") if isinstance(first, dict) else None)
        else:
            break
    return None, None


def _missing_message(tm, spec: TaskSpec, err: BaseException) -> str:
    path, config = _dataset_of(tm, spec.name)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    if path in ("json", "csv", "parquet", "text", "arrow"):
        # the reader's own error (a malformed line: "... in row 2") is the cause of datasets' generic one
        causes, c = [], err.__cause__
        while c is not None and len(causes) < 3:
            causes.append(f"{type(c).__name__}: {(str(c).strip().splitlines() or [''])[0][:300]}")
            c = c.__cause__
        why = "".join(f"; caused by {c}" for c in causes)
        return (f"task {spec.name}: its local data files cannot be read ({type(err).__name__}: {first}{why})"
                + (" (rows count from 0)" if " in row " in why else ""))
    if path is None:  # a group (mmlu): the hub error names the dataset
        m = re.search(r"reach '([^']+)'", first)
        path = m.group(1) if m else None
    what = (f"dataset {path!r}" + (f" (config {config!r})" if config else "")) if path else "its dataset"
    return (f"task {spec.name}: {what} is not in the local HF datasets cache ({type(err).__name__}: {first}); "
            f"download it where there is network, with the same HF_HOME / HF_DATASETS_CACHE, by "
            f"python -c \"from lm_eval.tasks import TaskManager; TaskManager().load(['{spec.name}'])\" "
            f"and copy that cache here, or give local files with a task YAML in --include-path")


def check_tasks(specs: list[TaskSpec], include_path: str | None = None, identities: dict | None = None,
                models: list[str] | None = None, limit=None):
    """A TaskManager that knows every task, each task's data loaded once offline; ValueError naming every
    unknown task and every missing dataset otherwise. Call before loading any model. ``identities``: a
    dict filled with {task: task_checks.local_data_identity} for the tasks that read local files.
    ``models`` (paths, checked by check_model_path) and ``limit`` (--limit): a local task's document
    that would not fit a model's window is refused (task_length.py)."""
    require_harness()
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path: {include_path} is not a directory")
    with offline():
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=include_path)
        unknown = [s.name for s in specs if s.name not in tm.all_tasks]
        if unknown:
            skipped = unreadable_yamls(include_path) if include_path is not None else []
            raise ValueError(f"--tasks: {', '.join(unknown)}: not a task of lm-evaluation-harness"
                             + (f" nor of --include-path {include_path}" if include_path else "")
                             + " (python -m lm_eval ls tasks lists them)"
                             + "".join(f"\n  the harness skipped {line}" for line in skipped))
        ours = Path(include_path).resolve() if include_path is not None else None
        problems = defined_twice(include_path, {s.name for s in specs}) if include_path is not None else []
        problems += [p for s in specs if ours is not None and (entry := tm.task_index.get(s.name)) is not None
                    and ours in Path(getattr(entry, "yaml_path", None) or "/").resolve().parents
                    for p in yaml_problems(s.name, entry)]
        if problems:
            raise ValueError("task YAMLs the harness cannot build:\n  " + "\n  ".join(problems))
        built = []
        for spec in specs:
            try:
                built.append((spec, tm.load([spec.name])["tasks"]))
            except Exception as e:  # noqa: BLE001  (any failure to build the task is reported by name)
                problems.append(_missing_message(tm, spec, e))
        if problems:
            raise ValueError("task data not available offline:\n  " + "\n  ".join(problems))
        local = []
        for spec, tasks in built:  # what the harness would find only while scoring (task_checks.py)
            for leaf, task in tasks.items():
                name = spec.name if leaf == spec.name else f"{spec.name}/{leaf}"
                problems += task_problems(name, task, spec.num_fewshot)
                if identities is not None and (ident := local_data_identity(task)) is not None:
                    identities[name] = ident
                if task.config.dataset_path in LOCAL_FORMATS:
                    local.append((name, task, spec.num_fewshot))
        if local and models and not problems:  # well-formed local tasks: each request within each model's window
            windows, tmps = model_windows(models)
            try:
                for name, task, shots in local:
                    problems += length_problems(name, task, shots, limit, windows)
            finally:
                for tmp in tmps:
                    tmp.cleanup()
        if problems:
            raise ValueError("tasks the harness would stop on or mis-score:\n  " + "\n  ".join(problems))
    return tm


def check_model_path(path: str) -> str:
    """'hf' or 'megatron' without loading anything; FileNotFoundError / ValueError / CheckpointError naming
    the path or the file missing from it (loading.check_model_files)."""
    from megatron_osp.analysis.loading import _is_megatron_checkpoint, check_model_files

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (p / "config.json").exists():
        if not any((p / f).is_file() for f in _VOCABULARY_FILES):
            # A tokenizer_config.json alone names a tokenizer class but holds no vocabulary: the load
            # failed after the models before it had been evaluated.
            has = [f for f in ("tokenizer_config.json", "special_tokens_map.json") if (p / f).is_file()]
            raise ValueError(f"{path}: an HF model directory without a tokenizer: no tokenizer.json, "
                             f"tokenizer.model or other vocabulary file" + (f" (only {', '.join(has)})" if has else "")
                             + ": the harness needs one; copy the model's tokenizer files into it")
        _check_tokenizer_fits(p)
        check_model_files(path)
        return "hf"
    if _is_megatron_checkpoint(p):
        # Resolves the checkpoint (check_model_files' check of a Megatron one) and finds the tokenizer its
        # export needs: either missing was found at its load, after the models before it.
        _run_tokenizer(path)
        return "megatron"
    raise ValueError(f"{path}: neither an HF model directory (config.json) nor a Megatron checkpoint "
                     "(latest / train_state.json, or a run directory with checkpoints/)")


def _run_tokenizer(path: str) -> tuple[Path, object, str]:
    """(iteration directory, RunConfig, tokenizer path) of a Megatron checkpoint; ValueError naming it
    when the run's tokenizer is not here."""
    from megatron_osp.convert.hf_export import find_run_tokenizer
    from megatron_osp.training.checkpoint import checkpoints_of, read_run_config, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoints_of(path))
    run = read_run_config(ckpt)
    tokenizer = find_run_tokenizer(run, ckpt, log=lambda *_: None)
    if tokenizer is None:
        raise ValueError(f"{path}: the run's tokenizer was not found (data.tokenizer_model), so its export "
                         "would have none; export it with tools/convert_to_hf.py --tokenizer and pass that directory")
    return ckpt, run, tokenizer


# Files that hold an HF tokenizer's vocabulary: the fast tokenizer's, SentencePiece models (Llama's,
# T5-style spiece.model, XLM-R-style sentencepiece.bpe.model) and the older BPE / WordPiece vocabularies
# that AutoTokenizer also loads.
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                     "vocab.json", "vocab.txt")


def _check_tokenizer_fits(p: Path) -> None:
    """A tokenizer with more tokens than config.json's vocab_size (another model's) gives ids that have
    no embedding row: the harness would stop with an IndexError in the middle of a task."""
    import json

    from megatron_osp.convert.hf_tokenizer import tokenizer_vocab_size

    tok = next((p / f for f in ("tokenizer.json", "tokenizer.model") if (p / f).is_file()), None)
    try:
        vocab = json.loads((p / "config.json").read_text()).get("vocab_size")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p / 'config.json'} is not valid JSON ({e})") from None
    if tok is not None and isinstance(vocab, int) and (size := tokenizer_vocab_size(tok)) > vocab:
        raise ValueError(f"{tok} has {size} tokens, more than the vocab_size {vocab} of {p / 'config.json'}: "
                         "it is not this model's tokenizer")


@dataclass
class EvalModel:
    model: object  # transformers LlamaForCausalLM
    tokenizer_dir: str
    label: str
    kind: str
    seq_length: int
    tmp: tempfile.TemporaryDirectory | None = None

    def close(self):
        if self.tmp is not None:
            self.tmp.cleanup()


def load_eval_model(path: str, device="cpu", dtype=None, label: str | None = None, log=print) -> EvalModel:
    """An HF model object and its tokenizer directory; a Megatron checkpoint goes through its HF export."""
    import torch

    from megatron_osp.analysis.loading import describe_run, load_for_analysis

    dtype = dtype or torch.float32
    if check_model_path(path) == "hf":
        loaded = load_for_analysis(path, device=device, dtype=dtype, label=label)
        return EvalModel(loaded.model, str(path), loaded.label, "hf", loaded.seq_length)
    from megatron_osp.convert.hf_export import export_checkpoint

    ckpt, run, tokenizer = _run_tokenizer(path)
    tmp = tempfile.TemporaryDirectory(prefix="osp-downstream-")
    try:
        out = export_checkpoint(ckpt, Path(tmp.name) / "hf", dtype="float32", tokenizer_model=tokenizer, log=log)
        loaded = load_for_analysis(str(out), device=device, dtype=dtype)
    except BaseException:
        tmp.cleanup()
        raise
    return EvalModel(loaded.model, str(out), label or describe_run(run), "megatron", loaded.seq_length, tmp)


def _metrics(task_results: dict) -> dict[str, dict]:
    """{"acc": {"value", "stderr"}, "exact_match,strict-match": {...}} from one harness result row."""
    out = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if metric not in REPORTED or not isinstance(value, (int, float)):
            continue
        stderr = task_results.get(f"{metric}_stderr,{filt}")
        name = metric if filt in ("none", "") else f"{metric},{filt}"
        out[name] = {"value": float(value),
                     "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return out


def _headline(metrics: dict[str, dict]) -> tuple[str | None, dict | None]:
    for base in HEADLINE:
        for name, m in metrics.items():
            if name.partition(",")[0] == base:
                return name, m
    return None, None


def _loglikelihoods(samples: list[dict]) -> list[float]:
    lls = []
    for s in samples:
        for r in s.get("filtered_resps", []):
            if isinstance(r, (list, tuple)) and r and isinstance(r[0], float):
                lls.append(r[0])
    return lls


def evaluate_task(lm, spec: TaskSpec, tm, limit=None, keep_loglikelihoods=False) -> dict:
    """One task on one (already quantized) harness model: metrics, the headline score, n, seconds."""
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    with offline():
        out = simple_evaluate(model=lm, tasks=[spec.name], num_fewshot=spec.num_fewshot, limit=limit,
                              task_manager=tm, log_samples=keep_loglikelihoods)
    row = out["results"][spec.name]
    metrics = _metrics(row)
    name, head = _headline(metrics)
    res = {"metrics": metrics, "score_metric": name, "score": head["value"] if head else None,
           "stderr": head["stderr"] if head else None, "num_fewshot": spec.num_fewshot,
           "n": out.get("n-samples", {}).get(spec.name, {}).get("effective"),
           "seconds": time.perf_counter() - t0}
    if keep_loglikelihoods:
        res["loglikelihoods"] = [ll for t in sorted(out.get("samples", {})) for ll in _loglikelihoods(out["samples"][t])]
    return res


def evaluate_downstream(em: EvalModel, settings, specs: list[TaskSpec], tm, batch_size: int = 8, limit=None,
                        calibration=None, keep_loglikelihoods: bool = False,
                        on_task: Callable[[str, str, dict], None] | None = None,
                        on_setting: Callable[[str, dict], None] | None = None,
                        on_partial: Callable[[dict], None] | None = None, earlier: dict | None = None) -> dict:
    """``{"label", "kind", "settings": {setting: {"tasks": {task: ...}, "average"}}}`` for one model;
    each setting is applied in place with ``evaluation.apply_setting`` and undone afterwards.
    ``on_setting(name, result)``: after each setting, with the result so far (the same dict, summarized);
    ``on_partial(result)``: after each task of a setting not yet finished, which the result holds with
    the tasks done so far and ``"partial": true``. ``earlier``: this model's result from an earlier run
    of the same request (``--resume``), filled in place; the settings and the tasks of a partial setting
    it has are kept, not evaluated again."""
    from lm_eval.models.huggingface import HFLM

    from megatron_osp.analysis.evaluation import apply_setting, check_settings, check_token_ids
    from megatron_osp.analysis.model_parts import model_parts
    from megatron_osp.analysis.quantization import parse_setting

    parts = model_parts(em.model)
    settings = [parse_setting(s) if isinstance(s, str) else s for s in settings]
    check_settings(parts, settings, em.label)  # before any task runs: a late refusal would lose them all
    if any(s.gptq for s in settings):
        check_token_ids(parts, calibration, f"{em.label}: the GPTQ calibration windows")
    lm = HFLM(pretrained=em.model, tokenizer=em.tokenizer_dir, batch_size=batch_size)
    res = earlier if earlier is not None else {"label": em.label, "kind": em.kind, "settings": {}}
    finished = [name for name, s in res["settings"].items() if not s.get("partial")]
    for setting in [s for s in settings if s.name not in finished]:
        entry = res["settings"].setdefault(setting.name, {"tasks": {}, "average": None, "partial": True})
        tasks = entry["tasks"]
        with apply_setting(parts, setting, calibration=calibration, batch_size=batch_size):
            for spec in [spec for spec in specs if spec.name not in tasks]:
                tasks[spec.name] = evaluate_task(lm, spec, tm, limit=limit, keep_loglikelihoods=keep_loglikelihoods)
                if on_task is not None:
                    on_task(setting.name, spec.name, tasks[spec.name])
                if on_partial is not None and len(tasks) < len(specs):
                    on_partial(summarize(res))
        tasks = {spec.name: tasks[spec.name] for spec in specs}  # the suite's order, whichever ran first
        scores = [t["score"] for t in tasks.values() if t["score"] is not None]
        res["settings"][setting.name] = {"tasks": tasks, "average": sum(scores) / len(scores) if scores else None}
        if on_setting is not None:
            on_setting(setting.name, summarize(res))
    return summarize(res)


def summarize(res: dict) -> dict:
    """Adds each setting's drop from fp (per task and of the average, in the score's units)."""
    fp = res["settings"].get("fp")
    for name, s in res["settings"].items():
        if fp is None or name == "fp":
            continue
        for task, t in s["tasks"].items():
            base = fp["tasks"].get(task, {}).get("score")
            t["drop"] = None if base is None or t["score"] is None else base - t["score"]
        s["average_drop"] = (None if fp["average"] is None or s["average"] is None
                             else fp["average"] - s["average"])
    return res
