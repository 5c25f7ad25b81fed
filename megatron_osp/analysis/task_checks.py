"""What lm-evaluation-harness would only find out while scoring a model, checked before any model loads.

The harness builds a task from its YAML and data without looking at most documents; a malformed one
surfaces only when the task runs, after the model is loaded and every earlier task and setting has
been scored, and some never surface:

- a multiple-choice answer index past the choices, or an answer string that is not one of them, is
  scored as a wrong answer (a warning in the log), and so is a missing answer field (a JSON lines file
  whose record lacks ``label`` reads as ``None``): silently lower accuracy;
- a document with one choice is always scored right (silently higher accuracy);
- a document with no choices stops the run with ``not enough values to unpack``, one with an empty
  choice with ``assert len(continuation_enc) > 0``, one whose text is a number alone (read as a choice
  index) with ``Context is not a string``;
- two equal choices score the same and the harness picks one (the first, for exact ties): an answer
  on the other is counted wrong;
- more few-shot examples than the task's few-shot pool holds stop it with ``Sample larger than
  population``; few-shot examples drawn from the evaluated documents themselves (no training split,
  no ``fewshot_split``) can show a question with its own answer (silently higher accuracy).

``task_problems`` returns one line per problem (task, data file, document number, field). Documents
are checked for tasks whose data are local files (``dataset_path: json``, ``csv``, ...), the few-shot
pool for every task.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["task_problems", "yaml_problems", "defined_twice", "unreadable_yamls", "local_data_identity",
           "LOCAL_FORMATS"]

LOCAL_FORMATS = ("json", "csv", "parquet", "text", "arrow")
MAX_PER_TASK = 5


def _fields_of(template) -> set[str]:
    """The document fields a Jinja template (or a bare field name) reads."""
    if not isinstance(template, str):
        return set()
    if "{" not in template:
        return {template}
    from jinja2 import Environment, meta

    try:
        return set(meta.find_undeclared_variables(Environment().parse(template)))
    except Exception:  # noqa: BLE001 - the harness reports a template it cannot parse itself
        return set()


def _where(task, index: int) -> str:
    cfg = task.config
    split = cfg.test_split if task.has_test_docs() else cfg.validation_split
    files = (cfg.dataset_kwargs or {}).get("data_files")
    if isinstance(files, dict):
        files = files.get(split)
    if isinstance(files, (list, tuple)) and len(files) == 1:
        files = files[0]
    source = f"{files}" if isinstance(files, (str, Path)) else f"split {split!r}"
    line = _line_of(files, index) if isinstance(files, (str, Path)) and not cfg.process_docs else None
    return f"{source}: document {index + 1}" + (f" (line {line})" if line not in (None, index + 1) else "")


def _line_of(path, index: int) -> int | None:
    """The line of a JSON lines file that holds its document ``index`` (the reader skips blank lines, so
    the two differ after one); None for another format or a file that cannot be read here."""
    if Path(path).suffix not in (".jsonl", ".json"):
        return None
    try:
        with open(path, encoding="utf-8-sig") as f:
            seen = -1
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                if seen == -1 and text.lstrip().startswith("["):  # one JSON array, not JSON lines
                    return None
                seen += 1
                if seen == index:
                    return n
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _null_fields_used(templates, doc) -> list[str]:
    """Fields that are null in ``doc`` (a JSON lines record without them reads as None) and that a
    template would print (as the text ``None``): its output changes when the null becomes an empty
    string, which a test like ``{% if f %}`` treats the same."""
    from lm_eval.utils import apply_template

    used = set()
    for template in templates:
        nulls = [f for f in _fields_of(template) if f in doc and doc[f] is None]
        if not nulls:
            continue
        if "{" not in template:
            used.update(nulls)
            continue
        for f in nulls:
            try:
                if apply_template(template, doc) != apply_template(template, {**doc, f: ""}):
                    used.add(f)
            except Exception:  # noqa: BLE001 - reported when the document is formatted
                pass
    return sorted(used)


def _doc_problem(task, doc, templates) -> str | None:
    missing = _null_fields_used(templates, doc)
    if missing:
        return f"field {', '.join(repr(f) for f in missing)} is missing or null"
    try:
        text = task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if task.config.output_type != "multiple_choice":
            return None
        choices = task.doc_to_choice(doc)
    except Exception as e:  # noqa: BLE001 - a template that cannot render this document
        return f"cannot be formatted ({type(e).__name__}: {e})"
    if not isinstance(choices, (list, tuple)) or not choices:
        return f"has no answer choices (doc_to_choice gives {choices!r})"
    if len(choices) == 1:
        return f"has one answer choice ({list(choices)!r}): it is scored right whatever the model does"
    if isinstance(text, int) and not getattr(task, "multiple_input", False):
        return (f"its text is the number {text} alone, which the harness reads as a choice index (a "
                "multiple-input task's) and stops on ('Context is not a string'): give it other text")
    empty = [i for i, c in enumerate(choices) if isinstance(c, str) and not c.strip()]
    if empty:
        return (f"choice {empty[0]} is {choices[empty[0]]!r}: an empty choice has no tokens to score "
                "(the harness stops on it, or scores only the delimiter)")
    for i, c in enumerate(choices):
        if c in choices[:i]:
            return (f"choices {list(choices).index(c)} and {i} are both {c!r}: equal choices score the same, so "
                    "which one the harness picks is arbitrary (the first, for exact ties) and an answer on the "
                    "other is counted wrong")
    golds = text if isinstance(text, int) else target  # multiple-input tasks: the text picks the choice
    for gold in golds if isinstance(golds, list) else [golds]:
        if isinstance(gold, bool) or not isinstance(gold, (int, str)):
            return f"answer {gold!r} is neither a choice index nor a choice"
        if isinstance(gold, int) and not 0 <= gold < len(choices):
            return f"answer index {gold} is outside its {len(choices)} choices (0..{len(choices) - 1})"
        if isinstance(gold, (str, float)) and gold not in choices and _is_fraction(gold):
            return (f"answer {gold!r} is a number with a fraction, not a choice index: one answer written as 1.0 "
                    "or 1.5 in a JSON lines file makes the reader read that field of every document as a float")
        if isinstance(gold, str) and gold not in choices:
            return f"answer {gold!r} is not one of its choices {list(choices)!r}"
    return None


def _is_fraction(value) -> bool:
    try:
        return not isinstance(value, bool) and "." in str(value) and float(value) == float(value)
    except ValueError:
        return False


def _fewshot_problem(task, shots: int) -> str | None:
    sampler = getattr(task, "sampler", None)
    if shots <= 0 or sampler is None:
        return None
    pool = len(sampler.fewshot_docs())
    fewshot_split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
    # Drawn from the evaluated split, the harness samples one more and drops the document being asked.
    need = shots + (1 if fewshot_split is not None and fewshot_split == task.config.test_split else 0)
    if pool < need:
        return (f"{shots}-shot needs {need} few-shot examples, but its few-shot pool has {pool}"
                + (" (the evaluated document itself is left out)" if need > shots else ""))
    cfg = task.config
    if getattr(getattr(task, "fewshot_cfg", None), "samples", None) is not None:  # examples of its own, not documents
        return None
    evaluated = cfg.test_split if task.has_test_docs() else cfg.validation_split
    drawn = fewshot_split or (cfg.training_split if task.has_training_docs() else
                              cfg.validation_split if task.has_validation_docs() else cfg.test_split)
    if drawn == evaluated and need == shots:  # the harness leaves the asked document out only in the case above
        return (f"its {shots}-shot examples are drawn from the evaluated documents (split {evaluated!r}) without "
                "leaving the asked one out, so a question can be shown with its own answer: add 'fewshot_split: "
                f"{evaluated}' to its YAML (the harness then leaves it out) or give it a training split")
    return None


def _yaml_files(include_path) -> list[Path]:
    """The YAMLs under ``include_path`` the harness indexes, in its order."""
    return [p for p in sorted(Path(include_path).glob("**/*.yaml"), key=lambda p: p.as_posix())
            if not any(part in ("__pycache__", ".ipynb_checkpoints") for part in p.parts)]


def unreadable_yamls(include_path) -> list[str]:
    """One line per YAML under ``include_path`` that is not valid YAML (naming its line): the harness skips
    such a file without a word, so a task it declares is reported as no task at all."""
    import yaml

    class Loader(yaml.SafeLoader):  # the harness's tags (!function) are not the question here
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    out = []
    for path in _yaml_files(include_path):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as e:
            mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else f"{path}"
            since = f"{e.context} on line {context.line + 1}: " if context is not None and e.context else ""
            out.append(f"{where}: not valid YAML ({since}{getattr(e, 'problem', None) or e})")
        except (OSError, UnicodeDecodeError) as e:
            out.append(f"{path}: cannot be read ({e})")
    return out


def defined_twice(include_path, names) -> list[str]:
    """Each of ``names`` that two or more YAMLs under ``include_path`` declare (``task: NAME``), one line
    naming the files: the harness takes the first in path order and skips the rest with a log line, so
    tasks regenerated into a subdirectory (or a copy kept beside them) were scored on whichever data
    sorted first."""
    import re

    declares = re.compile(r"""^task:[ \t]*(["']?)([^\s"'#]+)\1[ \t]*(#.*)?$""")
    found: dict[str, list[str]] = {}
    for path in _yaml_files(include_path):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue  # the harness reports a YAML it cannot read
        for line in lines:
            if (m := declares.match(line)) and m.group(2) in names:
                found.setdefault(m.group(2), []).append(str(path))
    return [f"task {name}: declared by {len(files)} YAMLs under --include-path ({', '.join(files)}): the harness "
            "evaluates the first and skips the others without a word; remove or rename the ones not meant"
            for name, files in found.items() if len(files) > 1]


def yaml_problems(name: str, entry) -> list[str]:
    """Problems of a task's own YAML (``entry``: its TaskManager index entry) that the harness reports
    without naming the file or the field, or at all: an unknown key (``TypeError: ... unexpected keyword
    argument``), a ``num_fewshot`` that is not a whole number (``'>' not supported between 'str' and
    'int'``), a metric it does not know (``KeyError: None``). Groups and Python-class tasks are left to
    the harness."""
    import dataclasses

    from lm_eval.api.task import TaskConfig

    cfg, path = getattr(entry, "cfg", None), getattr(entry, "yaml_path", None)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str) or "class" in cfg or "group" in cfg:
        return []
    where = f"task {name}: {path}"
    problems = []
    unknown = sorted(str(k) for k in cfg if k not in {f.name for f in dataclasses.fields(TaskConfig)} | {"include"})
    if unknown:
        problems.append(f"{where}: unknown key {', '.join(repr(k) for k in unknown)} (not a field of the harness's "
                        "task config)")
    shots = cfg.get("num_fewshot")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        problems.append(f"{where}: num_fewshot is {shots!r}, not a whole number >= 0")
    metrics = cfg.get("metric_list")
    if metrics is not None and "process_results" not in cfg:  # a task's own scoring may name its own metrics
        import lm_eval.api.metrics  # noqa: F401 - fills the registry
        from lm_eval.api.registry import metric_registry

        for m in metrics if isinstance(metrics, list) else [metrics]:
            metric = m.get("metric") if isinstance(m, dict) else None
            if not isinstance(metric, str):
                problems.append(f"{where}: metric_list entry {m!r} is not {{metric: NAME}}")
            elif metric not in metric_registry:
                problems.append(f"{where}: metric {metric!r} is not a metric of lm-evaluation-harness "
                                f"({', '.join(sorted(metric_registry))})")
    return problems


def task_problems(name: str, task, num_fewshot: int | None) -> list[str]:
    """Problems of one built harness task (``name`` as the user gave it), one line each."""
    shots = num_fewshot if num_fewshot is not None else (task.config.num_fewshot or 0)
    problems = []
    if (p := _fewshot_problem(task, shots)) is not None:
        problems.append(f"task {name}: {p}")
    if task.config.dataset_path not in LOCAL_FORMATS:
        return problems
    cfg = task.config
    templates = [t for t in (cfg.doc_to_text, cfg.doc_to_target, cfg.doc_to_choice) if isinstance(t, str)]
    found = 0
    docs = task.eval_docs
    for i, doc in enumerate(docs):
        p = _doc_problem(task, doc, templates)
        if p is None:
            continue
        found += 1
        if found <= MAX_PER_TASK:
            problems.append(f"task {name}: {_where(task, i)}: {p}")
    if found > MAX_PER_TASK:
        problems.append(f"task {name}: ... {found - MAX_PER_TASK} more documents with problems")
    if len(docs) == 0:
        problems.append(f"task {name}: {_where(task, 0).rsplit(':', 1)[0]} has no documents")
    return problems


def local_data_identity(task) -> str | None:
    """sha256 of what a task with local data files (``dataset_path: json``, ...) is scored on: its
    configuration (prompt templates, data files, metrics) and every evaluated and few-shot document.
    None for a task of the hub (its cached data does not change under the same name). ``--resume``
    compares it, so that results of regenerated or edited task files are not mixed with earlier ones."""
    if task.config.dataset_path not in LOCAL_FORMATS:
        return None
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(json.dumps(task.config.to_dict(), sort_keys=True, default=str).encode())
    sampler = getattr(task, "sampler", None)
    pools = [("eval", task.eval_docs)] + ([("fewshot", sampler.fewshot_docs())] if sampler is not None else [])
    for kind, docs in pools:
        h.update(f"\0{kind}\0".encode())
        for doc in docs:
            h.update(json.dumps(doc, sort_keys=True, default=str).encode() + b"\n")
    return h.hexdigest()
