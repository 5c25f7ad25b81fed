"""Relayed delivery: sum over data parallelism before the owner hop (``optimizer.delivery=relay``).

Direct delivery (exchange.py) sends an owner every contributor's copy of its units: the D
data-parallel copies of each TP piece of a whole matrix. The link into an owner then carries about
D times the matrices it owns while other links idle (the planner's "busiest link",
memory_plan.link_bytes), and parameters leave an owner D times over on the way back.

Relayed delivery cuts each TP piece of a relayed unit into D ranges of rows, one per rank of that
TP rank's data-parallel group (its *relays*, in rank order), and moves each round in two
all-to-alls (hops):

- gradients: hop 0 sends range j of every contributor's piece to relay j, which sums the D copies
  (a reduce-scatter); hop 1 sends each relay's sum to the unit's owner, which so receives every
  element once;
- parameters: hop 0 sends relay j range j of its TP piece's new values (the owner sends each
  element once per TP piece); hop 1 has every relay forward its range to the other holders of
  the piece (an all-gather).

A relay sums an element's contributions over the same ranks, in the same (rank) order, from zero,
as a direct owner does, and the owner then adds that sum to zero: with fp32 gradients the results
are bit-identical to direct delivery. With bf16 gradients the relay's fp32 sum is rounded to bf16
once more before hop 1.

Per rank, relayed gradients cost (D - 1)/D of the piece in hop 0 plus 1/D in hop 1, against
(about) the whole piece once: about 1/(D - 1) more bytes than a reduce-scatter, for a busiest link
near the bytes sent. Every unit is relayed but sequence-parallel norms (``tp_sum``: each TP rank
holds a partial gradient of the whole unit, which the owner sums over T x D ranks), which go
direct, in hop 0. AdamW chunks are relayed too: they are owned inside their TP rank's
data-parallel group and even over a step, but a round holds the chunks of a few owners only.

Every rank computes the same plan from the same units, owners and coordinates.
"""

from __future__ import annotations

from megatron_osp.optimizer.zero.units import Slice, Unit

DELIVERIES = ("direct", "relay", "auto")
# "auto" relays from this data-parallel size up: there the planner's busiest link is lower relayed
# for OSP at every layout it was run at, Adam's within 7% (docs/benchmarks.md, "Relayed delivery").
AUTO_MIN_DP = 8


def split_rows(s: Slice | None, n: int) -> list[Slice | None]:
    """``s`` cut into ``n`` runs of its rows, by position (None where a run is empty)."""
    if s is None:
        return [None] * n
    k = len(s.local_rows)
    out = []
    for j in range(n):
        a, b = k * j // n, k * (j + 1) // n
        out.append(s.take(a, b) if b > a else None)
    return out


def relayed(u: Unit, dp_size: int, delivery: str) -> bool:
    """Whether ``optimizer.delivery`` relays unit ``u`` at this data-parallel size."""
    if delivery == "direct" or dp_size < 2 or u.tp_sum:
        return False
    return delivery == "relay" or dp_size >= AUTO_MIN_DP


class RelayPlan:
    """This rank's items of each hop of a round, relayed or direct; an item is ``(unit, slice, slot)``."""

    def __init__(self, coords: list[tuple[int, int]], rank: int):
        self.rank, self.coords = rank, coords
        self.tp = coords[rank][0]
        self.relays: dict[int, list[int]] = {}  # TP rank -> its data-parallel group, in rank order
        for r, (t, _) in enumerate(coords):
            self.relays.setdefault(t, []).append(r)
        self.group = self.relays[self.tp]
        self.j = self.group.index(rank)  # this rank is relay j of its TP rank's group
        self.relay_order = sorted(self.relays.items())

    def direct(self, u, slices, to_owner, from_holders):
        """A piece that is not relayed: this rank's slice to its owner and, as owner, every rank's."""
        if slices[self.tp] is not None:
            to_owner.setdefault(u.owner, []).append((u, slices[self.tp], None))
        if u.owner == self.rank:
            for r, (t, _) in enumerate(self.coords):
                if slices[t] is not None:
                    from_holders.setdefault(r, []).append((u, slices[t], None))

    def _owner_side(self, u, slices, ranges, by_relay):
        """As owner: each relay's range of each TP rank's slice, keyed by the relay."""
        for t, group in self.relay_order:
            if slices[t] is not None:
                for r, s in zip(group, ranges[t]):
                    if s is not None:
                        by_relay.setdefault(r, []).append((u, s, None))

    def grad_hops(self, pieces):
        """Gradients. ``pieces``: ``(unit, slices, ranges, relay)`` in round order, ``slices[t]``
        the contributing TP rank t's slice (else None), ``ranges[t]`` its ``split_rows``.
        Returns (hop 0 send, hop 0 receive, hop 1 send, hop 1 receive, number of relay sums):
        items received in hop 0 with a slot are summed into that relay sum, which hop 1 sends."""
        me, group, j = self.rank, self.group, self.j
        s0, r0, s1, r1 = {}, {}, {}, {}
        slots = 0
        for u, slices, ranges, relay in pieces:
            if not relay:
                self.direct(u, slices, s0, r0)
                continue
            if slices[self.tp] is not None:
                mine = ranges[self.tp]
                for r, s in zip(group, mine):  # range j of this rank's slice to relay j
                    if s is not None:
                        s0.setdefault(r, []).append((u, s, None))
                if mine[j] is not None:  # as relay j: every copy of range j, summed, to the owner
                    item = (u, mine[j], slots)
                    for r in group:
                        r0.setdefault(r, []).append(item)
                    s1.setdefault(u.owner, []).append(item)
                    slots += 1
            if u.owner == me:
                self._owner_side(u, slices, ranges, r1)
        return s0, r0, s1, r1, slots

    def param_hops(self, pieces):
        """Parameters. ``pieces``: ``(unit, slices, ranges, relay)``, ``slices[t]`` what TP rank t
        holds (else None). Returns (hop 0 send, hop 0 receive, hop 1 send, hop 1 receive)."""
        me, group, j = self.rank, self.group, self.j
        s0, r0, s1, r1 = {}, {}, {}, {}
        for u, slices, ranges, relay in pieces:
            if not relay:
                self.direct(u, slices, r0, s0)
                continue
            if u.owner == me:
                self._owner_side(u, slices, ranges, s0)
            if slices[self.tp] is not None:
                mine = ranges[self.tp]
                if mine[j] is not None:  # as relay j: range j from the owner, then to the others
                    item = (u, mine[j], None)
                    r0.setdefault(u.owner, []).append(item)
                    for r in group:
                        if r != me:
                            s1.setdefault(r, []).append(item)
                for r, s in zip(group, mine):
                    if s is not None and r != me:
                        r1.setdefault(r, []).append((u, s, None))
        return s0, r0, s1, r1
