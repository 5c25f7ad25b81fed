"""Activation statistics by hooks: the paper's kurtosis (vs scipy) at every point, max |x| and outlier
channels, on a tiny Megatron OSP model and a tiny HF Llama; the KV quantizer acts on post-RoPE K."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from megatron_osp.analysis.activation_stats import ActivationStats, ActivationStatsRecorder
from megatron_osp.analysis.model_parts import logits, model_parts


def _paper_kurtosis(x: torch.Tensor) -> float:
    """relu(Fisher excess kurtosis over the hidden dim), mean over tokens, by scipy."""
    k = sps.kurtosis(x.reshape(-1, x.shape[-1]).double().numpy(), axis=-1, fisher=True, bias=True)
    return float(np.maximum(k, 0).mean())


def _hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ).eval()


def _capture_reference(parts, tokens):
    """Every point's tensors, captured by independent hooks, to compute the expected statistics."""
    seen = {}
    handles = []
    layers = parts.decoder_layers

    def keep(name):
        return lambda t: seen.setdefault(name, []).append(t.detach().clone())

    handles.append(layers[0].register_forward_pre_hook(
        lambda m, a, kw: keep("embedding")(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True))
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda m, a, out, n=f"layer_{i + 1}": keep(n)(out[0] if isinstance(out, tuple) else out)))
    for name, lin in parts.named_linears():
        handles.append(lin.register_forward_pre_hook(lambda m, a, n=name: keep(n)(a[0])))
    with torch.no_grad():
        for t in tokens:
            logits(parts, t)
    for h in handles:
        h.remove()
    return {k: torch.cat([v.reshape(-1, v.shape[-1]) for v in vs]) for k, vs in seen.items()}


def _check_against_reference(parts, tokens):
    ref = _capture_reference(parts, tokens)
    with torch.no_grad(), ActivationStatsRecorder(parts, top_k=3) as rec:
        for t in tokens:
            logits(parts, t)
    st = rec.stats()
    names = [p.name for p in st.points]
    n_layers = len(parts.layers)
    assert names[: n_layers + 1] == ["embedding"] + [f"layer_{i + 1}" for i in range(n_layers)]
    assert len(names) == n_layers + 1 + len(parts.named_linears())
    for p in st.points:
        x = ref[p.name]
        assert p.kurtosis == pytest.approx(_paper_kurtosis(x), rel=1e-6, abs=1e-9), p.name
        ch = x.abs().amax(0)
        assert p.max_abs == pytest.approx(float(ch.max()), rel=1e-6)
        assert [c for c, _ in p.top_channels] == torch.topk(ch, 3).indices.tolist()
    return st


def test_hf_llama_stats_match_scipy_and_find_a_planted_channel():
    model = _hf_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 37] += 3.0  # a residual outlier channel
    parts = model_parts(model)
    tokens = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    st = _check_against_reference(parts, tokens)
    by = {p.name: p for p in st.points}
    assert by["embedding"].top_channels[0][0] == 37
    assert by["embedding"].kurtosis > 20
    assert st.summary()["residual"]["kurtosis_max"] >= by["embedding"].kurtosis


def test_megatron_stats_match_scipy(megatron_single_rank):
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config

    cfg = get_preset("test")
    parts = model_parts(build_gpt_model(cfg, transformer_config(cfg)))
    assert [n for n, _ in parts.named_linears()][:4] == ["layer_1.qkv", "layer_1.o_proj", "layer_1.fc1", "layer_1.down_proj"]
    tokens = [torch.randint(0, cfg.vocab_size, (2, cfg.seq_length)) for _ in range(2)]
    _check_against_reference(parts, tokens)


def test_stats_roundtrip_and_table(tmp_path):
    parts = model_parts(_hf_llama())
    with torch.no_grad(), ActivationStatsRecorder(parts) as rec:
        logits(parts, torch.randint(0, 128, (1, 8)))
    st = rec.stats()
    st.save(tmp_path / "s.json")
    back = ActivationStats.load(tmp_path / "s.json")
    assert back.to_dict() == st.to_dict()
    assert "layer_2.down_proj" in st.format_table()


def test_recorder_without_forward_is_an_error():
    rec = ActivationStatsRecorder(model_parts(_hf_llama()))
    with rec:
        pass
    with pytest.raises(RuntimeError, match="no activations"):
        rec.stats()


def test_hf_kv_quant_acts_on_post_rope_keys():
    """Layer 1's attention under 4-bit KV equals a by-hand attention with K quantized after RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    from megatron_osp.analysis.quantization import fake_quant, kv_quant_hooks

    model = _hf_llama()
    parts = model_parts(model)
    attn = model.model.layers[0].self_attn
    captured = {}

    def keep_out(module, args, kwargs, out):
        captured["out"] = out[0]

    def keep_in(module, args, kwargs):
        captured["kw"] = kwargs

    h = attn.register_forward_hook(keep_out, with_kwargs=True)
    h2 = attn.register_forward_pre_hook(keep_in, with_kwargs=True)
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad(), kv_quant_hooks(parts, 4):
        logits(parts, tokens)
    h.remove()
    h2.remove()
    kw = captured["kw"]
    x = kw["hidden_states"]
    cos, sin = kw["position_embeddings"]
    b, s, _ = x.shape
    with torch.no_grad():
        q = attn.q_proj(x).view(b, s, -1, 16).transpose(1, 2)
        k = attn.k_proj(x).view(b, s, -1, 16).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, -1, 16).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(fake_quant(k, 4), 2), repeat_kv(fake_quant(v, 4), 2)
        scores = q @ k.transpose(2, 3) / 4.0
        scores = scores + torch.triu(torch.full((s, s), float("-inf")), 1)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
        want = attn.o_proj(out)
        # quantizing K before RoPE instead gives a different result: the test can tell them apart
        k_pre = attn.k_proj(x).view(b, s, -1, 16).transpose(1, 2)
        _, k_wrong = apply_rotary_pos_emb(q, fake_quant(k_pre, 4), cos, sin)
    torch.testing.assert_close(captured["out"], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fake_quant(k_pre, 4), k_pre)
    assert not torch.allclose(repeat_kv(k_wrong, 2), k, atol=1e-4)


def test_megatron_kv_quant_acts_on_what_core_attention_receives(megatron_single_rank):
    """Megatron applies RoPE before core_attention; the quantizer rounds exactly the K/V it receives."""
    from megatron_osp.analysis.quantization import fake_quant, kv_quant_hooks
    from megatron_osp.models import build_gpt_model, get_preset, transformer_config

    cfg = get_preset("test")
    parts = model_parts(build_gpt_model(cfg, transformer_config(cfg)))
    core = parts.layers[0].kv_module
    seen = []
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))

    def grab(module, args):
        seen.append((args[1].clone(), args[2].clone()))

    with torch.no_grad():
        h = core.register_forward_pre_hook(grab)
        logits(parts, tokens)
        h.remove()
        with kv_quant_hooks(parts, 4):
            h = core.register_forward_pre_hook(grab)  # runs after the quantizer
            base_logits = logits(parts, tokens)
            h.remove()
    (k_fp, v_fp), (k_q, v_q) = seen
    assert k_fp.shape == (cfg.seq_length, 2, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)
    torch.testing.assert_close(k_q, fake_quant(k_fp, 4))
    torch.testing.assert_close(v_q, fake_quant(v_fp, 4))
    assert not torch.equal(k_q, k_fp)
    assert base_logits.shape[-1] == cfg.padded_vocab_size()
