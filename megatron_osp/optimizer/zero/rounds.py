"""Cutting a bucket's exchange into rounds, so that no owner's packed buffer outgrows a cap.

An owner receives every contributor's slice of its units' gradients (D data-parallel copies of each
TP piece) and sends every holder its slice of their new values, so its packed buffer for a bucket
is about D times the units it owns there. Rounds bound it: each bucket's units are cut into
*pieces*, and the pieces are packed into rounds so that no rank's share of one round (the elements
it receives, for gradients, or sends, for parameters, as owner) exceeds ``cap`` elements.

A piece is a range of *positions*: position i of a unit is row i of every TP rank's slice (its
i-th row in the slice's order; where slices differ in length, the rows whose scaled position
falls at i). Cutting every TP rank's slice at the same fraction keeps the TP ranks' loads in a
round even (cutting unit rows would give a column-parallel matrix's first rounds to TP rank 0
alone). A single position larger than the cap is a piece on its own (its round holds nothing else
of that owner). Each element of a unit has one position, and every contributor of that element
(the D copies of its TP slice; for sequence-parallel norms, every TP rank, whose slices are the
whole unit in the same order) sends it in the same round: each element is still summed over the
same contributors, in the same order, in one round.

Every rank computes the same rounds from the same units, owners and coordinates: no communication.
A ``Round`` is one all-to-all (``Hop``) or two where it is relayed (relay.py); a hop lists the
(unit, slice, slot) items this rank sends to and receives from each rank, packed in rank order.
"""

from __future__ import annotations

import torch

from megatron_osp.optimizer.zero.units import Slice, Unit


class Hop:
    """One all-to-all: the items sent to / received from each rank (ranks with none left out). An
    item is ``(unit, slice, slot)``; ``slot`` numbers a relay's sums (relay.py), else None."""

    def __init__(self, send: dict, recv: dict, world: int):
        self.send: dict[int, list[tuple[Unit, object, int | None]]] = send  # dst rank -> items
        self.recv: dict[int, list[tuple[Unit, object, int | None]]] = recv  # src rank -> items
        self.send_sizes, self.recv_sizes = split_sizes(send, world), split_sizes(recv, world)  # elements per rank
        self.numel = sum(self.send_sizes) + sum(self.recv_sizes)  # of both packed buffers


class Round:
    """A bucket's round: one hop (direct delivery) or two (relayed, relay.py), issued in turn."""

    def __init__(self, bucket: "Bucket", index: int, hops: list[Hop], slots: int = 0):
        self.bucket, self.index, self.hops = bucket, index, hops
        self.slot_at: list[int] = slot_offsets(hops[-1].send, slots) if slots else []
        self.work = None  # while in flight: (hop, handle, send buffer, receive buffer, broadcasts)
        self.sums = None  # relayed gradients between the hops: the relay's sums, packed as hop 1 sends
        self.position = 0  # parameter rounds: place in the forward issue order


class Bucket:
    def __init__(self, index: int, params: list[int]):
        self.index = index
        self.params = params  # param indices
        self.units: list[Unit] = []
        self.broadcast: list[Unit] = []
        self.grad_rounds: list[Round] = []
        self.param_rounds: list[Round] = []  # the first one also carries the broadcasts
        self.pending = len(params)


def split_sizes(by_rank: dict, world: int) -> list[int]:
    sizes = [0] * world
    for r, items in by_rank.items():  # only the ranks with items (most rounds involve few)
        sizes[r] = sum(item[1].numel for item in items)
    return sizes


def in_rank_order(by_rank: dict):
    for r in sorted(by_rank):
        yield from by_rank[r]


def slot_offsets(send: dict, slots: int) -> list[int]:
    """Where each relay sum starts in the packed send buffer of a relayed round's hop 1."""
    at, out = 0, [0] * slots
    for _, s, slot in in_rank_order(send):
        out[slot] = at
        at += s.numel
    return out


def unpacked(by_rank: dict, recv: torch.Tensor, sizes: list[int]):
    """(item, 2-D block) for each slice of a received packed buffer, in the plan's order."""
    for r, seg in enumerate(recv.split(sizes)):
        at = 0
        for item in by_rank.get(r, ()):
            s = item[1]
            k, w = len(s.local_rows), s.local_cols[1] - s.local_cols[0]
            yield item, seg[at:at + k * w].view(k, w)
            at += k * w


def positions(u: Unit) -> int:
    """The unit's number of positions: its longest TP slice's rows."""
    return max(len(s.local_rows) for s in u.slices)


def sub_positions(s: Slice, i0: int, i1: int, n: int) -> Slice:
    """``s`` restricted to the positions [i0, i1) of ``n``: its rows p with p * n // len in range."""
    k = len(s.local_rows)
    a, b = -(-i0 * k // n), -(-i1 * k // n)  # ceil: the first row at or after each bound
    return s if a == 0 and b == k else s.take(a, b)


def position_costs(u: Unit, ranks_per_tp: dict[int, int]) -> torch.Tensor:
    """Elements of each position in the owner's buffer: ``ranks_per_tp[t]`` ranks of TP rank ``t``
    each send (or receive) slice ``u.slices[t]``."""
    n = positions(u)
    costs = torch.zeros(n, dtype=torch.int64)
    for t, count in ranks_per_tp.items():
        s = u.slices[t]
        k = len(s.local_rows)
        if s.numel and count:
            at = torch.arange(k, dtype=torch.int64) * n // k
            costs.index_add_(0, at, torch.full((k,), count * (s.local_cols[1] - s.local_cols[0]), dtype=torch.int64))
    return costs


def plan_rounds(costed, cap: int) -> list[list[tuple[Unit, int, int]]]:
    """Pack ``(unit, position costs)`` pairs, in order, into rounds of ``(unit, first, end position)``.

    Each owner fills its rounds one after another, cutting a unit where the round is full; rounds of
    different owners are shared. Always at least one round (maybe empty), so every rank issues the
    same number of collectives.
    """
    if cap < 1:
        raise ValueError(f"the round cap must be >= 1 element, got {cap}")
    rounds: list[list[tuple[Unit, int, int]]] = [[]]
    at: dict[int, tuple[int, int]] = {}  # owner -> (its current round, elements already in it)
    for u, costs in costed:
        total = torch.cumsum(costs, 0)
        if len(total) == 0 or int(total[-1]) == 0:
            continue
        k, load = at.get(u.owner, (0, 0))
        i, done = 0, 0  # next row, elements of the rows before it
        while i < len(total):
            j = int(torch.searchsorted(total, done + cap - load, right=True))
            if j <= i:  # row i does not fit in what is left of round k
                if load:
                    k, load = k + 1, 0
                    continue
                j = i + 1  # a row larger than the cap alone: a piece of its own
            while len(rounds) <= k:
                rounds.append([])
            rounds[k].append((u, i, j))
            load += int(total[j - 1]) - done
            done, i = int(total[j - 1]), j
        at[u.owner] = (k, load)
    return rounds


def flight_peak(hop_sizes: list[list[int]], *, fill: bool, window: int) -> int:
    """The most bytes in flight at once when hops of ``hop_sizes`` (per round, its hops' buffer
    bytes, in issue order) go as exchange.Exchange sends them: at most ``window`` hops in flight,
    the oldest completed first, a completed hop issuing its round's next one at the back. Gradients
    (``fill=False``) make room before each round; parameters (``fill=True``) fill the window, then
    complete the oldest and fill again."""
    queue: list[tuple[int, int]] = []
    peak, nxt, n = 0, 0, len(hop_sizes)

    def issue(r, h):
        nonlocal peak
        queue.append((r, h))
        peak = max(peak, sum(hop_sizes[a][b] for a, b in queue))

    def pop():
        r, h = queue.pop(0)
        if h + 1 < len(hop_sizes[r]):
            issue(r, h + 1)

    if not fill:
        for r in range(n):
            while len(queue) >= window:
                pop()
            issue(r, 0)
        while queue:
            pop()
        return peak
    while queue or nxt < n:
        while nxt < n and len(queue) < window:
            issue(nxt, 0)
            nxt += 1
        if queue:
            pop()
    return peak
