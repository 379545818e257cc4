"""Pieces every command shares: progress reporting, device choice, logging."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

ProgressFn = Callable[[int, int, str], None]


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levelname_lower = record.levelname.lower()
        return super().format(record)


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("%(levelname_lower)s: %(message)s"))
    root = logging.getLogger("DiffusionCore")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=("bar", "slicer", "none"),
        default="bar",
        help="progress display: a terminal bar (default), <filter-progress> lines for 3D Slicer, or none",
    )


class Progress:
    """A ``progress(done, total, message)`` callback drawn as a tqdm bar or as Slicer progress lines.

    Slicer's CLI protocol: ``<filter-progress>F</filter-progress>`` with F in [0, 1], and
    ``<filter-comment>text</filter-comment>``, each on its own line of stdout, flushed.
    """

    def __init__(self, style: str = "bar", desc: str = ""):
        self.style = style
        self.desc = desc
        self._bar: tqdm | None = None
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int, message: str = "") -> None:
        with self._lock:
            if self.style == "slicer":
                frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
                if message:
                    print(f"<filter-comment>{message}</filter-comment>", flush=True)
                print(f"<filter-progress>{frac:.4f}</filter-progress>", flush=True)
            elif self.style == "bar":
                if self._bar is None or self._bar.total != total:
                    if self._bar is not None:
                        self._bar.close()
                    self._bar = tqdm(
                        total=total, desc=self.desc, file=sys.stderr, leave=False, dynamic_ncols=True
                    )
                self._bar.n = done
                if message:
                    self._bar.set_postfix_str(message, refresh=False)
                self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch's allocation failures: ``torch.OutOfMemoryError`` (CUDA) and the CPU allocator's
    ``RuntimeError`` ("can't allocate memory"); recognised without importing torch."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def run_guarded(
    fn: Callable[[], int | None], *, debug: bool = False, memory_hint: str = "use smaller patches"
) -> int:
    """Run a command body with the project's error convention.

    Errors of the project's types print one ``error: ...`` line on stderr and return their exit code;
    an interrupt returns 130, out of memory 5, and any other exception (a bug) 1 with a plea to report
    it. ``debug`` re-raises instead, for the traceback. Used by ``python -m DiffusionCore`` and by the
    Slicer scripted CLI modules alike.
    """
    from ..errors import DiffusionCoreError

    try:
        return int(fn() or 0)
    except DiffusionCoreError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; no partial output was kept.", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print(f"error: out of memory: {memory_hint}, or use a machine with more memory.", file=sys.stderr)
        return 5
    except Exception as exc:  # a bug: say so plainly, keep the traceback behind --debug
        if debug:
            raise
        if _is_out_of_memory(exc):
            print(f"error: out of memory: {memory_hint}, or use a machine with more memory.", file=sys.stderr)
            return 5
        print(
            f"error: internal error ({type(exc).__name__}: {exc}). Run again with --debug for the traceback "
            "and report it.",
            file=sys.stderr,
        )
        return 1


def write_return_parameters(path: str, values: dict) -> None:
    """Slicer's return-parameter file (``--returnparameterfile``): one ``name = value`` line per output."""
    if not path:
        return
    with open(path, "w", encoding="utf-8") as f:
        for key, value in values.items():
            f.write(f"{key} = {value}\n")


@contextmanager
def sigterm_cancels(cancel: threading.Event | None = None, what: str = "the run") -> Iterator[None]:
    """While active, SIGTERM (Slicer's Cancel button, ``kill``) sets ``cancel`` and raises Cancelled.

    Outputs are written atomically after the work, so a terminated command leaves no output file. Only
    the main thread can install signal handlers; elsewhere this does nothing.
    """
    from ..errors import Cancelled

    def on_signal(signum, frame):
        if cancel is not None:
            cancel.set()
        raise Cancelled(f"{what} was stopped by signal {signal.Signals(signum).name}; no output was written.")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def add_adapt_arguments(parser: argparse.ArgumentParser) -> None:
    """``--adapt [SECONDS]`` and ``--adapt-steps N``: test-time adaptation of the through-plane predictor."""
    from ..sr.adapt import DEFAULT_ADAPT_SECONDS

    parser.add_argument(
        "--adapt", type=float, nargs="?", const=DEFAULT_ADAPT_SECONDS, default=None, metavar="SECONDS",
        help="first fine-tune a copy of the model for at most SECONDS on pairs made from this scan's own "
        f"in-plane slices (default {DEFAULT_ADAPT_SECONDS:g} s when given without a value); the shipped weights "
        "are not changed",
    )
    parser.add_argument(
        "--adapt-steps", type=int, default=None, metavar="N",
        help="adapt for exactly N steps instead of a time budget (the same output for the same seed)",
    )


def adapt_settings(args: argparse.Namespace):
    """The :class:`~DiffusionCore.sr.adapt.AdaptSettings` that ``--adapt`` / ``--adapt-steps`` ask for, or None.

    Raises:
        ConfigError: a non-finite or negative time, or steps below 1.
    """
    from ..sr.adapt import DEFAULT_ADAPT_SECONDS, AdaptSettings

    seconds, steps = getattr(args, "adapt", None), getattr(args, "adapt_steps", None)
    if seconds is None and steps is None:
        return None
    if seconds is not None and steps is None and seconds == 0:
        return None  # --adapt 0: off
    return AdaptSettings(seconds=DEFAULT_ADAPT_SECONDS if seconds is None else float(seconds), steps=steps)
