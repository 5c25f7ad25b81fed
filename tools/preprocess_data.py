#!/usr/bin/env python
"""Tokenize a corpus into Megatron indexed datasets: PREFIX_<key>_document.{bin,idx}.

Inputs: JSON lines (.jsonl, .jsonl.gz, .jsonl.zst) and Parquet (.parquet), as files, globs or
directories (every such file inside, sorted). Tokenizer: a SentencePiece .model or a Hugging Face
tokenizer.json. --max-shard-tokens splits the output into PREFIX_<key>_document_00000, ...

    python tools/preprocess_data.py --input 'data/*.jsonl.zst' --tokenizer-model tok.model \\
        --output-prefix out/corpus --append-eod --workers 16 --max-shard-tokens 2e10

A bad record stops the run with file:line and leaves no output (--skip-bad-records: skip, count,
report); a corrupt or truncated compressed file always stops it. Exit status 1 on bad input.
--special-tokens-in-text (encode, split, refuse) says what the text of a special token in a document
(<|endoftext|> in a web page) becomes; see megatron_osp/data/special_text.py.

The output is published as one unit when the whole run succeeded, with a manifest
PREFIX_<key>_document.shards.json listing its datasets; the previous run's files of that prefix
(sharded or not) are replaced then, and a failed run leaves them as they were. Only a rerun over the
same inputs replaces an earlier output silently: any other (a merge's output, an output of other
inputs or without a manifest) is refused by name before tokenizing, unless --overwrite is given.

Many nodes: --num-tasks N --task-index I (defaults: a SLURM array's SLURM_ARRAY_TASK_COUNT and
SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) tokenizes only task I's share of the input files (a
contiguous run, balanced by bytes) into PREFIX_taskIIIIIofNNNNN_<key>_document; then
`tools/merge_datasets.py --tasks PREFIX` checks the set is one complete run and publishes
PREFIX_<key>_document, byte-identical to a single run. examples/preprocess_slurm.sh does both.
--num-tasks 1 is an ordinary single run (also inside an unrelated array job). --plan checks the
inputs, tokenizer and output directory and prints each task's files, writing nothing.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_osp.data.arguments import at_least  # noqa: E402
from megatron_osp.data.array_tasks import plan, resolve_task, task_prefix  # noqa: E402
from megatron_osp.data.inputs import expand_inputs  # noqa: E402
from megatron_osp.data.preprocess import (  # noqa: E402
    BadRecord, WorkerDied, check_eod, check_inputs, check_json_keys, eod_note, preprocess)
from megatron_osp.data.readers import check_corpus_form  # noqa: E402
from megatron_osp.data.sharded_output import check_earlier_output  # noqa: E402
from megatron_osp.data.special_text import HELP as SPECIAL_HELP  # noqa: E402
from megatron_osp.data.special_text import MODES as SPECIAL_MODES  # noqa: E402
from megatron_osp.fileio import os_error  # noqa: E402

def shard_tokens(value: str) -> int:
    """--max-shard-tokens: a positive whole number of tokens (2e10 allowed)."""
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (n >= 1 and n == int(n) and n < float("inf")):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive whole number of tokens "
                                         "(leave the option out for one unsharded dataset)")
    return int(n)


def print_plan(args) -> int:
    """--plan: everything a task checks before its work, then the split; nothing is written."""
    import os

    from megatron_osp.data.tokenizer import load_tokenizer

    files = expand_inputs(args.input)
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} does not exist" if not os.path.exists(f) else f"{f} is not a file")
    check_inputs(files)
    check_json_keys(args.json_keys)
    check_corpus_form(files, args.json_keys, not args.skip_bad_records)
    # the final prefix, which an array run's merge publishes only after every task has run
    check_earlier_output(args.output_prefix, args.json_keys, files, args.overwrite)
    sizes = [os.path.getsize(f) for f in files]
    tok = load_tokenizer(args.tokenizer_model, args.eod_token, special_tokens_in_text=args.special_tokens_in_text)
    check_eod(tok, args.tokenizer_model, args.append_eod)
    if eod_note(tok, args.eod_token):
        print(eod_note(tok, args.eod_token))
    d = os.path.dirname(os.path.abspath(args.output_prefix))
    while not os.path.isdir(d):
        d = os.path.dirname(d)
    if not os.access(d, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied (the output directory cannot be made or written)", d)
    n = args.num_tasks or 1
    if not 1 <= n <= 99999:
        raise ValueError(f"--num-tasks {n}: must be 1..99999")
    total = sum(sizes)
    print(f"{len(files)} input files, {total:,} bytes, tokenizer {args.tokenizer_model} ({tok.vocab_size} ids); "
          f"{n} task{'s' if n > 1 else ''}, ideally {total / n:,.0f} bytes each")
    for i, (lo, hi) in enumerate(plan(sizes, n)):
        what = (f"files {lo}..{hi - 1}: {files[lo]} ... {files[hi - 1]}" if hi > lo + 1 else
                f"file {lo}: {files[lo]}" if hi > lo else "no files (an empty output)")
        print(f"  task {i}: {sum(sizes[lo:hi]):,} bytes, {what}")
    return 0


def main() -> int:
    # No abbreviations: examples/preprocess_slurm.sh reads --max-shard-tokens and --workers by their full
    # names, so "--max-shard 1e9" sharded the tasks but not their merge, and "--work 4" was overridden.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model or HF tokenizer.json")
    p.add_argument("--eod-token", default=None, help="HF tokenizers: the end-of-document token (default: guessed)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"], help="one output dataset per key")
    p.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    p.add_argument("--workers", type=at_least(1), default=1, help="tokenizing processes (default 1)")
    p.add_argument("--max-shard-tokens", type=shard_tokens, default=None,
                   help="split the output into shards of ~N tokens")
    p.add_argument("--skip-bad-records", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--special-tokens-in-text", choices=SPECIAL_MODES, default="encode", help=SPECIAL_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of the prefix that is not a rerun over the same inputs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-word-cache", action="store_true",
                   help="call the tokenizer library per chunk (sp.encode, HF encode_batch) instead of the exact word "
                        "cache (same ids, slower)")
    p.add_argument("--num-tasks", type=at_least(1), default=None,
                   help="split the inputs over N array tasks (default: SLURM_ARRAY_TASK_COUNT; 1: a single run)")
    p.add_argument("--task-index", type=at_least(0), default=None,
                   help="this task, 0..N-1 (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, or with "
                        "--num-tasks given, SLURM_ARRAY_TASK_ID)")
    p.add_argument("--plan", action="store_true",
                   help="check inputs, tokenizer and output directory, print each of --num-tasks tasks' files, exit")
    args = p.parse_args()
    output = args.output_prefix
    try:
        if args.plan:
            return print_plan(args)
        task = resolve_task(args.num_tasks, args.task_index)
        if task is not None:
            output = task_prefix(args.output_prefix, task[0], task[1])
            print(f"array task {task[0]} of {task[1]} ({task[2]}): writes {output}_<key>_document", flush=True)
        skipped: list[str] = []
        inputs = expand_inputs(args.input, skipped)
        if skipped:
            print(f"left out {len(skipped)} file{'s' if len(skipped) > 1 else ''} of earlier outputs (datasets, "
                  f"manifests) that --input matched, never read as corpus: {', '.join(skipped[:3])}"
                  f"{', ...' if len(skipped) > 3 else ''}", flush=True)
        stats = preprocess(
            inputs, args.tokenizer_model, args.output_prefix, tuple(args.json_keys),
            args.append_eod, args.workers, args.skip_bad_records, progress=not args.no_progress,
            max_shard_tokens=args.max_shard_tokens,
            eod_token=args.eod_token, word_cache=not args.no_word_cache, task=task and task[:2],
            log=lambda line: print(line, flush=True), special_tokens_in_text=args.special_tokens_in_text,
            overwrite=args.overwrite,
        )
    except (BadRecord, FileNotFoundError, ValueError, WorkerDied) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"no output was written; any earlier output of {output} is untouched", file=sys.stderr)
        return 1
    except OSError as e:  # unwritable output directory, unreadable input, disk full
        print(f"error: {os_error(e)}", file=sys.stderr)
        print(f"no output was written; any earlier output of {output} is untouched", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the stage is dropped on the way out (preprocess), no traceback
        print(f"interrupted: no output was written; any earlier output of {output} is untouched", file=sys.stderr)
        # Exit without the interpreter's exit-time join of the worker pool's threads: with its workers
        # ended mid-transfer (they are, by now) that join can wait forever.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
