"""Which rank of the TP x DP domain runs Newton-Schulz on which logical matrix.

Each logical matrix gets exactly one owner ("NS home"). Owners are chosen by longest-processing-time
bin packing on the NS FLOPs of the logical shape: matrices in decreasing cost, each to the currently
least-loaded rank. It is deterministic (ties broken by key and rank), so every rank computes the
same table without communicating, and tools/bench_muon.py's cost model uses this very function.
"""

from __future__ import annotations

import heapq

from megatron_osp.optimizer.newton_schulz import ns_flops


def assign_owners(blocks, num_ranks: int, ns_steps: int = 5) -> list[int]:
    """Set ``block.owner`` for each block (anything with ``key`` and ``shape``); return per-rank FLOPs."""
    if num_ranks < 1:
        raise ValueError(f"assign_owners needs at least one rank, got {num_ranks}")
    order = sorted(range(len(blocks)), key=lambda i: (-ns_flops(*blocks[i].shape, ns_steps), blocks[i].key))
    heap = [(0, r) for r in range(num_ranks)]
    load = [0] * num_ranks
    for i in order:
        cost, rank = heapq.heappop(heap)
        blocks[i].owner = rank
        cost += ns_flops(*blocks[i].shape, ns_steps)
        load[rank] = cost
        heapq.heappush(heap, (cost, rank))
    return load
