#!/usr/bin/env python
"""What a checkpoint save costs the training loop: synchronous vs ``train.async_save``, same run.

Builds a model with its optimizer (one CPU process, fp32; the sizes of tools/bench_checkpoint.py) and
alternates two arms, each saving the full training state once per repeat:

- ``sync``: ``save_checkpoint`` (what ``train.async_save=false`` does at every save_interval); the loop
  is stopped for all of it;
- ``async``: ``AsyncSaver.start`` (the loop is stopped until the state is planned and the writer
  forked), then optimizer steps with ``poll`` after each, as the training loop does, until the save is
  published.

An optimizer step (Adam over every parameter, gradients preset) stands in for a training step: it
rewrites all weights and optimizer state, so the copy-on-write pages the forked writer still reads
are copied, which is the cost a background save adds to the steps it overlaps. Printed per arm: the
time the loop was stopped (min and median), its ratio to the sync arm (the baseline), the mean step
time while the writer ran against steps with no save in flight, and the time until the background
save was published. On a GPU the stop also includes the device-to-host copy of the state.

    python tools/bench_async_save.py                      # quickstart model, then a >= 1 GB one
    python tools/bench_async_save.py --sizes tiny --repeats 3
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def _step(optimizer, saver=None) -> float:
    t = time.perf_counter()
    optimizer.step()
    if saver is not None:
        saver.poll()
    return time.perf_counter() - t


def bench(size: str, repeats: int, root: Path) -> dict:
    from bench_checkpoint import _build

    from megatron_osp.training.async_checkpoint import AsyncSaver
    from megatron_osp.training.checkpoint import save_checkpoint

    config, model, optimizer = _build(size)
    save_checkpoint(root / "warmup", 1, [model], config, optimizer=optimizer)
    shutil.rmtree(root / "warmup")
    saver = AsyncSaver()
    idle = [_step(optimizer) for _ in range(5)]
    out = {"sync": [], "async": [], "published": [], "overlapped": [], "idle": idle}
    for rep in range(repeats):
        for arm in ("sync", "async") if rep % 2 == 0 else ("async", "sync"):
            save_dir = root / f"{arm}-{rep}"
            t = time.perf_counter()
            if arm == "sync":
                save_checkpoint(save_dir, 1, [model], config, optimizer=optimizer)
                out["sync"].append(time.perf_counter() - t)
            else:
                saver.start(save_dir, 1, [model], config, optimizer=optimizer, scheduler=None, consumed_samples=0)
                out["async"].append(time.perf_counter() - t)
                while saver.in_flight is not None:
                    out["overlapped"].append(_step(optimizer, saver))
                out["published"].append(time.perf_counter() - t)
            out["idle"] += [_step(optimizer) for _ in range(3)]
            shutil.rmtree(save_dir)
    return out


def main(argv=None) -> int:
    from bench_checkpoint import cpu_world, size_args

    args = size_args(__doc__, "saves per arm (default: 5 for tiny, 3 for big)", argv)
    print(cpu_world())
    from megatron_osp import parallel

    root = Path(tempfile.mkdtemp(prefix="bench_async_save_", dir=args.dir))
    try:
        for size in args.sizes:
            repeats = args.repeats or (5 if size == "tiny" else 3)
            r = bench(size, repeats, root)
            print(f"\n{size}: {repeats} saves per arm")
            for stat in (min, statistics.median):
                base, background = stat(r["sync"]), stat(r["async"])
                print(f"  loop stopped by a save ({stat.__name__}): sync {base:.3f} s (baseline), "
                      f"async {background:.3f} s, ratio {background / base:.3f}")
            idle, overlapped = statistics.mean(r["idle"]), statistics.mean(r["overlapped"] or [float("nan")])
            print(f"  optimizer step: {idle * 1e3:.1f} ms with no save in flight, {overlapped * 1e3:.1f} ms while "
                  f"the writer ran ({len(r['overlapped'])} steps), ratio {overlapped / idle:.2f}")
            print(f"  background save published after (median) {statistics.median(r['published']):.3f} s; "
                  f"every sync save: {', '.join(f'{t:.2f}' for t in r['sync'])} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
