"""Our C++ sample index against Megatron-Core's helpers_cpp, and its int64 path."""

import numpy as np
import pytest

from megatron_osp.data.sample_index import build_sample_index

helpers_cpp = pytest.importorskip("megatron.core.datasets.helpers_cpp")


def _megatron(sizes, doc_index, seq, epochs, tpe, drop_last, extra):
    fn = helpers_cpp.build_sample_idx_int64
    return np.asarray(fn(sizes, doc_index.astype(np.int32), seq, epochs, tpe, drop_last, int(extra)), dtype=np.int64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("extra", [True, False])
def test_matches_megatron_on_random_documents(seed, drop_last, extra):
    rng = np.random.default_rng(seed)
    n_docs = int(rng.integers(1, 300))
    sizes = rng.integers(1, 200, n_docs).astype(np.int32)
    epochs = int(rng.integers(1, 4))
    doc_index = np.concatenate([rng.permutation(n_docs) for _ in range(epochs)]).astype(np.int32)
    tpe = int(sizes.sum())
    for seq in (1 + int(rng.integers(1, 8)), 64, 257):
        want = _megatron(sizes, doc_index, seq, epochs, tpe, drop_last, extra)
        got = build_sample_index(sizes, doc_index, seq, epochs, tpe, drop_last, extra)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
        got64 = build_sample_index(sizes, doc_index.astype(np.int64), seq, epochs, tpe, drop_last, extra)
        np.testing.assert_array_equal(got64, want)


@pytest.mark.parametrize("seed", range(6))
def test_zero_length_documents_match_megatron_and_give_full_samples(seed):
    """Documents of length 0 (a --json-keys field empty in one record is written so, to keep the
    keys' datasets aligned): the same index as Megatron-Core's, and every sample but a kept short
    last one is seq + 1 tokens of the concatenated documents, in document-index order."""
    rng = np.random.default_rng(100 + seed)
    n_docs = int(rng.integers(1, 60))
    sizes = rng.integers(1, 20, n_docs).astype(np.int32)
    sizes[rng.random(n_docs) < 0.4] = 0
    sizes[int(rng.integers(n_docs))] = 7
    epochs = int(rng.integers(1, 3))
    doc_index = np.concatenate([rng.permutation(n_docs) for _ in range(epochs)]).astype(np.int32)
    stream_start = np.concatenate([[0], np.cumsum(sizes[doc_index], dtype=np.int64)])
    for seq in (2, 5, 17):
        for drop_last in (True, False):
            want = _megatron(sizes, doc_index, seq, epochs, int(sizes.sum()), drop_last, True)
            got = build_sample_index(sizes, doc_index, seq, epochs, int(sizes.sum()), drop_last, True)
            np.testing.assert_array_equal(got, want)
            for k in range(len(got) - 1 - (not drop_last)):
                (p0, o0), (p1, o1) = got[k], got[k + 1]
                first, last = stream_start[p0] + o0, stream_start[p1] + o1
                assert last - first == seq, (seq, k, got[k], got[k + 1])
                assert first == k * seq


def _reference(sizes, doc_index, seq, n_samples, extra):
    """Pure-Python walk in arbitrary-precision integers."""
    out, pos, start = [(0, 0)], 0, 0
    for k in range(1, n_samples + 1):
        need = k * seq + extra
        while start + int(sizes[doc_index[pos]]) < need and pos < len(doc_index) - 1:
            start += int(sizes[doc_index[pos]])
            pos += 1
        if start + int(sizes[doc_index[pos]]) < need:
            out.append((pos, int(sizes[doc_index[pos]]) - extra))
        else:
            out.append((pos, need - extra - start))
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
@pytest.mark.parametrize("drop_last", [True, False])
def test_int64_path_beyond_int32_token_counts(index_dtype, drop_last):
    # 6 documents of ~2^31 tokens: flat positions reach 1.3e10, far past int32 (and Megatron's
    # int32 offsets); a large sequence length keeps the sample count small enough for a test.
    # The int32 document_index path must do its arithmetic in int64 too.
    sizes = np.full(3, 2**31 - 1, dtype=np.int32)
    doc_index = np.array([0, 1, 2, 2, 1, 0], dtype=index_dtype)
    seq = 2**30 + 12345
    tpe = int(sizes.sum())
    got = build_sample_index(sizes, doc_index, seq, 2, tpe, drop_last, True)
    n = (2 * tpe - 1) // seq if drop_last else -(-(2 * tpe - 1) // seq)
    want = _reference(sizes, doc_index, seq, n, 1)
    assert len(got) == len(want) > 10
    np.testing.assert_array_equal(got, want)
    assert got[:, 1].max() > 2**30  # offsets are real int64 values, not wrapped


def test_sample_count_arithmetic_is_exact_past_float_precision():
    from megatron_osp.data import _index_builders

    # 1T tokens, seq 4096: Megatron's float-based ceil is off by far more than one sample here.
    tokens = 10**12 + 7
    assert _index_builders.count_samples(1, tokens, 4096, True, 1) == (tokens - 1) // 4096
    assert _index_builders.count_samples(1, tokens, 4096, False, 1) == -(-(tokens - 1) // 4096)
    assert _index_builders.count_samples(3, 2**40, 4096, True, 1) == (3 * 2**40 - 1) // 4096


def test_bad_arguments_name_the_parameter():
    sizes = np.array([5, 5], dtype=np.int32)
    with pytest.raises(ValueError, match="sizes"):
        build_sample_index(sizes.astype(np.int64), np.array([0, 1]), 4, 1, 10)
    with pytest.raises(ValueError, match="document_index"):
        build_sample_index(sizes, np.array([0.0, 1.0]), 4, 1, 10)
    with pytest.raises(ValueError, match="sequence_length"):
        build_sample_index(sizes, np.array([0, 1], dtype=np.int32), 0, 1, 10)
    with pytest.raises(ValueError, match="num_epochs"):
        build_sample_index(sizes, np.array([0, 1], dtype=np.int32), 4, 0, 10)
    with pytest.raises(ValueError, match="tokens_per_epoch"):
        build_sample_index(sizes, np.array([0, 1], dtype=np.int32), 4, 1, 2.5)
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        build_sample_index(np.array([5, -1], dtype=np.int32), np.array([0, 1], dtype=np.int32), 4, 1, 10)
    with pytest.raises(ValueError, match=r"document_index\[1\] = 7"):
        build_sample_index(sizes, np.array([0, 7], dtype=np.int32), 4, 1, 10)
    # More tokens claimed than the documents hold: refused instead of repeating the last boundary.
    with pytest.raises(ValueError, match="runs out of tokens"):
        build_sample_index(sizes, np.array([0, 1], dtype=np.int64), 2, 3, 10)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("extra", [True, False])
def test_empty_documents_match_megatron(drop_last, extra):
    # Zero-length sequences are legal in .idx files; boundaries must skip them the same way.
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 6, 200).astype(np.int32)
    sizes[:3] = 0
    doc_index = rng.permutation(200).astype(np.int32)
    tpe = int(sizes.sum())
    for seq in (2, 3, 16):
        want = _megatron(sizes, doc_index, seq, 1, tpe, drop_last, extra)
        np.testing.assert_array_equal(build_sample_index(sizes, doc_index, seq, 1, tpe, drop_last, extra), want)


def test_extension_exposes_megatrons_name_for_both_index_dtypes():
    from megatron_osp.data import _index_builders

    sizes = np.array([7, 3, 9], dtype=np.int32)
    doc_index = np.array([2, 0, 1, 1, 0, 2], dtype=np.int32)
    want = _megatron(sizes, doc_index, 4, 2, 19, False, True)
    for dt in (np.int32, np.int64):
        got = _index_builders.build_sample_idx(sizes, doc_index.astype(dt), 4, 2, 19, False, True)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


def test_num_samples_matches_index_length():
    from megatron_osp.data.sample_index import num_samples

    sizes = np.array([7, 3, 9], dtype=np.int32)
    doc_index = np.array([0, 1, 2], dtype=np.int64)
    for drop_last in (True, False):
        for extra in (True, False):
            idx = build_sample_index(sizes, doc_index, 4, 1, 19, drop_last, extra)
            assert num_samples(1, 19, 4, drop_last, extra) == len(idx) - 1


# ----------------------------------------------------------------------------- parallel, int64
@pytest.fixture(scope="module")
def three_chunks():
    # Several 2^20-position chunks (zero-length documents included), so the chunked parallel
    # passes really split the work; threads=1 takes the one-pass serial walk.
    rng = np.random.default_rng(11)
    n = 3 * 2**20 + 12345
    sizes = rng.integers(0, 9, n).astype(np.int32)
    return sizes, rng.permutation(n).astype(np.int32)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("extra", [True, False])
def test_threads_do_not_change_the_sample_index(three_chunks, drop_last, extra):
    sizes, doc_index = three_chunks
    tpe = int(sizes.sum())
    want = _megatron(sizes, doc_index, 37, 1, tpe, drop_last, extra)
    for threads in (1, 4):
        got = build_sample_index(sizes, doc_index, 37, 1, tpe, drop_last, extra, threads=threads)
        np.testing.assert_array_equal(got, want)


def test_threads_do_not_change_the_errors(three_chunks):
    sizes, doc_index = three_chunks
    bad = doc_index.copy()
    bad[-5] = len(sizes) + 3  # in the last chunk, past every sample boundary with drop_last
    tpe = int(sizes.sum())
    for threads in (1, 4):
        with pytest.raises(ValueError, match=rf"document_index\[{len(bad) - 5}\]"):
            build_sample_index(sizes, bad, 37, 1, tpe, True, True, threads=threads)
        with pytest.raises(ValueError, match="runs out of tokens"):
            build_sample_index(sizes, doc_index, 37, 1, tpe + 100, True, True, threads=threads)
    # No sample at all: every id is still checked.
    for threads in (1, 4):
        with pytest.raises(ValueError, match=r"document_index\[0\]"):
            build_sample_index(np.array([3], np.int32), np.array([5], np.int32), 8, 1, 3, True, True, threads=threads)


def _sparse_sizes(path, base: int, tail: np.ndarray) -> np.memmap:
    """An int32 sizes file of base + len(tail) entries, sparse: zeros (never written) then ``tail``."""
    with open(path, "wb") as f:
        f.truncate((base + len(tail)) * 4)
    sizes = np.memmap(path, dtype=np.int32, mode="r+", shape=(base + len(tail),))
    sizes[base:] = tail
    return sizes


def test_document_ids_past_int32_index_a_sparse_sizes_file(tmp_path):
    # sizes holds 2^31 + 64 entries (8 GiB) as a sparse file: only the last 64 are ever written or
    # read, so the test fits in memory while every document id is > 2^31 and the C++ must index
    # sizes with 64-bit arithmetic (an int32 index would wrap negative and read garbage or crash).
    from megatron_osp.data import _index_builders
    from megatron_osp.data.shuffles import build_document_index

    base = 2**31 + 5
    backing = np.random.default_rng(3).integers(1, 50, 64).astype(np.int32)
    sizes = _sparse_sizes(tmp_path / "sizes.i32", base, backing)
    doc_index = build_document_index(range(base, base + 64), 8, seed=5)
    assert doc_index.dtype == np.int64 and doc_index.min() >= base > 2**31
    np.testing.assert_array_equal(np.sort(doc_index), np.repeat(np.arange(base, base + 64), 8))
    tpe = int(backing.sum())
    for drop_last in (True, False):
        # The C++ entry point directly: the Python face scans all of sizes for negatives.
        got = _index_builders.build_sample_index_i64(sizes, doc_index, 16, 8, tpe, drop_last, True, 2)
        compact = doc_index - base
        n = (8 * tpe - 1) // 16 if drop_last else -(-(8 * tpe - 1) // 16)
        np.testing.assert_array_equal(got, _reference(backing, compact, 16, n, 1))
    with pytest.raises(ValueError, match=r"document_index\[0\] = 2147483717"):
        _index_builders.build_sample_index_i64(sizes, np.array([base + 64], dtype=np.int64), 4, 1, 8, True, True, 1)


# ----------------------------------------------------------------------------- shuffles
from megatron_osp.data.shuffles import build_document_index, build_shuffle_index  # noqa: E402


@pytest.mark.parametrize("n, epochs", [(1, 3), (1000, 1), (700_001, 2)])
def test_document_index_is_deterministic_and_thread_independent(n, epochs):
    # 700_001 x 2 spans several counting chunks and ~11 buckets of the scatter shuffle.
    one = build_document_index(range(n), epochs, seed=42, threads=1)
    four = build_document_index(range(n), epochs, seed=42, threads=4)
    again = build_document_index(range(n), epochs, seed=42, threads=2)
    np.testing.assert_array_equal(one, four)
    np.testing.assert_array_equal(one, again)
    np.testing.assert_array_equal(np.sort(one), np.repeat(np.arange(n), epochs))
    if n > 1:
        assert not np.array_equal(one, build_document_index(range(n), epochs, seed=43, threads=1))
    arr = build_document_index(np.arange(n, dtype=np.int64), epochs, seed=42, threads=3)
    np.testing.assert_array_equal(arr, one)  # same values whether given as a range or an array


def test_separate_final_epoch_keeps_the_last_epoch_whole():
    docs = np.arange(10, 510, dtype=np.int32)
    idx = build_document_index(docs, 3, seed=1, separate_final_epoch=True, threads=2)
    np.testing.assert_array_equal(np.sort(idx[:1000]), np.repeat(docs, 2))
    np.testing.assert_array_equal(np.sort(idx[1000:]), docs)
    assert not np.array_equal(idx[1000:], docs)


def test_shuffle_index_layout_dtype_and_threads():
    a, total = 300_000, 420_000
    one = build_shuffle_index(a, total, seed=9, threads=1)
    np.testing.assert_array_equal(one, build_shuffle_index(a, total, seed=9, threads=4))
    assert one.dtype == np.uint32
    np.testing.assert_array_equal(np.sort(one[:a]), np.arange(a))
    np.testing.assert_array_equal(np.sort(one[a:]), np.arange(a, total))
    assert build_shuffle_index(0, 0, seed=1).shape == (0,)


def test_shuffle_is_uniform():
    from scipy.stats import chisquare

    # All 24 orders of 4 items, equally often over many seeds (single bucket: Fisher-Yates).
    counts = {}
    for s in range(6000):
        key = tuple(build_shuffle_index(4, 4, seed=s, threads=1))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 24
    assert chisquare(list(counts.values())).pvalue > 1e-4
    # Many buckets: where inputs land (input tenth x output tenth) shows no structure.
    n = 2**17 * 6 + 17
    perm = build_shuffle_index(n, n, seed=3, threads=2).astype(np.int64)
    table = np.zeros((10, 10))
    np.add.at(table, (perm * 10 // n, np.arange(n) * 10 // n), 1)
    assert chisquare(table.ravel()).pvalue > 1e-4


def test_shuffle_arguments_are_checked():
    with pytest.raises(ValueError, match="num_epochs"):
        build_document_index(range(5), 0, seed=1)
    with pytest.raises(ValueError, match="documents"):
        build_document_index(range(0), 1, seed=1)
    with pytest.raises(ValueError, match="documents"):
        build_document_index(np.array([1.0, 2.0]), 1, seed=1)
    with pytest.raises(ValueError, match="seed"):
        build_document_index(range(5), 1, seed=-1)
    with pytest.raises(ValueError, match="threads"):
        build_shuffle_index(5, 5, seed=1, threads=0)
    with pytest.raises(ValueError, match="num_samples"):
        build_shuffle_index(6, 5, seed=1)


# ----------------------------------------------------------------------------- fused build
import hashlib  # noqa: E402

from megatron_osp.data.sample_index import build_document_and_sample_index  # noqa: E402


def _separately(sizes, docs, epochs, seed, seq, tpe, sep, drop_last, extra):
    d = build_document_index(docs, epochs, seed, sep, threads=2)
    return d, build_sample_index(sizes, d, seq, epochs, tpe, drop_last, extra, threads=2)


def _random_case(rng, big):
    n_sizes = int(rng.integers(300_000, 900_000)) if big else int(rng.integers(1, 3000))
    sizes = rng.integers(0 if rng.integers(2) else 1, int(rng.integers(2, 3000)), n_sizes).astype(np.int32)
    lo = int(rng.integers(0, n_sizes))
    hi = int(rng.integers(lo + 1, n_sizes + 1))
    docs = range(lo, hi) if rng.integers(2) else np.sort(rng.choice(n_sizes, hi - lo, replace=False))
    ids = np.arange(lo, hi) if isinstance(docs, range) else docs
    return sizes, docs, int(sizes[ids].sum(dtype=np.int64))


@pytest.mark.parametrize("case", range(24))
def test_fused_build_equals_the_separate_builders(case):
    # Ranges with an offset and id arrays, 1-3 epochs, a separate final epoch, zero-length
    # documents, both boundary rules; "big" cases span several buckets and counting chunks.
    rng = np.random.default_rng(1000 + case)
    sizes, docs, tpe = _random_case(rng, big=case % 4 == 0)
    epochs, sep = int(rng.integers(1, 4)), bool(rng.integers(2))
    seq, drop_last, extra = int(rng.integers(1, 5000)), bool(rng.integers(2)), bool(rng.integers(2))
    if epochs * tpe - int(extra) < 1:
        pytest.skip("no tokens in this draw")
    want_docs, want_samples = _separately(sizes, docs, epochs, case, seq, tpe, sep, drop_last, extra)
    for threads in (1, 2, 5):
        for dtype in ("int64", "auto"):
            timings = {}
            d, s = build_document_and_sample_index(
                sizes, docs, epochs, case, seq, tpe, sep, drop_last, extra, threads, dtype, timings
            )
            assert d.dtype == want_docs.dtype and s.dtype == (np.int64 if dtype == "int64" else np.int32)
            np.testing.assert_array_equal(d, want_docs)
            np.testing.assert_array_equal(s, want_samples)
            assert set(timings) >= {"plan_s", "scatter_s", "shuffle_walk_s"}


def test_fused_build_matches_megatron_on_a_given_permutation():
    # Megatron-Core's sample index over the document index the fused build chose.
    rng = np.random.default_rng(5)
    sizes = rng.integers(0, 40, 3 * 2**17 + 99).astype(np.int32)  # 4 buckets, empty documents
    tpe = int(sizes.sum())
    for drop_last in (True, False):
        d, s = build_document_and_sample_index(sizes, range(len(sizes)), 2, 3, 129, tpe, True, drop_last, True)
        np.testing.assert_array_equal(s, _megatron(sizes, d, 129, 2, tpe, drop_last, True))


def _digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def test_indices_are_byte_identical_to_the_previous_builders():
    # Digests of (document index, sample index) and of a shuffle index computed by the builders
    # of commit f908b90 (before the fused build and the shared scatter.h), for the same seed: any
    # change of order, boundary or dtype fails here.
    rng = np.random.default_rng(123)
    sizes = rng.integers(0, 3000, 400_000).astype(np.int32)
    docs_b = np.sort(rng.choice(400_000, 250_000, replace=False))
    pins = {
        "A": (range(5, 300_005), 3, True, 1000, False, True,
              "cc93a4744d6a622e7131e95858768e91", "f415965fdb4280147622b63f5fc20f43"),
        "B": (docs_b, 1, False, 4096, True, True,
              "d265c1d68db7003a4ae33d7fd9c5c357", "1c766a0e8a7223c4d3a4c113033652fd"),
        "C": (range(0, 400_000), 2, False, 333, True, False,
              "161d0de1412150aa6c807358608a9fa1", "ce9bdf0646246d3de1ff10e26a82220e"),
    }
    for name, (docs, epochs, sep, seq, drop_last, extra, indices, shuffle) in pins.items():
        ids = np.arange(docs.start, docs.stop) if isinstance(docs, range) else docs
        tpe = int(sizes[ids].sum(dtype=np.int64))
        assert _digest(*_separately(sizes, docs, epochs, 77, seq, tpe, sep, drop_last, extra)) == indices, name
        fused = build_document_and_sample_index(sizes, docs, epochs, 77, seq, tpe, sep, drop_last, extra, 2)
        assert _digest(*fused) == indices, name
        n = len(fused[1]) - 1
        assert _digest(build_shuffle_index(n - 1, n, 77, threads=2)) == shuffle, name


def test_fused_build_checks_its_input():
    sizes = np.array([5, 5, 5], dtype=np.int32)
    with pytest.raises(ValueError, match="sizes must be a 1-D int32"):
        build_document_and_sample_index(sizes.astype(np.int64), range(3), 1, 0, 4, 15)
    with pytest.raises(ValueError, match="reach past the 3 entries of sizes"):
        build_document_and_sample_index(sizes, range(1, 4), 1, 0, 4, 15)
    with pytest.raises(ValueError, match="documents holds id 7"):
        build_document_and_sample_index(sizes, np.array([0, 7]), 1, 0, 4, 10)
    with pytest.raises(ValueError, match=r"sizes must be >= 0, found -2 at 1"):
        build_document_and_sample_index(np.array([5, -2, 5], np.int32), range(3), 1, 0, 4, 8)
    with pytest.raises(ValueError, match="runs out of tokens"):
        build_document_and_sample_index(sizes, range(3), 1, 0, 4, 30)
    with pytest.raises(ValueError, match="sample_index_dtype"):
        build_document_and_sample_index(sizes, range(3), 1, 0, 4, 15, sample_index_dtype="int16")
    with pytest.raises(ValueError, match="num_epochs"):
        build_document_and_sample_index(sizes, range(3), 0, 0, 4, 15)


def test_fused_build_with_document_ids_past_int32(tmp_path):
    # As test_document_ids_past_int32_index_a_sparse_sizes_file: int64 ids index a sparse sizes
    # file of 2^31 + 64 entries; the fused build must give the separate builders' arrays.
    base = 2**31 + 5
    sizes = _sparse_sizes(tmp_path / "sizes.i32", base, np.random.default_rng(4).integers(0, 50, 64).astype(np.int32))
    tpe = int(np.asarray(sizes[base:]).sum())
    docs = build_document_index(range(base, base + 64), 8, seed=5, separate_final_epoch=True)
    for drop_last in (True, False):
        want = _index_builders_i64(sizes, docs, 16, 8, tpe, drop_last)
        d, s = build_document_and_sample_index(sizes, range(base, base + 64), 8, 5, 16, tpe, True, drop_last)
        assert d.dtype == np.int64 and d.min() >= base
        np.testing.assert_array_equal(d, docs)
        np.testing.assert_array_equal(s, want)


def _index_builders_i64(sizes, doc_index, seq, epochs, tpe, drop_last):
    from megatron_osp.data import _index_builders

    return _index_builders.build_sample_index_i64(sizes, doc_index, seq, epochs, tpe, drop_last, True, 2)
