"""Our .bin/.idx reader and writer against Megatron-Core's, and refusal of damaged files."""

import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter

# Megatron's builder converts torch tensors with numpy.array(copy=False): a numpy-2 deprecation.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _docs(seed=0, n=50, vocab=60000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_we_read_megatron_and_megatron_reads_us(tmp_path, dtype):
    docs = _docs()
    theirs = str(tmp_path / "theirs")
    builder = IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for d in docs:
        builder.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    builder.finalize(theirs + ".idx")
    ours = str(tmp_path / "ours")
    with IndexedDatasetWriter(ours, dtype) as w:
        for d in docs:
            w.add_document(d)
    # Byte-identical files, so each side reads the other's.
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(theirs + ext, "rb").read()
    mine, meg = IndexedDataset(theirs), MegatronIndexed(ours)
    assert len(mine) == len(meg) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(mine[i], d)
        np.testing.assert_array_equal(meg[i], d)
    np.testing.assert_array_equal(mine.document_indices, meg.document_indices)
    i = next(i for i, d in enumerate(docs) if len(d) >= 3)
    np.testing.assert_array_equal(mine.get(i, 1, 2), docs[i][1:3])


def test_bulk_add_matches_per_document(tmp_path):
    docs = _docs(1)
    with IndexedDatasetWriter(tmp_path / "a", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    with IndexedDatasetWriter(tmp_path / "b", np.uint16) as w:
        w.add_documents([len(d) for d in docs], np.concatenate(docs))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def _write(prefix, docs=None):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs or _docs(2, vocab=1000):
            w.add_document(d)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: open(p + ".idx", "r+b").write(b"NOTMAGIC!"), "bad magic"),
        (lambda p: _patch(p + ".idx", 9, (7).to_bytes(8, "little")), "version 7"),
        (lambda p: _patch(p + ".idx", 17, bytes([42])), "dtype code 42"),
        (lambda p: os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8), "truncated or corrupted"),
        (lambda p: os.truncate(p + ".idx", 10), "truncated index"),
        (lambda p: os.truncate(p + ".bin", os.path.getsize(p + ".bin") - 2), "truncated"),
    ],
)
def test_damaged_files_are_refused_with_the_file_named(tmp_path, damage, message):
    prefix = str(tmp_path / "data")
    _write(prefix)
    damage(prefix)
    with pytest.raises(ValueError, match=message) as info:
        IndexedDataset(prefix)
    assert "data.idx" in str(info.value) or "data.bin" in str(info.value)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_failed_write_leaves_no_files(tmp_path):
    prefix = tmp_path / "partial"
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document(np.arange(10))
            raise RuntimeError("tokenizer crashed")
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_tokens_are_refused(tmp_path):
    with pytest.raises(ValueError, match="do not fit"):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document(np.array([1, 70000]))
    assert list(tmp_path.iterdir()) == []


def test_a_corrupted_pointer_in_the_middle_is_refused(tmp_path):
    prefix = str(tmp_path / "data")
    docs = _docs(3, vocab=1000)
    _write(prefix, docs)
    n = len(docs)
    pointer_5 = 34 + 4 * n + 8 * 5  # header, int32 lengths, then the int64 pointer of sequence 5
    _patch(prefix + ".idx", pointer_5, (10**9).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="data.bin: sequence 5 .* lies outside"):
        IndexedDataset(prefix)


def test_finalize_failure_leaves_no_files_and_writer_is_single_use(tmp_path, monkeypatch):
    prefix = tmp_path / "x"
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_document(np.arange(5))
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        w.finalize()
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # no temporaries, and no .bin without its .idx
    with pytest.raises(RuntimeError, match="already finalized"):
        w.add_document(np.arange(3))


def test_empty_sequences_round_trip_through_megatron(tmp_path):
    docs = [np.array([], dtype=np.int64), np.arange(4), np.array([], dtype=np.int64), np.arange(2)]
    prefix = str(tmp_path / "e")
    _write(prefix, docs)
    meg, mine = MegatronIndexed(prefix), IndexedDataset(prefix)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(meg[i], d)
        np.testing.assert_array_equal(mine[i], d)
