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


def test_muon_two_steps_match_float64_reference_with_blocks():
    torch.manual_seed(1)
    W0 = torch.randn(48, 16)
    blocks = [torch.arange(0, 32), torch.arange(32, 40), torch.arange(40, 48)]
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.05, momentum=0.95, weight_decay=0.1, blocks=whole_matrix_blocks([p], [blocks]))
    W, buf = W0.double(), torch.zeros(48, 16, dtype=torch.float64)
    for _ in range(2):
        g = torch.randn(48, 16)
        p.grad = g.clone()
        opt.step()
        g = g.double()
        buf = g + 0.95 * buf
        u = g + 0.95 * buf
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
