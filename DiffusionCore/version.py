"""DiffusionCore's version, in a module that imports nothing but the standard library: what reports, provenance and
DICOM headers record.

The version number alone does not say which code made a result (it changes with releases, not with every commit), so
:func:`source_commit` adds the git commit of a source checkout, and :func:`source_modified` says when the code that
ran differs from that commit (files edited and not committed).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

__version__ = "0.1.0"

_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")

#: The folders of a checkout whose code makes results; edits elsewhere (docs, tests, benchmarks) do not change them.
CODE_FOLDERS = ("DiffusionCore", "CTDiffusionSR", "XrayToCT")
#: How many changed files :func:`source_modified` names before it counts the rest.
_NAMED = 3


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


def modified_code_files(root: str | Path) -> list[str] | None:
    """The tracked files under :data:`CODE_FOLDERS` of the git checkout at ``root`` that differ from its commit
    (edited, staged or deleted; new untracked files are not counted), as paths relative to ``root``, sorted.
    ``None`` when it cannot be told: no checkout there, no ``git`` program, or git refuses (another owner's
    checkout, a damaged index). Runs ``git status``, which reads the files' dates and sizes, not their contents."""
    git = shutil.which("git")
    if git is None or _git_dir(Path(root)) is None:
        return None
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}  # read only: no index refresh written
    try:
        done = subprocess.run(
            [git, "-C", str(root), "status", "--porcelain=v1", "-z", "--untracked-files=no", "--", *CODE_FOLDERS],
            capture_output=True, timeout=20, env=env, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    entries = done.stdout.decode("utf-8", errors="replace").split("\0")
    paths, skip = [], False
    for entry in entries:
        if skip:  # the second path of a rename entry (its old name)
            skip = False
            continue
        if len(entry) > 3:
            paths.append(entry[3:])
            skip = entry[0] in "RC"
    return sorted(paths)


@functools.lru_cache(maxsize=1)
def source_modified() -> str:
    """Whether the DiffusionCore source that runs differs from :func:`source_commit`: ``""`` when it does not, when
    it is an installed copy, or when it cannot be told (no ``git`` program); otherwise how many code files were
    changed and the first few of them (``"2 files: DiffusionCore/sr/adapt.py, DiffusionCore/sr/planes.py"``). A
    result made by edited code cannot be rebuilt from its commit alone, and the provenance says so."""
    if not source_commit():
        return ""
    changed = modified_code_files(Path(__file__).resolve().parent.parent)
    if not changed:
        return ""
    named = ", ".join(changed[:_NAMED]) + (f" and {len(changed) - _NAMED} more" if len(changed) > _NAMED else "")
    return f"{len(changed)} file{'s' if len(changed) > 1 else ''}: {named}"
