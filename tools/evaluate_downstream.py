#!/usr/bin/env python
"""Downstream benchmark accuracy at full precision and under W-A-KV quantization, per model.

    python tools/evaluate_downstream.py runs/quickstart/adam runs/quickstart/osp \\
        --settings fp,4-4-4,4-4-4+had,4-4-4+quarot --tasks osp-paper --output-dir runs/quickstart/downstream

Each MODEL is a Megatron checkpoint (run directory, save dir with ``latest`` or ``iter_N``; evaluated
as its HF export, made in a temporary directory) or an HF Llama directory with its tokenizer. Each
setting is applied with the project's quantization (as tools/evaluate_quantization.py applies it) and
the model object is scored by lm-evaluation-harness in-process (pip install -e ".[eval]").

--tasks: ``osp-paper`` (the OSP paper's suite: arc_easy, arc_challenge, commonsense_qa, gsm8k 8-shot,
hellaswag, mmlu, openbookqa, piqa, social_iqa, triviaqa 5-shot, winogrande; 0-shot otherwise) and/or
any harness task name, comma-separated, ``NAME:SHOTS`` to set the shots. Data is read offline: from the
local HF datasets cache, or local files named by task YAMLs in --include-path. Every task's data is
checked before any model is loaded. ``+gptq`` settings need --calibration-data (an indexed dataset).

Writes downstream.json, downstream.md and downstream_average.png (with matplotlib) into --output-dir.
The JSON and Markdown are rewritten after every finished setting of every model, marked partial
("complete": false, and which models/settings are done and which are not) until the last one; the plot
is drawn when the run completes. A model that fails stops the run with its error, and what was done
before stays in the report. A report already in --output-dir is not replaced unless --overwrite says
so; --resume continues it, evaluating only the (model, setting, task) triples it lacks (the report is
also written after every task), refused, naming the difference, if the models or options are not the
ones it was made with.
"""

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="Megatron checkpoint / run directories or HF model directories")
    p.add_argument("--labels", help="comma-separated, one label per model (default: the run's optimizer/norm/EmbProj)")
    p.add_argument("--settings", default="fp,4-4-4,4-4-4+had,4-4-4+quarot",
                   help="comma-separated W-A-KV settings, as evaluate_quantization.py takes them (default "
                        "fp,4-4-4,4-4-4+had,4-4-4+quarot; +gptq settings need --calibration-data)")
    p.add_argument("--tasks", default="osp-paper", help="suite name and/or harness task names (default osp-paper)")
    p.add_argument("--include-path", help="directory of extra harness task YAMLs (local data files)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--limit", type=float, help="at most this many examples per task (a fraction when < 1); for tests")
    p.add_argument("--calibration-data", help="indexed dataset prefix (PREFIX.bin/.idx) for +gptq calibration, or a "
                                              "sharded output's (PREFIX.shards.json: its shards)")
    p.add_argument("--calibration-documents", default="0:1",
                   help="fraction range LO:HI of its documents, of each shard's for a sharded output (default 0:1)")
    p.add_argument("--calibration-windows", type=int, default=16,
                   help="GPTQ calibration sequences (default 16); refused when --calibration-documents hold fewer")
    p.add_argument("--calibration-selection", choices=["spread", "first"], default="spread",
                   help="which calibration windows, when the documents hold more than asked for: evenly spaced over "
                        "all of them (default) or the first ones (reports made before this option)")
    p.add_argument("--seq-length", type=int, help="calibration sequence length (default: the model's)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue the report already in --output-dir (same models, tasks and options): its "
                        "finished settings are kept, the rest are evaluated; without one, start anew")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --output-dir")
    return p.parse_args(argv)


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="task", file=sys.stderr, disable=not sys.stderr.isatty())
    except ImportError:  # pragma: no cover
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_osp.training.checkpoint_integrity import CheckpointError

    try:
        return _run(args)
    except (ValueError, FileNotFoundError, ImportError, CheckpointError) as e:  # bad input: clear lines, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check(args):
    """Everything that can be refused, before any model is loaded."""
    from megatron_osp.analysis.downstream import check_model_path, check_tasks, parse_tasks, require_harness
    from megatron_osp.analysis.evaluation import check_window_count, parse_document_range
    from megatron_osp.analysis.loading import (check_data_tokenizer, check_group_sizes, config_facts, labels_problem,
                                               models_problem)
    from megatron_osp.analysis.quantization import parse_settings

    settings = parse_settings(args.settings.split(","))
    names = [s.name for s in settings]
    labels = [x.strip() for x in args.labels.split(",")] if args.labels is not None else None
    problem = labels_problem(labels, args.models) or models_problem(args.models)
    if problem:
        raise ValueError(problem)
    for option, value in (("--batch-size", args.batch_size), ("--calibration-windows", args.calibration_windows),
                          ("--seq-length", args.seq_length)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if args.limit is not None and not math.isfinite(args.limit):  # inf: an OverflowError traceback; nan: taken
        raise ValueError(f"--limit must be a number, got {args.limit}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be > 0, got {args.limit}")
    if args.limit is not None and args.limit >= 1 and args.limit != int(args.limit):  # was cut to int silently
        raise ValueError(f"--limit {args.limit:g}: a number of examples must be whole (a fraction of the "
                         "examples is given as a number below 1)")
    if any(s.gptq for s in settings):
        if not args.calibration_data:
            raise ValueError(f"--settings {','.join(n for n in names if 'gptq' in n)}: GPTQ needs "
                             "--calibration-data (an indexed dataset prefix)")
        from megatron_osp.data.document_view import check_dataset_files

        check_dataset_files(args.calibration_data, "--calibration-data")  # a sharded output: its shards
        docs = parse_document_range(args.calibration_documents)
    for m in args.models:
        check_model_path(m)
        check_group_sizes(m, settings)
        if any(s.gptq for s in settings):  # each model's calibration windows are of its sequence length
            check_data_tokenizer(m, args.calibration_data, "--calibration-data")
            if args.seq_length is not None and args.seq_length > (window := config_facts(m)[0]):
                raise ValueError(f"{m}: its window is {window} tokens, shorter than --seq-length {args.seq_length}: "
                                 "GPTQ would calibrate on positions it never trained on")
            check_window_count(args.calibration_data, args.seq_length or config_facts(m)[0],
                               args.calibration_windows, docs, "--calibration-windows")
    require_harness()
    specs = parse_tasks(args.tasks)
    task_data = {}  # the local task files' content, for --resume
    tm = check_tasks(specs, args.include_path, identities=task_data, models=args.models,
                     limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit)
    return settings, labels, specs, tm, task_data


def _calibration_windows(args, settings) -> list | None:
    """Each model's GPTQ calibration windows (of its sequence length), None without a +gptq setting."""
    from megatron_osp.analysis.evaluation import load_token_windows, parse_document_range
    from megatron_osp.analysis.loading import config_facts

    if not any(s.gptq for s in settings):
        return None
    docs = parse_document_range(args.calibration_documents)
    return [load_token_windows(args.calibration_data, args.seq_length or config_facts(m)[0], args.calibration_windows,
                               docs, selection=args.calibration_selection) for m in args.models]


def _request(args, settings, labels, specs, pinned, calibs, task_data=None) -> dict:
    """What decides the report's numbers, for --resume (analysis/report_resume.py); ``pinned``: each
    model's (path to load, identity) from report_resume.pin_model; ``calibs``: _calibration_windows;
    ``task_data``: the local tasks' content digests (check_tasks), None without local tasks."""
    from megatron_osp.analysis.report_resume import software_versions, tokens_identity

    calibration = None if calibs is None else [tokens_identity(c) for c in calibs]
    return {
        "models": [{"path": str(m), "identity": ident} for m, (_, ident) in zip(args.models, pinned)],
        "versions": software_versions(harness=True),
        "options": {"labels": labels, "settings": [s.name for s in settings], "tasks": [s.label for s in specs],
                    "include_path": args.include_path, "batch_size": args.batch_size, "limit": args.limit,
                    "dtype": args.dtype},
        "calibration": calibration,
        **({"task_data": task_data} if task_data else {}),  # absent without local tasks: older reports resume
    }


def _run(args) -> int:
    import warnings

    for pattern in (".*Apex.*", ".*Transformer Engine.*", ".*deprecated.*", ".*TypedStorage.*"):
        warnings.filterwarnings("ignore", message=pattern)
    settings, labels, specs, tm, task_data = _check(args)
    from megatron_osp.analysis.report_resume import open_report, pin_model

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    pinned = [pin_model(m) for m in args.models]  # (what to load, what the report records)
    calibs = _calibration_windows(args, settings)
    request = _request(args, settings, labels, specs, pinned, calibs, task_data)
    request["options"]["device"] = device  # numbers measured on another device's kernels differ slightly
    earlier = open_report(Path(args.output_dir) / "downstream.json", args.resume, args.overwrite, request)

    from megatron_osp.analysis.downstream import evaluate_downstream, load_eval_model
    from megatron_osp.analysis.downstream_report import format_markdown, write_report
    from megatron_osp.analysis.evaluation import check_token_ids
    from megatron_osp.analysis.report_progress import ReportProgress

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    import lm_eval

    meta = {"harness": f"lm-evaluation-harness {getattr(lm_eval, '__version__', '?')}",
            "tasks": ", ".join(s.label for s in specs), "settings": ", ".join(s.name for s in settings),
            "device": device, "dtype": args.dtype, "batch_size": args.batch_size, "limit": limit}
    if calibs is not None:  # the GPTQ calibration windows' source; a sharded output's range is of each shard
        from megatron_osp.data.shardset import expand

        meta.update(calibration_data=f"{args.calibration_data} documents {args.calibration_documents}",
                    calibration_shards=len(expand(args.calibration_data)),
                    calibration_selection=args.calibration_selection)
    bar = _progress(len(args.models) * len(settings) * len(specs))
    log = bar.write if bar is not None else print
    progress = ReportProgress(args.models, [s.name for s in settings], request)
    results = []  # in model order; an earlier run's entries (--resume) are filled in where they stand
    if earlier is not None:
        log(f"resuming {earlier.path}: {earlier.summary()}")
        results = earlier.restore(progress)
        if bar is not None:
            bar.update(sum(len(s["tasks"]) for r in results for s in r["settings"].values()))
    for i, path in enumerate(args.models):
        prior = earlier.result(i) if earlier is not None else None
        if prior is not None and progress.finished(i):
            log(f"== {path}: done in the earlier run")
            continue
        log(f"== {path}")
        label = prior["label"] if prior is not None else (labels[i] if labels else None)
        em = load_eval_model(pinned[i][0], device=device, dtype=dtype, label=label, log=lambda *a: None)
        if any(r["label"] == em.label for r in results if r is not prior):  # default labels (optimizer/norms,
            em.label = f"{em.label} ({path})"  # directory name)
        try:
            calib = None if calibs is None else calibs[i]
            if calib is not None:
                check_token_ids(em.model, calib, f"{em.label}: --calibration-data {args.calibration_data}")

            def on_task(setting, task, res, label=em.label):
                if bar is not None:
                    bar.set_description(f"{label} {setting}")
                    bar.update(1)
                score = "–" if res["score"] is None else f"{100 * res['score']:.2f}"
                log(f"  {label}: {setting:<14} {task:<16} {res['score_metric']} {score} ({res['seconds']:.1f}s)")

            t0 = time.perf_counter()

            seconds0 = prior.get("seconds", 0.0) if prior is not None else 0.0

            def on_partial(res, i=i, path=path):  # the report so far, marked partial until the last unit
                res["path"], res["model_index"] = str(path), i
                res["seconds"] = seconds0 + time.perf_counter() - t0
                if not any(r is res for r in results):
                    results.append(res)
                    results.sort(key=lambda r: r["model_index"])
                if not progress.complete:
                    write_report(results, args.output_dir, meta, plots=False, log=log, progress=progress.status())

            def on_setting(setting, res, i=i):
                progress.mark(i, setting)
                on_partial(res)

            res = evaluate_downstream(em, settings, specs, tm, batch_size=args.batch_size, limit=limit,
                                      calibration=calib, on_task=on_task, on_setting=on_setting,
                                      on_partial=on_partial, earlier=prior)
            res["seconds"] = seconds0 + time.perf_counter() - t0
        finally:
            em.close()
        del em
        if device == "cuda":
            torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    print()
    print(format_markdown(results, meta, progress.status()))
    paths = write_report(results, args.output_dir, meta, plots=not args.no_plots, progress=progress.status())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
