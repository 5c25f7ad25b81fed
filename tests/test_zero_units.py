"""The distributed optimizer's units and exchange, checked against plain tensor arithmetic.

- Units cover every element of every parameter exactly once, and each TP rank's slices read the
  same values from its shard as the unit reads from the global tensor (random shapes, TP 1/2/4/8,
  split along rows, columns, or replicated; the gated fc1's [gate_t; up_t] layout).
- AdamW chunk keys depend on the global shape only (the same at every TP size), and at TP <= 8 each
  chunk of a TP-split tensor lies in one TP shard when the dim divides by 8.
- Owners: every unit has one; a unit inside one TP shard is owned in that TP rank's DP group; the
  memory per rank is balanced within one unit of the mean.
- Exchange on 4 gloo ranks (TP=2 x DP=2): owners receive exactly the DP mean of the gradients of
  their units (TP pieces assembled; a sequence-parallel parameter's TP partial sums added); every
  rank receives exactly its slices of the owners' new values, also for a unit sent by broadcast.
- Rounds (zero/rounds.py): with a cap of 20 elements the pieces tile every unit and keep each
  owner's share of a round within the cap (or one row alone); on the same 4 ranks, gradients and
  returned parameters are bit-identical to the unsplit exchange, the measured peak of the buffers
  equals the plan and is below the unsplit one, there are more all-to-alls, and an owner receives a
  unit over several rounds. A piece is the same fraction of every TP rank's slice.
- Relayed delivery (zero/relay.py), unsplit and in rounds: the same bits as direct delivery, one
  all-to-all per hop, planned buffers = measured, each relayed element received once by its owner.
- bf16 gradients on the way (grad_reduce_dtype=bf16), direct and relayed: the fp32 sums within
  bf16 rounding, planned buffers = measured.
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_osp.testing.distributed import run_distributed

MODEL = SimpleNamespace(config=SimpleNamespace(gated_linear_unit=True))


def _param(global_shape, dim, tp, rank, name_values=None, sequence_parallel=False):
    t = torch.empty(global_shape)
    if dim is not None:
        t = t.chunk(tp, dim=dim)[rank].clone()
        t.tensor_model_parallel, t.partition_dim = True, dim
    if sequence_parallel:
        t.sequence_parallel = True
    return t


def _local_shard(full, name, dim, tp, t):
    from megatron_osp.models.layout import split_for_rank

    if dim is None:
        return full
    p = full.chunk(tp, dim=dim)[t]
    p.tensor_model_parallel, p.partition_dim = True, dim
    out = split_for_rank(full, p, name, MODEL, t, tp).clone()
    out.tensor_model_parallel, out.partition_dim = True, dim  # as Megatron marks them, at any TP
    return out


CASES = [  # name, global shape, partition dim
    ("decoder.layers.0.mlp.linear_fc1.weight", (64, 24), 0),
    ("decoder.layers.0.self_attention.linear_proj.weight", (24, 40), 1),
    ("embedding.word_embeddings.weight", (128, 16), 0),
    ("decoder.layers.0.input_layernorm.weight", (48,), None),
    ("output_layer.weight", (40, 8), 0),
]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_units_cover_every_element_once_with_consistent_slices(tp, case):
    from megatron_osp.optimizer.zero.units import adam_units

    name, shape, dim = CASES[case]
    if dim is not None and shape[dim] % tp:
        pytest.skip("TP does not divide this dim")
    full = torch.randn(shape, generator=torch.Generator().manual_seed(case))
    shards = [_local_shard(full, name, dim, tp, t) for t in range(tp)]
    units = adam_units(name, name, shards[0], MODEL, 0, 0, tp, target=64)
    seen = torch.zeros(full.numel())
    full2d = full if full.ndim == 2 else full.view(-1, 1)
    for u in units:
        value = torch.full(u.shape, float("nan"))
        for t, s in enumerate(u.slices[:tp]):
            if s.numel == 0:
                continue
            local = shards[t] if shards[t].ndim == 2 else shards[t].view(-1, 1)
            value[s.unit_rows, s.unit_cols[0]:s.unit_cols[1]] = local[s.local_rows, s.local_cols[0]:s.local_cols[1]]
        assert not torch.isnan(value).any(), f"{u.key}: some elements are held by no TP rank"
        # Where the unit sits in the global tensor: rows/cols found by matching values of a global id map.
        ids = torch.arange(full.numel(), dtype=torch.float64).view(full2d.shape)
        id_shards = [_local_shard(ids.view(shape), name, dim, tp, t) for t in range(tp)]
        id_value = torch.full(u.shape, -1.0, dtype=torch.float64)
        for t, s in enumerate(u.slices[:tp]):
            if s.numel:
                local = id_shards[t] if id_shards[t].ndim == 2 else id_shards[t].view(-1, 1)
                id_value[s.unit_rows, s.unit_cols[0]:s.unit_cols[1]] = local[s.local_rows, s.local_cols[0]:s.local_cols[1]]
        flat = id_value.flatten().long()
        seen[flat] += 1
        torch.testing.assert_close(value.flatten(), full2d.flatten()[flat])
    assert torch.all(seen == 1), "some element is in no unit or in two"
    ref = adam_units(name, name, _local_shard(full, name, dim, 1, 0), MODEL, 0, 0, 1, target=64)
    assert [u.key for u in units] == [u.key for u in ref]  # keys do not depend on the layout
    if dim is not None and tp > 1 and shape[dim] % 8 == 0 and len(units) > 1:
        assert all(len(u.holders) == 1 for u in units), "a chunk spans two TP shards"


def test_owners_respect_tp_groups_and_balance_memory():
    from megatron_osp.optimizer.zero.units import adam_units, assign_owners, set_costs

    tp, dp = 2, 4
    coords = [(r % tp, r // tp) for r in range(tp * dp)]
    units = []
    for i, (name, shape, dim) in enumerate(CASES):
        units += adam_units(name, name, _param(shape, dim, tp, 0), MODEL, i, 0, tp, target=64)
    set_costs(units)
    load = assign_owners(units, coords)
    assert all(0 <= u.owner < tp * dp for u in units)
    for u in units:
        if len(u.holders) == 1:
            assert coords[u.owner][0] == u.holders[0]
    mean = sum(b for b, _ in load) / len(load)
    assert max(b for b, _ in load) <= mean + max(u.cost[0] for u in units)


SPECS = CASES + [("embproj.weight", (16, 16), None)]


def _setup(tp, rank, coords):
    """This rank's shards of SPECS (TP=tp) and the units, owned over ``coords``."""
    from megatron_osp.optimizer.zero.units import adam_units, assign_owners, set_costs

    g = torch.Generator().manual_seed(0)
    fulls = [torch.randn(shape, generator=g) for _, shape, _ in SPECS]
    params, units = [], []
    for i, ((name, shape, dim), full) in enumerate(zip(SPECS, fulls)):
        p = _local_shard(full, name, dim, tp, coords[rank][0]).clone()
        if dim is not None:
            p.tensor_model_parallel, p.partition_dim = True, dim
        if name.endswith("layernorm.weight"):
            p.sequence_parallel = True  # each TP rank holds a partial gradient: the owner adds them
        params.append(p)
        units += adam_units(name, name, p, MODEL, i, 0, tp, target=64)
    set_costs(units)
    assign_owners(units, coords)
    return params, units, fulls


def _exchange_worker(rank, world):
    import torch.distributed as dist

    from megatron_osp.optimizer.zero.exchange import Exchange

    tp, dp = 2, 2
    coords = [(r % tp, r // tp) for r in range(world)]
    my_tp, my_dp = coords[rank]
    specs = SPECS
    params, units, fulls = _setup(tp, rank, coords)
    ex = Exchange(params, units, coords, rank, dist.group.WORLD, dp_size=dp, bucket_elems=300,
                  overlap_grad=True, overlap_param=True, broadcast_min=60)
    # Gradients: a value that tells the rank apart; the expected owner sum in plain arithmetic.
    grads = {}
    for r in range(world):
        grads[r] = [torch.randn(_local_shard(f, n, d, tp, coords[r][0]).shape, generator=torch.Generator().manual_seed(100 + 10 * r + i))
                    for i, ((n, _, d), f) in enumerate(zip(specs, fulls))]
    for p, gr in zip(params, grads[rank]):
        p.main_grad = gr.clone()
    ex.begin_step()
    for p in reversed(params):
        ex.grad_ready(p)
    ex.finish_grads()
    checked = 0
    for u in ex.owned:
        want = torch.zeros(u.shape)
        for r in range(world):
            t = coords[r][0]
            if not ex.contributes(u, t):
                continue
            s = u.slices[t]
            local = grads[r][u.param_index]
            local = local if local.ndim == 2 else local.view(-1, 1)
            want[s.unit_rows, s.unit_cols[0]:s.unit_cols[1]] += local[s.local_rows, s.local_cols[0]:s.local_cols[1]] / dp
        torch.testing.assert_close(ex.grads[u.key], want, rtol=0, atol=1e-6)
        checked += 1
    # Parameters: owners' new values (unit-shaped) reach every holder's shard.
    masters = {u.key: torch.full(u.shape, float(k + 1)) * torch.arange(u.numel).view(u.shape)
               for k, u in enumerate(units) if u.owner == rank}
    ex.start_params(masters)
    ex.finish_params()
    want_all = {u.key: torch.full(u.shape, float(k + 1)) * torch.arange(u.numel).view(u.shape) for k, u in enumerate(units)}
    for u in units:
        s = u.slices[my_tp]
        if s.numel == 0:
            continue
        p = params[u.param_index]
        p2d = p if p.ndim == 2 else p.view(-1, 1)
        got = p2d[s.local_rows, s.local_cols[0]:s.local_cols[1]]
        torch.testing.assert_close(got, want_all[u.key][s.unit_rows, s.unit_cols[0]:s.unit_cols[1]])
    return checked, sum(len(b.broadcast) for b in ex.buckets)


def _worker(rank, world):
    """Both exchange checks in one 4-rank world (one process start-up for the two tests)."""
    return _exchange_worker(rank, world), _rounds_worker(rank, world)


@pytest.fixture(scope="module")
def exchanged():
    return run_distributed(_worker, 4)


def test_exchange_delivers_dp_means_to_owners_and_values_back(exchanged):
    results = [r for r, _ in exchanged]
    assert sum(c for c, _ in results) > 0
    assert all(b > 0 for _, b in results)  # the replicated embproj matrix went back by broadcast


# ---------------------------------------------------------------------- rounds (zero/rounds.py)
ROUND_CAP = 20  # elements: below a row of several units, so units are cut and some rows stand alone


def test_rounds_cover_each_unit_once_and_respect_the_cap():
    """plan_rounds on the units of SPECS (TP=2 x DP=2, gradient costs): each unit's pieces tile its
    positions in order; no owner has more than the cap in one round unless that is one row alone; some
    unit is split over several rounds; the same input gives the same rounds."""
    from megatron_osp.optimizer.zero.rounds import plan_rounds, position_costs, positions, sub_positions

    coords = [(r % 2, r // 2) for r in range(4)]
    _, units, _ = _setup(2, 0, coords)
    costed = [(u, position_costs(u, {0: 2, 1: 2})) for u in units]  # every TP rank in 2 DP replicas
    cost = {u.key: c for u, c in costed}
    rounds = plan_rounds(costed, ROUND_CAP)
    assert rounds == plan_rounds(costed, ROUND_CAP)
    pieces = {}
    for k, in_round in enumerate(rounds):
        for u, r0, r1 in in_round:
            pieces.setdefault(u.key, []).append((k, r0, r1))
        for owner in {u.owner for u, _, _ in in_round}:
            mine = [(u, r0, r1) for u, r0, r1 in in_round if u.owner == owner]
            load = sum(int(cost[u.key][r0:r1].sum()) for u, r0, r1 in mine)
            assert load <= ROUND_CAP or (len(mine) == 1 and mine[0][2] - mine[0][1] == 1), (k, owner, load)
    assert pieces.keys() == {u.key for u in units}
    for u in units:
        got = pieces[u.key]
        assert [r0 for _, r0, _ in got] == [0] + [r1 for _, _, r1 in got[:-1]] and got[-1][2] == positions(u)
        assert [k for k, _, _ in got] == sorted({k for k, _, _ in got})  # one piece per round, in order
        # A piece is the same fraction of every TP slice: the slices' pieces tile them in order, a
        # piece's cost is what its sub-slices hold, and equal slices are cut equally.
        subs = [[sub_positions(u.slices[t], r0, r1, positions(u)) for _, r0, r1 in got] for t in (0, 1)]
        for t in (0, 1):
            assert torch.equal(torch.cat([x.local_rows for x in subs[t]]), u.slices[t].local_rows), u.key
            assert torch.equal(torch.cat([x.unit_rows for x in subs[t]]), u.slices[t].unit_rows), u.key
        for (_, r0, r1), a, b in zip(got, *subs):
            assert int(cost[u.key][r0:r1].sum()) == 2 * (a.numel + b.numel), u.key
            if len(u.slices[0].local_rows) == len(u.slices[1].local_rows):
                assert len(a.local_rows) == len(b.local_rows), u.key
    assert max(len(p) for p in pieces.values()) > 1


def test_rounds_cut_every_tp_slice_at_the_same_fraction():
    """A whole column-parallel matrix (TP rank t holds unit rows [4t, 4t + 4)) cut into rounds of
    at most 12 elements per owner: every piece holds as many rows of TP rank 0 as of TP rank 1,
    so a round loads both TP ranks alike (cutting unit rows would send TP rank 0's rows first)."""
    from megatron_osp.optimizer.zero.rounds import plan_rounds, position_costs, positions, sub_positions
    from megatron_osp.optimizer.zero.units import MUON, Slice, Unit

    local = torch.arange(4)
    slices = [Slice(local, local + 4 * t, (0, 3), (0, 3)) for t in (0, 1)]
    u = Unit("w", MUON, 0, 0, (8, 3), slices, tp_sharded=True, owner=0)
    rounds = plan_rounds([(u, position_costs(u, {0: 2, 1: 2}))], 12)
    assert len(rounds) == 4 and positions(u) == 4
    for (piece,) in rounds:
        a, b = (sub_positions(s, piece[1], piece[2], 4) for s in slices)
        assert len(a.local_rows) == len(b.local_rows) == 1, piece


def _rounds_worker(rank, world):
    """The same gradients and new values through an unsplit exchange and one with ROUND_CAP."""
    import torch.distributed as dist

    from megatron_osp.optimizer.zero.exchange import Exchange

    coords = [(r % 2, r // 2) for r in range(world)]
    out = {}
    for name, cap, relay, dtype in (("whole", 10**9, False, torch.float32), ("rounds", ROUND_CAP, False, torch.float32),
                                    ("relay", 10**9, True, torch.float32), ("relay_rounds", ROUND_CAP, True, torch.float32),
                                    ("bf16", ROUND_CAP, False, torch.bfloat16), ("bf16_relay", ROUND_CAP, True, torch.bfloat16)):
        params, units, _ = _setup(2, rank, coords)
        ex = Exchange(params, units, coords, rank, dist.group.WORLD, dp_size=2, bucket_elems=300, round_elems=cap,
                      grad_dtype=dtype, overlap_grad=True, overlap_param=True, broadcast_min=60,
                      delivery="relay" if relay else "direct")
        for i, p in enumerate(params):
            p.main_grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + 10 * rank + i))
        calls = [0]
        original = dist.all_to_all_single

        def counting(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        dist.all_to_all_single = counting
        try:
            ex.begin_step()
            for p in reversed(params):
                ex.grad_ready(p)
            ex.finish_grads()
            masters = {u.key: torch.randn(u.shape, generator=torch.Generator().manual_seed(k))
                       for k, u in enumerate(units) if u.owner == rank}
            ex.start_params(masters)
            ex.finish_params()
        finally:
            dist.all_to_all_single = original
        # Rounds in which this owner receives a unit, at most over its units.
        split = max(sum(any(v is u for items in rd.hops[0].recv.values() for v, *_ in items) for rd in b.grad_rounds)
                    for b in ex.buckets for u in b.units)
        # Relayed: an owner receives each element of its relayed units once, in the last hops.
        relayed_in = sum(sum(rd.hops[-1].recv_sizes) for b in ex.buckets for rd in b.grad_rounds if len(rd.hops) == 2)
        owned_relayed = sum(u.numel for u in ex.owned if not u.tp_sum)
        out[name] = {"grads": ex.grads, "params": [p.detach().clone() for p in params], "calls": calls[0],
                     "peak": ex.peak_buffer_bytes, "planned": ex.buffer_bytes(4), "split": split,
                     "relayed_once": relayed_in == owned_relayed if relay else None,
                     "hops": sum(len(rd.hops) for b in ex.buckets for rd in b.grad_rounds + b.param_rounds)}
    whole = out["whole"]
    # bf16 gradients on the way (optimizer.grad_reduce_dtype=bf16), direct and relayed (where the
    # relay's fp32 sum is rounded to bf16 once more): the fp32 sums within bf16 rounding of the
    # contributions (each |g| < 5: a few ulps at 2^-8 relative). Parameters go as before.
    for name in ("bf16", "bf16_relay"):
        assert out[name]["grads"].keys() == whole["grads"].keys()
        for key, g in whole["grads"].items():
            torch.testing.assert_close(out[name]["grads"][key], g, rtol=0, atol=0.05, msg=lambda m: f"{name} {key}: {m}")
        assert any(not torch.equal(out[name]["grads"][k], g) for k, g in whole["grads"].items()), name  # bf16 did travel
    for other in ("rounds", "relay", "relay_rounds"):
        assert whole["grads"].keys() == out[other]["grads"].keys()
        for key, g in whole["grads"].items():
            assert torch.equal(g, out[other]["grads"][key]), (other, key)  # bit for bit
        for a, b in zip(whole["params"], out[other]["params"]):
            assert torch.equal(a, b), other
    return {name: {k: v for k, v in o.items() if k not in ("grads", "params")} for name, o in out.items()}


def test_rounds_exchange_the_same_bits_with_smaller_buffers(exchanged):
    results = [r for _, r in exchanged]
    for r in results:
        whole, rounds = r["whole"], r["rounds"]
        assert rounds["peak"] == rounds["planned"] and whole["peak"] == whole["planned"], r
        assert rounds["peak"] < whole["peak"], r
        assert rounds["calls"] > whole["calls"], r  # more all-to-alls: the buckets went in rounds
    assert max(r["rounds"]["split"] for r in results) > 1  # an owner received a unit over several rounds
    assert max(r["whole"]["split"] for r in results) == 1


def test_relayed_delivery_exchanges_the_same_bits_each_element_once_at_the_owner(exchanged):
    """optimizer.delivery=relay (zero/relay.py), unsplit and in rounds, on the same 4 ranks: the
    same bits as direct delivery (checked in the worker), two all-to-alls per round where relayed,
    planned buffers = measured, and owners receive each element of their relayed units once."""
    results = [r for _, r in exchanged]
    for r in results:
        assert r["bf16"]["peak"] == r["bf16"]["planned"] and r["bf16_relay"]["peak"] == r["bf16_relay"]["planned"], r
        for name in ("relay", "relay_rounds", "bf16_relay"):
            assert r[name]["relayed_once"] is True, (name, r)
            assert r[name]["peak"] == r[name]["planned"], (name, r)
            assert r[name]["calls"] == r[name]["hops"], (name, r)  # every hop one all-to-all
        assert r["relay"]["calls"] > r["whole"]["calls"] and r["relay_rounds"]["calls"] > r["rounds"]["calls"], r
