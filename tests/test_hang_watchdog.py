"""train.hang_timeout_minutes: a rank whose step (or evaluation, kurtosis measurement, save, or a part of
the start-up) runs past the limit prints one line naming the part and the setting, then every
thread's Python stack, and exits with code 3; a run whose parts stay under the limit finishes, and
the watchdog is gone after it, and after a start that fails.

The watchdog alone runs in a small Python process (it imports no torch): it fires, it is re-armed
by each part, ``close()`` disarms it (faulthandler's backstop included), and a main thread that holds
the GIL is still caught, by the backstop. The training runs are 2 gloo ranks (DP=2) whose stderr goes
to a file per rank: both ranks stuck in step 2, and one rank stuck in the gradient all-reduce of step
2 because its peer never arrives (a dead peer, its own watchdog off). In the start-up: one rank stalls
(watchdog off) before building the datasets, or before reading a checkpoint's shards, and its peer
is ended where it waits for it; a start that fails with an ordinary exception leaves no watcher.
"""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from megatron_osp.testing.distributed import run_distributed
from megatron_osp.training.hang_watchdog import EXIT_CODE
from test_training_parallel import _overrides

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the watchdog alone
def _script(body: str, timeout=30):
    code = "from megatron_osp.training.hang_watchdog import HangWatchdog\nimport time\n" + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


def test_watchdog_fires_after_the_limit_with_the_message_and_the_stacks():
    done, took = _script("""
        def stuck_in_the_part():
            time.sleep(60)
        dog = HangWatchdog(0.01, rank=5)  # 0.6 s
        dog.start()
        dog.arm("step 7")
        stuck_in_the_part()
    """)
    assert done.returncode == EXIT_CODE, done
    assert took < 30
    first = done.stderr.splitlines()[0]
    assert first.startswith("hang watchdog (rank 5): step 7 has not finished after 0.6 s "
                            "(train.hang_timeout_minutes=0.01)"), done.stderr
    assert "in stuck_in_the_part" in done.stderr, done.stderr
    assert 'in _watch' in done.stderr  # all threads: the watcher's own stack too


def test_the_exit_takes_the_processes_multiprocessing_children_with_it(tmp_path):
    """os._exit left them running as orphans: Megatron-Core's checkpoint writer keeps a spawned Manager
    process from the first save on (two were left after every CI run, by the start-up test's ranks)."""
    pid_file = tmp_path / "child.pid"
    done, _ = _script(f"""
        import multiprocessing, os
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        open({str(pid_file)!r}, "w").write(str(child.pid))
        dog = HangWatchdog(0.01)
        dog.start()
        dog.arm("step 1")
        time.sleep(60)
    """)
    assert done.returncode == EXIT_CODE, done
    pid = int(pid_file.read_text())
    for _ in range(50):  # SIGKILLed; init reaps it a moment later
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the child {pid} outlived the watchdog's exit")


def test_re_arming_keeps_short_parts_alive_and_close_disarms_everything():
    # 10 parts of 0.2 s under a 1.2 s limit (2 s in all), then closed and 2.6 s more: past the limit
    # and past faulthandler's backstop (2.4 s); nothing may fire.
    done, _ = _script("""
        dog = HangWatchdog(0.02)
        dog.start()
        for i in range(10):
            dog.arm(f"step {i}")
            time.sleep(0.2)
        dog.close()
        time.sleep(2.6)
        print("alive")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "alive" and done.stderr == "", done


def test_a_main_thread_holding_the_gil_is_caught_by_faulthandlers_backstop():
    # A regex that backtracks for ever holds the GIL: the watcher thread cannot run, the C timer can.
    done, took = _script("""
        import re
        def holds_the_gil():
            re.match(r"(a|a)+$", "a" * 64 + "b")
        dog = HangWatchdog(0.01)
        dog.start()
        dog.arm("step 3")
        holds_the_gil()
    """)
    assert done.returncode == 1, done
    assert done.stderr.startswith("Timeout ("), done.stderr
    assert "in holds_the_gil" in done.stderr, done.stderr


def test_off_starts_no_thread():
    from megatron_osp.training.hang_watchdog import HangWatchdog

    dog = HangWatchdog(0.0)
    dog.start()
    dog.arm("step 1")
    assert not dog.running and not any(t.name == "hang-watchdog" for t in threading.enumerate())
    dog.close()


# ------------------------------------------------------------------ training runs
def _hang_in_step_2():
    time.sleep(600)


def _stderr_to(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.close(fd)


def _hang_worker(rank, world_size, overrides, run_dir, err_dir, minutes, sleepers):
    """Train with train.hang_timeout_minutes=minutes[rank]; the ranks in ``sleepers`` never finish step 2."""
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    _stderr_to(f"{err_dir}/rank{rank}.err")
    config = load_config(None, overrides + [f"train.run_dir={run_dir}", f"train.hang_timeout_minutes={minutes[rank]}"])
    trainer = Trainer(config, log=lambda *_: None)
    schedule = trainer._run_schedule

    def run_schedule(iters, forward_only):
        if trainer.step == 1 and not forward_only and rank in sleepers:
            _hang_in_step_2()
        return schedule(iters, forward_only)

    trainer._run_schedule = run_schedule
    trainer.train()
    return "finished"


def _world_dies(*args, worker=_hang_worker) -> str:
    with pytest.raises(AssertionError) as failed:
        run_distributed(worker, 2, *args)
    return str(failed.value)


def test_a_hung_step_ends_every_rank_with_its_stacks(toy_corpus, tmp_path):
    overrides = _overrides(toy_corpus, "adam") + ["train.train_steps=4", "train.save=false"]
    message = _world_dies(overrides, str(tmp_path / "run"), str(tmp_path), [0.05, 0.05], [0, 1])
    for rank in (0, 1):
        assert f"rank {rank} exit code {EXIT_CODE}" in message, message
        err = (tmp_path / f"rank{rank}.err").read_text()
        assert (f"hang watchdog (rank {rank}): step 2 has not finished after 3 s "
                "(train.hang_timeout_minutes=0.05)") in err, err
        assert "in _hang_in_step_2" in err and "in train_step" in err, err
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1  # step 1 was logged, step 2 never finished


def test_a_rank_waiting_for_a_dead_peer_is_ended_in_the_collective(toy_corpus, tmp_path):
    # Rank 1 stops in step 2 with its watchdog off (a dead peer); rank 0 waits for it in the
    # gradient all-reduce, and its own watchdog ends it.
    overrides = _overrides(toy_corpus, "adam") + ["train.train_steps=4", "train.save=false"]
    message = _world_dies(overrides, str(tmp_path / "run"), str(tmp_path), [0.05, 0.0], [1])
    assert f"rank 0 exit code {EXIT_CODE}" in message, message
    err = (tmp_path / "rank0.err").read_text()
    assert "hang watchdog (rank 0): step 2 has not finished after 3 s" in err, err
    assert "in finish_grad_sync" in err and "in train_step" in err, err  # Megatron DDP's gradient reduce
    assert "_hang_in_step_2" not in err
    assert "hang watchdog" not in (tmp_path / "rank1.err").read_text()


def _normal_worker(rank, world_size, overrides, run_dir):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    def watchdogs():
        return [t for t in threading.enumerate() if t.name == "hang-watchdog"]

    trainer = Trainer(load_config(None, overrides + [f"train.run_dir={run_dir}/ok"]), log=lambda *_: None)
    after_start = len(watchdogs()) + trainer.watchdog.running  # closed after the start; train() starts it again
    summary = trainer.train()
    out = {"steps": summary["steps"], "after_start": after_start,
           "after_run": len(watchdogs()) + trainer.watchdog.running}
    # An exit through an exception (here the end-of-run kurtosis measurement) closes it too.
    failing = Trainer(load_config(None, overrides + [f"train.run_dir={run_dir}/fails"]), log=lambda *_: None)
    seen = []

    def measure():
        seen.append(len(watchdogs()))
        raise RuntimeError("kurtosis failed")

    failing.measure_kurtosis = measure
    with pytest.raises(RuntimeError, match="kurtosis failed"):
        failing.train()
    out["during_failing_run"], out["after_failing_run"] = seen, len(watchdogs()) + failing.watchdog.running
    return out


def test_a_run_with_the_watchdog_on_finishes_and_leaves_no_watchdog(toy_corpus, tmp_path):
    overrides = _overrides(toy_corpus, "adam") + ["train.train_steps=3", "train.hang_timeout_minutes=0.5"]
    for r in run_distributed(_normal_worker, 2, overrides, str(tmp_path)):
        assert r == {"steps": 3, "after_start": 0, "after_run": 0, "during_failing_run": [1],
                     "after_failing_run": 0}, r


# ------------------------------------------------------------------ the start-up
def _stall_in_the_start_up():
    time.sleep(600)


def _start_up_hang_worker(rank, world_size, overrides, run_dir, err_dir, minutes, where):
    """Start with train.hang_timeout_minutes=minutes[rank]; rank 1 stalls (a shared filesystem that
    stops answering) just before building the datasets (``where="datasets"``), or before reading the
    shards of the checkpoint it continues from (``where="checkpoint"``: one step is trained and saved
    first, watchdog off)."""
    from megatron_osp.training import checkpoint, loop
    from megatron_osp.training.config import load_config

    _stderr_to(f"{err_dir}/rank{rank}.err")
    overrides = overrides + [f"train.run_dir={run_dir}", "train.train_steps=2"]
    if where == "checkpoint":
        first = load_config(None, overrides + ["train.exit_at_step=1", "train.hang_timeout_minutes=0"])
        loop.Trainer(first, log=lambda *_: None).train()
    if rank == 1:
        module, name = (loop, "build_datasets") if where == "datasets" else (checkpoint.integrity, "verify_checkpoint")
        real = getattr(module, name)

        def stalled(*args, **kwargs):
            _stall_in_the_start_up()
            return real(*args, **kwargs)

        setattr(module, name, stalled)
    config = load_config(None, overrides + [f"train.hang_timeout_minutes={minutes[rank]}"])
    loop.Trainer(config, log=lambda *_: None)
    return "started"


@pytest.mark.parametrize("where", ["datasets", "checkpoint"])
def test_a_rank_waiting_in_the_start_up_for_a_stalled_peer_is_ended(toy_corpus, tmp_path, where):
    # Rank 1 stalls with its watchdog off; rank 0 waits for it in a collective of the start-up (the
    # dataset builder's barrier, or the all-gather of the checkpoint's checksum problems) and its own
    # watchdog ends it, naming the start-up part.
    overrides = _overrides(toy_corpus, "adam")
    run = tmp_path / "run"
    message = _world_dies(overrides, str(run), str(tmp_path), [0.05, 0.0], where, worker=_start_up_hang_worker)
    assert f"rank 0 exit code {EXIT_CODE}" in message, message
    err = (tmp_path / "rank0.err").read_text()
    part, waits_in = {"datasets": ("building the datasets", "in build_datasets"),
                      "checkpoint": (f"loading checkpoint {run / 'checkpoints'}", "in verify_checkpoint")}[where]
    assert (f"hang watchdog (rank 0): start-up: {part} has not finished after 3 s "
            "(train.hang_timeout_minutes=0.05)") in err, err
    assert waits_in in err and "in __init__" in err, err
    assert "_stall_in_the_start_up" not in err
    assert "hang watchdog" not in (tmp_path / "rank1.err").read_text()


def _failing_start_worker(rank, world_size, overrides, run_dir):
    from megatron_osp.training import loop
    from megatron_osp.training.config import load_config

    def watchdogs():
        return len([t for t in threading.enumerate() if t.name == "hang-watchdog"])

    during = []

    def unreadable_data(*args, **kwargs):
        during.append(watchdogs())
        raise RuntimeError("the data files are unreadable")

    loop.build_datasets = unreadable_data
    config = load_config(None, overrides + [f"train.run_dir={run_dir}", "train.hang_timeout_minutes=0.03"])
    with pytest.raises(RuntimeError, match="unreadable"):
        loop.Trainer(config, log=lambda *_: None)
    after = watchdogs()
    # The process goes on past the limit (1.8 s) and faulthandler's backstop (3.6 s): nothing may fire.
    time.sleep(4.0)
    return {"during": during, "after": after, "later": watchdogs()}


def test_a_start_that_fails_leaves_no_watchdog(toy_corpus, tmp_path):
    overrides = _overrides(toy_corpus, "adam")
    assert run_distributed(_failing_start_worker, 1, overrides, str(tmp_path / "run")) == [
        {"during": [1], "after": 0, "later": 0}]
