"""What a run has consumed, across resumed segments, and the no-op rerun of a finished run.

A run may be resumed with another ``train.global_batch_size`` (or ``model.seq_length``), so its
token count is not ``steps x global batch x seq length`` of the last segment. Every metrics.jsonl
line records the samples and tokens consumed so far; a resumed run continues from the last line at
or before its checkpoint and adds the samples consumed after it at the checkpoint's sequence length.

Rerunning a finished run (its checkpoint is at ``train_steps``) trains nothing; it keeps the
summary.json written when the run finished instead of re-evaluating with this command's settings
(an evaluation with another batch size would rewrite it with other numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from megatron_osp.parallel import any_rank


def tokens_at_resume(earlier: list[dict], consumed_samples: int, seq_length_at_checkpoint: int) -> int:
    """Tokens consumed up to a checkpoint that holds ``consumed_samples``.

    ``earlier``: the metrics.jsonl records up to the checkpoint's step (none for a run started from
    another run's checkpoint, or metrics of a version that did not record tokens: then every sample
    counts at the checkpoint's sequence length)."""
    last = next((r for r in reversed(earlier) if "tokens" in r and "consumed_samples" in r), None)
    if last is None:
        return consumed_samples * seq_length_at_checkpoint
    return int(last["tokens"]) + (consumed_samples - int(last["consumed_samples"])) * seq_length_at_checkpoint


def finished_summary(run_dir: Path, step: int, is_writer: bool, device) -> dict | None:
    """The summary.json of a run that already finished at ``step`` (collective), or None when there
    is none to keep (missing, unreadable, or written at another step). The rank that writes
    summaries decides, so every rank takes the same branch."""
    summary = None
    if is_writer:
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None
        if not isinstance(summary, dict) or summary.get("steps") != step:
            summary = None
    if not any_rank(device, summary is not None)[0]:
        return None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, summary)
    return next(s for s in gathered if s is not None)
