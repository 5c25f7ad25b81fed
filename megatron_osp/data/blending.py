"""Blending indices: for each sample of a blend, which dataset it comes from and which of its samples.

Same greedy rule, float arithmetic and tie-breaking as Megatron-Core's ``helpers`` (so a blend reads
the same samples as Megatron-Core's ``BlendedDataset``), with input checks that name the argument.
"""

from __future__ import annotations

import numbers

import numpy as np

from megatron_osp.data import _index_builders


def normalize_weights(weights) -> list[float]:
    """Weights scaled to sum to 1, as Megatron-Core's ``normalize`` (float64 sum, then divide)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError(f"weights must be a non-empty list of numbers, got {weights!r}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
    return (w / np.sum(w)).tolist()


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64) for ``size`` samples drawn by ``weights``.

    ``weights`` are used as given (Megatron-Core normalises them first; see ``normalize_weights``).
    """
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be a non-empty 1-D list of finite numbers, got {weights!r}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
        raise ValueError(f"size must be an integer >= 0, got {size!r}")
    return _index_builders.blending_indices(w, int(size))


def build_exhaustive_blending_indices(sizes) -> tuple[np.ndarray, np.ndarray]:
    """Indices that take exactly ``sizes[d]`` samples from dataset d, interleaved by proportion."""
    s = np.asarray(sizes)
    if s.ndim != 1 or len(s) == 0 or not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"sizes must be a non-empty 1-D list of integers, got {sizes!r}")
    if s.min() < 1:
        raise ValueError(f"sizes must be >= 1, got {s.tolist()}")
    return _index_builders.exhaustive_blending_indices(np.ascontiguousarray(s, dtype=np.int64))
