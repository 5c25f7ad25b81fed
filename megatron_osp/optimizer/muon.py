"""Muon (momentum + orthogonalised update) on logical matrices, across tensor and data parallelism.

Per logical matrix W (m x n) with gradient g, as the OSP paper runs it:
    buf <- g + mu * buf;  u <- g + mu * buf            (Nesterov, mu = 0.95)
    O   <- NewtonSchulz(u)                             (see newton_schulz.py)
    W   <- W (1 - lr * wd) - lr * scale(m, n) * O
with scale = 0.2 * sqrt(max(m, n)) ("rms": matches AdamW's update RMS, so both share one LR
schedule) or sqrt(max(1, m / n)) ("shape").

Owner-compute distribution. Momentum is elementwise, so each rank keeps it on its own shard, shaped
like the parameter (Megatron's sharded optimizer state dict then reshards it like a weight).
Newton-Schulz is not elementwise: it needs the whole logical matrix. Each logical matrix therefore
has one owner in the TP x DP domain of its pipeline stage (``ownership.assign_owners``). A step is
  1. momentum on every shard;
  2. one packed all-to-all: the owner's TP peers (in the owner's data-parallel replica) send their
     pieces of it (bf16 on GPU), and the owner assembles the logical matrix;
  3. the owner runs NS once, batching its matrices of equal shape;
  4. one packed all-to-all back: every rank receives the slice of each update its shard holds.
So every logical matrix is orthogonalised exactly once in the domain, and the update equals the
single-process one whatever the TP, PP and DP sizes. ``ns_calls`` counts matrices this rank has
orthogonalised and ``last_ns_keys`` names those of the last step (the tests check ownership).

Vectors (only in the "muon_only" ablation) get the normalised update u / ||u|| (the polar factor of
a 1 x n matrix) with the same scale rule, computed on every rank.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

from megatron_osp.optimizer.logical import LogicalBlock, Piece, row_selector
from megatron_osp.optimizer.newton_schulz import BACKENDS, coefficient_schedule, newton_schulz, resolve_backend
from megatron_osp.optimizer.ownership import assign_owners
from megatron_osp.optimizer.plan import exchange_sizes

LR_SCALES = ("rms", "shape")


def update_scale(m: int, n: int, rule: str, rms_match: float = 0.2) -> float:
    """The factor that multiplies the orthogonalised update of an m x n logical matrix."""
    if rule == "rms":
        return rms_match * math.sqrt(max(m, n))
    if rule == "shape":
        return math.sqrt(max(1.0, m / n))
    raise ValueError(f"optimizer.muon_lr_scale must be one of {LR_SCALES}, got {rule!r}")


def whole_matrix_blocks(params, row_sets=None) -> list[LogicalBlock]:
    """Blocks for unsharded 2-D parameters: each whole, or split into the given row index sets."""
    blocks = []
    for i, p in enumerate(params):
        if p.ndim != 2:
            continue
        rows = (row_sets[i] if row_sets is not None else None) or [torch.arange(p.shape[0])]
        for b, idx in enumerate(rows):
            idx = torch.as_tensor(idx, dtype=torch.long)
            piece = Piece(local_rows=idx, block_rows=torch.arange(len(idx)), cols=(0, p.shape[1]))
            blocks.append(LogicalBlock(f"param{i}[{b}]", i, (len(idx), p.shape[1]), [piece], False))
    return blocks


def _rows_in_blocks(blocks, flat, tp_rank: int, device) -> dict[int, slice | torch.Tensor]:
    """Local rows of each matrix that lie in a logical block at this TP rank (``row_selector``s), for
    the matrices some of whose rows lie in none (the vocabulary's padding rows, logical.vocab_rows):
    Muon leaves those rows as they are, weight decay included."""
    held = defaultdict(list)
    for b in blocks:
        held[b.param_index].append(b.pieces[tp_rank].local_rows)
    out = {}
    for i, parts in held.items():
        rows = torch.cat(parts).unique()
        if len(rows) < flat[i].shape[0]:
            out[i] = row_selector(rows, device)
    return out


def advance_momentum(buf: torch.Tensor, grad: torch.Tensor, momentum: float) -> torch.Tensor:
    """buf = momentum * buf + grad, in place."""
    return buf.mul_(momentum).add_(grad)


def nesterov_directions(bufs: list[torch.Tensor], grads: list[torch.Tensor], momentum: float,
                        nesterov: bool) -> list[torch.Tensor]:
    """Advance the momentum buffers in place and return the update directions: grad + mu * buf
    (Nesterov) or buf itself (read only afterwards). One multi-tensor kernel per operation for all
    matrices (elementwise, so the same numbers as per-tensor ops)."""
    if not bufs:
        return []
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    return torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else list(bufs)


def _put(dst: torch.Tensor, rows, src: torch.Tensor) -> None:
    """dst[rows] = src, converting src to dst's dtype (in the copy itself where rows is a slice)."""
    if isinstance(rows, slice):
        dst[rows].copy_(src)
    else:
        dst[rows] = src.to(dst.dtype)


class Muon(torch.optim.Optimizer):
    """Muon over the logical matrices in ``blocks`` (default: every 2-D parameter whole, one rank).

    ``group`` is the TP x DP process group of this pipeline stage (None: single process), and
    ``coords[r] = (tp_rank, dp_rank)`` of its rank r. ``blocks`` index the flat parameter list
    (all param groups in order) and must be the same list, in the same order, on every rank.
    (``optimizer.distributed_optimizer=true`` uses optimizer/zero/ instead, which keeps masters and
    momentum on the owners only.)
    ``ns_backend`` picks newton_schulz's backend ("torch", "auto", "triton").
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        coefficients: str = "keller",
        lr_scale: str = "rms",
        rms_match: float = 0.2,
        *,
        blocks: list[LogicalBlock] | None = None,
        group=None,
        coords: list[tuple[int, int]] | None = None,
        names: list[str] | None = None,
        ns_backend: str = "torch",
    ):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)
        update_scale(1, 1, lr_scale)  # validate early
        coefficient_schedule(coefficients, ns_steps)
        self.ns_steps, self.coefficients = ns_steps, coefficients
        if ns_backend not in BACKENDS:
            raise ValueError(f"optimizer.muon_ns_backend must be one of {BACKENDS}, got {ns_backend!r}")
        self.ns_backend = ns_backend
        self.lr_scale, self.rms_match = lr_scale, rms_match
        flat = self._flat_params()
        names = names or [f"param{i}" for i in range(len(flat))]
        for p, name in zip(flat, names):
            if p.ndim not in (1, 2):
                raise ValueError(f"Muon: parameter {name!r} has shape {tuple(p.shape)}; only matrices and vectors")
        if ns_backend == "triton" and flat:  # fail at build time, not at the first step
            work_dtype = torch.bfloat16 if flat[0].is_cuda else torch.float32
            resolve_backend("triton", torch.empty(0, dtype=work_dtype, device=flat[0].device))
        self.blocks = whole_matrix_blocks(flat) if blocks is None else blocks
        covered = {b.param_index for b in self.blocks}
        for i, p in enumerate(flat):
            if p.ndim == 2 and i not in covered:
                raise ValueError(f"Muon: matrix parameter {names[i]!r} is in no logical block")
        self.vector_indices = [i for i, p in enumerate(flat) if p.ndim == 1]
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.coords = coords or [(0, 0)] * self.world
        if len(self.coords) != self.world:
            raise ValueError(f"Muon: {len(self.coords)} coords for a domain of {self.world} ranks")
        self.ns_flops_per_rank = assign_owners(self.blocks, self.world, ns_steps)
        self.owned = [b for b in self.blocks if b.owner == self.rank]
        self._sizes = exchange_sizes(self.blocks, self.coords, self.rank)
        device = flat[0].device if flat else torch.device("cpu")
        self.decay_rows = _rows_in_blocks(self.blocks, flat, self.coords[self.rank][0], device)
        # (local rows, block rows) selectors of every block's piece at every TP rank
        self._sel = {b.key: [(row_selector(pc.local_rows, device), row_selector(pc.block_rows, device))
                             for pc in b.pieces] for b in self.blocks}
        self.ns_calls = 0
        self.last_ns_keys: list[str] = []

    def _flat_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    # ---- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        flat = self._flat_params()
        directions: list[torch.Tensor] = []
        for g in self.param_groups:
            grads, bufs = [], []
            for p in g["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)  # keeps ranks in lockstep
                grads.append(grad.float())
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                bufs.append(state["momentum_buffer"])
            directions += nesterov_directions(bufs, grads, g["momentum"], g["nesterov"])
        owner_group = [g for g in self.param_groups for _ in g["params"]]
        updates = self._orthogonalized_updates(directions)
        for i in self.vector_indices:
            u = directions[i]
            scale = update_scale(1, u.numel(), self.lr_scale, self.rms_match)
            updates[i] = [(slice(None), u * (scale / (u.norm() + 1e-8)))]
        for i, (p, g) in enumerate(zip(flat, owner_group)):
            if g["weight_decay"]:
                rows = self.decay_rows.get(i)
                if rows is None:
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                else:
                    p[rows] *= 1 - g["lr"] * g["weight_decay"]
            for rows, u in updates.get(i, ()):
                # the fp32 update as the parameter's dtype; an fp32 parameter adds a bf16 update
                # exactly as its fp32 copy, so no conversion pass is needed there
                u = u if p.dtype == torch.float32 or u.dtype == p.dtype else u.float().to(p.dtype)
                if isinstance(rows, slice):
                    p[rows].add_(u, alpha=-g["lr"])
                else:  # gather, add, scatter (rows are unique; index_add_ would be atomic adds on CUDA)
                    p[rows] = p[rows].add(u, alpha=-g["lr"])
        return loss

    def _orthogonalized_updates(self, directions: list[torch.Tensor]) -> dict[int, list]:
        """{parameter index: [(local rows, update of those rows)]} for this rank's shards."""
        device = directions[0].device if directions else torch.device("cpu")
        comm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        my_tp, my_dp = self.coords[self.rank]

        # 1. Owners' TP peers (same DP replica) send their pieces of each sharded logical matrix.
        received = None
        if self.world > 1:
            send = [[] for _ in range(self.world)]
            for b in self.blocks:
                if b.sharded and self.coords[b.owner][1] == my_dp:
                    send[b.owner].append(directions[b.param_index][self._sel[b.key][my_tp][0]].flatten())
            received = self._all_to_all(send, self._sizes[0], self._sizes[1], comm_dtype, device)

        # 2. Assemble owned logical matrices straight into one stack per shape; 3. NS per stack.
        by_shape = defaultdict(list)
        for b in self.owned:
            by_shape[b.shape].append(b)
        matrices, stacks = {}, {}
        for shape, group in by_shape.items():
            stack = stacks[shape] = torch.empty((len(group), *shape), dtype=comm_dtype, device=device)
            for j, b in enumerate(group):
                matrices[b.key] = stack[j]
                if not b.sharded:
                    local, rows = self._sel[b.key][my_tp]
                    _put(stack[j], rows, directions[b.param_index][local])
        for r, (tp, dp) in enumerate(self.coords):
            if dp != my_dp or received is None:
                continue
            seg, at = received[r], 0
            for b in self.owned:
                if b.sharded:
                    pc, rows = b.pieces[tp], self._sel[b.key][tp][1]
                    k, (c0, c1) = len(pc.block_rows), pc.cols
                    _put(matrices[b.key][:, c0:c1], rows, seg[at : at + k * (c1 - c0)].view(k, c1 - c0))
                    at += k * (c1 - c0)
        self.last_ns_keys = []
        results = {}
        for shape, group in by_shape.items():
            stack = stacks[shape]
            out = newton_schulz(stack, steps=self.ns_steps, coefficients=self.coefficients, backend=self.ns_backend)
            self.ns_calls += stack.shape[0]  # counted where NS runs, so tests can audit ownership
            self.last_ns_keys += [b.key for b in group]
            out = (out * update_scale(*shape, self.lr_scale, self.rms_match)).to(comm_dtype)
            for b, o in zip(group, out):
                results[b.key] = o

        # 4. Every rank receives the slice of each update its shard holds (on one rank: its own).
        updates: dict[int, list] = defaultdict(list)
        if self.world == 1:
            for b in self.blocks:
                local, rows = self._sel[b.key][0]
                updates[b.param_index].append((local, results[b.key][rows]))
            return updates
        send = [[] for _ in range(self.world)]
        for r, (tp, _) in enumerate(self.coords):
            for b in self.owned:
                pc, rows = b.pieces[tp], self._sel[b.key][tp][1]
                send[r].append(results[b.key][rows, pc.cols[0] : pc.cols[1]].flatten())
        received = self._all_to_all(send, self._sizes[2], self._sizes[3], comm_dtype, device)
        at = [0] * self.world
        for b in self.blocks:
            pc = b.pieces[my_tp]
            k, width = len(pc.local_rows), pc.cols[1] - pc.cols[0]
            seg = received[b.owner][at[b.owner] : at[b.owner] + k * width]
            updates[b.param_index].append((self._sel[b.key][my_tp][0], seg.view(k, width)))
            at[b.owner] += k * width
        return updates

    def _all_to_all(self, send, send_plan, recv_sizes, dtype, device) -> list[torch.Tensor]:
        """Packed all-to-all over the domain: send[r] (list of flat tensors) to rank r."""
        send_flat = [torch.cat(s).to(dtype) if s else torch.empty(0, dtype=dtype, device=device) for s in send]
        send_sizes = [t.numel() for t in send_flat]
        if send_sizes != send_plan:
            raise RuntimeError(f"Muon: sends {send_sizes} differ from the plan {send_plan}")
        if self.world == 1:
            return send_flat
        out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(out, torch.cat(send_flat), recv_sizes, send_sizes, group=self.group)
        return list(out.split(recv_sizes))
