#!/usr/bin/env python
"""Benchmark OSP's distributed Muon: a CPU cost model, and GPU throughput / step time.

--cost-model (CPU, no GPU, nothing allocated): the logical matrices of a preset at DP x TP, their
    Newton-Schulz owners from the very assignment code the optimizer runs (ownership.assign_owners
    over logical.build_blocks), NS FLOPs per rank (max/mean; target <= 1.1) against Megatron-Core's
    duplicated-TP mode, and bytes per step per rank of Muon's two all-to-alls (optimizer/plan.py,
    also the optimizer's own plan) next to DDP's gradient all-reduce that AdamW needs too.
--gpu: NS throughput on the preset's logical matrix shapes in bf16 (TFLOP/s, and as a fraction of
    a large bf16 matmul timed in the same run), batched by shape and one by one, the symmetric
    Triton kernel batched by shape (TFLOP/s as full-FLOP equivalent and as FLOPs done, plus its
    difference from torch and from an fp32 reference; skipped with the reason where Triton cannot
    run, e.g. on CPU unless TRITON_INTERPRET=1), plus emerging-optimizers' newton_schulz when
    importable; then the optimizer step time of our Muon (NS backend auto, and torch), torch AdamW
    and Megatron-Core's Muon (TensorParallelMuon) on the same model in the same run.
    Single process; no torchrun needed. --quick uses the tiny "test" preset (runs on CPU too).

    python tools/bench_muon.py --cost-model                       # 1.4B at DP=8 x TP=2
    python tools/bench_muon.py --gpu                              # on one H100
    python tools/bench_muon.py --gpu --quick                      # smoke test, CPU is fine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from megatron_osp.models.presets import get_preset  # noqa: E402
from megatron_osp.optimizer.logical import build_blocks  # noqa: E402
from megatron_osp.optimizer.newton_schulz import newton_schulz, ns_flops  # noqa: E402
from megatron_osp.optimizer.ownership import assign_owners  # noqa: E402
from megatron_osp.optimizer.plan import exchange_sizes  # noqa: E402


# ---------------------------------------------------------------------------------- shapes
def _tconfig(model):
    heads = model.num_attention_heads
    return SimpleNamespace(
        num_attention_heads=heads,
        num_query_groups=model.num_query_groups or heads,
        kv_channels=model.hidden_size // heads,
        ffn_hidden_size=model.ffn_hidden_size,
        gated_linear_unit=True,
        hidden_size=model.hidden_size,
    )


def _meta(shape, dim):
    t = torch.empty(shape, device="meta")
    if dim is not None:
        t.tensor_model_parallel, t.partition_dim = True, dim
    return t


def muon_matrices(model, tp: int):
    """(name, meta parameter) of one rank's Muon matrices, with Megatron's TP partitioning."""
    c = _tconfig(model)
    h, f = model.hidden_size, model.ffn_hidden_size
    qkv = (c.num_attention_heads + 2 * c.num_query_groups) * c.kv_channels
    out = []
    for layer in range(model.num_layers):
        pre = f"decoder.layers.{layer}."
        out += [
            (pre + "self_attention.linear_qkv.weight", _meta((qkv // tp, h), 0)),
            (pre + "self_attention.linear_proj.weight", _meta((h, h // tp), 1)),
            (pre + "mlp.linear_fc1.weight", _meta((2 * f // tp, h), 0)),
            (pre + "mlp.linear_fc2.weight", _meta((h, f // tp), 1)),
        ]
    if model.embedding_projection:
        out += [("embedding_projection.weight", _meta((h, h), None)), ("output_projection.weight", _meta((h, h), None))]
    return out


def logical_blocks_for(model, tp: int, qkv_split: str = "qkv"):
    holder = SimpleNamespace(config=_tconfig(model))
    return build_blocks(muon_matrices(model, tp), holder, 0, tp, qkv_split, offset=0)


# ---------------------------------------------------------------------------------- cost model
def cost_model(args) -> int:
    model = get_preset(args.preset)
    tp, dp = args.tp, args.dp
    world = tp * dp
    blocks = logical_blocks_for(model, tp, args.qkv_split)
    load = assign_owners(blocks, world, args.ns_steps)
    coords = [(t, d) for d in range(dp) for t in range(tp)]
    total = sum(ns_flops(*b.shape, args.ns_steps) for b in blocks)
    mean = total / world
    ratio = max(load) / mean
    print(f"# Muon cost model: preset {args.preset}, DP={dp} x TP={tp} ({world} ranks), qkv_split={args.qkv_split}, "
          f"NS {args.ns_steps} steps")
    print(f"logical matrices: {len(blocks)}; NS work per step: {total / 1e12:.2f} TFLOP in all")
    print()
    print("| NS FLOPs per rank per step | TFLOP |")
    print("|---|---|")
    print(f"| ours, owner-compute (max) | {max(load) / 1e12:.3f} |")
    print(f"| ours, owner-compute (mean) | {mean / 1e12:.3f} |")
    print(f"| ours, max/mean | {ratio:.3f} (target <= 1.1: {'ok' if ratio <= 1.1 else 'MISSED'}) |")
    print(f"| Megatron-Core Muon, duplicated TP mode, no layer-wise sharding (every rank: all) | {total / 1e12:.3f} |")
    print(f"| Megatron-Core Muon, duplicated TP mode + layer-wise DP sharding (ideal, total/DP) | {total / dp / 1e12:.3f} |")
    print()

    # Communication per rank per step (bytes a rank sends to other ranks).
    elem = 2  # bf16 on GPU
    sent = []
    for r in range(world):
        gs, _, ss, _ = exchange_sizes(blocks, coords, r)
        sent.append(((sum(gs) - gs[r]) * elem, (sum(ss) - ss[r]) * elem))
    n_local = _params_per_tp_rank(model, tp)
    ring = 2 * (dp - 1) / dp * n_local
    grad_bytes = 4  # DDP reduces gradients in fp32 (ddp_config: grad_reduce_in_fp32)
    ddp = ring * grad_bytes
    g_max, s_max = max(s[0] for s in sent), max(s[1] for s in sent)
    g_mean, s_mean = statistics.mean(s[0] for s in sent), statistics.mean(s[1] for s in sent)
    print("| bytes sent per rank per step | mean MB | max MB |")
    print("|---|---|---|")
    print(f"| DDP gradient all-reduce (ring, fp32), AdamW and Muon alike | {ddp / 1e6:.1f} | {ddp / 1e6:.1f} |")
    print(f"| Muon gather to owners (bf16 all-to-all) | {g_mean / 1e6:.1f} | {g_max / 1e6:.1f} |")
    print(f"| Muon updates back to shards (bf16 all-to-all) | {s_mean / 1e6:.1f} | {s_max / 1e6:.1f} |")
    muon_total = ddp + g_mean + s_mean
    print(f"| total: AdamW {ddp / 1e6:.1f} MB, Muon {muon_total / 1e6:.1f} MB | ratio Muon/AdamW "
          f"{muon_total / ddp:.2f} | |")
    print(f"\n(parameters per TP rank: {n_local / 1e6:.1f} M; Muon matrices are "
          f"{sum(b.shape[0] * b.shape[1] for b in blocks) / 1e6:.1f} M logical elements)")
    return 0 if ratio <= 1.1 else 1


def _params_per_tp_rank(model, tp: int) -> float:
    h = model.hidden_size
    vocab = model.padded_vocab_size(tp)
    heads = vocab * h * (2 if model.untie_embeddings_and_output_weights else 1)
    return (model.num_parameters() - model.vocab_size * h * (2 if model.untie_embeddings_and_output_weights else 1)
            + heads) / tp


# ---------------------------------------------------------------------------------- GPU
def _timeit(fn, device, warmup=2, iters=5) -> float:
    """Median seconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ns_throughput(args, device) -> None:
    model = get_preset("test" if args.quick else args.preset)
    blocks = logical_blocks_for(model, 1, args.qkv_split)
    by_shape: dict[tuple[int, int], int] = {}
    for b in blocks:
        by_shape[b.shape] = by_shape.get(b.shape, 0) + 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    stacks = {s: torch.randn(n, *s, device=device, dtype=dtype, generator=gen) for s, n in by_shape.items()}
    flops = sum(ns_flops(*s, args.ns_steps) * n for s, n in by_shape.items())

    size = 1024 if args.quick else 8192
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    t_mm = _timeit(lambda: a @ b, device, iters=10)
    mm_rate = 2 * size**3 / t_mm

    def batched(backend="torch"):
        for s, x in stacks.items():
            newton_schulz(x, steps=args.ns_steps, coefficients=args.coefficients, backend=backend)

    def one_by_one():
        for s, x in stacks.items():
            for m in x:
                newton_schulz(m, steps=args.ns_steps, coefficients=args.coefficients, backend="torch")

    # rows: (label, seconds, FLOPs counted as the full products, FLOPs the work actually does)
    rows = [("large matmul %dx%d (%s)" % (size, size, str(dtype).replace("torch.", "")), t_mm, 2 * size**3, 2 * size**3)]
    for label, fn in (("ours, batched by shape", batched), ("ours, one matrix at a time", one_by_one)):
        t = _timeit(fn, device)
        rows.append((label, t, flops, flops))
    checks = _triton_rows(args, device, stacks, rows, batched, flops)
    try:
        from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz as eo_ns

        fp32 = {s: x.float() for s, x in stacks.items()}

        def emerging():
            for s, x in fp32.items():
                for m in x:
                    eo_ns(m, steps=args.ns_steps)

        t = _timeit(emerging, device)
        rows.append(("emerging-optimizers newton_schulz, fp32 input, one at a time", t, flops, flops))
    except Exception as e:  # noqa: BLE001 - an optional anchor; say why it is missing
        print(f"(emerging-optimizers newton_schulz skipped: {type(e).__name__}: {e})")
    shapes = ", ".join(f"{n} x {s[0]}x{s[1]}" for s, n in by_shape.items())
    print(f"\n# Newton-Schulz on all Muon matrices of {'test' if args.quick else args.preset} "
          f"({shapes}); {flops / 1e12:.2f} TFLOP per pass, device {_device_name(device)}")
    print("| work | ms | TFLOP/s (full-FLOP equivalent) | TFLOP/s (FLOPs done) | fraction of matmul rate |")
    print("|---|---|---|---|---|")
    for label, t, full, done in rows:
        print(f"| {label} | {t * 1e3:.1f} | {full / t / 1e12:.1f} | {done / t / 1e12:.1f} | {full / t / mm_rate:.2f} |")
    print("(full-FLOP equivalent: 4 m^2 n + 2 m^3 per step, what the torch rows do; the symmetric kernel does "
          "3 m^2 n + m^3; the fraction uses the full count)")
    for line in checks:
        print(line)


def _triton_rows(args, device, stacks, rows, batched, full: int) -> list[str]:
    """Rows for newton_schulz(backend="triton") and its correctness, or a printed reason why not.

    Any failure (no triton, compile error, wrong shape) is reported and the other rows go on: one
    GPU session is short and must not be lost to a crash here.
    """
    try:
        from megatron_osp.optimizer import ns_triton
    except Exception as e:  # noqa: BLE001
        return [f"(triton rows skipped: {type(e).__name__}: {e})"]
    reason = ns_triton.unavailable_reason(next(iter(stacks.values())))
    if reason is not None:
        return [f"(triton rows skipped: {reason})"]
    done = sum(ns_flops(*s, args.ns_steps, symmetric=True) * x.shape[0] for s, x in stacks.items())
    quick = ns_triton.INTERPRET  # the interpreter is slow: time one pass
    try:
        t0 = time.perf_counter()
        batched("triton")  # compiles and autotunes
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t = _timeit(lambda: batched("triton"), device, warmup=0 if quick else 2, iters=1 if quick else 5)
        rows.append(("ours, triton symmetric kernel, batched by shape", t, full, done))
    except Exception as e:  # noqa: BLE001
        return [f"(triton rows failed: {type(e).__name__}: {e})"]
    lines = [f"\n# Triton symmetric kernel: first pass (compile + autotune) {first:.1f} s; correctness on one matrix "
             "of each shape (max abs difference of the NS output)",
             "| shape | triton vs torch (same dtype) | triton vs fp32 reference | torch vs fp32 reference |",
             "|---|---|---|---|"]
    for s, x in stacks.items():
        try:
            one = x[:1]
            kw = dict(steps=args.ns_steps, coefficients=args.coefficients)
            tri = newton_schulz(one, backend="triton", **kw).float()
            ref = newton_schulz(one, backend="torch", **kw).float()
            f32 = newton_schulz(one.float(), backend="torch", dtype=torch.float32, **kw)
            diff = lambda u, v: f"{(u - v).abs().max().item():.3g}"  # noqa: E731
            lines.append(f"| {s[0]}x{s[1]} | {diff(tri, ref)} | {diff(tri, f32)} | {diff(ref, f32)} |")
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {s[0]}x{s[1]} | failed: {type(e).__name__}: {e} | | |")
    return lines + _per_shape_rows(args, device, stacks, quick)


def _per_shape_rows(args, device, stacks, quick: bool) -> list[str]:
    """Torch vs the Triton kernel on each shape's batch: the default backend becomes "auto" only if
    the kernel is faster on every shape (issue 17), which the whole set's time cannot show."""
    kw = dict(steps=args.ns_steps, coefficients=args.coefficients)
    timing = dict(warmup=0 if quick else 2, iters=1 if quick else 5)
    lines = ["\n# Newton-Schulz per shape (each shape's whole batch, median ms)",
             "| shape | matrices | torch ms | triton ms | torch / triton |", "|---|---|---|---|---|"]
    faster = []
    for s, x in stacks.items():
        try:
            t_torch = _timeit(lambda: newton_schulz(x, backend="torch", **kw), device, **timing)
            t_tri = _timeit(lambda: newton_schulz(x, backend="triton", **kw), device, **timing)
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {s[0]}x{s[1]} | {x.shape[0]} | failed: {type(e).__name__}: {e} | | |")
            faster.append(False)
            continue
        faster.append(t_tri < t_torch)
        lines.append(f"| {s[0]}x{s[1]} | {x.shape[0]} | {t_torch * 1e3:.2f} | {t_tri * 1e3:.2f} | "
                     f"{t_torch / t_tri:.2f}x |")
    lines.append(f"(the Triton kernel is faster on {sum(faster)} of {len(faster)} shapes"
                 + ("; every shape: auto may become the default)" if all(faster) else ")"))
    return lines


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def step_times(args, device) -> None:
    from megatron.core.distributed import DistributedDataParallel

    from megatron_osp import parallel, platform
    from megatron_osp.models import build_gpt_model, transformer_config
    from megatron_osp.optimizer import OptimSettings, ddp_config, get_osp_optimizer

    _init_single_process()
    parallel.init_distributed(1, 1)
    platform.seed_everything(0)
    model_cfg = get_preset("test" if args.quick else args.preset)
    bf16 = device.type == "cuda"
    tcfg = transformer_config(model_cfg, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    core = build_gpt_model(model_cfg, tcfg, layout_independent_init=False)
    if device.type == "cuda":
        core = core.cuda()
    settings = {"muon": OptimSettings(name="muon", muon_lr=0.02, muon_ns_backend="auto"), "adam": OptimSettings(name="adam"),
                "muon_torch": OptimSettings(name="muon", muon_lr=0.02, muon_ns_backend="torch")}
    model = DistributedDataParallel(tcfg, ddp_config(settings["adam"]), core)
    gen = torch.Generator(device=device).manual_seed(1)
    grads = {n: torch.randn(p.shape, device=device, generator=gen) * 1e-3 for n, p in core.named_parameters()}

    def set_grads():
        for n, p in core.named_parameters():
            p.main_grad.copy_(grads[n])

    print(f"\n# Optimizer step on {'test' if args.quick else args.preset} ({sum(p.numel() for p in core.parameters()) / 1e6:.0f} M "
          f"parameters, {'bf16 params + fp32 master' if bf16 else 'fp32'}), device {_device_name(device)}, one process")
    rows = []
    builders = {
        "ours: Muon (hidden + EmbProj) + AdamW (embedding, output, norms), NS backend auto": lambda: get_osp_optimizer(
            settings["muon"], [model], bf16=bf16, log=None
        ),
        "ours: Muon as above, Newton-Schulz backend torch": lambda: get_osp_optimizer(
            settings["muon_torch"], [model], bf16=bf16, log=None
        ),
        "ours: AdamW everywhere (torch AdamW in Megatron's wrapper)": lambda: get_osp_optimizer(
            settings["adam"], [model], bf16=bf16, log=None
        ),
        "Megatron-Core Muon (TensorParallelMuon, default config) + AdamW": lambda: _megatron_muon(model, bf16),
    }
    if args.baseline_muon:  # an earlier muon.py (e.g. from git history), same settings as the first row
        builders[f"ours, Muon class from {os.path.basename(args.baseline_muon)} (baseline), NS auto"] = (
            lambda: _with_muon_class(args.baseline_muon, lambda: get_osp_optimizer(settings["muon"], [model], bf16=bf16, log=None)))
    for label, build in builders.items():
        try:
            opt = build()
        except Exception as e:  # noqa: BLE001 - an optional anchor; say why it is missing
            print(f"({label} skipped: {type(e).__name__}: {e})")
            continue

        def step():
            set_grads()
            opt.step()

        rows.append((label, _timeit(step, device, warmup=2, iters=args.iters)))
        if args.profile:
            try:
                _profile_step(label, step, device)
            except Exception as e:  # noqa: BLE001 - the timings above stand without it
                print(f"(profile of {label} failed: {type(e).__name__}: {e})")
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    set_t = _timeit(set_grads, device)
    print("| optimizer | step ms (median) | vs ours Muon |")
    print("|---|---|---|")
    ours = rows[0][1] if rows else float("nan")
    for label, t in rows:
        print(f"| {label} | {(t - set_t) * 1e3:.1f} | {(t - set_t) / (ours - set_t):.2f}x |")
    print(f"(each timing includes copying the gradients in, {set_t * 1e3:.1f} ms, which is subtracted)")
    parallel.shutdown()


def _with_muon_class(path: str, build):
    """build() with optimizer/builder.py constructing Muon from the module file at ``path`` (loaded as
    a sibling of optimizer/muon.py, so its relative imports resolve to today's package)."""
    import importlib.util

    import megatron_osp.optimizer.builder as builder

    spec = importlib.util.spec_from_file_location("megatron_osp.optimizer.muon_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current, builder.Muon = builder.Muon, module.Muon
    try:
        return build()
    finally:
        builder.Muon = current


def _profile_step(label: str, step, device, top: int = 12) -> None:
    """One step under torch.profiler: wall time, device-busy time, kernel count and the top kernels
    (where an optimizer step goes: Newton-Schulz's matmuls, elementwise passes, launch overhead)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        attr = "self_device_time_total"
    else:
        kernels = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
        busy = sum(e.self_cpu_time_total for e in events)
        attr = "self_cpu_time_total"
    print(f"\n## profile of one step: {label}")
    print(f"wall {wall * 1e3:.1f} ms (under the profiler), {'device busy' if device.type == 'cuda' else 'CPU self'} "
          f"{busy / 1e3:.1f} ms, {len(kernels)} {'kernels' if device.type == 'cuda' else 'top-level aten ops'}")
    print("| op | calls | self ms | share |")
    print("|---|---|---|---|")
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    for e in ranked:
        ms = getattr(e, attr) / 1e3
        print(f"| {e.key[:70]} | {e.count} | {ms:.2f} | {ms * 1e3 / max(busy, 1):.0%} |")


def _init_single_process() -> None:
    """A world of one on an in-process store: no TCP port to race other jobs on the machine for."""
    import torch.distributed as dist

    from megatron_osp import platform

    platform.setup_platform()
    if dist.is_initialized() or "RANK" in os.environ:
        return
    dist.init_process_group(platform.distributed_backend(), store=dist.HashStore(), rank=0, world_size=1)


def _megatron_muon(model, bf16: bool):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.muon import get_megatron_muon_optimizer

    cfg = OptimizerConfig(optimizer="muon", lr=0.02, min_lr=0.002, weight_decay=0.1, clip_grad=1.0, bf16=bf16,
                          params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=False)
    return get_megatron_muon_optimizer(cfg, [model])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cost-model", action="store_true", help="CPU cost model (NS FLOPs and bytes per rank)")
    ap.add_argument("--gpu", action="store_true", help="NS throughput and optimizer step times")
    ap.add_argument("--quick", action="store_true", help="tiny 'test' preset (smoke test; CPU is fine)")
    ap.add_argument("--preset", default="osp-1.4b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--qkv-split", default="qkv", choices=["qkv", "per_head", "none"])
    ap.add_argument("--coefficients", default="keller", choices=["keller", "polar_express"])
    ap.add_argument("--ns-steps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--baseline-muon", metavar="FILE",
                    help="--gpu: also time the step with the Muon class of this earlier muon.py")
    ap.add_argument("--step-only", action="store_true", help="--gpu: the optimizer step times only")
    ap.add_argument("--profile", action="store_true",
                    help="--gpu: also profile one step of each optimizer (kernels, device-busy time, top ops)")
    args = ap.parse_args(argv)
    if not (args.cost_model or args.gpu):
        ap.error("choose --cost-model and/or --gpu")
    rc = 0
    if args.cost_model:
        rc = cost_model(args)
    if args.gpu:
        cuda = torch.cuda.is_available() and not os.environ.get("MEGATRON_OSP_FORCE_CPU")
        if not cuda and not args.quick:
            print("--gpu needs a CUDA device (use --quick for a CPU smoke test)", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if not cuda:
            torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        if not args.step_only:
            ns_throughput(args, device)
        step_times(args, device)
    return rc


if __name__ == "__main__":
    sys.exit(main())
