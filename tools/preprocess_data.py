#!/usr/bin/env python
"""Tokenize JSONL (plain or .gz) into Megatron indexed datasets: PREFIX_<key>_document.{bin,idx}."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_osp.data.preprocess import BadRecord, preprocess  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (.jsonl or .jsonl.gz)")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-bad-records", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    try:
        stats = preprocess(
            args.input, args.tokenizer_model, args.output_prefix, tuple(args.json_keys),
            args.append_eod, args.workers, args.skip_bad_records, progress=not args.no_progress,
        )
    except (BadRecord, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("no output was written", file=sys.stderr)
        return 1
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
