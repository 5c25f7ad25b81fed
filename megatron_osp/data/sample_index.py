"""Python face of the C++ sample-index builder (same arguments and result as Megatron-Core's).

``build_sample_index`` returns the ``[num_samples + 1, 2]`` int64 array of (position in
``document_index``, offset in that document) that ``megatron.core.datasets.helpers.build_sample_idx``
returns, but with int64 counters throughout, so more than 2^31 documents and 2^32 samples work, and
with an exact integer ceil for the sample count (Megatron's goes through a float, which rounds wrong
past ~2^24 samples when ``drop_last_partial_sequence=False``).

``build_document_and_sample_index`` builds the document index (as ``shuffles.build_document_index``)
and this sample index over it in one pass, the same arrays with half the random reads of the
sizes; ``GPTDataset`` uses it.

Inputs are checked here, before any C++ runs, so a wrong dtype is a ValueError naming the argument
instead of a silent cast (pybind11 would otherwise truncate int64 sizes to int32).
"""

from __future__ import annotations

import numbers

import numpy as np

from megatron_osp.data import _index_builders
from megatron_osp.data import shuffles
from megatron_osp.data.shuffles import default_threads

_INT32_MAX = 2**31 - 1


def _positive_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def build_sample_index(
    sizes,
    document_index,
    sequence_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
    threads: int | None = None,
) -> np.ndarray:
    """Sample boundaries over the documents concatenated in ``document_index`` order.

    Row k is where sample k starts: (position in ``document_index``, token offset in that
    document). With ``add_extra_token_to_sequence`` a sample reads one token past its end (the
    label of its last position), so consecutive samples overlap by one token.
    """
    sizes = np.asarray(sizes)
    document_index = np.asarray(document_index)
    if sizes.ndim != 1 or sizes.dtype != np.int32:
        raise ValueError(f"sizes must be a 1-D int32 array, got {sizes.dtype} with shape {sizes.shape}")
    if len(sizes) == 0:
        raise ValueError("sizes is empty")
    if sizes.min() < 0:
        raise ValueError(f"sizes must be >= 0, found {int(sizes.min())} at {int(sizes.argmin())}")
    if document_index.ndim != 1 or document_index.dtype not in (np.int32, np.int64):
        raise ValueError(
            f"document_index must be a 1-D int32 or int64 array, got {document_index.dtype} "
            f"with shape {document_index.shape}"
        )
    if len(document_index) == 0:
        raise ValueError("document_index is empty")
    sequence_length = _positive_int("sequence_length", sequence_length, 1)
    num_epochs = _positive_int("num_epochs", num_epochs, 1)
    tokens_per_epoch = _positive_int("tokens_per_epoch", tokens_per_epoch, 1)
    build = (
        _index_builders.build_sample_index_i64
        if document_index.dtype == np.int64
        else _index_builders.build_sample_index_i32
    )
    return build(
        np.ascontiguousarray(sizes),
        np.ascontiguousarray(document_index),
        sequence_length,
        num_epochs,
        tokens_per_epoch,
        bool(drop_last_partial_sequence),
        bool(add_extra_token_to_sequence),
        default_threads() if threads is None else _positive_int("threads", threads, 1),
    )


def build_document_and_sample_index(
    sizes,
    documents,
    num_epochs: int,
    seed: int,
    sequence_length: int,
    tokens_per_epoch: int,
    separate_final_epoch: bool = False,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
    threads: int | None = None,
    sample_index_dtype: str = "int64",
    timings: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(build_document_index(...), build_sample_index(...))`` in one pass, the same arrays.

    Equal, byte for byte, to ``build_document_index(documents, num_epochs, seed,
    separate_final_epoch, threads)`` followed by ``build_sample_index(sizes, that, sequence_length,
    num_epochs, tokens_per_epoch, ...)``, but each document's size is read at random once instead of
    twice and the document index right after it is written (csrc/document_samples.cpp).

    ``sample_index_dtype``: "int64" (default), or "auto" for int32 when the document index has at
    most 2^31 - 1 entries (Megatron-Core's rule in ``helpers.build_sample_idx``: every position and
    offset then fits; the values are the same, in half the memory). ``timings``, when given, gets
    the C++ stages' wall times in seconds.
    """
    sizes = np.asarray(sizes)
    if sizes.ndim != 1 or sizes.dtype != np.int32:
        raise ValueError(f"sizes must be a 1-D int32 array, got {sizes.dtype} with shape {sizes.shape}")
    if len(sizes) == 0:
        raise ValueError("sizes is empty")
    n, dtype, values, start, split_at = shuffles.document_layout(documents, num_epochs, separate_final_epoch)
    if values is not None and int(values.max()) >= len(sizes):
        raise ValueError(f"documents holds id {int(values.max())}, past the {len(sizes)} entries of sizes")
    if values is None and start + n > len(sizes):
        raise ValueError(f"documents {documents!r} reach past the {len(sizes)} entries of sizes")
    seed = shuffles._seed(seed)
    sequence_length = _positive_int("sequence_length", sequence_length, 1)
    tokens_per_epoch = _positive_int("tokens_per_epoch", tokens_per_epoch, 1)
    threads = default_threads() if threads is None else _positive_int("threads", threads, 1)
    if sample_index_dtype not in ("int64", "auto"):
        raise ValueError(f"sample_index_dtype must be 'int64' or 'auto', got {sample_index_dtype!r}")
    total = n * num_epochs
    narrow = sample_index_dtype == "auto" and total <= _INT32_MAX
    build = getattr(
        _index_builders,
        f"build_documents_and_samples_{'i64' if dtype == np.int64 else 'i32'}_{'i32' if narrow else 'i64'}",
    )
    document_index = np.empty(total, dtype=dtype)
    sample_index, stages = build(
        np.ascontiguousarray(sizes),
        document_index,
        np.empty(0, dtype=dtype) if values is None else values,
        start,
        n,
        split_at,
        seed,
        shuffles._STREAM_DOCUMENTS,
        shuffles._STREAM_DOCUMENTS_FINAL_EPOCH,
        sequence_length,
        num_epochs,
        tokens_per_epoch,
        bool(drop_last_partial_sequence),
        bool(add_extra_token_to_sequence),
        threads,
    )
    if timings is not None:
        timings.update(stages)
    return document_index, sample_index


def num_samples(
    num_epochs: int,
    tokens_per_epoch: int,
    sequence_length: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> int:
    """How many samples ``build_sample_index`` yields, without building it (exact int64 math)."""
    return _index_builders.count_samples(
        _positive_int("num_epochs", num_epochs, 1),
        _positive_int("tokens_per_epoch", tokens_per_epoch, 1),
        _positive_int("sequence_length", sequence_length, 1),
        bool(drop_last_partial_sequence),
        1 if add_extra_token_to_sequence else 0,
    )
