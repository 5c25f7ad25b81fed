"""TensorBoard gets the kurtosis of every hidden state, not only the mean and max."""

import json

import pytest

from megatron_osp.testing.distributed import run_distributed
from test_training_parallel import _overrides


def _train(rank, world_size, overrides, run_dir):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    Trainer(load_config(None, overrides + [f"train.run_dir={run_dir}"]), log=lambda *_: None).train()


def test_tensorboard_has_per_layer_kurtosis_and_max_abs(toy_corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [o for o in _overrides(toy_corpus, "adam") if not o.startswith("train.tensorboard")]
    overrides += ["train.tensorboard=true", "train.kurtosis_interval=1", "train.save=false"]
    run_dir = tmp_path / "run"
    run_distributed(_train, 1, overrides, str(run_dir))

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    report = json.loads((run_dir / "kurtosis.json").read_text())
    assert report["names"], "no hidden states in the report"
    for name, value, peak in zip(report["names"], report["values"], report["max_abs"]):
        kurt = events.Scalars(f"kurtosis_layer/{name}")
        assert [e.step for e in kurt][:2] == [1, 2]  # every kurtosis_interval steps, then at the end
        assert kurt[-1].value == pytest.approx(value, rel=1e-5)
        assert events.Scalars(f"max_abs_layer/{name}")[-1].value == pytest.approx(peak, rel=1e-5)
    assert {"kurtosis/mean", "kurtosis/max"} <= tags

    # the model-FLOPs rate beside tokens/s: models/flops.py's count per token, over the one device
    from megatron_osp.models import get_preset
    from megatron_osp.models.flops import training_flops_per_token

    flops = training_flops_per_token(get_preset("test"))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(m["tflops_per_device"] == pytest.approx(m["tokens_per_s"] * flops / 1e12, rel=1e-9)
                         for m in lines)
    tflops = events.Scalars("train/tflops_per_device")
    assert [e.step for e in tflops] == [m["step"] for m in lines]
    assert tflops[-1].value == pytest.approx(lines[-1]["tflops_per_device"], rel=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tflops_per_device"] == pytest.approx(summary["tokens_per_s"] * flops / 1e12, rel=1e-9)


def _train_with_slow_saves(rank, world_size, overrides, run_dir):
    import time

    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    trainer = Trainer(load_config(None, overrides + [f"train.run_dir={run_dir}"]), log=lambda *_: None)
    save = trainer.save

    def slow_save(*args, **kwargs):  # what a large model's save looks like next to a toy step
        time.sleep(1.0)
        return save(*args, **kwargs)

    trainer.save = slow_save
    trainer.train()


def test_tokens_per_s_of_a_window_leaves_out_saves(toy_corpus, tmp_path):
    """A log window's tokens/s (and TFLOP/s) counted the time of a save (and of evaluations) made in
    it: every window after a save read as a throughput drop. Saves of 1 s every 2 steps, logged every
    2 steps: each window's time, tokens / tokens_per_s, must stay far below a save's."""
    overrides = [o for o in _overrides(toy_corpus, "adam") if not o.startswith(("train.train_steps", "train.log_"))]
    overrides += ["train.train_steps=6", "train.log_interval=2", "train.save_interval=2", "train.eval_interval=2"]
    run_dir = tmp_path / "run"
    run_distributed(_train_with_slow_saves, 1, overrides, str(run_dir))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4, 6]
    tokens_per_window = 2 * 8 * 32  # log_interval x global batch x the test preset's sequence length
    seconds = [tokens_per_window / m["tokens_per_s"] for m in lines]
    assert max(seconds) < 0.8, seconds


def _train_collecting_console(rank, world_size, overrides, run_dir):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    lines = []
    Trainer(load_config(None, overrides + [f"train.run_dir={run_dir}"]), log=lines.append).train()
    return lines


def test_console_shows_interval_val_loss_and_kurtosis(toy_corpus, tmp_path):
    """The val loss of every train.eval_interval and the kurtosis of every train.kurtosis_interval went
    to TensorBoard/W&B only: someone watching the console or a SLURM log saw them at the end alone.
    Each now has a console line, with the values the sinks get."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [o for o in _overrides(toy_corpus, "adam") if not o.startswith(("train.tensorboard", "train.train_steps"))]
    overrides += ["train.tensorboard=true", "train.train_steps=4", "train.eval_interval=2", "train.kurtosis_interval=1",
                  "train.save=false", "train.progress_bar=false"]
    run_dir = tmp_path / "run"
    (lines,) = run_distributed(_train_collecting_console, 1, overrides, str(run_dir))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()

    val = [line for line in lines if "| val loss" in line]
    assert len(val) == 1 and val[0].split("|")[0].split() == ["step", "2"], lines
    assert float(val[0].rsplit(" ", 1)[1]) == pytest.approx(events.Scalars("val/loss")[0].value, abs=6e-5)
    kurt = [line for line in lines if line.startswith("step") and "| kurtosis mean" in line]
    assert [int(line.split("|")[0].split()[1]) for line in kurt] == [1, 2, 3], lines  # the end prints its table
    means = events.Scalars("kurtosis/mean")
    for line, event in zip(kurt, means):
        assert float(line.split("kurtosis mean ")[1].split()[0]) == pytest.approx(event.value, abs=6e-5)
