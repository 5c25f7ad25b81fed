"""Merge indexed datasets into one: .bin files streamed back to back, indices joined.

Document boundaries are kept (a Megatron dataset with several sequences per document stays so), the
result is byte-identical to Megatron-Core's ``IndexedDatasetBuilder.add_index`` merge (tested), and it
is written under temporary names and renamed at the end, so a failed merge leaves nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter


def merge_datasets(input_prefixes: list[str], output_prefix: str) -> dict:
    """Write ``output_prefix``.{bin,idx} = the inputs in order. All inputs must share a dtype."""
    if not input_prefixes:
        raise ValueError("no input datasets to merge")
    out = os.path.realpath(output_prefix)
    for prefix in input_prefixes:
        if os.path.realpath(prefix) == out:
            raise ValueError(f"{prefix}: the output prefix is also an input")
    datasets = [IndexedDataset(p) for p in input_prefixes]  # each validated on open, by name
    dtype = datasets[0].dtype
    for ds in datasets[1:]:
        if ds.dtype != dtype:
            raise ValueError(
                f"{ds.prefix}: token dtype {ds.dtype} differs from {datasets[0].prefix}'s {dtype}; "
                "datasets from tokenizers of different sizes cannot be merged"
            )
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for ds in datasets:
            writer.add_dataset(ds)
    merged = IndexedDataset(output_prefix)
    return {"datasets": len(datasets), "sequences": len(merged), "tokens": merged.num_tokens}


def prefixes_in(directory: str | os.PathLike) -> list[str]:
    """Every dataset (``*.idx`` with its ``.bin``) in a directory, sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory")
    found = sorted(str(p)[:-4] for p in d.glob("*.idx"))
    if not found:
        raise FileNotFoundError(f"{d}: no .idx files")
    return found
