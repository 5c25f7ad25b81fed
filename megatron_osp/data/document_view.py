"""The documents of a dataset prefix, a sharded output's prefix too, as training splits them.

A sharded preprocessing output ``P`` (a ``P.shards.json`` manifest listing ``P_00000``, ...;
data/shardset.py) is read as its shards in the manifest's order. Training builds one dataset per shard
and splits each by ``data.split`` on its own (data/gpt_dataset.py ``split_documents``), so a fraction
range here is also taken per shard: ``(lo, hi)`` selects the documents ``[round(lo·D_s), round(hi·D_s))``
of each shard ``s``, shard after shard. For a plain prefix that is ``[round(lo·D), round(hi·D))``.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from megatron_osp.data.shardset import expand

__all__ = ["DocumentView", "check_dataset_files"]


def check_dataset_files(prefix: str, what: str) -> list[str]:
    """The datasets ``prefix`` names (its shards, for a sharded output); FileNotFoundError naming ``what``,
    the missing file and, for a shard, its family, when a ``.bin``/``.idx`` is not there."""
    shards = expand(prefix)
    for shard in shards:
        for ext in (".bin", ".idx"):
            if not os.path.exists(shard + ext):
                whose = f" (a shard of {prefix}, as {prefix}.shards.json lists)" if shard != prefix else ""
                raise FileNotFoundError(f"{what}: {shard + ext} does not exist{whose}")
    return shards


class DocumentView:
    """Reads the documents of a fraction range of ``prefix``, taken per shard (module docstring)."""

    def __init__(self, prefix: str | os.PathLike):
        from megatron_osp.data.indexed import IndexedDataset

        self.prefix = str(prefix)
        self.shards = expand(self.prefix)
        self.datasets = [IndexedDataset(s) for s in self.shards]

    @property
    def sharded(self) -> bool:
        return self.shards != [self.prefix]

    def ranges(self, fractions: tuple[float, float]) -> list[range]:
        """Each shard's documents in ``fractions``, rounded as the training split rounds them."""
        from megatron_osp.data.gpt_dataset import split_documents

        return [split_documents(len(ds), fractions) for ds in self.datasets]

    def lengths(self, fractions: tuple[float, float]) -> np.ndarray:
        """Token counts of those documents, shard after shard (int64; reads only the indices)."""
        parts = [np.asarray(ds.sequence_lengths[r.start:r.stop], dtype=np.int64)
                 for ds, r in zip(self.datasets, self.ranges(fractions))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def documents(self, fractions: tuple[float, float]) -> Iterator[np.ndarray]:
        """Those documents' tokens (int64), shard after shard, each shard's in order."""
        for ds, r in zip(self.datasets, self.ranges(fractions)):
            for i in r:
                yield np.asarray(ds[i], dtype=np.int64)

    def windows(self, fractions: tuple[float, float], window: int, picks: np.ndarray) -> np.ndarray:
        """``[len(picks), window]`` int64: window ``k`` of each pick is tokens ``[k·window, (k+1)·window)`` of
        those documents concatenated (shard after shard, as ``documents`` yields them). Reads only the
        documents the picked windows cover, so a sparse pick over a large held-out set stays cheap."""
        lengths = self.lengths(fractions)
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if len(ends) else 0
        picks = np.asarray(picks, dtype=np.int64)
        if len(picks) and (picks.min() < 0 or (int(picks.max()) + 1) * window > total):
            raise IndexError(f"window {int(picks.max())} of {window} tokens is past the {total} tokens of "
                             f"{self.describe(fractions)}")
        where = []  # the flat document index -> (dataset, document), shard after shard
        for ds, r in zip(self.datasets, self.ranges(fractions)):
            where.append((ds, r.start, len(r)))
        firsts = np.cumsum([0] + [n for _, _, n in where])

        def read(j: int, offset: int, count: int) -> np.ndarray:
            s = int(np.searchsorted(firsts, j, side="right")) - 1
            ds, start, _ = where[s]
            return np.asarray(ds.get(start + j - int(firsts[s]), offset, count), dtype=np.int64)

        out = np.empty((len(picks), window), dtype=np.int64)
        for row, k in enumerate(picks):
            pos, filled = int(k) * window, 0
            j = int(np.searchsorted(ends, pos, side="right"))  # the document holding token pos
            while filled < window:
                doc_start = int(ends[j] - lengths[j])
                count = min(window - filled, int(ends[j]) - pos)
                out[row, filled:filled + count] = read(j, pos - doc_start, count)
                filled, pos, j = filled + count, pos + count, j + 1
        return out

    def describe(self, fractions: tuple[float, float]) -> str:
        """Which documents, for a message: ``documents 95..99 of P`` for a plain prefix; for a sharded
        output the range of each shard (the first and last three of many)."""
        ranges = self.ranges(fractions)
        if not self.sharded:
            return f"documents {ranges[0].start}..{ranges[0].stop - 1} of {self.prefix}"
        each = [f"{r.start}..{r.stop - 1} of {os.path.basename(s)}" for s, r in zip(self.shards, ranges)]
        if len(each) > 6:
            each = each[:3] + [f"... ({len(each) - 6} more)"] + each[-3:]
        return (f"documents {fractions[0]}:{fractions[1]} of each of the {len(self.shards)} shards of {self.prefix} "
                f"({', '.join(each)})")
