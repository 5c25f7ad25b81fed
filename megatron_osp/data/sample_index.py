"""Python face of the C++ sample-index builder (same arguments and result as Megatron-Core's).

``build_sample_index`` returns the ``[num_samples + 1, 2]`` int64 array of (position in
``document_index``, offset in that document) that ``megatron.core.datasets.helpers.build_sample_idx``
returns, but with int64 counters throughout, so more than 2^31 documents and 2^32 samples work.
"""

from __future__ import annotations

import numpy as np

from megatron_osp.data import _index_builders


def build_sample_index(
    sizes,
    document_index,
    sequence_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> np.ndarray:
    sizes = np.asarray(sizes)
    document_index = np.asarray(document_index)
    if sizes.ndim != 1 or sizes.dtype != np.int32:
        raise ValueError(f"sizes must be a 1-D int32 array, got {sizes.dtype} with shape {sizes.shape}")
    if document_index.ndim != 1 or document_index.dtype not in (np.int32, np.int64):
        raise ValueError(
            f"document_index must be a 1-D int32 or int64 array, got {document_index.dtype} "
            f"with shape {document_index.shape}"
        )
    if len(document_index) == 0:
        raise ValueError("document_index is empty")
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if tokens_per_epoch < 1:
        raise ValueError(f"tokens_per_epoch must be >= 1, got {tokens_per_epoch}")
    build = (
        _index_builders.build_sample_index_i64
        if document_index.dtype == np.int64
        else _index_builders.build_sample_index_i32
    )
    return build(
        np.ascontiguousarray(sizes),
        np.ascontiguousarray(document_index),
        int(sequence_length),
        int(num_epochs),
        int(tokens_per_epoch),
        bool(drop_last_partial_sequence),
        bool(add_extra_token_to_sequence),
    )
