"""Build the run's optimizer: AdamW, or OSP's Muon + AdamW, as one Megatron-Core optimizer.

Each torch optimizer is wrapped in Megatron-Core's FP32 / mixed-precision wrapper (main grads from
DDP, fp32 master weights for bf16, grad clipping over all model-parallel ranks) and the two are
chained, so the pretrain loop and the LR scheduler see a single ``MegatronOptimizer``. Muon runs on
logical matrices across the TP x DP domain of each pipeline stage (see muon.py); grad-norm clipping
is Megatron's, over the model-parallel (TP x PP) group, so the norm is global across stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
)

from megatron_osp.optimizer.logical import build_blocks
from megatron_osp.optimizer.muon import LR_SCALES, Muon
from megatron_osp.optimizer.newton_schulz import BACKENDS as NS_BACKENDS
from megatron_osp.optimizer.newton_schulz import coefficient_schedule
from megatron_osp.optimizer.routing import route_parameters
from megatron_osp.optimizer.zero.build import build_zero_optimizer
from megatron_osp.optimizer.zero.exchange import GRAD_DTYPES
from megatron_osp.optimizer.zero.relay import DELIVERIES
from megatron_osp.optimizer.zero.optimizer import stage_domain
from megatron_osp.optimizer.zero.ddp import OwnerDDP, finalize_owner_grads

OPTIMIZERS = ("adam", "muon", "muon_only")


@dataclass
class OptimSettings:
    # "adam" (AdamW everywhere) | "muon" (OSP: Muon for hidden matrices + EmbProj, AdamW for the
    # rest) | "muon_only" (the paper's ablation: no AdamW, vectors get a normalised update)
    name: str = "adam"
    lr: float = 3e-3  # AdamW peak LR
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    muon_lr: float | None = None  # Muon peak LR; None = lr
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    muon_coefficients: str = "keller"
    muon_qkv_split: str = "qkv"  # "qkv" | "per_head" | "none"
    muon_lr_scale: str = "rms"  # "rms": 0.2*sqrt(max(m,n)) (AdamW's update RMS) | "shape": sqrt(max(1,m/n))
    # Newton-Schulz: "torch" | "auto" (the symmetric Triton kernel on CUDA when it runs there and
    # passes its once-per-shape check, else torch; torch on CPU) | "triton" (an error where it cannot
    # run). See optimizer/newton_schulz.py. "auto" since the H200 measurement of 2026-12-04: the
    # kernel was faster on each of osp-1.4b's shapes (1.19-1.30x; docs/benchmarks.md).
    muon_ns_backend: str = "auto"
    # Whole-matrix ZeRO (optimizer/zero/): every Muon matrix and AdamW chunk has one owner in the
    # stage's TP x DP domain, which alone keeps its fp32 master and optimizer state; gradients go
    # straight to owners (no all-reduce), owners send updated parameters back. Checkpoints load at
    # any TP/PP/DP layout with distributed_optimizer=true.
    distributed_optimizer: bool = False
    # With distributed_optimizer: send a bucket's gradients while the backward pass still runs, and
    # wait for returned parameters in the next forward, module by module (same numbers either way).
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # With overlap_grad_reduce: each owner runs Newton-Schulz on a bucket's Muon matrices as soon as
    # the bucket's gradients are in (during the backward pass), assuming no clipping; a step whose
    # global norm does clip computes them again in the step. The same numbers either way.
    early_newton_schulz: bool = True
    grad_reduce_dtype: str = "fp32"  # "fp32" | "bf16": the dtype gradients travel to owners in
    # Parameter elements per communication bucket. Larger than Megatron DDP's 4e7 because a bucket's
    # gradients converge on the owners of its few whole matrices: at osp-8b TP=2 x DP=16 the busiest
    # link carries 16x a reduce-scatter's bytes with 4e7 buckets, 4.8x with 2e8 (tools/plan_memory.py,
    # docs/benchmarks.md); the rounds below keep the buffers small either way.
    bucket_size: int = 200_000_000
    # Elements an owner may receive (gradients) or send (parameters) in one all-to-all: larger
    # units go over several rounds of a bucket (optimizer/zero/rounds.py). None: the smaller of
    # bucket_size and 4e7 (zero/exchange.ROUND_ELEMS).
    round_size: int | None = None
    # How gradients reach owners and new values return (optimizer/zero/relay.py): "direct" (each
    # contributor straight to the owner: the fewest bytes, but the link into an owner carries the D
    # data-parallel copies of its matrices), "relay" (summed over data parallelism on the way:
    # about 1/(D - 1) more gradient bytes, links evenly loaded) or "auto" (relay from DP 8,
    # zero/relay.AUTO_MIN_DP).
    delivery: str = "auto"

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.muon_lr_scale not in LR_SCALES:
            raise ValueError(f"optimizer.muon_lr_scale must be one of {LR_SCALES}, got {self.muon_lr_scale!r}")
        if self.muon_qkv_split not in ("qkv", "per_head", "none"):
            raise ValueError(
                f"optimizer.muon_qkv_split must be 'qkv', 'per_head' or 'none', got {self.muon_qkv_split!r}"
            )
        if self.muon_ns_backend not in NS_BACKENDS:
            raise ValueError(
                f"optimizer.muon_ns_backend must be one of {NS_BACKENDS}, got {self.muon_ns_backend!r}"
            )
        coefficient_schedule(self.muon_coefficients, self.muon_ns_steps)  # names the bad value
        if self.delivery not in DELIVERIES:
            raise ValueError(f"optimizer.delivery must be one of {DELIVERIES}, got {self.delivery!r}")
        if self.grad_reduce_dtype not in GRAD_DTYPES:
            raise ValueError(
                f"optimizer.grad_reduce_dtype must be one of {tuple(GRAD_DTYPES)}, got {self.grad_reduce_dtype!r}"
            )


def ddp_config(settings: OptimSettings) -> DistributedDataParallelConfig:
    """The DDP wrapper's config: fp32 ``main_grad`` buffers in Megatron's plain (all-reduce) mode.

    Our distributed optimizer shards by whole units, not DDP's flat buffers, so DDP stays in its
    plain mode and ``OwnerDDP`` replaces its gradient sync (optimizer/zero/ddp.py).
    """
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False)


def ddp_wrapper(settings: OptimSettings):
    """(DDP class, finalize_model_grads function) for the run's optimizer settings."""
    if settings.distributed_optimizer:
        return OwnerDDP, finalize_owner_grads
    return DistributedDataParallel, finalize_model_grads


def _adam_state_init(opt, config=None):
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def _muon_state_init(opt, config=None):
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data, dtype=torch.float32)


def _group(params, wd_mult: float, **extra) -> dict:
    # The keys Megatron's load_state_dict matches saved param groups by, plus the schedule's.
    return {"params": params, "wd_mult": wd_mult, "lr_mult": 1.0, "is_expert_parallel": False,
            "is_decoupled_lr": False, **extra}


def _muon_domain():
    """The TP x DP process group of this pipeline stage and each member's (tp, dp) rank; (None, None)
    for a domain of one (Muon then runs without collectives)."""
    group, coords, _ = stage_domain()
    return (None, None) if group is None or len(coords) == 1 else (group, coords)


def build_muon(settings: OptimSettings, model_chunks, route, log=None) -> Muon:
    """Muon over the routed parameters: logical blocks from the model config, owners over TP x DP."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    matrices = [(n, p) for n, p in route.muon if p.ndim == 2]
    vectors = [(n, p) for n, p in route.muon if p.ndim != 2]
    for name, p in vectors:
        if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
            raise ValueError(
                f"optimizer.name={settings.name}: vector parameter {name!r} is split over tensor "
                f"parallelism; its normalised update would need a TP norm (not supported)"
            )
    matrix_ids = {id(p) for _, p in matrices}
    blocks, offset = [], 0
    for chunk in model_chunks:
        mine = [(n, p) for n, p in chunk.named_parameters() if id(p) in matrix_ids]
        blocks += build_blocks(mine, chunk, offset, tp_size, settings.muon_qkv_split)
        offset += len(mine)
    muon_lr = settings.muon_lr if settings.muon_lr is not None else settings.lr
    sched = {"max_lr": muon_lr, "min_lr": muon_lr * settings.min_lr_ratio}
    groups = [_group([p for _, p in matrices], 1.0, **sched)]
    if vectors:
        groups.append(_group([p for _, p in vectors], 0.0, **sched))
    group, coords = _muon_domain()
    muon = Muon(
        [g for g in groups if g["params"]],
        lr=muon_lr,
        momentum=settings.muon_momentum,
        weight_decay=settings.weight_decay,
        ns_steps=settings.muon_ns_steps,
        coefficients=settings.muon_coefficients,
        lr_scale=settings.muon_lr_scale,
        blocks=blocks,
        group=group,
        coords=coords,
        names=[n for n, _ in matrices] + [n for n, _ in vectors],
        ns_backend=settings.muon_ns_backend,
    )
    if log is not None:
        load = muon.ns_flops_per_rank
        mean = sum(load) / len(load)
        log(
            f"Muon: {len(blocks)} logical matrices, Newton-Schulz owners over {muon.world} TP x DP "
            f"rank(s); NS GFLOP per step per rank max {max(load) / 1e9:.3g}, mean {mean / 1e9:.3g} "
            f"(max/mean {max(load) / mean if mean else 1.0:.3f})"
        )
    return muon


def megatron_config(settings: OptimSettings, *, bf16: bool, distributed: bool = False,
                    overlap_param_gather: bool = False) -> OptimizerConfig:
    """Megatron's OptimizerConfig with ``settings``' AdamW hyper-parameters, clipping and dtype
    (``distributed``: Megatron's own DistributedOptimizer, as megatron_reference.py builds it)."""
    return OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.lr * settings.min_lr_ratio,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
        overlap_param_gather=overlap_param_gather,
    )


def get_osp_optimizer(settings: OptimSettings, model_chunks, *, bf16: bool = False, log=print):
    """A Megatron-Core optimizer over ``model_chunks`` as ``settings`` asks."""
    mcfg = megatron_config(settings, bf16=bf16)
    route = route_parameters(model_chunks, settings.name)
    if log is not None:
        log(f"optimizer routing (pipeline stage {parallel_state.get_pipeline_model_parallel_rank()}):\n"
            + route.table())
    if settings.distributed_optimizer:
        return build_zero_optimizer(settings, model_chunks, route, mcfg, log=log)

    def wrap(opt, init):
        if bf16:
            return Float16OptimizerWithFloat16Params(opt, mcfg, None, init)
        return FP32Optimizer(opt, mcfg, init)

    parts = []
    adam_groups = [
        _group([p for _, p in route.adamw_decay], 1.0),
        _group([p for _, p in route.adamw_no_decay], 0.0),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    if adam_groups:
        adam = torch.optim.AdamW(
            adam_groups,
            lr=settings.lr,
            betas=(settings.adam_beta1, settings.adam_beta2),
            eps=settings.adam_eps,
            weight_decay=settings.weight_decay,
        )
        parts.append(wrap(adam, _adam_state_init))
    if route.muon:
        parts.append(wrap(build_muon(settings, model_chunks, route, log), _muon_state_init))
    return ChainedOptimizer(parts)
