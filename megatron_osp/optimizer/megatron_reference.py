"""Megatron-Core's own DistributedOptimizer (ZeRO-1 over DDP's flat buffers) + Adam, as a reference.

The Adam baseline users know from Megatron-LM: DDP with ``use_distributed_optimizer=True``
reduce-scatters each gradient bucket so every DP rank holds 1/DP of the flat buffer, keeps fp32
masters and Adam moments for that shard only, steps it, and all-gathers the updated parameters.
:func:`build_megatron_distopt` builds exactly that from Megatron-Core's public pieces
(``DistributedDataParallel`` + ``get_megatron_optimizer``); on CPU it first installs
:func:`megatron_osp.platform.patch_megatron_distributed_optimizer_for_cpu`.

:func:`train_reference` is a small driver for tests and measurements: N steps of Megatron's schedule
(``get_forward_backward_func()``, as the pretrain loop runs it) on synthetic tokens that depend only
on the seed and the global batch, so any DP size sees the same global batches. It reports the
DP-mean loss per step, the final logical weights, the bytes of fp32 master weights + optimizer state
this rank holds, and the bytes this rank sends during one step (``CommCounter``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_osp import platform
from megatron_osp.models.layout import unwrap
from megatron_osp.optimizer.builder import OptimSettings, megatron_config


def megatron_optimizer_config(settings: OptimSettings, *, bf16: bool, distributed: bool, overlap: bool):
    """Megatron's OptimizerConfig for Adam(W) with ``settings``' hyper-parameters."""
    if settings.name != "adam":
        raise ValueError(f"optimizer.name={settings.name!r}: the Megatron-Core reference is Adam only")
    return megatron_config(settings, bf16=bf16, distributed=distributed,
                           overlap_param_gather=distributed and overlap)


def _as_chunks(model_or_builder) -> list[torch.nn.Module]:
    model = model_or_builder
    if callable(model) and not isinstance(model, torch.nn.Module):
        model = model()
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not chunks or not all(isinstance(c, torch.nn.Module) for c in chunks):
        raise TypeError(
            f"build_megatron_distopt needs a module, a list of modules or a builder of them, got {model!r}"
        )
    return chunks


def build_megatron_distopt(
    model_chunks_builder,
    tconfig,
    opt_settings: OptimSettings,
    overlap: bool,
    bucket_size: int | None = None,
    *,
    distributed: bool = True,
):
    """Wrap the model chunk(s) in Megatron DDP and build Megatron's optimizer over them.

    ``model_chunks_builder``: a module, a list of modules, or a callable returning either (the
    unwrapped GPT model; with ``tconfig.bf16`` it is wrapped in ``Float16Module`` here).
    ``overlap`` turns on both ``overlap_grad_reduce`` and ``overlap_param_gather``; ``bucket_size``
    (elements) is DDP's bucket size (None: Megatron's default). With ``distributed=False`` the same
    code builds plain DDP (all-reduce) + ``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params``,
    the single-copy reference. Returns ``(ddp_chunks, optimizer)``.
    """
    if platform.is_cpu():
        platform.patch_megatron_distributed_optimizer_for_cpu()
    bf16 = bool(tconfig.bf16)
    chunks = _as_chunks(model_chunks_builder)
    if bf16:
        chunks = [Float16Module(tconfig, c) for c in chunks]
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        overlap_param_gather=distributed and overlap,
        use_distributed_optimizer=distributed,
        bucket_size=bucket_size,
    )
    ddp_chunks = [
        DistributedDataParallel(tconfig, ddp_cfg, c, disable_bucketing=(i > 0)) for i, c in enumerate(chunks)
    ]
    tconfig.no_sync_func = ddp_chunks[0].no_sync if len(ddp_chunks) == 1 else [m.no_sync for m in ddp_chunks]
    tconfig.finalize_model_grads_func = finalize_model_grads
    mcfg = megatron_optimizer_config(opt_settings, bf16=bf16, distributed=distributed, overlap=overlap)
    optimizer = get_megatron_optimizer(mcfg, ddp_chunks)
    return ddp_chunks, optimizer


# ---------------------------------------------------------------------------------------- measuring
def optimizer_state_bytes(optimizer) -> dict[str, int]:
    """Bytes of what the inner torch optimizer(s) step on this rank.

    ``master``: the tensors in its param groups (fp32 shards / fp32 copies; for fp32 models without
    the distributed optimizer these are the model's own parameters); ``state``: every tensor in its
    state (Adam's exp_avg and exp_avg_sq; a 0-dim ``step`` counts too, 4-8 bytes per tensor).
    """
    from megatron_osp.optimizer.zero.optimizer import ZeroOptimizer

    if isinstance(optimizer, ZeroOptimizer):
        master = sum(t.numel() * t.element_size() for t in optimizer.masters.values())
        state = sum(t.numel() * t.element_size() for st in optimizer.state_tensors.values() for t in st.values())
        return {"master": master, "state": state, "total": master + state}
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    master = state = 0
    for opt in inner:
        if opt is None:
            continue
        for group in opt.param_groups:
            master += sum(p.numel() * p.element_size() for p in group["params"])
        for st in opt.state.values():
            state += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
    return {"master": master, "state": state, "total": master + state}


def buffer_numels(ddp_chunks) -> dict[str, int]:
    """Parameters in DDP's buffers (``params``) and the buffers' padded sizes (``padded``)."""
    params = padded = 0
    for chunk in ddp_chunks:
        for buf in chunk.buffers:
            params += sum(p.numel() for p in buf.params)
            padded += buf.grad_data.numel()
    return {"params": params, "padded": padded}


@dataclass
class DriverSettings:
    """What :func:`train_reference` trains: the test model preset and a synthetic global batch."""

    preset: str = "test"
    steps: int = 5
    global_batch_size: int = 8
    micro_batch_size: int = 2
    seed: int = 1234
    lr: float = 3e-3
    clip_grad: float = 1.0
    adam_eps: float = OptimSettings.adam_eps  # equivalence tests raise it (megatron_osp/testing/equivalence.py)
    count_step: int = 2  # the step (0-based) whose bytes are counted
    model_overrides: dict | None = None


def synthetic_batch(step: int, settings: DriverSettings, vocab_size: int, seq_length: int) -> torch.Tensor:
    """The global batch of ``step``: [global_batch_size, seq_length + 1] token ids < vocab_size."""
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    return torch.randint(0, vocab_size, (settings.global_batch_size, seq_length + 1), generator=gen)


def micro_batches(tokens: torch.Tensor, dp_rank: int, dp_size: int, mbs: int) -> list[dict]:
    """This DP rank's contiguous share of a global batch, as micro-batches of ``mbs`` sequences."""
    per_rank = tokens.shape[0] // dp_size
    mine = tokens[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    seq = tokens.shape[1] - 1
    pos = torch.arange(seq).unsqueeze(0)
    return [
        {"tokens": mine[i : i + mbs, :-1], "labels": mine[i : i + mbs, 1:], "position_ids": pos.expand(mbs, seq)}
        for i in range(0, per_rank, mbs)
    ]


def _loss(output_tensor):
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = {k: v.to(platform.device()) for k, v in next(data_iterator).items()}
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return out, _loss


def forward_backward(ddp_chunks, micro_batches: list[dict], seq_length: int, micro_batch_size: int) -> list[dict]:
    """One global batch (this rank's micro-batches) through Megatron's schedule, grads reduced."""
    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(micro_batches),
        model=ddp_chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )


def build_ours(model_chunks_builder, tconfig, opt_settings: OptimSettings, overlap: bool, bucket_size: int | None):
    """The same model under our whole-matrix ZeRO (optimizer/zero/) instead of Megatron's
    DistributedOptimizer: OwnerDDP chunks and ``get_osp_optimizer`` with distributed_optimizer=true."""
    import dataclasses

    from megatron_osp.optimizer.builder import ddp_config, get_osp_optimizer
    from megatron_osp.optimizer.zero.ddp import OwnerDDP, finalize_owner_grads

    settings = dataclasses.replace(
        opt_settings, distributed_optimizer=True, overlap_grad_reduce=overlap, overlap_param_gather=overlap,
        bucket_size=bucket_size or opt_settings.bucket_size,
    )
    chunks = _as_chunks(model_chunks_builder)
    if tconfig.bf16:
        chunks = [Float16Module(tconfig, c) for c in chunks]
    ddp_chunks = [OwnerDDP(tconfig, ddp_config(settings), c) for c in chunks]
    tconfig.no_sync_func = ddp_chunks[0].no_sync if len(ddp_chunks) == 1 else [m.no_sync for m in ddp_chunks]
    tconfig.finalize_model_grads_func = finalize_owner_grads
    return ddp_chunks, get_osp_optimizer(settings, ddp_chunks, bf16=bool(tconfig.bf16), log=None)


def build_reference(settings: DriverSettings, *, distributed: bool, overlap: bool, bf16: bool,
                    bucket_size: int | None, impl: str = "megatron"):
    """Parallel state (DP = world, TP = PP = 1), seeds, the preset's GPT model, Megatron DDP and
    optimizer (``impl="ours"``: our whole-matrix ZeRO on the same model and data), as
    :func:`train_reference` uses them. Returns ``(model_config, ddp_chunks, optimizer)``."""
    from megatron_osp import parallel
    from megatron_osp.models.gpt import build_gpt_model, transformer_config
    from megatron_osp.models.presets import get_preset

    s = settings
    parallel.init_distributed(1, 1)
    platform.seed_everything(s.seed)
    model_cfg = get_preset(s.preset, **(s.model_overrides or {}))
    tconfig = transformer_config(model_cfg, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    opt = OptimSettings(name="adam", lr=s.lr, clip_grad=s.clip_grad, adam_eps=s.adam_eps)
    if impl == "ours":
        build = lambda: build_gpt_model(model_cfg, tconfig, seed=s.seed).to(platform.device())  # noqa: E731
        return (model_cfg, *build_ours(build, tconfig, opt, overlap, bucket_size))
    ddp_chunks, optimizer = build_megatron_distopt(
        lambda: build_gpt_model(model_cfg, tconfig, seed=s.seed).to(platform.device()), tconfig, opt, overlap,
        bucket_size,
        distributed=distributed,
    )
    return model_cfg, ddp_chunks, optimizer


def train_reference(
    rank: int,
    world_size: int,
    *,
    distributed: bool = True,
    overlap: bool = False,
    bf16: bool = False,
    bucket_size: int | None = None,
    settings: DriverSettings | None = None,
    impl: str = "megatron",
) -> dict:
    """Train ``settings.steps`` steps at DP=world_size (TP=PP=1); run under ``run_distributed``.

    Returns ``losses`` (DP-mean per step), ``weights`` (logical weights after the last step, as
    fp32, rank 0 only), ``state_bytes`` (:func:`optimizer_state_bytes` on this rank), ``comm`` (bytes this
    rank sent during step ``count_step``, zero_grad to optimizer step: total, by op, calls; None if
    there is no such step), ``buffer`` (:func:`buffer_numels`),
    ``grad_norms`` (before clipping) and ``max_update`` (largest change of any weight element).
    """
    from megatron_osp.models.layout import gather_logical
    from megatron_osp.testing.comm_count import CommCounter

    s = settings or DriverSettings()
    if s.global_batch_size % (world_size * s.micro_batch_size):
        raise ValueError(
            f"DriverSettings.global_batch_size={s.global_batch_size} is not divisible by DP={world_size} x "
            f"micro_batch_size={s.micro_batch_size}"
        )
    model_cfg, ddp_chunks, optimizer = build_reference(
        s, distributed=distributed, overlap=overlap, bf16=bf16, bucket_size=bucket_size, impl=impl
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=s.lr, max_lr=s.lr, min_lr=s.lr, lr_warmup_steps=0, lr_decay_steps=s.steps,
        lr_decay_style="constant", start_wd=optimizer.config.weight_decay, end_wd=optimizer.config.weight_decay,
        wd_incr_steps=s.steps, wd_incr_style="constant",
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    core = unwrap(ddp_chunks[0])
    initial = {n: p.detach().float().clone() for n, p in core.named_parameters()}  # this rank's copy
    losses, grad_norms, comm = [], [], None
    for step in range(s.steps):
        micro = micro_batches(synthetic_batch(step, s, model_cfg.vocab_size, model_cfg.seq_length),
                               dp_rank, dp_size, s.micro_batch_size)
        counter = CommCounter() if step == s.count_step else contextlib.nullcontext()
        with counter:
            for chunk in ddp_chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            outputs = forward_backward(ddp_chunks, micro, model_cfg.seq_length, s.micro_batch_size)
            ok, grad_norm, _ = optimizer.step()
        if isinstance(counter, CommCounter):
            comm = {"total": counter.bytes_sent, "by_op": dict(counter.by_op), "calls": list(counter.calls)}
        if not ok:
            raise RuntimeError(f"step {step}: Megatron's optimizer skipped the update")
        scheduler.step(increment=1)
        loss = torch.stack([o["lm loss"].float() for o in outputs]).mean().reshape(1).to(platform.device())
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        losses.append(loss.item() / dp_size)
        grad_norms.append(float(grad_norm))
    # With overlap_param_gather the last update reaches the model in the next forward: gather now.
    for chunk in ddp_chunks:
        if chunk.ddp_config.use_distributed_optimizer:
            chunk.start_param_sync(force_sync=True)
    if hasattr(optimizer, "finish_param_sync"):  # ours (impl="ours")
        optimizer.finish_param_sync()
    max_update = max((p.detach().float() - initial[n]).abs().max().item() for n, p in core.named_parameters())
    weights = gather_logical(core, dict(core.named_parameters()))
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "max_update": max_update,
        "weights": {k: v.detach().float().cpu().clone() for k, v in weights.items()} if dist.get_rank() == 0 else {},
        "state_bytes": optimizer_state_bytes(optimizer),
        "comm": comm,
        "buffer": buffer_numels(ddp_chunks),
    }
