#!/usr/bin/env python
"""Training-step throughput of a 1.4B-shaped model on one device: Adam + RMSNorm vs OSP.

Runs the real Trainer (training/loop.py) in one process for each arm, on the same data, layout,
micro-batch and recompute setting, and times ``--steps`` training steps after ``--warmup`` untimed
ones, each step on its own (the device synchronised after it); rates use the median step time
(robust to the odd slow step; the mean is printed beside it). Arms:
  adam       Adam + RMSNorm, no EmbProj (the baseline);
  osp        Muon + AdamW, SSNorm, EmbProj (the paper's OSP), with the default model.ssnorm_kernel=auto
             (SSNorm through torch's fused rms_norm on a GPU);
  osp-eager  OSP with model.ssnorm_kernel=eager (``--eager-ssnorm``: SSNorm as separate fp32 ops, the
             default before 2026-12-04, ~10% slower forward + backward at the 1.4B shape on an H200);
  osp-zero   OSP with optimizer.distributed_optimizer=true and both overlaps on (``--zero``): on one
             device nothing travels, so this times the whole-matrix ZeRO code path itself (bucketed
             exchange, early Newton-Schulz) and checks that it runs on the device.
Prints one row per arm (tokens/s, ms/step, of which the optimizer step, peak device memory) and each
arm's tokens/s as a ratio of Adam's measured in the same run (the paper: OSP ~2% slower; issue target
>= 0.95x).

A step is ``--accumulate`` micro-batches (default 1) and one optimizer step. At one micro-batch per
step the optimizer's cost (OSP: Newton-Schulz on every hidden matrix) is paid on every micro-batch,
the worst case; a real run pays it once per global batch (osp_1.4b.yaml: 1,024 sequences, 64+
micro-batches on one device). The optimizer step is timed on its own inside each timed step (the
device synchronised before and after it), so each row also gives a projection to ``--project-to``
sequences per step: micro-batches x (step - optimizer) / accumulate + optimizer, from the medians.
That line is arithmetic on measured parts, not a measured step; ``--accumulate N`` measures one.

--micro-batch auto (the default) takes the largest power of two that tools/plan_memory.py's planner
(training/memory_plan.py: parameters, gradients, fp32 masters, optimizer state, activations) puts
under ``--memory-fraction`` of the device's memory for every arm, and halves it on an out-of-memory
error. The data are random token ids (throughput does not depend on them) unless --data names an
indexed corpus.

    python tools/bench_step.py                          # on a GPU: osp-1.4b, seq 2048, 20 timed steps
    python tools/bench_step.py --layers 12 --zero       # fewer layers, same widths; plus osp-zero
    python tools/bench_step.py --quick                  # smoke test: "test" preset, CPU is fine
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ARMS = {
    "adam": ["optimizer.name=adam", "model.normalization=rmsnorm", "model.embedding_projection=false"],
    "osp": ["optimizer.name=muon", "model.normalization=ssnorm", "model.embedding_projection=true"],
}
ZERO = ["optimizer.distributed_optimizer=true", "optimizer.overlap_grad_reduce=true",
        "optimizer.overlap_param_gather=true"]


def random_corpus(prefix: str, vocab: int, tokens: int, seq: int, seed: int = 0) -> str:
    """An indexed corpus of random documents (ids < vocab - 1, EOD = vocab - 1) in Megatron's format:
    documents of seq/2 to 2 x seq tokens, at least ``tokens`` and 200 documents in all (the
    train/valid split needs documents on both sides)."""
    from megatron_osp.data.indexed import IndexedDatasetWriter, token_dtype_for

    rng = np.random.default_rng(seed)
    written = docs = 0
    with IndexedDatasetWriter(prefix, dtype=token_dtype_for(vocab)) as writer:
        while written < tokens or docs < 200:
            n = int(rng.integers(max(seq // 2, 1), 2 * seq + 1))
            writer.add_document(np.append(rng.integers(0, vocab - 1, n), vocab - 1))
            written, docs = written + n + 1, docs + 1
    return prefix


def planned_micro_batch(model, seq: int, recompute: str, budget_bytes: float, arms) -> int:
    """The largest power-of-two micro-batch whose planned peak fits ``budget_bytes`` for every arm."""
    from megatron_osp.training.memory_plan import Layout, plan

    names = sorted({"adam" if a == "adam" else "muon" for a in arms})
    best, mb = 1, 1
    while mb <= 256:
        stages = plan(model, Layout(micro_batch=mb, seq=seq, recompute=recompute), tuple(names))
        need = max(r.total for st in stages for rows in st.ours.values() for r in rows)
        if need > budget_bytes:
            break
        best, mb = mb, mb * 2
    return best


def timed_optimizer_step(optimizer, sync, seconds: list):
    """Wrap ``optimizer.step`` (on the instance) so that each call's time, device synchronised before
    and after, is appended to ``seconds``."""
    inner = optimizer.step

    def step(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        sync()
        seconds.append(time.perf_counter() - start)
        return out

    optimizer.step = step


def run_arm(overrides: list[str], warmup: int, steps: int) -> dict:
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    trainer = Trainer(load_config(None, overrides), log=lambda *_: None)
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opt_times: list[float] = []
    timed_optimizer_step(trainer.optimizer, sync, opt_times)
    for _ in range(warmup):
        trainer.train_step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    del opt_times[:]
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(trainer.train_step()["loss"])
        sync()
        times.append(time.perf_counter() - start)
    cfg = trainer.config
    median = statistics.median(times)
    out = {
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "step_seconds": times,
        "optimizer_seconds": list(opt_times),
        "tokens_per_s": cfg.train.global_batch_size * cfg.model.seq_length / median,
        "tflops": trainer.run_log.tflops_per_device(cfg.train.global_batch_size * cfg.model.seq_length / median),
        "ms_per_step": 1000 * median,
        "ms_per_step_mean": 1000 * statistics.fmean(times),
        "optimizer_ms": 1000 * statistics.median(opt_times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "last_loss": losses[-1],
        "early_ns": dict(getattr(trainer.optimizer, "early_ns", {})) or None,
    }
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def default_projection() -> int:
    """The global batch (sequences) of the 1.4B recipe, configs/osp_1.4b.yaml."""
    from megatron_osp.training.config import load_config

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    return load_config(os.path.join(root, "megatron_osp", "configs", "osp_1.4b.yaml")).train.global_batch_size


def project(rows: dict, sequences: int, mb: int, accumulate: int, seq: int) -> dict:
    """Tokens/s at ``sequences`` per optimizer step from each arm's median step and optimizer times:
    (sequences / mb) micro-batches of (step - optimizer) / accumulate each, plus one optimizer step."""
    out = {}
    for arm, r in rows.items():
        per_micro = (r["ms_per_step"] - r["optimizer_ms"]) / accumulate
        ms = sequences / mb * per_micro + r["optimizer_ms"]
        out[arm] = {"ms_per_step": ms, "tokens_per_s": sequences * seq / (ms / 1000)}
    for p in out.values():
        p["ratio_vs_adam"] = p["tokens_per_s"] / out["adam"]["tokens_per_s"]
    return out


def arm_overrides(args, extra: dict, arm: str, data: str, eod: int, mb: int, tmp: str) -> list[str]:
    return [
        f"model.preset={args.preset}", *(f"model.{k}={v}" for k, v in extra.items()),
        *ARMS["adam" if arm == "adam" else "osp"], *(ZERO if arm == "osp-zero" else []),
        *(["model.ssnorm_kernel=eager"] if arm == "osp-eager" else []),
        f"data.paths=[{data}]", f"data.eod_id={eod}",
        f"train.micro_batch_size={mb}", f"train.global_batch_size={mb * args.accumulate}",
        f"train.train_steps={args.warmup + args.steps}", "train.warmup_steps=1",
        f"train.recompute={args.recompute}", "train.save=false", "train.tensorboard=false",
        "train.progress_bar=false", "train.eval_batches=1", "train.kurtosis_batches=1",
        f"train.run_dir={os.path.join(tmp, arm)}",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="osp-1.4b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, same widths (default: the preset's)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    ap.add_argument("--micro-batch", default="auto", help="an integer, or auto (planner; see above)")
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    ap.add_argument("--project-to", type=int, default=None,
                    help="sequences per step to project to (default: configs/osp_1.4b.yaml's global batch)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--memory-fraction", type=float, default=0.85)
    ap.add_argument("--zero", action="store_true", help="also time OSP with the distributed optimizer")
    ap.add_argument("--eager-ssnorm", action="store_true", help="also time OSP with model.ssnorm_kernel=eager")
    ap.add_argument("--data", default=None, help="an indexed corpus prefix (default: random tokens)")
    ap.add_argument("--eod-id", type=int, default=None, help="the end-of-document id of --data")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--quick", action="store_true", help="tiny 'test' preset, 2 + 3 steps (CPU is fine)")
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        ap.error("--warmup must be >= 0 and --steps >= 1")
    if args.accumulate < 1 or (args.project_to is not None and args.project_to < 1):
        ap.error("--accumulate and --project-to must be >= 1")
    if args.micro_batch != "auto" and not (args.micro_batch.isdigit() and int(args.micro_batch) > 0):
        ap.error(f"--micro-batch must be a positive integer or auto, got {args.micro_batch!r}")
    if args.data and args.eod_id is None:
        ap.error("--data needs --eod-id (its tokenizer's end-of-document id)")
    if args.quick:
        args.preset, args.warmup, args.steps = "test", min(args.warmup, 2), min(args.steps, 3)
        if args.micro_batch == "auto":
            args.micro_batch = "2"

    from megatron_osp.models.presets import get_preset

    extra = {}
    if args.layers:
        extra["num_layers"] = args.layers
    if args.seq:
        extra["seq_length"] = args.seq
    model = get_preset(args.preset, **extra)
    arms = ["adam", "osp"] + (["osp-eager"] if args.eager_ssnorm else []) + (["osp-zero"] if args.zero else [])
    on_gpu = torch.cuda.is_available()
    if args.micro_batch == "auto":
        budget = args.memory_fraction * torch.cuda.get_device_properties(0).total_memory if on_gpu else 4 * 2**30
        mb = planned_micro_batch(model, model.seq_length, args.recompute, budget, arms)
    else:
        mb = int(args.micro_batch)

    with tempfile.TemporaryDirectory() as tmp:
        tokens = (args.warmup + args.steps) * args.accumulate * mb * (model.seq_length + 1) * 2
        data = args.data or random_corpus(os.path.join(tmp, "random"), model.vocab_size, tokens, model.seq_length)
        eod = args.eod_id if args.data else model.vocab_size - 1
        while True:  # every arm at the same micro-batch: on out-of-memory, halve it and start again
            try:
                rows = {arm: {"micro_batch": mb, **run_arm(arm_overrides(args, extra, arm, data, eod, mb, tmp),
                                                          args.warmup, args.steps)} for arm in arms}
                break
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                if mb == 1:
                    raise
                print(f"out of memory at micro-batch {mb}: every arm again at {mb // 2}", flush=True)
                mb //= 2

    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    per_step = "one micro-batch per step" if args.accumulate == 1 else f"{args.accumulate} micro-batches per step"
    print(f"\n{args.preset}: {model.num_layers} layers x {model.hidden_size}, seq {model.seq_length}, "
          f"micro-batch {mb}, global batch {mb * args.accumulate} ({per_step}), recompute {args.recompute}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {device}, torch {torch.__version__}")
    print(f"{'arm':10} {'params':>14} {'ms/step':>10} {'mean':>8} {'opt ms':>8} {'tokens/s':>12} {'vs adam':>8} "
          f"{'peak GiB':>9} {'TFLOP/s':>8}")
    base = rows["adam"]["tokens_per_s"]
    for arm, r in rows.items():
        r["ratio_vs_adam"] = r["tokens_per_s"] / base
        print(f"{arm:10} {r['params']:>14,} {r['ms_per_step']:>10.1f} {r['ms_per_step_mean']:>8.1f} "
              f"{r['optimizer_ms']:>8.1f} {r['tokens_per_s']:>12,.0f} {r['ratio_vs_adam']:>7.3f}x {r['peak_gib']:>9.2f} "
              f"{r['tflops']:>8.4g}")
        if r["early_ns"]:
            print(f"{'':10} early Newton-Schulz batches used {r['early_ns']['used']}, redone {r['early_ns']['redone']}")
    print("TFLOP/s: model FLOPs per device (models/flops.py: matmuls, forward + backward, no recompute, no "
          "optimizer); divided by the device's dense bf16 peak, the MFU")
    target = args.project_to or default_projection()
    projected = project(rows, target, mb, args.accumulate, model.seq_length)
    print(f"projected to {target} sequences per step ({target / mb:g} micro-batches of {mb}), from the medians "
          f"above (not a measured step): " + ", ".join(f"{arm} {p['tokens_per_s']:,.0f} tokens/s "
                                                        f"({p['ratio_vs_adam']:.3f}x)" for arm, p in projected.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "layers": model.num_layers, "seq": model.seq_length,
                       "recompute": args.recompute, "accumulate": args.accumulate, "device": device, "rows": rows,
                       "projected": {"sequences_per_step": target, "rows": projected}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
