"""Token ids of an indexed dataset checked against the vocabulary when the dataset opens.

An id outside the model's vocabulary used to fail only inside ``torch.embedding`` after start-up
(an IndexError on CPU, a device-side assert on a GPU) naming neither the file nor the setting; an
.idx whose dtype code was changed (e.g. uint16 -> uint8) trained on reinterpreted bytes. Here:

- the .idx dtype must be an integer type able to hold every id of the vocabulary (an index that
  says uint8 for a 350-piece tokenizer is refused, naming the file);
- the smallest and largest id in the .bin (one vectorized pass over the memory-mapped file, in
  chunks of ``CHUNK_TOKENS`` so memory stays bounded) must lie in ``[0, vocab_size)``; a bad id is
  named with its file, sequence and position.

The pass reads the whole .bin once (a few GB/s: ~1 ms per MB). With an index cache directory
(``GPTDataConfig.cache_dir``, the run's ``index_cache``) the result is stored there under the
files' size and modification time, so it is computed once per node and corpus version, never
written beside the data; without one it runs once per open.
"""

from __future__ import annotations

import numpy as np

from megatron_osp.data.index_cache import cached_arrays, file_fingerprint

CHUNK_TOKENS = 1 << 24  # 32 MB of uint16 per step of the scan


class TokenRangeError(ValueError):
    """Token ids of a data file that the vocabulary cannot hold."""


def _tokens(dataset) -> np.ndarray:
    """Every token stored in the .bin, as the index's dtype (a view of the memory map)."""
    raw = dataset._bin
    usable = len(raw) - len(raw) % dataset.dtype.itemsize
    return raw[:usable].view(dataset.dtype)


def scan_token_range(dataset) -> tuple[int, int]:
    """(smallest, largest) token id stored in ``dataset``'s .bin; (0, -1) when it holds none."""
    tokens = _tokens(dataset)
    lo, hi = None, None
    for start in range(0, len(tokens), CHUNK_TOKENS):
        chunk = tokens[start : start + CHUNK_TOKENS]
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
    return (0, -1) if lo is None else (lo, hi)


def cached_token_range(dataset, cache_dir: str | None) -> tuple[int, int]:
    """``scan_token_range`` through the index cache (computed by one rank per node, once per corpus
    version); every rank must call it, in the same order (the cache holds a barrier)."""
    key = {
        "class": "megatron_osp.token_range",
        "idx": file_fingerprint(dataset.prefix + ".idx"),
        "bin": file_fingerprint(dataset.prefix + ".bin"),
        "dtype": str(dataset.dtype),
    }
    arrays = cached_arrays(
        cache_dir, "token-range", key, lambda: {"range": np.array(scan_token_range(dataset), dtype=np.int64)}
    )
    lo, hi = (int(v) for v in arrays["range"])
    return lo, hi


def _locate(dataset, bad) -> str:
    """Where the first token with ``bad(ids)`` true lies: 'sequence S, token T' (or a byte offset)."""
    tokens = _tokens(dataset)
    for start in range(0, len(tokens), CHUNK_TOKENS):
        hits = np.flatnonzero(bad(tokens[start : start + CHUNK_TOKENS]))
        if hits.size:
            position = start + int(hits[0])
            byte = position * dataset.dtype.itemsize
            pointers = dataset.sequence_pointers
            seq = int(np.searchsorted(pointers, byte, side="right")) - 1
            if seq >= 0:
                offset = (byte - int(pointers[seq])) // dataset.dtype.itemsize
                if offset < int(dataset.sequence_lengths[seq]):
                    return f"id {int(tokens[position])} in sequence {seq}, token {offset}"
            return f"id {int(tokens[position])} at byte {byte} (outside every sequence)"
    return "no such token"


def check_token_range(dataset, vocab_size: int, vocab_name: str, cache_dir: str | None = None) -> None:
    """TokenRangeError naming the file unless every stored id (and the dtype) fits ``vocab_size``.

    ``vocab_name`` says where the vocabulary comes from in messages, e.g. "model.vocab_size=350".
    """
    idx, bin_path = dataset.prefix + ".idx", dataset.prefix + ".bin"
    dtype = dataset.dtype
    if dtype.kind not in "iu":
        raise TokenRangeError(f"{idx}: token dtype {dtype} is not an integer type; token ids cannot be stored in it")
    if int(np.iinfo(dtype).max) < vocab_size - 1:
        raise TokenRangeError(
            f"{idx}: token dtype {dtype} holds ids up to {np.iinfo(dtype).max}, but {vocab_name} has ids up "
            f"to {vocab_size - 1}; the index's dtype does not fit this vocabulary (a damaged .idx, or data "
            "made with another tokenizer)"
        )
    lo, hi = cached_token_range(dataset, cache_dir)
    if hi >= vocab_size:
        where = _locate(dataset, lambda ids: ids >= vocab_size)
        raise TokenRangeError(
            f"{bin_path}: token ids reach {hi}, outside {vocab_name} (ids 0..{vocab_size - 1}); first: {where}. "
            "The data was made with a larger vocabulary: set the tokenizer/vocab_size it was made with"
        )
    if lo < 0:
        where = _locate(dataset, lambda ids: ids < 0)
        raise TokenRangeError(f"{bin_path}: negative token id {lo}; first: {where}")
