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


def _exchange_worker(rank, world):
    import torch.distributed as dist

    from megatron_osp.optimizer.zero.exchange import Exchange
    from megatron_osp.optimizer.zero.units import adam_units, assign_owners, set_costs

    tp, dp = 2, 2
    coords = [(r % tp, r // tp) for r in range(world)]
    my_tp, my_dp = coords[rank]
    specs = CASES + [("embproj.weight", (16, 16), None)]
    g = torch.Generator().manual_seed(0)
    fulls = [torch.randn(shape, generator=g) for _, shape, _ in specs]
    params, units = [], []
    for i, ((name, shape, dim), full) in enumerate(zip(specs, fulls)):
        p = _local_shard(full, name, dim, tp, my_tp).clone()
        if dim is not None:
            p.tensor_model_parallel, p.partition_dim = True, dim
        if name.endswith("layernorm.weight"):
            p.sequence_parallel = True  # each TP rank holds a partial gradient: the owner adds them
        params.append(p)
        units += adam_units(name, name, p, MODEL, i, 0, tp, target=64)
    set_costs(units)
    assign_owners(units, coords)
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


def test_exchange_delivers_dp_means_to_owners_and_values_back():
    results = run_distributed(_exchange_worker, 4)
    assert sum(c for c, _ in results) > 0
    assert all(b > 0 for _, b in results)  # the replicated embproj matrix went back by broadcast
