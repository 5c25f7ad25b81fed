"""Megatron's indexed dataset format (.bin tokens + .idx index), read and written byte-compatibly.

.idx layout (little-endian), as Megatron-Core 0.16.1 writes it:
    b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 sequence count S | u64 document count D
    | int32[S] sequence lengths | int64[S] byte pointers into .bin | int64[D] document indices
The document indices are sequence numbers where documents start, beginning with 0 and ending with S.

The writer streams tokens to temporary files and renames both at ``finalize()`` (an earlier pair of the
prefix aside first), so an interrupted run never leaves a .bin/.idx pair that looks complete, nor a new
.bin beside an old .idx. The reader validates the header and sizes on open and names the file and the
problem instead of returning garbage.
"""

from __future__ import annotations

import array
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from megatron_osp.data.replace import aside_hint, replace_dataset
from megatron_osp.data.run_owner import tag
from megatron_osp.data.shardset import check_published

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")
_INT32_MAX = 2**31 - 1
_CHECK_CHUNK = 1 << 22  # sequences per vectorized pointer check (bounded temporary memory)


def token_dtype_for(vocab_size: int):
    """The smallest dtype Megatron uses for a vocabulary: uint16 up to 65536 ids, else int32."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def check_dtype_holds(dtype, vocab_size: int, where: str) -> None:
    """Refuse a token dtype that cannot hold every id of a ``vocab_size`` vocabulary (``where``: the
    file or dataset to name)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise ValueError(f"{where}: token dtype {dtype} is not an integer type; token ids cannot be stored in it")
    if vocab_size - 1 > np.iinfo(dtype).max:
        need = np.dtype(token_dtype_for(vocab_size))
        raise ValueError(f"{where}: token dtype {dtype} holds ids up to {np.iinfo(dtype).max}, but the vocabulary "
                         f"has {vocab_size} (ids up to {vocab_size - 1}); it needs {need}")


class IndexedDatasetWriter:
    """Write documents (1-D token arrays) to ``<prefix>.bin`` / ``<prefix>.idx``, atomically."""

    def __init__(self, path_prefix: str | os.PathLike, dtype=np.uint16):
        self.prefix = str(path_prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"dtype {self.dtype} cannot be stored in an indexed dataset")
        if self.dtype.kind not in "iu":
            raise ValueError(f"{self.prefix}: token dtype {self.dtype} is not an integer type")
        self.max_token_id = -1  # the largest id written (-1: none yet); cheap, the range check finds it
        self.tokens_written = 0
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = f"{self.prefix}.bin.tmp{tag()}"
        self._tmp_idx = f"{self.prefix}.idx.tmp{tag()}"
        self._bin = open(self._tmp_bin, "wb")
        # 4 bytes per document (a list of numpy scalars costs ~10x that at a billion documents).
        self._lengths = array.array("i")
        # Document ends (in sequences), kept only once a multi-sequence document arrives (a merged
        # Megatron dataset with sentence splits); until then every sequence is one document.
        self._doc_ends: array.array | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.prefix}: writer is already finalized or aborted")

    def add_document(self, tokens) -> None:
        self._check_open()
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D token array, got shape {arr.shape}")
        if arr.size > _INT32_MAX:
            raise ValueError(f"{self.prefix}: a document of {arr.size} tokens exceeds the int32 length field")
        if arr.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"{self.prefix}: token ids {arr.min()}..{arr.max()} do not fit {self.dtype}")
            self.max_token_id = max(self.max_token_id, int(arr.max()))
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self.tokens_written += int(arr.size)
        self._lengths.append(int(arr.size))
        if self._doc_ends is not None:
            self._doc_ends.append(len(self._lengths))

    def add_documents(self, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Append many documents at once: ``tokens`` concatenated, ``lengths`` per document."""
        self._check_open()
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size and (lengths.min() < 0 or lengths.max() > _INT32_MAX):
            raise ValueError(f"{self.prefix}: document lengths must be in [0, 2^31 - 1]")
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens were given")
        tokens = np.asarray(tokens)
        if tokens.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if tokens.min() < info.min or tokens.max() > info.max:
                raise ValueError(f"{self.prefix}: token ids {tokens.min()}..{tokens.max()} do not fit {self.dtype}")
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        first = len(self._lengths)
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self.tokens_written += int(len(tokens))
        self._lengths.frombytes(lengths.astype(np.int32).tobytes())  # no Python int per document
        if self._doc_ends is not None:
            self._doc_ends.extend(range(first + 1, len(self._lengths) + 1))

    def add_dataset(self, dataset: "IndexedDataset", copy_bytes: int = 64 << 20) -> None:
        """Append a whole dataset (same dtype): its .bin is streamed, its document boundaries kept."""
        self._check_open()
        if dataset.dtype != self.dtype:
            raise ValueError(f"{dataset.prefix}: dtype {dataset.dtype} differs from the output's {self.dtype}")
        lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
        expected = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=expected[1:])
        bin_size = os.path.getsize(dataset.prefix + ".bin")
        if not np.array_equal(np.asarray(dataset.sequence_pointers), expected) or bin_size != int(lengths.sum()) * self.dtype.itemsize:
            raise ValueError(
                f"{dataset.prefix}: its sequences are not stored back to back in the .bin (pointers or "
                "size differ from the lengths), so it cannot be appended by copying the file"
            )
        first = len(self._lengths)
        with open(dataset.prefix + ".bin", "rb") as src:
            shutil.copyfileobj(src, self._bin, copy_bytes)
        self.tokens_written += int(lengths.sum())
        self._lengths.frombytes(np.asarray(dataset.sequence_lengths, dtype=np.int32).tobytes())
        docs = np.asarray(dataset.document_indices, dtype=np.int64)
        one_per_sequence = len(docs) == len(dataset) + 1 and np.array_equal(docs, np.arange(len(docs)))
        if self._doc_ends is None and not one_per_sequence:
            self._doc_ends = array.array("q", range(1, first + 1))
        if self._doc_ends is not None:
            self._doc_ends.extend((docs[1:] + first).tolist())

    def finalize(self) -> None:
        """Write the index, then move both files into place (``shardset.replace_dataset``: an earlier
        dataset of the prefix goes aside first, so no crash or kill leaves the new .bin beside its .idx;
        a failure leaves the earlier dataset, and no temporaries)."""
        self._check_open()
        try:
            self._finalize()
        except BaseException:
            self.abort()
            raise

    def _finalize(self) -> None:
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        if self._doc_ends is None:
            documents = np.arange(len(lengths) + 1, dtype=np.int64)
        else:
            documents = np.concatenate([[0], np.frombuffer(self._doc_ends, dtype=np.int64)]).astype(np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], len(lengths), len(documents)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))
        replace_dataset(self._tmp_bin, self._tmp_idx, self.prefix)
        self._closed = True

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def abort(self) -> None:
        """Drop everything written so far."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.unlink(path)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()  # aborts (removes the temporary files) if it fails
        return False


class IndexedDataset:
    """Memory-mapped reader of ``<prefix>.bin`` / ``<prefix>.idx``; item i is sequence i."""

    def __init__(self, path_prefix: str | os.PathLike, verify_pointers: bool = True):
        """Open and validate. ``verify_pointers`` checks every sequence lies inside the .bin (one
        vectorized pass over the index, ~1 s per 10^8 sequences); off, only the last one is checked."""
        self.prefix = str(path_prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        check_published(self.prefix)  # a preprocessing output is read only as its manifest lists it
        if not os.path.exists(idx_path) and os.path.exists(bin_path):
            raise FileNotFoundError(f"{idx_path} does not exist, but {bin_path} does: writing or replacing the "
                                    "dataset was cut short (or its .idx was removed); rerun what wrote it"
                                    + aside_hint(self.prefix))
        for path in (idx_path, bin_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} does not exist{aside_hint(self.prefix)}")
        idx_size = os.path.getsize(idx_path)
        if idx_size < _HEADER.size:
            raise ValueError(f"{idx_path}: truncated index ({idx_size} bytes, header needs {_HEADER.size})")
        with open(idx_path, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise ValueError(f"{idx_path}: not a Megatron indexed dataset (bad magic {magic!r})")
        if version != VERSION:
            raise ValueError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown token dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
        if idx_size != expected:
            raise ValueError(
                f"{idx_path}: size {idx_size} bytes does not match its header "
                f"({n_seq} sequences, {n_doc} document indices need {expected} bytes); truncated or corrupted"
            )
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = _HEADER.size
        self.sequence_lengths = index[off : off + 4 * n_seq].view(np.int32)
        off += 4 * n_seq
        self.sequence_pointers = index[off : off + 8 * n_seq].view(np.int64)
        off += 8 * n_seq
        self.document_indices = index[off : off + 8 * n_doc].view(np.int64)
        bin_size = os.path.getsize(bin_path)
        if verify_pointers:
            self._verify_pointers(bin_path, bin_size)
        elif n_seq:
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            if end > bin_size:
                raise ValueError(
                    f"{bin_path}: {bin_size} bytes but the index points to byte {end}; the data file "
                    "is truncated or belongs to another index"
                )
        if n_seq and verify_pointers:
            # Megatron and we write sequences back to back, so the .bin is exactly the tokens; a
            # dtype code changed to a narrower type (uint16 data read as uint8) leaves bytes over.
            need = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
            if need != bin_size:
                raise ValueError(
                    f"{bin_path}: {bin_size} bytes, but {idx_path} accounts for {need} ({self.dtype} tokens); "
                    "its dtype code does not match the data, or the files belong to different datasets")
        if n_doc and (self.document_indices[0] != 0 or self.document_indices[-1] != n_seq):
            raise ValueError(f"{idx_path}: document indices must run from 0 to {n_seq}")
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)

    def _verify_pointers(self, bin_path: str, bin_size: int) -> None:
        itemsize = self.dtype.itemsize
        for lo in range(0, len(self.sequence_lengths), _CHECK_CHUNK):
            lengths = np.asarray(self.sequence_lengths[lo : lo + _CHECK_CHUNK], dtype=np.int64)
            pointers = np.asarray(self.sequence_pointers[lo : lo + _CHECK_CHUNK])
            bad = (lengths < 0) | (pointers < 0) | (pointers % itemsize != 0) | (pointers + lengths * itemsize > bin_size)
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(
                    f"{bin_path}: sequence {lo + i} (pointer {int(pointers[i])}, {int(lengths[i])} tokens "
                    f"of {itemsize} bytes) lies outside the {bin_size}-byte data file; the data file is "
                    "truncated, corrupted, or belongs to another index"
                )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        n = int(self.sequence_lengths[idx])
        length = n - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"slice [{offset}, {offset + length}) outside sequence {idx} of length {n}")
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return self._bin[start : start + length * self.dtype.itemsize].view(self.dtype)

    def __getitem__(self, idx: int) -> np.ndarray:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {self.prefix} ({len(self)} sequences)")
        return self.get(idx)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))
