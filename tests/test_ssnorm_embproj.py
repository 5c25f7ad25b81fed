"""SSNorm against a float64 formula; EmbProj identity reproduces the model without it."""

import torch

from megatron_osp.models import SSNorm, build_gpt_model, get_preset, transformer_config


def test_ssnorm_has_one_parameter_and_matches_float64_formula():
    torch.manual_seed(0)
    norm = SSNorm(hidden_size=48, eps=1e-5)
    assert [p.numel() for p in norm.parameters()] == [1]
    with torch.no_grad():
        norm.weight.fill_(1.7)
    x = torch.randn(5, 3, 48) * 4 + 0.5
    got = norm(x)
    x64 = x.double()
    want = 1.7 * x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # The gain really is a single scalar: its gradient is the sum over all channels and tokens.
    got.sum().backward()
    torch.testing.assert_close(norm.weight.grad.double(), (want / 1.7).sum().reshape(1), rtol=1e-5, atol=1e-4)


def test_every_norm_in_an_ssnorm_model_is_a_scalar(megatron_single_rank):
    cfg = get_preset("test", normalization="ssnorm", qk_layernorm=True)
    model = build_gpt_model(cfg, transformer_config(cfg))
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    # input + pre-MLP + q + k per layer, plus the final norm
    assert len(norms) == 4 * cfg.num_layers + 1
    assert all(p.shape == (1,) for p in norms.values())
    norm_modules = [m for n, m in model.named_modules() if n.endswith("norm") and "cross_attn" not in n]
    assert len(norm_modules) == len(norms) and all(isinstance(m, SSNorm) for m in norm_modules)


def test_rmsnorm_baseline_keeps_per_channel_gains(megatron_single_rank):
    cfg = get_preset("test", normalization="rmsnorm", embedding_projection=False)
    model = build_gpt_model(cfg, transformer_config(cfg))
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    assert norms and all(p.shape == (cfg.hidden_size,) for p in norms.values())
    assert not any("projection" in n for n, _ in model.named_parameters())


def _logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, pos, None)


def test_identity_embedding_projection_reproduces_the_model_without_it(megatron_single_rank):
    base_cfg = get_preset("test", embedding_projection=False)
    proj_cfg = get_preset("test", embedding_projection=True)
    base = build_gpt_model(base_cfg, transformer_config(base_cfg))
    with_proj = build_gpt_model(proj_cfg, transformer_config(proj_cfg))
    missing = with_proj.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert sorted(k for k in missing if "_extra_state" not in k) == [
        "embedding_projection.weight",
        "output_projection.weight",
    ]
    tokens = torch.randint(0, base_cfg.vocab_size, (2, base_cfg.seq_length))
    # Orthogonal (non-identity) projections change the output ...
    assert not torch.equal(_logits(base, tokens), _logits(with_proj, tokens))
    # ... and identity ones reproduce it exactly.
    with_proj.embedding_projection.set_identity_()
    with_proj.output_projection.set_identity_()
    assert torch.equal(_logits(base, tokens), _logits(with_proj, tokens))


def test_projections_are_orthogonal_at_init(megatron_single_rank):
    cfg = get_preset("test")
    model = build_gpt_model(cfg, transformer_config(cfg))
    for w in (model.embedding_projection.weight, model.output_projection.weight):
        eye = torch.eye(cfg.hidden_size)
        torch.testing.assert_close(w.double() @ w.double().T, eye.double(), atol=1e-5, rtol=0)
    assert not torch.equal(model.embedding_projection.weight, model.output_projection.weight)


def test_model_is_causal(megatron_single_rank):
    cfg = get_preset("test")
    model = build_gpt_model(cfg, transformer_config(cfg))
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_length))
    changed = tokens.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % cfg.vocab_size
    a, b = _logits(model, tokens), _logits(model, changed)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.equal(a[:, 20:], b[:, 20:])
