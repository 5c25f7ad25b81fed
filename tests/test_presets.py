"""The osp-8b and osp-70b presets have Llama 3's shapes, and the 8B SLURM example launches a valid run.

Parameter counts: with Llama's own blocks (RMSNorm, no EmbProj) the presets have exactly Llama-3-8B's
8,030,261,248 and Llama-3-70B's 70,553,706,496 parameters (untied embeddings; published as 8.03B and
70.6B); tolerance 0, the counts are integers. ``ModelConfig.num_parameters`` itself is checked
against the parameters of Megatron models built with the presets' structure (GQA 4:1, untied) at a
size that builds in a second.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_osp.models.presets import get_preset
from megatron_osp.testing.commands import stub_command
from megatron_osp.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pretrain_osp_8b_slurm.sh"
LLAMA = {"normalization": "rmsnorm", "embedding_projection": False}


def test_presets_have_llama3_shapes_and_parameter_counts():
    m8, m70 = get_preset("osp-8b"), get_preset("osp-70b")
    shapes = lambda m: (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups,  # noqa: E731
                        m.ffn_hidden_size, m.vocab_size, m.seq_length, m.rotary_base,
                        m.untie_embeddings_and_output_weights)
    assert shapes(m8) == (32, 4096, 32, 8, 14336, 128256, 8192, 500000, True)
    assert shapes(m70) == (80, 8192, 64, 8, 28672, 128256, 8192, 500000, True)
    assert get_preset("osp-8b", **LLAMA).num_parameters() == 8_030_261_248
    assert get_preset("osp-70b", **LLAMA).num_parameters() == 70_553_706_496
    assert round(get_preset("osp-8b", **LLAMA).num_parameters() / 1e9, 2) == 8.03
    assert round(get_preset("osp-70b", **LLAMA).num_parameters() / 1e9, 1) == 70.6
    # OSP: one scale per SSNorm instead of h (2 per layer + final), plus the two h x h EmbProj matrices.
    for m, L, h in ((m8, 32, 4096), (m70, 80, 8192)):
        llama = get_preset("osp-8b" if L == 32 else "osp-70b", **LLAMA).num_parameters()
        assert m.num_parameters() == llama + 2 * h * h - (2 * L + 1) * (h - 1)
    # 128256 = 1002 x 128: no padded rows at TP=1 or 2; at TP=8 each rank's slice rounds to 128.
    assert [m8.padded_vocab_size(tp) for tp in (1, 2, 8)] == [128256, 128256, 129024]


def test_presets_make_megatron_configs_at_their_layouts():
    from megatron_osp.models.gpt import transformer_config

    tc = transformer_config(get_preset("osp-8b"), tensor_parallel_size=2, sequence_parallel=True, recompute="selective")
    assert (tc.num_query_groups, tc.kv_channels, tc.sequence_parallel, tc.recompute_granularity) == (8, 128, True, "selective")
    tc = transformer_config(get_preset("osp-70b"), tensor_parallel_size=8, pipeline_parallel_size=4,
                            recompute="full", recompute_num_layers=4)
    assert (tc.num_query_groups, tc.kv_channels, tc.num_layers // tc.pipeline_model_parallel_size) == (8, 128, 20)
    with pytest.raises(ValueError, match="does not divide the number of query groups"):
        transformer_config(get_preset("osp-8b"), tensor_parallel_size=16)


def _count_worker(rank, world_size, structures):
    """(num_parameters(), parameters of the built Megatron model minus padded vocabulary rows) per model."""
    from megatron_osp import parallel
    from megatron_osp.models.config import ModelConfig
    from megatron_osp.models.gpt import build_gpt_model, transformer_config

    parallel.init_distributed(1, 1)
    out = []
    for fields in structures:
        m = ModelConfig(**fields)
        model = build_gpt_model(m, transformer_config(m))
        padding = (m.padded_vocab_size() - m.vocab_size) * m.hidden_size * 2
        out.append((m.num_parameters(), sum(p.numel() for p in model.parameters()) - padding))
    return out


def test_num_parameters_counts_what_megatron_builds():
    structures = []
    for name in ("osp-8b", "osp-70b"):
        p = get_preset(name)
        shrink = p.hidden_size // 256  # keep heads, query groups and the FFN ratio; head dim 8 or 4
        small = dict(num_layers=2, hidden_size=256, num_attention_heads=p.num_attention_heads,
                     num_query_groups=p.num_query_groups, ffn_hidden_size=p.ffn_hidden_size // shrink,
                     vocab_size=1000, seq_length=64, rotary_base=p.rotary_base)
        structures += [dict(small, **LLAMA), dict(small, normalization="ssnorm", embedding_projection=True)]
    counts = run_distributed(_count_worker, 1, structures)[0]
    for fields, (formula, built) in zip(structures, counts):
        assert formula == built, fields


def test_8b_slurm_example_launches_a_valid_run(tmp_path):
    """What sbatch runs: bash -n passes, and with stand-in srun/scontrol the torchrun command it builds
    names the 8B preset at TP=2 with selective recompute, and its config loads and fits 4 x 8 GPUs."""
    assert os.access(EXAMPLE, os.X_OK)
    subprocess.run(["bash", "-n", str(EXAMPLE)], check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_file = tmp_path / "argv"
    # A long node list (more than a pipe buffer): a script that reads only its first line through
    # `head -n 1` under pipefail dies with SIGPIPE (exit 141), as it would on a large allocation.
    stub_command(bin_dir, "scontrol", "for i in $(seq 1 20000); do echo node$i; done\n")
    stub_command(bin_dir, "srun", f'printf "%s\\n" "$@" > {argv_file}\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(ROOT),
               SLURM_JOB_NODELIST="node[001-004]", SLURM_NNODES="4", SLURM_JOB_ID="42", SLURM_JOB_NAME="osp-8b")
    # sbatch runs a copy of the script from its spool directory: so does this test.
    spooled = tmp_path / "spool" / "slurm_script"
    spooled.parent.mkdir()
    spooled.write_text(EXAMPLE.read_text())
    done = subprocess.run(["bash", str(spooled), "data.paths=[/data/x_text_document]", "data.eod_id=0",
                           "train.micro_batch_size=2"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    argv = argv_file.read_text().splitlines()
    assert argv[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    assert argv[argv.index("--nnodes") + 1] == "4" and argv[argv.index("--nproc-per-node") + 1] == "8"
    rest = argv[argv.index("megatron_osp.training.pretrain") + 1:]
    assert rest[0] == "--config"
    config_path, overrides = rest[1], rest[2:]
    assert "train.run_dir=runs/osp-8b" in overrides and overrides[-1] == "train.micro_batch_size=2"

    from megatron_osp.training.config import load_config
    from megatron_osp.training.validation import check_world

    config = load_config(ROOT / config_path, overrides)
    assert config.model == get_preset("osp-8b")
    assert (config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size) == (2, 1)
    assert config.parallel.sequence_parallel and config.optimizer.distributed_optimizer
    assert config.train.recompute == "selective" and config.train.micro_batch_size == 2
    check_world(config, 4 * 8)  # DP = 16: 512 sequences = 2 per micro-batch x 16 micro-batches x 16 ranks


def test_8b_slurm_example_asks_for_what_the_requeue_needs():
    """sbatch reads the #SBATCH lines of the script it is given only: the 8B script execs
    pretrain_slurm.sh, whose own lines are comments there. So the 8B job must ask itself for what the
    requeue relies on (README "Checkpoints and resuming"): --requeue (a cluster with JobRequeue=0 refuses
    `scontrol requeue` otherwise), --open-mode=append (a requeued job's log is otherwise truncated) and
    the SIGTERM lead time; it only sized the job and lacked the first two."""
    import re

    def directives(script):
        found = re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script.read_text(), flags=re.M)
        return {key: value for key, value in found}

    base, big = directives(ROOT / "examples" / "pretrain_slurm.sh"), directives(EXAMPLE)
    assert set(big) >= set(base), f"{EXAMPLE.name} lacks #SBATCH --{', --'.join(sorted(set(base) - set(big)))}"
    for key in ("requeue", "open-mode", "signal"):
        assert big[key] == base[key], (key, big[key], base[key])


def test_the_slurm_examples_output_directories_are_in_the_repository():
    """sbatch opens #SBATCH --output before the script runs (its `mkdir -p logs` comes too late), and
    SLURM does not create the directory: from a fresh checkout the first job failed writing nothing."""
    import re

    for script in sorted((ROOT / "examples").glob("*.sh")):
        for directory in re.findall(r"^#SBATCH --output=(.+)/[^/]+$", script.read_text(), flags=re.M):
            assert (ROOT / directory / ".gitignore").is_file(), f"{script.name}: {directory}/ is not in the repository"


def test_launchers_give_the_sigterm_save_time_before_torchrun_kills_the_workers(tmp_path):
    """On SIGTERM the run finishes its step and saves, but torchrun SIGKILLs its workers 30 s after
    the signal unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise: a save longer than that (a
    large model's; with save_interval=0 the job's only checkpoint) was cut short. The SLURM script
    waits most of its --signal lead time, the single-node one a few minutes."""
    import re

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "timeout"
    for launcher in ("srun", "torchrun"):
        stub_command(bin_dir, launcher, f'echo "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" > {seen}\n')
    stub_command(bin_dir, "scontrol", "echo node1\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_NODELIST="node1",
               SLURM_NNODES="1", SLURM_JOB_ID="1", SLURM_JOB_NAME="x", NPROC="1")
    slurm = ROOT / "examples" / "pretrain_slurm.sh"
    lead = int(re.search(r"^#SBATCH --signal=TERM@(\d+)$", slurm.read_text(), flags=re.M).group(1))
    for script, low, high in ((slurm, 60, lead - 1), (ROOT / "examples" / "pretrain_single_node.sh", 120, 3600)):
        seen.unlink(missing_ok=True)
        done = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert low <= int(seen.read_text()) <= high, (script.name, seen.read_text())
