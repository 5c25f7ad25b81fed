#!/usr/bin/env python
"""Check that preprocessing gives a tokenizer library's own ids on your corpus, and how fast each is.

preprocess_data.py encodes through an exact word cache where it can prove exactness (data/word_cache.py
for SentencePiece BPE, data/hf_fast.py for Hugging Face byte-level BPE) and through the library
otherwise. This tool takes the first --documents documents of the inputs, encodes them both ways,
and compares every id (one core each, as in a preprocessing worker):

- ours: the tokenizer preprocessing loads, with its word cache (or --no-word-cache), one call per
  batch as a preprocessing worker makes it;
- reference: the library alone: ``tokenizers.Tokenizer.encode_batch(texts, add_special_tokens=False)``
  (truncation and padding off; ``encode_special_tokens`` for --special-tokens-in-text split), or
  ``sentencepiece.SentencePieceProcessor.encode``.

    python tools/check_tokenization.py --input 'corpus/*.jsonl.zst' --tokenizer-model tok/tokenizer.json

Prints the encoding path, the documents and tokens compared, each side's documents/s, and either
"identical" or the first documents that differ (file:line, token position, both ids around it, the
text there). Exit status 0 when identical, 1 when not, 2 on bad input. Bad records are skipped and
counted. The EOD that preprocessing appends is not part of the comparison. An input given twice (a
file twice, or a glob and a directory that overlap) is refused, as preprocess_data.py refuses it: its
documents would be compared twice, and the same --input would fail there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_osp.data.arguments import at_least  # noqa: E402
from megatron_osp.data.readers import (  # noqa: E402
    BadRecord, CorruptInput, check_corpus_form, parse_json_record, record_chunks)
from megatron_osp.data.tokenizer import load_tokenizer  # noqa: E402


def read_documents(inputs: list[str], key: str, limit: int) -> tuple[list[tuple[str, str]], int]:
    """Up to ``limit`` (location, text) pairs from the inputs, in order, and the bad records skipped."""
    docs, bad = [], 0
    for path in inputs:
        for where, first, items, keys in record_chunks(Path(path), [key], 1024):
            for i, item in enumerate(items):
                if item is None:
                    continue
                location = f"{where}:{first + i}" if isinstance(item, str) else f"{where}:row {first + i}"
                record = parse_json_record(location, item, keys) if isinstance(item, str) else item
                if isinstance(record, BadRecord):
                    bad += 1
                    continue
                docs.append((location, record[0]))
                if len(docs) == limit:
                    return docs, bad
    return docs, bad


def reference_encoder(tokenizer_model: str, special_tokens_in_text: str):
    """texts -> lists of ids, by the library alone."""
    path = Path(tokenizer_model)
    if path.suffix == ".json" or path.is_dir():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
        tok.no_truncation()
        tok.no_padding()
        if special_tokens_in_text == "split":
            tok.encode_special_tokens = True
        return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    return lambda texts: sp.encode(texts, num_threads=1)


def _timed(encode, texts, batch: int):
    out, start = [], time.perf_counter()
    for i in range(0, len(texts), batch):
        out += [list(map(int, ids)) for ids in encode(texts[i:i + batch])]
    return out, time.perf_counter() - start


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories (as preprocess_data.py)")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model or HF tokenizer.json (or its directory)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--documents", type=at_least(1), default=2000, help="how many documents to compare (default 2000)")
    p.add_argument("--eod-token", help="as preprocess_data.py (an HF tokenizer's end-of-document token)")
    p.add_argument("--special-tokens-in-text", choices=("encode", "split"), default="encode",
                   help="compare as preprocess_data.py encodes with this setting (refuse encodes as encode)")
    p.add_argument("--no-word-cache", action="store_true", help="ours without the word cache")
    p.add_argument("--show", type=at_least(0), default=3, help="how many differing documents to print (default 3)")
    args = p.parse_args(argv)
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core each side, as a preprocessing worker has
    try:
        return _check(args)
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _check(args) -> int:
    from megatron_osp.data.inputs import expand_inputs
    from megatron_osp.data.preprocess import check_inputs

    try:
        inputs = expand_inputs(args.input)
        check_inputs(inputs, "its documents would be compared twice")  # before the tokenizer loads, as preprocessing does
        check_corpus_form(inputs, [args.json_key])
        ours = load_tokenizer(args.tokenizer_model, args.eod_token, not args.no_word_cache, args.special_tokens_in_text)
        reference = reference_encoder(args.tokenizer_model, args.special_tokens_in_text)
        docs, bad = read_documents(inputs, args.json_key, args.documents)
    except (ValueError, FileNotFoundError, CorruptInput) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not docs:
        skipped = f" ({bad:,} bad record{'s' * (bad != 1)} skipped)" if bad else ""
        print(f"error: no readable document with key {args.json_key!r} in {', '.join(args.input)}{skipped}",
              file=sys.stderr)
        return 2
    print(f"encoding: {ours.encoding_path()}")
    texts = [t for _, t in docs]
    got, t_ours = _timed(lambda batch: ours.encode_batch(batch, threads=1), texts, 256)
    want, t_ref = _timed(reference, texts, 256)
    tokens = sum(map(len, want))
    print(f"compared {len(docs):,} documents ({tokens:,} tokens; {bad} bad records skipped) from "
          f"{len(inputs)} file(s)")
    print(f"documents/s: ours {len(docs) / max(t_ours, 1e-9):,.0f}, library {len(docs) / max(t_ref, 1e-9):,.0f} "
          f"(ratio {t_ref / max(t_ours, 1e-9):.2f}x; one core each, as a preprocessing worker; ours includes building the "
          "word cache)")
    differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    if not differ:
        print("identical: every document has the library's ids")
        return 0
    print(f"DIFFERENT: {len(differ)} of {len(docs)} documents")
    for i in differ[:args.show]:
        at = first_difference(got[i], want[i])
        lo = max(0, at - 3)
        excerpt = ours.decode(want[i][lo:at + 4]) if want[i] else ""
        print(f"  {docs[i][0]}: token {at}: ours {got[i][lo:at + 4]} library {want[i][lo:at + 4]} text {excerpt!r}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
