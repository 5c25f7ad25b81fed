"""``train.profile_steps=START-END``: a ``torch.profiler`` trace of those training steps, one per rank.

The Trainer calls ``step_begins(N)`` as each training step begins. The profiler starts with step
START and stops when step END + 1 begins (or training ends), so step END's log line, and the
evaluation, kurtosis measurement and checkpoint save that follow it when their intervals fall on it,
are in the trace; when END is the last step, so are the end-of-run save, evaluation and kurtosis
measurement. Each rank then writes ``<run_dir>/profile/steps_S-E_rankR.json``, a Chrome trace that
Perfetto (ui.perfetto.dev) and chrome://tracing open. CPU activity is recorded, and CUDA kernels when
the run is on a GPU. Named ranges (``record_function``) mark each step (``step N``, from its start
to the next one's) and its parts: ``forward_backward`` (the pipeline schedule), ``optimizer_step``,
and ``evaluate``, ``kurtosis`` and ``save_checkpoint`` when they run.

A resumed run profiles the steps of the range it runs; a run that stops inside the range (SIGTERM,
a time limit, an error) writes the steps it profiled when ``close()`` is called. Off (``None``),
``range()`` is a shared no-op context and ``step_begins`` returns at once.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["StepProfiler", "parse_step_range", "RANGES"]

RANGES = ("forward_backward", "optimizer_step", "evaluate", "kurtosis", "save_checkpoint")
_OFF = contextlib.nullcontext()


def parse_step_range(text) -> tuple[int, int]:
    """``"START-END"`` (inclusive, 1 <= START <= END) or ``"N"`` (one step) -> (START, END); ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string")
    start, sep, end = text.strip().partition("-")
    try:
        first, last = int(start), int(end) if sep else int(start)
    except ValueError:
        raise ValueError(f"{text!r} is not START-END") from None
    if first < 1 or last < first:
        raise ValueError(f"{text!r}: need 1 <= START <= END")
    return first, last


class StepProfiler:
    """``steps``: ``train.profile_steps`` (None: off); ``device``: CUDA activity is added on a GPU;
    ``log``: where the written trace is announced (rank 0's console)."""

    def __init__(self, steps: str | None, run_dir, rank: int, device, log=print):
        self.first, self.last = parse_step_range(steps) if steps else (None, None)
        self.directory, self.rank, self.device, self.log = Path(run_dir) / "profile", rank, device, log
        self._profiler = None
        self._step = None  # the open "step N" record_function
        self._profiled: list[int] = []

    def range(self, name: str):
        """A named range while recording; a no-op context otherwise."""
        if self._profiler is None:
            return _OFF
        from torch.profiler import record_function

        return record_function(name)

    def step_begins(self, step: int) -> None:
        """Step ``step`` begins: the previous step's range ends; the profile starts or ends here."""
        if self.first is None or step < self.first:
            return
        if self._step is not None:
            self._step.__exit__(None, None, None)
            self._step = None
        if step > self.last:
            self.close()
            return
        if self._profiler is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._profiler = profile(activities=activities)
            self._profiler.start()
        from torch.profiler import record_function

        self._step = record_function(f"step {step}").__enter__()
        self._profiled.append(step)

    def close(self) -> None:
        """Stop recording and write the trace of the steps profiled so far (idempotent)."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        if self._step is not None:  # the last step profiled
            self._step.__exit__(None, None, None)
            self._step = None
        profiler.stop()
        first, last = self._profiled[0], self._profiled[-1]
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"steps_{first}-{last}_rank{self.rank}.json"
        tmp = path.with_name(path.name + ".tmp")
        profiler.export_chrome_trace(str(tmp))
        os.replace(tmp, path)
        self.log(f"profile of steps {first}-{last} written to {self.directory} (one Chrome trace per rank: "
                 "open it in ui.perfetto.dev or chrome://tracing)")
