"""Where weight rounding costs perplexity, and why: per decoder linear and per role.

Two models whose weights round with the same relative error can lose very different perplexity,
because what a layer passes on is ``X W^T``, not ``W``. Round-to-nearest error ``E = W - Q(W)`` is
close to isotropic noise, so on the layer's real inputs ``X``::

    output_error = ||X E^T||_F / ||X W^T||_F  ~=  weight_error / input_gain
    weight_error = ||E||_F / ||W||_F
    input_gain   = ||X W^T||_F / (||X||_F ||W||_F / sqrt(in))     (1 for isotropic X)

``input_gain`` is how much more of ``W``'s energy the inputs use than random inputs would: a weight
whose energy sits in the few directions its inputs occupy (a low stable rank, e.g. Adam's) masks the
rounding noise, one with a flat singular spectrum (Muon's orthogonalized updates) does not. The
table here measures the three terms on held-out inputs, the stable rank ``||W||_F^2 / ||W||_2^2``,
and the perplexity with only one role's weights rounded (qkv, o_proj, fc1, down_proj on Megatron
models; q/k/v/gate/up on HF), so a user sees which layers to keep in higher precision.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from megatron_osp.analysis.evaluation import perplexity
from megatron_osp.analysis.gptq import iterate_batches
from megatron_osp.analysis.model_parts import ModelParts, logits, model_parts
from megatron_osp.analysis.quantization import LINEAR_INPUT_KEYWORDS, fake_quant, weight_fake_quant_

__all__ = ["LinearWeightError", "RoundingErrorAccumulator", "linear_weight_errors", "rounded_roles",
           "roles_of", "role_perplexities", "weight_error_report"]


@dataclass
class LinearWeightError:
    """The rounding error of one linear's weight, on its own held-out inputs (see the module doc)."""

    name: str
    role: str
    weight_error: float
    output_error: float
    input_gain: float
    stable_rank: float


class RoundingErrorAccumulator:
    """Streams batches of one linear's inputs: ``||X E^T||^2``, ``||X W^T||^2`` and ``||X||^2`` summed
    in float64, so the inputs of a large model never have to be held at once. The weight is held by
    reference and rounded when needed, so no copy of a whole model's weights is made either."""

    def __init__(self, weight: Tensor, bits: int, group_size: int | None = None) -> None:
        self.weight = weight
        self.bits, self.group_size = bits, group_size
        self.out_sq = self.err_sq = self.in_sq = 0.0

    def _weight_and_error(self) -> tuple[Tensor, Tensor]:
        w = self.weight.detach().float()
        return w, w - fake_quant(w, self.bits, self.group_size)

    def add(self, x: Tensor) -> None:
        w, e = self._weight_and_error()
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.in_sq += float(x.pow(2).sum(dtype=torch.float64))
        self.out_sq += float((x @ w.T).pow(2).sum(dtype=torch.float64))
        self.err_sq += float((x @ e.T).pow(2).sum(dtype=torch.float64))

    def result(self, name: str, role: str) -> LinearWeightError:
        if self.in_sq == 0.0:
            raise RuntimeError(f"{name}: no inputs were recorded (run a forward pass first)")
        w, e = self._weight_and_error()
        w_sq = float(w.pow(2).sum(dtype=torch.float64))
        spectral = float(torch.linalg.matrix_norm(w, ord=2))
        isotropic_out = self.in_sq * w_sq / w.shape[1]
        return LinearWeightError(
            name=name,
            role=role,
            weight_error=math.sqrt(float(e.pow(2).sum(dtype=torch.float64)) / w_sq),
            output_error=math.sqrt(self.err_sq / self.out_sq) if self.out_sq > 0 else math.inf,
            input_gain=math.sqrt(self.out_sq / isotropic_out) if isotropic_out > 0 else 0.0,
            stable_rank=w_sq / spectral**2 if spectral > 0 else 0.0,
        )


def _role(name: str) -> str:
    return name.split(".", 1)[1]  # "layer_3.fc1" -> "fc1"


def _first_tensor(args, kwargs) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in LINEAR_INPUT_KEYWORDS:
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    raise RuntimeError("cannot find the input tensor of a linear layer")


@torch.no_grad()
def linear_weight_errors(
    model: nn.Module | ModelParts,
    windows: Tensor,
    bits: int = 4,
    group_size: int | None = None,
    batch_size: int = 8,
) -> list[LinearWeightError]:
    """Each decoder linear's rounding error at ``bits`` (RTN per output channel) on the inputs it sees
    when the full-precision model reads ``windows`` (``[n, seq + 1]`` token windows)."""
    parts = model_parts(model)
    parts.require_unfused_norms("measuring rounding error on the linears' inputs")
    device = next(parts.model.parameters()).device
    linears = parts.named_linears()
    acc = {name: RoundingErrorAccumulator(lin.weight, bits, group_size) for name, lin in linears}
    handles = [
        lin.register_forward_pre_hook(lambda m, a, k, name=name: acc[name].add(_first_tensor(a, k)), with_kwargs=True)
        for name, lin in linears
    ]
    try:
        for batch in iterate_batches(windows, batch_size):
            logits(parts, batch[:, :-1].to(device))
    finally:
        for h in handles:
            h.remove()
    return [acc[name].result(name, _role(name)) for name, _ in linears]


@contextlib.contextmanager
def rounded_roles(model: nn.Module | ModelParts, roles: set[str] | None, bits: int, group_size: int | None = None):
    """RTN-round the weights of the decoder linears whose role is in ``roles`` (None = all) while the
    context is open; the exact weights are put back afterwards, whatever happens inside."""
    parts = model_parts(model)
    chosen = [lin for name, lin in parts.named_linears() if roles is None or _role(name) in roles]
    saved = [lin.weight.detach().clone() for lin in chosen]
    try:
        for lin in chosen:
            weight_fake_quant_(lin, bits, group_size)
        yield parts
    finally:
        with torch.no_grad():
            for lin, w in zip(chosen, saved):
                lin.weight.copy_(w)


def role_perplexities(
    model: nn.Module | ModelParts,
    windows: Tensor,
    bits: int = 4,
    group_size: int | None = None,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Perplexity with only one role's weights rounded, by role (in the decoder's order)."""
    parts = model_parts(model)
    out = {}
    for role in roles_of(parts):
        with rounded_roles(parts, {role}, bits, group_size):
            out[role] = perplexity(parts, windows, batch_size, progress=progress).perplexity
    return out


def roles_of(model: nn.Module | ModelParts) -> list[str]:
    """The decoder's linear roles in order: qkv, o_proj, fc1, down_proj on Megatron models."""
    return list(dict.fromkeys(_role(name) for name, _ in model_parts(model).named_linears()))


def weight_error_report(
    model: nn.Module | ModelParts,
    windows: Tensor,
    bits: int = 4,
    group_size: int | None = None,
    batch_size: int = 8,
    input_windows: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """``{"bits", "group_size", "roles": {role: means over layers + "ppl"}, "linears": [...]}``: the
    error terms on the first ``input_windows`` windows, the role perplexities on all of them
    (``progress`` is called with the windows each perplexity batch has done)."""
    parts = model_parts(model)
    per_linear = linear_weight_errors(parts, windows[:input_windows], bits, group_size, batch_size)
    ppl = role_perplexities(parts, windows, bits, group_size, batch_size, progress=progress)
    roles = {}
    for role, role_ppl in ppl.items():
        rows = [e for e in per_linear if e.role == role]
        mean = lambda f: sum(getattr(e, f) for e in rows) / len(rows)  # noqa: E731
        roles[role] = {f: mean(f) for f in ("weight_error", "output_error", "input_gain", "stable_rank")}
        roles[role]["ppl"] = role_ppl
    return {"bits": bits, "group_size": group_size, "roles": roles, "linears": [asdict(e) for e in per_linear]}
