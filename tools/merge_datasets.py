#!/usr/bin/env python
"""Merge Megatron indexed datasets into one (atomic; inputs must share a token dtype, and those with a
preprocessing manifest the tokenizer file and EOD setting it records).

    python tools/merge_datasets.py --input a_text_document b_text_document --output-prefix all_text_document
    python tools/merge_datasets.py --input-dir shards/ --output-prefix all_text_document

A preprocessing output is merged as its manifest (PREFIX_<key>_document.shards.json) lists it: a
sharded output's family prefix stands for its shards, and --input-dir never takes a dataset of such a
family that the manifest does not list, nor temporary files.

When every input has a manifest, the output is published with one too (OUTPUT.shards.json): the
tokenizer and EOD settings the inputs agree on, the dtype and merged_from (the datasets merged), so
training and later merges refuse to mix it with data of another tokenizer. If any input has none,
the output has none either (its tokenizer is not known) and a line says so. An earlier merge's output
on the prefix is replaced (its manifest too); a preprocessing output there is refused.

    python tools/merge_datasets.py --tasks out/corpus [--output-prefix out/corpus] [--num-tasks 8]

--tasks merges the outputs of `tools/preprocess_data.py --num-tasks N` (PREFIX_taskIIIIIofNNNNN_*) in
task order into PREFIX_<key>_document (or the --output-prefix given), published with a manifest like
a preprocessing run and byte-identical to a single run over the same inputs (with --max-shard-tokens,
to a single run with that option; whatever shard size the tasks used). It refuses, naming them,
missing or incomplete tasks and tasks of different runs (inputs, tokenizer, keys, EOD), and, as
preprocess_data.py does, an earlier output on the prefix that is not of the same inputs (a plain
merge's, a run over other files) unless --overwrite is given.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_osp.data.arguments import at_least  # noqa: E402
from megatron_osp.data.merge import merge_datasets, merge_tasks, prefixes_in  # noqa: E402
from megatron_osp.fileio import os_error  # noqa: E402


def _refused(e: BaseException) -> None:
    print("no output was written", file=sys.stderr)
    for note in getattr(e, "cleanup_notes", []):  # e.g. an earlier pair a killed merge set aside, put back
        print(note, file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="dataset prefixes (path without .bin/.idx), in order")
    src.add_argument("--input-dir", help="merge every dataset in this directory, sorted by name")
    src.add_argument("--tasks", metavar="PREFIX",
                     help="merge the array tasks preprocess_data.py --num-tasks wrote for --output-prefix PREFIX")
    p.add_argument("--output-prefix", help="the merged dataset (with --tasks: a preprocessing prefix, default PREFIX)")
    p.add_argument("--num-tasks", type=at_least(1), default=None,
                   help="with --tasks: the array's size (needed only when outputs of two arrays are there)")
    p.add_argument("--max-shard-tokens", type=float, default=None,
                   help="with --tasks: shard the merged output as preprocess_data.py --max-shard-tokens would")
    p.add_argument("--tokenizer-model", default=None,
                   help="check the dtype holds this tokenizer's ids, no input has an id outside its vocabulary and "
                        "every input's manifest (if any) names this tokenizer or one that makes the same ids "
                        "(with --tasks: the tasks used it)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --tasks: replace an earlier output of the prefix that is not of the tasks' inputs")
    args = p.parse_args()
    if not args.tasks and not args.output_prefix:
        p.error("--output-prefix is required with --input/--input-dir")
    if (args.num_tasks is not None or args.max_shard_tokens is not None or args.overwrite) and not args.tasks:
        p.error("--num-tasks, --max-shard-tokens and --overwrite apply to --tasks")
    shard = args.max_shard_tokens
    if shard is not None and not (1 <= shard < float("inf") and shard == int(shard)):
        p.error(f"--max-shard-tokens {shard:g}: must be a positive whole number of tokens")
    skipped: list[str] = []
    rerun = False
    try:
        if args.tasks:
            info = merge_tasks(args.tasks, args.output_prefix, args.num_tasks, args.tokenizer_model,
                               None if shard is None else int(shard), overwrite=args.overwrite)
            outs = info["outputs"]
            print(f"merged {info['tasks']} tasks: {info['sequences']:,} documents, {info['tokens']:,} tokens -> "
                  + (f"{outs[0]}.{{bin,idx}}" if len(outs) == 1 else f"{len(outs)} datasets {outs[0]} ... {outs[-1]}"))
            return 0
        vocab = sha = fingerprint = None
        if args.tokenizer_model:
            from megatron_osp.data.shardset import sha256_file
            from megatron_osp.data.tokenizer import load_tokenizer
            from megatron_osp.data.tokenizer_identity import tokenizer_fingerprint

            tok = load_tokenizer(args.tokenizer_model)
            vocab, sha, fingerprint = tok.vocab_size, sha256_file(tok.model_file), tokenizer_fingerprint(tok.model_file)
        inputs = args.input
        if not inputs:  # a rerun into the directory: the earlier output is replaced, not merged into itself
            out = os.path.realpath(args.output_prefix)
            found = prefixes_in(args.input_dir, skipped, args.output_prefix)
            inputs = [p for p in found if os.path.realpath(p) != out]
            rerun = len(inputs) < len(found)
            if rerun and not inputs:
                raise ValueError(f"{args.input_dir}: holds only the output {args.output_prefix} itself")
        info = merge_datasets(inputs, args.output_prefix, vocab_size=vocab, tokenizer_sha256=sha,
                              tokenizer_fingerprint=fingerprint)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        _refused(e)
        return 1
    except OSError as e:  # unwritable output directory, disk full
        print(f"error: {os_error(e)}", file=sys.stderr)
        _refused(e)
        return 1
    for note in info["notes"]:
        print(note)
    for prefix in skipped:
        print(f"skipped {prefix}: not in its preprocessing manifest (left over from an earlier run)")
    if rerun:
        print(f"skipped {args.output_prefix}: the output prefix, in the input directory (this merge replaces it)")
    print(f"merged {info['datasets']} datasets: {info['sequences']:,} sequences, {info['tokens']:,} tokens "
          f"-> {args.output_prefix}.{{bin,idx}}" + (f", manifest {info['manifest']}" if info["manifest"] else ""))
    if info["no_manifest"]:
        print(info["no_manifest"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
