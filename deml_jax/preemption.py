"""Preemption: SIGTERM (and optionally SIGINT) sets a flag the training loop polls.

Re-exported by :mod:`deml_jax.checkpoint` (``checkpoint.install_preemption_handler``).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax

log = logging.getLogger(__name__)


class PreemptionFlag:
    """Set by SIGTERM (and optionally SIGINT); the training loop polls it.

    The loop saves a checkpoint and exits cleanly when :meth:`should_stop`
    returns True.  A second SIGINT after the flag is set raises
    ``KeyboardInterrupt`` (so Ctrl-C twice still stops a stuck run).
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, signum: int | None = None) -> None:
        self.signum = signum
        self._event.set()

    def should_stop(self, step: int) -> bool:
        """Flag set locally, or (multi-process) JAX's preemption sync point.

        ``reached_preemption_sync_point`` must be called by every process at
        the same steps; it needs ``jax.distributed.initialize()``.
        """
        if self.is_set():
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return False

    def _handle(self, signum, frame):
        if self.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("received signal %d: will checkpoint and stop", signum)
        self.set(signum)

    def install(self, signums) -> "PreemptionFlag":
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were installed before."""
        while self._previous:
            signum, handler = self._previous.popitem()
            signal.signal(signum, handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.uninstall()


def install_preemption_handler(*, sigint: bool = False) -> PreemptionFlag:
    """Installs SIGTERM (and SIGINT if ``sigint``) handlers that set a flag.

    Must be called from the main thread (Python's rule for signal handlers).
    Call ``flag.uninstall()`` (or use it as a context manager) to restore the
    previous handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_preemption_handler must be called from the "
                           "main thread (Python only runs signal handlers there)")
    signums = [signal.SIGTERM] + ([signal.SIGINT] if sigint else [])
    return PreemptionFlag().install(signums)
