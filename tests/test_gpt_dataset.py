"""GPTDataset / blends over indexed files: samples against a flat-token reference, Megatron's split
and blend rules, and an index cache that notices rewritten data files."""

import mmap
import os

import numpy as np
import pytest
import torch

from megatron_osp.data import gpt_dataset as gd
from megatron_osp.data.gpt_dataset import GPTDataConfig, build_gpt_datasets, parse_split
from megatron_osp.data.indexed import IndexedDataset, IndexedDatasetWriter

SEQ = 16


def _corpus(prefix, seed, n_docs=60, vocab=500):
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), dtype=np.uint16) as w:
        for _ in range(n_docs):
            w.add_document(rng.integers(1, vocab, int(rng.integers(1, 40))).astype(np.uint16))
    return str(prefix)


def _config(paths, tmp_path, **kw):
    kw.setdefault("split", "8,1,1")
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return GPTDataConfig(paths=paths, sequence_length=SEQ, seed=7, eod_id=0, **kw)


def _flat_reference(ds):
    """Sample k is tokens [k*SEQ, k*SEQ + SEQ + 1) of the documents concatenated in document_index order."""
    raw = IndexedDataset(ds.dataset.prefix)
    flat = np.concatenate([raw[int(d)] for d in ds.document_index]).astype(np.int64)
    return flat


def test_samples_equal_the_concatenated_documents(tmp_path):
    prefix = _corpus(tmp_path / "a", 0)
    # 9 epochs' worth of train samples forces several epochs and a separately shuffled last one.
    n_train_docs = round(0.8 * 60)
    train, valid, test = build_gpt_datasets(_config([prefix], tmp_path), [300, 20, None])
    assert len(train) >= 300 and valid is not None and test is not None
    assert set(np.unique(train.document_index)) <= set(range(n_train_docs))
    flat = _flat_reference(train)
    for idx in range(len(train)):
        k = int(train.shuffle_index[idx])
        want = flat[k * SEQ : k * SEQ + SEQ + 1]
        np.testing.assert_array_equal(train.tokens_of(idx), want)
        item = train[idx]
        assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert item["tokens"].dtype == torch.long and item["loss_mask"].dtype == torch.float
        torch.testing.assert_close(item["tokens"], torch.from_numpy(want[:-1]))
        torch.testing.assert_close(item["labels"], torch.from_numpy(want[1:]))
        assert item["loss_mask"].sum() == SEQ
        torch.testing.assert_close(item["position_ids"], torch.arange(SEQ))
    assert sorted(np.asarray(train.shuffle_index).tolist()) == list(range(len(train)))


def test_partial_validation_sample_is_padded_and_masked(tmp_path):
    prefix = _corpus(tmp_path / "a", 1)
    cfg = _config([prefix], tmp_path, drop_last_partial_validation_sequence=False, split="1,1")
    _, valid, _ = build_gpt_datasets(cfg, [10, None, None])
    tokens_in_split = int(np.asarray(valid.dataset.sequence_lengths[valid.documents.start : valid.documents.stop]).sum())
    assert len(valid) == -(-(tokens_in_split - 1) // SEQ)
    last = int(np.flatnonzero(np.asarray(valid.shuffle_index) == len(valid) - 1)[0])
    item = valid[last]
    real = (tokens_in_split - 1) - (len(valid) - 1) * SEQ  # label positions with real tokens
    assert 0 < real < SEQ
    assert item["loss_mask"][:real].sum() == real and item["loss_mask"][real:].sum() == 0
    assert (item["labels"][real:] == 0).all()
    assert valid[None]["loss_mask"].sum() == 0  # a padding sample counts for nothing


def test_split_matches_megatron():
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    for s in ("969,30,1", "98,2,0", "1", "1,1", "0,1,0", "33.3,33.3,33.4"):
        assert parse_split(s) == convert_split_vector_to_split_matrix(parse_and_normalize_split(s)), s
    for bad in ("a,b", "1,-1", "0,0,0", "1,2,3,4"):
        with pytest.raises(ValueError, match="split"):
            parse_split(bad)


def test_weighted_blend_reads_megatrons_choice_of_samples(tmp_path):
    helpers_cpp = pytest.importorskip("megatron.core.datasets.helpers_cpp")
    a, b = _corpus(tmp_path / "a", 2), _corpus(tmp_path / "b", 3, n_docs=90)
    train, _, _ = build_gpt_datasets(_config([a, b], tmp_path, weights=[1.0, 3.0], split="8,2"), [200, 10, None])
    # Megatron's builder: per-dataset targets ceil(size * w), blend size = their sum.
    size = int(np.ceil(200 * 0.25)) + int(np.ceil(200 * 0.75))
    assert len(train) == size
    which = np.zeros(size, np.int16)
    within = np.zeros(size, np.int64)
    helpers_cpp.build_blending_indices(which, within, np.array([0.25, 0.75]), 2, size, False)
    np.testing.assert_array_equal(train.dataset_index, which)
    np.testing.assert_array_equal(train.dataset_sample_index, within)
    for i in (0, 1, 57, size - 1):
        d, j = int(which[i]), int(within[i])
        item = train[i]
        assert int(item["dataset_id"]) == d
        torch.testing.assert_close(item["tokens"], train.datasets[d][j]["tokens"])


def test_unweighted_blend_is_exhaustive_or_capped(tmp_path):
    a, b = _corpus(tmp_path / "a", 4), _corpus(tmp_path / "b", 5)
    _, valid, test = build_gpt_datasets(_config([a, b], tmp_path), [100, 3, None])
    assert len(valid) == 3
    assert len(test) == sum(len(d) for d in test.datasets)
    for d, part in enumerate(test.datasets):
        np.testing.assert_array_equal(test.dataset_sample_index[test.dataset_index == d], np.arange(len(part)))


def test_cache_is_reused_and_a_rewritten_file_is_not(tmp_path, monkeypatch):
    prefix = _corpus(tmp_path / "a", 6)
    cfg = _config([prefix], tmp_path)
    first, _, _ = build_gpt_datasets(cfg, [50, 5, None])
    want = first.tokens_of(3).copy()
    entries = sorted(os.listdir(tmp_path / "cache"))
    assert len(entries) == 3 and not [e for e in entries if e.startswith(".")]  # no temporaries left

    calls = []
    real = gd.build_document_and_sample_index
    monkeypatch.setattr(gd, "build_document_and_sample_index", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _, _ = build_gpt_datasets(cfg, [50, 5, None])
    assert calls == []  # loaded, not rebuilt
    base = again.sample_index  # memory-mapped from the entry's file, not read into memory
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else base.base
    assert isinstance(base, mmap.mmap) and not again.sample_index.flags.writeable
    np.testing.assert_array_equal(again.tokens_of(3), want)

    # Rewrite the corpus under the same prefix (other tokens and lengths): new key, fresh indices.
    _corpus(tmp_path / "a", 7)
    fresh, _, _ = build_gpt_datasets(cfg, [50, 5, None])
    assert len(calls) == 3
    assert fresh.cache_key != first.cache_key
    flat = _flat_reference(fresh)
    k = int(fresh.shuffle_index[3])
    np.testing.assert_array_equal(fresh.tokens_of(3), flat[k * SEQ : k * SEQ + SEQ + 1])

    # Same bytes, new modification time: still a new key (a size match alone proves nothing).
    st = os.stat(prefix + ".bin")
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched, _, _ = build_gpt_datasets(cfg, [50, 5, None])
    assert touched.cache_key["bin"]["mtime_ns"] != fresh.cache_key["bin"]["mtime_ns"]
    assert len(calls) == 6


def test_stale_entry_under_the_same_name_is_refused(tmp_path):
    from megatron_osp.data import index_cache

    key = {"x": 1}
    index_cache.cached_arrays(tmp_path, "t", key, lambda: {"a": np.arange(3)})
    entry = index_cache.entry_path(tmp_path, "t", key)
    entry.unlink()  # _save keeps an entry that is there (test_a_published_entry_is_never_replaced)
    index_cache._save(entry, {"x": 2}, {"a": np.arange(3)})  # another key's entry under this name
    with pytest.raises(ValueError, match="another key"):
        index_cache.cached_arrays(tmp_path, "t", key, lambda: {"a": np.arange(3)})
    # a damaged entry (cut short, or not an entry) is named, never read as indices
    entry.unlink()
    index_cache._save(entry, key, {"a": np.arange(3), "b": np.arange(100)})
    with open(entry, "r+b") as f:
        f.truncate(entry.stat().st_size - 100)
    with pytest.raises(ValueError, match=rf"{entry}: shorter than its header says .* damaged; remove it"):
        index_cache.cached_arrays(tmp_path, "t", key, lambda: {"a": np.arange(3)})
    entry.write_bytes(b"junk")
    with pytest.raises(ValueError, match=rf"{entry}: not an index cache entry of format 2"):
        index_cache.cached_arrays(tmp_path, "t", key, lambda: {"a": np.arange(3)})


def test_a_published_entry_is_never_replaced(tmp_path):
    """Two nodes' builders of one entry at once: the second finds it there and leaves the first's file
    (same inode), which the first node's ranks may have memory-mapped: replaced, it goes stale for them
    on NFS. Nothing of the second's write is left behind."""
    from megatron_osp.data import index_cache

    key = {"x": 1}
    entry = index_cache.entry_path(tmp_path, "t", key)
    index_cache._save(entry, key, {"a": np.arange(3)})
    first = index_cache._load(entry, key)
    inode = entry.stat().st_ino
    index_cache._save(entry, key, {"a": np.arange(3)})  # the other node's, a moment later
    assert entry.stat().st_ino == inode and [p.name for p in tmp_path.iterdir()] == [entry.name]
    np.testing.assert_array_equal(first["a"], np.arange(3))


def test_an_entry_is_one_file_read_back_alike(tmp_path):
    """Arrays of any dtype and shape (2-D, empty, last) come back equal, read-only, from one file."""
    from megatron_osp.data import index_cache

    arrays = {"i32": np.arange(5, dtype=np.int32), "pairs": np.arange(12).reshape(6, 2), "none": np.zeros((0, 2)),
              "f": np.array([1.5, -2.0]), "last": np.zeros(0, np.uint16)}
    index_cache.cached_arrays(tmp_path, "t", {"k": 1}, lambda: arrays)
    assert [p.name for p in tmp_path.iterdir()] == [index_cache.entry_path(tmp_path, "t", {"k": 1}).name]
    back = index_cache.cached_arrays(tmp_path, "t", {"k": 1}, lambda: pytest.fail("built again"))
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape and not back[name].flags.writeable
        np.testing.assert_array_equal(back[name], a)


def test_bad_inputs_name_the_problem(tmp_path):
    prefix = _corpus(tmp_path / "a", 8, n_docs=3)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        build_gpt_datasets(_config([str(tmp_path / "nope")], tmp_path), [1, 1, None])
    with pytest.raises(ValueError, match="weights"):
        _config([prefix], tmp_path, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="valid split"):
        build_gpt_datasets(_config([prefix], tmp_path, split="2,1"), [1, 1, None])


def _two_rank_build(rank, world_size, prefix, cache):
    from megatron_osp.data import gpt_dataset

    if rank == 1:  # only local rank 0 may build; the other rank must load what it wrote
        def refuse(*a, **k):
            raise AssertionError("rank 1 built an index")

        gpt_dataset.build_document_index = refuse
    cfg = GPTDataConfig(paths=[prefix], sequence_length=SEQ, seed=7, eod_id=0, cache_dir=cache, split="8,1,1")
    train, _, _ = build_gpt_datasets(cfg, [40, 4, None])
    return np.asarray(train.shuffle_index).copy(), train.tokens_of(5).copy()


def test_local_rank_zero_builds_and_the_other_rank_loads(tmp_path):
    from megatron_osp.testing.distributed import run_distributed

    prefix = _corpus(tmp_path / "a", 9)
    out = run_distributed(_two_rank_build, 2, prefix, str(tmp_path / "cache"))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_getitem_equals_megatrons_on_the_same_indices(tmp_path):
    # Megatron-Core's GPTDataset.__getitem__ run on our three indices (its constructor would build
    # its own numpy-shuffled ones) must give the same dict, padded final sample included.
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed

    class _Tok:
        vocab_size, eod, unique_identifiers = 500, 0, {"class": "test"}

    prefix = _corpus(tmp_path / "a", 10)
    cfg = _config([prefix], tmp_path, drop_last_partial_validation_sequence=False, split="1,1")
    train, valid, _ = build_gpt_datasets(cfg, [120, None, None])
    mcfg = GPTDatasetConfig(
        random_seed=7, sequence_length=SEQ, blend=([prefix], None), split="1,1", tokenizer=_Tok(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )
    assert min(float(valid[i]["loss_mask"].sum()) for i in range(len(valid))) < SEQ  # a padded sample
    for ours in (train, valid):
        theirs = object.__new__(MegatronGPTDataset)
        theirs.dataset, theirs.config, theirs._pad_token_id = MegatronIndexed(prefix), mcfg, -1
        theirs.masks_and_position_ids_are_cacheable, theirs.masks_and_position_ids_are_cached = True, False
        theirs.document_index, theirs.sample_index = ours.document_index, ours.sample_index
        theirs.shuffle_index = ours.shuffle_index
        for idx in list(range(len(ours))) + [None]:
            a, b = ours[idx], theirs[idx]
            assert set(a) == set(b)
            for k in a:
                assert a[k].dtype == b[k].dtype, k
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_short_final_epoch_is_shuffled_apart(tmp_path):
    prefix = _corpus(tmp_path / "a", 12)
    raw = IndexedDataset(prefix)
    docs = range(0, round(0.8 * len(raw)))
    tokens = int(np.asarray(raw.sequence_lengths[docs.start : docs.stop]).sum())
    per_epoch = (tokens - 1) // SEQ
    train, _, _ = build_gpt_datasets(_config([prefix], tmp_path), [per_epoch + 2, 1, None])
    n_docs = len(docs)
    doc_index = np.asarray(train.document_index)
    assert len(doc_index) == 2 * n_docs  # two epochs, the second one short (2 samples of it)
    np.testing.assert_array_equal(np.sort(doc_index[n_docs:]), np.arange(n_docs))  # whole, apart
    before = (tokens - 1) // SEQ  # samples that end inside the first epoch
    shuffle = np.asarray(train.shuffle_index)
    np.testing.assert_array_equal(np.sort(shuffle[:before]), np.arange(before))
    np.testing.assert_array_equal(np.sort(shuffle[before:]), np.arange(before, len(train)))
    flat = _flat_reference(train)
    for idx in (0, len(train) - 1):
        k = int(shuffle[idx])
        np.testing.assert_array_equal(train.tokens_of(idx), flat[k * SEQ : k * SEQ + SEQ + 1])


def test_skipped_split_is_not_built(tmp_path):
    # "969,30,1" of 300 documents leaves the test split empty: fine when the caller skips it.
    a, b = _corpus(tmp_path / "a", 13, n_docs=300), _corpus(tmp_path / "b", 14, n_docs=300)
    cfg = _config([a, b], tmp_path, weights=[1.0, 2.0], split="969,30,1")
    with pytest.raises(ValueError, match="test split"):
        build_gpt_datasets(cfg, [40, 4, None])
    train, valid, test = build_gpt_datasets(cfg, [40, 4, None], skip=("test",))
    assert test is None and len(train) >= 40 and len(valid) >= 4
    with pytest.raises(ValueError, match="skip"):
        build_gpt_datasets(cfg, [40, 4, None], skip=("tset",))


def test_token_ids_are_checked_against_the_vocabulary_when_the_dataset_opens(tmp_path, monkeypatch):
    """Issue #14 case 3: ids >= the vocabulary used to fail inside torch.embedding after start-up,
    naming no file. The check is chunked (bounded memory), names file, sequence and token, and its
    result is cached under the files' fingerprints in the index cache (one scan per corpus version)."""
    from megatron_osp.data import token_range
    from megatron_osp.data.token_range import TokenRangeError

    prefix = _corpus(tmp_path / "a", 9, vocab=500)
    raw = IndexedDataset(prefix)
    flat = np.concatenate([raw[i] for i in range(len(raw))])
    first = int(np.flatnonzero(flat >= 300)[0])
    starts = np.concatenate([[0], np.cumsum(raw.sequence_lengths)])
    seq = int(np.searchsorted(starts, first, side="right")) - 1
    scans = []
    real_scan = token_range.scan_token_range
    monkeypatch.setattr(token_range, "scan_token_range", lambda ds: scans.append(ds.prefix) or real_scan(ds))
    monkeypatch.setattr(token_range, "CHUNK_TOKENS", 7)  # many chunks: the chunked min/max must agree

    config = _config([prefix], tmp_path, vocab_size=300, vocab_name="model.vocab_size=300")
    with pytest.raises(TokenRangeError) as e:
        build_gpt_datasets(config, [50, 5, None])
    message = str(e.value)
    assert message.startswith(f"{prefix}.bin: token ids reach {int(flat.max())}, outside model.vocab_size=300")
    assert f"first: id {int(flat[first])} in sequence {seq}, token {first - int(starts[seq])}" in message

    # ids up to the largest stored one fit: the datasets open; the range came from the cache.
    train, _, _ = build_gpt_datasets(_config([prefix], tmp_path, vocab_size=int(flat.max()) + 1), [50, 5, None])
    assert len(train) >= 50 and scans == [prefix]
    # The dtype must hold every id of the vocabulary (uint16 cannot hold 70000 ids).
    with pytest.raises(TokenRangeError, match=rf"{prefix}\.idx: token dtype uint16 holds ids up to 65535"):
        build_gpt_datasets(_config([prefix], tmp_path, vocab_size=70000), [50, 5, None])
    # A rewritten file is scanned again (new fingerprint); without a cache dir, once per open.
    _corpus(tmp_path / "a", 10, vocab=200)
    build_gpt_datasets(_config([prefix], tmp_path, vocab_size=200), [50, 5, None])
    build_gpt_datasets(_config([prefix], tmp_path, vocab_size=200, cache_dir=None), [50, 5, None])
    assert scans == [prefix] * 3


@pytest.mark.parametrize("split,n_docs", [("8,1,1", 60), ("949,50,1", 57), ("98,2", 45), ("1,1", 7)])
def test_evaluation_reads_exactly_the_validation_documents(tmp_path, split, n_docs):
    """tools/evaluate_quantization.py takes a run's validation fractions (parse_split) as its held-out
    documents: its windows must be the validation documents' tokens, neither a document more nor one
    less, however the fractions round (one rule: gpt_dataset.split_documents)."""
    from megatron_osp.analysis.evaluation import check_window_count, load_token_windows

    prefix = _corpus(tmp_path / "a", 3, n_docs=n_docs)
    _, valid, _ = build_gpt_datasets(_config([prefix], tmp_path, split=split), [10, 1, None], skip=("test",))
    fractions = parse_split(split)[1]
    raw = IndexedDataset(prefix)
    want = np.concatenate([raw[d] for d in valid.documents]).astype(np.int64)
    n = len(want) // (SEQ + 1)
    windows = load_token_windows(prefix, SEQ, None, documents=fractions)
    np.testing.assert_array_equal(windows.numpy().ravel(), want[: n * (SEQ + 1)])
    check_window_count(prefix, SEQ, n, fractions, "--num-windows")
    with pytest.raises(ValueError, match=f"hold only {n} windows"):
        check_window_count(prefix, SEQ, n + 1, fractions, "--num-windows")
