"""The model-FLOPs formula (models/flops.py) against torch's FLOP counter on the built model.

The counter sees every matmul the model runs (mm/addmm/bmm/baddbmm/linear and their gradients); the
formula must give its forward count exactly, and three times it for forward + backward, for
configurations that exercise each term: GQA, an untied and padded vocabulary, EmbProj on and off.
"""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode


@pytest.mark.parametrize("change", [
    {},
    {"num_query_groups": 2, "embedding_projection": False},
    {"vocab_size": 300, "ffn_hidden_size": 96, "seq_length": 24, "num_layers": 3},
], ids=["test-preset", "gqa-no-embproj", "padded-vocab"])
def test_formula_equals_the_counted_matmul_flops(megatron_single_rank, change):
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config
    from megatron_osp.models.flops import forward_flops_per_token, training_flops_per_token

    cfg = dataclasses.replace(get_preset("test"), **change)
    model = build_gpt_model(cfg, transformer_config(cfg), seed=3)
    batch, s = 2, cfg.seq_length
    tokens = torch.randint(0, cfg.vocab_size, (batch, s))
    position_ids = torch.arange(s).expand(batch, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)

    with FlopCounterMode(display=False) as forward:
        out = model(tokens, position_ids, mask)
    with FlopCounterMode(display=False) as both:
        model(tokens, position_ids, mask).float().sum().backward()
    tokens_seen = batch * s
    assert forward.get_total_flops() == forward_flops_per_token(cfg) * tokens_seen
    assert both.get_total_flops() == training_flops_per_token(cfg) * tokens_seen
    assert out.shape[-1] == cfg.padded_vocab_size()
