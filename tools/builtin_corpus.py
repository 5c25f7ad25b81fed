#!/usr/bin/env python
"""Write a JSONL corpus from the documentation that ships with Python (no download needed)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_osp.data.arguments import at_least  # noqa: E402
from megatron_osp.data.builtin_corpus import write_corpus  # noqa: E402
from megatron_osp.fileio import os_error  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="JSONL file to write ({'text': ...} per line)")
    parser.add_argument("--max-documents", type=at_least(1), default=None, help="stop after N documents")
    parser.add_argument("--min-chars", type=at_least(0), default=200, help="drop docstrings shorter than this")
    parser.add_argument("--include-source", action="store_true",
                        help="also add the standard library's .py files as documents (much larger)")
    args = parser.parse_args()
    try:
        n_docs, n_chars = write_corpus(args.output, args.max_documents, args.min_chars, args.include_source)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output that is a directory or cannot be made
        print(f"error: {os_error(e)}", file=sys.stderr)
        return 1
    print(f"wrote {n_docs:,} documents ({n_chars / 1e6:.1f} M characters) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
