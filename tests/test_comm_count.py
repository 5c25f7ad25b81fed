"""CommCounter counts each torch.distributed op by the bus-bytes model of its docstring.

Every expected value below is computed here from the tensor sizes and the formula (not read back
from the counter), at 2 and 4 gloo ranks; the ops must still compute the right results while
counted, async handles must still wait, and nothing may be counted after the block.
"""

import warnings

import pytest
import torch

from megatron_osp.testing.distributed import run_distributed

F32 = 4


def _expected(n: int, rank: int) -> dict[str, int]:
    """Bytes this rank sends for each op that _counted_ops issues, by the stated model."""
    splits = _splits(n)
    return {
        "all_reduce": 2 * (n - 1) * (12 * n * F32) // n,
        "reduce_scatter_tensor": (n - 1) * (6 * n * F32) // n,
        "_reduce_scatter_base": (n - 1) * (6 * n * F32) // n,
        "reduce_scatter": (n - 1) * (n * 5 * F32) // n,
        "all_gather_into_tensor": (n - 1) * (10 * n * F32) // n,
        "_all_gather_base": (n - 1) * (10 * n * F32) // n,
        "all_gather": (n - 1) * (n * 3 * 8) // n,  # float64 inputs
        "all_to_all_single": sum(splits[rank][j] for j in range(n) if j != rank) * 7 * F32,
        "all_to_all": (n - 1) * 3 * F32,  # gloo's list all_to_all needs equal sizes
        "broadcast": (n - 1) * (9 * F32) // n,
        "reduce": (n - 1) * (9 * F32) // n,
        "isend": 11 * F32,
        "irecv": 0,
        "send": 13 * F32,
        "recv": 0,
        "batch_isend_irecv": 17 * F32,
    }


def _splits(n: int) -> list[list[int]]:
    """rows[i][j]: rows rank i sends to rank j in all_to_all_single (uneven on purpose)."""
    return [[(i + 2 * j) % 3 + 1 for j in range(n)] for i in range(n)]


def _counted_ops(rank: int, n: int) -> list[str]:
    """Issue one call of every counted op with results checked; return a list of failures."""
    import torch.distributed as dist

    bad = []

    def check(name, got, want):
        if not torch.equal(got, want):
            bad.append(f"{name}: got {got.tolist()} want {want.tolist()}")

    x = torch.full((12 * n,), float(rank + 1))
    handle = dist.all_reduce(x, async_op=True)  # async: must return a working handle
    handle.wait()
    check("all_reduce", x, torch.full((12 * n,), float(n * (n + 1) // 2)))

    inp = torch.arange(6 * n, dtype=torch.float32)
    out = torch.empty(6)
    dist.reduce_scatter_tensor(out, inp)
    check("reduce_scatter_tensor", out, n * inp[6 * rank : 6 * rank + 6])
    out.zero_()
    dist._reduce_scatter_base(out, inp, async_op=True).wait()
    check("_reduce_scatter_base", out, n * inp[6 * rank : 6 * rank + 6])
    out5 = torch.empty(5)
    dist.reduce_scatter(out5, [torch.full((5,), float(j)) for j in range(n)])
    check("reduce_scatter", out5, torch.full((5,), float(n * rank)))

    full = torch.empty(10 * n)
    dist.all_gather_into_tensor(full, torch.full((10,), float(rank)))
    check("all_gather_into_tensor", full, torch.arange(n).repeat_interleave(10).float())
    full.zero_()
    dist._all_gather_base(full, torch.full((10,), float(rank)), async_op=True).wait()
    check("_all_gather_base", full, torch.arange(n).repeat_interleave(10).float())
    parts = [torch.empty(3, dtype=torch.float64) for _ in range(n)]
    dist.all_gather(parts, torch.full((3,), float(rank), dtype=torch.float64))
    check("all_gather", torch.stack(parts), torch.arange(n, dtype=torch.float64)[:, None].expand(n, 3))

    splits = _splits(n)
    send_rows = splits[rank]
    recv_rows = [splits[i][rank] for i in range(n)]
    a2a_in = torch.full((sum(send_rows), 7), float(rank))
    a2a_out = torch.empty(sum(recv_rows), 7)
    dist.all_to_all_single(a2a_out, a2a_in, output_split_sizes=recv_rows, input_split_sizes=send_rows)
    want = torch.cat([torch.full((recv_rows[i], 7), float(i)) for i in range(n)])
    check("all_to_all_single", a2a_out, want)
    outs = [torch.empty(3) for _ in range(n)]
    dist.all_to_all(outs, [torch.full((3,), float(rank * n + j)) for j in range(n)])
    check("all_to_all", torch.cat(outs), torch.cat([torch.full((3,), float(i * n + rank)) for i in range(n)]))

    b = torch.full((9,), float(rank))
    dist.broadcast(b, src=n - 1)
    check("broadcast", b, torch.full((9,), float(n - 1)))
    r = torch.ones(9)
    dist.reduce(r, dst=0)
    if rank == 0:
        check("reduce", r, torch.full((9,), float(n)))

    nxt, prv = (rank + 1) % n, (rank - 1) % n
    got11 = torch.empty(11)
    reqs = [dist.isend(torch.full((11,), float(rank)), nxt), dist.irecv(got11, prv)]
    for req in reqs:
        req.wait()
    check("isend/irecv", got11, torch.full((11,), float(prv)))
    got13 = torch.empty(13)
    if rank % 2 == 0:  # even ranks send first, odd ranks receive first: no deadlock at any n
        dist.send(torch.full((13,), float(rank)), nxt)
        dist.recv(got13, prv)
    else:
        dist.recv(got13, prv)
        dist.send(torch.full((13,), float(rank)), nxt)
    check("send/recv", got13, torch.full((13,), float(prv)))
    got17 = torch.empty(17)
    ops = [dist.P2POp(dist.isend, torch.full((17,), float(rank)), nxt), dist.P2POp(dist.irecv, got17, prv)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    check("batch_isend_irecv", got17, torch.full((17,), float(prv)))
    return bad


def _worker(rank, world_size):
    import torch.distributed as dist

    from megatron_osp.testing.comm_count import CommCounter

    warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation notes for the old names
    originals = {name: getattr(dist, name) for name in ("all_reduce", "isend", "P2POp")}
    with CommCounter() as c:
        bad = _counted_ops(rank, world_size)
    patched_back = all(getattr(dist, k) is v for k, v in originals.items())
    snapshot = (c.bytes_sent, dict(c.by_op), list(c.calls))
    dist.all_reduce(torch.ones(100))  # after exit: must not be counted
    after = (c.bytes_sent, len(c.calls))
    # A size-1 group sends nothing; reset() clears everything.
    singles = [dist.new_group([r]) for r in range(world_size)]
    with CommCounter() as c1:
        dist.all_reduce(torch.ones(64), group=singles[rank])
    c.reset()
    return {
        "bad": bad,
        "patched_back": patched_back,
        "total": snapshot[0],
        "by_op": snapshot[1],
        "calls": snapshot[2],
        "after": after,
        "single": (c1.bytes_sent, c1.calls),
        "reset": (c.bytes_sent, dict(c.by_op), c.calls),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_each_op_counts_its_formula(world):
    results = run_distributed(_worker, world, timeout=180)
    for rank, res in enumerate(results):
        assert res["bad"] == [], f"rank {rank}: wrong results while counted: {res['bad']}"
        want = _expected(world, rank)
        assert res["by_op"] == want, f"rank {rank}"
        assert res["total"] == sum(want.values())
        assert res["patched_back"]
        assert res["after"] == (res["total"], len(res["calls"]))
        assert res["single"] == (0, [("all_reduce", 0, 1, False)])
        assert res["reset"] == (0, {}, [])
        ops = [c[0] for c in res["calls"]]
        assert sorted(ops) == sorted(want), f"rank {rank}: each op must be recorded once"
        sizes = {c[2] for c in res["calls"]}
        assert sizes == {world}
        asyncs = {c[0] for c in res["calls"] if c[3]}
        assert asyncs == {"all_reduce", "_reduce_scatter_base", "_all_gather_base", "isend", "irecv",
                          "batch_isend_irecv"}


def _alias_worker(rank, world_size):
    """A module-level alias (as Megatron's param_and_grad_buffer binds one) is counted once."""
    import sys
    import types

    import torch.distributed as dist

    from megatron_osp.testing.comm_count import CommCounter

    warnings.simplefilter("ignore", FutureWarning)
    mod = types.ModuleType("comm_count_alias_probe")
    mod.rs = dist.reduce_scatter_tensor
    sys.modules[mod.__name__] = mod
    out = torch.empty(8)
    with CommCounter() as c:
        mod.rs(out, torch.ones(8 * world_size))
    restored = mod.rs is dist.reduce_scatter_tensor
    with CommCounter(aliases=False) as c2:
        mod.rs(out, torch.ones(8 * world_size))
    return c.calls, restored, c2.calls


def test_module_level_aliases_are_counted_and_restored():
    world = 2
    for calls, restored, no_alias_calls in run_distributed(_alias_worker, world):
        assert calls == [("reduce_scatter_tensor", (world - 1) * 8 * world * F32 // world, world, False)]
        assert restored
        assert no_alias_calls == []


def test_counters_do_not_nest():
    from megatron_osp.testing.comm_count import CommCounter

    with CommCounter(aliases=False):
        with pytest.raises(RuntimeError, match="already active"):
            with CommCounter(aliases=False):
                pass
