"""Stopping the app cleanly on SIGTERM (``docker stop``, systemd, Kubernetes) and SIGINT (Ctrl+C).

Order, all within :data:`STOP_BUDGET_S`:

1. stop taking work: the guard (``webui.guard``) answers 503 to every new write;
2. stop the training process the Admin tab started (SIGINT so it records its run as interrupted,
   then SIGKILL to its process group);
3. stop the device worker after its current unit of work (one refine step): the refine job it was
   running becomes ``interrupted`` and is queued again, so the next start resumes it from its noise
   and does not count it as a crash;
4. close the store, then the web server; exit.

The signal handler only sets an event: the work runs on the main thread, outside the handler.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable

logger = logging.getLogger("diffusion_preview.shutdown")

STOP_BUDGET_S = 9.0  # docker stop's default grace is 10 s
TRAINER_GRACE_S = 3.0
WORKER_GRACE_S = 3.0


class GracefulStop:
    """Catches SIGTERM and SIGINT; :meth:`wait` returns once one arrived."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.requested = threading.Event()
        self.stopping = threading.Event()  # shared with the guard: set once shutdown begins
        self.signal_name: str | None = None
        self.signals = signals

    def install(self) -> "GracefulStop":
        """Install the handlers (main thread only, as Python requires)."""
        for sig in self.signals:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            logger.warning("%s again: already stopping", name)
            return
        self.signal_name = name
        self.requested.set()

    def wait(self) -> str:
        """Block until a stop is requested; returns the signal's name."""
        while not self.requested.wait(0.5):  # a timed wait, so the main thread keeps running handlers
            pass
        return self.signal_name or "stop"

    def shutdown(self, steps: list[tuple[str, Callable[[float], None]]], budget_s: float = STOP_BUDGET_S) -> float:
        """Run ``steps`` (name, fn(seconds left)) in order, each given what is left of ``budget_s``.

        A failing step is logged in one line and the next one still runs. Returns the seconds it took.
        """
        t0 = time.monotonic()
        self.stopping.set()
        logger.info("stopping (%s): no new work is accepted", self.signal_name or "stop requested")
        for name, step in steps:
            left = max(0.5, budget_s - (time.monotonic() - t0))
            try:
                step(left)
            except Exception as exc:  # noqa: BLE001 - keep stopping; the next start recovers the rest
                logger.warning("while stopping, %s failed: %s: %s", name, type(exc).__name__, exc)
        took = time.monotonic() - t0
        logger.info("stopped in %.1f s", took)
        return took
