"""Where the training loop's scalars go: TensorBoard and/or Weights & Biases.

The loop calls one ``MetricSinks`` object: ``scalar(tag, value, step)`` (NaN values are skipped) and
``close()``. ``open_sinks`` builds the sinks a RunConfig asks for, on the logging rank only (every
other rank gets an empty ``MetricSinks``):

- ``train.tensorboard=true``: a SummaryWriter in ``<run_dir>/tensorboard``;
- ``train.wandb_project`` set: a W&B run (``wandb.init``) in that project, named ``train.wandb_name``
  (default: the run directory's name), with its files under ``train.wandb_dir`` (default: $WANDB_DIR,
  else the run directory: W&B writes into a ``wandb/`` folder there) and the run config as its config.
  The mode is W&B's own: ``WANDB_MODE=offline`` logs without network (``wandb sync`` uploads later),
  ``WANDB_MODE=disabled`` turns it off.

The W&B run id is kept in ``<run_dir>/wandb_run_id``: a run that continues from its own training
checkpoint (auto-resume after preemption, or the same command again) continues the same W&B run
(``resume="allow"``); a run that starts at step 0 (no checkpoint yet, or only weights) starts a new
one. Steps are the training steps; W&B refuses steps below the ones it already has (a run that went
on past the checkpoint it resumes from), and those are skipped here with one message instead of one
warning per scalar.

A W&B that cannot start (no login, no network in online mode) is a ``SinkStartError`` naming W&B
and WANDB_MODE=offline, raised when the Trainer starts (before data or model are built; on the
other ranks too, which learn of it in one all-reduce), not a traceback in the middle of training. Whether ``wandb`` is importable at all is checked earlier,
with the other settings the machine cannot run (training/platform_checks.py).
"""

from __future__ import annotations

import math
import os
import secrets
import string
from pathlib import Path

import torch.distributed as dist

from megatron_osp.fileio import atomic_write_text
from megatron_osp.parallel import any_rank

RUN_ID_FILE = "wandb_run_id"
_ID_CHARS = string.ascii_lowercase + string.digits


class SinkStartError(RuntimeError):
    """A metric sink the config asks for could not start; the message says which and what to do."""


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run. ``first_step``: the lowest step W&B still takes (its next step on resume)."""

    def __init__(self, run, first_step: int = 0, log=print):
        self.run = run
        self.first_step = first_step
        self.log = log
        self._skipped = False

    def scalar(self, tag: str, value: float, step: int) -> None:
        if step < self.first_step:
            if not self._skipped:
                self._skipped = True
                self.log(f"W&B: the run already has steps up to {self.first_step - 1}; "
                         f"steps before {self.first_step} are not logged to it again")
            return
        self.run.log({tag: value}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MetricSinks:
    """All sinks of this rank (none off the logging rank)."""

    def __init__(self, sinks=()):
        self.sinks = list(sinks)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if math.isnan(value):
            return
        for sink in self.sinks:
            sink.scalar(tag, value, step)

    def close(self, failed: bool = False) -> None:
        """Close every sink once (a second call does nothing)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed)


def wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id of this run: the one in ``run_dir`` when resuming, else a new one (saved)."""
    path = Path(run_dir) / RUN_ID_FILE
    if resume and path.is_file():
        saved = path.read_text().strip()
        if saved:
            return saved
    run_id = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
    atomic_write_text(path, run_id + "\n")
    return run_id


def start_wandb(config, resume: bool, log=print) -> WandbSink:
    """Start (or continue) the run's W&B run; SinkStartError when W&B does not start."""
    import wandb

    t = config.train
    run_dir = Path(t.run_dir)
    wandb_dir = Path(t.wandb_dir or os.environ.get("WANDB_DIR") or run_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run_id = wandb_run_id(run_dir, resume)
    try:
        run = wandb.init(
            project=t.wandb_project,
            entity=t.wandb_entity or None,
            name=t.wandb_name or run_dir.resolve().name,
            dir=str(wandb_dir),
            id=run_id,
            resume="allow",
            config=config.to_dict(),
        )
    except Exception as e:  # wandb's own errors (UsageError, CommError) and what its service raises
        reason = " ".join(str(e).split()).rstrip(".") or type(e).__name__
        raise SinkStartError(
            f"W&B (train.wandb_project={t.wandb_project}) could not start: {reason}. Log in with `wandb login` "
            "(or set WANDB_API_KEY); without network set WANDB_MODE=offline (upload later with `wandb sync`), "
            "or WANDB_MODE=disabled / train.wandb_project=null to run without W&B"
        ) from e
    first_step = 0
    if resume:
        try:
            first_step = int(run.step)  # the next step W&B takes (0 when offline: it knows no history)
        except Exception:  # noqa: BLE001 - e.g. shared mode has no step: W&B's own check applies
            first_step = 0
    return WandbSink(run, first_step, log=log)


def open_sinks(config, logging_rank: bool, resume: bool, log=print, device=None) -> MetricSinks:
    """The sinks ``config`` asks for on the logging rank; an empty MetricSinks elsewhere.

    In a world of several processes (``device``: where this rank's tensors live) every rank learns
    whether the logging rank's sinks started, so all stop together at start, each with one line,
    instead of the others failing later in a collective with a lost peer's traceback."""
    t, sinks, error = config.train, [], None
    if logging_rank:
        try:
            if t.tensorboard:
                sinks.append(TensorBoardSink(Path(t.run_dir) / "tensorboard"))
            if t.wandb_project:
                sinks.append(start_wandb(config, resume, log=log))
        except Exception as e:  # noqa: BLE001 - re-raised below, once every rank knows
            MetricSinks(sinks).close(failed=True)
            error = e
    if device is not None and dist.is_initialized() and dist.get_world_size() > 1:
        if any_rank(device, error is not None)[0] and error is None:
            what = f"W&B (train.wandb_project={t.wandb_project})" if t.wandb_project else "TensorBoard"
            raise SinkStartError(f"{what} could not start on the logging rank; its error says why")
    if error is not None:
        raise error
    return MetricSinks(sinks)
