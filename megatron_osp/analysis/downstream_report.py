"""The downstream report: per task score ± standard error, the average and the drop from fp, models
side by side (one column per model and setting), as JSON + Markdown (+ a PNG bar chart of the
averages when matplotlib is installed), each written atomically. A report written before the run ends
(``progress``, report_progress.py) says so in both files and lists what is missing."""

from __future__ import annotations

from pathlib import Path

from megatron_osp.analysis.report_progress import markdown_line
from megatron_osp.fileio import atomic_write_json, atomic_write_text

__all__ = ["format_markdown", "write_report", "columns"]


def columns(results: list[dict]) -> list[tuple[dict, str]]:
    return [(r, s) for r in results for s in r["settings"]]


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _cell(t: dict | None) -> str:
    if t is None or t.get("score") is None:
        return "–"
    err = f" ± {100 * t['stderr']:.1f}" if t.get("stderr") is not None else ""
    return _pct(t["score"]) + err


def format_markdown(results: list[dict], meta: dict | None = None, progress: dict | None = None) -> str:
    """``progress``: ReportProgress.status() of the run (None: complete)."""
    cols = columns(results)
    tasks = list(dict.fromkeys(t for r in results for s in r["settings"].values() for t in s["tasks"]))
    head = ["task (metric)"] + [f"{r['label']} {s}" for r, s in cols]
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    row = lambda cells: "| " + " | ".join(esc(c) for c in cells) + " |"  # noqa: E731
    out = ["# Downstream evaluation", "", markdown_line(progress), ""]
    if meta:
        out += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    out += ["Scores in percent ± the harness's standard error; the average is over the tasks' scores "
            "(acc_norm where the harness gives it, else acc, else exact_match).", "",
            "## Scores", "", row(head), "|" + "---|" * len(head)]
    for task in tasks:
        metric = next((s["tasks"][task]["score_metric"] for r in results for s in r["settings"].values()
                       if task in s["tasks"] and s["tasks"][task].get("score_metric")), "?")
        out.append(row([f"{task} ({metric})"] + [_cell(r["settings"][s]["tasks"].get(task)) for r, s in cols]))
    out.append(row(["**average**"] + [_pct(r["settings"][s]["average"]) for r, s in cols]))
    quant = [(r, s) for r, s in cols if s != "fp"]
    if quant and all("fp" in r["settings"] for r in results):
        out += ["", "## Drop from fp (percentage points, fp − setting)", "",
                row(["task"] + [f"{r['label']} {s}" for r, s in quant]), "|" + "---|" * (len(quant) + 1)]
        for task in tasks:
            vals = [r["settings"][s]["tasks"].get(task, {}).get("drop") for r, s in quant]
            out.append(row([task] + ["–" if v is None else f"{100 * v:+.1f}" for v in vals]))
        out.append(row(["**average**"] + ["–" if r["settings"][s].get("average_drop") is None
                                          else f"{100 * r['settings'][s]['average_drop']:+.1f}" for r, s in quant]))
    return "\n".join(out) + "\n"


def write_report(results: list[dict], output_dir, meta: dict | None = None, plots: bool = True,
                 log=print, progress: dict | None = None) -> list[Path]:
    """``downstream.json``, ``downstream.md`` and (with matplotlib) ``downstream_average.png``.
    ``progress`` (ReportProgress.status()) marks a report of a run that has not finished:
    ``"complete": false`` in the JSON, a line in the Markdown; None: complete."""
    from megatron_osp.analysis.plots import plot_downstream_average, plots_available

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "downstream.json", out / "downstream.md"]
    if progress is not None and not progress["complete"]:  # the plot is drawn at the end, not an earlier run's
        (out / "downstream_average.png").unlink(missing_ok=True)
    atomic_write_json(paths[0], {**(progress or {"complete": True}), "meta": meta or {}, "models": results})
    atomic_write_text(paths[1], format_markdown(results, meta, progress))
    if plots:
        if not plots_available():
            log(f"no plot in {out}: matplotlib is not installed (pip install -e \".[plots]\")")
        else:
            plot_downstream_average(results, out / "downstream_average.png")
            paths.append(out / "downstream_average.png")
    return paths
