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
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "token_excess_kurtosis",
    "excess_kurtosis",
    "HiddenStateRecorder",
    "KurtosisReport",
    "measure_kurtosis",
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

    def format_table(self) -> str:
        width = max([len("hidden state"), *(len(n) for n in self.names)])
        lines = [f"{'hidden state':<{width}}  {'kurtosis':>12}  {'max |x|':>12}"]
        lines.append("-" * len(lines[0]))
        for name, value, peak in zip(self.names, self.values, self.max_abs):
            lines.append(f"{name:<{width}}  {value:>12.4f}  {peak:>12.4g}")
        lines.append("-" * len(lines[0]))
        lines.append(f"kurtosis mean {self.mean:.4f}  max {self.max:.4f}  ({len(self.values)} states)")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (tmp file in the same directory + os.replace), so readers never see half a file."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kurtosis-", suffix=".json.tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


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


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], Tensor):
        return obj[0]
    return None


class HiddenStateRecorder:
    """Context manager that hooks transformer layers and accumulates kurtosis of their hidden states.

    Records the first layer's input (``hidden_states``, positional or keyword; named "embedding")
    and every layer's output (``(hidden_states, context)`` tuple as Megatron-Core's TransformerLayer
    returns, or a bare tensor; named ``layer_<layer_number>``, 1-based). Hidden states are
    ``[seq, batch, hidden]``; only the last dim matters, so sequence-parallel shards are fine.
    Hooks fire on every forward call, so several batches accumulate; run under ``torch.no_grad``
    and without activation recompute to count each batch once.
    """

    def __init__(self, layers: Sequence[nn.Module], record_input: bool = True, names: Sequence[str] | None = None):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("HiddenStateRecorder needs at least one layer")
        self.record_input = record_input
        if names is None:
            names = (["embedding"] if record_input else []) + [
                f"layer_{getattr(layer, 'layer_number', i + 1)}" for i, layer in enumerate(self.layers)
            ]
        names = list(names)
        expected = len(self.layers) + int(record_input)
        if len(names) != expected:
            raise ValueError(f"expected {expected} names, got {len(names)}")
        self.names = names
        self._acc = [_Accumulator() for _ in names]
        self._handles: list = []

    def _pre_hook(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states") if "hidden_states" in kwargs else (args[0] if args else None)
        if isinstance(hidden, Tensor):
            self._acc[0].add(hidden)

    def _make_hook(self, index: int):
        def hook(module, args, output):
            hidden = _first_tensor(output)
            if hidden is not None:
                self._acc[index].add(hidden)

        return hook

    def __enter__(self) -> "HiddenStateRecorder":
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


def measure_kurtosis(layers: Sequence[nn.Module], run_forward: Callable[[], Any], **recorder_kwargs) -> KurtosisReport:
    """Run ``run_forward()`` (one or more forward passes) under no_grad with hooks on ``layers``."""
    with torch.no_grad(), HiddenStateRecorder(layers, **recorder_kwargs) as recorder:
        run_forward()
    return recorder.report()
