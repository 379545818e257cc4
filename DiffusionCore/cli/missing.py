"""What a Slicer CLI module says when a package DiffusionCore needs is not installed in Slicer's Python yet.

The CT Diffusion modules install DiffusionCore's packages (torch through the PyTorch extension, the rest with pip)
the first time Apply is pressed; a CLI module run before that (from the Slicer module list, or a batch script)
must say so, not print a traceback. Standard library only, and importable where DiffusionCore's own package is:
its ``__init__`` needs only what Slicer ships (numpy, scipy, pydicom).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def slicer_install_hint(module_title: str) -> str:
    """What to do in Slicer: press Apply once in ``module_title``, a module that installs what is missing."""
    return (f"open the {module_title} module and press Apply once: it offers to install what is missing. Then run "
            "this module again")  # fmt: skip


#: What to do outside Slicer (``python -m DiffusionCore``, a script).
PIP_INSTALL_HINT = "install DiffusionCore's requirements (in the project folder: make setup, or pip install -e .)"


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


@contextmanager
def own_torch_cache() -> Iterator[str]:
    """While active, PyTorch's compile cache is a folder of this run's own (yielded; ``""`` when the user set one,
    or none can be made), removed at the end. Importing torch makes ``torchinductor_<user>`` in the temp folder,
    which every run of a Slicer CLI module left there, outside the job's folder that the module removes. Nothing is
    compiled, so the folder stays empty. Entered before torch is imported."""
    if os.environ.get(TORCH_CACHE_VARIABLE):
        yield ""
        return
    try:
        folder = tempfile.mkdtemp(prefix="diffusioncore-torch-")
    except OSError:  # a full or read-only temp folder: torch's own default then (the run says what is wrong)
        yield ""
        return
    os.environ[TORCH_CACHE_VARIABLE] = folder
    try:
        yield folder
    finally:
        os.environ.pop(TORCH_CACHE_VARIABLE, None)
        shutil.rmtree(folder, ignore_errors=True)
