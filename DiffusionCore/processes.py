"""How helper processes are started: without a console window on Windows, in a process group of their own if asked.

On Windows a console program (``PythonSlicer.exe``, ``python.exe``, ``taskkill.exe``) started from a program without
a console (the Slicer GUI) gets a new console window of its own unless it is told not to: an empty black window for
the whole length of a job, and closing it ends the job (Windows sends it CTRL_CLOSE_EVENT). ``CREATE_NO_WINDOW``
runs it without one, as Slicer's ``slicer.util.launchConsoleProcess`` does; its output still comes through the pipes.

Both the engine (the sample-data download client) and the Slicer modules (their jobs, and Cancel's ``taskkill``) start
such processes. The rule is here, in DiffusionCore, because the Slicer modules may import DiffusionCore but
DiffusionCore must not import them.
"""

from __future__ import annotations

import subprocess
from typing import Any

from .files import ON_WINDOWS


def child_process_kwargs(*, own_group: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``subprocess.Popen`` / ``subprocess.run`` that start a helper process without a console
    window on Windows.

    Args:
        own_group: start it in a process group (POSIX: a session) of its own, so that a cancel can reach every
            process it starts (``taskkill /T`` on Windows, ``os.killpg`` elsewhere).

    Returns:
        ``{"creationflags": CREATE_NO_WINDOW [| CREATE_NEW_PROCESS_GROUP]}`` on Windows; elsewhere
        ``{"start_new_session": True}`` with ``own_group``, else nothing.
    """
    if ON_WINDOWS:
        flags = subprocess.CREATE_NO_WINDOW
        if own_group:
            flags |= subprocess.CREATE_NEW_PROCESS_GROUP
        return {"creationflags": flags}
    return {"start_new_session": True} if own_group else {}
