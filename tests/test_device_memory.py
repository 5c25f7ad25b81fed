"""Peak GPU memory in metrics.jsonl, the console line, the sinks and summary.json.

This machine has no GPU: ``device_memory.cuda_peaks`` (the only function that calls CUDA) is replaced
by a fake giving each rank its own peaks per reading. At PP=2 the logging rank is rank 1 (the last
stage) and rank 0's peaks are the higher ones, so each line must carry the highest of the two ranks
in that window (not a running maximum), and summary.json the highest over the run, the reading after
the last line (the end-of-run evaluation) included. On CPU the fields are absent, not 0.
"""

import json

import torch

from megatron_osp.testing.distributed import run_distributed
from megatron_osp.training.device_memory import FIELDS
from test_training_parallel import _overrides

# (allocated, reserved) GiB of each reading, per rank; 3 log lines, then the summary's reading
READINGS = {0: [(2.5, 20.5), (5.5, 50.5), (1.5, 10.5), (3.5, 30.5)],
            1: [(2.0, 20.0), (5.0, 50.0), (1.0, 10.0), (3.0, 30.0)]}


def _worker(rank, world_size, overrides, root):
    from megatron_osp.training import device_memory
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    out = {}
    cpu = Trainer(load_config(None, overrides + [f"train.run_dir={root}/cpu"]), log=lambda *_: None)
    out["cpu_summary"] = cpu.train()
    readings = iter(READINGS[rank])
    device_memory.cuda_peaks = lambda device: next(readings)
    lines = []
    fake = Trainer(load_config(None, overrides + [f"train.run_dir={root}/gpu"]), log=lines.append)
    out["gpu_summary"], out["lines"], out["left"] = fake.train(), lines, list(readings)
    return out


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_peak_memory_per_log_line_and_run_with_a_fake_gpu(toy_corpus, tmp_path):
    overrides = _overrides(toy_corpus, "adam", pp=2) + ["train.train_steps=3", "train.eval_batches=1"]
    results = run_distributed(_worker, 2, overrides, str(tmp_path))
    expected = [dict(zip(FIELDS, peaks)) for peaks in READINGS[0]]

    for r in results:
        assert r["left"] == [], r["left"]  # one reading per log line and one for the summary, on every rank
        assert not set(FIELDS) & set(r["cpu_summary"]), r["cpu_summary"]
        assert {k: r["gpu_summary"][k] for k in FIELDS} == {"max_mem_allocated_gib": 5.5, "max_mem_reserved_gib": 50.5}
    records = _records(tmp_path / "gpu")
    assert [{k: m[k] for k in FIELDS} for m in records] == expected[:3]
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert (summary["max_mem_allocated_gib"], summary["max_mem_reserved_gib"]) == (5.5, 50.5)
    console = [line for line in results[1]["lines"] if line.startswith("step ")]
    assert [line.split(" | ")[-1] for line in console] == [
        "peak memory 2.50 GiB allocated, 20.50 GiB reserved",
        "peak memory 5.50 GiB allocated, 50.50 GiB reserved",
        "peak memory 1.50 GiB allocated, 10.50 GiB reserved"], console

    # on CPU: no such fields at all
    assert all(not set(FIELDS) & set(m) for m in _records(tmp_path / "cpu"))
    assert not set(FIELDS) & set(json.loads((tmp_path / "cpu" / "summary.json").read_text()))


class _Sinks:
    def __init__(self):
        self.scalars = {}

    def scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)


def test_memory_fields_reach_the_sinks_and_the_cpu_reads_none(tmp_path):
    from megatron_osp.training.device_memory import cuda_peaks
    from megatron_osp.training.run_log import RunLog

    assert cuda_peaks(torch.device("cpu")) is None
    stats = {"step": 4, "loss": 2.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, "tflops_per_device": 0.1}
    for memory in ({}, {"max_mem_allocated_gib": 1.25, "max_mem_reserved_gib": 2.0}):
        sinks, lines = _Sinks(), []
        RunLog(tmp_path, sinks, lines.append, 1, 1, True).metrics({**stats, **memory})
        assert {tag: v for tag, (v, _) in sinks.scalars.items() if "mem" in tag} == {
            f"train/{k}": v for k, v in memory.items()}
        assert ("peak memory" in lines[0]) == bool(memory), lines
