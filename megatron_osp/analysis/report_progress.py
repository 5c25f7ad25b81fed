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
    """``models``: the paths as given on the command line; ``units``: each model's units, in order."""

    def __init__(self, models: list[str], units: list[str]):
        self.models = [str(m) for m in models]
        self.units = list(units)
        self.done: dict[str, list[str]] = {m: [] for m in self.models}

    def mark(self, model: str, unit: str) -> None:
        if unit not in self.done[str(model)]:
            self.done[str(model)].append(unit)

    @property
    def complete(self) -> bool:
        return all(len(self.done[m]) == len(self.units) for m in self.models)

    def status(self) -> dict:
        return {
            "complete": self.complete,
            "progress": [{"model": m, "done": list(self.done[m]),
                          "pending": [u for u in self.units if u not in self.done[m]]} for m in self.models],
        }

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
