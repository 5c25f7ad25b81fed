"""Build the run's optimizer: AdamW, or OSP's Muon + AdamW, as one Megatron-Core optimizer.

Each torch optimizer is wrapped in Megatron-Core's FP32 / mixed-precision wrapper (main grads from
DDP, fp32 master weights for bf16, grad clipping over all model-parallel ranks) and the two are
chained, so the pretrain loop and the LR scheduler see a single ``MegatronOptimizer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
)

from megatron_osp.optimizer.muon import Muon
from megatron_osp.optimizer.routing import logical_blocks, route_parameters

OPTIMIZERS = ("adam", "muon")


@dataclass
class OptimSettings:
    name: str = "adam"  # "adam" (AdamW everywhere) | "muon" (OSP: Muon for hidden matrices)
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
    distributed_optimizer: bool = False  # ZeRO-1: shard optimizer state over data-parallel ranks

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")


def ddp_config(settings: OptimSettings) -> DistributedDataParallelConfig:
    """The DDP wrapper's config; it must agree with the optimizer on whether state is sharded."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=settings.distributed_optimizer
    )


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


def get_osp_optimizer(settings: OptimSettings, model_chunks, *, bf16: bool = False, log=print):
    """A Megatron-Core optimizer over ``model_chunks`` as ``settings`` asks."""
    tconfig = model_chunks[0].config
    mcfg = OptimizerConfig(
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
        use_distributed_optimizer=False,
    )
    if settings.distributed_optimizer:
        raise ValueError(
            "optimizer.distributed_optimizer=true is not supported yet (ZeRO-1 sharding of the "
            "optimizer state); set it to false"
        )
    route = route_parameters(model_chunks, settings.name)
    if settings.name == "muon" and parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise ValueError(
            "optimizer.name=muon with parallel.tensor_parallel_size > 1 needs the distributed Muon "
            "(not built yet); this Muon orthogonalises whole matrices, so use tensor_parallel_size=1"
        )
    if log is not None:
        log(f"optimizer routing (pipeline stage {parallel_state.get_pipeline_model_parallel_rank()}):\n"
            + route.table())

    def wrap(opt, init):
        if bf16:
            return Float16OptimizerWithFloat16Params(opt, mcfg, None, init)
        return FP32Optimizer(opt, mcfg, init)

    parts = []
    adam_groups = [
        {"params": [p for _, p in route.adamw_decay], "wd_mult": 1.0},
        {"params": [p for _, p in route.adamw_no_decay], "wd_mult": 0.0},
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
        muon_lr = settings.muon_lr if settings.muon_lr is not None else settings.lr
        muon = Muon(
            [
                {
                    "params": [p for _, p in route.muon],
                    "blocks": [logical_blocks(n, tconfig, settings.muon_qkv_split) for n, _ in route.muon],
                    "max_lr": muon_lr,
                    "min_lr": muon_lr * settings.min_lr_ratio,
                    "wd_mult": 1.0,
                }
            ],
            lr=muon_lr,
            momentum=settings.muon_momentum,
            weight_decay=settings.weight_decay,
            ns_steps=settings.muon_ns_steps,
            coefficients=settings.muon_coefficients,
        )
        parts.append(wrap(muon, _muon_state_init))
    return ChainedOptimizer(parts)
