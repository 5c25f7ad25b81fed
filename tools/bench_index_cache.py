#!/usr/bin/env python
"""Benchmark: the index cache's cost per shard and split, the current data/index_cache.py against the one of
an earlier commit (--baseline, read with `git show`), in one run on the same shards.

Many tiny shards (--shards, 20 documents each) are opened as GPTDatasets of a train and a valid split, as
a blend of them builds its parts, with a fresh cache directory: "cold" is the first use (build, write the
entry, load it back memory-mapped), "warm" the next (load only). The index build itself is tiny here, so
what is measured is the cache's own file work. Each side runs twice, alternating, the best time kept.

    python tools/bench_index_cache.py                       # 2000 shards, baseline be9d475 (one .npy per array)
    python tools/bench_index_cache.py --shards 500 --baseline HEAD~3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _baseline_module(rev: str, directory: str):
    source = subprocess.run(["git", "-C", REPO, "show", f"{rev}:megatron_osp/data/index_cache.py"],
                            capture_output=True, text=True)
    if source.returncode != 0:
        sys.exit(f"error: cannot read the baseline index_cache.py at {rev}: {source.stderr.strip()}")
    path = os.path.join(directory, "baseline_index_cache.py")
    with open(path, "w") as f:
        f.write(source.stdout)
    spec = importlib.util.spec_from_file_location("baseline_index_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shards(directory: str, n: int) -> list[str]:
    from megatron_osp.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        prefix = os.path.join(directory, f"s{i:05d}")
        with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
            for _ in range(20):
                w.add_document(rng.integers(0, 250, int(rng.integers(10, 60))).astype(np.uint16))
        out.append(prefix)
    return out


def _time(cached_arrays, paths: list[str], cache: str) -> tuple[float, float]:
    """Seconds per shard and split: (cold, warm)."""
    from megatron_osp.data import gpt_dataset as gd
    from megatron_osp.data.indexed import IndexedDataset

    gd.cached_arrays = cached_arrays
    cfg = gd.GPTDataConfig(paths=paths, sequence_length=16, seed=1, eod_id=255, cache_dir=cache, split="90,10,0")
    shares = gd.parse_split(cfg.split)
    datasets = [IndexedDataset(p) for p in paths]

    def once() -> float:
        start = time.perf_counter()
        for ds in datasets:
            for i, split in enumerate(("train", "valid")):
                gd.GPTDataset(ds, gd.split_documents(len(ds), shares[i]), None, split, cfg)
        return (time.perf_counter() - start) / (2 * len(paths))

    shutil.rmtree(cache, ignore_errors=True)
    cold, warm = once(), once()
    first = gd.GPTDataset(datasets[0], gd.split_documents(len(datasets[0]), shares[0]), None, "train", cfg)
    return cold, warm, [np.array(a) for a in (first.document_index, first.sample_index, first.shuffle_index)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--baseline", default="be9d475", help="the commit whose index_cache.py is the old path")
    p.add_argument("--dir", default=None, help="where to write shards and caches (default: a temporary directory)")
    args = p.parse_args()
    from megatron_osp.data import index_cache

    work = args.dir or tempfile.mkdtemp(prefix="bench_index_cache.")
    os.makedirs(work, exist_ok=True)
    try:
        old = _baseline_module(args.baseline, work)
        data = os.path.join(work, "shards")
        os.makedirs(data, exist_ok=True)
        paths = _shards(data, args.shards)
        sides = {f"old ({args.baseline})": old.cached_arrays, "new": index_cache.cached_arrays}
        best = {name: [float("inf"), float("inf")] for name in sides}
        read = {}
        for _ in range(2):
            for name, fn in sides.items():
                cold, warm, read[name] = _time(fn, paths, os.path.join(work, "cache"))
                best[name] = [min(best[name][0], cold), min(best[name][1], warm)]
        (a, b) = read.values()
        same = all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
        print(f"same indices read back from both caches: {'yes' if same else 'NO'}")
        print(f"{args.shards} shards x 2 splits, per shard and split (best of 2):")
        for name, (cold, warm) in best.items():
            print(f"  {name:>20}: first use {cold * 1e3:6.2f} ms, cached {warm * 1e3:6.2f} ms")
        (oc, ow), (nc, nw) = best.values()
        print(f"  ratio old/new: first use {oc / nc:.2f}x, cached {ow / nw:.2f}x")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
