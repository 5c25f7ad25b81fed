#!/usr/bin/env python
"""Benchmark: the content sample's hashing (data/content_identity.sampled_documents), the current vectorized
hash against the earlier one (one hashlib.blake2b call per document in a Python loop, kept below as it was
at 4ac4443), in one run on the same random documents of 20 and of 500 tokens (int32 ids, as preprocessing
gives for vocabularies over 65,535; uint16 too with --dtype uint16). Each side runs --repeat times, the
best time kept. Prints ns per token, µs per document and old/new.

    python tools/bench_content_sample.py                    # 2,000,000 tokens per length
    python tools/bench_content_sample.py --tokens 20000000 --dtype uint16
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_osp.data.content_identity import sampled_documents  # noqa: E402


def blake2b_loop(lengths: np.ndarray, tokens: np.ndarray, rate: int = 1024) -> list[tuple[int, int]]:
    """The earlier scheme: blake2b-64 of each document's ids as stored, one call per document."""
    view = memoryview(np.ascontiguousarray(tokens)).cast("B")
    size, out, start = tokens.dtype.itemsize, [], 0
    for i, end in enumerate(np.cumsum(lengths, dtype=np.int64).tolist()):
        h = int.from_bytes(hashlib.blake2b(view[start * size:end * size], digest_size=8).digest(), "little")
        if h % rate == 0:
            out.append((i, h))
        start = end
    return out


def best(fn, lengths, tokens, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(lengths, tokens)
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2_000_000, help="tokens per document length")
    ap.add_argument("--dtype", default="int32", choices=["int32", "uint16"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'tokens/doc':>10} {'old ns/tok':>11} {'new ns/tok':>11} {'old us/doc':>11} {'new us/doc':>11} {'old/new':>8}")
    for length in (20, 500):
        n = args.tokens // length
        lengths = np.full(n, length, np.int64)
        tokens = rng.integers(0, 65535, n * length).astype(args.dtype)
        old = best(blake2b_loop, lengths, tokens, args.repeat)
        new = best(sampled_documents, lengths, tokens, args.repeat)
        print(f"{length:>10} {old / tokens.size * 1e9:>11.2f} {new / tokens.size * 1e9:>11.2f} "
              f"{old / n * 1e6:>11.3f} {new / n * 1e6:>11.3f} {old / new:>8.1f}")


if __name__ == "__main__":
    main()
