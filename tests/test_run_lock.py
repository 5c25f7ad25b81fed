"""Two jobs in one train.run_dir: the second is refused instead of sharing it.

Found by the training sweep: the same command started twice on one run directory (an sbatch
submitted twice, a requeued job whose predecessor's ranks still ran) had the second job move the
first's metrics.jsonl lines into metrics.dropped.jsonl, both append step 4 to metrics.jsonl, and the
second's save remove the first's iter_0000004.tmp half way (its save then failed). Rank 0 now holds
an flock on <run_dir>/.run.lock for the life of its process; the kernel drops it when the process
dies, even by SIGKILL, so a requeued job never finds a stale lock.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_osp.training import run_lock

REPO = Path(__file__).resolve().parents[1]
_HOLD = (
    "import sys, time; sys.path.insert(0, sys.argv[2]); from megatron_osp.training import run_lock; "
    "assert run_lock.acquire(sys.argv[1]) is None; print('held', flush=True); time.sleep(60)"
)


def test_a_second_job_is_refused_while_the_first_runs_and_admitted_once_it_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        message = run_lock.acquire(run_dir)
        assert message is not None and message.startswith(f"train.run_dir={run_dir} is in use by another job (host ")
        assert f"pid {first.pid} holds {run_dir / '.run.lock'}" in message
        assert str(run_dir.resolve()) not in run_lock._held
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    deadline = time.monotonic() + 10
    while (message := run_lock.acquire(run_dir)) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert message is None  # the killed job's lock is gone with it
    assert run_lock.acquire(run_dir) is None  # this process again: already held
    second = subprocess.run([sys.executable, "-c", _HOLD, str(run_dir), str(REPO)], capture_output=True, text=True,
                            timeout=60)
    assert second.returncode != 0 and "held" not in second.stdout  # now this process keeps others out


def test_pretrain_refuses_a_run_dir_another_job_holds_before_writing_into_it(toy_corpus, tmp_path):
    import os

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        env = dict(os.environ, MEGATRON_OSP_FORCE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "megatron_osp.training.pretrain", "model.preset=test",
               f"data.paths=[{toy_corpus}]", "data.eod_id=255", f"data.cache_dir={tmp_path / 'cache'}",
               "train.train_steps=2", "train.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2",
               "train.eval_batches=1", "train.tensorboard=false", "train.progress_bar=false", f"train.run_dir={run_dir}"]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: train.run_dir={run_dir} is in use by another job (host " in proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("config.yaml", "metrics.jsonl", "checkpoints", "summary.json"):
        assert not (run_dir / name).exists(), name
