#!/usr/bin/env python
"""Perplexity at full precision and under 4-bit fake quantization, with outlier statistics, per model.

    python tools/evaluate_quantization.py runs/quickstart/adam runs/quickstart/osp \\
        --data runs/quickstart/corpus_text_document --num-windows 16 --output-dir runs/quickstart/quant

Each MODEL is a Megatron checkpoint (a run directory with checkpoints/, a save dir with ``latest`` or
an ``iter_N`` dir; rebuilt at TP=1 from its saved run config) or an HF Llama directory. The held-out
documents default to the validation split of the Megatron checkpoints' runs (``data.split``; all
of --data when it is one of a run's ``data.valid_paths``): the documents every one of them held out,
refused when they share none; without a Megatron checkpoint, the last 5% of the documents
(``--documents LO:HI`` to choose). Writes quantization.json,
quantization.md, kurtosis_per_layer.png and perplexity_vs_bits.png into --output-dir. The report ends
with a per-role table of 4-bit weight rounding (perplexity with one role rounded, the relative weight
and output errors, the inputs' gain, the stable rank: megatron_osp/analysis/weight_error.py).

The JSON and Markdown are rewritten after every finished setting (and weight-rounding table) of every
model, marked partial ("complete": false, and which models/settings are done and which are not) until
the last one; the plots are drawn when the run completes. A model that fails stops the run with its
error, and what was done before stays in the report. A report already in --output-dir is not replaced
unless --overwrite says so; --resume continues it, evaluating only what it lacks (refused, naming the
difference, if the models or options are not the ones it was made with).
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="Megatron checkpoint / run directories or HF model directories")
    p.add_argument("--labels", nargs="+", help="one label per model (default: the run's optimizer/norm/EmbProj)")
    p.add_argument("--data", required=True,
                   help="held-out indexed dataset prefix (PREFIX.bin / PREFIX.idx), or a sharded output's "
                        "(PREFIX.shards.json): its shards, each split as training splits them")
    p.add_argument("--documents", help="fraction range LO:HI of the documents, of each shard's for a sharded output "
                                       "(default: the run's validation split)")
    p.add_argument("--seq-length", type=int, help="tokens per sequence (default: the model's training length)")
    p.add_argument("--num-windows", type=int, default=64,
                   help="held-out sequences to evaluate, at most (default 64; fewer when the held-out documents "
                        "hold fewer: the report's meta.sequences says how many)")
    p.add_argument("--window-selection", choices=["spread", "first"], default="spread",
                   help="which windows of the held-out (and GPTQ calibration) documents, when they hold more than "
                        "asked for: evenly spaced over all of them (default: every shard, every part of the corpus) "
                        "or the first ones (reports made before this option)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--settings", nargs="+", help="W-A-KV settings, e.g. fp 4-4-4 4-8-8 4-4-4+had 4-4-4+quarot 4-4-4+gptq")
    p.add_argument("--calibration-windows", type=int, default=16,
                   help="GPTQ calibration sequences, taken from the training share of the documents (default "
                        "16); refused when those documents hold fewer")
    p.add_argument("--stats-windows", type=int, default=8, help="sequences for the activation statistics (default 8)")
    p.add_argument("--weight-error-windows", type=int, default=8,
                   help="sequences for the per-role weight-rounding table (inputs of each linear; the role "
                        "perplexities use all held-out sequences); 0 skips it (default 8)")
    p.add_argument("--weight-error-bits", type=int, default=4, help="weight bits of that table (default 4)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue the report already in --output-dir (same models, data and options): its finished "
                        "settings are kept, the rest are evaluated; without one, start anew")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --output-dir")
    return p.parse_args(argv)


def held_out_ranges(data: str, documents: str | None, split: str | None, valid_paths: list[str] | None, model: str):
    """(calibration documents or None, held-out documents) of ``--data`` as fraction ranges: --documents;
    else a run's validation: all of a dataset among its data.valid_paths (then no calibration documents),
    or data.split's validation share; else the last 5%. A run that validated on data.valid_paths trained
    on every document of its data.paths, so --data elsewhere has no held-out share to default to. A sharded
    output's prefix is held out whole when each of its shards is among the valid_paths' datasets; the
    ranges apply to each shard (analysis/evaluation.py load_token_windows)."""
    from megatron_osp.analysis.evaluation import parse_document_range

    if documents:
        held = parse_document_range(documents)
        return ((0.0, held[0]) if held[0] > 0 else None), held
    if valid_paths:
        from megatron_osp.data.shardset import expand

        held_out = {os.path.realpath(p) for v in valid_paths for p in expand(v)}
        shards = [os.path.realpath(p) for p in expand(data)]
        if all(p in held_out for p in shards):
            return None, (0.0, 1.0)
        part = sum(p in held_out for p in shards)
        some = f" (only {part} of its {len(shards)} shards are among them)" if part else ""
        raise ValueError(f"{model}: its run validated on data.valid_paths={valid_paths} and trained on every document "
                         f"of data.paths (data.split={split!r}): pass --data one of the validation datasets (all its "
                         f"documents are held out) or --documents LO:HI for {data}{some}")
    if split:
        return _split_ranges(split)
    return (0.0, 0.95), (0.95, 1.0)


def common_held_out(data: str, documents: str | None, facts: list[tuple[str, str | None, list[str] | None]]):
    """(calibration documents or None, held-out documents, a note or None) for models whose runs'
    (model, data.split, data.valid_paths) are ``facts`` (split None: not a Megatron run, no split known):
    --documents if given; else the documents every run held out (``held_out_ranges`` of each, intersected),
    refused when they share none; the calibration documents are the first training share a run has, cut
    short of the held-out range. The note says when the runs held out different ranges."""
    runs = [f for f in facts if f[1] is not None]
    if documents or len(runs) <= 1:
        model, split, valid_paths = runs[0] if runs else facts[0]
        return (*held_out_ranges(data, documents, split, valid_paths, model), None)
    ranges = [(m, *held_out_ranges(data, None, split, valid_paths, m)) for m, split, valid_paths in runs]
    lo, hi = max(r[2][0] for r in ranges), min(r[2][1] for r in ranges)
    each = ", ".join(f"{m} {h[0]}:{h[1]}" for m, _, h in ranges)
    if lo >= hi:
        raise ValueError(f"the runs hold out no documents of {data} in common ({each}): a document one run held out "
                         "another trained on; pass --documents LO:HI")
    train = next((r[1] for r in ranges if r[1] is not None), None)  # any documents outside the held-out ones
    calib = None if train is None or train[0] >= lo else (train[0], min(train[1], lo))
    if all(r[2] == (lo, hi) for r in ranges):
        return calib, (lo, hi), None
    return calib, (lo, hi), f"held-out documents {lo}:{hi}: the part every run held out ({each})"


def _split_ranges(split: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """(train, valid) document fractions of a run's data.split, as the training data uses them."""
    from megatron_osp.data.gpt_dataset import parse_split

    train, valid, _ = parse_split(split)
    if valid is None:
        raise ValueError(f"data.split={split!r} has no validation share: pass --documents")
    return train or (0.0, valid[0]), valid


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="seq", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())
    except ImportError:  # pragma: no cover
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_osp.training.checkpoint_integrity import CheckpointError

    try:
        return _run(args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import warnings

    # Megatron-Core and torch.distributed.checkpoint warn about Apex/TE and deprecated paths on load.
    for pattern in (".*Apex.*", ".*Transformer Engine.*", ".*deprecated.*", ".*TypedStorage.*"):
        warnings.filterwarnings("ignore", message=pattern)
    import torch

    from megatron_osp.analysis.evaluation import check_token_ids, check_window_count, load_token_windows
    from megatron_osp.analysis.loading import (check_data_tokenizer, check_group_sizes, check_model_files,
                                                config_facts, labels_problem, load_for_analysis, models_problem)
    from megatron_osp.analysis.quant_report import (DEFAULT_SETTINGS, WEIGHT_ROUNDING, evaluate_model, format_table,
                                                    with_fp, write_report)
    from megatron_osp.analysis.report_progress import ReportProgress
    from megatron_osp.analysis.report_resume import open_report, pin_model, software_versions, tokens_identity
    from megatron_osp.analysis.quantization import parse_settings
    from megatron_osp.analysis.weight_error import roles_of
    from megatron_osp.data.document_view import check_dataset_files

    problem = labels_problem(args.labels, args.models) or models_problem(args.models)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        settings = parse_settings(args.settings or DEFAULT_SETTINGS)
        for option, value in (("--num-windows", args.num_windows), ("--batch-size", args.batch_size),
                              ("--seq-length", args.seq_length), ("--stats-windows", args.stats_windows),
                              ("--calibration-windows", args.calibration_windows)):
            if value is not None and value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        if args.weight_error_windows < 0:
            raise ValueError(f"--weight-error-windows must be >= 0, got {args.weight_error_windows}")
        if not 2 <= args.weight_error_bits < 16:
            raise ValueError(f"--weight-error-bits must be between 2 and 15, got {args.weight_error_bits}")
        shards = check_dataset_files(args.data, "--data")  # a sharded output: its shards
        for path in args.models:
            if not Path(path).exists():
                raise FileNotFoundError(f"{path} does not exist")
            check_model_files(path)  # a missing shard: named now, not after the models before it
            check_group_sizes(path, settings)
            check_data_tokenizer(path, args.data, "--data")
        # The held-out and calibration windows come from the first model's config (its sequence length,
        # its run's data.split): read before any model loads, so too few calibration windows is refused.
        first_seq = config_facts(args.models[0])[0]
        seq = args.seq_length or first_seq
        # The held-out documents are those every Megatron model's run held out (an HF directory's are not
        # known): an HF directory listed first, or two runs of different data.split, used to give documents
        # one of the runs trained on.
        every = [(m, *config_facts(m)) for m in args.models]
        facts = [(m, split, valid) for m, _, split, valid in every]
        short = [(m, window) for m, window, _, _ in every if window < seq]
        if short:  # a later model of a shorter window was scored on positions it never trained on
            source = "--seq-length" if args.seq_length else f"the window of {args.models[0]}"
            raise ValueError(f"{short[0][0]}: its window is {short[0][1]} tokens, shorter than the {seq}-token "
                             f"sequences evaluated ({source}): pass --seq-length {min(w for _, w, _, _ in every)}")
        train_docs, held, note = common_held_out(args.data, args.documents, facts)
        if note:
            print(note)
        if any(s.gptq for s in settings):
            if train_docs is None:
                raise ValueError("GPTQ needs calibration documents outside the held-out range")
            check_window_count(args.data, seq, args.calibration_windows, train_docs, "--calibration-windows")
        windows = load_token_windows(args.data, seq, args.num_windows, documents=held, selection=args.window_selection)
        calib = None
        if any(s.gptq for s in settings):
            calib = load_token_windows(args.data, seq, args.calibration_windows, documents=train_docs,
                                       selection=args.window_selection)
        pinned = [pin_model(m) for m in args.models]  # (what to load, what the report records)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # its kernels: in the request
        request = {
            "models": [{"path": str(m), "identity": ident} for m, (_, ident) in zip(args.models, pinned)],
            "versions": software_versions(),
            "tokens": {"held_out": tokens_identity(windows), "calibration": tokens_identity(calib)},
            "options": {"labels": args.labels, "settings": [s.name for s in settings], "batch_size": args.batch_size,
                        "stats_windows": args.stats_windows, "weight_error_windows": args.weight_error_windows,
                        "weight_error_bits": args.weight_error_bits, "dtype": args.dtype, "device": device},
        }
        earlier = open_report(Path(args.output_dir) / "quantization.json", args.resume, args.overwrite, request)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    meta = {
        "data": args.data,
        "documents": f"{held[0]}:{held[1]}",
        "shards": len(shards),  # datasets --data names (a sharded output's shards; the range is of each)
        "sequences": int(windows.shape[0]),
        "window_selection": args.window_selection,
        "seq_length": seq,
        "tokens": int(windows.shape[0] * seq),
        "device": device,
        "dtype": args.dtype,
        "settings": [s.name for s in settings],
    }
    each = f" of each of its {len(shards)} shards" if shards != [args.data] else ""
    print(f"held-out: {windows.shape[0]} x {seq} tokens from documents {held[0]}:{held[1]} of {args.data}{each}")
    units = [s.name for s in with_fp(settings)] + ([WEIGHT_ROUNDING] if args.weight_error_windows > 0 else [])
    progress = ReportProgress(args.models, units, request)
    results = []  # in model order; an earlier run's entries (--resume) are filled in where they stand
    if earlier is not None:
        print(f"resuming {earlier.path}: {earlier.summary()}")
        results = earlier.restore(progress)
    for i, path in enumerate(args.models):
        prior = earlier.result(i) if earlier is not None else None
        if prior is not None and progress.finished(i):
            print(f"== {path}: done in the earlier run", flush=True)
            continue
        label = prior["label"] if prior is not None else (args.labels[i] if args.labels else None)
        print(f"== {path}", flush=True)
        loaded = load_for_analysis(pinned[i][0], device=device, dtype=dtype, label=label)
        if any(r["label"] == loaded.label for r in results if r is not prior):  # default labels (optimizer/norms,
            loaded.label = f"{loaded.label} ({path})"  # directory name): the plots would draw only one of the two
        check_token_ids(loaded.model, windows, f"{loaded.label}: --data {args.data}")
        check_token_ids(loaded.model, calib, f"{loaded.label}: the GPTQ calibration windows of --data {args.data}")
        passes = len(settings) + (len(roles_of(loaded.model)) if args.weight_error_windows > 0 else 0)
        bar = _progress(passes * windows.shape[0], loaded.label)

        def on_unit(unit, res, i=i, path=path):  # the report so far, marked partial until the last unit
            res["path"], res["model_index"] = str(path), i
            if not any(r is res for r in results):
                results.append(res)
                results.sort(key=lambda r: r["model_index"])
            progress.mark(i, unit)
            if not progress.complete:
                write_report(results, args.output_dir, meta, plots=False, progress=progress.status())

        t0 = time.perf_counter()
        evaluate_model(
            loaded.model, loaded.label, windows, settings,
            batch_size=args.batch_size, stats_windows=args.stats_windows, calibration=calib,
            weight_error_bits=args.weight_error_bits, weight_error_windows=args.weight_error_windows,
            progress=(bar.update if bar is not None else None),
            log=(bar.write if bar is not None else print), on_unit=on_unit, earlier=prior,
        )
        if bar is not None:
            bar.close()
        print(f"  done in {time.perf_counter() - t0:.1f}s", flush=True)
        del loaded
        if device == "cuda":
            torch.cuda.empty_cache()

    print()
    print(format_table(results))
    paths = write_report(results, args.output_dir, meta, plots=not args.no_plots, progress=progress.status())
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
