"""Computational invariance: rotations folded into the weights (QuaRot) and the online FFN Hadamard.

Residual rotation. With row vectors and an orthogonal ``Q`` (d x d), replace the residual stream
``x`` by ``x Q``. RMS normalisation without a gain commutes with it (``|x Q| = |x|``), so after the
norm gains are folded into the linears that read the norms:

- linears reading a norm (QKV, gate/up, the output layer or the output EmbProj): ``W <- W Q``;
- linears writing the residual (attention out, down projection, the input EmbProj): ``W <- Q^T W``;
- the embedding (when no EmbProj follows it): ``E <- E Q``.

Every logit is unchanged (tested to float32 tolerance), while the rotated residual has no privileged
channel left for outliers to sit in. Gain folding: a per-channel RMSNorm gain ``g`` becomes
``W <- W diag(g)`` in each following linear and ``g <- 1``; SSNorm's scalar gain folds the same way.
With EmbProj the final gain folds into the output projection, so the output layer is untouched.

Per-head rotations (QuaRot): V's rows of each KV head ``W_v,h <- H W_v,h`` and attention-out's
columns of each head ``W_o[:, h] <- W_o[:, h] H^T`` (exact); Q and K are rotated online before the
KV quantizer (quantization.kv_quant_hooks), which leaves ``q·k`` unchanged.

Online FFN Hadamard: ``W_down <- W_down R^T`` and a pre-hook feeds ``R h`` to the down projection, so
the FFN hidden state is quantized in the rotated basis (R from hadamard.OrthogonalMixer).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from megatron_osp.analysis.hadamard import OrthogonalMixer
from megatron_osp.analysis.model_parts import ModelParts

__all__ = [
    "fold_norm_gains_",
    "rotate_residual_",
    "rotate_value_output_heads_",
    "fold_ffn_hadamard_",
    "ffn_hadamard_hooks",
    "ffn_mixers",
    "residual_rotation",
    "head_rotation",
]


def _weight(module: nn.Module) -> Tensor:
    w = getattr(module, "weight", None)
    if w is None:
        raise ValueError(f"{type(module).__name__} has no weight to rotate (tied embeddings?)")
    return w


def _set(param: Tensor, value: Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


@torch.no_grad()
def _fold_gain_into(gain: Tensor, readers: list[nn.Module]) -> None:
    g = gain.detach().to(torch.float64).reshape(-1)
    for lin in readers:
        w = _weight(lin)
        _set(w, w.to(torch.float64) * g.to(w.device)[None, :])  # (1,) broadcasts for SSNorm


@torch.no_grad()
def fold_norm_gains_(parts: ModelParts) -> None:
    """Move every norm gain into the linears that read the norm, leaving gains of exactly 1."""
    if parts.tied:
        raise ValueError("cannot fold the final norm into tied embedding/output weights: untie them first")
    for lp in parts.layers:
        for norm, readers in ((lp.attn_norm, lp.attn_in), (lp.mlp_norm, lp.mlp_in)):
            if norm is None:  # TE fused: the gain is the reader's layer_norm_weight
                gain = readers[0].layer_norm_weight
            else:
                gain = norm.weight
            _fold_gain_into(gain, readers)
            gain.data.fill_(1.0)
    _fold_gain_into(parts.final_norm.weight, parts.final_readers)
    parts.final_norm.weight.data.fill_(1.0)


def _rotate_readers(modules: list[nn.Module], q: Tensor) -> None:
    for lin in modules:
        w = _weight(lin)
        _set(w, w.to(torch.float64) @ q.to(w.device))


def _rotate_writer(module: nn.Module, q: Tensor) -> None:
    w = _weight(module)
    qd = q.to(w.device)
    _set(w, qd.T @ w.to(torch.float64))
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and bias.numel():
        _set(bias, bias.to(torch.float64) @ qd)  # row-vector bias b -> b Q


@torch.no_grad()
def rotate_residual_(parts: ModelParts, q: Tensor) -> None:
    """Rotate the residual stream by orthogonal ``q`` (d x d), folded into the weights (gains folded first)."""
    d = parts.hidden_size
    if q.shape != (d, d):
        raise ValueError(f"residual rotation must be {d}x{d}, got {tuple(q.shape)}")
    q = q.to(torch.float64)
    if parts.embedding_projection is not None:
        _rotate_writer(parts.embedding_projection, q)
    else:
        emb = _weight(parts.embedding)
        _set(emb, emb.to(torch.float64) @ q.to(emb.device))
    for lp in parts.layers:
        _rotate_readers(lp.attn_in + lp.mlp_in, q)
        _rotate_writer(lp.attn_out, q)
        _rotate_writer(lp.mlp_out, q)
    _rotate_readers(parts.final_readers, q)


@torch.no_grad()
def rotate_value_output_heads_(parts: ModelParts, head: Tensor) -> None:
    """Per-head rotation of V (rows) and of attention-out (columns), exact in float arithmetic."""
    hd = parts.head_dim
    h = head.to(torch.float64)
    for lp in parts.layers:
        for lin, rows in lp.value_rows:
            w = _weight(lin)
            _set(w[rows], h.to(w.device) @ w[rows].to(torch.float64))
        w = _weight(lp.attn_out)
        cols = w.to(torch.float64).reshape(w.shape[0], parts.num_heads, hd)
        _set(w, (cols @ h.to(w.device).T).reshape(w.shape))


@torch.no_grad()
def fold_ffn_hadamard_(parts: ModelParts, mixers: list[OrthogonalMixer]) -> None:
    """``W_down <- W_down R^T`` for each layer (each row ``w`` becomes ``R w``)."""
    for lp, mixer in zip(parts.layers, mixers):
        w = _weight(lp.mlp_out)
        _set(w, mixer.apply(w.to(torch.float64)))


@contextlib.contextmanager
def ffn_hadamard_hooks(parts: ModelParts, mixers: list[OrthogonalMixer]):
    """Feed ``R h`` to each down projection (prepended, so it runs before any input quantizer)."""

    def make(mixer):
        def pre_hook(module, args, kwargs):
            return (mixer.apply(args[0]),) + tuple(args[1:]), kwargs

        return pre_hook

    handles = [
        lp.mlp_out.register_forward_pre_hook(make(m), with_kwargs=True, prepend=True)
        for lp, m in zip(parts.layers, mixers)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ffn_mixers(parts: ModelParts, seed: int = 0) -> list[OrthogonalMixer]:
    """One FFN rotation per layer (same seed for all: QuaRot shares one Hadamard across layers)."""
    ffn = _weight(parts.layers[0].mlp_out).shape[1]
    mixer = OrthogonalMixer(ffn, seed=seed)
    return [mixer] * len(parts.layers)


def residual_rotation(parts: ModelParts, seed: int = 0) -> Tensor:
    """The residual rotation QuaRot uses: a randomised Hadamard (Kronecker-extended for other sizes)."""
    return OrthogonalMixer(parts.hidden_size, seed=seed).matrix()


def head_rotation(parts: ModelParts) -> Tensor:
    """The per-head rotation (a plain Hadamard of the head dimension, extended as needed)."""
    return OrthogonalMixer(parts.head_dim, seed=0, randomize=False).matrix()
