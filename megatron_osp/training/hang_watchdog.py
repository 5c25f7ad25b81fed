"""``train.hang_timeout_minutes``: a rank whose start-up part, step, evaluation, kurtosis measurement
or checkpoint save runs past the limit prints every thread's Python stack and exits, so the job ends
instead of hanging.

A stuck collective (a dead peer, a network fault) blocks every rank silently and the job burns its
allocation. The Trainer re-arms the watchdog at the start of each part of the run
(``arm("step 12")``, ``arm("the evaluation after step 12")``, ...); the part's time, and whatever
follows it until the next re-arm (logging, the ranks' agreement on stopping), must stay under the
limit. When it does not, a watcher thread writes one line naming the part and the setting to
stderr, then ``faulthandler``'s dump of all threads, and ends the process with ``EXIT_CODE``
(``os._exit``: no cleanup, which a hung collective could block; its multiprocessing children are
killed first, or they would outlive it as orphans). A launcher such as torchrun then
stops the other ranks; the job can be requeued and resumes from the newest complete checkpoint.

The start-up (``Trainer.__init__``, once the config's values are checked) is watched the same way,
part by part: "start-up: checking the launch, the data files and the platform", "... finding the
checkpoint to continue from", "... joining the process groups" (the rendezvous and Megatron's
groups), "... opening TensorBoard / W&B", "... building the datasets", "... building the model and
optimizer", "... loading checkpoint <path>", "... writing config.yaml and waiting for every rank". It
runs inside ``watching()``, which closes the watchdog however the start ends: a start that fails
leaves no watcher behind to end a process that goes on (a test, a tool, an interactive session).
``train()`` starts it again.

The watcher is a Python thread, so it needs the GIL. A main thread stuck in C code that holds the
GIL would starve it; ``faulthandler.dump_traceback_later`` (a C thread that needs no GIL) is armed
with it, ``BACKSTOP`` later than the limit, and then prints its own ``Timeout (...)!`` header with the
stacks and exits with code 1.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time

__all__ = ["EXIT_CODE", "HangWatchdog"]

EXIT_CODE = 3  # a hang, told apart from an ordinary failure (1) in the job's exit status


def backstop_seconds(timeout_s: float) -> float:
    """When faulthandler's own timer fires after the watcher should have: one more limit, at most a minute."""
    return timeout_s + min(timeout_s, 60.0)


class HangWatchdog:
    """One per process. ``minutes``: the limit (0 = off: every method does nothing); ``rank``: named
    in the message. ``start()`` before the first ``arm()``, ``close()`` on every way out."""

    def __init__(self, minutes: float, rank: int = 0, stream=None):
        self.minutes, self.rank = minutes, rank
        self.timeout_s = 60.0 * minutes
        self._stream = stream
        self._armed = None  # (deadline, what), replaced as one object: the watcher reads it unlocked
        self._closed = threading.Event()
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if not self.minutes or self.running:
            return
        self._closed.clear()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def arm(self, what: str) -> None:
        """From now, ``what`` (e.g. "step 12") has the limit's time until the next ``arm`` or ``close``."""
        if self._thread is None:
            return
        self._armed = (time.monotonic() + self.timeout_s, what)
        faulthandler.dump_traceback_later(backstop_seconds(self.timeout_s), exit=True, file=self._file())

    @contextlib.contextmanager
    def watching(self):
        """``start()``, then ``close()`` however the block ends (an exception included)."""
        self.start()
        try:
            yield self
        finally:
            self.close()

    def close(self) -> None:
        """Disarm and stop the watcher (idempotent)."""
        if self._thread is None:
            return
        faulthandler.cancel_dump_traceback_later()
        self._armed = None
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _file(self):
        stream = self._stream or sys.stderr
        try:
            stream.fileno()
            return stream
        except (AttributeError, OSError, ValueError):  # a replaced sys.stderr without a descriptor
            return sys.__stderr__

    def _watch(self) -> None:
        while not self._closed.is_set():
            armed = self._armed
            if armed is None:  # started, not yet armed
                self._closed.wait(min(self.timeout_s, 1.0))
                continue
            left = armed[0] - time.monotonic()
            if left <= 0:
                self._fire(armed[1])
            self._closed.wait(left)  # a re-arm moved the deadline on: the loop waits again

    def _fire(self, what: str) -> None:
        faulthandler.cancel_dump_traceback_later()
        out = self._file()
        out.write(
            f"hang watchdog (rank {self.rank}): {what} has not finished after {self.timeout_s:g} s "
            f"(train.hang_timeout_minutes={self.minutes:g}); the Python stacks of this process's threads "
            f"follow, then it exits with code {EXIT_CODE} so the job can be requeued (a rerun resumes from "
            "the newest complete checkpoint, if there is one)\n"
        )
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
        out.flush()
        _kill_children()
        os._exit(EXIT_CODE)


def _kill_children() -> None:
    """SIGKILL this process's multiprocessing children, which ``os._exit`` would leave running as
    orphans: Megatron-Core's checkpoint writer keeps a spawned Manager process for its results queue
    from the first save on, and a background save's forked writer may be running. Kill only, no wait:
    nothing here may block the exit."""
    import multiprocessing

    try:
        children = multiprocessing.active_children()
    except Exception:  # noqa: BLE001  (the exit must happen whatever this finds)
        return
    for child in children:
        try:
            child.kill()
        except Exception:  # noqa: BLE001
            pass
