"""Single-Scale RMSNorm (SSNorm), the OSP paper's replacement for per-channel RMSNorm gains.

A per-channel gain lets training grow a few channels without bound, and those channels become the
activation outliers that break 4-bit quantization. SSNorm keeps one learnable scalar per norm, so the
norm can rescale the whole vector but never single out a channel:

    y = g * x / sqrt(mean(x^2) + eps),   g a scalar initialised to 1.

It has Megatron-Core's norm constructor signature, so a layer spec can put it in any norm slot.

Two kernels compute the same formula (``model.ssnorm_kernel``, chosen in the layer spec):
``SSNorm`` ("eager") as separate fp32 elementwise ops, and ``FusedSSNorm`` ("fused") through
``torch.nn.functional.rms_norm`` with the scalar gain broadcast as the per-channel weight, so that
torch's fused RMSNorm kernel runs it (aten::_fused_rms_norm) instead of separate elementwise ops whose
fp32 intermediates autograd keeps. The default, "auto" (``AutoSSNorm``), takes the fused kernel for
activations on a GPU and the eager one elsewhere. Measured on one H200 (docs/benchmarks.md,
2026-12-04): at the 1.4B shape the eager kernel made OSP's forward + backward 10.3% slower than the
Adam arm's (torch RMSNorm, fused), the fused one 0.6%. On the CPU the eager kernel stays, so every
CPU figure in the docs (measured with it) reproduces; the two agree within fp32 rounding (1e-5).
All three have the same parameter and checkpoint keys; a run may switch between them on resume.
"""

from __future__ import annotations

import torch
from torch import nn


class SSNorm(nn.Module):
    """RMS normalisation over the last dimension with ONE learnable scalar gain."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **unused):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        # Shape (1,) rather than (): sharded checkpoints and optimizers handle 1-D tensors uniformly.
        self.weight = nn.Parameter(torch.ones(1, dtype=_params_dtype(config)))
        # Under sequence parallelism each TP rank sees different tokens, so the scalar's gradient
        # must be all-reduced across TP, which Megatron does for params flagged this way.
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, eps={self.eps}, gain=scalar"


class FusedSSNorm(SSNorm):
    """SSNorm through torch's rms_norm: ``rms_norm(x, weight=g broadcast to the hidden size)``.

    Torch's fused kernel needs the weight in the input's dtype (as under bf16 training, where
    Megatron casts every parameter to bf16); otherwise this falls back to SSNorm's own ops, so the
    gain is never rounded to the activation's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != x.dtype:
            return super().forward(x)
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight.expand(x.shape[-1]), self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", kernel=torch rms_norm"


class AutoSSNorm(FusedSSNorm):
    """``model.ssnorm_kernel=auto`` (the default): FusedSSNorm's kernel for activations on a GPU,
    SSNorm's eager ops elsewhere (decided per call by the activation's device)."""

    fused_on = ("cuda",)  # device types whose activations take the fused kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type in self.fused_on:
            return super().forward(x)
        return SSNorm.forward(self, x)

    def extra_repr(self) -> str:
        return SSNorm.extra_repr(self) + ", kernel=torch rms_norm on GPU, eager elsewhere"


SSNORM_KERNELS = {"auto": AutoSSNorm, "eager": SSNorm, "fused": FusedSSNorm}


def _params_dtype(config) -> torch.dtype:
    return getattr(config, "params_dtype", torch.float32) or torch.float32
