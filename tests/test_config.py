"""Run configuration: YAML + overrides, presets, and errors that name the bad field."""

from pathlib import Path

import pytest

from megatron_osp.training.config import load_config, save_config


def test_yaml_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\n  vocab_size: 1000\noptimizer:\n  name: muon\n")
    cfg = load_config(path, ["model.num_layers=2", "train.train_steps=7", "train.warmup_steps=2", "data.paths=[a, b]"])
    assert (cfg.model.hidden_size, cfg.model.vocab_size, cfg.model.num_layers) == (128, 1000, 2)
    assert cfg.optimizer.name == "muon" and cfg.train.train_steps == 7
    assert cfg.data.paths == ["a", "b"]


def test_a_saved_run_config_with_the_default_wsd_fraction_loads(tmp_path):
    """A saved config holds every field, the default train.wsd_decay_fraction under decay_style=cosine
    too: only another value is refused with a non-wsd schedule (tests/test_validation.py)."""
    from megatron_osp.training.config import save_config

    save_config(load_config(None, ["train.decay_style=cosine"]), tmp_path / "config.yaml")
    assert "wsd_decay_fraction: 0.2" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml").train.decay_style == "cosine"
    osp = Path(__file__).parents[1] / "megatron_osp" / "configs" / "osp_1.4b.yaml"  # wsd, fraction 0.2
    assert load_config(osp, ["train.decay_style=cosine"]).train.wsd_decay_fraction == 0.2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hidden_sise=3"], "model.hidden_sise"),
        (["modle.hidden_size=3"], "modle"),
        (["optimizer.name=sgd"], "optimizer.name"),
        (["optimizer.delivery=sideways"], "optimizer.delivery"),
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


def test_values_are_checked_against_the_field_types(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; it used to reach the LR schedule and fail there with a bare
    TypeError. Now floats take it as a number, and a value of the wrong type names its field."""
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n  muon_lr: 2e-2\ndata:\n  split: 100\n  weights: [1, 3e-1]\n")
    cfg = load_config(path, ["optimizer.weight_decay=1e-2", "train.bf16=null"])
    assert cfg.optimizer.lr == 0.001 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.muon_lr == 0.02 and cfg.optimizer.weight_decay == 0.01
    assert cfg.data.split == "100" and cfg.data.weights == [1.0, 0.3] and cfg.train.bf16 is None
    for override, message in (
        ("train.train_steps=1e3", "train.train_steps must be an integer, got '1e3'"),
        ("model.hidden_size=12.5", "model.hidden_size must be an integer"),
        ("model.num_layers=true", "model.num_layers must be an integer"),
        ("optimizer.lr=fast", "optimizer.lr must be a number"),
        ("train.tensorboard=maybe", "train.tensorboard must be true or false"),
        ("data.paths=corpus_text_document", r"data.paths must be a list"),
        ("data.weights=[1, x]", r"data.weights\[1\] must be a number"),
    ):
        with pytest.raises(ValueError, match=message):
            load_config(None, [override])
    path.write_text("train:\n  micro_batch_size: four\n")
    with pytest.raises(ValueError, match=r"run.yaml: train.micro_batch_size must be an integer"):
        load_config(path)


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


def test_a_key_given_twice_in_a_config_file_is_refused_with_its_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` section used to drop every field
    of the first (this file trained 100 steps at batch 16), a field given twice kept the last value."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  train_steps: 500\n  global_batch_size: 64\noptimizer:\n  name: muon\ntrain:\n  micro_batch_size: 2\n")
    with pytest.raises(ValueError, match=r"run.yaml: invalid YAML: 'train' is given twice in one mapping \(first on line 1\)"
                                         r"\n  in \".*run.yaml\", line 6"):
        load_config(path)
    path.write_text("model:\n  preset: tiny\n  hidden_size: 256\n  hidden_size: 512\n")
    with pytest.raises(ValueError, match=r"(?s)'hidden_size' is given twice in one mapping \(first on line 3\).*line 4"):
        load_config(path)
    with pytest.raises(ValueError, match=f"config file {tmp_path}: Is a directory"):
        load_config(tmp_path)


def test_numbers_are_read_as_yaml_1_2_not_base_60_or_octal(tmp_path):
    """PyYAML (YAML 1.1) read `2:3` as 123 and `1:30` as 90 (base 60) and `010` as 8 (octal), silently:
    train.profile_steps=2:3 profiled step 123 of a long run."""
    with pytest.raises(ValueError, match=r"train.profile_steps='2:3': must be START-END"):
        load_config(None, ["train.train_steps=200", "train.profile_steps=2:3"])
    with pytest.raises(ValueError, match=r"train.exit_after_minutes must be a number, got '1:30'"):
        load_config(None, ["train.exit_after_minutes=1:30"])
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  seed: 010\n  exit_after_minutes: 1_000\n  profile_steps: 3\n  train_steps: 0x10\n"
                    "optimizer:\n  lr: 1e-3\n  weight_decay: .5\n")
    config = load_config(path)
    assert (config.train.seed, config.train.exit_after_minutes, config.train.profile_steps) == (10, 1000.0, "3")
    assert (config.train.train_steps, config.optimizer.lr, config.optimizer.weight_decay) == (16, 1e-3, 0.5)
    path.write_text("train:\n  exit_after_minutes: 1:30.5\n")
    with pytest.raises(ValueError, match=r"run.yaml: train.exit_after_minutes must be a number, got '1:30.5'"):
        load_config(path)


def test_a_string_field_written_as_a_number_keeps_the_text_as_written(tmp_path):
    """YAML reads 007, 1.10, 0123 as numbers; a string field took str() of the number, so
    train.run_dir=007 wrote into the directory '7' and data.paths=[0123] read the dataset '123'."""
    config = load_config(None, ["train.run_dir=007", "train.wandb_name=1.10", "data.paths=[0123, 1_000]",
                                "data.eod_id=255", "train.train_steps=0x10", "data.weights=[1, 2.50]"])
    assert (config.train.run_dir, config.train.wandb_name, config.data.paths) == ("007", "1.10", ["0123", "1_000"])
    assert config.train.train_steps == 16 and type(config.train.train_steps) is int
    assert config.data.weights == [1.0, 2.5] and all(type(w) is float for w in config.data.weights)
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  save_dir: 0042\ndata:\n  split: 0100\n  paths: [x]\n  eod_id: 255\n")
    config = load_config(path)
    assert (config.train.save_dir, config.data.split) == ("0042", "0100")
    save_config(config, tmp_path / "saved.yaml")  # plain types: yaml.safe_dump takes them
    assert load_config(tmp_path / "saved.yaml").train.save_dir == "0042"


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("train: [1, 2]\n", [], r"run.yaml: train must be a mapping of its fields \(field: value\), got \[1, 2\]"),
        ("train:\n  - train_steps: 5\n", ["train.seed=3"], r"train must be a mapping of its fields"),
        ("optimizer: adam\n", [], r"optimizer must be a mapping of its fields .* got 'adam'"),
        ("model:\n  preset: [tiny]\n", [], r"model.preset must be a preset name, got \['tiny'\]"),
        ("train:\n  5: 3\n  x: 1\n", [], r"unknown field\(s\) train.5, train.x"),
        ("1: {}\nfoo: {}\n", [], r"unknown section\(s\) \[1, 'foo'\]"),
    ],
)
def test_a_config_file_of_the_wrong_shape_is_named_not_a_type_error(tmp_path, text, overrides, message):
    """A section that is a list or a scalar, a preset that is a list, or a key that is a number used to
    end in a bare TypeError from inside load_config."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path, overrides)


def test_the_entry_point_takes_a_config_after_overrides(tmp_path, capsys):
    """pretrain_slurm.sh runs `--config CONFIG train.run_dir=... "$@"`: a user's `--config mine.yaml`
    among "$@" used to stop argparse with "unrecognized arguments: <the next override>". Now the last
    --config counts and every override is kept."""
    from megatron_osp.training.pretrain import main

    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  global_batch_size: 0\n")
    shipped = Path(__file__).resolve().parents[1] / "megatron_osp" / "configs" / "osp_1.4b.yaml"
    assert main(["--config", str(shipped), "train.run_dir=x", "--config", str(mine),
                 "train.micro_batch_size=-1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {mine} + command line: 2 invalid settings" in err
    assert "train.global_batch_size=0" in err and "train.micro_batch_size=-1" in err


def test_a_saved_run_config_with_settings_that_did_nothing_still_loads_as_it_ran(tmp_path):
    """Settings refused for a new run because they do nothing (data.num_workers, sequence parallelism
    at TP 1, a wsd fraction without wsd, exit_at_step past the end) were accepted before; a checkpoint's
    run_config.yaml holding them must still load (resume, export, evaluation), as what the run did."""
    import pytest
    import yaml

    from megatron_osp.training.checkpoint import load_config_file
    from megatron_osp.training.config import load_config
    from megatron_osp.training.validation import ConfigError

    changes = {"data.num_workers": ("data", {"num_workers": 4}),
               "parallel.sequence_parallel": ("parallel", {"sequence_parallel": True}),
               "train.wsd_decay_fraction": ("train", {"decay_style": "cosine", "wsd_decay_fraction": 0.5}),
               "train.exit_at_step": ("train", {"train_steps": 100, "exit_at_step": 500})}
    path = tmp_path / "run_config.yaml"
    for name, (section, values) in changes.items():  # a new run with any of these is refused by name
        raw = load_config(None).to_dict()
        raw[section].update(values)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            load_config(path)
    raw = load_config(None).to_dict()
    for section, values in changes.values():
        raw[section].update(values)
    raw["train"]["seed"] = 7
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    for config in (load_config(path, saved=True), load_config_file(path)):
        assert config.data.num_workers == 0 and config.parallel.sequence_parallel is False
        assert config.train.wsd_decay_fraction == 0.2 and config.train.exit_at_step == 0
        assert config.train.train_steps == 100 and config.train.seed == 7 and config.train.decay_style == "cosine"
    # at TP 2 sequence parallelism did something: kept
    raw["parallel"].update(sequence_parallel=True, tensor_parallel_size=2)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_config(path, saved=True).parallel.sequence_parallel is True


def test_a_saved_run_config_from_before_data_valid_paths_loads_and_one_with_it_round_trips(tmp_path):
    """Run configs saved before data.valid_paths/valid_weights existed (every checkpoint's
    run_config.yaml) load with validation on data.split's share; one with them saves and loads back."""
    import yaml

    from megatron_osp.training.checkpoint import load_config_file
    from megatron_osp.training.config import save_config

    raw = load_config(None, ["data.paths=[a]"]).to_dict()
    for name in ("valid_paths", "valid_weights"):
        del raw["data"][name]
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    for config in (load_config(path, saved=True), load_config_file(path), load_config(path)):
        assert (config.data.valid_paths, config.data.valid_weights, config.data.split) == (None, None, "98,2,0")
    own = load_config(None, ["data.paths=[a]", "data.split=100", "data.valid_paths=[v, w]", "data.valid_weights=[1, 3]"])
    save_config(own, tmp_path / "own.yaml")
    for config in (load_config(tmp_path / "own.yaml", saved=True), load_config_file(tmp_path / "own.yaml")):
        assert (config.data.valid_paths, config.data.valid_weights, config.data.split) == (["v", "w"], [1.0, 3.0], "100")
