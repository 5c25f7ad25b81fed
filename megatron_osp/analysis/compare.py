"""Side-by-side comparison of finished runs (their summary.json and kurtosis.json).

This is the table the quickstart ends with: an Adam+RMSNorm baseline next to an OSP model trained
on the same tokens, with loss and the paper's excess kurtosis (mean and max over hidden states),
and, given the quantization evaluation's JSON (tools/evaluate_quantization.py), held-out perplexity
at full precision and at W4A4KV4 (4-4-4) with the degradation, and the part of it that 4-bit
weights alone cause (4-16-16); given the downstream evaluation's JSON (tools/evaluate_downstream.py),
the average benchmark score at fp and at 4-4-4 and its drop (the paper's 4-bit table).
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
    summary = _read_fields(summary_path, {"optimizer": str, "normalization": str, "embedding_projection": bool,
                                          "tokens": int, "train_loss": float, "val_loss": float,
                                          "kurtosis_mean": float, "kurtosis_max": float})
    summary["kurtosis"] = _read_fields(kurtosis_path, {"names": list, "values": list, "max_abs": list})
    summary["loaded_from"] = str(run_dir.resolve())
    summary["given_as"] = str(run_dir)
    summary["checkpoint"], summary["tokenizer_record"] = _latest_checkpoint(run_dir)
    return summary


def _read_fields(path: Path, fields: dict[str, type]) -> dict:
    """The JSON object of a run's file, with ``fields`` of their types; ValueError naming the file and the
    field otherwise (a damaged file, one of another tool or version) instead of a traceback in the table."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}): is it the file a finished run wrote?") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the object a finished run writes")
    for field, kind in fields.items():
        value = data.get(field)
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or (kind is not bool and isinstance(value, bool)):
            expected = "a number" if kind is float else "true/false" if kind is bool else kind.__name__
            raise ValueError(f"{path}: field {field!r} is {'missing' if field not in data else repr(value)}, "
                             f"expected {expected}: is it the file a finished run wrote?")
    return data


def _latest_checkpoint(run_dir: Path) -> tuple[str | None, dict | None]:
    """The name of the iteration directory the run's ``checkpoints/latest`` names, and the tokenizer whose
    ids the model learned: the record that checkpoint carries (else what its saved run config names,
    where the files are still here); None for what is unknown (no checkpoint kept in ``checkpoints/``, an
    unreadable one)."""
    if not (run_dir / "checkpoints").is_dir():
        return None, None  # without importing Megatron-Core: a table of runs without checkpoints stays instant
    from megatron_osp.training.checkpoint import (CheckpointError, find_iteration_dir, read_run_config,
                                                  read_train_state)
    from megatron_osp.training.tokenizer_record import checkpoint_record

    try:
        ckpt = find_iteration_dir(run_dir / "checkpoints")
    except (CheckpointError, OSError):
        return None, None
    try:
        return ckpt.name, checkpoint_record(read_train_state(ckpt, resolved=True), read_run_config(ckpt, resolved=True))
    except (CheckpointError, OSError, ValueError):
        return ckpt.name, None


def check_distinct(runs: list[dict]) -> None:
    """ValueError when one run directory is given twice (as the same path or another path to it): the
    table would show it as two runs of identical results."""
    seen: dict[str, str] = {}
    for r in runs:
        if r["loaded_from"] in seen:
            raise ValueError(f"the run {r['loaded_from']} is given twice (as {seen[r['loaded_from']]} and "
                             f"{r['given_as']}): give each run once")
        seen[r["loaded_from"]] = r["given_as"]


def tokenizer_note(runs: list[dict]) -> str | None:
    """A line saying which runs learned the ids of different tokenizers: their losses (and perplexities)
    are per token of different vocabularies and cannot be read side by side; None where no two runs are
    known to differ."""
    from megatron_osp.training.tokenizer_record import describe, same

    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if same(a.get("tokenizer_record"), b.get("tokenizer_record")) is False:
                return (f"note: {a['given_as']} and {b['given_as']} were trained on different tokenizers "
                        f"({describe(a['tokenizer_record'])} and {describe(b['tokenizer_record'])}): their losses "
                        "and perplexities are per token of different vocabularies and are not comparable")
    return None


def run_label(run: dict) -> str:
    if run["optimizer"] == "adam" and run["normalization"] == "rmsnorm" and not run["embedding_projection"]:
        return "Adam + RMSNorm"
    parts = [{"muon": "Muon", "muon_only": "Muon-only"}.get(run["optimizer"], "Adam")]
    if run["normalization"] == "ssnorm":
        parts.append("SSNorm")
    if run["embedding_projection"]:
        parts.append("EmbProj")
    label = " + ".join(parts)
    return "OSP (" + label + ")" if len(parts) == 3 and parts[0] == "Muon" else label


def run_labels(runs: list[dict]) -> list[str]:
    """``run_label`` of each run; a label that several runs share (runs of one recipe: another seed, size
    or data) gets each run's directory as given after it, as evaluate_quantization.py's labels do, so
    that the rows and per-layer columns say which run is which."""
    labels = [run_label(r) for r in runs]
    return [f"{label} ({r.get('given_as') or r.get('run_dir', '?')})" if labels.count(label) > 1 else label
            for label, r in zip(labels, runs)]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in rows])


def load_quantization(path: str | Path) -> dict[str, dict]:
    """The quantization evaluation JSON's per-model results, keyed by each model's resolved path."""
    return {str(Path(m["path"]).resolve()): m for m in _report_models(path, "evaluate_quantization", "perplexity")}


def load_downstream(path: str | Path) -> dict[str, dict]:
    """The downstream evaluation JSON's per-model results, keyed by each model's resolved path."""
    return {str(Path(m["path"]).resolve()): m for m in _report_models(path, "evaluate_downstream", "settings")}


def _report_models(path: str | Path, tool: str, key: str) -> list[dict]:
    """The report's model entries, each with its ``key`` (what ``tool`` measures); ValueError for another
    JSON, e.g. the other evaluation tool's report given to the other flag."""
    data = _read_report(path, tool)
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) and "path" in m and key in m for m in models):
        raise ValueError(f"{path} is not a report of tools/{tool}.py (its models have no {key!r}): --quantization "
                         "takes evaluate_quantization.py's quantization.json, --downstream evaluate_downstream.py's "
                         "downstream.json")
    return models


def _read_report(path: str | Path, tool: str) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run tools/{tool}.py first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable report of tools/{tool}.py ({e})") from None


def partial_note(path: str | Path) -> str | None:
    """A line saying the report is of an evaluation that has not finished (both evaluation tools write
    one after every unit), with what it lacks; None for a complete report."""
    from megatron_osp.analysis.report_progress import markdown_line

    data = _read_report(path, "evaluate_quantization")
    if data.get("complete", True):
        return None
    return f"note: {path} is a partial report, '-' marks what it lacks. " + markdown_line(data).replace("**", "")


def report_notes(path: str | Path, runs: list[dict], setting: str) -> list[str]:
    """Lines saying where the report's columns of the table are not of the runs' rows: a run the report
    did not evaluate ('-' in its row), a run it evaluated at another checkpoint than the one the run's
    ``latest`` names now (e.g. an evaluation started while training went on: its perplexities are of an
    earlier model than the row's losses), and a --setting no model of a finished report was evaluated at."""
    data = _read_report(path, "evaluate_quantization")
    models = data.get("models") or []
    results = {str(Path(m["path"]).resolve()): m for m in models}
    pinned = {str(Path(m["path"]).resolve()): (m.get("identity") or {}).get("iteration")
              for m in (data.get("request") or {}).get("models") or [] if isinstance(m, dict) and m.get("path")}
    notes = []
    for r in runs:
        if r["loaded_from"] not in results and r["loaded_from"] not in pinned:  # (pinned: pending, partial_note)
            notes.append(f"note: {path} has no results of {r['given_as']} ('-' in its row): it evaluated "
                         f"{', '.join(str(m['path']) for m in models) or 'no model'}")
        elif (then := pinned.get(r["loaded_from"])) and r.get("checkpoint") and then != r["checkpoint"]:
            notes.append(f"note: {path} evaluated {r['given_as']} at {then}, its latest checkpoint is now "
                         f"{r['checkpoint']}: the report's columns are of another model than the row's losses")
    measured = {s for m in models for s in (m.get("perplexity") or m.get("settings") or {})}
    if models and data.get("complete", True) and setting not in measured:
        notes.append(f"note: {path} has no {setting} results ('-' in its columns): it evaluated "
                     f"{', '.join(sorted(measured)) or 'nothing'}; --setting chooses one of them")
    return notes


def _weights_only(setting: str) -> str | None:
    """"4-4-4" -> "4-16-16": the same weights with activations and KV cache left in full precision,
    which splits a degradation into its weight and activation parts (None if there is nothing to split)."""
    from megatron_osp.analysis.quantization import parse_setting

    try:
        s = parse_setting(setting)
    except ValueError:
        return None
    if s.a_bits >= 16 and s.kv_bits >= 16 or s.w_bits >= 16 or s.rotate or s.ffn_hadamard or s.gptq:
        return None
    return f"{s.w_bits}-16-16" + (f"-g{s.w_group_size}" if s.w_group_size else "")


def _quant_cells(run: dict, quant: dict[str, dict] | None, settings: list[str]) -> list[str]:
    model = _model_of(run, quant)
    if model is None:
        return ["-"] * (len(settings) + 2)
    ppl = model["perplexity"]
    fp, q = ppl.get("fp"), ppl.get(settings[0])  # a partial report may lack either
    cells = ["-" if fp is None else f"{fp:.2f}", "-" if q is None else f"{q:.4g}",
             "-" if fp is None or q is None else f"{q - fp:+.4g}"]
    return cells + [f"{ppl[s] - fp:+.4g}" if s in ppl and fp is not None else "-" for s in settings[1:]]


def _model_of(run: dict, report: dict[str, dict] | None) -> dict | None:
    return (report or {}).get(run.get("loaded_from") or str(Path(run.get("run_dir", "")).resolve()))


def _downstream_cells(run: dict, down: dict[str, dict], setting: str) -> list[str]:
    """Average downstream score (percent) at fp and at ``setting``, and the drop; '-' for what the
    report lacks (another model, a setting not evaluated, a partial report)."""
    model = _model_of(run, down)
    settings = (model or {}).get("settings", {})
    avg = {name: s.get("average") for name, s in settings.items() if not s.get("partial")}
    fp, q = avg.get("fp"), avg.get(setting)
    return ["-" if fp is None else f"{100 * fp:.1f}", "-" if q is None else f"{100 * q:.1f}",
            "-" if fp is None or q is None else f"{100 * (fp - q):+.1f}"]


def format_comparison(runs: list[dict], quant: dict[str, dict] | None = None, setting: str = "4-4-4",
                      downstream: dict[str, dict] | None = None) -> str:
    """Loss and kurtosis per run; with ``quant``, perplexity at fp and ``setting`` with the degradation,
    and the weights-only degradation beside it when the evaluation measured it; with ``downstream``,
    the average benchmark score at fp and at ``setting`` and its drop."""
    labels = run_labels(runs)
    settings = [setting]
    weights_only = _weights_only(setting)
    if quant and weights_only and any(weights_only in m["perplexity"] for m in quant.values()):
        settings.append(weights_only)
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
        + (_quant_cells(r, quant, settings) if quant is not None else [])
        + (_downstream_cells(r, downstream, setting) if downstream is not None else [])
        for label, r in zip(labels, runs)
    ]
    header = ["run", "tokens", "train loss", "val loss", "kurtosis mean", "kurtosis max", "max |act|"]
    if quant is not None:
        header += ["ppl fp", f"ppl {setting}", f"{setting} degradation"] + [f"{s} degradation" for s in settings[1:]]
    if downstream is not None:
        header += ["avg fp", f"avg {setting}", "avg drop"]
    out = [_table(header, summary_rows)]
    names = runs[0]["kurtosis"]["names"]
    if all(r["kurtosis"]["names"] == names for r in runs):
        per_layer = [[n] + [f"{r['kurtosis']['values'][i]:.4f}" for r in runs] for i, n in enumerate(names)]
        out += ["", "excess kurtosis per hidden state (held-out batch):", _table(["hidden state"] + labels, per_layer)]
    return "\n".join(out)
