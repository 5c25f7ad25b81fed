#!/usr/bin/env python
"""Print loss and excess kurtosis of finished runs side by side: compare_runs.py RUN_DIR [RUN_DIR ...].

With --quantization EVAL_DIR/quantization.json (tools/evaluate_quantization.py on the same runs) the
table adds held-out perplexity at full precision and at --setting (default 4-4-4) and the degradation
(and, when the evaluation measured it, the weights-only part of it, e.g. 4-16-16). With --downstream
EVAL_DIR/downstream.json (tools/evaluate_downstream.py) it adds the average benchmark score at fp and at
--setting and the drop. A report of an evaluation that has not finished is shown with '-' where it
lacks a figure and a note saying so. Notes also name runs trained on different tokenizers, a run a report
did not evaluate or evaluated at an earlier checkpoint, and a --setting a report lacks; a run given twice
is refused.
"""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_osp.analysis.compare import (check_distinct, format_comparison, load_downstream,  # noqa: E402
                                          load_quantization, load_run, partial_note, report_notes,
                                          tokenizer_note)
from megatron_osp.fileio import atomic_write_text  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (with summary.json and kurtosis.json)")
    parser.add_argument("--output", help="also write the table to this file")
    parser.add_argument("--quantization", help="quantization.json written by tools/evaluate_quantization.py")
    parser.add_argument("--downstream", help="downstream.json written by tools/evaluate_downstream.py")
    parser.add_argument("--setting", default="4-4-4", help="quantization setting to show (default 4-4-4)")
    args = parser.parse_args()
    for pattern in (".*Apex.*", ".*Transformer Engine.*"):  # reading the runs' checkpoints loads Megatron-Core
        warnings.filterwarnings("ignore", message=pattern)
    try:
        if args.output:
            _check_output(Path(args.output), args)
        quant = load_quantization(args.quantization) if args.quantization else None
        down = load_downstream(args.downstream) if args.downstream else None
        runs = [load_run(r) for r in args.runs]
        check_distinct(runs)
        table = format_comparison(runs, quant, args.setting, downstream=down)
        notes = [tokenizer_note(runs)]
        for report in (args.quantization, args.downstream):
            if report:
                notes += [partial_note(report)] + report_notes(report, runs, args.setting)
        if any(notes):
            table += "\n\n" + "\n".join(n for n in notes if n)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    if args.output:
        atomic_write_text(args.output, table + "\n")
    return 0


def _check_output(out: Path, args) -> None:
    """--output may not replace what the table is read from (an evaluation report, a run's summary.json
    or any other file a run wrote): it used to be overwritten by the table, the report or run lost."""
    from megatron_osp.fileio import unwritable_reason

    target = out.resolve()
    if target.is_dir():
        raise ValueError(f"--output {out} is a directory: give a file name, e.g. {out / 'comparison.txt'}")
    reports = [(flag, p) for flag, p in (("--quantization", args.quantization), ("--downstream", args.downstream)) if p]
    for flag, report in reports:
        if Path(report).resolve() == target:
            raise ValueError(f"--output {out} is the report {flag} reads: writing the table there would replace it; "
                             "choose another --output")
    for run in args.runs:
        if target.exists() and Path(run).resolve() in target.parents:
            raise ValueError(f"--output {out} is a file of the run {run}: writing the table there would replace it; "
                             "choose another --output")
    reason = unwritable_reason(target.parent)
    if reason is not None:
        raise ValueError(f"--output {out}: {reason}")


if __name__ == "__main__":
    sys.exit(main())
