"""tools/bench_step.py (training-step throughput, Adam vs OSP) at smoke-test size, and its input checks.

The figures of a CPU smoke run mean nothing; the test checks that every arm ran the real Trainer
(OSP has EmbProj's extra parameters, the ZeRO arm reports its early Newton-Schulz counters), that
the rates are the step times' and that ratios are against the Adam row of the same run.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, str(ROOT / "tools" / "bench_step.py")]


def test_quick_run_times_every_arm_against_adam(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run(TOOL + ["--quick", "--zero", "--eager-ssnorm", "--accumulate", "2", "--project-to", "64", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert list(rows) == ["adam", "osp", "osp-eager", "osp-zero"]
    assert rows["adam"]["ratio_vs_adam"] == 1.0
    assert rows["osp"]["params"] == rows["osp-eager"]["params"] == rows["osp-zero"]["params"] > rows["adam"]["params"]
    for r in rows.values():
        assert len(r["step_seconds"]) == len(r["optimizer_seconds"]) == 3 and r["micro_batch"] == 2
        # a step is 2 micro-batches of 2 sequences of 32 tokens
        assert abs(r["tokens_per_s"] - 2 * 2 * 32 / sorted(r["step_seconds"])[1]) < 1e-6 * r["tokens_per_s"]
        assert abs(r["ratio_vs_adam"] - r["tokens_per_s"] / rows["adam"]["tokens_per_s"]) < 1e-12
        assert r["tflops"] > 0
        # the optimizer step is timed inside each step
        assert all(0 < o < s for o, s in zip(r["optimizer_seconds"], r["step_seconds"]))
    # OSP's two EmbProj matmuls per token: more model FLOPs per token than Adam+RMSNorm's at one rate
    assert rows["osp"]["tflops"] / rows["osp"]["tokens_per_s"] > rows["adam"]["tflops"] / rows["adam"]["tokens_per_s"]
    # projection to 64 sequences = 32 micro-batches of 2: 32 x (step - optimizer) / 2 + optimizer
    projected = report["projected"]
    assert projected["sequences_per_step"] == 64
    for arm, r in rows.items():
        ms = 32 * (r["ms_per_step"] - r["optimizer_ms"]) / 2 + r["optimizer_ms"]
        p = projected["rows"][arm]
        assert abs(p["ms_per_step"] - ms) < 1e-9 * ms and abs(p["tokens_per_s"] - 64 * 32 / (ms / 1000)) < 1e-6 * p["tokens_per_s"]
        assert abs(p["ratio_vs_adam"] - p["tokens_per_s"] / projected["rows"]["adam"]["tokens_per_s"]) < 1e-12
    assert rows["osp"]["early_ns"] is None or sum(rows["osp"]["early_ns"].values()) == 0
    assert sum(rows["osp-zero"]["early_ns"].values()) > 0
    assert "vs adam" in done.stdout


def test_bad_arguments_are_refused_before_any_work():
    for args, message in ((["--micro-batch", "0"], "--micro-batch"), (["--data", "/nonexistent"], "--eod-id"),
                          (["--steps", "0"], "--steps"), (["--accumulate", "0"], "--accumulate")):
        done = subprocess.run(TOOL + args, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr[-1000:])


def test_each_osp_arm_differs_from_osp_by_its_own_setting_only():
    sys.path.insert(0, str(ROOT / "tools"))
    import argparse

    import bench_step

    args = argparse.Namespace(preset="test", accumulate=1, warmup=1, steps=1, recompute="none")
    osp = bench_step.arm_overrides(args, {}, "osp", "d", 0, 2, "/t")
    extra = {arm: [o for o in bench_step.arm_overrides(args, {}, arm, "d", 0, 2, "/t") if o not in osp]
             for arm in ("osp-eager", "osp-zero")}
    assert extra["osp-eager"] == ["model.ssnorm_kernel=eager", "train.run_dir=/t/osp-eager"]
    assert extra["osp-zero"][:-1] == bench_step.ZERO
    assert not any("ssnorm_kernel" in o for o in bench_step.arm_overrides(args, {}, "adam", "d", 0, 2, "/t"))
    assert not any("ssnorm_kernel" in o for o in osp)  # the osp arm runs the default kernel
