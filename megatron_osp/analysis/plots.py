"""PNG figures of an evaluation: kurtosis per layer per model, perplexity per quantization setting,
downstream averages per setting.

Matplotlib with the Agg backend (no display needed); each figure is written to a temporary name and
renamed, like every other output of the project.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["plot_kurtosis_per_layer", "plot_perplexity_vs_bits", "plot_downstream_average", "plots_available"]


def plots_available() -> bool:
    """Matplotlib is an optional extra (``pip install -e ".[plots]"``); reports go on without it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _save(fig, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kurtosis_per_layer(models: dict[str, dict], path: str | os.PathLike) -> None:
    """``models``: label -> {"names": [...], "values": [...]} (residual-stream kurtosis per hidden state)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rep in models.items():
        ax.plot(range(len(rep["values"])), rep["values"], marker="o", label=label)
    floors = {rep["gaussian_floor"] for rep in models.values() if rep.get("gaussian_floor") is not None}
    for floor in sorted(floors):
        ax.axhline(floor, color="grey", linestyle="--", linewidth=1)
    if floors:
        ax.plot([], [], color="grey", linestyle="--", label="i.i.d. Gaussian tokens")
    first = next(iter(models.values()))
    ax.set_xticks(range(len(first["names"])))
    ax.set_xticklabels(first["names"], rotation=45, ha="right", fontsize=8)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylabel("excess kurtosis (mean over tokens)")
    ax.set_title("Residual-stream excess kurtosis per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_perplexity_vs_bits(models: dict[str, dict[str, float]], path: str | os.PathLike) -> None:
    """``models``: label -> {setting name: perplexity}, settings in evaluation order (log scale)."""
    plt = _pyplot()
    settings = list(next(iter(models.values())).keys())
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(settings)), 4))
    for label, ppl in models.items():
        ys = [min(ppl.get(s, float("nan")), 1e7) for s in settings]  # inf (overflow) drawn at the top
        ax.plot(range(len(settings)), ys, marker="o", label=label)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_xlabel("weight-activation-KV bits")
    ax.set_title("Perplexity under fake quantization")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_downstream_average(results: list[dict], path: str | os.PathLike) -> None:
    """Bars of each model's downstream average (%) per quantization setting (analysis/downstream.py)."""
    plt = _pyplot()
    settings = list(dict.fromkeys(s for r in results for s in r["settings"]))
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(settings) + 2), 3.6))
    for i, r in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(settings))]
        ys = [100 * (r["settings"].get(s, {}).get("average") or 0.0) for s in settings]
        ax.bar(xs, ys, width, label=r["label"])
    ax.set_xticks(range(len(settings)), settings)
    ax.set_ylabel("average score (%)")
    ax.set_title("Downstream average by quantization setting")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
