"""File helpers shared by the whole package (no torch import): the cache folder, file checksums, atomic
publishing, and the host memory a job may plan to use."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from .errors import ConfigError

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


# -- memory ------------------------------------------------------------------------------------------
def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """Free memory under a cgroup v2 limit (containers), when one is set."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((base / "memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def host_available_memory() -> int:
    """Bytes of host memory available to this process (MemAvailable, capped by a cgroup limit)."""
    candidates = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not candidates:
        try:
            candidates.append(int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")))
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown: do not refuse work we cannot judge
    return min(candidates)


#: Environment variable that caps the memory a run may plan to use (bytes, or e.g. ``512MiB``, ``4GiB``).
MEMORY_LIMIT_ENV = "DIFFUSIONCORE_MEMORY_LIMIT"
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_memory_size(text: str) -> int:
    """Bytes from ``"123"``, ``"512MiB"``, ``"4GB"``, ``"1.5 GiB"`` (case-insensitive).

    Raises:
        ConfigError: not a positive size.
    """
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :]
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"memory size {text!r} is not a positive size such as 2000000000, 512MiB or 4GiB")
    return int(value)


def memory_limit_from_env() -> int | None:
    """The cap from ``$DIFFUSIONCORE_MEMORY_LIMIT`` in bytes, or ``None`` when unset.

    Raises:
        ConfigError: the variable is set to something that is not a size.
    """
    value = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not value:
        return None
    try:
        return parse_memory_size(value)
    except ConfigError as exc:
        raise ConfigError(f"environment variable {MEMORY_LIMIT_ENV}: {exc}") from None


def check_memory_for(n_bytes: int, what: str, advice: str) -> None:
    """Refuse work that needs more host memory than is available (``$DIFFUSIONCORE_MEMORY_LIMIT`` when set,
    else the free memory), before anything is allocated.

    Args:
        n_bytes: the estimated peak bytes.
        what: what needs them, e.g. ``"reading ct.nii.gz (512x512x900 voxels)"``.
        advice: what the user can do, e.g. ``"crop the volume"``.

    Raises:
        ResourceError: the estimate exceeds what is available; the message states both figures.
    """
    from .errors import ResourceError

    limit = memory_limit_from_env() or host_available_memory()
    if n_bytes > limit:
        raise ResourceError(
            f"not enough memory: {what} needs about {format_bytes(n_bytes)}, but {format_bytes(limit)} is "
            f"available. {advice[:1].upper() + advice[1:]}, free memory, or use a machine with more memory."
        )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
