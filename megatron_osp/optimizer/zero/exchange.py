"""Moving gradients to unit owners and updated parameters back, per bucket, optionally overlapped.

Parameters of a pipeline stage are grouped into buckets in backward order (the last layers first),
``bucket_elems`` local elements or more each, the same on every rank of the stage's TP x DP domain.

Gradients (reduce-scatter semantics, no all-reduce): once every parameter of a bucket has its
gradient of the step's last micro-batch (a hook after Megatron DDP's own accumulation into
``main_grad``), all-to-alls send each owner the slices of its units that this rank holds, scaled by
1/DP and cast to ``grad_dtype`` (fp32 by default). A rank contributes to a unit when its TP slice is
its own (the parameter is split over TP), when each TP rank holds a partial gradient
(sequence-parallel norms: the owner sums all of them, which replaces Megatron's TP all-reduce), or,
for replicated parameters, when it is in the owner's TP rank. Owners sum contributions in rank
order, so results do not depend on timing. With ``overlap_grad`` the all-to-alls are issued from the
backward pass (asynchronously); without it, all buckets go at the end.

Rounds (rounds.py): an owner receives every contributor's copy of its units' slices, D times the
units it owns in the bucket, so each bucket is sent in one or more *rounds* that cut large units
into ranges of rows (the same fraction of every TP rank's slice) so that no rank receives more
than ``round_elems`` elements in one round (default: ``bucket_elems``). Each element is still
summed over the same contributors in the same order, in one round: the results are bit-identical
to one all-to-all per bucket. A round is one all-to-all (a *hop*), or two where it is relayed
(relay.py, ``delivery``). At most ``WINDOW`` hops are in flight: issuing one more first completes
(waits for and sums) the oldest, so the packed send/receive buffers stay a couple of rounds large
whatever the model size.

Parameters: after the step, owners send every holder its slice of each updated unit (in the
parameters' dtype), bucket by bucket in forward order, in rounds that bound what an owner sends
(the same cap), ``WINDOW`` rounds at a time. With ``overlap_param`` the next forward pass waits for
a bucket (all its rounds) only in the pre-hook of the first module that uses it (Megatron's
``overlap_param_gather`` semantics) and each completed round sends the next one; without it, the
step waits for all of them. Large units every rank holds whole (EmbProj under TP) go back by
broadcast with their bucket's first round, so their owner does not send them to every rank alone.

``plan_bytes()`` (bytes each rank sends per step) and ``buffer_bytes()`` (peak send + receive
buffers, over a window of rounds) are what tools/plan_memory.py reports; the tests measure both.
``events`` (a list, when given) records issue/wait order of (bucket, round) for the overlap tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_osp.optimizer.zero.relay import RelayPlan, relayed, split_rows
from megatron_osp.optimizer.zero.rounds import (Bucket, Hop, Round, flight_peak, in_rank_order, plan_rounds, position_costs,
                                                positions, split_sizes, sub_positions, unpacked)
from megatron_osp.optimizer.zero.units import Unit

GRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WINDOW = 2  # rounds in flight at once, per direction: bounds the send/receive buffers
ROUND_ELEMS = 40_000_000  # default cap of one round (elements an owner receives / sends)
BROADCAST_MIN = 1 << 20  # elements: replicated units at least this large go back by broadcast


def view2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.ndim == 2 else t.view(-1, 1)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Exchange:
    def __init__(self, params, units, coords, rank, group, *, dp_size: int, bucket_elems: int = 200_000_000,
                 round_elems: int | None = None, grad_dtype=torch.float32, overlap_grad: bool = False,
                 overlap_param: bool = False, delivery: str = "direct", events: list | None = None,
                 broadcast_min: int = BROADCAST_MIN, plan_cache: dict | None = None):
        """``delivery``: "direct", "relay" or "auto" (relay.py: which units are relayed). ``plan_cache``: a dict
        shared by the Exchanges of every rank of one domain (same params, units, owners, coords and
        settings): the rounds and their slices, which every rank computes alike, are then computed
        once (the memory planner builds one Exchange per rank)."""
        self.params, self.units, self.coords = params, units, coords
        self.rank, self.group, self.world = rank, group, len(coords)
        self.dp_size, self.dp_scale = dp_size, 1.0 / dp_size
        self.grad_dtype = grad_dtype
        self.overlap_grad, self.overlap_param = overlap_grad, overlap_param
        self.delivery = delivery
        self.events = events
        self.broadcast_min = broadcast_min
        self.round_elems = min(bucket_elems, ROUND_ELEMS) if round_elems is None else round_elems
        if self.round_elems < 1:
            raise ValueError(f"round_elems must be >= 1, got {self.round_elems}")
        self.buckets = self._make_buckets(bucket_elems)
        self.bucket_of_param = {}
        for b in self.buckets:
            for i in b.params:
                self.bucket_of_param[i] = b
        for u in units:
            self.bucket_of_param[u.param_index].units.append(u)
        self._relay_plan = RelayPlan(coords, rank)
        self._ranks_per_tp = {t: len(group) for t, group in self._relay_plan.relays.items()}
        self._cache = {} if plan_cache is None else plan_cache
        for b in self.buckets:
            self._plan(b)
        self._cache = None
        self.relay = any(len(rd.hops) > 1 for b in self.buckets for rd in b.grad_rounds + b.param_rounds)
        self._param_order = [rd for b in reversed(self.buckets) for rd in b.param_rounds]  # forward order
        for i, rd in enumerate(self._param_order):
            rd.position = i
        self.owned = [u for u in units if u.owner == rank]
        self.param_position = {id(p): i for i, p in enumerate(params)}
        self._next_issue = 0
        self._grads_done = False
        self._grads_in_flight: list[Round] = []
        self._param_next = len(self._param_order)  # nothing to send before the first step
        self._params_in_flight: list[Round] = []
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
                buckets.append(Bucket(len(buckets), current))
                current, size = [], 0
        if current:
            buckets.append(Bucket(len(buckets), current))
        return buckets

    def contributes(self, u: Unit, tp: int) -> bool:
        if u.slices[tp].numel == 0:
            return False
        return u.tp_sharded or u.tp_sum or tp == self.coords[u.owner][0]

    def broadcasts(self, u: Unit) -> bool:
        """A large unit that every rank of the domain holds whole (an EmbProj matrix under TP) goes
        back by broadcast (each rank forwards it once) instead of from its owner to every rank."""
        return not u.tp_sharded and self.world > 2 and u.numel >= self.broadcast_min

    def _rounds(self, b: Bucket):
        """The bucket's gradient and parameter rounds, each a list of pieces ``(unit, slices,
        ranges, relay)``: ``slices[t]`` is TP rank t's slice restricted to the piece's rows, None
        where it takes no part (no slice there, or, for gradients, it does not contribute);
        ``relay`` says whether the piece is relayed, and then ``ranges[t]`` cuts ``slices[t]`` into
        one run of rows per relay (relay.py)."""
        key = ("rounds", b.index)
        if key not in self._cache:
            tps = self._ranks_per_tp.items()

            def holds(u, t):
                return u.slices[t].numel > 0

            def piece(u, r0, r1, takes_part):
                slices = [self._sub(u, t, r0, r1) if takes_part(u, t) else None for t in range(len(u.slices))]
                relay = relayed(u, self.dp_size, self.delivery)
                ranges = [split_rows(s, self._ranks_per_tp.get(t, 0)) for t, s in enumerate(slices)] if relay else None
                return u, slices, ranges, relay

            out = []  # gradients: the contributors send; parameters (not broadcast): the holders receive
            for takes_part, units in ((self.contributes, b.units),
                                      (holds, [u for u in b.units if not self.broadcasts(u)])):
                costed = [(u, position_costs(u, {t: n for t, n in tps if takes_part(u, t)})) for u in units]
                out.append([[piece(u, r0, r1, takes_part) for u, r0, r1 in pieces]
                            for pieces in plan_rounds(costed, self.round_elems)])
            self._cache[key] = out
        return self._cache[key]

    @staticmethod
    def _sub(u: Unit, t: int, r0: int, r1: int):
        s = sub_positions(u.slices[t], r0, r1, positions(u))
        return s if s.numel else None

    def _plan(self, b: Bucket):
        """The bucket's gradient and parameter rounds (rounds.py), as this rank's send/receive lists."""
        b.broadcast = [u for u in b.units if self.broadcasts(u)]
        grad_rounds, param_rounds = self._rounds(b)
        w = self.world
        for k, pieces in enumerate(grad_rounds):
            if any(relay for *_, relay in pieces):
                s0, r0, s1, r1, slots = self._relay_plan.grad_hops(pieces)
                b.grad_rounds.append(Round(b, k, [Hop(s0, r0, w), Hop(s1, r1, w)], slots))
            else:
                send, recv = self._by_rank(pieces)
                b.grad_rounds.append(Round(b, k, [Hop(send, recv, w)]))
        for k, pieces in enumerate(param_rounds):
            if any(relay for *_, relay in pieces):
                s0, r0, s1, r1 = self._relay_plan.param_hops(pieces)
                b.param_rounds.append(Round(b, k, [Hop(s0, r0, w), Hop(s1, r1, w)]))
            else:
                recv, send = self._by_rank(pieces)
                b.param_rounds.append(Round(b, k, [Hop(send, recv, w)]))

    def _by_rank(self, pieces):
        """(this rank's items for each owner, the items of each rank for this rank as owner)."""
        mine, theirs = {}, {}
        for u, slices, _, _ in pieces:
            self._relay_plan.direct(u, slices, mine, theirs)
        return mine, theirs

    def plan_bytes(self, param_bytes: int) -> dict[str, int]:
        """Bytes this rank sends to other ranks per step: gradients and parameters (broadcasts
        counted as a ring forwards them: (n - 1)/n of the tensor per rank)."""
        grads, params = self.round_traffic()
        g = sum(sent for sent, _ in grads)
        p = sum(sent for sent, _ in params) + self.broadcast_numel() * (self.world - 1) / self.world
        gb = torch.empty(0, dtype=self.grad_dtype).element_size()
        return {"grads": g * gb, "params": int(p * param_bytes)}

    def round_traffic(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Elements this rank sends to and receives from other ranks in each all-to-all (a round's
        hops in turn): gradients (buckets in backward order), parameters (forward order; broadcasts
        not included). Every rank of the domain lists the same all-to-alls in the same order."""
        def traffic(rounds):
            return [(sum(h.send_sizes) - h.send_sizes[self.rank], sum(h.recv_sizes) - h.recv_sizes[self.rank])
                    for rd in rounds for h in rd.hops]
        return traffic(rd for b in self.buckets for rd in b.grad_rounds), traffic(self._param_order)

    def broadcast_numel(self) -> int:
        """Elements of the units that go back by broadcast (the same for every rank)."""
        return sum(u.numel for b in self.buckets for u in b.broadcast)

    def round_buffer_bytes(self, param_bytes: int) -> tuple[list[list[int]], list[list[int]]]:
        """Send + receive buffer bytes of each hop of each round, in issue order: gradients
        (buckets in backward order), parameters (buckets in forward order; a bucket's broadcasts
        with its first round's first hop)."""
        gb = torch.empty(0, dtype=self.grad_dtype).element_size()
        grads = [[h.numel * gb for h in rd.hops] for b in self.buckets for rd in b.grad_rounds]
        params = [[(h.numel + (sum(u.numel for u in rd.bucket.broadcast) if rd.index == 0 and i == 0 else 0))
                   * param_bytes for i, h in enumerate(rd.hops)] for rd in self._param_order]
        return grads, params

    def buffer_bytes(self, param_bytes: int) -> int:
        """Peak bytes of send + receive buffers: at most WINDOW hops are in flight at once."""
        grads, params = self.round_buffer_bytes(param_bytes)
        return max(flight_peak(grads, fill=False, window=WINDOW), flight_peak(params, fill=True, window=WINDOW))

    # ------------------------------------------------------------------ flight
    def _pop_grads(self):
        self._pop(self._grads_in_flight, self._complete_grad_hop, self._issue_grad_hop)

    def _pop_params(self):
        self._pop(self._params_in_flight, self._complete_param_hop, self._issue_param_hop)

    @staticmethod
    def _pop(queue, complete, issue):
        """Complete the oldest hop in flight; a round with a hop left issues it (at the back)."""
        rd = queue.pop(0)
        hop = rd.work[0]
        complete(rd)
        if hop + 1 < len(rd.hops):
            issue(rd, hop + 1)

    # ------------------------------------------------------------------ gradients
    def _log(self, *event):
        if self.events is not None:
            self.events.append(event)

    def begin_step(self):
        for b in self.buckets:
            b.pending = len(b.params)
            for rd in b.grad_rounds:
                rd.work = rd.sums = None
        self._next_issue = 0
        self._grads_done = False
        self._grads_in_flight = []
        self.grads = {}

    def grad_ready(self, param) -> None:
        """Called after Megatron DDP accumulated ``param``'s last micro-batch gradient."""
        if not self.overlap_grad or self._grads_done:
            return
        b = self.bucket_of_param[self.param_position[id(param)]]
        b.pending -= 1
        while self._next_issue < len(self.buckets) and self.buckets[self._next_issue].pending <= 0:
            self._issue_grads(self.buckets[self._next_issue])
            self._next_issue += 1

    def _issue_grads(self, b: Bucket):
        """All of the bucket's rounds, each after the oldest hops in flight are done if WINDOW are."""
        for rd in b.grad_rounds:
            while len(self._grads_in_flight) >= WINDOW:
                self._pop_grads()
            self._issue_grad_hop(rd, 0)

    def _issue_grad_hop(self, rd: Round, h: int):
        hop, device = rd.hops[h], self.params[0].device
        if h == 0:
            parts = [(view2d(self.params[u.param_index].main_grad)[s.local_sel_on(device)] * self.dp_scale)
                     .to(self.grad_dtype).reshape(-1) for u, s, _ in in_rank_order(hop.send)]
            send = torch.cat(parts) if parts else torch.empty(0, dtype=self.grad_dtype, device=device)
        else:  # the relay's sums, packed in hop 1's send order
            send, rd.sums = rd.sums.to(self.grad_dtype), None
        recv = torch.empty(sum(hop.recv_sizes), dtype=self.grad_dtype, device=device)
        work = self._all_to_all(recv, send, hop.recv_sizes, hop.send_sizes, self.overlap_grad)
        rd.work = (h, work, send, recv, ())
        self._grads_in_flight.append(rd)
        self._note_buffers()
        self._log("grad_issue" if h == 0 else "grad_relay", rd.bucket.index, rd.index)

    def _complete_grad_hop(self, rd: Round):
        h, work, _, recv, _ = rd.work
        if work is not None:
            work.wait()
        hop = rd.hops[h]
        if h + 1 < len(rd.hops):  # a relay: sum each slot's contributions, in rank order, from zero
            rd.sums = torch.zeros(sum(rd.hops[h + 1].send_sizes), dtype=torch.float32, device=recv.device)
        for (u, s, slot), block in unpacked(hop.recv, recv, hop.recv_sizes):
            if slot is not None:
                at = rd.slot_at[slot]
                rd.sums[at:at + block.numel()].view_as(block).add_(block)
                continue
            g = self.grads.get(u.key)
            if g is None:
                g = self.grads[u.key] = torch.zeros(u.shape, dtype=torch.float32, device=recv.device)
            g[s.unit_sel_on(g.device)] += block
        rd.work = None
        if h + 1 == len(rd.hops):
            self._log("grad_wait", rd.bucket.index, rd.index)
            if self.on_grads is not None and rd is rd.bucket.grad_rounds[-1]:
                self.on_grads(rd.bucket)  # rounds complete in issue order: the bucket is all in

    def finish_grads(self) -> None:
        """Issue what is left, wait for every round, and sum each owned unit's gradient."""
        if self._grads_done:
            return
        while self._next_issue < len(self.buckets):
            self._issue_grads(self.buckets[self._next_issue])
            self._next_issue += 1
        while self._grads_in_flight:
            self._pop_grads()
        device = self.params[0].device if self.params else torch.device("cpu")
        for u in self.owned:  # units no rank contributed to (none in a real model)
            if u.key not in self.grads:
                self.grads[u.key] = torch.zeros(u.shape, dtype=torch.float32, device=device)
        self._grads_done = True

    # ------------------------------------------------------------------ parameters
    def start_params(self, masters: dict[str, torch.Tensor]) -> None:
        """Send every holder its slices of the owned units' new values, round by round with the
        buckets in forward order, at most WINDOW hops in flight; with overlap_param the rest go as
        the next forward pass waits for the first ones."""
        self._masters = masters
        self._param_next = 0
        self._params_in_flight = []
        self._fill_param_window()
        if not self.overlap_param:
            self.finish_params()

    def _fill_param_window(self):
        while self._param_next < len(self._param_order) and len(self._params_in_flight) < WINDOW:
            self._issue_param_hop(self._param_order[self._param_next], 0)
            self._param_next += 1

    def _issue_param_hop(self, rd: Round, h: int):
        b, hop = rd.bucket, rd.hops[h]
        dtype, device = self.params[b.params[0]].dtype, self.params[b.params[0]].device
        if h == 0:
            parts = [self._masters[u.key][s.unit_sel_on(device)].to(dtype).reshape(-1) for u, s, _ in in_rank_order(hop.send)]
        else:  # a relay forwards the values hop 0 wrote into its own parameters
            parts = [view2d(self.params[u.param_index].data)[s.local_sel_on(device)].reshape(-1)
                     for u, s, _ in in_rank_order(hop.send)]
        send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
        recv = torch.empty(sum(hop.recv_sizes), dtype=dtype, device=device)
        work = self._all_to_all(recv, send, hop.recv_sizes, hop.send_sizes, self.overlap_param)
        bcast = []
        for u in b.broadcast if rd.index == 0 and h == 0 else ():
            t = self._masters[u.key].to(dtype) if u.owner == self.rank else torch.empty(u.shape, dtype=dtype, device=device)
            src = dist.get_global_rank(self.group, u.owner) if self.group is not None else 0
            bcast.append((u, t, dist.broadcast(t, src=src, group=self.group, async_op=self.overlap_param)))
        rd.work = (h, work, send, recv, bcast)
        self._params_in_flight.append(rd)
        self._note_buffers()
        self._log("param_issue" if h == 0 else "param_relay", b.index, rd.index)

    def _complete_param_hop(self, rd: Round):
        h, work, _, recv, bcast = rd.work
        if work is not None:
            work.wait()
        hop = rd.hops[h]
        with torch.no_grad():
            for (u, s, _), block in unpacked(hop.recv, recv, hop.recv_sizes):
                view2d(self.params[u.param_index].data)[s.local_sel_on(block.device)] = block
            my_tp = self.coords[self.rank][0]
            for u, t, handle in bcast:
                if handle is not None:
                    handle.wait()
                s = u.slices[my_tp]
                p2d = view2d(self.params[u.param_index].data)
                p2d[s.local_sel_on(p2d.device)] = t[s.unit_sel_on(t.device)]
        rd.work = None
        if h + 1 == len(rd.hops):
            self._log("param_wait", rd.bucket.index, rd.index)

    def wait_param_bucket(self, b: Bucket) -> None:
        """Complete every round of bucket ``b``. Hops complete in issue order (the same on every
        rank), and each completion issues the round's next hop or the next round, so at most
        WINDOW hops are ever in flight."""
        last = b.param_rounds[-1]
        while last.position >= self._param_next or last.work is not None:
            if not self._params_in_flight:
                self._issue_param_hop(self._param_order[self._param_next], 0)
                self._param_next += 1
            self._pop_params()
            self._fill_param_window()

    def wait_params_of(self, module) -> None:
        """Forward pre-hook body: wait for the buckets of ``module``'s own parameters."""
        if not self._params_in_flight:
            return
        for p in module.parameters(recurse=False):
            i = self.param_position.get(id(p))
            if i is not None:
                self.wait_param_bucket(self.bucket_of_param[i])

    def finish_params(self) -> None:
        for b in reversed(self.buckets):
            self.wait_param_bucket(b)

    def _note_buffers(self):
        """Track the peak bytes of live send/receive buffers (what ``buffer_bytes`` plans)."""
        live = sum(_nbytes(rd.work[2:4]) + _nbytes(t for _, t, _ in rd.work[4])
                   for rd in self._grads_in_flight + self._params_in_flight)
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
        recv_plan: dict[int, list] = {}
        for u in self.units:
            if u.slices[my_tp].numel and my_dp == self.coords[u.owner][1] and (u.tp_sharded or my_tp == self.coords[u.owner][0]):
                send[u.owner].append(read(u, u.slices[my_tp]).float().reshape(-1))
            if u.owner == self.rank:
                for r, (tp, dp) in enumerate(self.coords):
                    if dp == my_dp and u.slices[tp].numel and (u.tp_sharded or tp == my_tp):
                        recv_plan.setdefault(r, []).append((u, u.slices[tp]))
        send_flat = [torch.cat(s) if s else torch.empty(0, device=device) for s in send]
        sizes = split_sizes(recv_plan, self.world)
        recv = torch.empty(sum(sizes), device=device)
        self._all_to_all(recv, torch.cat(send_flat), sizes, [t.numel() for t in send_flat], False)
        out = {u.key: torch.zeros(u.shape, dtype=torch.float32, device=device) for u in self.owned}
        for (u, s), block in unpacked(recv_plan, recv, sizes):
            out[u.key][s.unit_sel_on(device)] = block
        return out
