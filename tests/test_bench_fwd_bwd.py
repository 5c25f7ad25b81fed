"""tools/bench_fwd_bwd.py: the --quick smoke run on CPU (every arm and every norm timed; FusedSSNorm's
numbers are tested in test_ssnorm_kernels.py)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def test_bench_fwd_bwd_quick_run():
    env = dict(os.environ, MEGATRON_OSP_FORCE_CPU="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_fwd_bwd.py"), "--quick", "--iters", "1"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    for arm in ("adam", "ssnorm", "embproj", "osp", "ssnorm-fused", "osp-fused"):
        assert f"| {arm} |" in out.stdout
    assert "| FusedSSNorm (ssnorm_kernel=fused) |" in out.stdout
    assert "| osp-fused | ssnorm | fused | yes |" in out.stdout


def test_bench_model_is_held_as_training_holds_it_under_bf16(megatron_single_rank):
    """Under bf16 the bench times the model in Megatron's Float16Module, as training does: every
    parameter (the adam arm's torch RMSNorm weights included) in bf16, so that torch's rms_norm takes
    its fused kernel. Built bare, the RMSNorm weights stayed fp32 and the adam arm's norms ran as
    separate ops, which made OSP look as fast as Adam on the H200."""
    import dataclasses

    from bench_fwd_bwd import ARMS, bench_model

    from megatron_osp.models.presets import get_preset

    norm, embproj, kernel = ARMS["adam"]
    cfg = dataclasses.replace(get_preset("test"), normalization=norm, embedding_projection=embproj,
                              ssnorm_kernel=kernel)
    model = bench_model(cfg, torch.bfloat16, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    shape = (2, cfg.seq_length)
    tokens = torch.randint(0, cfg.vocab_size, shape)
    positions = torch.arange(cfg.seq_length).expand(shape)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(tokens, positions, None, labels=tokens).float().mean().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_fused_rms_norm" in ops, sorted(o for o in ops if "norm" in o)
    # fp32 stays the bare model (the CPU quick run)
    bare = bench_model(cfg, torch.float32, torch.device("cpu"))
    assert {p.dtype for p in bare.parameters()} == {torch.float32}
