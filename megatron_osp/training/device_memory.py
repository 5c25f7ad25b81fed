"""Peak GPU memory in the run log: each metrics.jsonl line (and console line) carries the highest
memory any rank's CUDA caching allocator had allocated and reserved since the previous line, in GiB;
summary.json carries the run's.

The first line's window starts when the process did (model build, checkpoint load); the summary's
covers this process (a resumed run: since it resumed), the end-of-run evaluation included. The
CUDA calls are all in ``cuda_peaks``; off CUDA it returns None and the fields are absent (not 0).
Each reading is one all-reduce (max) of two numbers over the world, at log steps only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["FIELDS", "MemoryPeaks", "cuda_peaks"]

FIELDS = ("max_mem_allocated_gib", "max_mem_reserved_gib")
_GIB = float(2**30)


def cuda_peaks(device) -> tuple[float, float] | None:
    """This rank's peak allocated and reserved GiB since the last call (the peaks are reset), or None
    when ``device`` is not a GPU."""
    if device.type != "cuda":
        return None
    peaks = (torch.cuda.max_memory_allocated(device) / _GIB, torch.cuda.max_memory_reserved(device) / _GIB)
    torch.cuda.reset_peak_memory_stats(device)
    return peaks


class MemoryPeaks:
    """``window()`` at each log step and ``run_peak()`` at the end, on every rank (collective on a GPU)."""

    def __init__(self, device):
        self.device = device
        self._run: list[float] | None = None

    def window(self) -> dict:
        """{field: GiB} since the previous call, the highest of any rank; {} off CUDA."""
        peaks = cuda_peaks(self.device)
        if peaks is None:
            return {}
        values = torch.tensor(peaks, dtype=torch.float64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        values = values.tolist()
        self._run = values if self._run is None else [max(a, b) for a, b in zip(self._run, values)]
        return dict(zip(FIELDS, values))

    def run_peak(self) -> dict:
        """{field: GiB} over the whole process, the time since the last log line included; {} off CUDA."""
        self.window()
        return dict(zip(FIELDS, self._run)) if self._run is not None else {}
