"""What a Slicer CLI module says when a package DiffusionCore needs is not installed in Slicer's Python yet.

The CT Diffusion modules install DiffusionCore's packages (torch through the PyTorch extension, the rest with pip)
the first time Apply is pressed; a CLI module run before that (from the Slicer module list, or a batch script)
must say so, not print a traceback. Standard library only, and importable where DiffusionCore's own package is:
its ``__init__`` needs only what Slicer ships (numpy, scipy, pydicom).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

T = TypeVar("T")


def slicer_install_hint(module_title: str) -> str:
    """What to do in Slicer: press Apply once in ``module_title``, a module that installs what is missing."""
    return (f"open the {module_title} module and press Apply once: it offers to install what is missing. Then run "
            "this module again")  # fmt: skip


#: What to do outside Slicer (``python -m DiffusionCore``, a script); Windows has no ``make`` and puts the virtual
#: environment's Python in ``Scripts``.
PIP_INSTALL_HINT = ("install DiffusionCore's requirements (in the project folder: .venv\\Scripts\\python -m pip install -e .)"
                    if os.name == "nt" else "install DiffusionCore's requirements (in the project folder: make setup, "
                    "or .venv/bin/python -m pip install -e .)")  # fmt: skip


def missing_package_message(exc: ImportError, hint: str = PIP_INSTALL_HINT) -> str:
    """One line that names the missing package and what to do (``hint``); for DiffusionCore itself, install the
    extension again."""
    missing = exc.name or str(exc)
    if missing.split(".")[0] == "DiffusionCore":
        return f"DiffusionCore is not installed in this Python ({exc}); install the extension again."
    return f"the Python package {missing!r}, which CT Diffusion needs, is not installed here: {hint}."


def needs_packages(load: Callable[[], T], module_title: str) -> T:
    """``load()`` (a Slicer CLI's imports of DiffusionCore and its parser), or one ``error:`` line on stderr and
    exit status 1 when a package it needs is missing (see :func:`missing_package_message`)."""
    try:
        return load()
    except ImportError as exc:
        print(f"error: {missing_package_message(exc, slicer_install_hint(module_title))}", file=sys.stderr)
        raise SystemExit(1) from None


#: The environment variable naming PyTorch's compile cache folder, which torch creates when it is imported
#: (``torchinductor_<user>`` in the temp folder).
TORCH_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"
#: How the compile cache folder of a run's own is named in the temp folder (``tempfile.mkdtemp(prefix=...)``).
TORCH_CACHE_PREFIX = "diffusioncore-torch-"
#: The file in that folder naming the process that owns it, ``PID HOST``: the marker a Slicer job's own temporary
#: folder has too, so that the next job removes the folder of a process that was killed before it could.
OWNER_FILE = ".owner"
#: The exit status of a run stopped by SIGTERM (as ``Cancelled``'s).
SIGTERM_EXIT_STATUS = 130


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises SystemExit(130) after one ``error:`` line instead of killing
    the process at once, so that ``finally`` blocks run: the run's own folders are removed. The run itself installs
    its own handler (``cli.common.sigterm_cancels``, which stops it between steps) once its packages are loaded;
    this one covers the seconds before (importing torch) and after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up that follows is not interrupted again
        print("error: stopped by signal SIGTERM before the run started; no output was written.", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT_STATUS)

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def mark_owner(folder: str | os.PathLike) -> None:
    """Write :data:`OWNER_FILE` (this process, this machine: ``PID HOST``) into ``folder``, the marker by which a later
    Slicer job removes the folder of a process that died (``CTDiffusionSRLib.jobs.remove_stale_job_folders``).

    Raises:
        OSError: it cannot be written.
    """
    with open(os.path.join(folder, OWNER_FILE), "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")


@contextmanager
def own_torch_cache() -> Iterator[str]:
    """While active, PyTorch's compile cache is a folder of this run's own (yielded; ``""`` when the user set one,
    or none can be made), removed at the end. Importing torch makes ``torchinductor_<user>`` in the temp folder,
    which every run of a Slicer CLI module left there, outside the job's folder that the module removes. Nothing is
    compiled, so the folder stays empty but for :data:`OWNER_FILE`. Entered before torch is imported.

    SIGTERM (Slicer's Cancel, pressed while torch is still being imported) is handled before the folder is made, so
    that the folder is removed then too; a process killed outright (SIGKILL) leaves it, marked with its process, for
    the next Slicer job to remove (``CTDiffusionSRLib.jobs.remove_stale_job_folders``)."""
    if os.environ.get(TORCH_CACHE_VARIABLE):
        yield ""
        return
    with _sigterm_exits():
        # named before it is made, so that a SIGTERM arriving just after it is made (before mkdtemp would have
        # returned its name) still finds it in the cleanup below
        folder = os.path.join(tempfile.gettempdir(), TORCH_CACHE_PREFIX + secrets.token_hex(6))
        another = False  # the name is another's folder (48 random bits: practically never): not ours to remove
        try:
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                another = True
                yield ""
                return
            except OSError:  # a full or read-only temp folder: torch's own default then (the run says what is wrong)
                yield ""
                return
            with suppress(OSError):  # unmarked, the folder is only removed by this run
                mark_owner(folder)
            os.environ[TORCH_CACHE_VARIABLE] = folder
            yield folder
        finally:
            os.environ.pop(TORCH_CACHE_VARIABLE, None)
            if not another:
                shutil.rmtree(folder, ignore_errors=True)
