"""Hadamard/Kronecker mixers are orthogonal and equal their dense matrix; the online FFN Hadamard
leaves a float model's logits unchanged and spreads an outlier channel."""

import pytest
import torch
from scipy.linalg import hadamard as scipy_hadamard

from megatron_osp.analysis.hadamard import OrthogonalMixer, hadamard_matrix, random_orthogonal


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_matches_scipy_and_is_orthonormal(n):
    h = hadamard_matrix(n)
    want = torch.from_numpy(scipy_hadamard(n).astype("float64")) / n**0.5
    torch.testing.assert_close(h, want)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))


def test_hadamard_refuses_other_orders():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(12)


@pytest.mark.parametrize("n", [16, 96, 344, 43])
def test_mixer_is_orthogonal_and_apply_equals_kron(n):
    mixer = OrthogonalMixer(n, seed=3)
    r = mixer.matrix()
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    p = n & -n
    want = torch.kron(mixer.h, mixer.q) if mixer.q is not None else mixer.h
    torch.testing.assert_close(r, want)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(mixer.apply(x), x @ r.T)
    assert mixer.h.shape == (p, p)


def test_mixer_spreads_an_outlier_channel():
    n = 96
    x = torch.randn(200, n) * 0.1
    x[:, 7] = 50.0
    y = OrthogonalMixer(n).apply(x)
    assert x.abs().max() / x.abs().mean() > 30
    assert y.abs().max() / y.abs().mean() < 8  # energy shared by all channels
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_random_orthogonal_is_seeded():
    a, b, c = random_orthogonal(5, 1), random_orthogonal(5, 1), random_orthogonal(5, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a @ a.T, torch.eye(5, dtype=torch.float64))


def test_ffn_hadamard_keeps_hf_llama_logits(hf_llama):
    from megatron_osp.analysis import rotation
    from megatron_osp.analysis.model_parts import logits, model_parts

    parts = model_parts(hf_llama)
    tokens = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        base = logits(parts, tokens)
        mixers = rotation.ffn_mixers(parts)
        rotation.fold_ffn_hadamard_(parts, mixers)
        with rotation.ffn_hadamard_hooks(parts, mixers):
            rotated = logits(parts, tokens)
        broken = logits(parts, tokens)  # hooks removed, weights still folded: must differ
    torch.testing.assert_close(rotated, base, rtol=1e-4, atol=1e-4)
    assert (broken - base).abs().max() > 1e-2


def test_ffn_hadamard_keeps_megatron_logits(megatron_single_rank):
    from megatron_osp.analysis.evaluation import apply_setting
    from megatron_osp.analysis.model_parts import logits, model_parts
    from megatron_osp.analysis.quantization import parse_setting
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config

    cfg = get_preset("test")  # SSNorm + EmbProj, FFN 96 = 2^5 * 3
    parts = model_parts(build_gpt_model(cfg, transformer_config(cfg)))
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    with torch.no_grad():
        base = logits(parts, tokens)
        with apply_setting(parts, parse_setting("16-16-16+had")):
            had = logits(parts, tokens)
        again = logits(parts, tokens)
    torch.testing.assert_close(had, base, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, base)  # the setting is undone exactly


@pytest.fixture
def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ).eval()
    return model
