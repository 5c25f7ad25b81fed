"""A SLURM job requeues itself when its run is unfinished but got further in the job
(megatron_osp/training/run_state.py, examples/pretrain_slurm.sh), and never when it finished, stopped
at train.exit_at_step, or got nowhere (which would repeat the same failure in every new job)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from megatron_osp.testing.commands import stub_command
from megatron_osp.training.config import load_config, save_config
from megatron_osp.training.run_state import INTERRUPTED, main, requeue_decision, run_state

ROOT = Path(__file__).resolve().parents[1]


def _run_dir(root: Path, *, steps=50, exit_at_step=0, checkpoint=None, summary_steps=None, name="run") -> Path:
    """A run directory as the trainer leaves it: config.yaml, checkpoints/latest -> iter_N, summary.json."""
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(None, [f"train.train_steps={steps}", f"train.exit_at_step={exit_at_step}",
                                f"train.run_dir={run_dir}", "train.warmup_steps=1"])
    save_config(config, run_dir / "config.yaml")
    if checkpoint is not None:
        save_dir = run_dir / "checkpoints"
        (save_dir / f"iter_{checkpoint:07d}").mkdir(parents=True, exist_ok=True)
        (save_dir / "latest").write_text(f"iter_{checkpoint:07d}\n")
    if summary_steps is not None:
        (run_dir / "summary.json").write_text(json.dumps({"steps": summary_steps}))
    return run_dir


def test_the_state_of_a_run_and_whether_to_requeue_it(tmp_path):
    assert run_state(tmp_path / "none")["state"] == "not started"
    assert requeue_decision(run_state(tmp_path / "none"), None)[0] is False

    run = _run_dir(tmp_path, checkpoint=20)
    state = run_state(run)
    assert (state["state"], state["checkpoint_step"], state["train_steps"]) == ("unfinished", 20, 50)
    assert requeue_decision(state, None) == (True, f"{run}: unfinished at step 20 of 50 (this job started from no checkpoint)")
    assert requeue_decision(state, 10)[0] is True
    requeue, why = requeue_decision(state, 20)  # no progress in this job: a new one would fail the same way
    assert not requeue and "the newest checkpoint is still step 20 as when this job started" in why

    assert requeue_decision(run_state(_run_dir(tmp_path, name="fresh")), None)[0] is False  # no checkpoint at all
    finished = run_state(_run_dir(tmp_path, name="done", checkpoint=50, summary_steps=50))
    assert finished["state"] == "finished" and requeue_decision(finished, 20) == (False, f"{tmp_path / 'done'}: finished (50 steps)")
    # summary.json of an earlier, shorter schedule: the run was extended and is not finished
    assert run_state(_run_dir(tmp_path, name="longer", steps=80, checkpoint=60, summary_steps=50))["state"] == "unfinished"
    held = run_state(_run_dir(tmp_path, name="held", exit_at_step=30, checkpoint=30))
    assert held["state"] == "held" and requeue_decision(held, 10)[0] is False


def test_the_command_line_answers_and_names_a_broken_pointer(tmp_path, capsys):
    run = _run_dir(tmp_path, checkpoint=20)
    assert main([str(run), "--checkpoint-step"]) == 0 and capsys.readouterr().out == "20\n"
    assert main([str(run), "--requeue-since", "none"]) == 0 and capsys.readouterr().out.startswith("requeue: ")
    assert main([str(run), "--requeue-since", "20"]) == 1 and capsys.readouterr().out.startswith("no requeue: ")
    assert main([str(tmp_path / "x"), "--checkpoint-step"]) == 0 and capsys.readouterr().out == "none\n"
    (run / "checkpoints" / "latest").write_text("iter_0000099\n")
    assert main([str(run)]) == 2
    assert "latest points to" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(run), "--requeue-since", "ten"])


@pytest.mark.parametrize("case", ["progress", "capped", "no progress", "interrupted"])
def test_the_slurm_script_requeues_a_job_that_got_further_and_no_other(tmp_path, case):
    """With stand-in srun and scontrol: srun 'trains' by writing what a run that saved at step 20 (of 50)
    and stopped leaves, or fails at start-up writing nothing. scontrol records a requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    stub_command(bin_dir, "scontrol", f'if [[ $1 == show ]]; then echo node1; else echo "$@" >> {calls}; fi\n')
    if case == "no progress":
        stub_command(bin_dir, "srun", "echo 'error: data.paths: ...' >&2; exit 2\n")
    else:
        made = _run_dir(tmp_path / "made", checkpoint=20)  # copied into place by srun, as training would
        if case == "interrupted":  # stopped by Ctrl-C / scancel --signal=INT after a save (torchrun exits 1)
            (made / INTERRUPTED).write_text("SIGINT\n")
        exits = "; exit 1" if case == "interrupted" else ""
        stub_command(bin_dir, "srun", f"mkdir -p runs && cp -r {made} runs/myrun{exits}\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_JOB_ID="42", SLURM_JOB_NAME="osp",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if case == "capped":
        env["SLURM_RESTART_COUNT"] = "10"
    done = subprocess.run(["bash", str(ROOT / "examples" / "pretrain_slurm.sh"), "train.run_dir=runs/myrun"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    requeued = calls.read_text().split("\n") if calls.exists() else []
    if case == "progress":
        assert done.returncode == 0, done.stderr
        assert requeued[0] == "requeue 42"
        assert "requeue: runs/myrun: unfinished at step 20 of 50 (this job started from no checkpoint)" in done.stdout
        assert "requeued job 42 (srun exit 0)" in done.stdout
    elif case == "capped":
        assert done.returncode == 0 and not requeued
        assert "not requeued: already requeued 10 times (MAX_REQUEUES=10)" in done.stdout
    elif case == "interrupted":  # a user's interrupt is not requeued, though the job saved further
        assert done.returncode == 1 and not requeued
        assert "no requeue: runs/myrun: stopped by an interrupt (Ctrl-C, SIGINT; checkpoint of step 20)" in done.stdout
    else:
        assert done.returncode == 2 and not requeued  # srun's exit status, and no requeue
        assert "no requeue: runs/myrun: the run never started" in done.stdout
