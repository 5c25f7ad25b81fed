"""train.exit_after_minutes: every rank stops after the same step once the time is up (each rank's
clock differs, so the stop is agreed on), saves, and the same command without it continues."""

import json

from megatron_osp.testing.distributed import run_distributed
from test_training_parallel import _overrides


def _worker(rank, world_size, overrides, run_dir):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    lines = []
    trainer = Trainer(load_config(None, overrides + [f"train.run_dir={run_dir}"]), log=lines.append)
    summary = trainer.train()
    return {"step": trainer.step, "stopped": summary.get("stopped"), "lines": lines}


def test_time_limit_stops_every_rank_after_one_step_and_a_rerun_continues(toy_corpus, tmp_path):
    overrides = _overrides(toy_corpus, "adam", pp=2) + ["train.train_steps=4"]
    run_dir = tmp_path / "run"
    # a limit of 6 ms is up after the first step (building the model alone takes longer)
    first = run_distributed(_worker, 2, overrides + ["train.exit_after_minutes=0.0001"], str(run_dir))
    assert [r["step"] for r in first] == [1, 1]
    assert all(r["stopped"] == "train.exit_after_minutes=0.0001" for r in first), first
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000001"
    said = [line for r in first for line in r["lines"] if "stopped after step 1 of 4" in line]
    assert said and said[0].endswith("Run the same command again to continue."), said
    again = run_distributed(_worker, 2, overrides, str(run_dir))  # the time limit is this job's own
    assert [r["step"] for r in again] == [4, 4] and all(r["stopped"] is None for r in again)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
