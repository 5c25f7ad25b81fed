"""How examples/pretrain_slurm.sh launches torchrun, run with stand-in srun and scontrol (no SLURM, no GPU):
the layout it passes must be the job's allocation, not a default the allocation contradicts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from megatron_osp.testing.commands import stub_command

ROOT = Path(__file__).resolve().parents[1]


def _job(tmp_path: Path, **env_extra) -> tuple[subprocess.CompletedProcess, Path]:
    """Runs the script as the batch step of a 1-node job whose srun records its arguments and fails at
    start-up (so no requeue); returns the script's result and the file of srun's arguments."""
    bin_dir = tmp_path / "bin"
    calls = tmp_path / "srun.args"
    stub_command(bin_dir, "scontrol", "[[ $1 == show ]] && echo node1\n")
    stub_command(bin_dir, "srun", f'printf "%s\\n" "$@" > {calls}; exit 3\n')  # fails at start-up: no requeue
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_JOB_ID="42", SLURM_JOB_NAME="osp",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for key in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        env.pop(key, None)
    env.update(env_extra)
    done = subprocess.run(["bash", str(ROOT / "examples" / "pretrain_slurm.sh"), "train.run_dir=runs/x"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return done, calls


def _launch(tmp_path: Path, **env_extra) -> list[str]:
    """The srun command line the script ran as the batch step of a 1-node job."""
    done, calls = _job(tmp_path, **env_extra)
    assert done.returncode == 3, done.stdout + done.stderr
    return calls.read_text().splitlines()


def _nproc(args: list[str]) -> str:
    return args[args.index("--nproc-per-node") + 1]


def test_the_processes_per_node_follow_the_gpus_the_job_was_given(tmp_path):
    """`sbatch --gpus-per-node=4 examples/pretrain_slurm.sh` (the command line overrides the script's
    #SBATCH --gpus-per-node=8) used to start 8 ranks per node on 4 GPUs: GPUS_PER_NODE defaulted to 8
    whatever SLURM allocated. Now it defaults to SLURM_GPUS_ON_NODE; GPUS_PER_NODE still wins."""
    assert _nproc(_launch(tmp_path, SLURM_GPUS_ON_NODE="4")) == "4"
    assert _nproc(_launch(tmp_path, SLURM_GPUS_ON_NODE="4", GPUS_PER_NODE="2")) == "2"
    assert _nproc(_launch(tmp_path)) == "8"  # no GPU count from SLURM (e.g. GPUs not a GRES): the default


def test_a_job_refused_because_another_holds_the_run_directory_is_not_requeued(tmp_path):
    """Two jobs of one name share runs/<job name>. The second is refused (the first holds the run's
    lock), but the first saved a checkpoint meanwhile, so the second used to see its run 'further than
    it started' and requeue itself (up to MAX_REQUEUES times, each refused again). Now a run directory
    whose lock another process holds is not requeued: its holder decides for it."""
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).parent))
    from test_run_state import _run_dir

    made = _run_dir(tmp_path / "made", checkpoint=20)  # what the first job saved while the second ran
    (tmp_path / "runs" / "x").mkdir(parents=True)
    holder = subprocess.Popen(  # the first job's rank 0, holding runs/x's lock
        [sys.executable, "-c", "import sys, time; from megatron_osp.training import run_lock; "
         "assert run_lock.acquire(sys.argv[1]) is None; print('held', flush=True); time.sleep(60)",
         str(tmp_path / "runs" / "x")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        calls = tmp_path / "scontrol.calls"
        stub_command(bin_dir, "scontrol", f'if [[ $1 == show ]]; then echo node1; else echo "$@" >> {calls}; fi\n')
        # the second job's srun: refused at start-up, after the first job's save landed
        stub_command(bin_dir, "srun", f"cp -r {made}/. runs/x/; echo 'error: train.run_dir=runs/x is in use' >&2; exit 2\n")
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path),
                   SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_JOB_ID="43", SLURM_JOB_NAME="x",
                   PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        start = time.time()
        done = subprocess.run(["bash", str(ROOT / "examples" / "pretrain_slurm.sh")],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert time.time() - start < 60
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2 and not calls.exists(), done.stdout + done.stderr
    assert "no requeue: runs/x: in use by another job" in done.stdout, done.stdout


def test_the_reproduction_refuses_a_kept_tokenizer_of_another_vocab(tmp_path):
    """reproduce_osp_small.sh keeps RUN_DIR's tokenizer and tokens from an earlier run. Run again with another
    VOCAB it used to train on the old tokenizer with model.vocab_size=VOCAB (a larger one was accepted: a
    character-level run reported as the VOCAB asked for). Now it stops, naming the file, before any training."""
    import sys

    from megatron_osp.data.tokenizer import train_sentencepiece

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    corpus = run_dir / "corpus.jsonl"
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()
    corpus.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) + "\n" for i in range(12)) * 20)
    train_sentencepiece(corpus, run_dir / "tokenizer", vocab_size=300)
    (run_dir / "corpus_text_document.idx").write_text("")  # the kept tokens
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # python: the real one, except training, which here only says it started
    stub_command(bin_dir, "python", f'[[ "$1 $2" == "-m megatron_osp.training.pretrain" ]] && {{ echo TRAINING; exit 9; }}\n'
                             f'exec {sys.executable} "$@"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CPU="1", RUN_DIR=str(run_dir),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for vocab, rc in (("350", 1), ("300", 9)):
        done = subprocess.run(["bash", str(ROOT / "examples" / "reproduce_osp_small.sh")], env=dict(env, VOCAB=vocab),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == rc, done.stdout + done.stderr
        if rc == 1:
            assert f"error: {run_dir}/tokenizer.model (kept from an earlier run) has 300 pieces, not VOCAB=350" \
                in done.stderr and "TRAINING" not in done.stdout


def test_a_requeue_setting_other_than_its_values_is_refused_before_the_run(tmp_path):
    """REQUEUE is 1 (the default) or 0: REQUEUE=true used to turn requeueing off without a word (the script
    compared it with 1), and MAX_REQUEUES=ten failed only after the run. Now refused before srun."""
    for key, value, message in (("REQUEUE", "true", "error: REQUEUE=true: 1 (requeue; the default) or 0 (off)"),
                                ("MAX_REQUEUES", "ten", "error: MAX_REQUEUES=ten: a whole number")):
        done, calls = _job(tmp_path, **{key: value})
        assert done.returncode == 1 and message in done.stderr, done.stdout + done.stderr
        assert not calls.exists()


def test_a_reproduction_switch_other_than_0_or_1_is_refused(tmp_path):
    """CPU=true used to run the GPU recipe, ALL_ROWS=yes left out the two rows, PARALLEL=true trained one row
    at a time, all without a word (the script compared each with 1). Now refused before anything runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub_command(bin_dir, "python", "echo RAN; exit 8\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RUN_DIR=str(tmp_path / "r"))
    for switch in ("CPU", "PARALLEL", "ALL_ROWS"):
        done = subprocess.run(["bash", str(ROOT / "examples" / "reproduce_osp_small.sh")], env=dict(env, **{switch: "true"}),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and f"error: {switch}=true: 1 (on) or 0 (off)" in done.stderr, done.stdout + done.stderr
        assert "RAN" not in done.stdout and not (tmp_path / "r").exists()
