"""Muon (momentum + orthogonalised update) as the OSP paper runs it, on logical matrices.

Per matrix W (m x n) with gradient g:
    buf <- g + mu * buf;  u <- g + mu * buf            (Nesterov, mu = 0.95)
    O   <- NewtonSchulz5(u)                            (see newton_schulz.py)
    W   <- W (1 - lr * wd) - lr * 0.2 * sqrt(max(m, n)) * O

The 0.2 * sqrt(max(m, n)) factor matches the update RMS of AdamW, so Muon and AdamW parameter groups
can share a learning-rate schedule. A parameter may hold several logical matrices (Megatron fuses
Q, K, V into one weight and the SwiGLU gate and up projections into another); each logical block is
orthogonalised on its own, so the update is the same whatever the fusion. Blocks are row index sets
given per parameter (see ``routing.logical_blocks``).

This optimizer sees whole (TP=1) matrices. Tensor-parallel shards are rejected by the builder.
"""

from __future__ import annotations

import math

import torch

from megatron_osp.optimizer.newton_schulz import newton_schulz


class Muon(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        coefficients: str = "keller",
        rms_match: float = 0.2,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            coefficients=coefficients,
            rms_match=rms_match,
            blocks=None,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")
            if group["blocks"] is not None and len(group["blocks"]) != len(group["params"]):
                raise ValueError("Muon param group: 'blocks' must list one entry per parameter")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            blocks = group["blocks"] or [None] * len(group["params"])
            for p, rows in zip(group["params"], blocks):
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g)
                u = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                update = orthogonalized_update(u, rows, group)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def orthogonalized_update(u: torch.Tensor, rows, group) -> torch.Tensor:
    """NS per logical block (row index sets), scaled by rms_match * sqrt(max(m, n))."""
    if rows is None:
        return _scaled_ns(u, group)
    out = torch.empty_like(u)
    for idx in rows:
        out[idx] = _scaled_ns(u[idx], group)
    return out


def _scaled_ns(u: torch.Tensor, group) -> torch.Tensor:
    scale = group["rms_match"] * math.sqrt(max(u.shape))
    return newton_schulz(u, steps=group["ns_steps"], coefficients=group["coefficients"]) * scale
