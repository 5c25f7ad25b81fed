#!/usr/bin/env python
"""Benchmark: the full GPT index build (document, sample and shuffle index), ours vs Megatron-Core's.

Documents get lognormal lengths (mean ~1000 tokens), written once to an .npy file that each side
memory-maps, as a real build reads the .idx. Each side then runs in its own subprocess:
  megatron  Megatron-Core 0.16.1's GPTDataset path (gpt_dataset._build_document_index with numpy's
            RandomState, helpers.build_sample_idx on a copy of the sizes, _build_shuffle_index),
            exactly as GPTDataset._build_document_sample_shuffle_indices calls them for one epoch;
  ours      megatron_osp.data: build_document_index, build_sample_index, build_shuffle_index.
Reported: build time per phase (in-process timers), the subprocess's wall time, and its peak RSS
(getrusage of the child itself), plus peak RSS above the RSS right after imports (Megatron's path
imports torch via megatron.core; ours does not). Ratios: time = megatron / ours, memory = ours /
megatron. The orders differ (our shuffles are not numpy's); the sample counts must agree.

    python tools/bench_data.py            # 1e8 documents, seq 4096
    python tools/bench_data.py --quick    # 1e6 documents
    python tools/bench_data.py --preprocess --megatron-lm DIR   # and preprocessing vs Megatron-LM's tool
    python tools/bench_data.py --num-docs 1e9 --sides ours      # ours alone (Megatron-Core's path needs
                                                                # ~33 GiB at 1e9: more than this machine)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def make_sizes(path: str, num_docs: int, seed: int) -> int:
    """Lognormal document lengths (mean ~1000 tokens), generated in chunks; returns the token count."""
    rng = np.random.default_rng(seed)
    sizes = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(num_docs,))
    chunk = 10_000_000
    for lo in range(0, num_docs, chunk):
        n = min(chunk, num_docs - lo)
        sizes[lo : lo + n] = np.clip(rng.lognormal(np.log(1000) - 0.72, 1.2, n), 1, 2**31 - 1).astype(np.int32)
    total = int(sizes.sum(dtype=np.int64))
    sizes.flush()
    del sizes
    return total


def _child(args) -> None:
    """One side of the benchmark; prints a JSON line."""
    phases = {}
    if args.child == "megatron":
        from megatron.core.datasets import helpers
        from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index
    else:
        from megatron_osp.data.sample_index import build_sample_index
        from megatron_osp.data.shuffles import build_document_index, build_shuffle_index
    rss_after_import = _rss_kb()
    sizes = np.load(args.sizes, mmap_mode="r")
    n, seq = len(sizes), args.seq_length
    t0 = time.perf_counter()
    if args.child == "megatron":
        # As BlendedMegatronDatasetBuilder / GPTDataset do for a split covering every document.
        indices = np.arange(0, n, dtype=np.int32)
        tokens_per_epoch = int(np.sum(sizes[indices]))
        phases["tokens_per_epoch"] = time.perf_counter() - t0
        t = time.perf_counter()
        rs = np.random.RandomState(args.seed)
        document_index = _build_document_index(indices, 1, rs, False)
        phases["document_index"] = time.perf_counter() - t
        t = time.perf_counter()
        sizes_for_cpp = sizes.copy() if len(document_index) * 2 > len(sizes) else sizes
        sample_index = helpers.build_sample_idx(sizes_for_cpp, document_index, seq, 1, tokens_per_epoch, True, True)
        phases["sample_index"] = time.perf_counter() - t
        t = time.perf_counter()
        num_samples = sample_index.shape[0] - 1
        shuffle_index = _build_shuffle_index(num_samples, num_samples, rs)
        phases["shuffle_index"] = time.perf_counter() - t
    else:
        tokens_per_epoch = int(sizes.sum(dtype=np.int64))
        phases["tokens_per_epoch"] = time.perf_counter() - t0
        t = time.perf_counter()
        document_index = build_document_index(range(n), 1, args.seed, False, args.threads)
        phases["document_index"] = time.perf_counter() - t
        t = time.perf_counter()
        sample_index = build_sample_index(sizes, document_index, seq, 1, tokens_per_epoch, True, True, args.threads)
        phases["sample_index"] = time.perf_counter() - t
        t = time.perf_counter()
        num_samples = sample_index.shape[0] - 1
        shuffle_index = build_shuffle_index(num_samples, num_samples, args.seed, args.threads)
        phases["shuffle_index"] = time.perf_counter() - t
    build = time.perf_counter() - t0
    assert len(shuffle_index) == num_samples
    print(
        json.dumps(
            {
                "side": args.child,
                "build_s": build,
                "phases": phases,
                "num_samples": int(num_samples),
                "tokens": tokens_per_epoch,
                "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "rss_after_import_kb": rss_after_import,
                "document_index_dtype": str(document_index.dtype),
                "sample_index_dtype": str(sample_index.dtype),
            }
        )
    )


def _run_side(side: str, sizes_path: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--sizes", sizes_path,
           "--seq-length", str(args.seq_length), "--seed", str(args.seed)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def _print_one(side: str, r: dict, args) -> None:
    """One side alone (no baseline in this run: no ratios, no targets)."""
    gb = 1 / 1024**2
    print(f"{side} only (no baseline in this run); samples: {r['num_samples']}; threads: "
          f"{args.threads or 'all usable cores'} (cpu count {os.cpu_count()})")
    for name in ["tokens_per_epoch", "document_index", "sample_index", "shuffle_index"]:
        print(f"{name + ' [s]':28}{r['phases'][name]:10.2f}")
    print(f"{'index build [s]':28}{r['build_s']:10.2f}")
    print(f"{'subprocess wall [s]':28}{r['wall_s']:10.2f}")
    print(f"{'peak RSS [GiB]':28}{r['peak_rss_kb'] * gb:10.2f}")
    print(f"{'peak RSS - imports [GiB]':28}{(r['peak_rss_kb'] - r['rss_after_import_kb']) * gb:10.2f}")
    print(f"dtypes: document index {r['document_index_dtype']}, sample index {r['sample_index_dtype']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-docs", type=float, default=1e8)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None, help="our builder's threads (default: all usable cores)")
    p.add_argument("--quick", action="store_true", help="1e6 documents")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--preprocess", action="store_true", help="also run tools/bench_preprocess.py")
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM_DIR"),
                   help="with --preprocess: a Megatron-LM checkout whose tools/preprocess_data.py is the baseline")
    p.add_argument("--sides", default="megatron,ours",
                   help="which builds to run: megatron,ours (default, with ratios) or one of them alone")
    p.add_argument("--child", choices=["ours", "megatron"], help=argparse.SUPPRESS)
    p.add_argument("--sizes", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    num_docs = 10**6 if args.quick else int(args.num_docs)
    if num_docs < 1 or args.seq_length < 1:
        p.error("--num-docs and --seq-length must be >= 1")
    sides = [x for x in args.sides.split(",") if x]
    if not sides or set(sides) - {"megatron", "ours"}:
        p.error(f"--sides takes megatron, ours or both, got {args.sides!r}")

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        sizes_path = os.path.join(tmp, "sizes.npy")
        t = time.perf_counter()
        tokens = make_sizes(sizes_path, num_docs, args.seed)
        print(f"{num_docs:.3g} documents, {tokens:.4g} tokens, seq {args.seq_length} "
              f"(sizes generated in {time.perf_counter() - t:.1f} s)", flush=True)
        results = {side: _run_side(side, sizes_path, args) for side in ("megatron", "ours") if side in sides}
    if len(results) == 1:
        _print_one(*next(iter(results.items())), args)
        return
    mega, ours = results["megatron"], results["ours"]
    if mega["num_samples"] != ours["num_samples"]:
        sys.exit(f"sample counts differ: megatron {mega['num_samples']}, ours {ours['num_samples']}")

    print(f"samples: {ours['num_samples']}   our threads: {args.threads or 'all usable cores'} "
          f"(cpu count {os.cpu_count()})")
    rows = ["tokens_per_epoch", "document_index", "sample_index", "shuffle_index"]
    print(f"{'':24}{'megatron':>12}{'ours':>12}{'ratio':>10}")
    for name in rows:
        m, o = mega["phases"][name], ours["phases"][name]
        print(f"{name + ' [s]':24}{m:12.2f}{o:12.2f}{m / max(o, 1e-9):9.1f}x")
    print(f"{'index build [s]':24}{mega['build_s']:12.2f}{ours['build_s']:12.2f}"
          f"{mega['build_s'] / ours['build_s']:9.1f}x   (time: megatron / ours)")
    print(f"{'subprocess wall [s]':24}{mega['wall_s']:12.2f}{ours['wall_s']:12.2f}{mega['wall_s'] / ours['wall_s']:9.1f}x")
    gb = 1 / 1024**2
    mp, op = mega["peak_rss_kb"] * gb, ours["peak_rss_kb"] * gb
    print(f"{'peak RSS [GiB]':24}{mp:12.2f}{op:12.2f}{op / mp:9.2f}x   (memory: ours / megatron)")
    mi, oi = (mega["peak_rss_kb"] - mega["rss_after_import_kb"]) * gb, (ours["peak_rss_kb"] - ours["rss_after_import_kb"]) * gb
    print(f"{'peak RSS - imports [GiB]':24}{mi:12.2f}{oi:12.2f}{oi / mi:9.2f}x")
    print(f"dtypes: document index {mega['document_index_dtype']} / {ours['document_index_dtype']}, "
          f"sample index {mega['sample_index_dtype']} / {ours['sample_index_dtype']}")
    scope = "" if num_docs >= 10**8 else " (the targets are set for 1e8 documents; fixed costs dominate here)"
    print(f"targets: time ratio >= 5x -> {'met' if mega['build_s'] / ours['build_s'] >= 5 else 'NOT met'}; "
          f"peak memory ratio <= 0.5x -> {'met' if op / mp <= 0.5 else 'NOT met'}{scope}")

    if args.preprocess:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_preprocess.py")
        if not os.path.exists(script):
            sys.exit(f"--preprocess: {script} does not exist")
        print("\n== preprocessing benchmark (tools/bench_preprocess.py) ==", flush=True)
        cmd = [sys.executable, script] + (["--quick"] if args.quick else [])
        cmd += ["--megatron-lm", args.megatron_lm] if args.megatron_lm else []
        sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
