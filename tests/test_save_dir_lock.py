"""Two jobs with different train.run_dir but one train.save_dir: the second is refused.

Found by the training sweep: the run-directory lock (<run_dir>/.run.lock, run_lock.py) let two
concurrent jobs with different run directories share one train.save_dir, where each would resume
from, save into and prune the other's checkpoints. A job that saves now holds <save_dir>/.run.lock
too; the second is refused before writing anything, naming the directory and the holder.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_HOLD = (
    "import sys, time; sys.path.insert(0, sys.argv[3]); from megatron_osp.training import run_lock; "
    "assert run_lock.claim(sys.argv[1], sys.argv[2]) is None; print('held', flush=True); time.sleep(120)"
)


def test_a_second_job_saving_into_the_same_save_dir_is_refused(toy_corpus, tmp_path):
    shared = tmp_path / "shared_checkpoints"
    first = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run_a"), str(shared), str(REPO)],
                             stdout=subprocess.PIPE, text=True)
    run_b = tmp_path / "run_b"
    try:
        assert first.stdout.readline().strip() == "held"
        env = dict(os.environ, MEGATRON_OSP_FORCE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "megatron_osp.training.pretrain", "model.preset=test",
               f"data.paths=[{toy_corpus}]", "data.eod_id=255", f"data.cache_dir={tmp_path / 'cache'}",
               "train.train_steps=2", "train.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2",
               "train.eval_batches=1", "train.tensorboard=false", "train.progress_bar=false",
               f"train.run_dir={run_b}", f"train.save_dir={shared}"]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"error: train.save_dir={shared} is in use by another job (host " in proc.stderr
            and f"pid {first.pid} holds {shared / '.run.lock'})" in proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in shared.iterdir()) == [".run.lock"]  # no save of the second job
    assert not (run_b / "config.yaml").exists() and not (run_b / "metrics.jsonl").exists()


def test_the_save_dir_is_free_again_once_its_job_ends(tmp_path):
    from megatron_osp.training import run_lock

    shared = tmp_path / "shared_checkpoints"
    first = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run_a"), str(shared), str(REPO)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        message = run_lock.claim(tmp_path / "run_b", shared)
        assert message is not None and message.startswith(f"train.save_dir={shared} is in use by another job")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert run_lock.claim(tmp_path / "run_b", shared) is None  # the killed job's locks went with it
    # A save_dir that is the run dir itself is one lock.
    assert run_lock.claim(tmp_path / "run_c", tmp_path / "run_c") is None
