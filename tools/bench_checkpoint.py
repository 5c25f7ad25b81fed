#!/usr/bin/env python
"""Cost of checkpoint checksums: save and load time with and without hashing, in the same run.

Builds a model with its optimizer (one CPU process, fp32, a world of one) and saves / loads its full
training state with ``save_checkpoint`` / ``load_checkpoint`` (what a resume does), alternating two
modes: ``hash`` (as shipped: every file hashed into checksums.json on save, every file verified on
load) and ``no-hash`` (the same code with the digest function replaced by a constant, so only the
hashing itself is left out). Prints the minimum (the least disturbed run: what to read on a shared
machine) and the median of each, their ratio to the no-hash baseline, the wall time spent inside
the hashing itself, and the hash throughput of a few algorithms on this machine. The files are in the page cache when they
are loaded (they were just written), as on a resume right after a save; from a cold cache the
load also reads the files from disk, which both modes pay once (hashing reads them first).

    python tools/bench_checkpoint.py                      # quickstart model, then a >= 1 GB one
    python tools/bench_checkpoint.py --sizes tiny --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (config file, overrides). "tiny" is the CPU quickstart's model and optimizer (Muon);
# "big" is the 1.4B preset's shape cut to 2 layers and an 8192 vocabulary with Adam: 135M fp32
# parameters, 1.6 GB of weights and Adam moments.
SIZES = {
    "tiny": ("megatron_osp/configs/quickstart_cpu.yaml", []),
    "big": (None, ["model.preset=osp-1.4b", "model.num_layers=2", "model.vocab_size=8192", "optimizer.name=adam"]),
}


def _build(size: str):
    import torch
    from megatron.core.distributed import DistributedDataParallel

    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.optimizer.builder import ddp_config, get_osp_optimizer
    from megatron_osp.training.config import load_config

    path, overrides = SIZES[size]
    config = load_config(REPO / path if path else None, overrides + ["train.bf16=false"])
    tconfig = transformer_config(config.model, params_dtype=torch.float32)
    model = DistributedDataParallel(tconfig, ddp_config(config.optimizer), build_gpt_model(config.model, tconfig, seed=1))
    optimizer = get_osp_optimizer(config.optimizer, [model], bf16=False, log=None)
    # Fill the optimizer state (moments / momentum) as a trained run's checkpoint holds it.
    for p in model.parameters():
        p.main_grad = torch.full_like(p, 1e-3)
    optimizer.step()
    return config, model, optimizer


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(size: str, repeats: int, root: Path) -> dict:
    from megatron_osp.training import checkpoint_integrity as integrity
    from megatron_osp.training.checkpoint import load_checkpoint, save_checkpoint

    real_digest, real_hash_files = integrity.file_digest, integrity._hash_files
    hashing = [0.0]

    def timed_hash_files(*a, **k):  # the wall time spent hashing (in hash mode: the whole added cost)
        t = time.perf_counter()
        try:
            return real_hash_files(*a, **k)
        finally:
            hashing[0] += time.perf_counter() - t

    config, model, optimizer = _build(size)
    n_params = sum(p.numel() for p in model.parameters())
    save_checkpoint(root / "warmup", 1, [model], config, optimizer=optimizer)  # starts the writer once
    shutil.rmtree(root / "warmup")
    times = {(op, m): [] for op in ("save", "load", "hashing in save", "hashing in load") for m in ("hash", "no-hash")}
    nbytes = 0
    for rep in range(repeats):
        for mode in ("no-hash", "hash") if rep % 2 == 0 else ("hash", "no-hash"):
            integrity.file_digest = real_digest if mode == "hash" else (lambda path, algorithm=None: "-")
            integrity._hash_files = timed_hash_files
            try:
                save_dir = root / f"{mode}-{rep}"
                hashing[0], t = 0.0, time.perf_counter()
                ckpt = save_checkpoint(save_dir, 1, [model], config, optimizer=optimizer)
                times["save", mode].append(time.perf_counter() - t)
                times["hashing in save", mode].append(hashing[0])
                nbytes = _dir_bytes(ckpt)
                hashing[0], t = 0.0, time.perf_counter()
                load_checkpoint(save_dir, [model], optimizer)
                times["load", mode].append(time.perf_counter() - t)
                times["hashing in load", mode].append(hashing[0])
            finally:
                integrity.file_digest, integrity._hash_files = real_digest, real_hash_files
            shutil.rmtree(save_dir)
    return {"params": n_params, "bytes": nbytes, "times": times}


def hash_throughput(mb: int = 256) -> dict:
    data = memoryview(os.urandom(mb << 20))
    block = 8 << 20

    def run(update):
        t = time.perf_counter()
        for i in range(0, len(data), block):
            update(data[i:i + block])
        return len(data) / (time.perf_counter() - t) / 1e9

    out = {}
    for name in ("sha256", "blake2b", "md5"):
        h = hashlib.new(name)
        out[name] = run(h.update)
    crc = [0]
    out["zlib.crc32"] = run(lambda b: crc.__setitem__(0, zlib.crc32(b, crc[0])))
    return out


def size_args(description: str, repeats_help: str, argv=None):
    """The command line both checkpoint benchmarks take (this one and bench_async_save.py)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "big"])
    p.add_argument("--repeats", type=int, default=0, help=repeats_help)
    p.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory, removed)")
    return p.parse_args(argv)


def cpu_world() -> str:
    """Quiet Megatron's CPU warnings and start a one-process CPU world; returns the versions line."""
    for pattern in (".*Apex.*", ".*Transformer Engine.*", ".*deprecated.*", ".*TypedStorage.*", ".*DTensor.*"):
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("MEGATRON_OSP_FORCE_CPU", "1")
    import megatron.core
    import torch

    from megatron_osp import parallel, platform

    parallel.init_distributed(1, 1)
    platform.seed_everything(0)
    return (f"python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
            f"{os.cpu_count()} CPUs")


def main(argv=None) -> int:
    args = size_args(__doc__, "per mode (default: 9 for tiny, 5 for big)", argv)
    from megatron_osp import parallel
    from megatron_osp.training.checkpoint_integrity import ALGORITHM

    print(f"{cpu_world()}, checksum {ALGORITHM}")
    print("hash throughput (GB/s, 8 MiB blocks, one thread): "
          + ", ".join(f"{k} {v:.2f}" for k, v in hash_throughput().items()))
    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir))
    try:
        for size in args.sizes:
            repeats = args.repeats or (9 if size == "tiny" else 5)
            r = bench(size, repeats, root)
            print(f"\n{size}: {r['params'] / 1e6:.1f}M parameters + optimizer state, checkpoint "
                  f"{r['bytes'] / 1e6:.1f} MB, {repeats} runs per mode")
            for op in ("save", "load"):
                for stat in (min, statistics.median):
                    base, hashed = (stat(r["times"][op, m]) for m in ("no-hash", "hash"))
                    print(f"  {op} ({stat.__name__}): no-hash {base:.3f} s, hash {hashed:.3f} s, ratio "
                          f"{hashed / base:.3f} ({hashed - base:+.3f} s)")
                print(f"    every run: no-hash {', '.join(f'{t:.2f}' for t in r['times'][op, 'no-hash'])}; "
                      f"hash {', '.join(f'{t:.2f}' for t in r['times'][op, 'hash'])}")
                spent = statistics.median(r["times"][f"hashing in {op}", "hash"])
                print(f"    of which hashing (wall time inside the hash calls): {spent:.3f} s = "
                      f"{r['bytes'] / spent / 1e9 if spent else float('inf'):.2f} GB/s over the checkpoint's bytes"
                      f"{' (load: small files hashed again by every open)' if op == 'load' else ''}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
