"""A step whose loss or gradient is not finite stops the run before anything is saved.

It used to go on: the NaN gradients went into every weight through the optimizer step, later saves
wrote NaN checkpoints and ``keep_last`` pruned the good ones. Here a hook makes step 4's logits NaN
(what a diverged run or a bf16 overflow does); the run must stop at step 4 on every rank with the
error naming the step and the newest checkpoint (step 2's, saved every 2 steps), which must be intact:
``latest`` still names it and its weights are finite. With the gradient norm (clipping on) and
without it (optimizer.clip_grad=0: the loss decides, known on the last pipeline stage only).
"""

import json

import pytest
import torch

from megatron_osp.testing.distributed import run_distributed
from test_training_parallel import _overrides

POISONED_STEP = 4


def _worker(rank, world_size, overrides, run_dir):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer
    from megatron_osp.training.step_guard import NonFiniteStep

    trainer = Trainer(load_config(None, overrides + [f"train.run_dir={run_dir}"]), log=lambda *_: None)

    def poison(module, inputs, output):  # the output layer's logits in step POISONED_STEP
        if trainer.step == POISONED_STEP - 1 and module.training:
            return (output[0] * float("nan"),) + tuple(output[1:])
        return None

    for chunk in trainer.model_chunks:
        core = chunk.module
        if getattr(core, "post_process", False):
            core.output_layer.register_forward_hook(poison)
    try:
        trainer.train()
    except NonFiniteStep as e:
        return {"error": str(e), "step": trainer.step}
    return {"error": None, "step": trainer.step}


@pytest.mark.parametrize("clip_grad,pp,dp", [(1.0, 1, 1), (0.0, 2, 1), (1.0, 1, 2)],
                         ids=["grad-norm", "loss-at-pp2", "grad-norm-zero-dp2"])
def test_a_non_finite_step_stops_the_run_before_any_save(toy_corpus, tmp_path, clip_grad, pp, dp):
    overrides = _overrides(toy_corpus, "muon", pp=pp) + [
        "train.train_steps=8", "train.save_interval=2", "train.keep_last=1", f"optimizer.clip_grad={clip_grad}"]
    if dp > 1:  # our whole-matrix ZeRO: its norm must be the same on every rank, or one rank would go on
        overrides.append("optimizer.distributed_optimizer=true")
    run_dir = tmp_path / "run"
    results = run_distributed(_worker, pp * dp, overrides, str(run_dir))
    for r in results:  # every rank stopped, at the poisoned step, with the message
        assert r["step"] == POISONED_STEP - 1 and r["error"] is not None, r
        assert f"step {POISONED_STEP}: the loss or the gradient is not finite" in r["error"], r["error"]
        assert "iter_0000002" in r["error"] and "is intact" in r["error"], r["error"]
    save_dir = run_dir / "checkpoints"
    assert (save_dir / "latest").read_text().strip() == "iter_0000002"
    assert sorted(p.name for p in save_dir.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    from megatron_osp.analysis.loading import load_for_analysis

    model = load_for_analysis(str(run_dir)).model  # step 2's weights: loadable and finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
