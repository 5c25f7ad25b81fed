"""What part of an evaluation run a report holds: the (model, unit) pairs done and those still to do.

tools/evaluate_quantization.py and tools/evaluate_downstream.py rewrite their report (atomically)
after every finished unit of work (a setting of a model; for the quantization report also its
weight-rounding table), so a model that fails to load, an out-of-memory error or a job time limit
keeps every earlier result on disk. ``status()`` goes into the JSON (``"complete"`` and, per model,
``"done"`` / ``"pending"``); ``markdown()`` is the line under the Markdown report's title.
"""

from __future__ import annotations

__all__ = ["ReportProgress"]


class ReportProgress:
    """``models``: the paths as given on the command line (by position: a path may come twice);
    ``units``: each model's units, in order; ``request``: what decides the numbers, recorded in the
    report for ``--resume`` (report_resume.py)."""

    def __init__(self, models: list[str], units: list[str], request: dict | None = None):
        self.models = [str(m) for m in models]
        self.units = list(units)
        self.done: list[list[str]] = [[] for _ in self.models]
        self.request = request

    def mark(self, index: int, unit: str) -> None:
        """Model ``index`` (its position in ``models``) has finished ``unit``."""
        if unit not in self.done[index]:
            self.done[index].append(unit)

    def finished(self, index: int) -> bool:
        """Model ``index`` has done every unit."""
        return len(self.done[index]) == len(self.units)

    @property
    def complete(self) -> bool:
        return all(len(done) == len(self.units) for done in self.done)

    def status(self) -> dict:
        from megatron_osp.analysis.report_resume import REQUEST_VERSION

        status = {
            "complete": self.complete,
            "progress": [{"model": m, "done": list(done), "pending": [u for u in self.units if u not in done]}
                         for m, done in zip(self.models, self.done)],
        }
        if self.request is not None:
            status["request"] = {"version": REQUEST_VERSION, **self.request}
        return status

    def markdown(self) -> str:
        return markdown_line(self.status())


def markdown_line(status: dict | None) -> str:
    """One line: complete, or partial with what is done and what is not (``status`` as ``status()`` gives)."""
    if status is None or status["complete"]:
        return "Complete: every model and setting asked for was evaluated."
    done = [f"{p['model']} ({', '.join(p['done'])})" for p in status["progress"] if p["done"]]
    pending = [f"{p['model']} ({', '.join(p['pending'])})" for p in status["progress"] if p["pending"]]
    return ("**Partial report**: the run has not finished (it is running, or it stopped). Done: "
            + ("; ".join(done) or "nothing") + ". Not done: " + "; ".join(pending) + ".")
