#!/usr/bin/env python
"""Merge Megatron indexed datasets into one (atomic; inputs must share a token dtype).

    python tools/merge_datasets.py --input a_text_document b_text_document --output-prefix all_text_document
    python tools/merge_datasets.py --input-dir shards/ --output-prefix all_text_document
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_osp.data.merge import merge_datasets, prefixes_in  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="dataset prefixes (path without .bin/.idx), in order")
    src.add_argument("--input-dir", help="merge every dataset in this directory, sorted by name")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args()
    try:
        inputs = args.input or prefixes_in(args.input_dir)
        info = merge_datasets(inputs, args.output_prefix)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("no output was written", file=sys.stderr)
        return 1
    print(f"merged {info['datasets']} datasets: {info['sequences']:,} sequences, {info['tokens']:,} tokens "
          f"-> {args.output_prefix}.{{bin,idx}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
