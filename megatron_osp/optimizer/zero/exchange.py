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
backward pass (asynchronously); without it, all buckets go at the end. At most ``WINDOW`` buckets
are in flight: issuing one more first completes (waits for and sums) the oldest, so the packed
send/receive buffers stay a couple of buckets large whatever the model size.

Parameters: after the step, owners send every holder its slice of each updated unit (in the
parameters' dtype), bucket by bucket in forward order, ``WINDOW`` at a time. With ``overlap_param``
the next forward pass waits for a bucket only in the pre-hook of the first module that uses it
(Megatron's ``overlap_param_gather`` semantics) and each wait sends the next bucket; without it, the
step waits for all of them. Large units every rank holds whole (EmbProj under TP) go back by
broadcast, so their owner does not send them to every rank alone.

``plan_bytes()`` (bytes each rank sends per step) and ``buffer_bytes()`` (peak send + receive
buffers) are what tools/plan_memory.py reports; the tests measure both.
``events`` (a list, when given) records issue/wait order for the overlap tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_osp.optimizer.zero.units import Unit

GRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WINDOW = 2  # buckets in flight at once, per direction: bounds the send/receive buffers
BROADCAST_MIN = 1 << 20  # elements: replicated units at least this large go back by broadcast


def _window_peak(sizes: list[int]) -> int:
    return max((sum(sizes[i:i + WINDOW]) for i in range(len(sizes))), default=0)


def view2d(t: torch.Tensor) -> torch.Tensor:
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


def _unpacked(lists, recv: torch.Tensor, sizes: list[int]):
    """(unit, slice, 2-D block) for each slice of a received packed buffer, in the plan's order."""
    for items, seg in zip(lists, recv.split(sizes)):
        at = 0
        for u, s in items:
            k, w = len(s.local_rows), s.local_cols[1] - s.local_cols[0]
            yield u, s, seg[at:at + k * w].view(k, w)
            at += k * w


class Exchange:
    def __init__(self, params, units, coords, rank, group, *, dp_size: int, bucket_elems: int = 40_000_000,
                 grad_dtype=torch.float32, overlap_grad: bool = False, overlap_param: bool = False,
                 events: list | None = None, broadcast_min: int = BROADCAST_MIN):
        self.params, self.units, self.coords = params, units, coords
        self.rank, self.group, self.world = rank, group, len(coords)
        self.dp_scale = 1.0 / dp_size
        self.grad_dtype = grad_dtype
        self.overlap_grad, self.overlap_param = overlap_grad, overlap_param
        self.events = events
        self.broadcast_min = broadcast_min
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
        self._param_order: list[_Bucket] = []
        self._param_next = 0
        self._grads_in_flight: list[_Bucket] = []
        self.peak_buffer_bytes = 0  # measured: see _note_buffers
        self.grads: dict[str, torch.Tensor] = {}  # owner side: the reduced gradient of each owned unit
        self.on_grads = None  # called with each bucket once its owned units' gradients are summed

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

    def broadcasts(self, u: Unit) -> bool:
        """A large unit that every rank of the domain holds whole (an EmbProj matrix under TP) goes
        back by broadcast (each rank forwards it once) instead of from its owner to every rank."""
        return not u.tp_sharded and self.world > 2 and u.numel >= self.broadcast_min

    def _plan(self, b: _Bucket):
        my_tp = self.coords[self.rank][0]
        b.grad_send = [[] for _ in range(self.world)]
        b.grad_recv = [[] for _ in range(self.world)]
        b.param_send = [[] for _ in range(self.world)]
        b.param_recv = [[] for _ in range(self.world)]
        b.broadcast = [u for u in b.units if self.broadcasts(u)]
        for u in b.units:
            if self.contributes(u, my_tp):
                b.grad_send[u.owner].append((u, u.slices[my_tp]))
            if u.slices[my_tp].numel and not self.broadcasts(u):
                b.param_recv[u.owner].append((u, u.slices[my_tp]))
            if u.owner == self.rank:
                for r, (tp, _) in enumerate(self.coords):
                    if self.contributes(u, tp):
                        b.grad_recv[r].append((u, u.slices[tp]))
                    if u.slices[tp].numel and not self.broadcasts(u):
                        b.param_send[r].append((u, u.slices[tp]))

    def plan_bytes(self, param_bytes: int) -> dict[str, int]:
        """Bytes this rank sends to other ranks per step: gradients and parameters (broadcasts
        counted as a ring forwards them: (n - 1)/n of the tensor per rank)."""
        g = sum(n for b in self.buckets for r, n in enumerate(_sizes(b.grad_send)) if r != self.rank)
        p = sum(n for b in self.buckets for r, n in enumerate(_sizes(b.param_send)) if r != self.rank)
        p += sum(u.numel for b in self.buckets for u in b.broadcast) * (self.world - 1) / self.world
        gb = torch.empty(0, dtype=self.grad_dtype).element_size()
        return {"grads": g * gb, "params": int(p * param_bytes)}

    def bucket_buffer_bytes(self, param_bytes: int) -> tuple[list[int], list[int]]:
        """Send + receive buffer bytes of each bucket: gradients (backward order), parameters
        (forward order, broadcasts included)."""
        gb = torch.empty(0, dtype=self.grad_dtype).element_size()
        grads = [(sum(_sizes(b.grad_send)) + sum(_sizes(b.grad_recv))) * gb for b in self.buckets]
        params = [(sum(_sizes(b.param_send)) + sum(_sizes(b.param_recv)) + sum(u.numel for u in b.broadcast))
                  * param_bytes for b in reversed(self.buckets)]
        return grads, params

    def buffer_bytes(self, param_bytes: int) -> int:
        """Peak bytes of send + receive buffers: at most WINDOW buckets are in flight at once."""
        grads, params = self.bucket_buffer_bytes(param_bytes)
        return max(_window_peak(grads), _window_peak(params))

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
        self._grads_in_flight: list[_Bucket] = []
        self.grads = {}

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
        while len(self._grads_in_flight) >= WINDOW:
            self._complete_grads(self._grads_in_flight.pop(0))
        device = self.params[0].device
        parts = []
        for items in b.grad_send:
            for u, s in items:
                g = view2d(self.params[u.param_index].main_grad)[s.local_sel]
                parts.append((g * self.dp_scale).to(self.grad_dtype).reshape(-1))
        send = torch.cat(parts) if parts else torch.empty(0, dtype=self.grad_dtype, device=device)
        recv_sizes = _sizes(b.grad_recv)
        recv = torch.empty(sum(recv_sizes), dtype=self.grad_dtype, device=device)
        work = self._all_to_all(recv, send, recv_sizes, _sizes(b.grad_send), async_op)
        b.grad_work = (work, send, recv, recv_sizes)
        self._grads_in_flight.append(b)
        self._note_buffers()
        self._log("grad_issue", b.index)

    def _complete_grads(self, b: _Bucket):
        work, _, recv, sizes = b.grad_work
        if work is not None:
            work.wait()
        self._log("grad_wait", b.index)
        for u, s, block in _unpacked(b.grad_recv, recv, sizes):
            g = self.grads.get(u.key)
            if g is None:
                g = self.grads[u.key] = torch.zeros(u.shape, dtype=torch.float32, device=recv.device)
            g[s.unit_sel] += block
        b.grad_work = None
        if self.on_grads is not None:
            self.on_grads(b)

    def finish_grads(self) -> None:
        """Issue what is left, wait for every bucket, and sum each owned unit's gradient."""
        if self._grads_done:
            return
        while self._next_issue < len(self.buckets):
            self._issue_grads(self.buckets[self._next_issue], async_op=self.overlap_grad)
            self._next_issue += 1
        while self._grads_in_flight:
            self._complete_grads(self._grads_in_flight.pop(0))
        device = self.params[0].device if self.params else torch.device("cpu")
        for u in self.owned:  # units no rank contributed to (none in a real model)
            if u.key not in self.grads:
                self.grads[u.key] = torch.zeros(u.shape, dtype=torch.float32, device=device)
        self._grads_done = True

    # ------------------------------------------------------------------ parameters
    def start_params(self, masters: dict[str, torch.Tensor]) -> None:
        """Send every holder its slices of the owned units' new values, bucket by bucket in forward
        order, at most WINDOW buckets in flight; with overlap_param the rest go as the next forward
        pass waits for the first ones."""
        self._masters = masters
        self._param_order = list(reversed(self.buckets))
        self._param_next = 0
        self._param_pending = set()
        self._fill_param_window()
        if not self.overlap_param:
            self.finish_params()

    def _fill_param_window(self):
        while self._param_next < len(self._param_order) and len(self._param_pending) < WINDOW:
            self._issue_params(self._param_order[self._param_next])

    def _issue_params(self, b: _Bucket):
        masters = self._masters
        dtype = self.params[b.params[0]].dtype
        device = self.params[b.params[0]].device
        parts = [masters[u.key][s.unit_sel].to(dtype).reshape(-1)
                 for items in b.param_send for u, s in items]
        send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
        recv_sizes = _sizes(b.param_recv)
        recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        work = self._all_to_all(recv, send, recv_sizes, _sizes(b.param_send), self.overlap_param)
        bcast = []
        for u in b.broadcast:
            t = masters[u.key].to(dtype) if u.owner == self.rank else torch.empty(u.shape, dtype=dtype, device=device)
            src = dist.get_global_rank(self.group, u.owner) if self.group is not None else 0
            bcast.append((u, t, dist.broadcast(t, src=src, group=self.group, async_op=self.overlap_param)))
        b.param_work = (work, send, recv, recv_sizes, bcast)
        self._param_pending.add(b.index)
        self._param_next += 1
        self._note_buffers()
        self._log("param_issue", b.index)

    def wait_param_bucket(self, b: _Bucket) -> None:
        if b.index not in self._param_pending:
            if self._param_next >= len(self._param_order) or b not in self._param_order[self._param_next:]:
                return  # done (or nothing was sent)
            while b.index not in self._param_pending:  # keep every rank's issue order
                self._issue_params(self._param_order[self._param_next])
        work, _, recv, sizes, bcast = b.param_work
        if work is not None:
            work.wait()
        self._log("param_wait", b.index)
        with torch.no_grad():
            for u, s, block in _unpacked(b.param_recv, recv, sizes):
                view2d(self.params[u.param_index].data)[s.local_sel] = block
            my_tp = self.coords[self.rank][0]
            for u, t, handle in bcast:
                if handle is not None:
                    handle.wait()
                s = u.slices[my_tp]
                p2d = view2d(self.params[u.param_index].data)
                p2d[s.local_sel] = t[s.unit_sel]
        b.param_work = None
        self._param_pending.discard(b.index)
        self._fill_param_window()

    def wait_params_of(self, module) -> None:
        """Forward pre-hook body: wait for the buckets of ``module``'s own parameters."""
        if not self._param_pending:
            return
        for p in module.parameters(recurse=False):
            i = self.param_position.get(id(p))
            if i is not None:
                self.wait_param_bucket(self.bucket_of_param[i])

    def finish_params(self) -> None:
        for b in self._param_order:
            self.wait_param_bucket(b)

    def _note_buffers(self):
        """Track the peak bytes of live send/receive buffers (what ``buffer_bytes`` plans)."""
        live = 0
        for b in self._grads_in_flight:
            live += sum(t.numel() * t.element_size() for t in b.grad_work[1:3])
        for b in self.buckets:
            if b.param_work is not None and b.index in self._param_pending:
                live += sum(t.numel() * t.element_size() for t in b.param_work[1:3])
                live += sum(t.numel() * t.element_size() for _, t, _ in b.param_work[4])
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, live)

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
        for u, s, block in _unpacked(recv_plan, recv, sizes):
            out[u.key][s.unit_sel] = block
        return out
