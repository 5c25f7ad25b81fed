"""SIGTERM (cluster preemption) as a flag the training loop polls after every step, agreed on by all ranks."""

from __future__ import annotations

import signal
import threading

from megatron_osp.parallel import any_rank


class SigtermFlag:
    """Records SIGTERM (cluster preemption) so the loop can finish its step, save and stop.

    Ranks may receive the signal at different times, so the flag is agreed on with an all-reduce
    after every step: all ranks stop after the same step.
    """

    def __init__(self):
        self.received = False
        self._previous = None

    @classmethod
    def install(cls) -> "SigtermFlag | None":
        if threading.current_thread() is not threading.main_thread():
            return None  # signal handlers can only be set from the main thread
        flag = cls()
        flag._previous = signal.signal(signal.SIGTERM, flag._handle)
        return flag

    def _handle(self, signum, frame):
        self.received = True

    def uninstall(self):
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

    def any_rank(self, device) -> bool:
        return any_rank(device, self.received)[0]
