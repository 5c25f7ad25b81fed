"""Where a run stands, for job scripts deciding whether to requeue it.

    python -m megatron_osp.training.run_state RUN_DIR                     # one JSON line
    python -m megatron_osp.training.run_state RUN_DIR --checkpoint-step   # the newest checkpoint's step, or none
    python -m megatron_osp.training.run_state RUN_DIR --requeue-since S   # exit 0: requeue; 1: do not (says why)

A run is ``finished`` when its ``summary.json`` (written only at the end of the schedule) records
``train.train_steps`` steps, ``held`` when its newest checkpoint is at or past ``train.exit_at_step``
(it stopped there on purpose), ``interrupted`` when its latest launch was stopped by the user's
interrupt (Ctrl-C, SIGINT: ``<run_dir>/interrupted``, removed by the next launch), else ``unfinished``;
``not started`` before its first clean start wrote ``config.yaml``. The settings are that
``config.yaml``'s: the latest launch's.

``--requeue-since S`` (S: ``--checkpoint-step``'s answer when the job started) says requeue only for an
unfinished run whose newest checkpoint moved past S in this job: a job stopped by its time limit's
SIGTERM or a preemption (which save before exiting), or ended by the hang watchdog after a save, goes
on; a run that got nowhere (a configuration refused, a divergence, a crash at start-up, a hang before
its first save) is not started again to fail the same way, and an interrupted one is not started again
against its user's wish. Nor is a run directory whose lock another process holds (``run_lock``): a second
job of the same run, refused at start-up while the first one saved, would otherwise requeue itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_osp.training import run_lock

__all__ = ["run_state", "requeue_decision", "INTERRUPTED"]

INTERRUPTED = "interrupted"  # in the run directory: its latest launch was stopped by SIGINT (training/stop_signals.py)


def run_state(run_dir: str | Path) -> dict:
    """``{"run_dir", "state", "checkpoint_step", "train_steps", "exit_at_step"}`` (see the module docstring);
    ValueError naming the file when ``config.yaml`` or ``latest`` cannot be read."""
    run_dir = Path(run_dir)
    out = {"run_dir": str(run_dir), "state": "not started", "checkpoint_step": None, "train_steps": None,
           "exit_at_step": None}
    if not (run_dir / "config.yaml").is_file():
        return out
    from megatron_osp.training.checkpoint import CheckpointError, newest_checkpoint
    from megatron_osp.training.config import load_config

    train = load_config(run_dir / "config.yaml", saved=True).train
    save_dir = Path(train.save_dir) if train.save_dir else run_dir / "checkpoints"
    try:
        newest = newest_checkpoint(save_dir) if save_dir.is_dir() else None
    except CheckpointError as e:
        raise ValueError(f"{save_dir}: {e}") from None
    step = int(newest.name.removeprefix("iter_")) if newest is not None else None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and summary.get("steps") == train.train_steps:
        state = "finished"
    elif train.exit_at_step and step is not None and step >= train.exit_at_step:
        state = "held"
    elif (run_dir / INTERRUPTED).exists():
        state = "interrupted"
    else:
        state = "unfinished"
    out.update(state=state, checkpoint_step=step, train_steps=train.train_steps, exit_at_step=train.exit_at_step or None)
    return out


def requeue_decision(state: dict, since: int | None) -> tuple[bool, str]:
    """(requeue?, why) for a job that started with its newest checkpoint at step ``since`` (None: none)."""
    where, step = state["run_dir"], state["checkpoint_step"]
    if state["state"] == "not started":
        return False, f"{where}: the run never started (no config.yaml)"
    if state["state"] == "finished":
        return False, f"{where}: finished ({state['train_steps']} steps)"
    if state["state"] == "held":
        return False, f"{where}: stopped at train.exit_at_step={state['exit_at_step']} (checkpoint of step {step})"
    if state["state"] == "interrupted":
        at = "no checkpoint" if step is None else f"checkpoint of step {step}"
        return False, (f"{where}: stopped by an interrupt (Ctrl-C, SIGINT; {at}): not requeued against its "
                       "user's wish; submit the job again to continue")
    if step is None or (since is not None and step <= since):
        at = "no checkpoint" if step is None else f"the newest checkpoint is still step {step}"
        return False, (f"{where}: unfinished, but {at} as when this job started: a new job would start where this "
                       "one did and likely fail the same way")
    return True, (f"{where}: unfinished at step {step} of {state['train_steps']} "
                  f"(this job started from {'no checkpoint' if since is None else f'step {since}'})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("run_dir")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--checkpoint-step", action="store_true", help="print the newest checkpoint's step, or none")
    what.add_argument("--requeue-since", metavar="STEP", help="exit 0 if the job should be requeued (STEP: "
                      "--checkpoint-step's answer at the job's start, a number or none), else 1; says why on stdout")
    args = p.parse_args(argv)
    since = None
    if args.requeue_since is not None and args.requeue_since != "none":
        try:
            since = int(args.requeue_since)
        except ValueError:
            p.error(f"--requeue-since {args.requeue_since!r}: a step number or none")
    try:
        state = run_state(args.run_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.checkpoint_step:
        print("none" if state["checkpoint_step"] is None else state["checkpoint_step"])
        return 0
    if args.requeue_since is not None:
        requeue, why = requeue_decision(state, since)
        busy = run_lock.holder(args.run_dir)
        if busy is not None:  # this job was refused: the job holding the run decides for it
            requeue, why = False, f"{args.run_dir}: in use by another job ({busy}), which requeues it if need be"
        print(f"{'requeue' if requeue else 'no requeue'}: {why}")
        return 0 if requeue else 1
    print(json.dumps(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
