#!/usr/bin/env python
"""Memory and communication plan per rank at a TP x PP x DP layout (CPU, nothing allocated).

Prints, per pipeline stage and over all ranks, GiB per rank (max and mean over the ranks) of bf16
params, fp32 grads (DDP's main_grad), fp32 masters, optimizer state, owners' reduced grads, the
exchange's comm buffers, activations and their total, plus GiB sent per rank per step and the
busiest link's GiB per step (each all-to-all round's busiest rank, summed over rounds), for our
whole-matrix ZeRO optimizer (OSP = Muon + AdamW, and AdamW alone) beside Megatron-Core's
DistributedOptimizer + Adam at the same layout. Our figures come from the optimizer's own
ownership and exchange plan on meta tensors (megatron_osp/training/memory_plan.py says how, and what
the activation formula assumes).

    python tools/plan_memory.py --preset osp-8b --tp 2 --dp 16 --seq 8192 --micro-batch 1 --recompute selective
    python tools/plan_memory.py --preset osp-70b --tp 8 --pp 4 --dp 8 --seq 4096 --recompute full --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope|full scope).*")

import torch  # noqa: E402

from megatron_osp.models.presets import PRESETS, get_preset  # noqa: E402
from megatron_osp.optimizer.builder import OptimSettings  # noqa: E402
from megatron_osp.optimizer.zero.relay import AUTO_MIN_DP, DELIVERIES  # noqa: E402
from megatron_osp.training.memory_plan import ATTENTIONS, GIB, RECOMPUTES, Layout, RankFigures, check_layout, plan  # noqa: E402

ROWS = [("params", "params"), ("grads (fp32 main_grad)", "grads"), ("masters (fp32)", "masters"),
        ("optimizer state", "state"), ("owner grads (fp32)", "owner_grads"), ("comm buffers", "comm_buffers"),
        ("activations", "activations"), ("**total**", "total"), ("sent / step: grads", "sent_grads"),
        ("sent / step: params", "sent_params"), ("sent / step: total", "sent"),
        ("busiest link / step: grads", "link_grads"), ("busiest link / step: params", "link_params")]
LABELS = {"muon": "OSP (ours)", "adam": "Adam (ours)"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, help=f"model preset: {', '.join(sorted(PRESETS))}")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--virtual-pipeline", type=int, default=1, help="model chunks per pipeline stage")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    ap.add_argument("--microbatches", type=int, default=None,
                    help="micro-batches per step per DP rank (default: enough to fill the pipeline)")
    ap.add_argument("--recompute", choices=RECOMPUTES, default="none")
    ap.add_argument("--optimizer", choices=("adam", "muon"), default=None,
                    help="only this one of ours (default: both, muon = OSP)")
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--attention", choices=ATTENTIONS, default="unfused",
                    help="unfused: the local spec's saved scores (as on CPU); flash: GPU flash attention (estimate)")
    ap.add_argument("--params-dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--grad-reduce-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--bucket-size", type=int, default=OptimSettings.bucket_size,
                    help=f"parameter elements per bucket (default: optimizer.bucket_size's, {OptimSettings.bucket_size:.0e})")
    ap.add_argument("--round-size", type=int, default=None,
                    help="elements an owner receives/sends per all-to-all round (default: the smaller of the bucket size and 4e7)")
    ap.add_argument("--delivery", choices=DELIVERIES, default=OptimSettings.delivery,
                    help="how gradients reach owners (optimizer.delivery): direct, relay (summed over DP on the way) "
                         f"or auto (relay from DP {AUTO_MIN_DP}); default {OptimSettings.delivery}")
    ap.add_argument("--json", default=None, help="also write every rank's figures (bytes) to this file")
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        ap.error(f"--preset: unknown preset {args.preset!r}; known: {', '.join(sorted(PRESETS))}")
    if args.bucket_size < 1:
        ap.error(f"--bucket-size must be >= 1, got {args.bucket_size}")
    if args.round_size is not None and args.round_size < 1:
        ap.error(f"--round-size must be >= 1, got {args.round_size}")
    return args


def layout_of(args) -> Layout:
    return Layout(tp=args.tp, pp=args.pp, dp=args.dp, vp=args.virtual_pipeline, micro_batch=args.micro_batch,
                  seq=args.seq, recompute=args.recompute, sequence_parallel=args.sequence_parallel,
                  attention=args.attention, microbatches=args.microbatches,
                  params_dtype=torch.bfloat16 if args.params_dtype == "bf16" else torch.float32)


def _value(r: RankFigures, key: str) -> float:
    return getattr(r, key)


def table(columns: list[tuple[str, list[RankFigures]]], title: str) -> str:
    """A markdown table: one row per figure, max and mean over ranks for each optimizer."""
    head = ["GiB per rank"]
    for label, ranks in columns:
        head += [f"{label} max", f"{label} mean"] if len(ranks) > 1 else [label]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, key in ROWS:
        cells = [name]
        for _, ranks in columns:
            values = [_value(r, key) / GIB for r in ranks]
            cells += [f"{max(values):.2f}", f"{sum(values) / len(values):.2f}"] if len(ranks) > 1 else [f"{values[0]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(stages, layout: Layout, preset: str) -> str:
    names = list(stages[0].ours)
    out = [f"{preset}: TP={layout.tp} PP={layout.pp}{f' (x{layout.vp} virtual)' if layout.vp > 1 else ''} "
           f"DP={layout.dp}, micro-batch {layout.micro_batch}, seq {layout.seq}, recompute {layout.recompute}, "
           f"sequence parallel {'on' if layout.sequence_parallel else 'off'}, attention {layout.attention}; "
           f"local parameters per rank by stage: {', '.join(f'{s.local_params:,}' for s in stages)}", ""]
    if len(stages) > 1:
        for s in stages:
            cols = [(LABELS[n], s.ours[n]) for n in names] + [("Megatron DO + Adam", [s.megatron])]
            out += [table(cols, f"stage {s.stage} (layers {', '.join(f'{a}-{a + n - 1}' for a, n in s.layers)})"), ""]
    cols = [(LABELS[n], [r for s in stages for r in s.ours[n]]) for n in names]
    cols.append(("Megatron DO + Adam", [s.megatron for s in stages] if len(stages) > 1 else [stages[0].megatron]))
    out.append(table(cols, "all ranks" if len(stages) > 1 else "every rank"))
    return "\n".join(out)


def to_json(stages) -> dict:
    def figures(r: RankFigures) -> dict:
        keys = RankFigures.MEMORY + ("largest_round", "sent_grads", "sent_params", "link_grads", "link_params")
        return {"coord": list(r.coord), "total": r.total, **{k: getattr(r, k) for k in keys}}

    return {"stages": [{"stage": s.stage, "layers": s.layers, "local_params": s.local_params,
                        "ours": {n: [figures(r) for r in rs] for n, rs in s.ours.items()},
                        "megatron_distributed_optimizer": figures(s.megatron)} for s in stages]}


def main(argv=None) -> int:
    args = parse_args(argv)
    model = get_preset(args.preset)
    layout = layout_of(args)
    if layout.seq is None:
        layout = dataclasses.replace(layout, seq=model.seq_length)
    try:
        check_layout(model, layout)
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ValueError(f"--json {args.json}: its directory does not exist")
        if args.json and os.path.isdir(args.json):
            raise ValueError(f"--json {args.json}: a directory (give the file to write)")
    except ValueError as e:
        print(f"plan_memory.py: {e}", file=sys.stderr)
        return 2
    optimizers = (args.optimizer,) if args.optimizer else ("muon", "adam")
    stages = plan(model, layout, optimizers, grad_reduce_dtype=args.grad_reduce_dtype, bucket_size=args.bucket_size,
                  round_size=args.round_size, delivery=args.delivery)
    print(report(stages, layout, args.preset))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(stages), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
