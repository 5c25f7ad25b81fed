"""Stop a run at the first step whose loss or gradient is not finite, before anything is saved.

A NaN or inf loss (a diverged run, a bf16 overflow, a damaged batch) gives NaN gradients, and the
optimizer step then writes NaN into every weight it touches: nothing raises, and every later save
writes a useless checkpoint while ``keep_last`` prunes the good ones. (An fp16 loss scaler skips such
steps itself, reported as ``ok=False``; those are left to it.) So every step is checked right after the
optimizer step and before any save: the run stops with an error naming the step, the loss and the
gradient norm, and the newest checkpoint, which is intact and can be resumed from.

The gradient norm Megatron-Core's optimizer returns is reduced over every rank that holds a piece of
the model, so all ranks see the same value and stop together without a collective. Without gradient
clipping there is no norm (None): the loss (known on the last pipeline stage) decides, through one
all-reduce of a flag over the world.
"""

from __future__ import annotations

import math

from megatron_osp.parallel import any_rank

__all__ = ["NonFiniteStep", "check_step"]


class NonFiniteStep(RuntimeError):
    """A step produced a non-finite loss or gradient norm; the weights are no longer usable."""


def check_step(step: int, ok: bool, loss: float, grad_norm, device, newest_checkpoint) -> None:
    """Raise NonFiniteStep on every rank when step ``step`` (its loss on this rank, NaN where not
    known, i.e. before the last pipeline stage; the optimizer's ``ok`` and ``grad_norm``) was not finite.
    ``newest_checkpoint()``: the directory to resume from, named in the message (None: none saved)."""
    if not ok:  # skipped by the fp16 loss scaler: no update happened
        return
    if grad_norm is not None:
        bad = not math.isfinite(float(grad_norm))
    else:
        bad = any_rank(device, _knows_loss() and not math.isfinite(loss))[0]
    if not bad:
        return
    norm = "not computed (optimizer.clip_grad=0)" if grad_norm is None else f"{float(grad_norm)}"
    newest = newest_checkpoint()
    where = (f"The newest checkpoint, {newest}, is intact: resume from it; if the run diverges "
             "at the same place again, lower the learning rate or lengthen the warmup (train.load=<that "
             "checkpoint> loads it into a run with other settings)" if newest else
             "No checkpoint was saved before it")
    raise NonFiniteStep(f"step {step}: the loss or the gradient is not finite (loss on the last stage: "
                        f"{_loss_text(loss)}, gradient norm: {norm}), so this step's update has made the "
                        f"weights unusable and the run stops without saving. {where}.")


def _knows_loss() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage()


def _loss_text(loss: float) -> str:
    return "not on this rank" if math.isnan(loss) and not _knows_loss() else f"{loss}"
