"""A run that saves into its own train.save_dir must not take over a train.run_dir holding another run.

Found by the training sweep: run A finished in RUN (checkpoints in RUN/checkpoints); run B with
train.run_dir=RUN train.save_dir=ELSEWHERE (another seed) started from scratch and replaced A's
config.yaml, summary.json and kurtosis.json (A's metrics.jsonl moved aside), leaving A's checkpoints
beside B's config and results. Now refused before anything is built, naming both directories.
"""

import types
from pathlib import Path

import pytest

from megatron_osp.training.checkpoint import CheckpointError
from megatron_osp.training.resume_check import checkpoint_to_load


def _train(run_dir: Path, **values):
    return types.SimpleNamespace(**{"auto_resume": True, "load": None, "save": True, "run_dir": str(run_dir),
                                    **values})


def _finished_run(run_dir: Path) -> None:
    ckpts = run_dir / "checkpoints"
    (ckpts / "iter_0000012").mkdir(parents=True)
    (ckpts / "latest").write_text("iter_0000012\n")
    (run_dir / "summary.json").write_text("{}")


def test_a_run_saving_elsewhere_does_not_take_over_a_run_dir_with_another_runs_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    _finished_run(run_dir)
    elsewhere = tmp_path / "elsewhere"
    for settings in (_train(run_dir), _train(run_dir, auto_resume=False), _train(run_dir, save=False),
                     _train(run_dir, load=str(run_dir / "checkpoints"))):
        with pytest.raises(CheckpointError, match=rf"train.run_dir={run_dir} holds another run \(its checkpoints: "
                                                  rf"{run_dir / 'checkpoints'}, latest: iter_0000012\); this run "
                                                  rf"saves into train.save_dir={elsewhere}"):
            checkpoint_to_load(settings, elsewhere)


def test_the_run_dirs_own_checkpoints_and_other_run_dirs_are_unaffected(tmp_path):
    run_dir = tmp_path / "run"
    _finished_run(run_dir)
    own = run_dir / "checkpoints"
    # The default save_dir (the run dir's own checkpoints, named either way) resumes them.
    assert checkpoint_to_load(_train(run_dir), own) == (own, True)
    assert checkpoint_to_load(_train(run_dir), run_dir / "." / "checkpoints") == (run_dir / "." / "checkpoints", True)
    # A save_dir that already holds this run's own checkpoints resumes them, wherever run_dir is.
    saved = tmp_path / "saved"
    (saved / "iter_0000004").mkdir(parents=True)
    (saved / "latest").write_text("iter_0000004\n")
    assert checkpoint_to_load(_train(run_dir), saved) == (saved, True)
    # A fresh run dir, or one whose earlier attempt saved nothing, may save elsewhere.
    assert checkpoint_to_load(_train(tmp_path / "fresh"), tmp_path / "elsewhere") == (None, False)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert checkpoint_to_load(_train(tmp_path / "empty"), tmp_path / "elsewhere") == (None, False)
