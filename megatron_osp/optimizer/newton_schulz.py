"""Newton–Schulz orthogonalisation: the core of Muon.

Muon replaces a matrix update G by (approximately) its polar factor U V^T (G = U S V^T), which
gives every singular direction the same step size. An odd polynomial iteration on X = G / ||G||_F
drives all singular values towards ~1 without an SVD:

    A = X X^T;  X <- a X + (b A + c A^2) X          (singular value s -> a s + b s^3 + c s^5)

Coefficient sets and the band their 5-step output lands in (tests/test_newton_schulz.py checks
both against a float64 SVD):

- "keller" (3.4445, -4.7750, 2.0315) every step (Jordan et al., 2024; the OSP paper's choice):
  every singular value with s / ||G||_F >= 2e-3 ends in [0.68, 1.21]. It never converges; the
  band is what makes it cheap.
- "polar_express" (Amsel, Persson, Musco, Gower 2025, Algorithm 1): a different minimax-optimal
  quintic per step for the interval [1e-3, 1], each divided by the paper's 1.01 safety factor
  (a/1.01, b/1.01^3, c/1.01^5; the last, repeated one is not) and G scaled by 1/(1.01 ||G||_F):
  s / ||G||_F >= 1e-3 ends in [0.84, 1.13] after 5 steps and in [0.99, 1.002] after 6.

Backends: "torch" (bmm / baddbmm), "triton" (ns_triton.py: X X^T and b A + c A A by a symmetric
kernel that computes only the upper triangle, B X by baddbmm), "auto" (triton for CUDA tensors
when it can run there, else torch; CPU stays torch).
"""

from __future__ import annotations

import importlib
import warnings

import torch

BACKENDS = ("auto", "torch", "triton")

_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_SAFETY = 1.01

# name -> (per-step (a, b, c); the last one repeats), extra factor dividing the Frobenius norm
COEFFICIENTS: dict[str, tuple[tuple[tuple[float, float, float], ...], float]] = {
    "keller": (((3.4445, -4.7750, 2.0315),), 1.0),
    "polar_express": (
        tuple((a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1])
        + (_POLAR_EXPRESS_RAW[-1],),
        _SAFETY,
    ),
}


def coefficient_schedule(coefficients: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) used at each of ``steps`` iterations."""
    if coefficients not in COEFFICIENTS:
        raise ValueError(f"unknown Newton-Schulz coefficients {coefficients!r}; known: {sorted(COEFFICIENTS)}")
    if steps < 1:
        raise ValueError(f"Newton-Schulz needs steps >= 1, got {steps}")
    table, _ = COEFFICIENTS[coefficients]
    return [table[min(i, len(table) - 1)] for i in range(steps)]


def ns_flops(m: int, n: int, steps: int = 5, symmetric: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of ``steps`` iterations on an m x n matrix (wide orientation).

    ``symmetric``: what the triton backend does, X X^T and A A only on and above the diagonal
    (m (m + 1) / 2 entries each; its tiles add a little more on the diagonal blocks).
    """
    m, n = min(m, n), max(m, n)
    if symmetric:
        return steps * (m * (m + 1) * n + m * (m + 1) * m + 2 * m * m * n)
    # A = X X^T (m*m*n), A @ A (m^3), B @ X (m*m*n)
    return steps * 2 * (2 * m * m * n + m**3)


def _ns_triton():
    # Imported on first use (and looked up in sys.modules each time), so torch-only runs never
    # import triton.
    return importlib.import_module("megatron_osp.optimizer.ns_triton")


def resolve_backend(backend: str, X: torch.Tensor) -> str:
    """"torch" or "triton" for work tensor ``X``; a clear error when "triton" cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"newton_schulz backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not X.is_cuda):
        return "torch"
    nt = _ns_triton()
    reason = nt.unavailable_reason(X)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"newton_schulz(backend='triton') cannot run: {reason}")
        return "triton"
    if reason is not None or nt.INTERPRET or not _triton_checked(X):
        return "torch"
    return "triton"


_CHECKED: dict[tuple, bool] = {}


def _triton_checked(X: torch.Tensor) -> bool:
    """For "auto": the kernel against torch once per (device, dtype, shape), before it is trusted.

    A compile failure or a wrong result warns once and leaves that shape on torch, so an untested
    GPU / Triton version can slow a run down but not break or silently corrupt it.
    """
    key = (X.device, X.dtype, tuple(X.shape[-2:]))
    if key not in _CHECKED:
        nt = _ns_triton()
        x = X[:1]
        try:  # the whole stack, so that autotuning (first call per shape) sees the real batch
            A = nt.sym_gram(X)
            B = nt.sym_gram(A, alpha=-1.5, beta=0.5)[:1]
            A = A[:1]
            ref_a = torch.bmm(x, x.mT)
            ref_b = torch.baddbmm(ref_a, ref_a, ref_a, beta=0.5, alpha=-1.5)
            tol = 1e-5 if X.dtype == torch.float32 else 2e-2
            err = max(_rel_err(A, ref_a), _rel_err(B, ref_b))
            ok = err <= tol and torch.equal(A, A.mT)
            why = f"relative error {err:.3g} > {tol:g} or not symmetric"
        except Exception as e:  # noqa: BLE001 - any failure means: use torch for this shape
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            warnings.warn(f"newton_schulz backend='auto': the Triton kernel failed its check on {tuple(X.shape[-2:])} "
                          f"{X.dtype} ({why}); using torch for this shape", stacklevel=3)
        _CHECKED[key] = ok
    return _CHECKED[key]


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: str = "keller",
    eps: float = 1e-8,
    dtype: torch.dtype | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Approximate polar factor of a 2-D matrix or a batch of them ([..., m, n]).

    Works in bf16 on CUDA (tensor cores) and fp32 on CPU unless ``dtype`` says otherwise; the
    result has G's dtype. Each matrix is normalised by its own Frobenius norm (+ ``eps``).
    ``backend``: "auto", "torch" or "triton" (see the module docstring).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    schedule = coefficient_schedule(coefficients, steps)
    safety = COEFFICIENTS[coefficients][1]
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    batch_shape = G.shape[:-2]
    X = G.reshape(-1, *G.shape[-2:]).to(dtype)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:  # iterate on the wide orientation: A is then the smaller Gram matrix
        X = X.mT
    # The norm accumulates in fp32 even for bf16 work (no fp32 copy of X is made).
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    X = (X * (1.0 / (norm * safety + eps)).to(dtype)).contiguous()
    if resolve_backend(backend, X) == "triton":
        sym_gram = _ns_triton().sym_gram
        for a, b, c in schedule:
            A = sym_gram(X)  # X X^T, upper tiles only
            B = sym_gram(A, alpha=c, beta=b)  # b A + c A A (A symmetric: A A = A A^T)
            X = torch.baddbmm(X, B, X, beta=a)
    else:
        for a, b, c in schedule:
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A
            X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    if transposed:
        X = X.mT
    return X.reshape(*batch_shape, *X.shape[-2:]).to(G.dtype)
