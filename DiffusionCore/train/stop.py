"""Stopping a training run cleanly: Ctrl+C, ``kill`` (SIGTERM) or a ``STOP`` file.

Inside ``with StopFlag(stop_file=out_dir / "STOP") as stop:`` the first SIGINT or SIGTERM only sets
``stop.requested``; the training loop checks it between steps, writes a checkpoint, exports and returns. A
second signal stops at once (``KeyboardInterrupt``). The Slicer training panel's Stop button creates the STOP
file, which works on every platform and from another process. Signal handlers can only be installed from the
main thread; elsewhere only the STOP file is watched.

A STOP file is a requested stop: the ``train`` command then ends with exit code 0. A signal is not: the
command ends with 130 (after the checkpoint and the export), and :func:`stopped_by_signal` tells it so.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None
)


#: The signal that stopped the last run of this process (see :func:`stopped_by_signal`).
_stopping_signal: str | None = None


def stopped_by_signal() -> str | None:
    """``"SIGTERM"`` or ``"SIGINT"`` when a signal stopped a training loop of this process since the last
    :func:`forget_signals`, else ``None``."""
    return _stopping_signal


def forget_signals() -> None:
    """Reset :func:`stopped_by_signal` (before a run starts)."""
    global _stopping_signal
    _stopping_signal = None


class StopFlag:
    """Context manager that turns stop requests into a flag the training loop polls.

    Args:
        stop_file: a file whose appearance requests a stop (e.g. ``out_dir / "STOP"``); ``None``: signals only.
        install_signals: install SIGINT/SIGTERM handlers (ignored outside the main thread).
    """

    def __init__(self, stop_file: str | os.PathLike | None = None, *, install_signals: bool = True) -> None:
        self.stop_file = Path(stop_file) if stop_file is not None else None
        self.install_signals = install_signals
        self.reason: str | None = None
        self._signal_count = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once a signal arrived or the stop file exists."""
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
            logger.info(
                "stop requested: %s appeared; finishing the step and saving a checkpoint", self.stop_file
            )
        return self.reason is not None

    def request(self, reason: str = "requested") -> None:
        """Ask the loop to stop (e.g. from a cancel button in the same process)."""
        if self.reason is None:
            self.reason = reason

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        global _stopping_signal
        self._signal_count += 1
        name = signal.Signals(signum).name
        _stopping_signal = _stopping_signal or name
        if self._signal_count > 1:
            raise KeyboardInterrupt(f"second {name}: stopping immediately without a checkpoint")
        self.request(name)
        logger.warning(
            "%s received: finishing the step and saving a checkpoint (send it again to abort)", name
        )

    def __enter__(self) -> StopFlag:
        if self.install_signals and threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def clear_stop_file(self) -> None:
        """Remove a stale stop file (call before training starts, so an old STOP does not end a new run)."""
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
