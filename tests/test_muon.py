"""Muon's step against a float64 reference; the config-driven split of fused weights."""

import math

import pytest
import torch

from megatron_osp.optimizer import Muon, logical_blocks, whole_matrix_blocks


def _ns64(u, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = u.T if u.shape[0] > u.shape[1] else u
    X = X / (X.norm() + 1e-8)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if u.shape[0] > u.shape[1] else X


INTERLEAVED = [torch.arange(48).view(8, 6)[:, :4].flatten(), torch.arange(4, 48, 6), torch.arange(5, 48, 6)]


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("blocks", [[torch.arange(0, 32), torch.arange(32, 40), torch.arange(40, 48)], INTERLEAVED],
                         ids=["contiguous", "interleaved"])
def test_muon_two_steps_match_float64_reference_with_blocks(blocks, nesterov):
    """Blocks of contiguous rows (read as views) and interleaved ones like Q/K/V (read with index
    tensors), with and without Nesterov momentum."""
    torch.manual_seed(1)
    W0 = torch.randn(48, 16)
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.05, momentum=0.95, nesterov=nesterov, weight_decay=0.1,
               blocks=whole_matrix_blocks([p], [blocks]))
    W, buf = W0.double(), torch.zeros(48, 16, dtype=torch.float64)
    for _ in range(2):
        g = torch.randn(48, 16)
        p.grad = g.clone()
        opt.step()
        g = g.double()
        buf = g + 0.95 * buf
        u = g + 0.95 * buf if nesterov else buf
        upd = torch.empty_like(u)
        for idx in blocks:
            blk = u[idx]
            upd[idx] = _ns64(blk) * 0.2 * math.sqrt(max(blk.shape))
        W = W * (1 - 0.05 * 0.1) - 0.05 * upd
    torch.testing.assert_close(p.detach().double(), W, rtol=0, atol=2e-5)


def test_qkv_blocks_follow_megatron_group_layout():
    class Cfg:
        kv_channels, num_attention_heads, num_query_groups = 4, 4, 2
        gated_linear_unit, ffn_hidden_size = True, 10

    q, k, v = logical_blocks("decoder.layers.0.self_attention.linear_qkv.weight", Cfg())
    # per group: [q0 q1 | k | v] of 4 rows each -> 16 rows per group
    assert q.tolist() == list(range(0, 8)) + list(range(16, 24))
    assert k.tolist() == list(range(8, 12)) + list(range(24, 28))
    assert v.tolist() == list(range(12, 16)) + list(range(28, 32))
    heads = logical_blocks("x.self_attention.linear_qkv.weight", Cfg(), qkv_split="per_head")
    assert len(heads) == 4 + 2 + 2
    gate, up = logical_blocks("decoder.layers.1.mlp.linear_fc1.weight", Cfg())
    assert gate.tolist() == list(range(10)) and up.tolist() == list(range(10, 20))
    assert logical_blocks("decoder.layers.1.mlp.linear_fc2.weight", Cfg()) is None


def _tp_param(shape, dim):
    p = torch.nn.Parameter(torch.zeros(shape))
    p.tensor_model_parallel, p.partition_dim = True, dim
    return p


class _Holder:
    class config:  # noqa: N801 - stands in for a TransformerConfig
        num_attention_heads, num_query_groups, kv_channels = 4, 2, 4
        gated_linear_unit, ffn_hidden_size = True, 10


def test_blocks_follow_the_config_at_tp2_and_name_bad_parameters():
    from megatron_osp.optimizer.logical import build_blocks

    qkv = ("decoder.layers.0.self_attention.linear_qkv.weight", _tp_param((16, 8), 0))  # 32 rows / 2
    fc1 = ("decoder.layers.0.mlp.linear_fc1.weight", _tp_param((10, 8), 0))  # [gate_r; up_r]
    fc2 = ("decoder.layers.0.mlp.linear_fc2.weight", _tp_param((8, 5), 1))
    blocks = build_blocks([qkv, fc1, fc2], _Holder, 0, 2, offset=3)
    keys = [b.key for b in blocks]
    assert keys[0] == "decoder.layers.3.self_attention.linear_qkv.weight[0]"
    q, k, v, gate, up, down = blocks
    assert (q.shape, k.shape, v.shape) == ((16, 8), (8, 8), (8, 8))
    # TP rank 1 holds query group 1: local rows 0-7 are q heads 2,3 -> block rows 8-15 of Q.
    assert q.pieces[1].local_rows.tolist() == list(range(8)) and q.pieces[1].block_rows.tolist() == list(range(8, 16))
    assert k.pieces[1].local_rows.tolist() == list(range(8, 12)) and k.pieces[1].block_rows.tolist() == [4, 5, 6, 7]
    # fc1 on TP rank 1 is [gate rows 5-9; up rows 5-9].
    assert gate.pieces[1].local_rows.tolist() == list(range(5)) and gate.pieces[1].block_rows.tolist() == list(range(5, 10))
    assert up.pieces[1].local_rows.tolist() == list(range(5, 10)) and up.pieces[1].block_rows.tolist() == list(range(5, 10))
    assert down.shape == (8, 10) and down.pieces[1].cols == (5, 10)

    with pytest.raises(ValueError, match="tensor_parallel_size=4 must divide the num_query_groups=2"):
        build_blocks([("x.self_attention.linear_qkv.weight", _tp_param((8, 8), 0))], _Holder, 0, 4, offset=0)
    with pytest.raises(ValueError, match="'x.self_attention.linear_qkv.weight' has 10 rows"):
        build_blocks([("x.self_attention.linear_qkv.weight", _tp_param((10, 8), 0))], _Holder, 0, 2, offset=0)
    with pytest.raises(ValueError, match="'w3' has shape \\(2, 3, 4\\); Newton-Schulz needs a 2-D"):
        build_blocks([("w3", torch.nn.Parameter(torch.zeros(2, 3, 4)))], _Holder, 0, 1, offset=0)


def test_owner_assignment_balances_and_plan_adds_up():
    from megatron_osp.optimizer.logical import build_blocks
    from megatron_osp.optimizer.ownership import assign_owners
    from megatron_osp.optimizer.plan import exchange_sizes

    named = []
    for layer in range(6):
        named += [
            (f"decoder.layers.{layer}.self_attention.linear_qkv.weight", _tp_param((16, 8), 0)),
            (f"decoder.layers.{layer}.mlp.linear_fc1.weight", _tp_param((10, 8), 0)),
            (f"decoder.layers.{layer}.mlp.linear_fc2.weight", _tp_param((8, 5), 1)),
        ]
    named.append(("embedding_projection.weight", torch.nn.Parameter(torch.zeros(8, 8))))
    blocks = build_blocks(named, _Holder, 0, 2, offset=0)
    load = assign_owners(blocks, 4)
    assert max(load) / (sum(load) / 4) < 1.25
    assert sorted({b.owner for b in blocks}) == [0, 1, 2, 3]
    coords = [(t, d) for d in range(2) for t in range(2)]
    sizes = [exchange_sizes(blocks, coords, r) for r in range(4)]
    for a in range(4):  # what a sends to b is what b expects from a, in both all-to-alls
        for b in range(4):
            assert sizes[a][0][b] == sizes[b][1][a] and sizes[a][2][b] == sizes[b][3][a]
    # every rank receives exactly its shard of every Muon parameter
    for r, (tp, _) in enumerate(coords):
        assert sum(sizes[r][3]) == sum(p.numel() for _, p in named)


def test_lr_scale_rules():
    from megatron_osp.optimizer.muon import update_scale

    assert update_scale(128, 32, "rms") == pytest.approx(0.2 * math.sqrt(128))
    assert update_scale(128, 32, "shape") == pytest.approx(2.0)
    assert update_scale(32, 128, "shape") == 1.0
    with pytest.raises(ValueError, match="muon_lr_scale"):
        update_scale(2, 2, "nope")


def test_settings_name_bad_values():
    from megatron_osp.optimizer import OptimSettings

    with pytest.raises(ValueError, match="optimizer.name"):
        OptimSettings(name="sgd")
    with pytest.raises(ValueError, match="muon_lr_scale"):
        OptimSettings(name="muon", muon_lr_scale="x")
    with pytest.raises(ValueError, match="muon_qkv_split"):
        OptimSettings(name="muon", muon_qkv_split="x")
    with pytest.raises(ValueError, match="unknown Newton-Schulz coefficients"):
        OptimSettings(name="muon", muon_coefficients="x")


def test_routing_table_and_muon_only_vectors():
    from megatron_osp import parallel, platform
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.optimizer import OptimSettings, get_osp_optimizer

    parallel.init_distributed(1, 1)
    platform.seed_everything(0)
    try:
        cfg = get_preset("test", embedding_projection=True)
        model = build_gpt_model(cfg, transformer_config(cfg))
        lines = []
        get_osp_optimizer(OptimSettings(name="muon"), [model], log=lines.append)
        table = "\n".join(lines)
        row = lambda name: next(ln.rstrip() for ln in table.splitlines() if ln.startswith(name + " "))  # noqa: E731
        assert row("embedding.word_embeddings.weight").endswith("adamw")
        assert row("output_layer.weight").endswith("adamw")
        assert row("embedding_projection.weight").endswith("muon")
        assert row("decoder.layers.0.self_attention.linear_qkv.weight").endswith("muon")
        assert "NS GFLOP per step per rank" in table

        opt = get_osp_optimizer(OptimSettings(name="muon_only", lr=0.01, muon_lr=0.01, weight_decay=0.0), [model], log=None)
        assert len(opt.chained_optimizers) == 1  # no AdamW at all
        vecs = [(n, p) for n, p in model.named_parameters() if p.ndim == 1]
        assert vecs
        before = {n: p.detach().clone() for n, p in vecs}
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        grads = {n: p.grad.clone() for n, p in vecs}
        opt.step()
        for n, p in vecs:  # first step: u = (1 + 0.95) g, normalised, times 0.2 sqrt(numel)
            g = grads[n]
            scale = 0.2 * math.sqrt(g.numel()) / g.norm()
            expected = before[n] - 0.01 * g * scale
            # clipping (norm > 1) scales g but not its normalised direction
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    finally:
        parallel.shutdown()


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [0, 2, 5]], ids=["contiguous", "scattered"])
def test_rows_in_no_block_keep_their_values(rows):
    """Rows of a matrix in no logical block (the vocabulary's padding, logical.vocab_rows) get no
    update and no weight decay; the others are decayed and updated as a matrix of their own."""
    torch.manual_seed(2)
    W0 = torch.randn(6, 4)
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.05, weight_decay=0.1, blocks=whole_matrix_blocks([p], [[torch.tensor(rows)]]))
    p.grad = torch.randn(6, 4)
    opt.step()
    others = [r for r in range(6) if r not in rows]
    assert torch.equal(p.detach()[others], W0[others])
    u = p.grad[rows].double() * (1 + 0.95)  # Nesterov from zero momentum
    expected = W0[rows].double() * (1 - 0.05 * 0.1) - 0.05 * _ns64(u) * 0.2 * math.sqrt(max(u.shape))
    torch.testing.assert_close(p.detach()[rows].double(), expected, rtol=0, atol=2e-5)


def test_row_selectors_are_views_or_device_indices():
    """Contiguous rows select by slice (a view); others by an index tensor on the tensor's device,
    copied there once, not at every use (a CPU index on a CUDA tensor waits for the stream)."""
    from megatron_osp.optimizer.logical import row_selector
    from megatron_osp.optimizer.zero.units import Slice

    assert row_selector(torch.arange(3, 9), torch.device("cpu")) == slice(3, 9)
    assert row_selector(torch.tensor([], dtype=torch.long), torch.device("cpu")) == slice(0, 0)
    scattered = row_selector(torch.tensor([0, 2, 3]), torch.device("meta"))
    assert isinstance(scattered, torch.Tensor) and scattered.device.type == "meta"
    s = Slice(torch.tensor([1, 4]), torch.arange(2), (0, 3), (0, 3))
    assert s.local_sel_on(torch.device("cpu")) is s.local_sel  # the CPU needs no copy
    on_meta = s.local_sel_on(torch.device("meta"))
    assert on_meta[0].device.type == "meta" and on_meta[1] == slice(0, 3)
    assert s.local_sel_on(torch.device("meta")) is on_meta  # cached
    assert s.unit_sel_on(torch.device("meta")) is s.unit_sel  # contiguous unit rows: a slice anywhere
