"""Corpus (JSON lines plain/.gz/.zst, Parquet) -> tokenized indexed datasets (.bin/.idx).

A bad record (malformed JSON, missing key, non-string or non-UTF-8 text; with
``special_tokens_in_text="refuse"``, a special token written in the text) stops the run with
``file:line: reason`` and leaves no output, unless ``skip_bad_records`` is set, in which case it is
counted and the first few locations are reported. A file that cannot be read on (corrupt or
truncated compressed stream) always stops the run. Empty documents are counted and dropped.

The output is one unit (megatron_osp/data/shardset.py): every dataset of every key is written into a
stage directory and published together, with a manifest ``<prefix>_<key>_document.shards.json``,
only when the whole run succeeded; publishing removes the earlier run's files of those names
(sharded or not). An earlier output there that is not a rerun over the same inputs (a merge's output,
one of other inputs, one without a manifest) is refused by name before any tokenizing unless
``overwrite``. A failed or killed run leaves the earlier output untouched.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from megatron_osp.data.content_identity import sampled_documents
from megatron_osp.data.indexed import token_dtype_for
from megatron_osp.data.readers import (BadRecord, CorruptInput, check_corpus_form, no_documents, parse_json_record,
                                      record_chunks)
from megatron_osp.data.sharded_output import ShardedOutput, check_earlier_output, output_prefix_for
from megatron_osp.data.shardset import check_output_prefix, sha256_file
from megatron_osp.data.special_text import DEFAULT as SPECIAL_DEFAULT
from megatron_osp.data.special_text import FIELD as SPECIAL_FIELD
from megatron_osp.data.special_text import eod_from_text, eod_record, refused_record
from megatron_osp.data.tokenizer import load_tokenizer
from megatron_osp.data.tokenizer_identity import tokenizer_fingerprint

__all__ = ["BadRecord", "CorruptInput", "PreprocessStats", "WorkerDied", "check_eod", "check_inputs", "check_json_keys",
           "check_output_prefix", "eod_note", "output_prefix_for", "preprocess"]


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    empty_documents: int = 0
    bad_records: int = 0
    bad_locations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # dataset prefixes written
    notes: list[str] = field(default_factory=list)  # stale temporaries of dead runs removed or left

    def summary(self) -> str:
        rate = self.documents / max(self.seconds, 1e-9)
        lines = [
            f"{self.documents:,} documents, {self.tokens:,} tokens in {self.seconds:.1f} s "
            f"({rate:,.0f} docs/s, {self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s, "
            f"{self.bytes / 1e6 / max(self.seconds, 1e-9):.1f} MB/s)",
            f"empty documents dropped: {self.empty_documents:,}",
        ]
        if len(self.outputs) > 1:
            lines.append(f"wrote {len(self.outputs)} datasets: {self.outputs[0]} ... {self.outputs[-1]}")
        lines += self.notes
        if self.bad_records:
            lines.append(f"bad records skipped: {self.bad_records:,} (first: {', '.join(self.bad_locations)})")
        return "\n".join(lines)


_TOKENIZER = None


def _init_worker(model_file: str, eod_token: str | None, parent: int | None = None, word_cache: bool = True,
                 special_tokens_in_text: str = SPECIAL_DEFAULT):
    """A process of the pool (``parent``: the main process's pid, taken before the fork) or the main
    process itself (None): load the tokenizer."""
    global _TOKENIZER
    if parent is not None:  # one process per worker already; Rust threads on top would oversubscribe the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # Ctrl-C reaches every process of the terminal's group: the main process handles it and ends
        # the workers (_stop). A worker interrupted in the middle of a queue operation could leave the
        # executor's queues locked and the main process waiting on them. (Forked with SIGINT blocked,
        # _launch_workers: one arriving before this line stays pending, then is ignored.)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        _exit_with_parent(parent)
    _TOKENIZER = load_tokenizer(model_file, eod_token, word_cache, special_tokens_in_text)


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """Worker: end when the main process ``parent`` is gone (killed: SIGTERM at a SLURM time limit,
    SIGKILL). The executor's task queue gives its workers no end-of-file then, so they would live on,
    orphaned. ``parent`` is the pid the main process had before the fork: a worker reading its parent
    only here would, when the main process died between the fork and this line, take its new parent
    (init, a subreaper) for the main process and never end."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@dataclass
class _Chunk:
    """A tokenized chunk: non-empty documents only, EOD appended if asked, per key concatenated."""

    items: int
    bad: list[BadRecord]
    empty: int
    lengths: list[np.ndarray]  # per key: tokens per document
    tokens: list[np.ndarray]  # per key: all documents' tokens, in the output dtype
    nbytes: int
    samples: list[list[tuple[int, int]]]  # per key: content_identity.sampled_documents, hashed here in the worker


def _tokenize_chunk(args) -> _Chunk:
    """Worker: (path, first line, items, keys, append_eod) -> ``_Chunk``.

    Items are JSON lines (str), texts already taken from a Parquet row (list), BadRecords, or None
    (a blank line). All texts of a key go to the tokenizer in one call and come back as one array:
    per-call and per-document overhead (SentencePiece starts a thread pool for every list it is
    given; pickling one array per document between processes) cost more than the encoding itself.
    With ``--special-tokens-in-text refuse`` a record holding a special token's text is a BadRecord.
    """
    path, first, items, keys, append_eod = args
    parsed = [parse_json_record(f"{path}:{first + i}", item, keys) if isinstance(item, str) else item
              for i, item in enumerate(items) if item is not None]  # None: a blank line, no record
    lines = [f"{path}:{first + i}" if isinstance(item, str) else f"{path}:row {first + i}"
             for i, item in enumerate(items) if item is not None]
    if _TOKENIZER.special_tokens_in_text == "refuse":
        parsed = [_refused(where, p, keys) if not isinstance(p, BadRecord) else p for where, p in zip(lines, parsed)]
    while True:
        bad = [p for p in parsed if isinstance(p, BadRecord)]
        good = [p for p in parsed if not isinstance(p, BadRecord)] if bad else parsed
        encoded = [_TOKENIZER.encode_flat([p[k] for p in good], threads=1) for k in range(len(keys))]
        hits = eod_from_text(_TOKENIZER, encoded)
        if not hits:
            break
        at = [i for i, p in enumerate(parsed) if not isinstance(p, BadRecord)]  # good's places in parsed
        for g, (k, offset) in hits.items():  # a rare record: encode the chunk again without it
            parsed[at[g]] = BadRecord(eod_record(_TOKENIZER, lines[at[g]], keys[k], offset))
    dtype = token_dtype_for(_TOKENIZER.vocab_size)
    for ids, _ in encoded:  # a cast to the output dtype must never wrap an id silently
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
            raise ValueError(f"{_TOKENIZER.model_file}: gave token id {int(ids.max())} (lowest {int(ids.min())}) "
                             f"in {path}:{first}..{first + len(items) - 1}, which {np.dtype(dtype)} (chosen for "
                             f"its vocabulary of {_TOKENIZER.vocab_size}) cannot hold")
    keep = np.sum([lengths for _, lengths in encoded], axis=0) > 0 if good else np.zeros(0, bool)
    out_lengths, out_tokens = [], []
    for ids, lengths in encoded:
        lengths = lengths[keep]  # an empty document has no ids in any key: only its length goes
        if append_eod:  # one EOD after every kept document, in every key
            ids = np.insert(ids, np.cumsum(lengths), _TOKENIZER.eod)
            lengths = lengths + 1
        out_lengths.append(lengths)
        out_tokens.append(ids.astype(dtype, copy=False))
    nbytes = sum(len(t.encode("utf-8")) for p in good for t in p)
    samples = [sampled_documents(n, t) for n, t in zip(out_lengths, out_tokens)]
    return _Chunk(len(items), bad, int(len(keep) - keep.sum()), out_lengths, out_tokens, nbytes, samples)


def _refused(where: str, texts: list[str], keys) -> list[str] | BadRecord:
    """``texts``, or the BadRecord naming the first special token written in one of them."""
    for key, text in zip(keys, texts):
        found = _TOKENIZER.find_special(text)
        if found is not None:
            return BadRecord(refused_record(where, key, found))
    return texts


class WorkerDied(RuntimeError):
    """A tokenizing worker process ended abruptly (killed by a signal, e.g. the out-of-memory killer)."""


def _ordered_bounded(pool, chunks, max_in_flight: int):
    """Like ``pool.imap`` (ordered), but reads ahead at most ``max_in_flight`` chunks.

    ``Pool.imap`` drains its input iterator as fast as it can, so a 100 GB file would be read into
    the task queue; this keeps memory bounded, and an error raised while reading (an empty file)
    surfaces here in the main process. ``pool`` is a ``ProcessPoolExecutor``: a worker that dies
    breaks it and every pending chunk raises, where ``multiprocessing.Pool`` replaced the worker and
    waited forever for the chunk it had taken.
    """
    from concurrent.futures.process import BrokenProcessPool

    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append((pool.submit(_tokenize_chunk, chunk), chunk))
            if len(pending) >= max_in_flight:
                yield pending[0][0].result()
                pending.popleft()
        while pending:
            yield pending[0][0].result()
            pending.popleft()
    except BrokenProcessPool:  # from result() or submit(): name the lines of every chunk in flight
        path, first, last = pending[0][1][0], pending[0][1][1], pending[-1][1]
        raise WorkerDied(f"{path}:{first}..{last[1] + len(last[2]) - 1}: a tokenizing worker process died on "
                         "these lines (killed by a signal; the out-of-memory killer? try fewer --workers)") from None


def _launch_workers(pool) -> None:
    """Fork the pool's workers now (a fork-context executor starts them all at its first task), with
    SIGINT blocked, so that a Ctrl-C during their start-up cannot interrupt one before it ignores
    SIGINT (_init_worker); the main process gets that Ctrl-C when this returns."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pool.submit(os.getpid).result()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop(pool, grace: float = 5.0) -> None:
    """End the workers now: chunks in flight are not waited for (an error or interrupt stops the run).
    Each is terminated, then killed if it has not ended within ``grace`` seconds; the executor itself is
    not joined (a worker ended mid-transfer can leave its queue's feeder thread blocked for good)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)


def check_eod(tokenizer, tokenizer_model: str, append_eod: bool) -> None:
    """``append_eod`` needs an EOD id: a SentencePiece model trained without EOS has -1, which the cast
    to the output dtype turned into 65535."""
    if append_eod and tokenizer.eod < 0:
        raise ValueError(f"{tokenizer_model}: has no end-of-document token (its end-of-sequence id is "
                         f"{tokenizer.eod}), so documents cannot end with one; use a tokenizer with an EOS "
                         "piece (tools/train_tokenizer.py makes </s> id 2) or leave out --append-eod")


def eod_note(tokenizer, eod_token: str | None) -> str | None:
    """The line naming a Hugging Face tokenizer's end-of-document token and id (guessed unless
    ``eod_token`` named it), shown before any tokenizing, so a wrong guess is seen at once and not
    after hours of work, and the truncation or padding its tokenizer.json set and loading turned off.
    None for SentencePiece (its EOS piece)."""
    token = getattr(tokenizer, "eod_token", None)
    if token is None:
        return None
    how = "given by --eod-token" if eod_token else "guessed from the vocabulary; --eod-token picks another"
    note = f"end-of-document token {token!r}, id {tokenizer.eod} ({how})"
    if not getattr(tokenizer, "eod_special", True):
        note += "; it is an ordinary vocabulary entry, not one of the tokenizer's special tokens"
    off = getattr(tokenizer, "switched_off", None)
    if off:  # data/tokenizer.py HFTokenizer: they would cut documents or add pad ids
        note += f"; the tokenizer.json's {' and '.join(off)} turned off: documents are written whole, without pad ids"
    return note


def check_inputs(paths, twice: str = "its documents would be in the output twice") -> None:
    """Every input exists, and none is given twice (a glob and a file, two globs or a directory that
    overlap, a symbolic or hard link); ``twice`` says what that would do, in the caller's words (tokenizer
    training has no output holding documents: its documents would be trained on twice)."""
    seen: dict[tuple, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        real = (path.stat().st_dev, path.stat().st_ino)  # the file itself: realpath missed a hard link
        if real in seen:
            same = "" if str(seen[real]) == str(path) else f" (as {seen[real]})"
            raise ValueError(f"{path}: given twice as input{same}; {twice}")
        seen[real] = path


def check_json_keys(json_keys) -> None:
    """Each key names one output dataset, ``<prefix>_<key>_document``: refuse none, a repeated key (its
    documents would be written twice into one dataset) and a key that is not a plain file-name part."""
    if not json_keys:
        raise ValueError("json_keys is empty")
    for i, key in enumerate(json_keys):
        if not isinstance(key, str) or not key or "/" in key or os.sep in key or "\0" in key:
            raise ValueError(f"--json-keys {key!r}: a key names its output dataset PREFIX_<key>_document, so it "
                             "must be a non-empty name without a path separator")
        if key in json_keys[:i]:
            raise ValueError(f"--json-keys {key!r} is given twice (each key is one output dataset)")


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
    max_shard_tokens: int | None = None,
    eod_token: str | None = None,
    word_cache: bool = True,
    task: tuple[int, int] | None = None,
    log=None,
    special_tokens_in_text: str = SPECIAL_DEFAULT,
    overwrite: bool = False,
) -> PreprocessStats:
    """Tokenize ``inputs`` (in order, documents in file order) into ``<output_prefix>_<key>_document``.

    ``tokenizer_model``: a SentencePiece ``.model`` or an HF ``tokenizer.json`` (``eod_token`` picks
    its end-of-document token; ``word_cache=False`` calls the tokenizer library per chunk instead of
    the exact word cache: data/word_cache.py for SentencePiece BPE, data/hf_fast.py for HF byte-level BPE). ``max_shard_tokens``: split the output into shards
    ``<output_prefix>_<key>_document_00000``, ... of about that many tokens (whole documents).
    Raises ``BadRecord`` (``file:line: reason``) on the first bad record unless
    ``skip_bad_records``, and ``CorruptInput`` on an unreadable file; either way nothing is left
    written unless the whole run succeeds. ``append_eod`` defaults to True here (GPT pretraining
    needs document separators); the CLI keeps Megatron's opt-in ``--append-eod`` flag.

    ``task=(index, count)``: only this array task's contiguous, byte-balanced share of ``inputs``,
    into ``<output_prefix>_task<index>of<count>_<key>_document`` with the run's identity in its
    manifest (megatron_osp/data/array_tasks.py; merged by ``merge.merge_tasks``). A task may have no
    documents (its share is empty): it publishes an empty dataset; the merge refuses an empty whole.
    ``log``: called before any work with ``eod_note``'s line (a Hugging Face tokenizer) and the
    encoding path (the exact word cache, or the library and why).
    ``special_tokens_in_text``: encode, split or refuse (data/special_text.py), recorded in the manifest.
    An earlier output of the prefix is replaced only by a rerun over the same inputs or with ``overwrite``
    (``sharded_output.check_earlier_output``, before any tokenizing).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    check_output_prefix(output_prefix)
    check_json_keys(json_keys)
    if max_shard_tokens is not None and max_shard_tokens < 1:
        raise ValueError(f"max_shard_tokens must be >= 1, got {max_shard_tokens}")
    tokenizer = load_tokenizer(tokenizer_model, eod_token, word_cache, special_tokens_in_text=special_tokens_in_text)
    check_eod(tokenizer, tokenizer_model, append_eod)
    # Both go into the manifest: the sha256 says which file was used, the fingerprint which ids it
    # makes (two files of one fingerprint encode alike, data/tokenizer_identity.py).
    tokenizer_ids = {"tokenizer_sha256": sha256_file(tokenizer.model_file),
                     "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer.model_file)}
    note = eod_note(tokenizer, eod_token)
    if log is not None:
        for line in (note, f"encoding: {tokenizer.encoding_path()}"):
            if line:
                log(line)
    paths = [Path(p) for p in inputs]
    check_inputs(paths)
    array_record = None
    if task is not None:
        from megatron_osp.data import array_tasks

        index, count = task
        if not 0 <= index < count:
            raise ValueError(f"task index {index} is not in 0..{count - 1}")
        mine, array_record = array_tasks.task_record(
            [str(p) for p in paths], index, count, tokenizer, tokenizer.model_file, json_keys, append_eod,
            special_tokens_in_text)
        paths = [Path(p) for p in mine]
        output_prefix = array_tasks.task_prefix(output_prefix, index, count)
    check_earlier_output(output_prefix, json_keys, paths, overwrite)
    check_corpus_form(paths, json_keys, not skip_bad_records)  # this task's share only: first lines, before any output
    pool = (ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                                initargs=(tokenizer_model, eod_token, os.getpid(), word_cache, special_tokens_in_text))
            if workers > 1 else None)
    try:
        if pool is None:  # this process encodes, with the tokenizer (and word cache) loaded above
            global _TOKENIZER
            _TOKENIZER = tokenizer
        else:
            _launch_workers(pool)
        # The stage directory: an unwritable output fails here, before any tokenizing.
        output = ShardedOutput(output_prefix, json_keys, token_dtype_for(tokenizer.vocab_size), max_shard_tokens)
    except BaseException:
        if pool is not None:
            _stop(pool)
        raise
    stats = PreprocessStats(notes=list(output.stage.notes))
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="tokenize", unit="doc", dynamic_ncols=True)  # its rate is docs/s
    try:
        for path in paths:
            chunks = (c + (append_eod,) for c in record_chunks(path, list(json_keys), chunk_lines))
            results = _ordered_bounded(pool, chunks, 4 * workers) if pool else map(_tokenize_chunk, chunks)
            for chunk in results:
                for record in chunk.bad:
                    if not skip_bad_records:
                        raise record
                    stats.bad_records += 1
                    if len(stats.bad_locations) < max_bad_locations:
                        stats.bad_locations.append(str(record).split(": ", 1)[0])
                stats.bytes += chunk.nbytes
                stats.empty_documents += chunk.empty
                output.add_documents(chunk.lengths, chunk.tokens, chunk.samples)
                stats.documents += len(chunk.lengths[0])
                stats.tokens += sum(len(t) for t in chunk.tokens)
                if bar is not None:
                    bar.update(chunk.items)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(tok_s=f"{stats.tokens / elapsed:,.0f}", MB_s=f"{stats.bytes / 1e6 / elapsed:.1f}")
        if stats.documents == 0 and task is None:
            raise no_documents(paths, stats)
        outputs = output.finalize({
            "tokenizer": os.path.abspath(tokenizer_model), "vocab_size": int(tokenizer.vocab_size),
            **tokenizer_ids, "eod": int(tokenizer.eod),
            "dtype": np.dtype(output.dtype).name, "inputs": [str(p) for p in paths],
            "append_eod": bool(append_eod), SPECIAL_FIELD: special_tokens_in_text, "max_shard_tokens": max_shard_tokens,
            "skip_bad_records": bool(skip_bad_records), **({"array": array_record} if array_record else {})})
    except BaseException:
        output.abort()
        if pool is not None:
            _stop(pool)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - start
    stats.outputs = outputs
    return stats
