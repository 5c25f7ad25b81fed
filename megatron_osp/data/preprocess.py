"""JSONL corpus -> tokenized indexed dataset (.bin/.idx), with strict handling of bad records.

A bad record (malformed JSON, missing key, non-string text) stops the run with ``file:line: reason``
and leaves no output, unless ``skip_bad_records`` is set, in which case it is counted and the first
few locations are reported. Empty documents are counted and dropped. Output goes through the
atomic writer, so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from megatron_osp.data.indexed import IndexedDatasetWriter, token_dtype_for
from megatron_osp.data.tokenizer import SentencePieceTokenizer


class BadRecord(ValueError):
    """A record that cannot be tokenized; the message is ``file:line: reason``."""


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    empty_documents: int = 0
    bad_records: int = 0
    bad_locations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.documents / max(self.seconds, 1e-9)
        lines = [
            f"{self.documents:,} documents, {self.tokens:,} tokens in {self.seconds:.1f} s "
            f"({rate:,.0f} docs/s, {self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s, "
            f"{self.bytes / 1e6 / max(self.seconds, 1e-9):.1f} MB/s)",
            f"empty documents dropped: {self.empty_documents:,}",
        ]
        if self.bad_records:
            lines.append(f"bad records skipped: {self.bad_records:,} (first: {', '.join(self.bad_locations)})")
        return "\n".join(lines)


def _open_binary(path: Path):
    """Lines are decoded one by one, so a UTF-8 error is reported on its own line."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        raise ValueError(f"{path}: .zst input needs the zstandard package; decompress it first")
    return open(path, "rb")


_TOKENIZER: SentencePieceTokenizer | None = None


def _init_worker(model_file: str):
    global _TOKENIZER
    _TOKENIZER = SentencePieceTokenizer(model_file)


def _parse(location: str, line: str, keys: list[str]) -> list[str] | BadRecord:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord(f"{location}: malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(record, dict):
        return BadRecord(f"{location}: expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            return BadRecord(f"{location}: missing key {key!r}")
        if not isinstance(record[key], str):
            return BadRecord(f"{location}: key {key!r} is {type(record[key]).__name__}, not a string")
        texts.append(record[key])
    return texts


def _tokenize_chunk(args):
    """Worker: (path, first line number, lines, keys) -> per line: token arrays per key, or a BadRecord."""
    path, first, lines, keys = args
    out = []
    for i, line in enumerate(lines):
        parsed = line if isinstance(line, BadRecord) else _parse(f"{path}:{first + i}", line, keys)
        if isinstance(parsed, BadRecord):
            out.append(parsed)
        else:
            out.append([np.asarray(ids, dtype=np.int64) for ids in _TOKENIZER.encode_batch(parsed)])
    return out, sum(len(line.encode("utf-8")) for line in lines if isinstance(line, str))


def _chunks(path: Path, keys: list[str], chunk_lines: int):
    first, lines = 1, []
    line_no = 0
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                lines.append(BadRecord(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})"))
            if len(lines) == chunk_lines:
                yield (str(path), first, lines, keys)
                first, lines = line_no + 1, []
    if lines:
        yield (str(path), first, lines, keys)
    if line_no == 0:
        raise BadRecord(f"{path}:1: empty file")


def _ordered_bounded(pool, chunks, max_in_flight: int):
    """Like ``pool.imap`` (ordered), but reads ahead at most ``max_in_flight`` chunks.

    ``Pool.imap`` drains its input iterator as fast as it can, so a 100 GB file would be read into
    the task queue; this keeps memory bounded, and an error raised while reading (an empty file)
    surfaces here in the main process.
    """
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: one dataset per JSON key, ``<prefix>_<key>_document``."""
    return f"{output_prefix}_{key}_document"


def preprocess(
    inputs: list[str],
    tokenizer_model: str,
    output_prefix: str,
    json_keys: tuple[str, ...] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    skip_bad_records: bool = False,
    chunk_lines: int = 256,
    progress: bool = True,
    max_bad_locations: int = 5,
) -> PreprocessStats:
    """Tokenize ``inputs`` (in order, documents in file order) into ``<output_prefix>_<key>_document``.

    Raises ``BadRecord`` (``file:line: reason``) on the first bad record unless
    ``skip_bad_records``; either way nothing is written unless the whole run succeeds.
    ``append_eod`` defaults to True here (GPT pretraining needs document separators); the CLI keeps
    Megatron's opt-in ``--append-eod`` flag.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not json_keys:
        raise ValueError("json_keys is empty")
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    dtype = token_dtype_for(tokenizer.vocab_size)
    writers = {k: IndexedDatasetWriter(output_prefix_for(output_prefix, k), dtype) for k in json_keys}
    stats = PreprocessStats()
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="tokenize", unit="doc", dynamic_ncols=True)  # its rate is docs/s
    pool = get_context("fork").Pool(workers, _init_worker, (tokenizer_model,)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer_model)
    try:
        for path in paths:
            chunks = _chunks(path, list(json_keys), chunk_lines)
            results = _ordered_bounded(pool, chunks, 4 * workers) if pool else map(_tokenize_chunk, chunks)
            for records, nbytes in results:
                stats.bytes += nbytes
                for record in records:
                    if isinstance(record, BadRecord):
                        if not skip_bad_records:
                            raise record
                        stats.bad_records += 1
                        if len(stats.bad_locations) < max_bad_locations:
                            stats.bad_locations.append(str(record).split(": ", 1)[0])
                        continue
                    if all(len(ids) == 0 for ids in record):
                        stats.empty_documents += 1
                        continue
                    for key, ids in zip(json_keys, record):
                        if append_eod:
                            ids = np.append(ids, tokenizer.eod)
                        writers[key].add_document(ids)
                        stats.tokens += len(ids)
                    stats.documents += 1
                if bar is not None:
                    bar.update(len(records))
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(tok_s=f"{stats.tokens / elapsed:,.0f}", MB_s=f"{stats.bytes / 1e6 / elapsed:.1f}")
        if stats.documents == 0:
            raise BadRecord(f"{paths[0]}: no non-empty documents in the input")
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - start
    return stats
