"""``train.load_weights_only``: a new run from a training checkpoint's model weights alone (Megatron-LM's
--finetune): step 0, a fresh optimizer (here another one: Muon after Adam, at another LR), LR schedule and
data order. Without it the same run is refused (a resume would carry Adam's state into Muon); the new
run's own checkpoints then resume in full."""

import pytest
import torch

from megatron_osp.testing.distributed import run_distributed


def _overrides(corpus, run_dir, optimizer, steps, *extra):
    return ["model.preset=test", f"data.paths=[{corpus}]", "data.eod_id=255", f"optimizer.name={optimizer}",
            f"train.train_steps={steps}", "train.warmup_steps=0", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.eval_batches=1", "train.log_interval=1", "train.tensorboard=false",
            "train.progress_bar=false", f"train.run_dir={run_dir}", *extra]


def _weights(trainer):
    from megatron_osp.training.loop import unwrap

    return {k: v.detach().clone() for k, v in unwrap(trainer.model).named_parameters()}


def _worker(rank, world, corpus, root):
    from megatron_osp.training.checkpoint import CheckpointError
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    first = Trainer(load_config(None, _overrides(corpus, f"{root}/a", "adam", 3)), log=lambda *_: None)
    first.train()
    trained = _weights(first)
    new_run = _overrides(corpus, f"{root}/b", "muon", 2, "optimizer.lr=0.001", f"train.load={root}/a/checkpoints")
    out = {}
    try:
        Trainer(load_config(None, new_run), log=lambda *_: None)
    except CheckpointError as e:
        out["refused"] = str(e)
    lines = []
    second = Trainer(load_config(None, new_run + ["train.load_weights_only=true"]), log=lines.append)
    loaded = _weights(second)
    out["same_weights"] = sorted(loaded) == sorted(trained) and all(torch.equal(loaded[k], trained[k]) for k in trained)
    out["start"] = (second.step, second.train_iter.consumed, second.scheduler.num_steps,
                    sum(len(s) for s in second.optimizer.state_dict()["state"].values())
                    if "state" in second.optimizer.state_dict() else 0)
    out["log"] = [line for line in lines if "loaded checkpoint" in line]
    second.train()
    out["steps"] = len(second.history)
    again = Trainer(load_config(None, new_run + ["train.load_weights_only=true"]), log=lambda *_: None)
    out["again"] = (again.step, again.train_iter.consumed)
    return out


def test_a_new_run_takes_only_the_weights_and_then_resumes_its_own_checkpoints(toy_corpus, tmp_path):
    out = run_distributed(_worker, 1, toy_corpus, str(tmp_path), timeout=300)[0]
    assert "optimizer.name: checkpoint 'adam', this run 'muon'" in out["refused"]
    # The way out it names is train.load_weights_only; it named another train.run_dir, which this run has.
    assert "add train.load_weights_only=true" in out["refused"] and "another train.run_dir" not in out["refused"]
    assert out["same_weights"]
    assert out["start"] == (0, 0, 0, 0)  # step, samples read, scheduler steps, optimizer state entries
    assert len(out["log"]) == 1 and "not restored: optimizer, rng, scheduler" in out["log"][0], out["log"]
    assert out["steps"] == 2
    assert out["again"] == (2, 8)  # the new run's own checkpoint: continued in full (2 steps x 4 samples)


def test_load_weights_only_without_load_is_refused(tmp_path):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.validation import ConfigError

    with pytest.raises(ConfigError, match="train.load_weights_only=true needs train.load"):
        load_config(None, ["model.preset=test", "data.eod_id=255", "train.load_weights_only=true",
                           f"train.run_dir={tmp_path}"])
