"""SIGTERM (cluster preemption) and SIGINT (Ctrl-C) as flags the training loop polls after every
step; the loop agrees on them across ranks (``parallel.any_rank``: ranks receive signals at different
times, and all must stop after the same step).

- SIGTERM (``train.save_on_sigterm``): finish the step, save, exit 0; a job script requeues the run.
- The first SIGINT: the same stop (finish the step, save when the run saves), then exit 130. It is
  also recorded in ``<train.run_dir>/interrupted`` (``run_state.INTERRUPTED``), which the next launch
  removes: ``run_state`` calls such a run ``interrupted`` and job scripts do not requeue it (a user
  stopped it; a preemption's SIGTERM still requeues).
- A second interrupt (or a Ctrl-C during a SIGTERM stop) aborts at once: no save, a short message,
  exit 130. "At once" is as soon as the main thread runs Python again (the handler is Python's; a long
  kernel or a collective waiting for a peer finishes first). A save it cuts short is never published
  (``latest`` keeps naming the newest complete checkpoint). Under torchrun, whose workers
  run in sessions of their own, Ctrl-C reaches only torchrun: it forwards the first one as SIGINT and,
  at the second, sends SIGTERM, so a SIGTERM after a SIGINT is a second interrupt too. A SIGINT that
  comes within ``DUPLICATE_S`` of the first under torchrun is taken for the same one delivered twice
  (by torchrun and by a job scheduler that signals every process of the job step, as SLURM's cgroup
  process tracking does for ``scancel --signal=INT``) and is not counted.

A process forked from the trainer (Megatron-Core's checkpoint writers) inherits the handlers: the first
SIGINT leaves it be (the trainer waits for its save), a second one ends it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from megatron_osp.training.run_state import INTERRUPTED

INTERRUPT = "Ctrl-C (SIGINT)"  # the stop reason of an interrupted run
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C
DUPLICATE_S = 1.0


def clear_mark(run_dir: str | os.PathLike) -> None:
    """A new launch of the run: an earlier launch's interrupt no longer holds a job's requeue back."""
    Path(run_dir, INTERRUPTED).unlink(missing_ok=True)


class StopSignals:
    """Records SIGTERM and the first SIGINT so the loop can finish its step, save and stop; aborts the
    process at a second interrupt (see the module docstring)."""

    def __init__(self, run_dir, saves: bool, sigterm: bool):
        self.run_dir = Path(run_dir)
        self.saves = saves
        self.sigterm = False
        self.sigint = False
        self._first_sigint = None
        self._pid = os.getpid()
        self._announces = os.environ.get("RANK", "0") == "0"
        self._forwarded = "TORCHELASTIC_RUN_ID" in os.environ  # a torchrun worker
        self._previous = {}
        self._handled = (signal.SIGINT, signal.SIGTERM) if sigterm else (signal.SIGINT,)

    @classmethod
    def install(cls, run_dir, saves: bool, sigterm: bool = True) -> "StopSignals | None":
        """Handle SIGINT and (``sigterm``) SIGTERM until ``uninstall``; None off the main thread (signal
        handlers can only be set there)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        flags = cls(run_dir, saves, sigterm)
        for signum in flags._handled:
            flags._previous[signum] = signal.signal(signum, flags._handle)
        return flags

    def uninstall(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    # ------------------------------------------------------------------ handlers
    def _handle(self, signum, frame):
        first = self._first_sigint
        if signum == signal.SIGTERM and first is None:
            self.sigterm = True  # a preemption (again: the same stop)
            return
        if signum == signal.SIGINT and first is None and not self.sigterm:
            self._first_sigint = time.monotonic()
            self.sigint = True
            if os.getpid() == self._pid:  # not in a forked writer: its trainer answers
                self._mark()
                self._say("\nCtrl-C: the run stops once this step is done" + (
                    ", after saving a checkpoint" if self.saves else " (train.save=false: nothing is saved)")
                    + "; Ctrl-C again aborts at once without saving\n")
            return
        if signum == signal.SIGINT and first is not None and self._forwarded and time.monotonic() - first < DUPLICATE_S:
            return  # the first interrupt, delivered again
        self._abort()

    def _mark(self):
        try:
            fd = os.open(self.run_dir / INTERRUPTED, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, f"SIGINT to pid {os.getpid()} on {socket.gethostname()} at {time.ctime()}\n".encode())
            finally:
                os.close(fd)
        except OSError as e:  # the stop goes on; only a job script's requeue decision misses it
            self._say(f"could not record the interrupt in {self.run_dir / INTERRUPTED}: {e}\n")

    def _abort(self):
        if os.getpid() == self._pid:
            self._mark()  # also when the first stop was a SIGTERM: a user's interrupt is not requeued
            self._say("\nCtrl-C again: aborted without saving; the newest complete checkpoint is kept as it was "
                      "(a save cut short is never published)\n")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, RuntimeError):  # closed, or in the middle of a write
                pass
        os._exit(EXIT_INTERRUPTED)

    def _say(self, text: str):
        if self._announces:
            try:
                os.write(2, text.encode())  # not print(): a handler may run in the middle of one
            except OSError:
                pass
