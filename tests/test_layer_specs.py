"""Backend choice: Megatron-Core's local spec without Transformer Engine, a clear error if TE is forced."""

import pytest

from megatron_osp.models import layer_specs
from megatron_osp.models.ssnorm import AutoSSNorm, SSNorm


def test_auto_falls_back_to_local_spec_without_transformer_engine(monkeypatch):
    monkeypatch.setattr(layer_specs, "transformer_engine_available", lambda: False)
    assert layer_specs.resolve_backend("auto") == "local"
    spec = layer_specs.gpt_layer_spec("ssnorm", "auto", qk_layernorm=True)
    sub = spec.submodules
    assert sub.input_layernorm is AutoSSNorm and sub.pre_mlp_layernorm is AutoSSNorm  # the default kernel
    assert sub.self_attention.submodules.q_layernorm is AutoSSNorm
    from megatron.core.tensor_parallel import ColumnParallelLinear

    assert sub.self_attention.submodules.linear_qkv is ColumnParallelLinear


def test_forcing_transformer_engine_without_it_names_the_option(monkeypatch):
    monkeypatch.setattr(layer_specs, "transformer_engine_available", lambda: False)
    with pytest.raises(ImportError, match="transformer_impl"):
        layer_specs.resolve_backend("transformer_engine")


def test_unknown_backend_and_norm_are_rejected():
    with pytest.raises(ValueError, match="transformer_impl"):
        layer_specs.resolve_backend("cudnn")
    with pytest.raises(ValueError, match="normalization"):
        layer_specs.gpt_layer_spec("layernorm")


def test_rmsnorm_spec_is_megatrons_own_and_specs_do_not_share_state():
    rms = layer_specs.gpt_layer_spec("rmsnorm", "local")
    ss = layer_specs.gpt_layer_spec("ssnorm", "local")
    assert not issubclass(rms.submodules.input_layernorm, SSNorm)
    assert ss.submodules.input_layernorm is AutoSSNorm
    # Building the SSNorm spec must not have modified Megatron's cached spec objects.
    assert not issubclass(layer_specs.gpt_layer_spec("rmsnorm", "local").submodules.input_layernorm, SSNorm)


def test_fused_softmax_only_when_its_kernel_is_importable(monkeypatch):
    """On a GPU without Apex/Megatron's kernels, FusedScaleMaskSoftmax would import a missing
    extension on the first forward (seen on an H100): the config must not ask for it."""
    from megatron_osp.models import gpt
    from megatron_osp.models.presets import get_preset

    monkeypatch.setattr(gpt.torch.cuda, "is_available", lambda: True)
    for present in (False, True):
        monkeypatch.setattr(gpt, "_importable", lambda *mods, present=present: present)
        cfg = gpt.transformer_config(get_preset("test"), use_cpu_initialization=True)
        assert cfg.masked_softmax_fusion is present
    monkeypatch.setattr(gpt.torch.cuda, "is_available", lambda: False)
    assert gpt.transformer_config(get_preset("test")).masked_softmax_fusion is False
