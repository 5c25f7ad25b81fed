"""Preprocessing split over N independent tasks (a SLURM array), then merged in order.

Task ``I`` of ``N`` takes a contiguous run of the input files (``plan``: balanced by bytes on disk,
deterministic) and writes an ordinary preprocessing output (staged, published with a manifest,
megatron_osp/data/shardset.py) under the prefix ``PREFIX_task0000Iof0000N``. The zero-padded index
sorts the tasks in order by name, and the count in the name keeps the outputs of runs with different
N apart. Because each task's files follow the previous task's, concatenating the tasks' datasets in
task order is the single run's document order; ``merge_tasks`` (megatron_osp/data/merge.py) does that
through the single run's writer and publishes ``PREFIX_<key>_document``, byte-identical (.bin and
.idx) to a single run over the same files with the merge's ``--max-shard-tokens`` (none: unsharded),
whatever shard size the tasks used.

Each task's manifest records, under ``"array"``, what the merge needs to refuse a set that is not
one run: the task index and count, its files (absolute path, size, mtime) and their position in the
input list, and the run's identity: a hash of the whole input list and of every option that
changes the tokens (the tokenizer file's SHA-256, its EOD id, the keys, ``append_eod``, and
``special_tokens_in_text`` unless it is the default ``encode``, so that tasks of a run started before
the option existed are still one run with tasks rerun after). A failed
task publishes nothing, so its manifest is missing (or, if it ran before, is the earlier run's: a
different identity, refused, unless the files and options were the same, when it is the same data).

The identity holds the tokenizer file's SHA-256, not its behaviour fingerprint
(data/tokenizer_identity.py), which merging separate datasets and training go by: tasks of one run
were given one file, so a task whose file has other bytes was started differently from the others
(another path or version of the tokenizer), which is what this check exists to catch; and the merged
manifest names one tokenizer file and its sha256 for all tasks, which would be wrong for some of
them. A set refused for that alone can be merged as separate datasets (``merge_datasets.py
--input``), which accepts tokenizers of one fingerprint.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from collections import Counter

from megatron_osp.data import shardset

TASK_NAME = "{prefix}_task{index:05d}of{count:05d}"
MAX_TASKS = 99999


def plan(sizes: list[int], num_tasks: int) -> list[tuple[int, int]]:
    """Split files of ``sizes`` bytes (in order) into ``num_tasks`` contiguous ranges ``[lo, hi)``.

    Boundary ``i`` is the file boundary nearest to ``i / num_tasks`` of the total bytes (ties: the
    earlier one), so every task's bytes are within one file size of the ideal total / num_tasks.
    Integer arithmetic only: the same sizes give the same plan on every machine. A task can be
    empty (more tasks than files, or one file larger than several tasks' share).
    """
    if num_tasks < 1:
        raise ValueError(f"the number of tasks must be >= 1, got {num_tasks}")
    prefix = [0]
    for s in sizes:
        if s < 0:
            raise ValueError(f"file size {s} < 0")
        prefix.append(prefix[-1] + s)
    total, n = prefix[-1], num_tasks
    bounds = [0]
    for i in range(1, n):
        j = bisect.bisect_left(prefix, (i * total + n - 1) // n)  # first boundary at or past the target
        best = j
        if j > 0 and abs(n * prefix[j - 1] - i * total) <= abs(n * prefix[j] - i * total):
            best = bisect.bisect_left(prefix, prefix[j - 1])  # the earlier boundary, first of equal ones
        bounds.append(max(best, bounds[-1]))
    bounds.append(len(sizes))
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


def task_prefix(output_prefix: str, index: int, count: int) -> str:
    return TASK_NAME.format(prefix=output_prefix, index=index, count=count)


def _int_env(env, name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number") from None


def resolve_task(num_tasks: int | None, task_index: int | None, env=os.environ) -> tuple[int, int, str] | None:
    """(index, count, where they came from) of this task, or None for a single run.

    Explicit ``--num-tasks``/``--task-index`` win. Left out, they come from a SLURM array:
    ``SLURM_ARRAY_TASK_COUNT`` tasks, numbered from ``SLURM_ARRAY_TASK_MIN`` (so ``--array=1-8``
    gives tasks 0..7); an array with gaps or steps (``MAX - MIN + 1 != COUNT``) is refused, and
    without ``SLURM_ARRAY_TASK_MIN`` the ids must already be 0..COUNT-1. With ``--num-tasks`` given
    and no ``--task-index``, ``SLURM_ARRAY_TASK_ID`` is the task index itself (so ``--array=2,5``
    reruns tasks 2 and 5 of the set). One task in all is a single run: ordinary output names.
    """
    count_env, id_env = _int_env(env, "SLURM_ARRAY_TASK_COUNT"), _int_env(env, "SLURM_ARRAY_TASK_ID")
    lo_env, hi_env = _int_env(env, "SLURM_ARRAY_TASK_MIN"), _int_env(env, "SLURM_ARRAY_TASK_MAX")
    source = "--num-tasks/--task-index"
    if num_tasks is not None and not 1 <= num_tasks <= MAX_TASKS:  # before the questions about the index
        raise ValueError(f"--num-tasks {num_tasks}: must be 1..{MAX_TASKS}")
    if num_tasks is None and task_index is not None:
        raise ValueError("--task-index needs --num-tasks (or a SLURM array job, SLURM_ARRAY_TASK_COUNT)")
    if num_tasks is None:
        if count_env is None or id_env is None:
            return None
        num_tasks = count_env
        if lo_env is not None and hi_env is not None:
            if hi_env - lo_env + 1 != count_env:
                raise ValueError(
                    f"this SLURM array's ids {lo_env}..{hi_env} are not {count_env} consecutive numbers "
                    f"(SLURM_ARRAY_TASK_MIN/MAX/COUNT): a step or a list cannot be mapped to tasks; use "
                    f"--array={lo_env}-{lo_env + count_env - 1}, or give --num-tasks (array ids = task indices)")
            task_index, source = id_env - lo_env, f"SLURM_ARRAY_TASK_ID {id_env} - SLURM_ARRAY_TASK_MIN {lo_env}"
        else:
            task_index, source = id_env, "SLURM_ARRAY_TASK_ID; no SLURM_ARRAY_TASK_MIN, so ids are taken as 0-based"
        source += f"; SLURM_ARRAY_TASK_COUNT {count_env}"
    elif num_tasks == 1 and task_index in (None, 0):
        return None
    elif task_index is None:
        if id_env is None:
            raise ValueError(f"--num-tasks {num_tasks} needs --task-index (or a SLURM array job: SLURM_ARRAY_TASK_ID)")
        task_index, source = id_env, "SLURM_ARRAY_TASK_ID as the index, since --num-tasks is given"
    if not 1 <= num_tasks <= MAX_TASKS:
        raise ValueError(f"--num-tasks {num_tasks}: must be 1..{MAX_TASKS}")
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} (from {source}) is not in 0..{num_tasks - 1}")
    if num_tasks == 1:
        return None
    return task_index, num_tasks, source


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def file_records(paths: list[str]) -> list[list]:
    """[absolute path, size, mtime in ns] of each input file (what the run's identity covers)."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def task_record(paths: list[str], index: int, count: int, tokenizer, tokenizer_file: str,
                json_keys, append_eod: bool, special_tokens_in_text: str = "encode") -> tuple[list[str], dict]:
    """This task's share of ``paths`` and the ``"array"`` record for its manifest."""
    records = file_records(paths)
    lo, hi = plan([r[1] for r in records], count)[index]
    options = {"tokenizer_sha256": shardset.sha256_file(tokenizer_file), "vocab_size": int(tokenizer.vocab_size),
               "eod": int(tokenizer.eod), "json_keys": list(json_keys), "append_eod": bool(append_eod)}
    if special_tokens_in_text != "encode":  # left out at the default: such a run's identity is as before
        options["special_tokens_in_text"] = special_tokens_in_text
    run = {"options": options, "num_tasks": count, "input_count": len(records),
           "input_bytes": sum(r[1] for r in records), "inputs_sha256": _digest(records)}
    return paths[lo:hi], {"task_index": index, "first_file": lo, "files": records[lo:hi],
                          "tokenizer": os.path.abspath(tokenizer_file), **run, "run": _digest(run)}


# ---------------------------------------------------------------------------------------------------
# The merge side: find the task set of a prefix and check it is one complete run.

def _stage_dirs(directory: str, task_base: str) -> list[str]:
    pat = re.compile(rf"^\.{re.escape(task_base)}\.stage-")
    return sorted(n for n in os.listdir(directory) if pat.match(n))


def _describe(run: dict, key: str):
    if key == "inputs":
        return f"{run['input_count']} files, {run['input_bytes']:,} bytes (list hash {run['inputs_sha256'][:12]})"
    if key == "tokenizer_sha256":
        return f"tokenizer {run.get('tokenizer')} (sha256 {run['options'][key][:12]})"
    if key == "special_tokens_in_text":
        return f"{key}={run['options'].get(key, 'encode')!r}"
    return f"{key}={run['options'][key]!r}"


def _difference(a: dict, b: dict) -> str:
    for key in ("tokenizer_sha256", "vocab_size", "eod", "json_keys", "append_eod", "special_tokens_in_text"):
        if a["options"].get(key) != b["options"].get(key):
            return f"{_describe(a, key)} vs {_describe(b, key)}"
    same_size = (a["input_count"], a["input_bytes"]) == (b["input_count"], b["input_bytes"])
    return (f"input files: {_describe(a, 'inputs')} vs {_describe(b, 'inputs')}"
            + (" (other paths, or a file rewritten or touched between the tasks)" if same_size else ""))


def find_task_set(output_prefix: str, num_tasks: int | None = None) -> dict:
    """The task outputs of ``output_prefix`` as one run, or a ValueError/FileNotFoundError naming
    every missing or incomplete task, or the tasks that come from another run.

    Returns {"num_tasks", "keys", "datasets": {key: [dataset prefixes in order]}, "run": the
    identity record, "inputs": every input file in order, "skip_bad_records": any task skipped}.
    """
    directory = os.path.dirname(os.path.abspath(output_prefix))
    base = os.path.basename(output_prefix)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    suffix = re.escape(shardset.MANIFEST_SUFFIX)
    pat = re.compile(rf"^{re.escape(base)}_task(\d{{5}})of(\d{{5}})_(.+)_document{suffix}$")
    found: dict[int, dict[int, dict[str, str]]] = {}
    for name in sorted(os.listdir(directory)):
        m = pat.match(name)
        if m:
            family = os.path.join(directory, name[: -len(shardset.MANIFEST_SUFFIX)])
            found.setdefault(int(m.group(2)), {}).setdefault(int(m.group(1)), {})[m.group(3)] = family
    if num_tasks is None:
        if not found:
            raise FileNotFoundError(f"{output_prefix}: no array task outputs ({base}_taskNNNNNofNNNNN_<key>_document"
                                    f"{shardset.MANIFEST_SUFFIX}) in {directory}")
        if len(found) > 1:
            sizes = " and ".join(map(str, sorted(found)))
            raise ValueError(f"{output_prefix}: task outputs of runs with {sizes} tasks are both there: "
                             "give --num-tasks, or remove the other run's files")
        num_tasks = next(iter(found))
    tasks = found.get(num_tasks, {})
    manifests: dict[int, dict[str, dict]] = {}
    problems = []
    for i in range(num_tasks):
        where = task_prefix(os.path.join(directory, base), i, num_tasks)
        if i not in tasks:
            stages = _stage_dirs(directory, os.path.basename(where))
            problems.append(f"task {i} (--task-index {i}): no complete output, {where}_<key>_document"
                            f"{shardset.MANIFEST_SUFFIX} is missing (the task failed, was killed or has not run)"
                            + (f"; its unfinished stage {stages[0]} is there" if stages else ""))
            continue
        manifests[i] = {}
        for key, family in tasks[i].items():
            m = shardset.read_manifest(family)
            if m["state"] != "complete" or not isinstance(m.get("array"), dict):
                problems.append(f"task {i} (--task-index {i}): {shardset.manifest_path(family)} is "
                                + ("not complete (interrupted while publishing)" if m["state"] != "complete"
                                   else "not an array task's manifest"))
                continue
            a = m["array"]
            if a.get("task_index") != i or a.get("num_tasks") != num_tasks:
                problems.append(f"task {i}: {shardset.manifest_path(family)} records task {a.get('task_index')} "
                                f"of {a.get('num_tasks')}; it was renamed or copied")
                continue
            manifests[i][key] = m
    if problems:
        raise FileNotFoundError(f"{output_prefix}: the array of {num_tasks} tasks is not complete; nothing merged:\n  "
                                + "\n  ".join(problems) + "\nrerun those tasks (the others' outputs stay valid)")
    runs = {i: next(iter(ms.values()))["array"] for i, ms in manifests.items()}
    common, _ = Counter(m["array"]["run"] for ms in manifests.values() for m in ms.values()).most_common(1)[0]
    ref = next(r for r in runs.values() if r["run"] == common)
    same = [i for i, ms in manifests.items() if all(m["array"]["run"] == common for m in ms.values())]
    for i, ms in manifests.items():
        for key, m in ms.items():
            if m["array"]["run"] != common:
                raise ValueError(
                    f"{output_prefix}: task {i} ({shardset.manifest_path(tasks[i][key])}) comes from a different run "
                    f"than task(s) {', '.join(map(str, same))}: {_difference(m['array'], ref)}; rerun task {i} with "
                    "the same inputs and options, or rerun the whole array")
        if set(ms) != set(ref["options"]["json_keys"]):
            raise ValueError(f"{output_prefix}: task {i} has outputs for keys {sorted(ms)}, the run's keys are "
                             f"{ref['options']['json_keys']}")
    records, position = [], 0
    for i in range(num_tasks):
        a = runs[i]
        if a["first_file"] != position:
            raise ValueError(f"{output_prefix}: task {i} starts at input file {a['first_file']}, but the tasks before "
                             f"it end at {position}; the tasks do not split the inputs the same way")
        records += a["files"]
        position += len(a["files"])
    if position != ref["input_count"] or _digest(records) != ref["inputs_sha256"]:
        raise ValueError(f"{output_prefix}: the tasks' files together are not the run's input list "
                         f"({position} of {ref['input_count']} files); rerun the array")
    datasets = {key: [p for i in range(num_tasks) for p in shardset.expand(tasks[i][key])]
                for key in ref["options"]["json_keys"]}
    skip = any(m.get("skip_bad_records") for ms in manifests.values() for m in ms.values())
    return {"num_tasks": num_tasks, "keys": ref["options"]["json_keys"], "datasets": datasets, "run": ref,
            "inputs": [r[0] for r in records], "skip_bad_records": skip,
            "families": [tasks[i][k] for i in range(num_tasks) for k in ref["options"]["json_keys"]]}
