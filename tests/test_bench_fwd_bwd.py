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
