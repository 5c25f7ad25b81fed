"""Perplexity of a model at full precision and under each quantization setting, on held-out tokens.

Held-out text is a Megatron ``.bin/.idx`` prefix, or a sharded output's (its shards, the fraction range
taken per shard as training splits them: data/document_view.py); its documents (optionally a fraction
range, e.g. a run's validation split) are concatenated and cut into non-overlapping windows of
``seq_length + 1`` tokens. Each window is one sequence: inputs its first ``seq_length`` tokens, labels the next ones, so
every token after a window's first is predicted once. Perplexity is ``exp(Σ NLL / #tokens)`` with
the sum in float64.

A setting is applied to the model in place and undone afterwards (parameters restored from a
snapshot, hooks removed), so one loaded model serves every setting; see ``apply_setting`` for order.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_osp.analysis import rotation
from megatron_osp.analysis.gptq import gptq_quantize_model_, iterate_batches
from megatron_osp.analysis.model_parts import ModelParts, logits, model_parts
from megatron_osp.analysis.quantization import (
    QuantSetting,
    activation_quant_hooks,
    kv_quant_hooks,
    weight_fake_quant_,
)

__all__ = [
    "parse_document_range",
    "load_token_windows",
    "perplexity",
    "apply_setting",
    "evaluate_settings",
    "check_settings",
    "check_token_ids",
    "check_window_count",
    "PerplexityResult",
]


def parse_document_range(text: str | None) -> tuple[float, float]:
    """``"0.95:1"`` -> (0.95, 1.0): a fraction range of the documents (None = all)."""
    if text is None:
        return 0.0, 1.0
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"document range {text!r}: expected LO:HI fractions like 0.95:1") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"document range {text!r}: need 0 <= LO < HI <= 1")
    return lo, hi


SELECTIONS = ("spread", "first")


def load_token_windows(
    prefix: str,
    seq_length: int,
    num_windows: int | None = None,
    documents: tuple[float, float] = (0.0, 1.0),
    selection: str = "spread",
) -> Tensor:
    """``[n, seq_length + 1]`` int64 windows from the documents ``[round(lo·D), round(hi·D))`` of ``prefix``.

    Document bounds round like the training split (data.gpt_dataset), so ``documents`` taken from a
    run's split selects exactly its validation documents. A sharded output's prefix is read as its
    shards, the range taken of each shard as training splits each (data/document_view.py), their
    documents concatenated shard after shard. The documents, concatenated, hold ``W`` whole windows;
    ``num_windows`` (None: all) of fewer than ``W`` are, with ``selection`` "spread", the windows
    ``floor((2i + 1)·W / 2n)``, evenly spaced over all of them (every shard, every source of a corpus whose
    files were preprocessed in order), and with "first" the first ``n`` (the earlier behaviour: the
    start of the first shard's documents only).
    """
    from megatron_osp.data.document_view import DocumentView

    if selection not in SELECTIONS:
        raise ValueError(f"window selection {selection!r}: expected one of {', '.join(SELECTIONS)}")
    view = DocumentView(prefix)
    window = seq_length + 1
    tokens = int(view.lengths(documents).sum(dtype=np.int64))
    have = tokens // window
    n = have if num_windows is None else min(have, num_windows)
    if n == 0:
        if view.sharded:
            where = view.describe(documents)
        else:
            [docs] = view.ranges(documents)
            where = f"{prefix}: documents {docs.start}..{docs.stop - 1}"
        raise ValueError(f"{where} hold {tokens} tokens, fewer than one window of {window} (seq_length + 1)")
    picks = np.arange(n, dtype=np.int64)  # spread over all W = have: floor((2i + 1)·W / 2n), i itself when n = W
    if selection == "spread":
        picks = (2 * picks + 1) * have // (2 * n)
    return torch.from_numpy(view.windows(documents, window, picks))


def check_window_count(prefix: str, seq_length: int, num_windows: int, documents: tuple[float, float],
                       option: str) -> None:
    """ValueError naming ``option`` when the documents hold fewer than ``num_windows`` windows of
    ``seq_length + 1`` tokens (``load_token_windows`` would return fewer); reads only the index (the
    indices of a sharded output's shards)."""
    from megatron_osp.data.document_view import DocumentView

    view = DocumentView(prefix)
    have = int(view.lengths(documents).sum(dtype=np.int64)) // (seq_length + 1)
    if have < num_windows:
        raise ValueError(f"{option} {num_windows}: {view.describe(documents)} hold only {have} windows "
                         f"of {seq_length + 1} tokens (seq_length + 1); ask for at most {have} or give more data")


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per token (nats)
    tokens: int


@torch.no_grad()
def perplexity(
    model: nn.Module | ModelParts,
    windows: Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """``exp(mean NLL)`` of the model on the windows (float64 sum of per-token cross-entropy)."""
    parts = model_parts(model)
    parts.model.eval()
    if device is None:
        device = next(parts.model.parameters()).device
    vocab = None
    total, count = 0.0, 0
    for batch in iterate_batches(windows, batch_size):
        batch = batch.to(device)
        out = logits(parts, batch[:, :-1])
        vocab = out.shape[-1]
        labels = batch[:, 1:]
        if int(labels.max()) >= vocab:
            raise ValueError(f"token id {int(labels.max())} is outside the model's vocabulary of {vocab}")
        nll = F.cross_entropy(out.reshape(-1, vocab).float(), labels.reshape(-1), reduction="sum")
        total += float(nll.double())
        count += labels.numel()
        if progress is not None:
            progress(batch.shape[0])
    mean = total / count
    return PerplexityResult(perplexity=math.exp(mean) if mean < 700 else float("inf"), nll=mean, tokens=count)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@torch.no_grad()
def _restore(module: nn.Module, snap: dict[str, Tensor]) -> None:
    for name, p in module.named_parameters():
        p.data.copy_(snap[name])


@contextlib.contextmanager
def apply_setting(
    model: nn.Module | ModelParts,
    setting: QuantSetting,
    calibration: Tensor | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
):
    """Apply ``setting`` to the model in place for the duration of the context, then undo it.

    Order: (1) QuaRot (``rotate``): fold norm gains, rotate the residual stream, rotate V/O per head;
    (2) FFN Hadamard (``+had`` or QuaRot): fold ``R^T`` into each down projection and hook ``R`` onto
    its input; (3) weights: GPTQ on ``calibration`` windows (run through the rotated model with
    full-precision activations) or RTN; (4) activation and KV-cache quantizer hooks (the KV hook also
    rotates Q and K per head under QuaRot).
    """
    parts = model_parts(model)
    check_settings(parts, [setting])  # the one statement of what a setting needs of the model
    snap = _snapshot(parts.model)
    with contextlib.ExitStack() as stack:
        try:
            if setting.rotate:
                rotation.fold_norm_gains_(parts)
                rotation.rotate_residual_(parts, rotation.residual_rotation(parts, seed))
                rotation.rotate_value_output_heads_(parts, rotation.head_rotation(parts))
            if setting.uses_ffn_hadamard:
                mixers = rotation.ffn_mixers(parts, seed)
                rotation.fold_ffn_hadamard_(parts, mixers)
                stack.enter_context(rotation.ffn_hadamard_hooks(parts, mixers))
            if setting.gptq and setting.w_bits < 16:
                if calibration is None:
                    raise ValueError(f"setting {setting.name} uses GPTQ but no calibration windows were given")
                device = next(parts.model.parameters()).device
                gptq_quantize_model_(
                    parts,
                    [b[:, :-1].to(device) for b in iterate_batches(calibration, batch_size)],
                    lambda batch: logits(parts, batch),
                    setting.w_bits,
                    setting.w_group_size,
                    progress=progress,
                )
            else:
                for _, lin in parts.named_linears():
                    weight_fake_quant_(lin, setting.w_bits, setting.w_group_size)
            stack.enter_context(activation_quant_hooks([m for _, m in parts.named_linears()], setting.a_bits))
            head = rotation.head_rotation(parts) if setting.rotate else None
            stack.enter_context(kv_quant_hooks(parts, setting.kv_bits, head_rotation=head))
            yield parts
        finally:
            stack.close()
            _restore(parts.model, snap)


def check_token_ids(model: nn.Module | ModelParts, windows: Tensor | None, what: str) -> None:
    """ValueError when ``windows`` hold a token id outside the model's vocabulary (data tokenized by
    another tokenizer): the embedding lookup would otherwise fail with a bare IndexError, or, for a
    Megatron model's padding rows, read rows no token was trained on."""
    if windows is None or windows.numel() == 0:
        return
    parts = model_parts(model)
    vocab = parts.vocab_size or parts.embedding.weight.shape[0]
    top = int(windows.max())
    if top >= vocab or int(windows.min()) < 0:
        bad = top if top >= vocab else int(windows.min())
        raise ValueError(f"{what}: token id {bad} is outside the model's vocabulary of {vocab} (tokenized with "
                         "another model's tokenizer?)")


def check_settings(model: nn.Module | ModelParts, settings: Iterable[QuantSetting], what: str = "the model") -> None:
    """ValueError naming every setting ``apply_setting`` would refuse on this model, so that it is
    refused before any setting is evaluated rather than after the ones before it (whose results a
    failing run never writes): a weight group size that does not divide a quantized linear's input
    width, QuaRot on tied embeddings, input hooks on fused norms."""
    parts = model_parts(model)
    problems = []
    for s in settings:
        if s.w_group_size and s.w_bits < 16:
            for name, lin in parts.named_linears():
                width = lin.weight.shape[1]
                if width % s.w_group_size:
                    problems.append(f"setting {s.name}: weight group size {s.w_group_size} does not divide the "
                                    f"{width} input columns of {name}")
                    break
        if s.rotate and parts.tied:
            problems.append(f"setting {s.name}: QuaRot folds the final norm into the output layer, but "
                            f"{what} ties it to the embedding")
        if s.a_bits < 16 or (s.gptq and s.w_bits < 16):
            try:
                parts.require_unfused_norms(f"setting {s.name} (it hooks the linears' inputs)")
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def evaluate_settings(
    model: nn.Module | ModelParts,
    windows: Tensor,
    settings: Iterable[QuantSetting],
    batch_size: int = 8,
    calibration: Tensor | None = None,
    on_done: Callable[[QuantSetting, PerplexityResult], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, PerplexityResult]:
    """Perplexity of the model under each setting (``fp`` = unchanged), by setting name."""
    parts = model_parts(model)
    results = {}
    for setting in settings:
        with apply_setting(parts, setting, calibration=calibration, batch_size=batch_size):
            res = perplexity(parts, windows, batch_size, progress=progress)
        results[setting.name] = res
        if on_done is not None:
            on_done(setting, res)
    return results
