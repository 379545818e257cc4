"""The output folder of a training run: one run at a time, and a previous run is never replaced silently.

Every ``train`` family claims its folder the same way (the ``train`` command does it, see
``DiffusionCore.cli.train``)::

    with claim_output_dir(out_dir, resume=args.resume, overwrite=args.overwrite):
        train(...)

* **One run per folder.** ``OUT/train.lock`` is created atomically (``O_CREAT | O_EXCL``) and holds the
  process id, host and start time of the run. A second run on the folder refuses (``OutputError``, exit code
  4) while the first one lives. A lock whose process is gone (killed with SIGKILL, a crash, a reboot) is
  taken over with a warning. The lock is removed when the run ends, however it ends (but ``kill -9``); a
  folder the claim created is removed again if the run left it empty (refused before it began).
* **A previous run is kept unless asked.** A folder holding checkpoints, exported weights (``*.safetensors``)
  or training logs (``metrics.jsonl``, ``tensorboard/``: a run killed before its first checkpoint) is refused
  without ``--resume`` (continue it) or ``--overwrite`` (replace it); one holding only logs has no checkpoint to
  continue, and its refusal (and ``--resume``'s, :func:`~.checkpoint.nothing_to_resume`) names ``--overwrite``
  only. With ``--overwrite`` the previous run's checkpoints and logs are moved into a hidden folder that the new
  run's first checkpoint deletes (until then they can be recovered), so old and new checkpoints and loss curves
  never mix; its exported weights are replaced when the new run exports (they may be the new run's
  ``--init-from``). ``--init-from`` reads another folder's weights into a new folder: nothing to refuse.
* A ``STOP`` file left by an earlier run (older than this process) is removed: it would end the new run at
  once. One created since this process started (the Slicer panel's Stop pressed while the run starts up) is
  kept, and ends the run at its first step. The ``STOP`` in the folder when a run that held it ends (the one it
  stopped at, or one that came too late) is removed then, so that a ``--resume`` started at once trains.

Under ``torchrun`` only rank 0 (``is_main``) takes the lock and changes the folder; every rank checks it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OutputError
from ..files import pid_running
from .checkpoint import _TRASH_PREFIX, has_checkpoint, only_logs, previous_run

logger = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
STOP_FILE = "STOP"


# ---------------------------------------------------------------------------------------------- processes
def _start_time(pid: int) -> str | None:
    """When process ``pid`` started, as text that with the pid names one process even after the pid is reused: its
    start in clock ticks since boot (Linux ``/proc``) or its creation time in 100 ns since 1601 (Windows
    ``GetProcessTimes``); None where it cannot be asked (macOS, a process gone or not ours to ask)."""
    if sys.platform == "win32":
        created = _windows_creation_time(pid)
        return None if created is None else str(created)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


#: Seconds from 1601-01-01 (Windows file times) to 1970-01-01 (``time.time()``).
_WINDOWS_EPOCH_OFFSET_S = 11644473600.0


def _windows_creation_time(pid: int) -> int | None:
    """The creation time of process ``pid`` in 100 ns since 1601 (``OpenProcess`` + ``GetProcessTimes``), or None
    when it cannot be asked (no such process, access denied, not Windows)."""
    try:
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, int(pid))  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return None
        try:
            times = [ctypes.c_ulonglong() for _ in range(4)]  # creation, exit, kernel, user
            if not kernel32.GetProcessTimes(handle, *(ctypes.byref(t) for t in times)):
                return None
            return times[0].value
        finally:
            kernel32.CloseHandle(handle)
    except (AttributeError, OSError):  # no ctypes.windll: not Windows
        return None


def process_start_time() -> float:
    """When this process started, in seconds since the epoch (``time.time()``'s clock): from ``/proc`` on Linux,
    ``GetProcessTimes`` on Windows, else the time this module was imported (after the interpreter and before torch's
    import, which takes the longest of a run's start-up)."""
    if sys.platform == "win32":
        created = _windows_creation_time(os.getpid())
        return created / 1e7 - _WINDOWS_EPOCH_OFFSET_S if created is not None else _IMPORTED_AT
    ticks = _start_time(os.getpid())
    if ticks is not None:
        try:
            boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                        if line.startswith("btime "))  # fmt: skip
            return boot + int(ticks) / os.sysconf("SC_CLK_TCK")
        except (OSError, StopIteration, ValueError):
            pass
    return _IMPORTED_AT


_IMPORTED_AT = time.time()
#: When a run of this process last released a folder (resolved path -> ``time.time()``): a STOP older than that
#: belongs to that run, not to the next one in the same process (the Python API, tests).
_RELEASED_AT: dict[str, float] = {}


def remove_stale_stop(out_dir: str | os.PathLike) -> None:
    """Remove a ``STOP`` file that an earlier run left in ``out_dir`` (it would end this run at once), but keep one
    created since this process started (and since a run of this process last used the folder): a stop requested
    while the run starts up. The Slicer panel removes a stale one before it starts the run; its Stop button then
    creates a new one, which may come while the run still imports torch."""
    out = Path(out_dir)
    stop_file = out / STOP_FILE
    try:
        created = stop_file.stat().st_mtime
    except FileNotFoundError:
        return
    # /proc's boot time has whole seconds, and file times come from a coarser clock than time.time(): keep what may
    # be new rather than lose a Stop
    since = max(process_start_time() - 1.0, _RELEASED_AT.get(str(out.resolve()), 0.0) - 0.1)
    if created >= since:  # as the run starts, or while it starts up (the Slicer panel's Stop): it ends the run
        logger.info("%s is there as this run starts (created %.0f s before the process started, or since): the run "
                    "stops before its first step", stop_file, max(0.0, process_start_time() - created))  # fmt: skip
        return
    stop_file.unlink(missing_ok=True)
    logger.warning("removed %s, left from before this run (a STOP file ends a run at its next step)", stop_file)


def _pid_alive(pid: int) -> bool:
    """Whether the process ``pid`` of a lock still runs (:func:`~DiffusionCore.files.pid_running`: on Windows asked
    of its exit code; one that cannot be told counts as running, so the lock is kept)."""
    return pid > 0 and pid_running(pid)


def _holder_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the process recorded in a lock still runs; None when it cannot be told: another host, or a process of
    that pid runs but its start time cannot be compared with the lock's (macOS; a lock without one), so it may be
    another process that took the pid of a run that crashed (Windows reuses pids quickly)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    if not _pid_alive(pid):
        return False
    started = holder.get("started")
    now = _start_time(pid) if started is not None else None
    if now is None:
        return None
    return now == started  # a reused pid is another process


# ---------------------------------------------------------------------------------------------- the lock
class _Lock:
    """An exclusive claim on a folder: the lock file ``path``, created atomically, holding the process id, host, start
    time and a token; a dead holder's lock (same host, process gone) is taken over. The batch commands claim their
    output folder with a subclass that says its own refusal (:mod:`DiffusionCore.cli.batch`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.token = secrets.token_hex(8)

    def _content(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid), "token": self.token,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv}  # fmt: skip

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._content(), f)
            f.write("\n")
        return True

    def _read(self) -> tuple[str, dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return "", {}
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:  # a lock being written this instant, or garbage
            holder = {}
        return text, holder if isinstance(holder, dict) else {}

    def acquire(self) -> None:
        out = self.path.parent
        for _ in range(20):
            if self._create():
                return
            text, holder = self._read()
            if not text:  # released meanwhile, or its holder is writing it this instant: look again
                time.sleep(0.05)
                continue
            alive = _holder_alive(holder) if holder else True
            if alive is False:
                logger.warning("taking over the lock %s of process %s, which no longer runs (killed or crashed); %s",
                               self.path, holder.get("pid"), self.after_dead_holder())  # fmt: skip
                if self._read()[0] == text:  # still the same dead holder's lock
                    self.path.unlink(missing_ok=True)
                continue
            where = f"process {holder.get('pid', '?')}" + (
                f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
            )
            tail = (
                f"; if that run is over (it crashed, or the machine was restarted), delete the lock file {self.path}"
                if alive is None or not holder
                else ""
            )
            raise self.in_use_error(where, tail)
        raise OutputError(f"could not take the lock {self.path}: it stays empty or keeps changing; if no run uses "
                          f"{out}, delete the lock file and start again")  # fmt: skip

    # what a lock of another kind of run says (``cli.batch`` claims a batch's output folder with a subclass)
    def after_dead_holder(self) -> str:
        """What the warning on taking over a dead process's lock adds: what is left of its run."""
        return ("its last checkpoint can be continued with --resume" if has_checkpoint(self.path.parent) else
                "it stopped before its first checkpoint, so there is nothing to continue")  # fmt: skip

    def in_use_error(self, where: str, tail: str) -> OutputError:
        """The refusal while the lock's holder (``where``: ``process PID [on HOST]``) lives; ``tail``: what to do when
        its liveness cannot be told."""
        out = self.path.parent
        return OutputError(
            f"{out} is in use by another training run ({where}, lock file {self.path}): wait for it to end, "
            f"stop it (create {out / STOP_FILE}), or choose another --out-dir{tail}"
        )

    def release(self) -> None:
        _, holder = self._read()
        if holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- the claim
def _set_previous_checkpoints_aside(out: Path) -> None:
    """Move the previous run's checkpoints (and latest/best) and its logs (``metrics.jsonl``, ``tensorboard/``) into
    one hidden folder, deleted by the first checkpoint of the new run (``save_training_state`` removes stale
    ``.trash-checkpoint-*`` folders): the new run's loss curves start clean."""
    names = [n for n in previous_run(out) if not n.endswith(".safetensors")]
    if not names:
        return
    aside = out / f"{_TRASH_PREFIX}overwritten-{os.getpid()}-{time.monotonic_ns()}"
    aside.mkdir()
    moved: list[str] = []
    try:
        for name in names:
            os.replace(out / name, aside / name)
            moved.append(name)
    except OSError as exc:  # Windows: a file in it open in another program; the run has not begun
        for name in reversed(moved):  # the previous run as it was, not half set aside
            with contextlib.suppress(OSError):
                os.replace(aside / name, out / name)
        with contextlib.suppress(OSError):
            aside.rmdir()
        raise OutputError(
            f"--overwrite could not set the previous run's {names[len(moved)]} in {out} aside ({exc.strerror or exc}): "
            "a file in it is open in another program (an sr run or Slicer job using its weights, TensorBoard, "
            "Explorer's preview, an antivirus scan). Close that program and run again; nothing was changed"
        ) from exc
    logger.warning(
        "--overwrite: the previous run's checkpoints and logs (%s) are replaced by this run's", ", ".join(names)
    )


def acquire_folder_lock(lock: Any, folder: str | os.PathLike, instead: str) -> None:
    """Take ``lock`` (a training run's or a batch's) on ``folder``: held by another live process it says so (an
    OutputError of its own); a folder the system refuses is an OutputError that names it and ``instead``."""
    try:
        lock.acquire()
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write into the output folder {folder}: {exc.strerror or exc}; choose {instead}"
                          ) from exc  # fmt: skip


@contextmanager
def claim_output_dir(
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    is_main: bool = True,
    reads: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Hold ``out_dir`` for one training run (see the module docstring).

    Args:
        out_dir: the run's output folder (created if needed).
        resume: the run continues the run in the folder (``--resume``).
        overwrite: the run replaces the run in the folder (``--overwrite``).
        is_main: rank 0 of a ``torchrun`` job (or a single process): takes the lock and prepares the folder.
        reads: folders or files the run starts from (``--init-from``, ...): with ``overwrite``, one that is the
            output folder or a checkpoint in it is refused, since its checkpoints are set aside.

    Yields:
        The folder.

    Raises:
        ConfigError: ``resume`` and ``overwrite`` together.
        OutputError: the folder cannot be created or written, another run holds it, or it holds a previous
            run and neither ``resume`` nor ``overwrite`` was given (exit code 4).
    """
    out = Path(out_dir)
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the run in the folder and --overwrite replaces it: give one of them"
        )
    if overwrite:
        for source in reads:
            src = Path(source).resolve()
            if src.is_dir() and (src == out.resolve() or out.resolve() in src.parents):
                raise OutputError(
                    f"--overwrite sets aside the checkpoints in {out}, and the run would start from {source}: "
                    "give that run's exported weights file instead, or train into another --out-dir"
                )
    lock = _Lock(out / LOCK_FILE)
    created = is_main and not out.exists()
    held = False  # the run got the folder (past the lock and the checks)
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {out}: {exc.strerror or exc}; choose another --out-dir") from exc  # fmt: skip
    try:
        if is_main:
            acquire_folder_lock(lock, out, "a writable --out-dir")
        found = previous_run(out)
        if found and not resume:
            if not overwrite:
                shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
                if only_logs(found):  # --resume would say there is no checkpoint: offer only the way out
                    raise OutputError(
                        f"{out} already holds a training run ({shown}) that stopped before its first checkpoint: "
                        "nothing to resume; pass --overwrite to start it again (or choose another --out-dir)"
                    )
                raise OutputError(
                    f"{out} already holds a training run ({shown}): pass --resume to continue it, --overwrite to "
                    "replace it with a new run, or choose another --out-dir (--init-from WEIGHTS starts a new run "
                    "from a previous run's weights in a new folder)"
                )
            if is_main:
                _set_previous_checkpoints_aside(out)
        if is_main:
            remove_stale_stop(out)
        held = is_main
        yield out
    finally:
        if held:  # a STOP there now was meant for this run, which ends: left, it would end the next run at once
            with contextlib.suppress(OSError):
                (out / STOP_FILE).unlink(missing_ok=True)
        if is_main:
            lock.release()
            _RELEASED_AT[str(out.resolve())] = time.time()
        if created:  # a run refused before it wrote anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
