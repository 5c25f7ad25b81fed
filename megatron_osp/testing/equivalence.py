"""How the multi-rank tests compare a training run with the single-process run of the same settings.

Another layout sums the same fp32 numbers in another order, so gradients differ by round-off.
Compared after a few optimizer steps, that is harmless except where the optimizer amplifies it.
AdamW does where |g| is near its eps: its first update, lr * g / (|g| + eps), changes by up to
about lr * dg / eps for a gradient change dg. With the default eps = 1e-8 one element of 12,480 of
an embedding ended 3.9e-5 apart at TP=2 (tests/test_parallel_shapes.py's model with 4 layers and
micro-batch 1, seed 1234), twice the weight tolerance; seeds 1, 2, 3 stayed under 0.05 of it.
Which element lands near |g| = 1e-8 depends on shape, seed and machine, so that tolerance failed by
chance. The tests therefore train with ``adam_eps = 1e-5`` (``SETTINGS``), where the amplification is
at most lr / eps = 300: the same four runs then stay under 0.03 of the tolerance (largest difference
5.4e-7). It weakens nothing: an element with |g| >> eps gets the same sign-like update as before,
a smaller one a step proportional to g, which shows errors in g that a sign hides.
This is for fp32 runs. bf16 gradients carry ~2^-8 relative round-off, which a sign-like update
(small eps) hides and a larger eps passes on: tests/test_megatron_reference.py's bf16 DP=2 case
had 174 of 16,384 embedding elements a bf16 step apart with eps 1e-5, so bf16 comparisons keep
AdamW's default.

Weights, losses and AdamW's and Muon's updates all hardly change when every gradient is scaled
(Adam and Newton-Schulz are scale-invariant, and so is clipping that clips), so a layout that got
gradients 2x too large would pass on them alone. ``assert_same_training`` also compares the
global gradient norm of every step, computed before the optimizer, which such a bug changes.
"""

from __future__ import annotations

import numpy as np
import torch

ADAM_EPS = 1e-5
SETTINGS = [f"optimizer.adam_eps={ADAM_EPS}"]
LOSS_RTOL = 2e-5  # per-step losses and gradient norms
WEIGHT_TOL = dict(rtol=1e-4, atol=2e-5)  # final logical weights


def assert_same_training(ref: dict, got: dict, what: str = "", vocab_rows: bool = False) -> None:
    """``got`` (a multi-rank run: "losses", "grad_norms" per step, logical "weights") equals ``ref``.

    ``vocab_rows``: compare only the rows ``ref`` has of each weight (the vocabulary's padding
    differs by layout).
    """
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=LOSS_RTOL, err_msg=f"{what} losses")
    np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=LOSS_RTOL, err_msg=f"{what} grad norms")
    assert sorted(got["weights"]) == sorted(ref["weights"]), what
    for k, w in ref["weights"].items():
        g = got["weights"][k][: w.shape[0]] if vocab_rows else got["weights"][k]
        torch.testing.assert_close(g, w, **WEIGHT_TOL, msg=lambda m: f"{what} {k}: {m}")


def run_record(trainer) -> dict:
    """The per-step losses (NaN on ranks that do not compute the loss) and gradient norms of a
    trained ``Trainer``."""
    return {"losses": [h["loss"] for h in trainer.history], "grad_norms": [h["grad_norm"] for h in trainer.history]}
