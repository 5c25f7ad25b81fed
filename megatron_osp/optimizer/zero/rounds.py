"""Cutting a bucket's exchange into rounds, so that no owner's packed buffer outgrows a cap.

An owner receives every contributor's slice of its units' gradients (D data-parallel copies of each
TP piece) and sends every holder its slice of their new values, so its packed buffer for a bucket
is about D times the units it owns there. Rounds bound it: each bucket's units are cut into ranges
of unit rows, and the pieces are packed into rounds so that no rank's share of one round (the
elements it receives, for gradients, or sends, for parameters, as owner) exceeds ``cap`` elements.
A single row larger than the cap is a piece on its own (its round holds nothing else of that
owner). A piece keeps every contributor's slice restricted to its rows (``sub_slice``), so each
element of a unit is still summed over the same contributors, in the same order, in one round.

Every rank computes the same rounds from the same units, owners and coordinates: no communication.
"""

from __future__ import annotations

import torch

from megatron_osp.optimizer.zero.units import Slice, Unit


def sub_slice(s: Slice, r0: int, r1: int) -> Slice:
    """``s`` restricted to the unit rows [r0, r1) (same mapping, same columns)."""
    rows = s.unit_sel[0]
    if isinstance(rows, slice):  # a contiguous run of unit rows (almost always): cut by position
        n = rows.stop - rows.start
        a = min(max(r0 - rows.start, 0), n)
        b = max(min(r1 - rows.start, n), a)
        if a == 0 and b == n:
            return s
        return Slice(s.local_rows[a:b], s.unit_rows[a:b], s.local_cols, s.unit_cols)
    keep = (s.unit_rows >= r0) & (s.unit_rows < r1)
    if bool(keep.all()):
        return s
    return Slice(s.local_rows[keep], s.unit_rows[keep], s.local_cols, s.unit_cols)


def row_costs(u: Unit, ranks_per_tp: dict[int, int]) -> torch.Tensor:
    """Elements of each unit row in the owner's buffer: ``ranks_per_tp[t]`` ranks of TP rank ``t``
    each send (or receive) slice ``u.slices[t]``."""
    costs = torch.zeros(u.shape[0], dtype=torch.int64)
    for t, n in ranks_per_tp.items():
        s = u.slices[t]
        if s.numel and n:
            width = s.unit_cols[1] - s.unit_cols[0]
            costs.index_add_(0, s.unit_rows, torch.full((len(s.unit_rows),), n * width, dtype=torch.int64))
    return costs


def plan_rounds(costed, cap: int) -> list[list[tuple[Unit, int, int]]]:
    """Pack ``(unit, row costs)`` pairs, in order, into rounds of ``(unit, first row, end row)``.

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
