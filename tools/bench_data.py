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


def first_touch(gib: int) -> None:
    """Writes gib fresh 1 GiB arrays twice each: the first write pays for faulting the memory in.

    Isolates the first-touch cost that every built index pays once (numpy asks for transparent huge
    pages on arrays this large). Prints wall and process CPU seconds of both writes per GiB.
    """
    arrays = []
    print(f"{'GiB':>4}{'first write wall':>18}{'CPU':>8}{'second write wall':>19}{'CPU':>8}")
    for g in range(gib):
        a = np.empty(2**28, dtype=np.int32)
        times = []
        for value in (1, 2):
            t, c = time.perf_counter(), time.process_time()
            a.fill(value)
            times += [time.perf_counter() - t, time.process_time() - c]
        arrays.append(a)  # keep it: the next GiB must be fresh memory, not this one recycled
        print(f"{g:4d}{times[0]:18.2f}{times[1]:8.2f}{times[2]:19.2f}{times[3]:8.2f}", flush=True)


def _reuse_sizes(path: str, num_docs: int) -> int | None:
    """The token count of an existing sizes file of num_docs int32 entries, else None."""
    if not os.path.exists(path):
        return None
    try:
        sizes = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        sys.exit(f"--sizes-file {path}: not a readable .npy file ({e})")
    if sizes.dtype != np.int32 or sizes.shape != (num_docs,):
        sys.exit(f"--sizes-file {path} holds {sizes.dtype} {sizes.shape}, not int32 ({num_docs},); "
                 "remove it or give another path")
    return int(sizes.sum(dtype=np.int64))


def _child(args) -> None:
    """One side of the benchmark; prints a JSON line."""
    phases = {}
    if args.child == "megatron":
        from megatron.core.datasets import helpers
        from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index
    else:
        from megatron_osp.data.sample_index import build_document_and_sample_index
        from megatron_osp.data.shuffles import build_shuffle_index
    rss_after_import = _rss_kb()
    sizes = np.load(args.sizes, mmap_mode="r")
    n, seq = len(sizes), args.seq_length
    cpu = {}  # process CPU seconds (all threads, user + system) per phase: robust to a busy machine
    clock = [time.perf_counter(), time.process_time()]

    def lap(name: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        phases[name], cpu[name] = now[0] - clock[0], now[1] - clock[1]
        clock[:] = now

    t0, c0 = clock
    if args.child == "megatron":
        # As BlendedMegatronDatasetBuilder / GPTDataset do for a split covering every document.
        indices = np.arange(0, n, dtype=np.int32)
        tokens_per_epoch = int(np.sum(sizes[indices]))
        lap("tokens_per_epoch")
        rs = np.random.RandomState(args.seed)
        document_index = _build_document_index(indices, 1, rs, False)
        lap("document_index")
        sizes_for_cpp = sizes.copy() if len(document_index) * 2 > len(sizes) else sizes
        sample_index = helpers.build_sample_idx(sizes_for_cpp, document_index, seq, 1, tokens_per_epoch, True, True)
        lap("sample_index")
        num_samples = sample_index.shape[0] - 1
        shuffle_index = _build_shuffle_index(num_samples, num_samples, rs)
        lap("shuffle_index")
    else:
        tokens_per_epoch = int(sizes.sum(dtype=np.int64))
        lap("tokens_per_epoch")
        # As GPTDataset builds them: both indices in one pass (data/sample_index.py).
        stages = {}
        document_index, sample_index = build_document_and_sample_index(
            sizes, range(n), 1, args.seed, seq, tokens_per_epoch, False, True, True, args.threads,
            args.sample_index_dtype, stages,
        )
        lap("document_and_sample_index")
        for label in ("plan", "scatter", "shuffle_walk"):
            phases[f"  {label}"], cpu[f"  {label}"] = stages[f"{label}_s"], stages[f"{label}_cpu_s"]
        num_samples = sample_index.shape[0] - 1
        shuffle_index = build_shuffle_index(num_samples, num_samples, args.seed, args.threads)
        lap("shuffle_index")
    build, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    assert len(shuffle_index) == num_samples
    digests = {}
    if args.digest:  # after the timers: what the indices hold, to compare builders byte for byte
        import hashlib

        for name, a in [("document_index", document_index), ("sample_index", sample_index),
                        ("shuffle_index", shuffle_index)]:
            h = hashlib.sha256(str(a.dtype).encode())
            flat = np.ascontiguousarray(a).reshape(-1)
            for lo in range(0, len(flat), 1 << 26):
                h.update(memoryview(flat[lo : lo + (1 << 26)]).cast("B"))
            digests[name] = h.hexdigest()[:16]
    print(
        json.dumps(
            {
                "side": args.child,
                "build_s": build,
                "build_cpu_s": build_cpu,
                "phases": phases,
                "cpu": cpu,
                "num_samples": int(num_samples),
                "tokens": tokens_per_epoch,
                "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
                "rss_after_import_kb": rss_after_import,
                "document_index_dtype": str(document_index.dtype),
                "sample_index_dtype": str(sample_index.dtype),
                "digests": digests,
            }
        )
    )


def _run_side(side: str, sizes_path: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--sizes", sizes_path,
           "--seq-length", str(args.seq_length), "--seed", str(args.seed)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.digest:
        cmd += ["--digest"]
    cmd += ["--sample-index-dtype", args.sample_index_dtype]
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
    print(f"{'wall [s]':>38}{'CPU [s]':>10}")
    for name, seconds in r["phases"].items():
        print(f"{name + ' [s]':28}{seconds:10.2f}{r['cpu'][name]:10.2f}")
    print(f"{'index build [s]':28}{r['build_s']:10.2f}{r['build_cpu_s']:10.2f}")
    print(f"{'subprocess wall [s]':28}{r['wall_s']:10.2f}")
    print(f"{'peak RSS [GiB]':28}{r['peak_rss_kb'] * gb:10.2f}")
    print(f"{'peak RSS [GB]':28}{r['peak_rss_kb'] * 1024 / 1e9:10.2f}")
    print(f"{'minor page faults':28}{r['minor_faults']:10d}")
    print(f"{'peak RSS - imports [GiB]':28}{(r['peak_rss_kb'] - r['rss_after_import_kb']) * gb:10.2f}")
    print(f"dtypes: document index {r['document_index_dtype']}, sample index {r['sample_index_dtype']}")
    for name, d in r["digests"].items():
        print(f"sha256 of {name} (dtype + bytes): {d}")


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
    p.add_argument("--sizes-file", help="keep the generated sizes here (.npy) and reuse them when they exist "
                   "with --num-docs entries, as this tool wrote them for the same --seed (the 1e9 file takes ~40 s "
                   "and 4 GB to write)")
    p.add_argument("--sample-index-dtype", choices=["int64", "auto"], default="auto",
                   help="our sample index: int32 where legal (Megatron-Core's rule; what GPTDataset "
                   "builds, the default) or int64 always")
    p.add_argument("--digest", action="store_true", help="print a sha256 of each index (dtype + bytes)")
    p.add_argument("--first-touch", type=int, metavar="GIB",
                   help="only measure what writing GIB fresh GiB costs the first and the second time")
    p.add_argument("--child", choices=["ours", "megatron"], help=argparse.SUPPRESS)
    p.add_argument("--sizes", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    if args.first_touch:
        return first_touch(args.first_touch)
    num_docs = 10**6 if args.quick else int(args.num_docs)
    if num_docs < 1 or args.seq_length < 1:
        p.error("--num-docs and --seq-length must be >= 1")
    sides = [x for x in args.sides.split(",") if x]
    if not sides or set(sides) - {"megatron", "ours"}:
        p.error(f"--sides takes megatron, ours or both, got {args.sides!r}")

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        sizes_path = args.sizes_file or os.path.join(tmp, "sizes.npy")
        t = time.perf_counter()
        tokens = _reuse_sizes(sizes_path, num_docs) if args.sizes_file else None
        how = f"reused {sizes_path}"
        if tokens is None:
            tokens = make_sizes(sizes_path, num_docs, args.seed)
            how = f"sizes generated in {time.perf_counter() - t:.1f} s"
        print(f"{num_docs:.3g} documents, {tokens:.4g} tokens, seq {args.seq_length} ({how})", flush=True)
        load_before = os.getloadavg()[0]
        results = {side: _run_side(side, sizes_path, args) for side in ("megatron", "ours") if side in sides}
    if len(results) == 1:
        _print_one(*next(iter(results.items())), args)
        print("load average (1 min) before / after the build: "
              f"{load_before:.2f} / {os.getloadavg()[0]:.2f} (2 cores: above ~1.5, other work shares them)")
        return
    mega, ours = results["megatron"], results["ours"]
    if mega["num_samples"] != ours["num_samples"]:
        sys.exit(f"sample counts differ: megatron {mega['num_samples']}, ours {ours['num_samples']}")

    print(f"samples: {ours['num_samples']}   our threads: {args.threads or 'all usable cores'} "
          f"(cpu count {os.cpu_count()})")
    # Megatron-Core builds the document and sample index apart; ours in one pass (with its stages).
    mega["phases"]["document_and_sample_index"] = mega["phases"]["document_index"] + mega["phases"]["sample_index"]
    rows = ["tokens_per_epoch", "document_index", "sample_index", "document_and_sample_index",
            *[k for k in ours["phases"] if k.startswith(" ")], "shuffle_index"]
    print(f"{'':30}{'megatron':>12}{'ours':>12}{'ratio':>10}")
    for name in rows:
        m, o = mega["phases"].get(name), ours["phases"].get(name)
        cells = "".join(f"{'-' if v is None else f'{v:.2f}':>12}" for v in (m, o))
        ratio = f"{m / max(o, 1e-9):9.1f}x" if m is not None and o is not None else ""
        print(f"{name + ' [s]':30}{cells}{ratio}")
    print(f"{'index build [s]':30}{mega['build_s']:12.2f}{ours['build_s']:12.2f}"
          f"{mega['build_s'] / ours['build_s']:9.1f}x   (time: megatron / ours)")
    print(f"{'subprocess wall [s]':30}{mega['wall_s']:12.2f}{ours['wall_s']:12.2f}{mega['wall_s'] / ours['wall_s']:9.1f}x")
    gb = 1 / 1024**2
    mp, op = mega["peak_rss_kb"] * gb, ours["peak_rss_kb"] * gb
    print(f"{'peak RSS [GiB]':30}{mp:12.2f}{op:12.2f}{op / mp:9.2f}x   (memory: ours / megatron)")
    mi, oi = (mega["peak_rss_kb"] - mega["rss_after_import_kb"]) * gb, (ours["peak_rss_kb"] - ours["rss_after_import_kb"]) * gb
    print(f"{'peak RSS - imports [GiB]':30}{mi:12.2f}{oi:12.2f}{oi / mi:9.2f}x")
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
