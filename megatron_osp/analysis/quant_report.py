"""The quantization report: per model, kurtosis and perplexity at full precision and each setting.

``evaluate_model`` measures one loaded model (activation statistics on the first held-out windows,
then perplexity under every setting); ``format_table`` / ``format_markdown`` lay several models out
side by side with the degradation ``ppl(setting) - ppl(fp)``; ``write_report`` saves JSON + Markdown
atomically and draws the two PNG figures. A report written before the run ends (``progress``: after each
setting and weight-rounding table, report_progress.py) says so in both files and lists what is missing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from megatron_osp.analysis.activation_stats import ActivationStatsRecorder
from megatron_osp.analysis.evaluation import check_settings, check_token_ids, evaluate_settings
from megatron_osp.analysis.gptq import iterate_batches
from megatron_osp.analysis.model_parts import logits, model_parts
from megatron_osp.analysis.quantization import QuantSetting, parse_setting
from megatron_osp.analysis.report_progress import markdown_line
from megatron_osp.analysis.weight_error import weight_error_report
from megatron_osp.fileio import atomic_write_json, atomic_write_text

__all__ = ["DEFAULT_SETTINGS", "WEIGHT_ROUNDING", "with_fp", "evaluate_model", "format_table", "format_markdown",
           "write_report"]

# The paper's table: full precision, the four W-A-KV settings, then the fixes at 4-4-4.
DEFAULT_SETTINGS = ["fp", "8-8-8", "4-16-16", "4-8-8", "4-4-4", "4-4-4+had", "4-4-4+gptq", "4-4-4+quarot"]
# The name of the per-role weight-rounding table as a unit of work (after the settings).
WEIGHT_ROUNDING = "weight rounding"


def with_fp(settings: list[QuantSetting | str]) -> list[QuantSetting]:
    """The settings evaluate_model runs, in order: full precision first unless it is among them."""
    settings = [parse_setting(s) if isinstance(s, str) else s for s in settings]
    return settings if any(s.name == "fp" for s in settings) else [QuantSetting()] + settings


def evaluate_model(
    model,
    label: str,
    windows: Tensor,
    settings: list[QuantSetting | str],
    batch_size: int = 8,
    stats_windows: int = 8,
    calibration: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
    weight_error_bits: int = 4,
    weight_error_windows: int = 8,
    on_unit: Callable[[str, dict], None] | None = None,
    earlier: dict | None = None,
) -> dict:
    """One model's results: ``{"label", "kurtosis": {...}, "activation_stats": {...}, "perplexity": {...},
    "weight_error": {...}}``; the last (weight_error.py: which roles' rounding costs what, and why) is
    measured at ``weight_error_windows`` windows, and skipped when that is 0. ``on_unit(name, result)``
    is called after each setting (its name) and the weight-rounding table (``WEIGHT_ROUNDING``) with the
    result so far (the same dict, filled in). ``earlier``: this model's result from an earlier run of the
    same request (``--resume``), filled in place: the settings it has and its weight-rounding table are
    kept, not measured again, and nor are the activation statistics."""
    parts = model_parts(model)
    settings = with_fp(settings)
    check_settings(parts, settings, label)
    check_token_ids(parts, windows, f"{label}: the held-out windows")
    if any(s.gptq for s in settings):
        check_token_ids(parts, calibration, f"{label}: the GPTQ calibration windows")
    device = next(parts.model.parameters()).device
    t0 = time.perf_counter()
    if earlier is not None:
        result = earlier
        seconds0 = result.get("seconds") or 0.0
        settings = [s for s in settings if s.name not in result["perplexity"]]
    else:
        result, seconds0 = _measure_stats(parts, label, windows, stats_windows, batch_size, device), 0.0

    def finished(unit: str) -> None:
        result["seconds"] = seconds0 + time.perf_counter() - t0
        if on_unit is not None:
            on_unit(unit, result)

    def done(setting, res):
        log(f"  {label}: {setting.name:<16} ppl {res.perplexity:.4g}")
        result["perplexity"][setting.name] = res.perplexity
        result["nll"][setting.name] = res.nll
        if result["eval_tokens"] is None:
            result["eval_tokens"] = res.tokens
        finished(setting.name)

    evaluate_settings(
        parts, windows, settings, batch_size=batch_size, calibration=calibration, on_done=done, progress=progress
    )
    if weight_error_windows > 0 and result.get("weight_error") is None:
        weight_error = weight_error_report(parts, windows, weight_error_bits, batch_size=batch_size,
                                           input_windows=weight_error_windows, progress=progress)
        log(f"  {label}: weight rounding at {weight_error_bits} bits, one role at a time: "
            + ", ".join(f"{role} ppl {r['ppl']:.4g}" for role, r in weight_error["roles"].items()))
        result["weight_error"] = weight_error
        finished(WEIGHT_ROUNDING)
    result["seconds"] = seconds0 + time.perf_counter() - t0
    return result


def _measure_stats(parts, label: str, windows: Tensor, stats_windows: int, batch_size: int, device) -> dict:
    """A model's result before any setting: its activation statistics on ``stats_windows`` windows."""
    with torch.no_grad(), ActivationStatsRecorder(parts) as rec:
        for batch in iterate_batches(windows[:stats_windows], batch_size):
            logits(parts, batch[:, :-1].to(device))
    stats = rec.stats()
    residual = stats.of_kind("residual")
    kurt = {
        "names": [p.name for p in residual],
        "values": [p.kurtosis for p in residual],
        "max_abs": [p.max_abs for p in residual],
        "mean": sum(p.kurtosis for p in residual) / len(residual),
        "max": max(p.kurtosis for p in residual),
    }
    linear = stats.of_kind("linear_input")
    kurt["gaussian_floor"] = gaussian_floor(parts.hidden_size)
    result = {
        "label": label,
        "kurtosis": kurt,
        "weight_error": None,
        "linear_input_kurtosis_max": max(p.kurtosis for p in linear),
        "linear_input_max_abs": max(p.max_abs for p in linear),
        "activation_stats": stats.to_dict(),
        "perplexity": {},
        "nll": {},
        "eval_tokens": None,
        "seconds": 0.0,
    }
    return result


def gaussian_floor(hidden_size: int, tokens: int = 16384, seed: int = 0) -> float:
    """The metric's value on i.i.d. N(0, 1) token vectors of this width (relu keeps it above 0):
    a model at this level has no outlier channel at all (e.g. 0.139 at d=128, 0.041 at d=2048)."""
    from megatron_osp.analysis.kurtosis import excess_kurtosis

    gen = torch.Generator().manual_seed(seed)
    return excess_kurtosis(torch.randn(tokens, hidden_size, generator=gen))


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "inf" if v > 0 else "nan"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _delta(ppl: dict, s: str) -> str:
    if s not in ppl or "fp" not in ppl:  # not evaluated (yet): a partial report
        return "–"
    d = ppl[s] - ppl["fp"]
    return ("+" if d >= 0 else "") + _fmt(d)


def _rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    settings = list(dict.fromkeys(s for r in results for s in r["perplexity"]))
    header = ["model", "kurt. mean", "kurt. max", "max |act|"] + [f"ppl {s}" for s in settings]
    header += [f"Δ {s}" for s in settings if s != "fp"]
    rows = []
    for r in results:
        ppl = r["perplexity"]
        row = [r["label"], f"{r['kurtosis']['mean']:.4f}", f"{r['kurtosis']['max']:.4f}", _fmt(max(r["kurtosis"]["max_abs"]))]
        row += [_fmt(ppl[s]) if s in ppl else "–" for s in settings]
        row += [_delta(ppl, s) for s in settings if s != "fp"]
        rows.append(row)
    return header, rows


def format_table(results: list[dict]) -> str:
    """Plain-text table: kurtosis, perplexity per setting, degradation (Δ = ppl - ppl at fp)."""
    header, rows = _rows(results)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in rows])


def format_markdown(results: list[dict], meta: dict | None = None, progress: dict | None = None) -> str:
    """``progress``: ReportProgress.status() of the run (None: complete)."""
    header, rows = _rows(results)
    out = ["# Quantization evaluation", "", markdown_line(progress), ""]
    if meta:
        out += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    cell = lambda c: c.replace("|", "\\|")  # noqa: E731  (a bare | would split the Markdown cell)
    out += ["| " + " | ".join(cell(c) for c in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    names = results[0]["kurtosis"]["names"]
    if all(r["kurtosis"]["names"] == names for r in results):
        out += ["", "## Residual-stream excess kurtosis per hidden state", ""]
        floor = results[0]["kurtosis"].get("gaussian_floor")
        if floor is not None:
            out += [f"Gaussian floor of the metric at this width (i.i.d. N(0, 1) tokens): {floor:.4f}", ""]
        out += ["| hidden state | " + " | ".join(r["label"] for r in results) + " |", "|" + "---|" * (len(results) + 1)]
        for i, n in enumerate(names):
            out.append(f"| {n} | " + " | ".join(f"{r['kurtosis']['values'][i]:.4f}" for r in results) + " |")
    out += ["", "## Where the outliers are (inputs of the decoder's linear layers)", ""]
    out += ["| model | point | kurtosis | max \\|x\\| | max / median channel | top channels (channel: max \\|x\\|) |",
            "|---|---|---|---|---|---|"]
    for r in results:
        points = [p for p in r["activation_stats"]["points"] if p["kind"] == "linear_input"]
        for p in sorted(points, key=lambda p: -p["kurtosis"])[:3]:
            ratio = p["max_abs"] / p["median_channel_max"] if p["median_channel_max"] > 0 else float("inf")
            top = ", ".join(f"{c}: {v:.3g}" for c, v in p["top_channels"][:4])
            out.append(f"| {r['label']} | {p['name']} | {p['kurtosis']:.3f} | {p['max_abs']:.3g} | {ratio:.1f} | {top} |")
    out += _weight_error_markdown(results)
    return "\n".join(out) + "\n"


def _weight_error_markdown(results: list[dict]) -> list[str]:
    measured = [r for r in results if r.get("weight_error")]
    if not measured:
        return []
    bits = measured[0]["weight_error"]["bits"]
    out = ["", f"## Where {bits}-bit weight rounding costs (weights only, RTN per output channel)", "",
           "Δ ppl: only that role's weights rounded. Errors are relative Frobenius norms, the output error on "
           "the layer's held-out inputs; output error ≈ weight error / input gain, and a low input gain "
           "(inputs using little of the weight's energy, typical of a flat singular spectrum = a high "
           "stable rank) is what makes the same rounding cost more (analysis/weight_error.py).", "",
           "| model | role | Δ ppl | weight error | output error | input gain | stable rank |",
           "|---|---|---|---|---|---|---|"]
    for r in measured:
        fp = r["perplexity"]["fp"]
        for role, v in r["weight_error"]["roles"].items():
            out.append(f"| {r['label']} | {role} | {v['ppl'] - fp:+.4g} | {v['weight_error']:.4f} | "
                       f"{v['output_error']:.4f} | {v['input_gain']:.3f} | {v['stable_rank']:.1f} |")
    return out


def write_report(results: list[dict], output_dir: str | Path, meta: dict | None = None, plots: bool = True,
                 progress: dict | None = None) -> list[Path]:
    """``quantization.json``, ``quantization.md`` and (with ``plots``, and matplotlib installed) the
    two PNGs; returns the paths. ``progress`` (ReportProgress.status()) marks a report of a run that
    has not finished: ``"complete": false`` in the JSON, a line in the Markdown; None: complete."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "quantization.json", out / "quantization.md"]
    status = progress or {"complete": True}
    if not status["complete"]:  # plots are drawn at the end: an earlier run's would sit beside this report
        for png in ("kurtosis_per_layer.png", "perplexity_vs_bits.png"):
            (out / png).unlink(missing_ok=True)
    atomic_write_json(paths[0], {**status, "meta": meta or {}, "models": results})
    atomic_write_text(paths[1], format_markdown(results, meta, progress))
    if plots:
        from megatron_osp.analysis.plots import plot_kurtosis_per_layer, plot_perplexity_vs_bits, plots_available

        if not plots_available():
            print(f"no plots in {out}: matplotlib is not installed (pip install -e \".[plots]\")", flush=True)
            return paths

        plot_kurtosis_per_layer({r["label"]: r["kurtosis"] for r in results}, out / "kurtosis_per_layer.png")
        plot_perplexity_vs_bits({r["label"]: r["perplexity"] for r in results}, out / "perplexity_vs_bits.png")
        paths += [out / "kurtosis_per_layer.png", out / "perplexity_vs_bits.png"]
    return paths
