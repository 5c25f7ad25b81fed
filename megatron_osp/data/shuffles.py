"""Seeded shuffles for GPT data: the document index over epochs and the shuffle index of samples.

Both come from the C++ scatter shuffle (csrc/shuffle.cpp): every random draw is a hash of
(seed, stream, position), and the work is cut into pieces that depend only on the length, so the
result is the same on 1 or 64 threads and parallel builds stay reproducible. The orders are uniform
random permutations but NOT the ones numpy's ``RandomState.shuffle`` gives for the same seed, so
they differ from Megatron-Core's indices (the sample index and blending indices built on them
follow Megatron-Core's rules exactly).
"""

from __future__ import annotations

import numbers
import os

import numpy as np

from megatron_osp.data import _index_builders

# Independent random streams per use, so one seed never correlates two shuffles.
_STREAM_DOCUMENTS = 1
_STREAM_DOCUMENTS_FINAL_EPOCH = 2
_STREAM_SAMPLES = 3
_STREAM_SAMPLES_FINAL_EPOCH = 4
_INT32_LIMIT = 2**31
_UINT32_LIMIT = 2**32 - 1


def default_threads() -> int:
    """CPU cores this process may use (the result never depends on it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _seed(seed) -> int:
    seed = _int("seed", seed, 0)
    if seed >= 2**64:
        raise ValueError(f"seed must be < 2**64, got {seed}")
    return seed


def _threads(threads) -> int:
    return default_threads() if threads is None else _int("threads", threads, 1)


def document_layout(documents, num_epochs: int, separate_final_epoch: bool):
    """Checked inputs of a document index: (n, dtype, values or None, range start, split position).

    ``values`` is None for a range (ids ``start .. start + n - 1``); positions before the split
    position are shuffled with one stream, the rest (Megatron's separate final epoch) with another.
    """
    num_epochs = _int("num_epochs", num_epochs, 1)
    if isinstance(documents, range):
        if documents.step != 1:
            raise ValueError(f"documents must be a range with step 1, got {documents!r}")
        if len(documents) == 0:
            raise ValueError("documents is empty")
        if documents.start < 0:
            raise ValueError(f"documents must be >= 0, got {documents!r}")
        n, start = len(documents), documents.start
        dtype = np.int32 if documents.stop <= _INT32_LIMIT else np.int64
        values = None
    else:
        values = np.asarray(documents)
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"documents must be a range or a 1-D integer array, got {values.dtype} {values.shape}")
        if len(values) == 0:
            raise ValueError("documents is empty")
        if values.min() < 0:
            raise ValueError(f"documents must be >= 0, found {int(values.min())}")
        n, start = len(values), 0
        dtype = np.int32 if int(values.max()) < _INT32_LIMIT else np.int64
        values = np.ascontiguousarray(values, dtype=dtype)
    total = n * num_epochs
    split_at = n * (num_epochs - 1) if separate_final_epoch and num_epochs > 1 else total
    return n, dtype, values, start, split_at


def build_document_index(
    documents,
    num_epochs: int,
    seed: int,
    separate_final_epoch: bool = False,
    threads: int | None = None,
) -> np.ndarray:
    """The split's document ids repeated ``num_epochs`` times, shuffled.

    ``documents`` is a ``range`` (step 1; no array is materialised) or a 1-D integer array. With
    ``separate_final_epoch`` (Megatron's rule for a short last epoch) the first ``num_epochs - 1``
    epochs are shuffled together and the last one on its own, so the final partial epoch still
    covers distinct documents. int32 when every id fits, int64 otherwise.
    """
    n, dtype, values, start, split_at = document_layout(documents, num_epochs, separate_final_epoch)
    seed, threads = _seed(seed), _threads(threads)
    out = np.empty(n * num_epochs, dtype=dtype)
    parts = [(out[:split_at], _STREAM_DOCUMENTS), (out[split_at:], _STREAM_DOCUMENTS_FINAL_EPOCH)]
    for part, stream in parts:
        if len(part) == 0:
            continue
        if values is None:
            _index_builders.shuffle_range_into(part, start, n, seed, stream, threads)
        else:
            _index_builders.shuffle_tiled_into(part, values, seed, stream, threads)
    return out


def build_shuffle_index(num_samples: int, total_size: int, seed: int, threads: int | None = None) -> np.ndarray:
    """A permutation of ``[0, num_samples)`` followed by one of ``[num_samples, total_size)``.

    Megatron's layout: with a separate final epoch, samples of that epoch are shuffled among
    themselves and come last. uint32 below 2^32 - 1 samples (as Megatron), int64 above.
    """
    num_samples = _int("num_samples", num_samples, 0)
    total_size = _int("total_size", total_size, 0)
    if num_samples > total_size:
        raise ValueError(f"num_samples ({num_samples}) must be <= total_size ({total_size})")
    seed, threads = _seed(seed), _threads(threads)
    out = np.empty(total_size, dtype=np.uint32 if total_size < _UINT32_LIMIT else np.int64)
    if num_samples:
        _index_builders.shuffle_range_into(out[:num_samples], 0, num_samples, seed, _STREAM_SAMPLES, threads)
    if total_size > num_samples:
        rest = total_size - num_samples
        _index_builders.shuffle_range_into(
            out[num_samples:], num_samples, rest, seed, _STREAM_SAMPLES_FINAL_EPOCH, threads
        )
    return out
