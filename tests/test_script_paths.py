"""Relative paths given to the example scripts are from the directory the user ran them in. The scripts
change to the repository root; a relative RUN_DIR (DATA, TOKENIZER, CONFIG, OUT, ...) used to resolve
against it, so the output landed inside the checkout. Run here with stand-in python/torchrun that record
what they were given and stop (no training)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from megatron_osp.testing.commands import stub_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rel(tmp_path):
    """A relative directory name and the caller's directory; removes what a broken script made in the repo."""
    name = f"relpath-test-{uuid.uuid4().hex[:8]}"
    work = tmp_path / "work"
    work.mkdir()
    yield name, work
    leaked = ROOT / name
    if leaked.exists():
        shutil.rmtree(leaked)


def _run(script: str, work: Path, env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{work.parent / 'bin'}:{os.environ['PATH']}", **env_extra)
    return subprocess.run(["bash", str(ROOT / script), *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=60)


def test_quickstart_puts_a_relative_run_dir_under_the_callers_directory(rel):
    name, work = rel
    seen = work.parent / "seen"
    stub_command(work.parent / "bin", "python", f'[[ $1 == -c ]] && {{ echo stub; exit 0; }}\n'
                                         f'printf "%s\\n" "$@" > {seen}; exit 7\n')
    done = _run("examples/quickstart_cpu.sh", work, {"RUN_DIR": f"{name}/q"})
    assert done.returncode == 7, done.stdout + done.stderr
    assert seen.read_text().splitlines() == ["tools/builtin_corpus.py", "--output", f"{work}/{name}/q/corpus.jsonl"]
    assert (work / name / "q").is_dir() and not (ROOT / name).exists()


def test_reproduction_resolves_relative_run_dir_data_tokenizer_config_from_the_caller(rel):
    name, work = rel
    seen = work.parent / "seen"
    stub_command(work.parent / "bin", "python", f'[[ "$1 $2" == "-m megatron_osp.training.pretrain" ]] && '
                                         f'{{ printf "%s\\n" "$@" > {seen}; exit 9; }}\nexit 8\n')
    done = _run("examples/reproduce_osp_small.sh", work,
                {"CPU": "1", "RUN_DIR": f"{name}/r", "DATA": "d/corpus_text_document", "TOKENIZER": "d/tok.model",
                 "REPRO_CONFIG": "my.yaml"})
    assert done.returncode == 9, done.stdout + done.stderr
    args = seen.read_text().splitlines()
    assert args[2:4] == ["--config", f"{work}/my.yaml"]
    for expected in (f"data.paths=[{work}/d/corpus_text_document]", f"data.tokenizer_model={work}/d/tok.model",
                     f"train.run_dir={work}/{name}/r/adam"):
        assert expected in args, args
    assert (work / name / "r" / "timings.txt").is_file() and not (ROOT / name).exists()


def test_single_node_runs_in_the_callers_directory(rel):
    name, work = rel
    seen = work.parent / "seen"
    stub_command(work.parent / "bin", "torchrun", f'{{ pwd; echo "$PYTHONPATH"; printf "%s\\n" "$@"; }} > {seen}\n')
    env = {"NPROC": "1"}
    for config, expected in ((None, ROOT / "megatron_osp/configs/osp_1.4b.yaml"), ("mine.yaml", "mine.yaml")):
        if config:
            env["CONFIG"] = config
        done = _run("examples/pretrain_single_node.sh", work, env, f"train.run_dir={name}")
        assert done.returncode == 0, done.stdout + done.stderr
        cwd, pythonpath, *args = seen.read_text().splitlines()
        assert cwd == str(work)  # so train.run_dir=NAME, data.paths=[...] and CONFIG are from there
        assert pythonpath.split(os.pathsep)[0] == str(ROOT)  # -m megatron_osp from this checkout
        assert args[-3:] == ["--config", str(expected), f"train.run_dir={name}"]


def test_device_checks_writes_a_relative_out_under_the_callers_directory(rel):
    name, work = rel
    stub_command(work.parent / "bin", "python3", "exit 0\n")  # setup: everything importable, no build
    done = _run("tools/device_checks.sh", work, {"OUT": name}, "no-such-stage")
    assert done.returncode == 2, done.stdout + done.stderr
    assert (work / name / "env.txt").is_file() and not (ROOT / name).exists()


def test_device_checks_refuses_a_switch_other_than_0_or_1_before_setup(rel):
    """DEVICE_CHECKS_CPU=true used to run the GPU stages and STEP_ZERO=yes to leave out the osp-zero arm
    (the script compared each with 1, so any other value meant 0). Now refused before setup."""
    name, work = rel
    stub_command(work.parent / "bin", "python3", "echo RAN; exit 0\n")
    for switch in ("DEVICE_CHECKS_CPU", "STEP_ZERO", "PARALLEL"):
        done = _run("tools/device_checks.sh", work, {"OUT": name, switch: "true"}, "step")
        assert done.returncode == 2 and f"error: {switch}=true: 1 (on) or 0 (off)" in done.stderr, done.stdout + done.stderr
        assert "RAN" not in done.stdout and not (work / name / "env.txt").exists()
