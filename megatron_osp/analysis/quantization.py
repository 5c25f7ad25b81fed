"""Round-to-nearest fake quantization of weights, activations and the KV cache (the paper's W-A-KV).

Fake quantization rounds a tensor to a symmetric integer grid and maps it straight back to floats, so
a float model computes what an integer kernel would (up to accumulation order). For ``b`` bits and one
group ``x`` (a weight row, a token's activations, one head of one token's K or V)::

    qmax  = 2^(b-1) - 1
    scale = max|x| / qmax                  (a group of zeros keeps scale 1: it rounds to itself)
    q(x)  = clamp(round(x / scale), -qmax, qmax) * scale,   so |x - q(x)| <= scale / 2.

Settings are written ``W-A-KV`` bits as in the paper (``4-4-4`` is the headline), each 2..16; 16 bits
means "not quantized". Where each quantizer acts:

- weights: every linear inside the decoder layers, per output channel (optionally in groups of
  ``w_group_size`` input columns); the embedding and the output layer stay in full precision, as in
  QuaRot and the OSP paper's evaluation.
- activations: the input of each of those linears, per token, dynamically (a forward pre-hook).
- KV cache: K and V per token and per head as they would be stored, i.e. K *after* RoPE, since a KV
  cache keeps rotated keys (RoPE depends on the position, which a decoder knows only when it writes
  the key). On Megatron models the hook is on ``core_attention``, which receives post-RoPE K; on HF
  Llama the model's attention function is wrapped for the duration of the setting.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "fake_quant",
    "quant_scale",
    "QuantSetting",
    "parse_setting",
    "parse_settings",
    "weight_fake_quant_",
    "activation_quant_hooks",
    "kv_quant_hooks",
]

FULL_BITS = 16


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits must be an integer >= 2, got {bits!r}")


def _grouped(x: Tensor, group_size: int | None) -> Tensor:
    if group_size is None:
        return x
    if group_size <= 0 or x.shape[-1] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the last dimension ({x.shape[-1]})")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def quant_scale(x: Tensor, bits: int, group_size: int | None = None) -> Tensor:
    """The symmetric RTN scale ``max|x| / (2^(bits-1) - 1)`` of each group of the last dim (keepdim)."""
    _check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    g = _grouped(x, group_size)
    scale = g.abs().amax(dim=-1, keepdim=True).float() / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fake_quant(x: Tensor, bits: int | None, group_size: int | None = None) -> Tensor:
    """Symmetric round-to-nearest quantize-dequantize along the last dim (groups of ``group_size``).

    ``bits`` of None or >= 16 returns ``x`` unchanged. Computed in float32, returned in ``x.dtype``.
    """
    if bits is None or bits >= FULL_BITS:
        return x
    qmax = 2 ** (bits - 1) - 1
    scale = quant_scale(x, bits, group_size)
    g = _grouped(x, group_size).float()
    q = torch.clamp(torch.round(g / scale), -qmax, qmax) * scale
    return q.reshape(x.shape).to(x.dtype)


@dataclass(frozen=True)
class QuantSetting:
    """One evaluation setting: bits for weights, activations, KV cache, plus the optional transforms.

    ``ffn_hadamard``: online Hadamard rotation of the down projection's input ("+FFN Had").
    ``rotate``: QuaRot-style rotation of the residual stream folded into the weights (implies the FFN
    Hadamard and per-head Hadamards on V/O and on Q/K before the KV quantizer, as QuaRot does).
    ``gptq``: GPTQ weight rounding (needs calibration tokens) instead of plain RTN.
    """

    w_bits: int = FULL_BITS
    a_bits: int = FULL_BITS
    kv_bits: int = FULL_BITS
    w_group_size: int | None = None
    ffn_hadamard: bool = False
    rotate: bool = False
    gptq: bool = False

    @property
    def name(self) -> str:
        if self.is_full_precision and not (self.ffn_hadamard or self.rotate):
            return "fp"
        base = f"{self.w_bits}-{self.a_bits}-{self.kv_bits}"
        if self.w_group_size:
            base += f"-g{self.w_group_size}"
        for flag, tag in ((self.rotate, "quarot"), (self.ffn_hadamard and not self.rotate, "had"), (self.gptq, "gptq")):
            if flag:
                base += "+" + tag
        return base

    @property
    def is_full_precision(self) -> bool:
        return min(self.w_bits, self.a_bits, self.kv_bits) >= FULL_BITS

    @property
    def uses_ffn_hadamard(self) -> bool:
        return self.ffn_hadamard or self.rotate


_SETTING = re.compile(r"^(\d+)-(\d+)-(\d+)(?:-g(\d+))?((?:\+(?:had|quarot|gptq))*)$")


def parse_setting(text: str) -> QuantSetting:
    """``"fp"``, ``"4-4-4"``, ``"4-8-8"``, ``"4-4-4-g128"``, ``"4-4-4+had"``, ``"4-4-4+quarot+gptq"``..."""
    text = text.strip().lower()
    if text in ("fp", "fp16", "bf16", "full"):
        return QuantSetting()
    m = _SETTING.match(text)
    if not m:
        raise ValueError(
            f"quantization setting {text!r}: expected 'fp' or W-A-KV bits like '4-4-4', optionally "
            "'-g<group>' and '+had', '+quarot', '+gptq'"
        )
    w, a, kv = (int(m.group(i)) for i in (1, 2, 3))
    for label, bits in (("weight", w), ("activation", a), ("KV", kv)):
        if bits < 2:
            raise ValueError(f"quantization setting {text!r}: {label} bits must be >= 2")
        if bits > FULL_BITS:  # the quantizers round to 2..15 bits; 16 is "not quantized", and so was 33
            raise ValueError(f"quantization setting {text!r}: {label} bits {bits} are outside 2..{FULL_BITS} "
                             f"({FULL_BITS}: not quantized)")
    if m.group(4) is not None and int(m.group(4)) < 1:
        raise ValueError(f"quantization setting {text!r}: the weight group size (-g) must be >= 1")
    named = list(filter(None, m.group(5).split("+")))
    flags = set(named)
    if len(flags) < len(named):
        raise ValueError(f"quantization setting {text!r}: a '+' option is given twice")
    if w >= FULL_BITS and (m.group(4) is not None or "gptq" in flags):  # they only change how weights round
        raise ValueError(f"quantization setting {text!r}: {'-g' if m.group(4) is not None else '+gptq'} needs "
                         f"weights quantized (weight bits below {FULL_BITS})")
    return QuantSetting(
        w_bits=w,
        a_bits=a,
        kv_bits=kv,
        w_group_size=int(m.group(4)) if m.group(4) else None,
        ffn_hadamard="had" in flags,
        rotate="quarot" in flags,
        gptq="gptq" in flags,
    )


def parse_settings(texts, option: str = "--settings") -> list[QuantSetting]:
    """Each of ``texts`` parsed; ValueError when there is none, or when two name the same setting
    ('4-4-4' and '04-4-4', 'fp' and '16-16-16'): a report keys its results by the setting's name."""
    settings = [parse_setting(t) for t in texts if t.strip()]
    if not settings:
        raise ValueError(f"{option}: no setting given")
    names = [s.name for s in settings]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{option}: {', '.join(twice)} given twice ({', '.join(t.strip() for t in texts if t.strip())})")
    return settings


@torch.no_grad()
def weight_fake_quant_(linear: nn.Module, bits: int, group_size: int | None = None) -> None:
    """RTN-quantize ``linear.weight`` in place, per output channel (row), optional input-column groups."""
    if bits >= FULL_BITS:
        return
    w = linear.weight
    w.copy_(fake_quant(w.data, bits, group_size))


# The keyword a linear's input may come by when it is not positional (Megatron's layers: input_).
LINEAR_INPUT_KEYWORDS = ("input_", "input", "hidden_states", "x")


def _quantize_first_arg(bits: int):
    def pre_hook(module, args, kwargs):
        if args:
            return (fake_quant(args[0], bits),) + tuple(args[1:]), kwargs
        for key in LINEAR_INPUT_KEYWORDS:
            if key in kwargs:
                kwargs = dict(kwargs)
                kwargs[key] = fake_quant(kwargs[key], bits)
                return args, kwargs
        raise RuntimeError(f"{type(module).__name__}: cannot find the input to quantize")

    return pre_hook


@contextlib.contextmanager
def activation_quant_hooks(linears: list[nn.Module], bits: int):
    """Per-token dynamic fake quantization of every listed linear's input while the context is open."""
    handles = []
    try:
        if bits < FULL_BITS:
            handles = [m.register_forward_pre_hook(_quantize_first_arg(bits), with_kwargs=True) for m in linears]
        yield
    finally:
        for h in handles:
            h.remove()


def _kv_transform(bits: int, head_rotation: Tensor | None):
    """K/V (last dim = head_dim) -> optionally Hadamard-rotated per head, then fake-quantized per head."""

    def rot(t: Tensor) -> Tensor:
        if head_rotation is None:
            return t
        return (t.float() @ head_rotation.T.to(device=t.device, dtype=torch.float32)).to(t.dtype)

    return lambda q, k, v: (rot(q), fake_quant(rot(k), bits), fake_quant(v, bits))


@contextlib.contextmanager
def kv_quant_hooks(parts, bits: int, head_rotation: Tensor | None = None):
    """Fake-quantize post-RoPE K and V per token and head; ``head_rotation`` (head_dim x head_dim,
    orthogonal) rotates Q and K first, which leaves q.k unchanged (QuaRot's online K Hadamard)."""
    if bits >= FULL_BITS and head_rotation is None:
        yield
        return
    transform = _kv_transform(bits, head_rotation)
    if parts.kind == "megatron":
        def pre_hook(module, args, kwargs):
            if len(args) < 3:
                raise RuntimeError("core_attention was called without positional query, key, value")
            q, k, v = transform(*args[:3])
            return (q, k, v) + tuple(args[3:]), kwargs

        handles = [lp.kv_module.register_forward_pre_hook(pre_hook, with_kwargs=True) for lp in parts.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        return
    with _hf_attention_wrapped(parts, transform):
        yield


@contextlib.contextmanager
def _hf_attention_wrapped(parts, transform):
    """Wrap the HF model's attention function (K arrives post-RoPE, [batch, heads, seq, head_dim])."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    impl = parts.model.config._attn_implementation or "eager"
    original = ALL_ATTENTION_FUNCTIONS.get_interface(impl, modeling_llama.eager_attention_forward)
    targets = {id(lp.kv_module) for lp in parts.layers}

    def wrapped(module, query, key, value, *args, **kwargs):
        if id(module) in targets:
            query, key, value = transform(query, key, value)
        return original(module, query, key, value, *args, **kwargs)

    # The instance's local mapping overrides the library-wide one and is what we restore.
    mapping = ALL_ATTENTION_FUNCTIONS._local_mapping
    had = impl in mapping
    previous = mapping.get(impl)
    mapping[impl] = wrapped
    try:
        yield
    finally:
        if had:
            mapping[impl] = previous
        else:
            del mapping[impl]
