"""DiffusionCore's version, in a module that imports nothing but the standard library: what reports, provenance and
DICOM headers record.

The version number alone does not say which code made a result (it changes with releases, not with every commit), so
:func:`source_commit` adds the git commit of a source checkout.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

__version__ = "0.1.0"

_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _git_dir(root: Path) -> Path | None:
    """The git directory of a checkout whose top is ``root``: ``root/.git``, or the folder a ``.git`` file points
    to (a worktree or a submodule)."""
    dot_git = root / ".git"
    if dot_git.is_dir():
        return dot_git
    text = _read(dot_git) if dot_git.is_file() else ""
    if text.startswith("gitdir:"):
        target = Path(text[len("gitdir:"):].strip())
        target = target if target.is_absolute() else root / target
        return target if target.is_dir() else None
    return None


def commit_of_checkout(root: str | Path) -> str:
    """The commit checked out at ``root`` (the folder holding ``.git``), read from ``HEAD`` and the ref it names
    (a loose ref file or ``packed-refs``) without running git; ``""`` when ``root`` is no git checkout or the commit
    cannot be read."""
    git = _git_dir(Path(root))
    if git is None:
        return ""
    head = _read(git / "HEAD")
    if _SHA.match(head):  # a detached HEAD holds the commit itself
        return head
    if not head.startswith("ref:"):
        return ""
    ref = head[len("ref:"):].strip()
    common = git
    pointer = _read(git / "commondir")  # a worktree keeps its branches in the main git directory
    if pointer:
        common = (git / pointer).resolve()
    for folder in dict.fromkeys((git, common)):
        value = _read(folder / ref)
        if _SHA.match(value):
            return value
    for folder in dict.fromkeys((git, common)):
        for line in _read(folder / "packed-refs").splitlines():
            sha, _, name = line.partition(" ")
            if name.strip() == ref and _SHA.match(sha):
                return sha
    return ""


@functools.lru_cache(maxsize=1)
def source_commit() -> str:
    """The git commit of the DiffusionCore source when it runs from a git checkout (the package folder sits at the
    top of the checkout, beside ``.git``); ``""`` for an installed copy (a wheel, the 3D Slicer extension), whose
    version number is all there is."""
    return commit_of_checkout(Path(__file__).resolve().parent.parent)
