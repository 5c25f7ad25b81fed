"""Our blending indices against Megatron-Core's helpers_cpp, on random weights and sizes."""

import numpy as np
import pytest

from megatron_osp.data.blending import (
    build_blending_indices,
    build_exhaustive_blending_indices,
    normalize_weights,
)

helpers_cpp = pytest.importorskip("megatron.core.datasets.helpers_cpp")


def _megatron_weighted(weights, size):
    which = np.zeros(size, dtype=np.int16)
    within = np.zeros(size, dtype=np.int64)
    helpers_cpp.build_blending_indices(which, within, np.asarray(weights, dtype=np.float64), len(weights), size, False)
    return which, within


def _megatron_exhaustive(sizes):
    total = int(np.sum(sizes))
    which = np.zeros(total, dtype=np.int16)
    within = np.zeros(total, dtype=np.int64)
    helpers_cpp.build_exhaustive_blending_indices(which, within, np.asarray(sizes, dtype=np.int64), len(sizes))
    return which, within


@pytest.mark.parametrize("seed", range(6))
def test_weighted_blend_equals_megatron(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    raw = rng.random(n) + 1e-3
    if seed == 0:
        raw = np.ones(n)  # all ties: the lowest dataset id must win, as in Megatron
    weights = normalize_weights(raw.tolist())
    size = int(rng.integers(0, 50_000))
    got = build_blending_indices(weights, size)
    want = _megatron_weighted(weights, size)
    assert got[0].dtype == np.int16 and got[1].dtype == np.int64
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("seed", range(6))
def test_exhaustive_blend_equals_megatron(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 10))
    sizes = rng.integers(1, 5_000, n)
    if seed == 0:
        sizes[:] = 7  # equal sizes: ties everywhere
    got = build_exhaustive_blending_indices(sizes)
    want = _megatron_exhaustive(sizes)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # Exactly sizes[d] samples from d, each taken once in order.
    for d, s in enumerate(sizes):
        np.testing.assert_array_equal(got[1][got[0] == d], np.arange(s))


def test_normalize_matches_megatron():
    from megatron.core.datasets.utils import normalize

    w = [0.3, 1.7, 5.0, 1e-4]
    assert normalize_weights(w) == normalize(w)


def test_bad_blend_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="weights"):
        normalize_weights([1.0, 0.0])
    with pytest.raises(ValueError, match="weights"):
        build_blending_indices([], 5)
    with pytest.raises(ValueError, match="size"):
        build_blending_indices([0.5, 0.5], -1)
    with pytest.raises(ValueError, match="sizes"):
        build_exhaustive_blending_indices([3, 0])
    with pytest.raises(ValueError, match="sizes"):
        build_exhaustive_blending_indices([1.5, 2.0])
