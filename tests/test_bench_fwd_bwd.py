"""tools/bench_fwd_bwd.py: its fused-SSNorm candidate against models/ssnorm.SSNorm on random inputs,
and the --quick smoke run on CPU (every arm and every norm timed)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def test_fused_ssnorm_candidate_matches_ssnorm():
    """Same outputs and gradients (x and the scalar gain) within fp32 round-off (stated: 1e-5 relative)."""
    from bench_fwd_bwd import SimpleCfg, fused_ssnorm

    from megatron_osp.models.ssnorm import SSNorm

    torch.manual_seed(0)
    ss = SSNorm(SimpleCfg(torch.float32), 96, eps=1e-5)
    with torch.no_grad():
        ss.weight.fill_(1.7)
    x = (torch.randn(33, 96) * 3).requires_grad_(True)
    g = torch.randn(33, 96)
    y = ss(x)
    y.backward(g)
    ref = (y.detach(), x.grad.clone(), ss.weight.grad.clone())
    x.grad, ss.weight.grad = None, None
    y2 = fused_ssnorm(x, ss.weight, ss.eps)
    y2.backward(g)
    for got, want in zip((y2.detach(), x.grad, ss.weight.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bench_fwd_bwd_quick_run():
    env = dict(os.environ, MEGATRON_OSP_FORCE_CPU="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_fwd_bwd.py"), "--quick", "--iters", "1"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    for arm in ("adam", "ssnorm", "embproj", "osp"):
        assert f"| {arm} |" in out.stdout
    assert "| SSNorm via torch.nn.functional.rms_norm (candidate) |" in out.stdout
