"""Per-rank memory and bytes sent per step at a TP x PP x DP layout, before any GPU is allocated.

Our figures come from the code the whole-matrix ZeRO optimizer runs (optimizer/zero/): every
pipeline stage's model chunks are built by ``build_gpt_model`` at TP=1 on the meta device (nothing
allocated, nothing initialised), each parameter is replaced by a meta tensor shaped like ONE TP
rank's shard (partition_dim divided by T, the TP attributes copied), routed with
``route_parameters``, cut into units by ``stage_units``, owned by ``assign_owners`` over the stage's
T x D domain and exchanged by an ``Exchange`` built for every rank of the domain (``plan_bytes``).

Per rank (GiB):
- params: the local shard, in the parameters' dtype (bf16 by default);
- grads: Megatron DDP's fp32 ``main_grad`` buffer, the full local size (no padding: OwnerDDP keeps
  DDP in its plain, non-distributed-optimizer mode);
- masters / state: fp32 master (4 B/elem) and optimizer state (AdamW 8, Muon/vector momentum 4) of
  the units the rank owns;
- owner grads: the fp32 reduced gradient of every owned unit (``Exchange.grads``, kept for the step);
- comm buffers: the exchange's peak send + receive buffers, ``Exchange.buffer_bytes`` (at most
  ``exchange.WINDOW`` all-to-alls in flight per direction, each round's owner buffers capped at
  ``optimizer.round_size`` elements; a relayed round is two all-to-alls, relay.py); the largest
  single all-to-all beside it (``largest_round``);
- activations: see :func:`activation_bytes`;
- sent: bytes this rank sends to other ranks per step (gradients + parameters), ``plan_bytes``;
- busiest link: per step, the bytes of each all-to-all's busiest rank (the most it sends or
  receives), summed over the all-to-alls (``link_bytes``): what bounds the exchange's time when a
  round's data converge on few owners (direct delivery; relayed delivery spreads them, for more
  bytes sent). Megatron's reduce-scatter/all-gather spread evenly: its sent bytes.

Megatron-Core's DistributedOptimizer + Adam at the same layout, by formula over the same local
parameter count N: params N x param bytes, grads 4N, masters 4N/D, Adam state 8N/D, no extra comm
buffers (reduce-scatter and all-gather work in place in DDP's buffers), sent per step
(D-1)/D x (4 + param bytes) x N (fp32 reduce-scatter + all-gather of the params). Its buffer padding
(a few elements per bucket) is ignored.

Not counted anywhere: CUDA context and allocator fragmentation, temporary buffers inside a step
(Newton-Schulz work, Adam's temporaries, the logits' backward), TP/PP activation communication, and
the early Newton-Schulz outputs (optimizer.early_newton_schulz: 2 B per owned Muon element in bf16,
made during the backward pass as activations are freed, kept until the step).
"""

from __future__ import annotations

import dataclasses
import gc
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from megatron_osp.models.config import ModelConfig
from megatron_osp.models.layout import partition_dim

GIB = float(1 << 30)
ATTENTIONS = ("unfused", "flash")
RECOMPUTES = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int = 1  # virtual pipeline chunks per stage (interleaved 1F1B)
    micro_batch: int = 1
    seq: int | None = None  # None: the model's seq_length
    recompute: str = "none"
    sequence_parallel: bool = False
    attention: str = "unfused"  # "unfused" (local spec, as on CPU) | "flash" (estimate, see below)
    params_dtype: torch.dtype = torch.bfloat16
    microbatches: int | None = None  # per step per DP rank; None: enough to fill the pipeline


def check_layout(model: ModelConfig, layout: Layout) -> None:
    """Refuse, naming the option, a layout the model cannot be split into (before any work)."""
    for name in ("tp", "pp", "dp", "vp", "micro_batch"):
        if getattr(layout, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(layout, name)}")
    if layout.seq is not None and layout.seq < 1:
        raise ValueError(f"--seq must be >= 1, got {layout.seq}")
    if layout.microbatches is not None and layout.microbatches < 1:
        raise ValueError(f"--microbatches must be >= 1, got {layout.microbatches}")
    if layout.recompute not in RECOMPUTES:
        raise ValueError(f"--recompute must be one of {RECOMPUTES}, got {layout.recompute!r}")
    if layout.attention not in ATTENTIONS:
        raise ValueError(f"--attention must be one of {ATTENTIONS}, got {layout.attention!r}")
    groups = model.num_query_groups or model.num_attention_heads
    t = layout.tp
    if groups % t or model.num_attention_heads % t or model.ffn_hidden_size % t:
        raise ValueError(f"--tp {t} must divide the query groups ({groups}), heads ({model.num_attention_heads}) "
                         f"and ffn_hidden_size ({model.ffn_hidden_size}) of the model")
    if model.num_layers % (layout.pp * layout.vp):
        raise ValueError(f"--pp {layout.pp} x --virtual-pipeline {layout.vp} must divide the model's "
                         f"{model.num_layers} layers")
    if layout.vp > 1 and layout.pp < 2:
        raise ValueError("--virtual-pipeline > 1 needs --pp >= 2")
    if layout.vp > 1 and layout.microbatches is not None and layout.microbatches % layout.pp:
        raise ValueError(f"--microbatches {layout.microbatches} must be a multiple of --pp {layout.pp} with "
                         "--virtual-pipeline > 1 (as training requires: Megatron's interleaved schedule)")
    if layout.sequence_parallel and layout.tp > 1 and (layout.seq or model.seq_length) % t:
        raise ValueError(f"--sequence-parallel: --tp {t} must divide the sequence length")


def stage_chunks(num_layers: int, pp: int, vp: int = 1) -> list[list[tuple[int, int]]]:
    """Per stage, its model chunks as (first global layer, layers): chunk v of stage p holds layers
    from v*L/V + p*L/(P*V) (Megatron's interleaved assignment; V=1 is the plain split)."""
    per = num_layers // (pp * vp)
    return [[(v * num_layers // vp + p * per, per) for v in range(vp)] for p in range(pp)]


# ---------------------------------------------------------------------- stage models on meta tensors
class _ShardedChunk:
    """What the optimizer code reads of a model chunk: ``config`` and ``named_parameters()`` (in
    forward order, as zero/build.stage_units takes them from a real chunk), the parameters being
    meta tensors shaped like one TP rank's shard."""

    def __init__(self, config, named):
        self.config = config
        self._named = named

    def named_parameters(self):
        return iter(self._named)


def _shard_like(param: torch.nn.Parameter, tp: int) -> torch.nn.Parameter:
    shape = list(param.shape)
    dim = partition_dim(param)
    if dim is not None and tp > 1:
        if shape[dim] % tp:
            raise ValueError(f"TP={tp} does not divide dim {dim} of a parameter of shape {tuple(param.shape)}")
        shape[dim] //= tp
    out = torch.nn.Parameter(torch.empty(shape, dtype=param.dtype, device="meta"), requires_grad=param.requires_grad)
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel"):
        if hasattr(param, attr):
            setattr(out, attr, getattr(param, attr))
    return out


def _single_rank_state() -> None:
    """build_gpt_model reads Megatron's parallel state: a world of one at TP=PP=1."""
    from megatron.core import parallel_state

    from megatron_osp import parallel

    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if (tp, pp) != (1, 1):
            raise RuntimeError(f"the memory planner builds stages at TP=1, PP=1; this process runs TP={tp}, PP={pp}")
        return
    parallel.init_distributed(1, 1)


def build_stage(model: ModelConfig, layout: Layout, stage: int) -> tuple[list[_ShardedChunk], list[int]]:
    """The stage's chunks (TP-rank-shaped meta parameters) and each chunk's first global layer."""
    from megatron_osp.models.gpt import build_gpt_model, transformer_config

    _single_rank_state()
    chunks, offsets = [], []
    spec = stage_chunks(model.num_layers, layout.pp, layout.vp)
    for v, (first, n) in enumerate(spec[stage]):
        # The TP=T embedding is padded to a multiple of 128*T rows: build TP=1 with that padding.
        sub = dataclasses.replace(model, num_layers=n,
                                  make_vocab_size_divisible_by=model.make_vocab_size_divisible_by * layout.tp)
        # perform_initialization stays on: Megatron sets the TP attributes (partition_dim) in its
        # init path, and on meta tensors that path allocates and computes nothing.
        config = transformer_config(sub, params_dtype=layout.params_dtype, use_cpu_initialization=True,
                                    sequence_parallel=layout.sequence_parallel and layout.tp > 1)
        pre = stage == 0 and v == 0
        post = stage == layout.pp - 1 and v == layout.vp - 1
        with torch.device("meta"):
            core = build_gpt_model(sub, config, pre_process=pre, post_process=post, layout_independent_init=False)
        named = [(name, _shard_like(p, layout.tp)) for name, p in core.named_parameters_in_forward_order()]
        chunks.append(_ShardedChunk(core.config, named))
        offsets.append(first)
    return chunks, offsets


# ---------------------------------------------------------------------- optimizer-side figures
@dataclass
class RankFigures:
    params: float = 0.0
    grads: float = 0.0
    masters: float = 0.0
    state: float = 0.0
    owner_grads: float = 0.0
    comm_buffers: float = 0.0
    largest_round: float = 0.0
    activations: float = 0.0
    sent_grads: float = 0.0
    sent_params: float = 0.0
    # The stage's busiest link: bytes summed over all-to-all rounds of the largest amount any one
    # rank of the domain sends or receives in that round (see link_bytes); the same on every rank.
    link_grads: float = 0.0
    link_params: float = 0.0
    coord: tuple[int, int] = (0, 0)  # (tp, dp)

    MEMORY = ("params", "grads", "masters", "state", "owner_grads", "comm_buffers", "activations")

    @property
    def total(self) -> float:
        return sum(getattr(self, k) for k in self.MEMORY)

    @property
    def sent(self) -> float:
        return self.sent_grads + self.sent_params


def link_bytes(traffic_per_rank: list[list[tuple[int, int]]], element_bytes: int) -> int:
    """Sum over rounds of the most any one rank sends or receives in the round, in bytes.

    ``traffic_per_rank[r][k]`` = (elements rank r sends to others, elements it receives from others)
    in round k (``Exchange.round_traffic``). Rounds are issued in the same order everywhere and at
    most a couple are in flight, so a round takes at least its busiest rank's bytes over one link's
    bandwidth: an all-to-all that gathers a bucket's gradients at one owner is slow however few
    bytes the other ranks send. A reduce-scatter or all-gather (Megatron's DistributedOptimizer)
    spreads the same bytes evenly: its figure equals the bytes each rank sends.
    """
    rounds = zip(*traffic_per_rank)
    return sum(max(max(pair) for pair in per_rank) for per_rank in rounds) * element_bytes


def domain_coords(tp: int, dp: int) -> list[tuple[int, int]]:
    """(tp, dp) of each rank of a stage's TP x DP group, in group-rank order (TP fastest, Megatron's)."""
    return [(r % tp, r // tp) for r in range(tp * dp)]


def _settings(name: str, **overrides):
    from megatron_osp.optimizer.builder import OptimSettings

    return OptimSettings(name=name, distributed_optimizer=True, **overrides)


@contextmanager
def _collector_between_ranks():
    """Each rank's exchange plan is a million or more small objects in reference cycles. Python's
    cyclic collector, left to itself, scans them again and again while they are built (osp-8b
    TP=2 x DP=16, OSP: 34 s of planning); instead it is paused, run once per rank on the previous
    rank's plan, and the shared rounds built with rank 0's plan are frozen out of its passes."""
    enabled = gc.isenabled()
    gc.disable()

    def next_rank(rank):
        if rank:
            gc.collect()  # the previous rank's plan
        if rank == 1:
            gc.freeze()  # what lives on: the shared rounds

    try:
        yield next_rank
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def ours(chunks, offsets, layout: Layout, settings) -> list[RankFigures]:
    """Every rank of the stage's T x D domain under our whole-matrix ZeRO optimizer."""
    from megatron_osp.optimizer.routing import route_parameters
    from megatron_osp.optimizer.zero.build import param_groups, stage_units
    from megatron_osp.optimizer.zero.exchange import GRAD_DTYPES, Exchange
    from megatron_osp.optimizer.zero.optimizer import STATE_NAMES
    from megatron_osp.optimizer.zero.units import assign_owners

    route = route_parameters(chunks, settings.name)
    _, kinds = param_groups(settings, route)
    params, units = stage_units(chunks, kinds, layout.tp, settings.muon_qkv_split, settings.muon_ns_steps,
                                offsets=offsets)
    coords = domain_coords(layout.tp, layout.dp)
    assign_owners(units, coords)
    grad_dtype = GRAD_DTYPES[settings.grad_reduce_dtype]
    pb = torch.empty(0, dtype=layout.params_dtype).element_size()
    local = sum(p.numel() for p in params)
    out, cache = [], {}  # the rounds, the same for every rank, computed once
    grad_traffic, param_traffic = [], []
    with _collector_between_ranks() as next_rank:
        for rank, coord in enumerate(coords):
            next_rank(rank)
            ex = Exchange(params, units, coords, rank, None, dp_size=layout.dp, bucket_elems=settings.bucket_size,
                          round_elems=settings.round_size, grad_dtype=grad_dtype, plan_cache=cache,
                          delivery=settings.delivery)
            g, p = ex.round_traffic()
            grad_traffic.append(g)
            param_traffic.append(p)
            sent = ex.plan_bytes(pb)
            grad_phase, param_phase = ex.round_buffer_bytes(pb)
            owned = [u for u in units if u.owner == rank]
            out.append(RankFigures(
                params=local * pb,
                grads=local * 4,
                masters=sum(u.numel for u in owned) * 4,
                state=sum(u.numel * 4 * len(STATE_NAMES[u.kind]) for u in owned),
                owner_grads=sum(u.numel for u in owned) * 4,
                comm_buffers=ex.buffer_bytes(pb),
                largest_round=max((h for rd in grad_phase + param_phase for h in rd), default=0),
                sent_grads=sent["grads"],
                sent_params=sent["params"],
                coord=coord,
            ))
            broadcast = ex.broadcast_numel()
            del ex
    link_grads = link_bytes(grad_traffic, torch.empty(0, dtype=grad_dtype).element_size())
    link_params = link_bytes(param_traffic, pb) + broadcast * pb  # a ring: each rank forwards it once
    for r in out:
        r.link_grads, r.link_params = link_grads, link_params
    return out


def megatron_distributed_optimizer(local_params: int, layout: Layout) -> RankFigures:
    """Megatron-Core's DistributedOptimizer + Adam at the same layout, by formula (one DP rank)."""
    pb = torch.empty(0, dtype=layout.params_dtype).element_size()
    d, n = layout.dp, local_params
    g, p = (d - 1) / d * 4 * n, (d - 1) / d * pb * n  # reduce-scatter, all-gather: even over ranks
    return RankFigures(params=n * pb, grads=4 * n, masters=4 * n / d, state=8 * n / d,
                       sent_grads=g, sent_params=p, link_grads=g, link_params=p)


# ---------------------------------------------------------------------- activations
def per_layer_activation_bytes(model: ModelConfig, layout: Layout) -> float:
    """Bytes one transformer layer saves for backward for one micro-batch on one TP rank.

    What the local layer spec saves (measured tensor by tensor with saved_tensors_hooks on CPU and
    written out here), s = sequence, b = micro-batch, h = hidden, a/g = heads/query groups per TP rank,
    d = head dim, f = FFN per TP rank, e = activation bytes (2 bf16, 4 fp32), sp = T under sequence
    parallelism (else 1):
      2 norms (SSNorm/RMSNorm in fp32): input as fp32 4sbh/sp, 1/rms 4sb/sp, normalised 4sbh/sp
        (+4 B: SSNorm's scalar gain as fp32, in bf16);
      inputs of linear_qkv and linear_fc1 e*sbh/sp, of linear_proj e*sb*a*d; RoPE cos/sin 4*s*d*e;
      core attention, unfused (the "unfused" switch; CPU): Q e*sb*a*d, K and V expanded to a heads
        e*sb*a*d each (without GQA, V is a view of the QKV output, e*sb*(a+2g)*d), the causal mask
        s^2 bytes, softmax output in fp32 4*b*a*s^2 and its bf16 copy e*b*a*s^2;
      MLP: fc1 output e*sb*2f, SwiGLU's silu(gate), its input view and the product: e*sb*3f.
    selective recompute keeps only core attention's inputs: Q, K (g heads), the QKV output (V's view).
    "flash" (GPU, flash attention / TE; an estimate, not measured here) keeps Q, K, the QKV output and
    the softmax log-sum-exp 4*b*a*s instead of the unfused terms; the rest stays the local spec's.
    full recompute keeps each layer's input e*sbh/sp (recompute_method uniform, 1 layer per chunk).
    """
    t = layout.tp
    sp = t if layout.sequence_parallel and t > 1 else 1
    s, b, h = layout.seq or model.seq_length, layout.micro_batch, model.hidden_size
    e = torch.empty(0, dtype=layout.params_dtype).element_size()
    d = h // model.num_attention_heads
    a = model.num_attention_heads // t
    g = (model.num_query_groups or model.num_attention_heads) // t
    f = model.ffn_hidden_size // t
    sb = s * b
    if layout.recompute == "full":
        return e * sb * h / sp
    gain = 4 if e != 4 and model.normalization == "ssnorm" else 0
    norms = 2 * (8 * sb * h / sp + 4 * sb / sp + gain)
    linears = 2 * e * sb * h / sp + e * sb * a * d
    rope = 4 * s * d * e
    mlp = e * sb * 5 * f
    qkv_out = e * sb * (a + 2 * g) * d
    if layout.recompute == "selective":
        attn = e * sb * a * d + e * sb * g * d + qkv_out + (4 if layout.attention == "unfused" else 0)
    elif layout.attention == "flash":
        attn = e * sb * a * d + e * sb * g * d + qkv_out + 4 * b * a * s
    else:
        v = e * sb * a * d if a > g else qkv_out
        attn = 2 * e * sb * a * d + v + s * s + 4 * b * a * s * s + (e * b * a * s * s if e != 4 else 0)
    return norms + linears + rope + attn + mlp


def edge_activation_bytes(model: ModelConfig, layout: Layout, first: bool, last: bool) -> float:
    """Outside the layers, one micro-batch: token ids, their vocabulary-range mask at TP > 1 and the
    EmbProj input (first stage); the final
    norm, the EmbProj and output-layer inputs, fp32 logits 4*sb*V/T and the loss's mask and targets
    (last stage)."""
    t = layout.tp
    sp = t if layout.sequence_parallel and t > 1 else 1
    s, b, h = layout.seq or model.seq_length, layout.micro_batch, model.hidden_size
    e = torch.empty(0, dtype=layout.params_dtype).element_size()
    sb = s * b
    out = 0.0
    if first:  # token ids (int64), at TP > 1 the vocabulary-range mask (bool), the EmbProj input
        out += 8 * sb + (sb if t > 1 else 0) + (e * sb * h / sp if model.embedding_projection else 0)
    if last:
        gain = 4 if e != 4 and model.normalization == "ssnorm" else 0
        out += 8 * sb * h / sp + 4 * sb / sp + gain
        out += e * sb * h / sp * (2 if model.embedding_projection else 1)
        out += 4 * sb * model.padded_vocab_size(t) / t + sb + 8 * sb
    return out


def in_flight(layout: Layout, stage: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at the 1F1B peak, in chunk micro-batches:
    P - p without interleaving (stage 0 holds P); with V chunks, Megatron's interleaved warm-up
    2(P-p-1) + (V-1)P, plus one. Capped by the micro-batches of a step (times V)."""
    p, v = layout.pp, layout.vp
    n = p - stage if v == 1 else 2 * (p - stage - 1) + (v - 1) * p + 1
    return min(n, layout.microbatches * v) if layout.microbatches else n


def activation_bytes(model: ModelConfig, layout: Layout, stage: int) -> float:
    """Stage ``stage``'s activations at the 1F1B peak: ``in_flight`` chunk micro-batches of L/(P*V)
    layers each, plus the embedding / loss terms of the first / last stage for in_flight / V
    micro-batches (exact without interleaving, an approximation with it), plus, under full
    recompute, the RoPE frequencies its checkpoints save (4*s*d per micro-batch)."""
    layers = model.num_layers // (layout.pp * layout.vp)
    n = in_flight(layout, stage)
    out = n * layers * per_layer_activation_bytes(model, layout)
    edge = edge_activation_bytes(model, layout, stage == 0, stage == layout.pp - 1)
    out += max(1, n // layout.vp) * edge
    if layout.recompute == "full":
        out += n * 4 * (layout.seq or model.seq_length) * (model.hidden_size // model.num_attention_heads)
    return out


# ---------------------------------------------------------------------- the whole plan
@dataclass
class StagePlan:
    stage: int
    layers: list[tuple[int, int]]
    local_params: int
    ours: dict[str, list[RankFigures]] = field(default_factory=dict)  # optimizer name -> per domain rank
    megatron: RankFigures | None = None


def plan(model: ModelConfig, layout: Layout, optimizers=("muon", "adam"), **settings) -> list[StagePlan]:
    """Every stage's figures, for our optimizer under each name in ``optimizers`` and for Megatron's."""
    check_layout(model, layout)
    stages = []
    for stage in range(layout.pp):
        chunks, offsets = build_stage(model, layout, stage)
        local = sum(p.numel() for c in chunks for _, p in c.named_parameters())
        act = activation_bytes(model, layout, stage)
        sp = StagePlan(stage, stage_chunks(model.num_layers, layout.pp, layout.vp)[stage], local)
        for name in optimizers:
            sp.ours[name] = ours(chunks, offsets, layout, _settings(name, **settings))
            for r in sp.ours[name]:
                r.activations = act
        sp.megatron = megatron_distributed_optimizer(local, layout)
        sp.megatron.activations = act
        stages.append(sp)
    return stages
