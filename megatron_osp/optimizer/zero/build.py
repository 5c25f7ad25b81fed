"""Build the whole-matrix ZeRO optimizer for a pipeline stage's model chunks (OwnerDDP-wrapped)."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_osp.models.layout import layer_offset, to_global_name, unwrap
from megatron_osp.optimizer.zero.ddp import attach
from megatron_osp.optimizer.zero.exchange import GRAD_DTYPES, Exchange
from megatron_osp.optimizer.zero.optimizer import ZeroOptimizer, stage_domain
from megatron_osp.optimizer.zero.units import ADAM, MUON, VECTOR, adam_units, assign_owners, muon_units, set_costs


def param_groups(settings, route) -> tuple[list[dict], dict[int, tuple[str, int]]]:
    """The scheduler-visible groups (same list on every stage) and each parameter's (kind, group)."""
    muon_lr = settings.muon_lr if settings.muon_lr is not None else settings.lr
    common = {"lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False}
    adam = {"lr": settings.lr, "betas": (settings.adam_beta1, settings.adam_beta2), "eps": settings.adam_eps}
    muon = {"lr": muon_lr, "max_lr": muon_lr, "min_lr": muon_lr * settings.min_lr_ratio}
    specs = []  # (kind, group dict, params)
    if settings.name in ("adam", "muon"):
        specs.append((ADAM, {**adam, "wd_mult": 1.0, "weight_decay": settings.weight_decay}, route.adamw_decay))
        specs.append((ADAM, {**adam, "wd_mult": 0.0, "weight_decay": 0.0}, route.adamw_no_decay))
    if settings.name in ("muon", "muon_only"):
        matrices = [(n, p) for n, p in route.muon if p.ndim == 2]
        specs.append((MUON, {**muon, "wd_mult": 1.0, "weight_decay": settings.weight_decay}, matrices))
    if settings.name == "muon_only":
        vectors = [(n, p) for n, p in route.muon if p.ndim != 2]
        specs.append((VECTOR, {**muon, "wd_mult": 0.0, "weight_decay": 0.0}, vectors))
    groups, kinds = [], {}
    for g, (kind, hyper, named) in enumerate(specs):
        groups.append({"params": [p for _, p in named], **common, **hyper})
        for _, p in named:
            kinds[id(p)] = (kind, g)
    return groups, kinds


def stage_units(model_chunks, kinds, tp_size: int, qkv_split: str, ns_steps: int = 5, offsets=None):
    """The stage's flat parameter list (chunk by chunk, each in forward order) and its units.

    ``offsets``: each chunk's first global layer number (default: from the parallel state). A
    planner passes them for chunks built outside a real layout (tools/plan_memory.py, on meta
    tensors shaped like one TP rank's shards).
    """
    params, units = [], []
    for c, chunk in enumerate(model_chunks):
        core = unwrap(chunk)
        offset = layer_offset(core) if offsets is None else offsets[c]
        named = getattr(core, "named_parameters_in_forward_order", core.named_parameters)()
        for name, p in named:
            if not p.requires_grad:
                continue
            index = len(params)
            params.append(p)
            kind, group = kinds[id(p)]
            if kind == MUON:
                units += muon_units([(name, p)], core, index, group, tp_size, qkv_split, offset=offset)
            else:
                units += adam_units(name, to_global_name(name, offset), p, core, index, group, tp_size, kind)
    set_costs(units, ns_steps)
    return params, units


def build_zero_optimizer(settings, model_chunks, route, mcfg, log=None) -> ZeroOptimizer:
    for chunk in model_chunks:
        core = unwrap(chunk)
        if getattr(core, "share_embeddings_and_output_weights", False):
            raise ValueError("optimizer.distributed_optimizer=true needs untied embedding and output weights")
        if not hasattr(chunk, "exchange"):
            raise TypeError("optimizer.distributed_optimizer=true: wrap the model chunks in OwnerDDP (ddp_wrapper)")
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    groups, kinds = param_groups(settings, route)
    for name, p in route.muon:
        if p.ndim != 2 and getattr(p, "tensor_model_parallel", False) and tp_size > 1:
            raise ValueError(f"optimizer.name={settings.name}: vector parameter {name!r} is split over tensor "
                             "parallelism; its normalised update would need a TP norm (not supported)")
    params, units = stage_units(model_chunks, kinds, tp_size, settings.muon_qkv_split, settings.muon_ns_steps)
    group, coords, rank = stage_domain()
    load = assign_owners(units, coords)
    dp_size = parallel_state.get_data_parallel_world_size() if dist.is_initialized() else 1
    exchange = Exchange(
        params, units, coords, rank, group,
        dp_size=dp_size,
        bucket_elems=settings.bucket_size,
        round_elems=settings.round_size,
        grad_dtype=GRAD_DTYPES[settings.grad_reduce_dtype],
        overlap_grad=settings.overlap_grad_reduce,
        overlap_param=settings.overlap_param_gather,
        delivery=settings.delivery,
    )
    attach(model_chunks, exchange)
    opt = ZeroOptimizer(groups, units, exchange, mcfg, settings)
    opt.load_per_rank = load
    if log is not None:
        gib = [b / 2**30 for b, _ in load]
        log(f"distributed optimizer: {len(units)} units over {len(coords)} TP x DP rank(s), "
            f"{len(exchange.buckets)} bucket(s) in {sum(len(b.grad_rounds) for b in exchange.buckets)} gradient / "
            f"{sum(len(b.param_rounds) for b in exchange.buckets)} parameter all-to-all round(s), "
            f"{'relayed' if exchange.relay else 'direct'} delivery; "
            f"fp32 masters + state per rank max {max(gib):.3g} GiB, "
            f"mean {sum(gib) / len(gib):.3g} GiB")
    return opt

