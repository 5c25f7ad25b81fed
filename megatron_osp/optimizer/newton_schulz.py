"""Newton–Schulz orthogonalisation: the core of Muon.

Muon replaces a matrix update G by (approximately) its polar factor U V^T (G = U S V^T), which
gives every singular direction the same step size. An odd polynomial iteration on X = G / ||G||_F
drives all singular values towards ~1 without an SVD:

    A = X X^T;  X <- a X + (b A + c A^2) X

The "keller" coefficients (3.4445, -4.7750, 2.0315) (Jordan et al., 2024; used by the OSP paper)
grow small singular values fast but only into a band around 1: after 5 steps every singular value
s with s / ||G||_F >= 2e-3 lands in [0.68, 1.21] (tests/test_muon.py checks this against an SVD),
which is enough for optimisation and far cheaper than an exact polar decomposition.
"""

from __future__ import annotations

import torch

COEFFICIENTS: dict[str, tuple[float, float, float]] = {
    "keller": (3.4445, -4.7750, 2.0315),
}


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: str = "keller",
    eps: float = 1e-8,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate polar factor of a 2-D matrix or a batch of them ([..., m, n]).

    Works in bf16 on CUDA (tensor cores) and fp32 on CPU unless ``dtype`` says otherwise; the
    result has G's dtype. Each matrix is normalised by its own Frobenius norm.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if coefficients not in COEFFICIENTS:
        raise ValueError(f"unknown coefficients {coefficients!r}; known: {sorted(COEFFICIENTS)}")
    a, b, c = COEFFICIENTS[coefficients]
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:  # iterate on the wide orientation: A is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)
