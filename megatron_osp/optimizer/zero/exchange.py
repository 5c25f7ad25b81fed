"""Moving gradients to unit owners and updated parameters back, per bucket, optionally overlapped.

Parameters of a pipeline stage are grouped into buckets in backward order (the last layers first),
``bucket_elems`` local elements or more each, the same on every rank of the stage's TP x DP domain.

Gradients (reduce-scatter semantics, no all-reduce): once every parameter of a bucket has its
gradient of the step's last micro-batch (a hook after Megatron DDP's own accumulation into
``main_grad``), one all-to-all sends each owner the slices of its units that this rank holds,
scaled by 1/DP and cast to ``grad_dtype`` (fp32 by default). A rank contributes to a unit when its
TP slice is its own (the parameter is split over TP), when each TP rank holds a partial gradient
(sequence-parallel norms: the owner sums all of them, which replaces Megatron's TP all-reduce), or,
for replicated parameters, when it is in the owner's TP rank. Owners sum contributions in rank
order, so results do not depend on timing. With ``overlap_grad`` the all-to-all is issued from the
backward pass (asynchronously); without it, all buckets go at the end.

Parameters: after the step, owners send every holder its slice of each updated unit (in the
parameters' dtype), bucket by bucket in forward order. With ``overlap_param`` the next forward
pass waits for a bucket only in the pre-hook of the first module that uses it (Megatron's
``overlap_param_gather`` semantics); without it, the step waits for all of them.

``plan_bytes()`` gives the bytes each rank sends per step; tools/plan_memory.py and the tests use it.
``events`` (a list, when given) records issue/wait order for the overlap tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_osp.optimizer.zero.units import Unit

GRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _view2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.ndim == 2 else t.view(-1, 1)


class _Bucket:
    def __init__(self, index: int, params: list[int]):
        self.index = index
        self.params = params  # param indices
        self.units: list[Unit] = []
        self.grad_send: list[list[tuple[Unit, object]]] = []  # per dst rank
        self.grad_recv: list[list[tuple[Unit, object]]] = []  # per src rank
        self.param_send: list[list[tuple[Unit, object]]] = []
        self.param_recv: list[list[tuple[Unit, object]]] = []
        self.pending = len(params)
        self.grad_work = None
        self.param_work = None


def _sizes(lists) -> list[int]:
    return [sum(s.numel for _, s in items) for items in lists]


class Exchange:
    def __init__(self, params, units, coords, rank, group, *, dp_size: int, bucket_elems: int = 40_000_000,
                 grad_dtype=torch.float32, overlap_grad: bool = False, overlap_param: bool = False,
                 events: list | None = None):
        self.params, self.units, self.coords = params, units, coords
        self.rank, self.group, self.world = rank, group, len(coords)
        self.dp_scale = 1.0 / dp_size
        self.grad_dtype = grad_dtype
        self.overlap_grad, self.overlap_param = overlap_grad, overlap_param
        self.events = events
        self.buckets = self._make_buckets(bucket_elems)
        self.bucket_of_param = {}
        for b in self.buckets:
            for i in b.params:
                self.bucket_of_param[i] = b
        for u in units:
            self.bucket_of_param[u.param_index].units.append(u)
        for b in self.buckets:
            self._plan(b)
        self.owned = [u for u in units if u.owner == rank]
        self.param_position = {id(p): i for i, p in enumerate(params)}
        self._next_issue = 0
        self._grads_done = False
        self._param_pending: set[int] = set()
        self.grads: dict[str, torch.Tensor] = {}  # owner side: the reduced gradient of each owned unit

    # ------------------------------------------------------------------ plan
    def _make_buckets(self, bucket_elems):
        buckets, current, size = [], [], 0
        for i in reversed(range(len(self.params))):  # backward order
            current.append(i)
            size += self.params[i].numel()
            if size >= bucket_elems:
                buckets.append(_Bucket(len(buckets), current))
                current, size = [], 0
        if current:
            buckets.append(_Bucket(len(buckets), current))
        return buckets

    def contributes(self, u: Unit, tp: int) -> bool:
        if u.slices[tp].numel == 0:
            return False
        return u.tp_sharded or u.tp_sum or tp == self.coords[u.owner][0]

    def _plan(self, b: _Bucket):
        my_tp = self.coords[self.rank][0]
        b.grad_send = [[] for _ in range(self.world)]
        b.grad_recv = [[] for _ in range(self.world)]
        b.param_send = [[] for _ in range(self.world)]
        b.param_recv = [[] for _ in range(self.world)]
        for u in b.units:
            if self.contributes(u, my_tp):
                b.grad_send[u.owner].append((u, u.slices[my_tp]))
            if u.slices[my_tp].numel:
                b.param_recv[u.owner].append((u, u.slices[my_tp]))
            if u.owner == self.rank:
                for r, (tp, _) in enumerate(self.coords):
                    if self.contributes(u, tp):
                        b.grad_recv[r].append((u, u.slices[tp]))
                    if u.slices[tp].numel:
                        b.param_send[r].append((u, u.slices[tp]))

    def plan_bytes(self, param_bytes: int) -> dict[str, int]:
        """Bytes this rank sends to other ranks per step: gradients and parameters."""
        g = sum(n for b in self.buckets for r, n in enumerate(_sizes(b.grad_send)) if r != self.rank)
        p = sum(n for b in self.buckets for r, n in enumerate(_sizes(b.param_send)) if r != self.rank)
        gb = torch.empty(0, dtype=self.grad_dtype).element_size()
        return {"grads": g * gb, "params": p * param_bytes}

    # ------------------------------------------------------------------ gradients
    def _log(self, *event):
        if self.events is not None:
            self.events.append(event)

    def begin_step(self):
        for b in self.buckets:
            b.pending = len(b.params)
            b.grad_work = None
        self._next_issue = 0
        self._grads_done = False

    def grad_ready(self, param) -> None:
        """Called after Megatron DDP accumulated ``param``'s last micro-batch gradient."""
        if not self.overlap_grad or self._grads_done:
            return
        b = self.bucket_of_param[self.param_position[id(param)]]
        b.pending -= 1
        while self._next_issue < len(self.buckets) and self.buckets[self._next_issue].pending <= 0:
            self._issue_grads(self.buckets[self._next_issue], async_op=True)
            self._next_issue += 1

    def _issue_grads(self, b: _Bucket, async_op: bool):
        device = self.params[0].device
        parts = []
        for items in b.grad_send:
            for u, s in items:
                g = _view2d(self.params[u.param_index].main_grad)[s.local_rows, s.local_cols[0]:s.local_cols[1]]
                parts.append((g * self.dp_scale).to(self.grad_dtype).reshape(-1))
        send = torch.cat(parts) if parts else torch.empty(0, dtype=self.grad_dtype, device=device)
        recv_sizes = _sizes(b.grad_recv)
        recv = torch.empty(sum(recv_sizes), dtype=self.grad_dtype, device=device)
        work = self._all_to_all(recv, send, recv_sizes, _sizes(b.grad_send), async_op)
        b.grad_work = (work, send, recv, recv_sizes)
        self._log("grad_issue", b.index)

    def finish_grads(self) -> None:
        """Issue what is left, wait for every bucket, and sum each owned unit's gradient."""
        if self._grads_done:
            return
        while self._next_issue < len(self.buckets):
            self._issue_grads(self.buckets[self._next_issue], async_op=self.overlap_grad)
            self._next_issue += 1
        device = self.params[0].device if self.params else torch.device("cpu")
        for u in self.owned:
            self.grads[u.key] = torch.zeros(u.shape, dtype=torch.float32, device=device)
        for b in self.buckets:
            work, _, recv, sizes = b.grad_work
            if work is not None:
                work.wait()
            self._log("grad_wait", b.index)
            for items, seg in zip(b.grad_recv, recv.split(sizes)):
                at = 0
                for u, s in items:
                    k, w = len(s.unit_rows), s.unit_cols[1] - s.unit_cols[0]
                    self.grads[u.key][s.unit_rows, s.unit_cols[0]:s.unit_cols[1]] += seg[at:at + k * w].view(k, w)
                    at += k * w
            b.grad_work = None
        self._grads_done = True

    # ------------------------------------------------------------------ parameters
    def start_params(self, masters: dict[str, torch.Tensor]) -> None:
        """Send every holder its slices of the owned units' new values (forward order)."""
        for b in reversed(self.buckets):
            dtype = self.params[b.params[0]].dtype
            device = self.params[b.params[0]].device
            parts = [masters[u.key][s.unit_rows, s.unit_cols[0]:s.unit_cols[1]].to(dtype).reshape(-1)
                     for items in b.param_send for u, s in items]
            send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
            recv_sizes = _sizes(b.param_recv)
            recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
            work = self._all_to_all(recv, send, recv_sizes, _sizes(b.param_send), self.overlap_param)
            b.param_work = (work, send, recv, recv_sizes)
            self._param_pending.add(b.index)
            self._log("param_issue", b.index)
        if not self.overlap_param:
            self.finish_params()

    def wait_param_bucket(self, b: _Bucket) -> None:
        if b.index not in self._param_pending:
            return
        work, _, recv, sizes = b.param_work
        if work is not None:
            work.wait()
        self._log("param_wait", b.index)
        with torch.no_grad():
            for items, seg in zip(b.param_recv, recv.split(sizes)):
                at = 0
                for u, s in items:
                    k, w = len(s.local_rows), s.local_cols[1] - s.local_cols[0]
                    p2d = _view2d(self.params[u.param_index].data)
                    p2d[s.local_rows, s.local_cols[0]:s.local_cols[1]] = seg[at:at + k * w].view(k, w)
                    at += k * w
        b.param_work = None
        self._param_pending.discard(b.index)

    def wait_params_of(self, module) -> None:
        """Forward pre-hook body: wait for the buckets of ``module``'s own parameters."""
        if not self._param_pending:
            return
        for p in module.parameters(recurse=False):
            i = self.param_position.get(id(p))
            if i is not None:
                self.wait_param_bucket(self.bucket_of_param[i])

    def finish_params(self) -> None:
        for b in reversed(self.buckets):
            self.wait_param_bucket(b)

    # ------------------------------------------------------------------ collective
    def _all_to_all(self, recv, send, recv_sizes, send_sizes, async_op):
        if self.world == 1:
            recv.copy_(send)
            return None
        return dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group, async_op=async_op)

    def gather_to_owners(self, read) -> dict[str, torch.Tensor]:
        """Assemble each owned unit from the holders of the owner's data-parallel replica (no
        scaling): ``read(u, s)`` returns the local values of slice ``s``. Used for fp32 masters."""
        device = self.params[0].device if self.params else torch.device("cpu")
        my_tp, my_dp = self.coords[self.rank]
        send = [[] for _ in range(self.world)]
        recv_plan = [[] for _ in range(self.world)]
        for u in self.units:
            if u.slices[my_tp].numel and my_dp == self.coords[u.owner][1] and (u.tp_sharded or my_tp == self.coords[u.owner][0]):
                send[u.owner].append(read(u, u.slices[my_tp]).float().reshape(-1))
            if u.owner == self.rank:
                for r, (tp, dp) in enumerate(self.coords):
                    if dp == my_dp and u.slices[tp].numel and (u.tp_sharded or tp == my_tp):
                        recv_plan[r].append((u, u.slices[tp]))
        send_flat = [torch.cat(s) if s else torch.empty(0, device=device) for s in send]
        sizes = _sizes(recv_plan)
        recv = torch.empty(sum(sizes), device=device)
        self._all_to_all(recv, torch.cat(send_flat), sizes, [t.numel() for t in send_flat], False)
        out = {u.key: torch.zeros(u.shape, dtype=torch.float32, device=device) for u in self.owned}
        for items, seg in zip(recv_plan, recv.split(sizes)):
            at = 0
            for u, s in items:
                k, w = len(s.unit_rows), s.unit_cols[1] - s.unit_cols[0]
                out[u.key][s.unit_rows, s.unit_cols[0]:s.unit_cols[1]] = seg[at:at + k * w].view(k, w)
                at += k * w
        return out
