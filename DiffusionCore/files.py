"""File helpers shared by the whole package (no torch import): the cache folder and file checksums."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """DiffusionCore's user cache folder: ``$DIFFUSIONCORE_CACHE`` or ``~/.cache/diffusioncore``.

    Sample data live in ``cache_dir()/sample-data``, imported weights in ``cache_dir()/weights``. Not
    created here.
    """
    env = os.environ.get("DIFFUSIONCORE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffusioncore"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Give a finished temporary file the usual permissions (rw-r--r-- less the umask) and rename it
    over ``final`` atomically. ``mkstemp`` creates files owner-only; results are meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, final)
