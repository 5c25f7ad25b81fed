"""How many elements each rank sends to / receives from every other in Muon's two all-to-alls.

One function for the optimizer (it sizes its receive buffers with it and checks its sends against
it) and for tools/bench_muon.py's communication cost model, so the model is the code.
"""

from __future__ import annotations


def exchange_sizes(blocks, coords, rank: int):
    """(gather_send, gather_recv, scatter_send, scatter_recv) element counts per domain rank.

    Gather: for a TP-sharded logical matrix, the owner's TP peers in the owner's data-parallel
    replica send their pieces to the owner (a replicated matrix is already whole on its owner).
    Scatter: the owner sends every rank of the domain the piece of the update its shard holds.
    """
    world = len(coords)
    my_tp, my_dp = coords[rank]
    g_send, g_recv, s_send, s_recv = ([0] * world for _ in range(4))
    for b in blocks:
        o = b.owner
        if b.sharded and coords[o][1] == my_dp:
            g_send[o] += b.pieces[my_tp].numel
        if o == rank:
            for r, (tp, dp) in enumerate(coords):
                if b.sharded and dp == my_dp:
                    g_recv[r] += b.pieces[tp].numel
                s_send[r] += b.pieces[tp].numel
        s_recv[o] += b.pieces[my_tp].numel
    return g_send, g_recv, s_send, s_recv
