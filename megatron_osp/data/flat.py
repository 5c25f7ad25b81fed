"""Ragged token lists as one flat array plus per-text lengths, the form every encoder returns.

Shared by ``tokenizer.py`` and ``word_cache.py`` so neither imports the other for it: the tokenizer
uses the word cache (one way), and both use these helpers.
"""

from __future__ import annotations

import numpy as np


def flatten(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (all ids concatenated as int64, each list's length as int64)."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def split_flat(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """``encode_flat``'s result as one array per text (views into ``flat``)."""
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
