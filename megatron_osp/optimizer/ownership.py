"""Which rank of the TP x DP domain runs Newton-Schulz on which logical matrix.

Each logical matrix gets exactly one owner ("NS home"). Owners are chosen by longest-processing-time
bin packing on the NS FLOPs of the logical shape: matrices in decreasing cost, each to the currently
least-loaded rank. It is deterministic (ties broken by key and rank), so every rank computes the
same table without communicating, and tools/bench_muon.py's cost model uses this very function.
"""

from __future__ import annotations

import heapq

from megatron_osp.optimizer.newton_schulz import ns_flops


def assign_owners(blocks, num_ranks: int, ns_steps: int = 5, cost=None) -> list[int]:
    """Set ``block.owner`` for each block (anything with ``key`` and ``shape``); return per-rank cost.

    The cost of a block is its NS FLOPs unless ``cost(block)`` is given.
    """
    if num_ranks < 1:
        raise ValueError(f"assign_owners needs at least one rank, got {num_ranks}")
    if cost is None:
        cost = lambda b: ns_flops(*b.shape, ns_steps)  # noqa: E731
    costs = [cost(b) for b in blocks]
    order = sorted(range(len(blocks)), key=lambda i: (-costs[i], blocks[i].key))
    heap = [(0, r) for r in range(num_ranks)]
    load = [0] * num_ranks
    for i in order:
        total, rank = heapq.heappop(heap)
        blocks[i].owner = rank
        total += costs[i]
        load[rank] = total
        heapq.heappush(heap, (total, rank))
    return load
