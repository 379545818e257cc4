"""The oldest 3D Slicer this extension supports, and the message a user of an older one sees.

Both modules call :func:`check_slicer_version` when Slicer loads them. It needs nothing but the standard
library and, inside Slicer, ``slicer.app``; outside the application (tests, plain Python) it checks nothing.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

#: (major, minor) of the oldest supported Slicer: 5.10 is the first stable release whose Python (3.12)
#: runs DiffusionCore (``requires-python >= 3.11`` in pyproject.toml).
MINIMUM_SLICER_VERSION = (5, 10)
DOWNLOAD_URL = "https://download.slicer.org"

_shown_dialog = False  # one dialog per session, however many modules report the problem


def minimum_version_text() -> str:
    """``"5.10"``."""
    return ".".join(str(v) for v in MINIMUM_SLICER_VERSION)


def unsupported_slicer_message(major: int, minor: int, module_title: str) -> str | None:
    """The message for a Slicer ``major.minor`` older than :data:`MINIMUM_SLICER_VERSION`, else ``None``."""
    if (int(major), int(minor)) >= MINIMUM_SLICER_VERSION:
        return None
    return (
        f"{module_title} needs 3D Slicer {minimum_version_text()} or later; this is Slicer {major}.{minor}. "
        f"The module will not work in this version. Install the current Slicer from {DOWNLOAD_URL}, then "
        "install the CTDiffusion extension again from its Extensions Manager."
    )


def check_slicer_version(module_title: str) -> bool:
    """Inside Slicer: False, with an error in the log and (once the main window is up) a dialog, when this
    Slicer is older than :data:`MINIMUM_SLICER_VERSION`. True otherwise, and outside the application."""
    try:
        import slicer

        app = slicer.app
        major, minor = int(app.majorVersion), int(app.minorVersion)
    except (ImportError, AttributeError):  # not inside the Slicer application: nothing to check
        return True
    message = unsupported_slicer_message(major, minor, module_title)
    if message is None:
        return True
    logger.error(message)
    if not app.commandOptions().noMainWindow:
        app.connect("startupCompleted()", lambda: _show_once(message))
    return False


def _show_once(message: str) -> None:
    global _shown_dialog
    if _shown_dialog:
        return
    _shown_dialog = True
    import slicer

    slicer.util.errorDisplay(message, windowTitle="Slicer version not supported")
