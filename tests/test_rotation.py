"""QuaRot-style residual rotation (with norm gains, SSNorm and EmbProj folded) keeps a float model's
logits, on tiny Megatron OSP / Adam-style models and on a tiny HF Llama."""

import pytest
import torch

from megatron_osp.analysis import rotation
from megatron_osp.analysis.evaluation import apply_setting
from megatron_osp.analysis.model_parts import logits, model_parts
from megatron_osp.analysis.quantization import parse_setting

TOL = dict(rtol=1e-4, atol=1e-4)


def _randomize_norms(model, seed=0):
    """Non-trivial gains (trained models never keep ones), so the gain folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))


def _hf_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ).eval()
    _randomize_norms(model)
    return model


def _megatron(normalization, embedding_projection, num_query_groups=None):
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config

    cfg = get_preset("test", normalization=normalization, embedding_projection=embedding_projection,
                     num_query_groups=num_query_groups)
    model = build_gpt_model(cfg, transformer_config(cfg)).eval()
    _randomize_norms(model)
    return model, cfg


def _check_residual_rotation_only(parts, tokens):
    """Fold + rotate the weights, no hooks at all: logits equal, and the weights really changed."""
    with torch.no_grad():
        base = logits(parts, tokens)
        before = parts.layers[0].attn_in[0].weight.detach().clone()
        rotation.fold_norm_gains_(parts)
        folded = logits(parts, tokens)
        rotation.rotate_residual_(parts, rotation.residual_rotation(parts, seed=5))
        rotation.rotate_value_output_heads_(parts, rotation.head_rotation(parts))
        rotated = logits(parts, tokens)
    torch.testing.assert_close(folded, base, **TOL)
    torch.testing.assert_close(rotated, base, **TOL)
    assert (parts.layers[0].attn_in[0].weight - before).abs().max() > 1e-2
    for lp in parts.layers:
        for norm in (lp.attn_norm, lp.mlp_norm):
            assert torch.all(norm.weight == 1)


@pytest.mark.parametrize("normalization,embproj", [("ssnorm", True), ("rmsnorm", False), ("rmsnorm", True)])
def test_residual_rotation_keeps_megatron_logits(megatron_single_rank, normalization, embproj):
    model, cfg = _megatron(normalization, embproj)
    parts = model_parts(model)
    assert (parts.embedding_projection is not None) == embproj
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    _check_residual_rotation_only(parts, tokens)


def test_residual_rotation_keeps_hf_llama_logits():
    parts = model_parts(_hf_llama())
    _check_residual_rotation_only(parts, torch.randint(0, 128, (2, 24)))


def test_full_quarot_setting_at_16_bits_keeps_logits_and_is_undone(megatron_single_rank):
    # Everything QuaRot does (residual, V/O, online Q/K and FFN rotations) but no rounding.
    # Megatron with GQA (2 query groups of 2 heads) checks where V's rows sit in the fused QKV.
    for model in (_megatron("ssnorm", True)[0], _megatron("rmsnorm", False, num_query_groups=2)[0], _hf_llama()):
        parts = model_parts(model)
        tokens = torch.randint(0, 128, (2, 24))
        with torch.no_grad():
            base = logits(parts, tokens)
            with apply_setting(parts, parse_setting("16-16-16+quarot")):
                rotated = logits(parts, tokens)
            after = logits(parts, tokens)
        torch.testing.assert_close(rotated, base, **TOL)
        assert torch.equal(after, base)


def test_rotation_removes_an_outlier_channel_from_linear_inputs():
    """Plant an Adam-like outlier (one huge residual channel): the QKV/FC1 inputs are heavy-tailed
    (kurtosis ~ hidden size); in the rotated model the same inputs are close to Gaussian."""
    from megatron_osp.analysis.activation_stats import ActivationStatsRecorder

    model = _hf_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 11] += 20.0
    parts = model_parts(model)
    tokens = torch.randint(0, 128, (4, 24))
    kurt = {}
    for name in ("fp", "16-16-16+quarot"):
        with torch.no_grad(), apply_setting(parts, parse_setting(name)), ActivationStatsRecorder(parts) as rec:
            logits(parts, tokens)
        stats = {p.name: p for p in rec.stats().points}
        kurt[name] = stats["layer_1.q_proj"].kurtosis
        if name == "fp":
            assert stats["layer_1.q_proj"].top_channels[0][0] == 11
    assert kurt["fp"] > 30, kurt
    assert kurt["16-16-16+quarot"] < 3, kurt


def test_tied_embeddings_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, tie_word_embeddings=True)
    )
    parts = model_parts(model)
    assert parts.tied
    with pytest.raises(ValueError, match="tied"):
        rotation.fold_norm_gains_(parts)
