"""tools/bench_muon.py's CPU paths: the 1.4B cost model, and the --gpu --quick smoke run on CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_muon_cost_model_and_quick_run():
    env = dict(os.environ, MEGATRON_OSP_FORCE_CPU="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_muon.py"), "--cost-model", "--gpu", "--quick", "--iters", "1"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    # 1.4B at DP=8 x TP=2: 24 layers x (Q, K, V, proj, gate, up, fc2) + 2 EmbProj logical matrices.
    assert "logical matrices: 170" in text
    ratio = float(re.search(r"ours, max/mean \| ([0-9.]+)", text).group(1))
    assert 1.0 <= ratio <= 1.1
    assert "DDP gradient all-reduce" in text and "ratio Muon/AdamW" in text
    # The quick GPU path ran on CPU: NS rows and both of our optimizers timed.
    assert "| ours, batched by shape |" in text
    assert "| ours: Muon (hidden + EmbProj)" in text and "| ours: AdamW everywhere" in text
