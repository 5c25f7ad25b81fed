"""Excess kurtosis of hidden states: the outlier metric of Outlier-Safe Pre-Training (Park et al. 2025).

Activation outliers show up as a few hidden channels that are far larger than the rest for every
token, which makes the per-token distribution over the hidden dimension heavy-tailed. For one token
with hidden vector ``x`` of size ``h``::

    mu   = mean(x)
    m2   = mean((x - mu)^2)                    # population variance
    m4   = mean((x - mu)^4)
    kurt = relu(m4 / m2^2 - 3)                 # excess kurtosis, clamped at 0

A Gaussian-like token scores ~0; a token with one huge channel scores ~h. The value of a hidden state
is ``kurt`` averaged over all tokens; the report gives one value per hidden state (the embedding
output, i.e. the first layer's input, then every transformer layer's output), their mean and max.
Moments are accumulated in float64 so bf16/fp32 activations with large outliers stay exact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from megatron_osp.fileio import atomic_write_json

__all__ = [
    "token_excess_kurtosis",
    "excess_kurtosis",
    "HiddenStateRecorder",
    "KurtosisReport",
    "measure_kurtosis",
    "merge_rank_reports",
]


def token_excess_kurtosis(x: Tensor, dim: int = -1) -> Tensor:
    """Excess kurtosis ``m4 / m2^2 - 3`` of ``x`` along ``dim`` (before relu), in float64.

    Matches ``scipy.stats.kurtosis(x, axis=dim, fisher=True, bias=True)``: a constant vector
    (zero variance) gives NaN.
    """
    x = x.detach().to(torch.float64)
    centred = x - x.mean(dim=dim, keepdim=True)
    sq = centred.square()
    m2 = sq.mean(dim=dim)
    m4 = sq.square().mean(dim=dim)
    return m4 / m2.square() - 3.0


def _relu_kurtosis(x: Tensor, dim: int = -1) -> Tensor:
    """Per-token relu'd kurtosis; degenerate (constant) tokens count as 0 rather than poisoning means."""
    return torch.nan_to_num(torch.relu(token_excess_kurtosis(x, dim)), nan=0.0)


def excess_kurtosis(x: Tensor, dim: int = -1) -> float:
    """The paper's metric for one hidden state: relu(per-token excess kurtosis), averaged over tokens."""
    return float(_relu_kurtosis(x, dim).mean())


@dataclass
class KurtosisReport:
    """Per-hidden-state kurtosis (``values``) and max |activation| (``max_abs``), named by state."""

    names: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    max_abs: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")

    @property
    def max(self) -> float:
        return max(self.values) if self.values else float("nan")

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "values": list(self.values),
            "max_abs": list(self.max_abs),
            "mean": self.mean,
            "max": self.max,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "KurtosisReport":
        return cls(
            names=list(data["names"]),
            values=[float(v) for v in data["values"]],
            max_abs=[float(v) for v in data.get("max_abs", [float("nan")] * len(data["names"]))],
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KurtosisReport":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def merge(self, other: "KurtosisReport") -> "KurtosisReport":
        """A new report with ``other``'s states appended after this one's (e.g. the next pipeline stage)."""
        clash = set(self.names) & set(other.names)
        if clash:
            raise ValueError(f"cannot merge reports sharing hidden-state names: {sorted(clash)}")
        return KurtosisReport(
            names=self.names + other.names,
            values=self.values + other.values,
            max_abs=self.max_abs + other.max_abs,
        )

    def format_table(self, title: str | None = None) -> str:
        """Aligned per-state table (name, kurtosis, max |activation|) followed by the mean/max line."""
        width = max([len("hidden state"), *(len(n) for n in self.names)])
        lines = [f"{'hidden state':<{width}}  {'kurtosis':>12}  {'max |x|':>12}"]
        lines.append("-" * len(lines[0]))
        for name, value, peak in zip(self.names, self.values, self.max_abs):
            lines.append(f"{name:<{width}}  {value:>12.4f}  {peak:>12.4g}")
        lines.append("-" * len(lines[0]))
        lines.append(f"kurtosis mean {self.mean:.4f}")
        lines.append(f"kurtosis max  {self.max:.4f}  ({len(self.values)} hidden states)")
        if title:
            lines.insert(0, title)
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically, so readers never see half a file."""
        atomic_write_json(path, self.to_dict())


def _state_order(name: str, first_seen: int) -> tuple:
    """The embedding output first, then layers by global number, then any other names as seen."""
    if name == "embedding":
        return (0, 0)
    if name.startswith("layer_") and name[len("layer_"):].isdigit():
        return (1, int(name[len("layer_"):]))
    return (2, first_seen)


def merge_rank_reports(reports: Sequence[dict]) -> KurtosisReport:
    """One model's report from the reports (``to_dict()`` form) of the ranks that hold its parts.

    Ranks holding the same hidden state (data-parallel replicas, each on its share of the batch)
    are averaged, with the max of their max |x|; states are put in model order (embedding, then
    ``layer_k`` by k), whichever pipeline stage or model chunk recorded them.
    """
    values: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {}
    for report in reports:
        for name, value, peak in zip(report["names"], report["values"], report["max_abs"]):
            values.setdefault(name, []).append(value)
            peaks.setdefault(name, []).append(peak)
    seen = {name: i for i, name in enumerate(values)}
    names = sorted(values, key=lambda n: _state_order(n, seen[n]))
    return KurtosisReport(
        names=names,
        values=[sum(values[n]) / len(values[n]) for n in names],
        max_abs=[max(peaks[n]) for n in names],
    )


class _Accumulator:
    """Running sums kept on the activations' device, so recording forces no host sync per layer."""

    def __init__(self) -> None:
        self.kurt_sum: Tensor | None = None
        self.tokens = 0
        self.max_abs: Tensor | None = None

    def add(self, hidden: Tensor) -> None:
        hidden = hidden.detach()
        kurt = _relu_kurtosis(hidden, dim=-1)
        peak = hidden.abs().max().to(torch.float64) if hidden.numel() else torch.zeros((), dtype=torch.float64)
        self.kurt_sum = kurt.sum() if self.kurt_sum is None else self.kurt_sum + kurt.sum()
        self.max_abs = peak if self.max_abs is None else torch.maximum(self.max_abs, peak)
        self.tokens += kurt.numel()

    def value(self) -> tuple[float, float]:
        if not self.tokens:
            return float("nan"), float("nan")
        return float(self.kurt_sum) / self.tokens, float(self.max_abs)


def _as_tensor(obj: Any) -> Tensor | None:
    """A tensor, or the tensor inside Megatron-Core's ``WrappedTensor`` (peeked at, not unwrapped)."""
    if isinstance(obj, Tensor):
        return obj
    wrapper = getattr(obj, "_wrapper", None)
    if isinstance(wrapper, list) and wrapper and isinstance(wrapper[0], Tensor):
        return wrapper[0]
    return None


def _first_tensor(obj: Any) -> Tensor | None:
    """The hidden states of a layer's output: a bare tensor or the first item of ``(hidden_states, context)``."""
    if isinstance(obj, (tuple, list)):
        return _as_tensor(obj[0]) if obj else None
    return _as_tensor(obj)


class HiddenStateRecorder:
    """Context manager that hooks transformer layers and accumulates kurtosis of their hidden states.

    Records the first layer's input (``hidden_states``, positional or keyword; named "embedding")
    and every layer's output (``(hidden_states, context)`` tuple as Megatron-Core's TransformerLayer
    returns, or a bare tensor) named ``layer_{k}`` with ``k = first_layer_offset + index + 1``, or,
    without an offset, ``k`` = each layer's own 1-based ``layer_number``: so the layers of several
    model chunks of a pipeline stage (virtual pipeline stages, not contiguous) are named globally.
    Hidden states are ``[seq, batch, hidden]``; only the last dim matters, so sequence-parallel
    shards are fine. Per state it keeps the sum of relu'd per-token kurtosis, the token count and
    the max |activation|, so several batches accumulate (token-weighted). Run under
    ``torch.no_grad`` and without activation recompute so each batch is counted once.

    Args:
        layers: the transformer layers of this model chunk (or of all chunks), in order.
        first_layer_offset: number of layers before ``layers[0]`` in the whole model (a pipeline
            stage's offset); the layers are then taken as contiguous. ``None`` (default) names each
            layer by its own 1-based ``layer_number`` when all have one (as Megatron-Core's
            TransformerLayer does), else counts from 0.
        record_input: whether to record the first layer's input as "embedding". ``None`` (default)
            records it only when ``first_layer_offset == 0`` (the stage that holds the embedding),
            so reports of successive pipeline stages can be joined with ``KurtosisReport.merge``.
        names: explicit names for the recorded states (input first when recorded).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        first_layer_offset: int | None = None,
        record_input: bool | None = None,
        names: Sequence[str] | None = None,
    ):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("HiddenStateRecorder needs at least one layer")
        if first_layer_offset is None:
            numbers = [getattr(layer, "layer_number", None) for layer in self.layers]
            if not all(isinstance(n, int) and n >= 1 for n in numbers):
                numbers = list(range(1, len(self.layers) + 1))
        else:
            numbers = [int(first_layer_offset) + i + 1 for i in range(len(self.layers))]
        self.first_layer_offset = numbers[0] - 1
        self.record_input = (self.first_layer_offset == 0) if record_input is None else bool(record_input)
        if names is None:
            names = (["embedding"] if self.record_input else []) + [f"layer_{k}" for k in numbers]
        names = list(names)
        expected = len(self.layers) + int(self.record_input)
        if len(names) != expected:
            raise ValueError(f"expected {expected} names, got {len(names)}")
        self.names = names
        self._acc = [_Accumulator() for _ in names]
        self._handles: list = []

    def _pre_hook(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        hidden = _as_tensor(hidden)
        if hidden is not None:
            self._acc[0].add(hidden)

    def _make_hook(self, index: int):
        def hook(module, args, output):
            hidden = _first_tensor(output)
            if hidden is not None:
                self._acc[index].add(hidden)

        return hook

    def __enter__(self) -> "HiddenStateRecorder":
        if self._handles:
            raise RuntimeError("HiddenStateRecorder is already active")
        offset = int(self.record_input)
        if self.record_input:
            self._handles.append(self.layers[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(i + offset)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self._acc = [_Accumulator() for _ in self.names]

    def report(self) -> KurtosisReport:
        pairs = [acc.value() for acc in self._acc]
        return KurtosisReport(
            names=list(self.names), values=[v for v, _ in pairs], max_abs=[m for _, m in pairs]
        )


def measure_kurtosis(
    layers: Sequence[nn.Module],
    run_forward: Callable[[], Any],
    first_layer_offset: int | None = None,
    **recorder_kwargs,
) -> KurtosisReport:
    """Run ``run_forward()`` (one or more forward passes) under no_grad with hooks on ``layers``.

    ``first_layer_offset`` and ``recorder_kwargs`` (``record_input``, ``names``) go to
    :class:`HiddenStateRecorder`; the hooks are removed even if ``run_forward`` raises.
    """
    with torch.no_grad(), HiddenStateRecorder(layers, first_layer_offset, **recorder_kwargs) as recorder:
        run_forward()
    return recorder.report()
