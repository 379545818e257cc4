"""What a Slicer CLI module says when a package DiffusionCore needs is not installed in Slicer's Python yet.

The CT Diffusion modules install DiffusionCore's packages (torch through the PyTorch extension, the rest with pip)
the first time Apply is pressed; a CLI module run before that (from the Slicer module list, or a batch script)
must say so, not print a traceback. Standard library only, and importable where DiffusionCore's own package is:
its ``__init__`` needs only what Slicer ships (numpy, scipy, pydicom).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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
