"""Run configuration: YAML + overrides, presets, and errors that name the bad field."""

import pytest

from megatron_osp.training.config import load_config


def test_yaml_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\n  vocab_size: 1000\noptimizer:\n  name: muon\n")
    cfg = load_config(path, ["model.num_layers=2", "train.train_steps=7", "train.warmup_steps=2", "data.paths=[a, b]"])
    assert (cfg.model.hidden_size, cfg.model.vocab_size, cfg.model.num_layers) == (128, 1000, 2)
    assert cfg.optimizer.name == "muon" and cfg.train.train_steps == 7
    assert cfg.data.paths == ["a", "b"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hidden_sise=3"], "model.hidden_sise"),
        (["modle.hidden_size=3"], "modle"),
        (["optimizer.name=sgd"], "optimizer.name"),
        (["model.normalization=layernorm"], "model.normalization"),
        (["train.decay_style=exp"], "train.decay_style"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "micro_batch_size"),
        (["model.hidden_size=102"], "num_attention_heads"),
        (["train.train_steps=4", "train.warmup_steps=4"], r"train\.warmup_steps=4 must be smaller than train\.train_steps=4"),
        (["train.train_steps=0"], "train.train_steps"),
        (["train.warmup_steps=-1"], "train.warmup_steps"),
        (["hidden_size=3"], "section.field=value"),
    ],
)
def test_bad_configuration_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle: {}\n")
    with pytest.raises(ValueError, match="unknown.yaml"):
        load_config(unknown)


def test_unknown_preset_is_named():
    with pytest.raises(KeyError, match="huge"):
        load_config(None, ["model.preset=huge"])
