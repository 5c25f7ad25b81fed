#!/usr/bin/env python
"""Where OSP's forward + backward costs more than Adam's: the arms apart, and the norms alone.

The training-step bench (tools/bench_step.py) measured OSP's forward + backward ~11% slower than the
Adam arm's at the 1.4B shape on one H200, which EmbProj's FLOPs (0.6%) do not explain. This tool
separates the model's two differences, on the same preset, in the same run:

1. forward + backward of one micro-batch (loss, backward; no optimizer) for the arms: adam
   (RMSNorm, no EmbProj: the baseline), ssnorm (SSNorm only), embproj (EmbProj only), osp (both),
   and ssnorm-fused / osp-fused (the same with model.ssnorm_kernel=fused), median ms and the ratio
   to the adam arm;
2. the norms alone, forward + backward at the activation shape (micro-batch x seq, hidden), times
   the number of norms in the model: torch's RMSNorm (what the adam arm uses without Apex/TE),
   SSNorm (model.ssnorm_kernel=eager) and FusedSSNorm (=fused: the same formula through
   torch.nn.functional.rms_norm, the scalar gain broadcast as the weight);
3. with --profile, one forward + backward of the adam, osp and osp-fused arms under torch.profiler
   (top ops).

    python tools/bench_fwd_bwd.py                       # osp-1.4b, micro-batch 4, on one GPU
    python tools/bench_fwd_bwd.py --quick               # tiny preset, CPU is fine (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from bench_muon import _device_name, _init_single_process, _profile_step, _timeit  # noqa: E402
from megatron_osp.models.presets import get_preset  # noqa: E402

ARMS = {  # name: (normalization, embedding_projection, ssnorm_kernel)
    "adam": ("rmsnorm", False, "eager"),
    "ssnorm": ("ssnorm", False, "eager"),
    "embproj": ("rmsnorm", True, "eager"),
    "osp": ("ssnorm", True, "eager"),
    "ssnorm-fused": ("ssnorm", False, "fused"),
    "osp-fused": ("ssnorm", True, "fused"),
}
PROFILED = ("adam", "osp", "osp-fused")


def norms(args, device, dtype, model_cfg) -> list[str]:
    from megatron_osp.models.ssnorm import FusedSSNorm, SSNorm

    tokens, hidden = args.micro_batch * model_cfg.seq_length, model_cfg.hidden_size
    count = 2 * model_cfg.num_layers + 1  # two per layer and the final one
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen)
    grad = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen)
    rms = torch.nn.RMSNorm(hidden, eps=1e-5, device=device, dtype=dtype)
    variants = {
        "torch.nn.RMSNorm (the adam arm's norm)": rms,
        "SSNorm (ssnorm_kernel=eager)": SSNorm(SimpleCfg(dtype), hidden, eps=1e-5).to(device),
        "FusedSSNorm (ssnorm_kernel=fused)": FusedSSNorm(SimpleCfg(dtype), hidden, eps=1e-5).to(device),
    }
    outs = {}
    lines = [f"\n# Norms alone: forward + backward at ({tokens}, {hidden}) {str(dtype).replace('torch.', '')}, "
             f"x {count} norms per micro-batch, device {_device_name(device)}",
             "| norm | ms per norm | ms per micro-batch | vs torch RMSNorm | max abs diff vs SSNorm |", "|---|---|---|---|---|"]
    times = {}
    for label, fn in variants.items():
        xi = x.detach().clone().requires_grad_(True)

        def run():
            xi.grad = None
            y = fn(xi)
            y.backward(grad)
            return y

        outs[label] = run().detach()
        times[label] = _timeit(run, device, warmup=3, iters=args.iters)
    base = times["torch.nn.RMSNorm (the adam arm's norm)"]
    ref = outs["SSNorm (ssnorm_kernel=eager)"].float()
    for label, t in times.items():
        diff = (outs[label].float() - ref).abs().max().item()
        lines.append(f"| {label} | {t * 1e3:.3f} | {t * count * 1e3:.2f} | {t / base:.2f}x | {diff:.3g} |")
    return lines


@dataclasses.dataclass
class SimpleCfg:
    params_dtype: torch.dtype
    sequence_parallel: bool = False


def bench_model(cfg, dtype, device) -> torch.nn.Module:
    """The model as training holds it: under bf16 in Megatron's Float16Module, which casts every
    parameter to bf16 (training/model_setup.build_chunks). Built bare, Megatron's torch RMSNorm keeps
    fp32 weights, and torch's rms_norm then skips its fused kernel for bf16 activations (the adam arm
    of the first H200 run of this tool, 2026-12-04, was timed so)."""
    from megatron.core.transformer.module import Float16Module

    from megatron_osp.models import build_gpt_model, transformer_config

    tconfig = transformer_config(cfg, params_dtype=dtype)
    model = build_gpt_model(cfg, tconfig, layout_independent_init=False).to(device)
    return Float16Module(tconfig, model) if dtype == torch.bfloat16 else model


def arms(args, device, dtype, base_cfg) -> list[str]:
    lines = [f"\n# Forward + backward of one micro-batch ({args.micro_batch} x {base_cfg.seq_length}), "
             f"{base_cfg.num_layers} layers x {base_cfg.hidden_size}, device {_device_name(device)}",
             "| arm | normalization | SSNorm kernel | EmbProj | params | ms (median) | vs adam |",
             "|---|---|---|---|---|---|---|"]
    times = {}
    for name in args.arms.split(","):
        norm, embproj, kernel = ARMS[name]
        cfg = dataclasses.replace(base_cfg, normalization=norm, embedding_projection=embproj, ssnorm_kernel=kernel)
        model = bench_model(cfg, dtype, device)
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (args.micro_batch, cfg.seq_length)
        tokens = torch.randint(0, cfg.vocab_size, shape, device=device, generator=gen)
        labels = torch.randint(0, cfg.vocab_size, shape, device=device, generator=gen)
        positions = torch.arange(cfg.seq_length, device=device).expand(shape)

        def step():
            model.zero_grad(set_to_none=True)
            model(tokens, positions, None, labels=labels).float().mean().backward()

        times[name] = _timeit(step, device, warmup=3, iters=args.iters)
        params = sum(p.numel() for p in model.parameters())
        lines.append(f"| {name} | {norm} | {kernel if norm == 'ssnorm' else '-'} | {'yes' if embproj else 'no'} | "
                     f"{params:,} | {times[name] * 1e3:.1f} | "
                     f"{times[name] / times.get('adam', times[name]):.3f}x |")
        if args.profile and name in PROFILED:
            print("\n".join(lines))
            lines = []
            _profile_step(f"forward + backward, {name} arm", step, device, top=15)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="osp-1.4b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, same widths")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10, help="timed repetitions (median)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--profile", action="store_true", help=f"also profile the {', '.join(PROFILED)} arms")
    ap.add_argument("--quick", action="store_true", help="tiny 'test' preset, micro-batch 2 (CPU is fine)")
    args = ap.parse_args(argv)
    bad = [a for a in args.arms.split(",") if a not in ARMS]
    if bad:
        ap.error(f"--arms: unknown {bad}; choose from {sorted(ARMS)}")
    from megatron_osp import parallel, platform

    cuda = torch.cuda.is_available() and not os.environ.get("MEGATRON_OSP_FORCE_CPU")
    if not cuda and not args.quick:
        print("needs a CUDA device (use --quick for a CPU smoke test)", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.quick:
        args.micro_batch = min(args.micro_batch, 2)
    _init_single_process()
    parallel.init_distributed(1, 1)
    platform.seed_everything(0)
    cfg = get_preset("test" if args.quick else args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    print("\n".join(norms(args, device, dtype, cfg)))
    print("\n".join(arms(args, device, dtype, cfg)))
    parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
