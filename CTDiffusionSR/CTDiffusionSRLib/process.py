"""Run a command-line job in a background process and follow it: progress, log, errors, cancel.

The same protocol as Slicer's CLI modules: ``<filter-progress>F</filter-progress>`` and
``<filter-comment>text</filter-comment>`` lines on stdout; a failing DiffusionCore command prints one
``error: ...`` line on stderr. Cancel kills the whole process tree (the job may start workers), so nothing
keeps computing after the user pressed Cancel.

No Qt: the widget polls :meth:`ProcessRunner.poll` from a timer in the GUI thread, tests call
:meth:`ProcessRunner.wait`.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_PROGRESS = re.compile(r"<filter-progress>\s*([-+0-9.eE]+)\s*</filter-progress>")
_COMMENT = re.compile(r"<filter-comment>(.*)</filter-comment>")
_STAGE_PROGRESS = re.compile(r"<filter-stage-progress>\s*([-+0-9.eE]+)\s*</filter-stage-progress>")
#: Seconds a process gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 5.0


class JobState(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class ProcessResult:
    """What a finished job left behind."""

    state: JobState
    returncode: int | None
    error: str = ""
    log: list[str] = field(default_factory=list)


def python_executable() -> str:
    """The Python that runs jobs: Slicer's ``PythonSlicer`` launcher inside Slicer, else this interpreter."""
    launcher = shutil.which("PythonSlicer")
    return launcher if launcher else sys.executable


def parse_progress_line(line: str) -> tuple[float | None, str | None]:
    """``(fraction, comment)`` found in one line of a Slicer CLI's stdout (either may be None)."""
    frac = None
    m = _PROGRESS.search(line) or _STAGE_PROGRESS.search(line)
    if m:
        try:
            frac = min(1.0, max(0.0, float(m.group(1))))
        except ValueError:
            frac = None
    c = _COMMENT.search(line)
    return frac, (c.group(1).strip() if c else None)


def error_line(lines: Sequence[str]) -> str:
    """The last ``error: ...`` message among ``lines`` (without the prefix), or ``""``."""
    for line in reversed(lines):
        s = line.strip()
        if s.startswith("error:"):
            return s[len("error:") :].strip()
    return ""


class ProcessRunner:
    """One background process with live progress, a log and a tree-killing cancel.

    Args:
        argv: the command, e.g. ``[python_executable(), script, "--input", ...]``.
        on_progress: called with ``(fraction in [0, 1], comment or "")`` from a reader thread.
        on_line: called with every output line (stdout and stderr) from a reader thread.
        env: extra environment variables.
        cwd: working directory.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        on_progress: Callable[[float, str], None] | None = None,
        on_line: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ):
        self.argv = [str(a) for a in argv]
        self.on_progress = on_progress
        self.on_line = on_line
        self.env = env
        self.cwd = cwd
        self.progress = 0.0
        self.comment = ""
        self.log: list[str] = []
        self._stderr: list[str] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._cancelled = False
        #: :meth:`wait` cancelled the job because it ran past its timeout
        self.timed_out = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> ProcessRunner:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.env:
            env.update(self.env)
        # imported here, not with this module: DiffusionCore imports torch, and this module is imported (JobState)
        # before the module's dependencies are installed
        from DiffusionCore.processes import child_process_kwargs

        # own process group: cancel reaches every child; no console window on Windows (closing it would end the job)
        kwargs = child_process_kwargs(own_group=True)
        logger.info("starting: %s", " ".join(self.argv))
        self._proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
        for stream, is_err in ((self._proc.stdout, False), (self._proc.stderr, True)):
            t = threading.Thread(target=self._read, args=(stream, is_err), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _read(self, stream, is_err: bool) -> None:
        for raw in iter(stream.readline, ""):
            line = raw.rstrip("\r\n")
            frac, comment = parse_progress_line(line)
            with self._lock:
                if frac is not None:
                    self.progress = frac
                if comment is not None:
                    self.comment = comment
                if frac is None and comment is None:
                    self.log.append(line)
                    if is_err:
                        self._stderr.append(line)
                elif comment:
                    self.log.append(comment)
            if (frac is not None or comment) and self.on_progress:
                self.on_progress(self.progress, comment or "")
            if self.on_line and frac is None:
                self.on_line(comment if comment is not None else line)
        stream.close()

    def poll(self) -> JobState:
        """The current state, without blocking."""
        if self._proc is None:
            raise RuntimeError("the job was not started")
        code = self._proc.poll()
        if code is None:
            return JobState.RUNNING
        for t in self._threads:  # the process is gone: drain its pipes before reporting
            t.join(timeout=5)
        if self._cancelled:
            return JobState.CANCELLED
        return JobState.COMPLETED if code == 0 else JobState.FAILED

    def wait(self, timeout: float | None = None) -> ProcessResult:
        """Block until the job ends (or ``timeout`` seconds: then it is cancelled)."""
        if self._proc is None:
            raise RuntimeError("the job was not started")
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.cancel()
        return self.result()

    def result(self) -> ProcessResult:
        state = self.poll()
        with self._lock:
            err = error_line(self._stderr) or error_line(self.log)
            code = self._proc.returncode
            if state == JobState.FAILED and not err and code is not None and code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = f"signal {-code}"
                err = (
                    f"the job's process was killed ({name}) before it finished, e.g. by the system when memory "
                    "ran out; nothing was imported. Try fewer stages, smaller patches or the GPU."
                )
            if state == JobState.FAILED and not err:
                tail = [s for s in self._stderr if s.strip()][-3:]
                err = " | ".join(tail) or f"the job exited with code {code}"
            return ProcessResult(state, self._proc.returncode, err, list(self.log))

    def cancel(self) -> None:
        """Stop the job and every process it started (SIGTERM, then SIGKILL after a grace period)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._cancelled = True
        logger.info("cancelling process tree of pid %s", self._proc.pid)
        from DiffusionCore import processes

        if processes.ON_WINDOWS:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._proc.pid)], capture_output=True, check=False,
                           **processes.child_process_kwargs())  # fmt: skip
        else:
            _signal_group(self._proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + TERMINATE_GRACE_S
            while self._proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal_group(self._proc.pid, signal.SIGKILL)  # also reaches children that ignored SIGTERM
        self._proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
