"""Where the outliers are: per-layer kurtosis, max |activation| and top channels, by forward hooks.

Two families of measurement points, on Megatron GPT models and HF Llama exports alike
(analysis.model_parts):

- the residual stream: the first layer's input ("embedding") and every layer's output ("layer_k");
- the input of every linear layer inside the decoder ("layer_k.qkv", "layer_k.down_proj", ...),
  which is exactly what activation quantization rounds.

Per point: the paper's excess kurtosis (analysis.kurtosis; for a token vector ``x`` of size ``h``,
``kurt(x) = relu(mean((x-mu)^4) / mean((x-mu)^2)^2 - 3)``, averaged over tokens), the max |activation|
and the channels with the largest max |activation| (an outlier channel is large for every token, so it
tops this list). Accumulated on the activations' device over any number of batches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from megatron_osp.analysis.kurtosis import _as_tensor, _first_tensor, _relu_kurtosis
from megatron_osp.analysis.model_parts import ModelParts, model_parts
from megatron_osp.fileio import atomic_write_json

__all__ = ["ActivationStats", "ActivationStatsRecorder", "PointStats"]


class _PointAccumulator:
    def __init__(self) -> None:
        self.kurt_sum: Tensor | None = None
        self.tokens = 0
        self.channel_max: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.detach()
        kurt = _relu_kurtosis(x, dim=-1)
        ch = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        self.kurt_sum = kurt.sum() if self.kurt_sum is None else self.kurt_sum + kurt.sum()
        self.channel_max = ch if self.channel_max is None else torch.maximum(self.channel_max, ch)
        self.tokens += kurt.numel()


@dataclass
class PointStats:
    name: str
    kind: str  # "residual" | "linear_input"
    kurtosis: float
    max_abs: float
    top_channels: list[tuple[int, float]]  # (channel, max |x|), largest first
    median_channel_max: float  # the typical channel's max |x|: the ratio to max_abs shows the outlier gap


@dataclass
class ActivationStats:
    points: list[PointStats] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[PointStats]:
        return [p for p in self.points if p.kind == kind]

    def summary(self) -> dict:
        """Mean/max kurtosis and max |x| over the residual stream (the paper's numbers) and linear inputs."""
        out = {}
        for kind in ("residual", "linear_input"):
            pts = self.of_kind(kind)
            if pts:
                k = [p.kurtosis for p in pts]
                out[kind] = {
                    "kurtosis_mean": sum(k) / len(k),
                    "kurtosis_max": max(k),
                    "max_abs": max(p.max_abs for p in pts),
                }
        return out

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "points": [
                {**p.__dict__, "top_channels": [[c, v] for c, v in p.top_channels]} for p in self.points
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ActivationStats":
        pts = [
            PointStats(**{**p, "top_channels": [(int(c), float(v)) for c, v in p["top_channels"]]})
            for p in data["points"]
        ]
        return cls(points=pts)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ActivationStats":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def format_table(self, kind: str | None = None) -> str:
        pts = self.points if kind is None else self.of_kind(kind)
        width = max([len("point"), *(len(p.name) for p in pts)])
        head = f"{'point':<{width}}  {'kurtosis':>10}  {'max |x|':>10}  {'max/median':>10}  top channels"
        lines = [head, "-" * len(head)]
        for p in pts:
            ratio = p.max_abs / p.median_channel_max if p.median_channel_max > 0 else float("inf")
            top = ", ".join(f"{c}:{v:.3g}" for c, v in p.top_channels[:4])
            lines.append(f"{p.name:<{width}}  {p.kurtosis:>10.4f}  {p.max_abs:>10.4g}  {ratio:>10.1f}  {top}")
        return "\n".join(lines)


class ActivationStatsRecorder:
    """Context manager: hooks the residual stream and every decoder linear's input of one model."""

    def __init__(self, model: nn.Module | ModelParts, top_k: int = 8, residual: bool = True, linear_inputs: bool = True):
        self.parts = model_parts(model)
        self.top_k = top_k
        self.points: list[tuple[str, str]] = []
        self._acc: dict[str, _PointAccumulator] = {}
        self._handles: list = []
        self._residual = residual
        self._linear_inputs = linear_inputs
        if residual:
            self._add("embedding", "residual")
            for i in range(len(self.parts.layers)):
                self._add(f"layer_{i + 1}", "residual")
        if linear_inputs:
            for name, _ in self.parts.named_linears():
                self._add(name, "linear_input")

    def _add(self, name: str, kind: str) -> None:
        self.points.append((name, kind))
        self._acc[name] = _PointAccumulator()

    def __enter__(self) -> "ActivationStatsRecorder":
        if self._handles:
            raise RuntimeError("ActivationStatsRecorder is already active")
        if self._linear_inputs:
            self.parts.require_unfused_norms("recording the linears' input statistics")
        layers = self.parts.decoder_layers
        if self._residual:
            def first_input(module, args, kwargs):
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
                h = _as_tensor(h)
                if h is not None:
                    self._acc["embedding"].add(h)

            self._handles.append(layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
            for i, layer in enumerate(layers):
                self._handles.append(layer.register_forward_hook(self._output_hook(f"layer_{i + 1}")))
        if self._linear_inputs:
            for name, lin in self.parts.named_linears():
                self._handles.append(lin.register_forward_pre_hook(self._input_hook(name)))
        return self

    def _output_hook(self, name: str):
        def hook(module, args, output):
            h = _first_tensor(output)
            if h is not None:
                self._acc[name].add(h)

        return hook

    def _input_hook(self, name: str):
        def hook(module, args):
            if args and isinstance(args[0], Tensor):
                self._acc[name].add(args[0])

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def stats(self) -> ActivationStats:
        out = []
        for name, kind in self.points:
            acc = self._acc[name]
            if not acc.tokens:
                raise RuntimeError(f"no activations were recorded at {name}: run a forward pass inside the context")
            ch = acc.channel_max
            k = min(self.top_k, ch.numel())
            vals, idx = torch.topk(ch, k)
            out.append(
                PointStats(
                    name=name,
                    kind=kind,
                    kurtosis=float(acc.kurt_sum) / acc.tokens,
                    max_abs=float(ch.max()),
                    top_channels=[(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist())],
                    median_channel_max=float(ch.median()),
                )
            )
        return ActivationStats(points=out)
