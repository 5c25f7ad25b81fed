"""Side-by-side comparison of finished runs (their summary.json and kurtosis.json).

This is the table the quickstart ends with: an Adam+RMSNorm baseline next to an OSP model trained
on the same tokens, with loss and the paper's excess kurtosis (mean and max over hidden states).
"""

from __future__ import annotations

import json
from pathlib import Path


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    kurtosis_path = run_dir / "kurtosis.json"
    for path in (summary_path, kurtosis_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: is {run_dir} a finished run directory?")
    summary = json.loads(summary_path.read_text())
    summary["kurtosis"] = json.loads(kurtosis_path.read_text())
    return summary


def run_label(run: dict) -> str:
    if run["optimizer"] == "adam" and run["normalization"] == "rmsnorm" and not run["embedding_projection"]:
        return "Adam + RMSNorm"
    parts = ["Muon" if run["optimizer"] == "muon" else "Adam"]
    if run["normalization"] == "ssnorm":
        parts.append("SSNorm")
    if run["embedding_projection"]:
        parts.append("EmbProj")
    label = " + ".join(parts)
    return "OSP (" + label + ")" if len(parts) == 3 and parts[0] == "Muon" else label


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in rows])


def format_comparison(runs: list[dict]) -> str:
    labels = [run_label(r) for r in runs]
    summary_rows = [
        [
            label,
            f"{r['tokens']:,}",
            f"{r['train_loss']:.4f}",
            f"{r['val_loss']:.4f}",
            f"{r['kurtosis_mean']:.4f}",
            f"{r['kurtosis_max']:.4f}",
            f"{max(r['kurtosis']['max_abs']):.3g}",
        ]
        for label, r in zip(labels, runs)
    ]
    out = [
        _table(
            ["run", "tokens", "train loss", "val loss", "kurtosis mean", "kurtosis max", "max |act|"],
            summary_rows,
        )
    ]
    names = runs[0]["kurtosis"]["names"]
    if all(r["kurtosis"]["names"] == names for r in runs):
        per_layer = [[n] + [f"{r['kurtosis']['values'][i]:.4f}" for r in runs] for i, n in enumerate(names)]
        out += ["", "excess kurtosis per hidden state (held-out batch):", _table(["hidden state"] + labels, per_layer)]
    return "\n".join(out)
