"""What the whole-matrix distributed optimizer shards: units, the slices ranks hold, and their owners.

A *unit* is the smallest piece of optimizer work with one owner rank in the TP x DP domain of a
pipeline stage. The owner alone keeps the unit's fp32 master weight and optimizer state.

- Muon: a unit is one logical matrix (Q, K, V, gate, up, every other hidden matrix, EmbProj), whole,
  because Newton-Schulz needs all of it (optimizer/logical.py defines the split and the TP slices).
- AdamW (and the normalised vector update of the muon_only ablation): AdamW is elementwise, so a
  parameter is cut into chunks along its tensor-parallel dimension (rows for replicated parameters),
  ``chunks_for`` of them: a multiple of 8 for parameters TP can split, a number that depends on the
  global shape only. When the TP size divides it, every chunk lies in one TP rank's shard and is
  owned inside that rank's data-parallel group, so AdamW moves what Megatron-Core's
  DistributedOptimizer moves. Chunk keys depend on the global shape only, so checkpoints load at any
  layout.

Every rank of the domain builds the same list from the same model description and assigns owners
with the same deterministic longest-processing-time packing on memory and Newton-Schulz FLOPs
together, so no table is ever communicated; tools/plan_memory.py runs this very code on meta tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megatron_osp.models.layout import partition_dim, split_for_rank
from megatron_osp.optimizer.logical import build_blocks, row_selector
from megatron_osp.optimizer.newton_schulz import ns_flops

MUON, ADAM, VECTOR = "muon", "adam", "vector"  # unit kinds; "vector": muon_only's normalised update
# AdamW chunk size: about this many elements (64 MiB of fp32), a multiple of 8 chunks when split.
ADAM_CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class Slice:
    """One TP rank's part of a unit: ``local[rows][:, c0:c1]`` is ``unit[unit_rows][:, u0:u1]``."""

    local_rows: torch.Tensor  # int64 rows of the local shard (viewed 2-D)
    unit_rows: torch.Tensor  # int64 rows of the unit, same length
    local_cols: tuple[int, int]
    unit_cols: tuple[int, int]

    def __post_init__(self):
        # Row selectors: a plain slice where the rows are a contiguous run (almost always), so
        # reading and writing a slice is a view, not a gather with an index tensor.
        object.__setattr__(self, "local_sel", (row_selector(self.local_rows), slice(*self.local_cols)))
        object.__setattr__(self, "unit_sel", (row_selector(self.unit_rows), slice(*self.unit_cols)))
        # Elements: read per slice per round by the exchange's plans, so computed once.
        object.__setattr__(self, "numel", len(self.local_rows) * (self.local_cols[1] - self.local_cols[0]))

    def local_sel_on(self, device: torch.device):
        """local_sel for a tensor on ``device``: a row index tensor copied there once (a CPU index on
        a CUDA tensor costs a host-to-device copy that waits for the stream, at every use)."""
        return self._sel_on("local_sel", device)

    def unit_sel_on(self, device: torch.device):
        return self._sel_on("unit_sel", device)

    def _sel_on(self, name: str, device: torch.device):
        sel = getattr(self, name)
        if isinstance(sel[0], slice) or device.type == "cpu":
            return sel
        cache = self.__dict__.setdefault("_on_device", {})  # not a field: equality ignores it
        if (name, device) not in cache:
            cache[(name, device)] = (sel[0].to(device), sel[1])
        return cache[(name, device)]

    def take(self, a: int, b: int) -> "Slice":
        """Rows a..b-1 of this slice, by position (the exchange's round and relay pieces). Runs of
        contiguous rows stay runs without looking at the row tensors again."""
        local, unit = self.local_sel[0], self.unit_sel[0]
        if not (isinstance(local, slice) and isinstance(unit, slice)):
            return Slice(self.local_rows[a:b], self.unit_rows[a:b], self.local_cols, self.unit_cols)
        out = object.__new__(Slice)
        for name, value in (("local_rows", self.local_rows[a:b]), ("unit_rows", self.unit_rows[a:b]),
                            ("local_cols", self.local_cols), ("unit_cols", self.unit_cols),
                            ("local_sel", (slice(local.start + a, local.start + b), self.local_sel[1])),
                            ("unit_sel", (slice(unit.start + a, unit.start + b), self.unit_sel[1])),
                            ("numel", (b - a) * (self.local_cols[1] - self.local_cols[0]))):
            object.__setattr__(out, name, value)
        return out


@dataclass
class Unit:
    key: str  # global name (+ "[b]" logical block, + "{c}" AdamW chunk): the checkpoint key
    kind: str  # MUON | ADAM | VECTOR
    param_index: int  # position in the stage's flat parameter list
    group: int  # index of the optimizer param group (lr / weight-decay schedule)
    shape: tuple[int, int]  # the unit's own 2-D shape
    slices: list[Slice]  # one per TP rank (empty slices where a TP rank holds none of it)
    tp_sharded: bool  # the parameter is split over TP (else every TP rank holds the same values)
    tp_sum: bool = False  # replicated, but each TP rank holds a partial gradient (partial_over_tp)
    owner: int = -1  # rank in the TP x DP domain
    cost: tuple[int, int] = (0, 0)  # (bytes of master + state, Newton-Schulz FLOPs)
    holders: list[int] = field(default_factory=list)  # TP ranks that hold a non-empty slice

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def chunks_for(numel: int, dim_size: int, splittable: bool, target: int = ADAM_CHUNK_ELEMS) -> int:
    """How many chunks an AdamW tensor of ``numel`` elements is cut into along a dim of ``dim_size``.

    A tensor that tensor parallelism can split (``splittable``: it has a partition dim, at any TP
    size) gets a multiple of 8 chunks, so at TP = 1, 2, 4 or 8 each chunk lies in one TP shard when
    the dim divides by the count; others get one chunk per ``target`` elements. Only the global
    shape decides, so the chunks (and their checkpoint keys) are the same at every layout.
    """
    if splittable:
        k = 8 * math.ceil(numel / (8 * target))
    else:
        k = math.ceil(numel / target)
    return max(1, min(k, dim_size))


def _as_2d_shape(param) -> tuple[int, int]:
    return (param.shape[0], param.shape[1]) if param.ndim == 2 else (param.numel(), 1)


def _chunk_bounds(size: int, k: int, octants: bool = False) -> list[tuple[int, int]]:
    """[start, stop) of k chunks of a dim of ``size``; with ``octants`` (a TP-splittable dim that
    divides by 8) each eighth is cut on its own, so no chunk crosses a TP shard at TP = 2, 4, 8."""
    if octants and k % 8 == 0 and size % 8 == 0:
        eighth = size // 8
        return [(o * eighth + a, o * eighth + b) for o in range(8) for a, b in _chunk_bounds(eighth, k // 8)]
    step = math.ceil(size / k)
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def partial_over_tp(name, param, model, tp_size) -> bool:
    """Whether a replicated parameter's gradient is only a part on each TP rank, the parts summing to
    it (what Megatron's finalize_model_grads all-reduces over TP): sequence-parallel norms and EmbProj,
    and with qk_layernorm the Q/K norms, which each TP rank applies to its own heads only."""
    if getattr(param, "sequence_parallel", False):
        return True
    qk = getattr(model.config, "qk_layernorm", False) and ("q_layernorm" in name or "k_layernorm" in name)
    return bool(qk) and tp_size > 1


def adam_units(name, gname, param, model, param_index, group, tp_size, kind=ADAM, target=ADAM_CHUNK_ELEMS):
    """AdamW / vector units of one parameter (local shard ``param``) at TP size ``tp_size``."""
    rows, cols = _as_2d_shape(param)
    dim = partition_dim(param)
    sharded = dim is not None and tp_size > 1
    if sharded and dim == 0:
        rows *= tp_size
    elif sharded and param.ndim == 2 and dim == 1:
        cols *= tp_size
    elif sharded:
        raise ValueError(f"parameter {name!r} is split over TP along dim {dim}; only 0 or 1 exist")
    view_param = param if param.ndim == 2 else param.reshape(-1, 1)
    # Global row / column ids held by each TP rank (the gated fc1 keeps [gate_t; up_t], layout.py).
    row_ids, col_ranges = [], []
    for t in range(tp_size):
        r = torch.arange(rows).unsqueeze(1)
        c = torch.arange(cols).unsqueeze(0)
        if sharded and dim == 0:
            r = split_for_rank(r, view_param, name, model, t, tp_size) if param.ndim == 2 else r.chunk(tp_size)[t]
        if sharded and dim == 1:
            c = split_for_rank(c, view_param, name, model, t, tp_size)
        row_ids.append(r[:, 0])
        col_ranges.append((int(c[0, 0]), int(c[0, -1]) + 1))
    blocks = [(0, rows)]
    if param.ndim == 2 and name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit:
        blocks = [(0, rows // 2), (rows // 2, rows)]  # gate, up: each a logical block (as for Muon)
    units = []
    chunk_cols = dim == 1 and param.ndim == 2  # along the TP dim at every TP size: layout-free keys
    for b, (r0, r1) in enumerate(blocks):
        along = cols if chunk_cols else r1 - r0
        k = 1 if kind == VECTOR else chunks_for((r1 - r0) * cols, along, dim is not None, target)
        for c, (a0, a1) in enumerate(_chunk_bounds(along, k, octants=dim is not None)):
            ur0, ur1 = (r0, r1) if chunk_cols else (r0 + a0, r0 + a1)
            uc0, uc1 = (a0, a1) if chunk_cols else (0, cols)
            slices, holders = [], []
            for t in range(tp_size if sharded else 1):
                ids = row_ids[t]
                keep = torch.nonzero((ids >= ur0) & (ids < ur1)).flatten()
                lc0, lc1 = col_ranges[t] if sharded else (0, cols)
                c0, c1 = max(lc0, uc0), min(lc1, uc1)
                if len(keep) == 0 or c1 <= c0:
                    slices.append(Slice(keep[:0], keep[:0], (0, 0), (0, 0)))
                    continue
                slices.append(Slice(keep, ids[keep] - ur0, (c0 - lc0, c1 - lc0), (c0 - uc0, c1 - uc0)))
                holders.append(t)
            if not sharded:
                slices, holders = slices * tp_size, list(range(tp_size))
            key = gname + (f"[{b}]" if len(blocks) > 1 else "") + (f"{{{c}}}" if k > 1 else "")
            units.append(Unit(key, kind, param_index, group, (ur1 - ur0, uc1 - uc0), slices, sharded,
                              tp_sum=partial_over_tp(name, param, model, tp_size) and not sharded,
                              holders=holders))
    return units


def muon_units(named_params, model, first_index, group, tp_size, qkv_split, offset=None):
    """Muon units (whole logical matrices) of one model chunk's Muon-routed 2-D parameters."""
    units = []
    for b in build_blocks(named_params, model, first_index, tp_size, qkv_split, offset=offset):
        name, param = named_params[b.param_index - first_index]
        slices = [Slice(p.local_rows, p.block_rows, (0, param.shape[1]), p.cols) for p in b.pieces]
        # A replicated matrix fed by sequence-parallel activations (EmbProj under SP) has a partial
        # gradient on each TP rank: the owner adds them (Megatron's finalize would all-reduce them).
        tp_sum = partial_over_tp(name, param, model, tp_size) and not b.sharded
        units.append(Unit(b.key, MUON, b.param_index, group, b.shape, slices, b.sharded, tp_sum=tp_sum,
                          holders=list(range(tp_size))))
    return units


def set_costs(units, ns_steps: int = 5, master_bytes: int = 4) -> None:
    """Each unit's (bytes of fp32 master + optimizer state, Newton-Schulz FLOPs)."""
    for u in units:
        state = 8 if u.kind == ADAM else 4  # exp_avg + exp_avg_sq | momentum
        flops = ns_flops(*u.shape, ns_steps) if u.kind == MUON else 0
        u.cost = (u.numel * (master_bytes + state), flops)


def assign_owners(units, coords) -> list[tuple[int, int]]:
    """Give every unit one owner in the domain whose ranks have ``coords[r] = (tp, dp)``.

    Longest-processing-time packing on memory, with FLOPs steering every free choice: units in
    decreasing memory (then FLOPs), each to the rank with the fewest Newton-Schulz FLOPs among those
    it fits on without raising the largest memory load so far, or else to the rank with the least
    memory. Memory decides what fits on a GPU; NS time is a few percent of a step. A unit held by one
    TP rank only (an AdamW chunk inside a TP shard) stays in that TP rank's data-parallel group.
    Returns each rank's (bytes, FLOPs). Deterministic (ties by key, then rank), so every rank
    computes the same table without communicating.
    """
    world = len(coords)
    total_b = sum(u.cost[0] for u in units) or 1
    total_f = sum(u.cost[1] for u in units) or 1
    frac = [(u.cost[0] / total_b, u.cost[1] / total_f) for u in units]
    by_tp: dict[int, list[int]] = {}
    for r, (tp, _) in enumerate(coords):
        by_tp.setdefault(tp, []).append(r)
    mem, flop = [0.0] * world, [0.0] * world
    result = [[0, 0] for _ in range(world)]
    everyone = list(range(world))
    for i in sorted(range(len(units)), key=lambda i: (-frac[i][0], -frac[i][1], units[i].key)):
        u, (fm, ff) = units[i], frac[i]
        ranks = by_tp[u.holders[0]] if len(u.holders) == 1 else everyone
        ceiling = max(mem[r] for r in ranks)
        free = [r for r in ranks if mem[r] + fm <= ceiling + 1e-12]
        if free:
            rank = min(free, key=lambda r: (flop[r], mem[r], r))
        else:
            rank = min(ranks, key=lambda r: (mem[r], flop[r], r))
        u.owner = rank
        mem[rank] += fm
        flop[rank] += ff
        result[rank][0] += u.cost[0]
        result[rank][1] += u.cost[1]
    return [tuple(x) for x in result]
