"""What a run writes about itself as it trains, on the logging rank: ``metrics.jsonl`` (one line per
``log_interval`` steps, and a line with an ``event`` key where something changed, e.g. the validation
set on a resume: readers that want the steps' metrics skip those), the metric sinks (TensorBoard,
W&B: metric_sinks.py), the console line, the model-FLOPs rate of its tokens/s (models/flops.py) and,
on GPUs, peak memory (device_memory.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megatron_osp.fileio import atomic_write_text
from megatron_osp.models.flops import training_flops_per_token
from megatron_osp.training.device_memory import FIELDS as MEMORY_FIELDS
from megatron_osp.training.device_memory import MemoryPeaks

__all__ = ["RunLog", "mean_tail", "progress_bar"]

TRAIN_SCALARS = ("loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_device")


class RunLog:
    """``sinks``: the run's MetricSinks; ``log``: the console; ``flops_per_token``: model FLOPs per
    trained token; ``devices``: the world size; ``writer``: whether this rank writes; ``device``: this
    rank's (``memory``: its peak memory readings, collective on every rank, on a GPU only)."""

    def __init__(self, run_dir: Path, sinks, log, flops_per_token: int, devices: int, writer: bool, device=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.sinks, self.log = sinks, log
        self.flops_per_token, self.devices, self.writer = flops_per_token, devices, writer
        self.memory = MemoryPeaks(device if device is not None else torch.device("cpu"))
        self._events = []  # the event lines earlier_metrics kept

    @classmethod
    def for_config(cls, config, sinks, log, devices: int, writer: bool, device=None) -> RunLog:
        flops = training_flops_per_token(config.model, config.parallel.tensor_parallel_size)
        return cls(Path(config.train.run_dir), sinks, log, flops, devices, writer, device)

    def tflops_per_device(self, tokens_per_s: float) -> float:
        """Model TFLOP/s per device at ``tokens_per_s`` over the whole world (matmuls, forward +
        backward, recompute not counted: MFU's numerator)."""
        return tokens_per_s * self.flops_per_token / self.devices / 1e12

    def earlier_metrics(self, step: int) -> list[dict]:
        """The logged steps up to ``step``, the checkpoint resumed from (none at a fresh start). Lines
        of later steps (a run that went on past that checkpoint, or an earlier run in this run_dir
        without a checkpoint: killed before its first one, or train.save=false) leave metrics.jsonl for
        metrics.dropped.jsonl (appended), so they are neither mixed into this run nor lost."""
        if not self.writer or not self.path.exists():
            return []
        lines = [(line, json.loads(line)) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [(line, m) for line, m in lines if m.get("step", 0) <= step]
        if len(kept) != len(lines):
            dropped = [line for line, m in lines if m.get("step", 0) > step]
            with open(self.path.with_name("metrics.dropped.jsonl"), "a") as f:
                f.write("".join(line + "\n" for line in dropped))
            atomic_write_text(self.path, "".join(line + "\n" for line, _ in kept))
        self._events = [m for _, m in kept if "event" in m]
        return [m for _, m in kept if "event" not in m]

    def event(self, record: dict, message: str) -> None:
        """A line of metrics.jsonl that is not a step's metrics (``record`` has ``step`` and ``event``:
        what happened), and ``message`` on the console; not again when metrics.jsonl has it already
        (the same resume started again)."""
        if not self.writer or record in self._events:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.log(message)

    def valid_set_changed(self, step: int, change: tuple[dict, dict] | None) -> None:
        """The validation set is another from ``step`` on (``change``: resume_check's (old, new) for a
        resume with other data.valid_paths or data.valid_weights; None: the same set): the val losses
        and kurtosis measured after it are of the new one."""
        if change is None:
            return
        old, new = change

        def name(v):
            paths = v["valid_paths"] or "data.split's validation share of data.paths"
            return f"{paths}" + (f" (weights {v['valid_weights']})" if v["valid_weights"] else "")

        self.event({"step": step, "event": "valid_set_changed", "from": old, "to": new},
                   f"validation set changed at step {step}: from {name(old)} to {name(new)}; the val losses and "
                   "kurtosis after this step are of the new set")

    def metrics(self, stats: dict, bar=None) -> None:
        """One ``log_interval`` line: metrics.jsonl, the sinks' ``train/*`` scalars, the console."""
        if not self.writer:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(stats) + "\n")
        for key in TRAIN_SCALARS + tuple(k for k in MEMORY_FIELDS if k in stats):
            self.sinks.scalar(f"train/{key}", stats[key], stats["step"])
        line = (
            f"step {stats['step']:>6} | loss {stats['loss']:.4f} | lr {stats['lr']:.3e} | "
            f"grad norm {stats['grad_norm']:.3f} | {stats['tokens_per_s']:,.0f} tokens/s | "
            f"{stats['tflops_per_device']:.3g} TFLOP/s per device"
        )
        if all(k in stats for k in MEMORY_FIELDS):
            allocated, reserved = (stats[k] for k in MEMORY_FIELDS)
            line += f" | peak memory {allocated:.2f} GiB allocated, {reserved:.2f} GiB reserved"
        (bar.write if bar is not None else self.log)(line)

    def validation(self, val_loss: float, step: int, bar=None) -> None:
        """A ``train.eval_interval`` validation loss: the sinks' ``val/loss`` and a console line (the
        final one is in summary.json and the run's closing line)."""
        self.sinks.scalar("val/loss", val_loss, step)
        self._say(f"step {step:>6} | val loss {val_loss:.4f}", bar)

    def kurtosis(self, report, step: int, bar=None, echo: bool = True) -> None:
        """Mean and max, and each hidden state's kurtosis and max |x|: an outlier shows up as one
        layer's curve leaving the others, which the mean alone can hide. ``echo``: also a console
        line with the mean, the max and where the max is (the run's end prints its own table)."""
        if echo:
            worst = max(range(len(report.values)), key=lambda i: report.values[i]) if report.values else None
            where = f" ({report.names[worst]})" if worst is not None else ""
            peak = f" | max |act| {max(report.max_abs):.3g}" if report.max_abs else ""
            self._say(f"step {step:>6} | kurtosis mean {report.mean:.4f} max {report.max:.4f}{where}{peak}", bar)
        self.sinks.scalar("kurtosis/mean", report.mean, step)
        self.sinks.scalar("kurtosis/max", report.max, step)
        for name, value, peak in zip(report.names, report.values, report.max_abs):
            self.sinks.scalar(f"kurtosis_layer/{name}", value, step)
            self.sinks.scalar(f"max_abs_layer/{name}", peak, step)


    def _say(self, line: str, bar=None) -> None:
        if self.writer:
            (bar.write if bar is not None else self.log)(line)


def mean_tail(history: list[dict], n: int = 3) -> float:
    """Mean loss of the last ``n`` logged steps that have one (NaN: none)."""
    tail = [h["loss"] for h in history[-n:] if not math.isnan(h["loss"])]
    return sum(tail) / len(tail) if tail else float("nan")


def progress_bar(total: int, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)
