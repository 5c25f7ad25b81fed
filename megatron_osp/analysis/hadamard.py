"""Orthogonal mixing matrices for rotation-based quantization: Walsh-Hadamard and its Kronecker extension.

A rotation ``R`` (orthogonal: ``R R^T = I``) applied to an activation and undone in the next weight
(``W x = (W R^T)(R x)``) leaves a float model unchanged but spreads an outlier channel's energy over
all channels, which shrinks the per-token quantization scale. The normalised Walsh-Hadamard matrix
``H_n / sqrt(n)`` is the classic choice (every entry ``±1/sqrt(n)``, maximal spreading, O(n log n)).

Sizes that are not a power of two (the FFN widths here: 5504 = 2^7·43, 344 = 2^3·43, 96 = 2^5·3)
use ``R = H_{2^k} ⊗ Q_m`` with ``n = 2^k·m``, ``m`` odd. No Hadamard matrix of odd order m > 1
exists, and QuaRot's hand-made tables (e.g. order 172) are not reproduced here; instead ``Q_m`` is a
seeded random orthogonal matrix. ``R`` is orthogonal, mixes every channel with every other (unlike a
block-diagonal Hadamard, which would leave outliers confined to their block), and is applied as two
small matmuls on the ``(2^k, m)`` reshape of the vector: ``R x = vec(H X Q^T)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["hadamard_matrix", "random_orthogonal", "OrthogonalMixer"]


def hadamard_matrix(n: int, dtype=torch.float64) -> Tensor:
    """The orthonormal Sylvester Walsh-Hadamard matrix of order ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def random_orthogonal(n: int, seed: int, dtype=torch.float64) -> Tensor:
    """A Haar-random orthogonal ``n x n`` matrix from a private generator (QR with sign fix)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.contiguous().to(dtype)


def _split_power_of_two(n: int) -> tuple[int, int]:
    if n < 1:
        raise ValueError(f"rotation size must be positive, got {n}")
    p = n & -n  # largest power of two dividing n
    return p, n // p


class OrthogonalMixer:
    """``R = H_{2^k} · diag(signs) ⊗ Q_m`` acting on the last dimension (size ``n = 2^k·m``).

    ``randomize`` flips the Hadamard's columns by seeded random signs (QuaRot's randomised Hadamard);
    for odd ``m > 1`` the factor ``Q_m`` is a seeded random orthogonal matrix (see module docstring).
    """

    def __init__(self, n: int, seed: int = 0, randomize: bool = True):
        self.n = n
        p, m = _split_power_of_two(n)
        h = hadamard_matrix(p)
        if randomize:
            gen = torch.Generator().manual_seed(seed)
            signs = torch.randint(0, 2, (p,), generator=gen).to(torch.float64) * 2 - 1
            h = h * signs  # H diag(s): still orthogonal
        self.h = h
        self.q = random_orthogonal(m, seed + 1) if m > 1 else None

    def apply(self, x: Tensor) -> Tensor:
        """``R x`` for each vector along the last dim (computed in float32 or better, returned in x's dtype)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation of size {self.n} applied to a last dimension of {x.shape[-1]}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        p = self.h.shape[0]
        xs = x.to(work).reshape(*x.shape[:-1], p, self.n // p)
        y = torch.matmul(self.h.to(device=x.device, dtype=work), xs)
        if self.q is not None:
            y = torch.matmul(y, self.q.to(device=x.device, dtype=work).T)
        return y.reshape(x.shape).to(x.dtype)

    def matrix(self, dtype=torch.float64) -> Tensor:
        """The dense ``n x n`` matrix ``R`` (for folding into small weights and for tests)."""
        eye = torch.eye(self.n, dtype=torch.float64)
        # Row i of apply(eye) is R e_i = column i of R.
        return self.apply(eye).T.contiguous().to(dtype)
