"""GPTQ weight rounding (Frantar et al., 2023): RTN's grid, with the rounding error compensated.

RTN rounds each weight on its own. GPTQ quantizes the input columns of ``W`` one at a time and
pushes each column's rounding error onto the columns not yet quantized, weighted by the inverse
Hessian ``H = 2 X^T X / n`` of the layer's inputs ``X``; this minimises ``||X W^T - X Q^T||`` greedily
instead of ``||W - Q||``. Same grid as analysis.quantization (symmetric, per output channel, optional
column groups), so a GPTQ weight is a drop-in replacement for an RTN one.

Model-level use (``gptq_quantize_model_``) is sequential: decoder layer ``i`` is calibrated on inputs
produced by layers ``< i`` already quantized, one forward per layer, stopped right after layer ``i``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from megatron_osp.analysis.model_parts import ModelParts
from megatron_osp.analysis.quantization import FULL_BITS, quant_scale

__all__ = ["HessianAccumulator", "gptq_quantize", "gptq_quantize_model_"]


class HessianAccumulator:
    """Running ``H = 2/n · Σ x x^T`` over the rows ``x`` of a linear layer's inputs (float64)."""

    def __init__(self, columns: int, device=None):
        self.h = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        total = self.n + x.shape[0]
        self.h.mul_(self.n / total).add_(x.T @ x, alpha=2.0 / total)
        self.n = total


def _round(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    return_scales: bool = False,
):
    """The GPTQ-rounded copy of ``weight`` (rows = output channels), given its input Hessian.

    ``damp`` adds ``damp · mean(diag H)`` to the diagonal (numerical stability); inputs that were
    always zero (``H_jj = 0``) get a unit diagonal and their weight column is zeroed, as it never acts.
    With ``return_scales`` also returns the grid step of each row and column group ``[rows, groups]``.
    """
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match weight columns {weight.shape[1]}")
    if group_size is not None and weight.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} does not divide {weight.shape[1]} input columns")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float64).clone()
    h = hessian.to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    # Upper Cholesky factor of H^-1: row i holds the update directions for column i onwards.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    scale = None if group_size else quant_scale(w, bits).to(torch.float64)  # (rows, 1)
    q = torch.zeros_like(w)
    scales = []
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        w_blk = w[:, b0:b1].clone()
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if group_size and col % group_size == 0:
                # The group's scale comes from the columns as updated so far (GPTQ's "static groups" off).
                group = torch.cat([w_blk[:, i:], w[:, b1:]], dim=1)[:, :group_size]
                scale = quant_scale(group, bits).to(torch.float64)
                scales.append(scale)
            wi = w_blk[:, i]
            qi = _round(wi.unsqueeze(1), scale, qmax).squeeze(1)
            q[:, col] = qi
            err = (wi - qi) / hinv_blk[i, i]
            w_blk[:, i:] -= err.unsqueeze(1) * hinv_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        w[:, b1:] -= err_blk @ hinv[b0:b1, b1:]
    if return_scales:
        return q.to(weight.dtype), torch.cat(scales if group_size else [scale], dim=1)
    return q.to(weight.dtype)


class _StopForward(Exception):
    pass


@torch.no_grad()
def gptq_quantize_model_(
    parts: ModelParts,
    calibration: Iterable[Tensor],
    forward: Callable[[Tensor], object],
    bits: int,
    group_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Replace every decoder linear's weight by its GPTQ rounding, layer by layer.

    ``forward(batch)`` runs the model on each calibration batch (its output is ignored); every batch
    goes through once per decoder layer, cut short right after that layer by an exception.
    Activation hooks that are active (online Hadamard) see the same inputs the quantized model will.
    """
    if bits >= FULL_BITS:
        return
    calibration = list(calibration)
    n = len(parts.layers)
    for i, lp in enumerate(parts.layers):
        linears = [m for _, m in lp.linears()]
        accs = {id(m): HessianAccumulator(m.weight.shape[1], device=m.weight.device) for m in linears}

        def make(acc):
            # Hessians see the input as the (hooked) linear receives it: register last among pre-hooks.
            def hook(module, args):
                acc.add(args[0])

            return hook

        def stop(module, args, output):
            raise _StopForward

        handles = [m.register_forward_pre_hook(make(accs[id(m)])) for m in linears]
        handles.append(lp.layer.register_forward_hook(stop))
        try:
            for batch in calibration:
                try:
                    forward(batch)
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        for m in linears:
            acc = accs[id(m)]
            if acc.n == 0:
                raise RuntimeError(f"GPTQ: layer {i + 1} saw no calibration input")
            m.weight.data.copy_(gptq_quantize(m.weight.data, acc.h, bits, group_size))
        if progress is not None:
            progress(i + 1, n)


def iterate_batches(windows: Tensor, batch_size: int) -> Iterable[Tensor]:
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]
