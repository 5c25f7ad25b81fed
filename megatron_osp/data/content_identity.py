"""Whether two indexed datasets (``PREFIX.bin``/``PREFIX.idx``) in different files hold the same
documents: a byte copy under another name (``cp a.bin held.bin; cp a.idx held.idx``), which file
identity (device and inode) does not see.

Cheap by construction: datasets whose ``.bin`` sizes differ (the normal case) cost one ``stat`` each
and are never opened. Only for equal ``.bin`` and ``.idx`` sizes are bytes read: the first and last
MiB of each ``.bin``, then both ``.idx`` files compared in 1 MiB blocks, stopping at the first block
that differs (an ``.idx`` holds every document's length and byte offset, so equal ``.idx`` bytes and
``.bin`` size mean the same documents of the same lengths; the ``.bin`` edges tell apart datasets of
identical layout and other tokens). The middle of the ``.bin`` is not read: a dataset that differs
only there (same layout, same first and last MiB) counts as the same content.

Documents tokenized again (the same texts preprocessed once for training and once as a validation set,
in runs of their own, in other files or another order) are no byte copy. For them every dataset a
preprocessing run or a merge publishes records in its manifest entry a content sample
(``content_sample``): the hashes of the documents whose hash (64 bits, of the document's ids as int64
values and their order, whatever the stored dtype: ``document_hashes``) is a multiple of
``SAMPLE_RATE``, one document in 1024, chosen by content alone. A document
both datasets hold is in both samples or in neither, so the share of a validation set's sampled
documents that training's samples hold estimates the share of its documents training reads
(``shared_documents``). Reading the samples costs what reading the manifests does (about 16 bytes of
manifest per 1024 documents); nothing of the data files is read. A validation set needs about 3,000
documents for a sample of 3."""

from __future__ import annotations

import hashlib
import os

import numpy as np

SAMPLE_FIELD = "content_sample"
SAMPLE_RATE = 1024
SAMPLE_SCHEME = (f"sum of splitmix64(id + position * 0x9e3779b97f4a7c15) over the ids as int64, mixed with the "
                 f"length, hash % {SAMPLE_RATE} == 0")
_EDGE = 1 << 20  # bytes read at each end of a .bin
_BLOCK = 1 << 20  # bytes per .idx comparison read


def _sizes(prefix: str) -> tuple[int, int]:
    return os.path.getsize(prefix + ".bin"), os.path.getsize(prefix + ".idx")


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def dataset_id(prefix: str):
    """What makes two prefixes one dataset: its .bin file (device and inode: under any symbolic or hard
    link of its name, as training reads it), else (no .bin: a merge's source removed since) its real path."""
    return _file_id(prefix + ".bin") if os.path.exists(prefix + ".bin") else os.path.realpath(prefix)


def _bin_edges(prefix: str, size: int) -> bytes:
    """The sha256 of the first and last ``_EDGE`` bytes of ``prefix``.bin (all of it when smaller)."""
    h = hashlib.sha256()
    with open(prefix + ".bin", "rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(size - _EDGE, _EDGE))
            h.update(f.read(_EDGE))
    return h.digest()


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block = fa.read(_BLOCK)
            if block != fb.read(_BLOCK):
                return False
            if not block:
                return True


def same_content(a: str, b: str) -> bool:
    """Whether datasets ``a`` and ``b`` (prefixes; their files exist) hold the same content: equal
    ``.bin`` sizes, equal ``.idx`` bytes, equal first and last MiB of ``.bin``. The same files (any
    link to them) count too."""
    if _file_id(a + ".bin") == _file_id(b + ".bin"):
        return True
    size = _sizes(a)
    if size != _sizes(b):
        return False
    return _bin_edges(a, size[0]) == _bin_edges(b, size[0]) and _same_bytes(a + ".idx", b + ".idx")


def copies_of(prefixes: list[str], others: list[str]) -> dict[str, str]:
    """Each dataset of ``prefixes`` that holds the same content as one of ``others`` in other files
    (not the same ``.bin`` under another link: file identity says that already), with the first such
    one. Datasets whose ``.bin`` sizes differ are only stat'ed."""
    by_size: dict[int, list[str]] = {}
    for o in others:
        by_size.setdefault(os.path.getsize(o + ".bin"), []).append(o)
    found = {}
    for p in prefixes:
        for o in by_size.get(os.path.getsize(p + ".bin"), []):
            if _file_id(p + ".bin") != _file_id(o + ".bin") and same_content(p, o):
                found[p] = o
                break
    return found


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's finalizer
_POS = np.uint64(0x9E3779B97F4A7C15)  # a token's position, times this, is added to its id before mixing
_LEN, _SEED = np.uint64(0xD6E8FEB86659FD93), np.uint64(0x2545F4914F6CDD1D)  # the final mix of (sum, length)
_BLOCK_TOKENS = 1 << 16  # tokens hashed per step: its uint64 temporaries (512 KiB each) stay in cache


def _mix(x: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """splitmix64's finalizer, in place on uint64 ``x`` (wrapping arithmetic), which it returns;
    ``scratch``: a uint64 array of x's size for the shifts."""
    t = np.empty_like(x) if scratch is None else scratch
    for shift, factor in ((30, _M1), (27, _M2), (31, None)):
        np.right_shift(x, np.uint64(shift), out=t)
        x ^= t
        if factor is not None:
            x *= factor
    return x


_POSITIONS = np.zeros(0, np.uint64)


def _positions(n: int) -> np.ndarray:
    """``arange(n) * _POS`` (uint64, wrapping), from a table of ``_BLOCK_TOKENS`` kept between calls
    (computed afresh for a block longer than that: one long document)."""
    global _POSITIONS
    if n > _BLOCK_TOKENS:
        return np.arange(n, dtype=np.uint64) * _POS
    if len(_POSITIONS) != _BLOCK_TOKENS:
        _POSITIONS = np.arange(_BLOCK_TOKENS, dtype=np.uint64) * _POS
    return _POSITIONS[:n]


def document_hashes(lengths: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The 64-bit hash (uint64) of each document (``lengths`` of the concatenated ``tokens``): of its ids
    as int64 values and their order, not of the bytes stored, so a document stored as uint16 and as int32
    hashes alike. Each token gives mix(id + position * _POS) (position within the document), a document
    the wrapping sum of its tokens', and its hash is mix(sum + length * _LEN + _SEED). Vectorized: no
    Python call per document."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.min() < 0:
        raise ValueError(f"document lengths must not be negative (document {int(np.argmin(lengths))})")
    ends = np.cumsum(lengths)
    if len(tokens) != (int(ends[-1]) if len(ends) else 0):
        raise ValueError(f"{len(tokens)} tokens for documents of {int(ends[-1]) if len(ends) else 0} in all")
    sums = np.zeros(len(lengths), np.uint64)
    starts = ends - lengths
    full = np.flatnonzero(lengths)  # reduceat needs a token at each start: empty documents sum to 0
    full_ends, lo = ends[full], 0
    while lo < len(full):  # blocks of whole documents of about _BLOCK_TOKENS tokens (at least one document)
        hi = max(int(np.searchsorted(full_ends, starts[full[lo]] + _BLOCK_TOKENS, side="right")), lo + 1)
        docs = full[lo:hi]
        first, last = int(starts[docs[0]]), int(ends[docs[-1]])
        x = tokens[first:last].astype(np.int64).view(np.uint64)  # a copy: mixed in place
        local = starts[docs] - first
        x += _positions(last - first)  # position in the block, times _POS...
        offsets = np.repeat(local.view(np.uint64) * _POS, lengths[docs])
        x -= offsets  # ... less its document's start's: position in the document, times _POS
        sums[docs] = np.add.reduceat(_mix(x, scratch=offsets), local)
        lo = hi
    return _mix(sums + lengths.view(np.uint64) * _LEN + _SEED)


def sampled_documents(lengths: np.ndarray, tokens: np.ndarray) -> list[tuple[int, int]]:
    """``(index, hash)`` of the documents (``lengths`` of the concatenated ``tokens``) that the content
    sample keeps: those whose ``document_hashes`` is a multiple of ``SAMPLE_RATE``. Empty documents are
    never kept (they hold no content; all would hash alike). tools/bench_content_sample.py measures it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    h = document_hashes(lengths, tokens)
    keep = np.flatnonzero((h % np.uint64(SAMPLE_RATE) == 0) & (lengths > 0))
    return list(zip(keep.tolist(), h[keep].tolist()))


def sample_record(hashes) -> dict:
    """A manifest entry's ``content_sample``: the scheme and the hashes, sorted, as one hex string."""
    return {"scheme": SAMPLE_SCHEME, "hashes": "".join(f"{h:016x}" for h in sorted(hashes))}


def recorded_sample(prefix: str) -> np.ndarray | None:
    """The content sample the manifest records for dataset ``prefix`` (uint64), or None: no manifest,
    a manifest written before samples were, another scheme, or a merge of an input without one."""
    from megatron_osp.data import shardset

    family = shardset.family_of(prefix)
    if family is None:
        return None
    try:
        entry = shardset._listed(family)[1].get(os.path.basename(prefix), {})
    except (OSError, ValueError):  # opening the dataset names the problem
        return None
    record = entry.get(SAMPLE_FIELD)
    if not (isinstance(record, dict) and record.get("scheme") == SAMPLE_SCHEME and isinstance(record.get("hashes"), str)):
        return None
    try:
        return np.frombuffer(bytes.fromhex(record["hashes"]), dtype=">u8").astype(np.uint64)
    except ValueError:
        return None


def recorded_samples(prefixes: list[str]) -> np.ndarray | None:
    """The content samples the manifests record for ``prefixes``, concatenated (duplicates kept), or None
    where one has none (or no prefix is given)."""
    samples = [recorded_sample(p) for p in prefixes]
    if not samples or any(s is None for s in samples):
        return None
    return np.concatenate(samples)


def merged_sample(prefixes: list[str]) -> dict | None:
    """The ``content_sample`` of a merge of ``prefixes``: the union of theirs, or None where one has none."""
    samples = recorded_samples(prefixes)
    return None if samples is None else sample_record(np.unique(samples).tolist())


def training_sample(prefixes: list[str]) -> np.ndarray:
    """The union of the content samples of ``prefixes`` (those that record one), sorted."""
    samples = [s for s in map(recorded_sample, prefixes) if s is not None]
    return np.unique(np.concatenate(samples)) if samples else np.zeros(0, np.uint64)


def shared_documents(prefixes: list[str], pool: np.ndarray) -> tuple[int, int]:
    """``(shared, sampled)``: how many of the documents the content samples of ``prefixes`` hold are in
    ``pool`` (``training_sample``), and how many they hold; (0, 0) where none records a sample."""
    samples = [s for s in map(recorded_sample, prefixes) if s is not None]
    if not samples:
        return 0, 0
    mine = np.unique(np.concatenate(samples))
    return int(np.isin(mine, pool, assume_unique=True).sum()), len(mine)


MIN_SHARED = 3  # sampled documents in common before a verdict
# The share of the sample that must be in training's: documents tokenized again are all there (100%),
# while a held-out part of an un-deduplicated crawl shares its exact duplicates with training (any
# share). Small samples are noisy (6 sampled documents of a set 30% of which training holds reach
# half 26% of the time, 4/5 1%), so the bar is 4/5, not 1/2: the check names sets tokenized again
# and leaves partial overlap unjudged.
MIN_SHARE = (4, 5)


def retokenized_overlap(prefixes: list[str], pool: np.ndarray) -> str | None:
    """What says that the datasets ``prefixes`` (a validation set) hold documents ``pool`` (the
    ``training_sample`` of the training datasets) holds too, tokenized again: at least ``MIN_SHARED``
    and ``MIN_SHARE`` of their sampled documents shared; None otherwise, or where they record no sample."""
    shared, sampled = shared_documents(prefixes, pool)
    if shared < MIN_SHARED or MIN_SHARE[1] * shared < MIN_SHARE[0] * sampled:
        return None
    return (f"{shared} of the {sampled} documents its content sample holds (one document in {SAMPLE_RATE}, chosen by "
            f"content; the manifests' {SAMPLE_FIELD}) are in the training datasets' samples too: it holds about "
            f"{shared / sampled:.0%} of its documents in common with data.paths, tokenized again (another "
            "preprocessing run of the same texts)")
