#!/usr/bin/env python
"""Train a SentencePiece (BPE or unigram, byte fallback) tokenizer on a sample of a corpus
(JSON lines plain/.gz/.zst or Parquet).

--input takes files, globs and directories as preprocess_data.py does (a glob's or a directory's corpus
files sorted; a file given twice, by a hard link too, is refused), read in the order given: several
files train the same tokenizer as their concatenation.

    python tools/train_tokenizer.py --input 'corpus/*.jsonl.zst' --output-prefix tok/tok --vocab-size 49152 \\
        --sample-documents 2000000

--sample-documents N trains on the first N records of one file (as before several files were taken);
of several files, on the first records of each, in number proportional to its size in bytes on disk (a
compressed file counts its compressed bytes; shares rounded down cumulatively to add up to N; equal
shares if a size is unknown, a pipe), a file with fewer records passing the rest of its share on to the
next. Bad records count as records read.

A document is trained on line by line, and a line longer than 4,192 UTF-8 bytes (which SentencePiece
would skip without a word) in pieces cut before a space, or between characters where it has none.

A bad record (malformed JSON, missing --json-key, non-string text, invalid UTF-8 or a lone surrogate)
stops training with file:line unless --skip-bad-records. --vocab-size must leave room for byte
fallback: 259 ids (256 byte pieces + <unk>, <s>, </s>) plus one per character of the corpus.
An existing PREFIX.model or PREFIX.vocab (a tokenizer datasets may have been made with) is refused
before training unless --overwrite says to replace it.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_osp.data.arguments import at_least, fraction  # noqa: E402
from megatron_osp.data.sp_training import META_PIECES  # noqa: E402
from megatron_osp.fileio import os_error  # noqa: E402
from megatron_osp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="corpus files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet), globs or directories")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", required=True,
                   type=at_least(META_PIECES + 1, "256 byte-fallback pieces and <unk>, <s>, </s>, plus one per "
                                 "character of the corpus"),
                   help="at least 259 (byte fallback and specials) + the corpus's distinct characters")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--json-key", default="text")
    p.add_argument("--sample-documents", type=at_least(1), default=None, help="train on the first N records: of one file, its first N; of several, each file's "
                        "first records, their number in proportion to its size in bytes (see above)")
    p.add_argument("--character-coverage", type=fraction, default=0.9995, help="in (0, 1]")
    p.add_argument("--skip-bad-records", action="store_true", help="skip bad records instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model / PREFIX.vocab")
    args = p.parse_args()
    existing = [f for f in (args.output_prefix + ".model", args.output_prefix + ".vocab") if Path(f).exists()]
    if existing and not args.overwrite:  # before training, which can take hours
        print(f"error: {existing[0]} already exists: a tokenizer that datasets may have been made with. "
              "--overwrite replaces it, or choose another --output-prefix", file=sys.stderr)
        return 1
    skipped: list[str] = []
    try:
        model = train_sentencepiece(
            args.input, args.output_prefix, args.vocab_size, args.model_type, args.json_key,
            args.sample_documents, args.character_coverage, skip_bad_records=args.skip_bad_records, skipped=skipped,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # unwritable output directory, unreadable input
        print(f"error: {os_error(e)}", file=sys.stderr)
        return 1
    if skipped:
        print(f"bad records skipped: {len(skipped):,} (first: {skipped[0]})")
    tok = SentencePieceTokenizer(model)
    print(f"wrote {model} (vocab {tok.vocab_size}, eod id {tok.eod})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
