"""File helpers shared by the whole package (no torch import): the cache folder, file checksums, atomic
publishing, the guard that keeps outputs off inputs, parallel gzip, and the host memory a job may plan to
use."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError, OutputError, OutputExistsError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


#: Environment variable naming the cache folder.
CACHE_ENV = "DIFFUSIONCORE_CACHE"


#: The cache folder when ``$DIFFUSIONCORE_CACHE`` is unset, under the user's home folder (not on Windows:
#: :func:`default_cache`).
DEFAULT_CACHE = "~/.cache/diffusioncore"


def default_cache() -> str:
    """The cache folder when ``$DIFFUSIONCORE_CACHE`` is unset, as written (``~`` not expanded); the one place that
    says it (the Slicer modules read it here too).

    On Windows ``%LOCALAPPDATA%\\diffusioncore``: ``~`` there is the user profile, which roaming profiles (common
    in hospitals) copy to a server at every logon and logoff, and the cache holds about 100 MB of sample data and
    every imported weights file. A Windows cache made by an earlier version in ``~\\.cache\\diffusioncore`` stays in
    use while there is none under ``%LOCALAPPDATA%`` (its imported weights would be gone from the lists otherwise).
    Elsewhere, and on Windows without ``LOCALAPPDATA``, :data:`DEFAULT_CACHE`; also on macOS, whose convention would
    be ``~/Library/Caches``, so that a cache already there stays in use.
    """
    if ON_WINDOWS and (local := os.environ.get("LOCALAPPDATA")):
        new = os.path.join(local, "diffusioncore")
        with contextlib.suppress(RuntimeError, OSError):  # no home folder: there is no earlier cache either
            if not os.path.isdir(new) and os.path.isdir(Path(DEFAULT_CACHE).expanduser()):
                return DEFAULT_CACHE
        return new
    return DEFAULT_CACHE


def cache_dir() -> Path:
    """DiffusionCore's user cache folder: ``$DIFFUSIONCORE_CACHE``, else :func:`default_cache`
    (``~/.cache/diffusioncore``; ``%LOCALAPPDATA%\\diffusioncore`` on Windows).

    Sample data live in ``cache_dir()/sample-data``, imported weights in ``cache_dir()/weights``. Not
    created here (see :func:`writable_cache_folder`).

    Raises:
        OutputError: the folder cannot be told: ``~`` has no meaning for an account with no home folder (``HOME``
            unset and no entry in the user database: a container, a systemd ``DynamicUser`` service); the message
            says to set ``$DIFFUSIONCORE_CACHE`` (exit code 4).
    """
    env = os.environ.get(CACHE_ENV)
    try:
        return Path(env or default_cache()).expanduser()
    except RuntimeError:  # Path.expanduser: "Could not determine home directory."
        named = f"{CACHE_ENV}={env} starts with ~" if env else f"{CACHE_ENV} is unset"
        raise OutputError(
            f"no cache folder: {named}, and this account has no home folder (HOME is unset and the user database "
            f"has no entry for it), so {env or default_cache()} names no folder here; set {CACHE_ENV} to the full path "
            "of a folder you can write"
        ) from None


def cache_dir_shown() -> Path:
    """:func:`cache_dir` for help texts and messages, which must not fail: where it cannot be told (no home folder),
    the setting as written (``~/.cache/diffusioncore``, or ``$DIFFUSIONCORE_CACHE``), which names no folder here.
    Nothing may be read from or written to it then: :func:`check_cache_usable` raises."""
    try:
        return cache_dir()
    except OutputError:
        return Path(os.environ.get(CACHE_ENV) or default_cache())


def _cache_setting() -> str:
    where = (f"{CACHE_ENV}={os.environ[CACHE_ENV]}" if os.environ.get(CACHE_ENV)
             else f"the cache folder {cache_dir_shown()}")  # fmt: skip
    return f"{where}: point {CACHE_ENV} to a folder you can write (or unset it for {default_cache()})"


def check_cache_usable() -> Path:
    """The cache folder, refused when it cannot be one: the path (or a folder above it) is a file, or there is no
    home folder for ``~/.cache/diffusioncore`` (:func:`cache_dir`).

    Raises:
        OutputError: naming ``$DIFFUSIONCORE_CACHE`` and what to do (exit code 4).
    """
    root = cache_dir()
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                where = "there" if p == root else f"under {root}"
                raise OutputError(f"{p} is a file, not a folder, so nothing can be cached {where}; {_cache_setting()}")
            break
    return root


def writable_cache_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (inside the cache) when needed and check that files can be created in it (a probe file
    is created and removed: permission bits alone do not tell for root, ACLs or read-only file systems).

    Raises:
        OutputError: the folder cannot be created or written (exit code 4).
    """
    check_cache_usable()
    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"the cache folder {p} cannot be created or written ({exc.strerror or exc}); "
                          f"{_cache_setting()}") from None  # fmt: skip
    return p


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def sha256_arrays(*arrays: Any) -> str:
    """Hex sha256 of the arrays' shapes, types and bytes (C order), in turn: the digest of what was read from a file,
    whatever the file's format (:meth:`DiffusionCore.volume.Volume.content_sha256`)."""
    import numpy as np  # not at the top: python -m DiffusionCore checks its limits before numpy loads

    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        flat = a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)
        step = max(1, _CHUNK // max(1, a.itemsize))  # a view at a time: no copy of a large volume
        for i in range(0, flat.size, step):
            h.update(memoryview(flat[i:i + step]).cast("B"))
    return h.hexdigest()


def gzip_ends_with_size(path: str | os.PathLike, start: int, expected: int) -> bool:
    """Whether the gzip stream from byte ``start`` to the end of ``path`` ends with gzip's trailer for ``expected``
    uncompressed bytes (its last 4 bytes: the size modulo 2**32). A file cut short (a full disk, ``ulimit -f``, an
    interrupted copy) ends with compressed bytes instead, which match by chance once in 2**32. Cheap: the stream is
    not inflated, so its CRC-32 is not checked."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() - start < 18:  # a gzip member's header and trailer alone
            return False
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little") == expected % (1 << 32)


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def shared_mode(path: str | os.PathLike) -> None:
    """Give a file (rw-rw-rw-) or a folder (rwxrwxrwx) the permissions a new one gets, less the umask: what
    ``mkstemp`` (0600) and ``mkdtemp`` (0700) created owner-only becomes as readable as any file the user
    writes, once it is complete."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~current_umask())


def publish(tmp: str | os.PathLike, final: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Give a finished temporary file the usual permissions (rw-r--r-- less the umask) and rename it
    over ``final`` atomically. ``mkstemp`` creates files owner-only; results are meant to be shared.

    ``overwrite=False``: never replace a file that appeared at ``final`` after the caller's up-front check (another
    program or run writing the same name meanwhile). The temporary file is hard-linked to ``final``, which fails
    atomically when ``final`` exists, then unlinked; where linking fails otherwise (a file system without hard
    links), ``final`` is checked just before the rename (a window of microseconds instead of the whole run).

    Raises:
        OutputExistsError: ``overwrite`` is False and ``final`` exists; ``tmp`` is left for the caller to remove.
    """
    shared_mode(tmp)
    if overwrite:
        os.replace(tmp, final)
        _note_published(final)
        return
    try:
        os.link(tmp, final, follow_symlinks=False)
    except FileExistsError:
        raise OutputExistsError(final, "appeared while this run was writing it and was not replaced") from None
    except (OSError, NotImplementedError):  # no hard links here (FAT, some network shares): check, then rename
        if os.path.lexists(final):
            raise OutputExistsError(final, "appeared while this run was writing it and was not replaced") from None
        os.replace(tmp, final)
        _note_published(final)
        return
    _note_published(final)
    os.unlink(tmp)


#: The journals of :func:`publish_journal` open in each thread.
_JOURNALS = threading.local()


def _lstat_identity(path: str | os.PathLike) -> tuple[int, ...] | None:
    """(device, inode) of the entry at ``path`` itself (a link not followed), or None when there is none. Where the
    file system numbers no inodes (``st_ino`` 0: some Windows network drives), (device, 0, size, modification time)
    instead: (device, 0) alone would be the same for every file there, also for one another process put at that
    name since."""
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    if st.st_ino == 0:
        return st.st_dev, 0, st.st_size, st.st_mtime_ns
    return st.st_dev, st.st_ino


def _note_published(final: str | os.PathLike) -> None:
    """Record ``final`` (as :func:`publish` put it in place) in this thread's open journals."""
    for journal in getattr(_JOURNALS, "open", ()):
        journal[os.path.abspath(final)] = _lstat_identity(final)


@contextlib.contextmanager
def publish_journal() -> Iterator[dict[str, tuple[int, ...] | None]]:
    """What :func:`publish` puts in place in this thread during the block: absolute path -> (device, inode) of the
    file (or folder) as published. A caller that undoes a failed block removes only the files it wrote itself, and
    only while they are still what it wrote (not a file another process published at that name before or since)."""
    journal: dict[str, tuple[int, ...] | None] = {}
    stack = getattr(_JOURNALS, "open", None)
    if stack is None:
        stack = _JOURNALS.open = []
    stack.append(journal)
    try:
        yield journal
    finally:
        stack.remove(journal)


def still_published(journal: dict[str, tuple[int, ...] | None], path: str | os.PathLike) -> bool:
    """Whether ``path`` is still the file this thread published there (recorded in ``journal``, a
    :func:`publish_journal`): same device and inode (where there are no inode numbers, same device, size and
    modification time: :func:`_lstat_identity`)."""
    recorded = journal.get(os.path.abspath(path))
    return recorded is not None and _lstat_identity(path) == recorded


# -- temporary files of an output -------------------------------------------------------------------------
#: The text between an output's name and the random part of its temporary files: ``.NAME.PID.XXXX.partial``.
PARTIAL = ".partial"


def partial_file(final: str | os.PathLike, suffix: str = "") -> str:
    """Create the hidden temporary file (mode 0600) that :func:`publish` later renames to ``final``:
    ``.NAME.PID.XXXXXXXX.partial[SUFFIX]`` beside it. The process id lets a later run tell a partial file of a
    killed process (stale) from one being written now."""
    p = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}.", suffix=PARTIAL + suffix, dir=p.parent)
    os.close(fd)
    return tmp


#: Bytes the name of an output's temporary file adds to the output's name (:func:`partial_file`, at most:
#: ``.NAME.PID.XXXXXXXX.partial.nii.gz``, a process id of up to 7 digits).
PARTIAL_NAME_EXTRA = len(f"..{10**7 - 1}.{'x' * 8}{PARTIAL}.nii.gz")
#: The longest name (bytes) and path most file systems take, where the system does not say (ext4, NTFS, APFS: 255).
_NAME_MAX, _PATH_MAX = 255, 4096
#: Windows' ``MAX_PATH``: a path there has at most 259 characters (and its terminating NUL), unless long paths are
#: switched on (:func:`_windows_long_paths`).
_WINDOWS_MAX_PATH = 260
#: Windows errors that say a path is too long: ERROR_FILENAME_EXCED_RANGE (206), and ERROR_PATH_NOT_FOUND (3), which
#: Windows also gives for a path over ``MAX_PATH`` (then only when the path is over it: else the folder is missing).
_WINERROR_TOO_LONG, _WINERROR_PATH_NOT_FOUND = 206, 3


def _windows_long_paths() -> bool:
    """Whether Windows takes paths longer than ``MAX_PATH`` in this process. That needs both the system setting
    ``LongPathsEnabled`` (off by default) and an executable whose manifest declares ``longPathAware`` (python.org's
    ``python.exe`` does; Slicer's executables may not): ``RtlAreLongPathsEnabled`` (Windows 10 1607 and later) answers
    for both, so it is asked first. Where that call is missing, the setting alone
    (``HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem``); False where neither can be read."""
    try:
        import ctypes

        enabled = ctypes.WinDLL("ntdll").RtlAreLongPathsEnabled
        enabled.restype, enabled.argtypes = ctypes.c_ubyte, []
        return bool(enabled())
    except Exception:  # no ctypes.WinDLL (not Windows), or a Windows before 10 1607
        pass
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            value, _ = winreg.QueryValueEx(key, "LongPathsEnabled")
        return int(value) == 1
    except (ImportError, OSError, ValueError, TypeError):
        return False


def _length(text: str) -> tuple[int, str]:
    """The length of the name or path ``text`` as the file system counts it, and its unit: characters (UTF-16 units)
    on Windows, whose NTFS limits those (a CJK character is one there, three bytes in UTF-8); bytes elsewhere."""
    if ON_WINDOWS:
        return len(text.encode("utf-16-le", "surrogatepass")) // 2, "characters"
    return len(os.fsencode(text)), "bytes"


def _path_length_and_limit(path: Path, parent: Path) -> tuple[int, int, str]:
    """The length of ``path`` made absolute (:func:`_length`); the limit it must stay under; and the unit both are in.
    Windows counts characters up to ``MAX_PATH`` (up to :data:`_PATH_MAX` for a ``\\\\?\\`` path or where long paths
    are on); other systems count bytes up to their ``PC_PATH_MAX``."""
    absolute = os.path.abspath(path)
    length, unit = _length(absolute)
    if ON_WINDOWS:
        if absolute.startswith("\\\\?\\") or _windows_long_paths():
            return length, _PATH_MAX, unit
        return length, _WINDOWS_MAX_PATH, unit
    return length, _fs_limit(parent, "PC_PATH_MAX", _PATH_MAX), unit


def _fs_limit(folder: Path, name: str, default: int) -> int:
    """The file system's limit ``name`` (``PC_NAME_MAX``, ``PC_PATH_MAX``) for files in ``folder`` (its nearest
    existing folder), or ``default`` where it cannot be told."""
    for candidate in (folder, *folder.parents):
        try:
            if candidate.is_dir():
                return int(os.pathconf(candidate, name)) or default
        except (OSError, ValueError, AttributeError):  # no pathconf (Windows), a name too long itself
            continue
    return default


def name_too_long(path: str | os.PathLike, with_temporary: bool = True) -> OutputError | None:
    """The OutputError for an output path too long for its file system (ENAMETOOLONG), or None when it fits:
    its name, with the hidden temporary file written beside it first (``with_temporary``: :data:`PARTIAL_NAME_EXTRA`
    more, ASCII), at most the file system's longest name, and the whole path at most its longest path. The message
    gives both lengths: the user counts the path they typed, not the temporary file's."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    added = PARTIAL_NAME_EXTRA if with_temporary else 0

    def said(length: int, unit: str) -> str:
        if not added:
            return f"{length} {unit}"
        return f"{length} {unit}, {length + added} with the temporary file written beside it first"

    name_length, unit = _length(p.name)
    name_max = _fs_limit(parent, "PC_NAME_MAX", _NAME_MAX)
    if name_length + added > name_max:
        return OutputError(
            f"cannot write {p}: its name is too long for the file system ({said(name_length, unit)}; a name there "
            f"may have at most {name_max}): use a shorter name or folder."
        )
    path_length, path_max, unit = _path_length_and_limit(p, parent)
    if path_length + added >= path_max:
        return OutputError(
            f"cannot write {p}: its path is too long for the file system ({said(path_length, unit)}; a path there "
            f"may have at most {path_max - 1}): use a shorter name or folder."
        )
    return None


def check_name_length(path: str | os.PathLike, with_temporary: bool = True) -> None:
    """Refuse an output path too long for its file system (:func:`name_too_long`) before any work.

    Raises:
        OutputError: naming the path and saying to use a shorter name or folder.
    """
    error = name_too_long(path, with_temporary)
    if error is not None:
        raise error


def too_long_error(path: str | os.PathLike, exc: OSError) -> OutputError | None:
    """The OutputError for ``exc`` when it is the system's ENAMETOOLONG about ``path`` (or a file beside it), or
    Windows' word for it (``winerror`` 206; 3, "path not found", for a path over ``MAX_PATH``), else None: the path
    named, and what to do, never an internal error."""
    winerror = getattr(exc, "winerror", None)
    if winerror == _WINERROR_PATH_NOT_FOUND:  # also a folder that does not exist: only a path over the limit
        return name_too_long(path)
    if exc.errno != errno.ENAMETOOLONG and winerror != _WINERROR_TOO_LONG:
        return None
    return name_too_long(path) or OutputError(
        f"cannot write {path}: its name or path is too long for the file system: use a shorter name or folder."
    )


def partial_folder(final: str | os.PathLike, suffix: str = "") -> Path:
    """Create the hidden temporary folder (mode 0700) that :func:`publish` later renames to the folder ``final``
    (a DICOM series): ``.NAME.PID.XXXXXXXX.partial[SUFFIX]`` beside it, named as :func:`partial_file` names
    files, so that :func:`remove_stale_partials` removes it once its process was killed."""
    p = Path(final)
    return Path(tempfile.mkdtemp(prefix=f".{p.name}.{os.getpid()}.", suffix=PARTIAL + suffix, dir=p.parent))


#: Whether this is Windows, where :func:`pid_running` must not use ``os.kill``.
ON_WINDOWS = os.name == "nt"


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` (on this machine) still runs: what tells a temporary file or folder of a killed
    process (stale: safe to remove) from one being written now. A process that cannot be told (another user's)
    counts as running, so that its files are kept."""
    if pid == os.getpid():
        return True
    if ON_WINDOWS:  # os.kill(pid, 0) would end the process there (TerminateProcess), not test it
        return _windows_pid_running(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or it cannot be told: keep its file
    return True


def _windows_pid_running(pid: int) -> bool:
    """:func:`pid_running` on Windows, asked of the process's exit code (never a signal: on Windows ``os.kill`` with
    any signal but CTRL_C_EVENT/CTRL_BREAK_EVENT terminates the process). Whatever cannot be told counts as running."""
    try:
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, int(pid))  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() != 87  # ERROR_INVALID_PARAMETER: no such process (5, denied: running)
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    except Exception:  # no ctypes.windll, an API that fails: keep the file
        return True


def remove_stale_partials(final: str | os.PathLike) -> list[str]:
    """Delete the temporary files and folders that earlier runs writing ``final`` left behind when they were
    killed (``kill -9``, out of memory) while writing: ``.NAME.PID.XXXXXXXX.partial*`` beside it (from
    :func:`partial_file` and :func:`partial_folder`) whose process no longer runs, and those named without a
    process id (``.NAME.XXXXXXXX.partial*``, by versions before it was added). One of a process that still runs
    (another run writing the same output now) is kept, and so is one of another output whose name starts
    with NAME (``.NAME.json.PID.XXXXXXXX.partial``).

    Returns:
        The names removed.
    """
    p = Path(final)
    removed = []
    ours = re.compile(rf"\.{re.escape(p.name)}\.(?:(\d+)\.)?[^.]+{re.escape(PARTIAL)}.*", re.DOTALL)
    try:
        candidates = list(p.parent.glob(f".{glob_escape(p.name)}.*{PARTIAL}*"))
    except OSError:
        return removed
    for c in candidates:
        match = ours.fullmatch(c.name)
        if match is None or (match[1] is not None and pid_running(int(match[1]))):
            continue
        try:
            if c.is_dir() and not c.is_symlink():
                shutil.rmtree(c)
            else:
                c.unlink()
            removed.append(c.name)
        except OSError:
            pass
    return removed


def glob_escape(name: str) -> str:
    """``name`` with the glob characters ``*?[`` matched literally."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


# -- outputs never overwrite inputs ------------------------------------------------------------------------
PathLike = str | os.PathLike


#: What tells one file from another: (device, inode), or the resolved path where the file system has no inodes.
FileIdentity = tuple[int, int] | str


def resolved_path_key(path: PathLike) -> str:
    """``path`` with links and ``..`` resolved, in the letter case the system compares names in (``normcase``: lower
    case on Windows): what tells files apart where their identity cannot (:func:`file_identity`)."""
    return os.path.normcase(os.path.realpath(path))


def _stat_identity(st: os.stat_result, path: PathLike) -> FileIdentity:
    """(device, inode) from ``st``, the stat of ``path``; :func:`resolved_path_key` when the inode is 0: a file system
    that numbers no inodes (Windows network drives: sshfs-win, WebDAV, some NAS and VirtualBox shares), where
    (device, 0) would make every file there one file."""
    if st.st_ino == 0:
        return resolved_path_key(path)
    return st.st_dev, st.st_ino


def file_identity(path: PathLike) -> FileIdentity | None:
    """What tells the file (or folder) ``path`` names, after following links, from any other: (device, inode), else
    the resolved path (:func:`_stat_identity`); None when there is nothing there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return _stat_identity(st, path)


#: Most data files one detached header may list (a ``LIST`` or a numbered pattern); more are not followed.
_MAX_DATA_FILES = 100_000

#: Bytes of a detached header read for its data files (:func:`detached_data_files`).
_HEADER_PROBE = 1 << 20


def _numbered_files(folder: Path, words: list[str]) -> list[Path]:
    """The files of a numbered-pattern data file (NRRD ``data file: slice%03d.raw 1 40 1``, MetaImage
    ``ElementDataFile = slice%03d.raw 1 40 1``): the printf pattern filled with min, min + step, ... max."""
    try:
        start, stop, step = (int(w) for w in words[1:4])
    except ValueError:
        return [folder / words[0]]
    if step == 0 or (stop - start) // step + 1 > _MAX_DATA_FILES:
        return [folder / words[0]]  # too many to list: the pattern itself, whose folder is checked all the same
    out = []
    for i in range(start, stop + (1 if step > 0 else -1), step):
        try:
            out.append(folder / (words[0] % i))
        except (TypeError, ValueError):
            return [folder / words[0]]
    return out


def detached_data_files(path: str | os.PathLike) -> list[Path]:
    """The files a detached volume header reads its voxels from, besides the header itself: the NRRD
    ``data file:`` (``.nhdr``, or an ``.nrrd`` that names one) and the MetaImage ``ElementDataFile``
    (``.mhd``/``.mha`` that is not ``LOCAL``), a single file, a ``LIST`` of files or a numbered pattern.
    Relative names are taken from the header's folder, as ITK and 3D Slicer read them. Empty for any other
    path (a NIfTI, a folder, a header with attached data, a file that cannot be read).

    Used so that an output never overwrites the data of an input (:func:`refuse_overwriting_inputs`)
    and to refuse a header whose data file lies outside its folder or is no regular file
    (:func:`check_detached_data_files`).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".nrrd", ".nhdr", ".mha", ".mhd") or not p.is_file():
        return []
    try:
        with open(p, "rb") as f:
            head = f.read(_HEADER_PROBE)
    except OSError:
        return []
    lines = [raw.decode("latin-1").strip() for raw in head.split(b"\n")]
    separator = "=" if suffix in (".mha", ".mhd") else ":"
    for n, line in enumerate(lines):
        if separator == ":" and not line and n > 0:
            return []  # the end of an NRRD header without a data file: the voxels follow it
        key, sep, value = line.partition(separator)
        key = key.strip().lower()
        if not sep or line.startswith("#") or key not in ("data file", "datafile", "elementdatafile"):
            continue
        words = value.strip().lstrip("=").split()
        if not words or words[0].upper() == "LOCAL":
            return []
        if words[0].upper() == "LIST":  # the names follow, one a line, to the end of the header file
            names = [x for x in lines[n + 1:] if x and not x.startswith("#")][:_MAX_DATA_FILES]
            return [p.parent / x for x in names]
        if len(words) >= 4 and "%" in words[0]:
            return _numbered_files(p.parent, words)
        return [p.parent / value.strip().lstrip("=").strip()]
    return []


#: Set to ``1`` to read a detached header whose data file lies outside the header's folder (refused otherwise).
ALLOW_DATA_OUTSIDE_ENV = "DIFFUSIONCORE_ALLOW_DATA_OUTSIDE"


def not_regular_kind(path: PathLike) -> str:
    """What ``path`` is when it is an existing file system entry other than a regular file, after following links
    (``"a named pipe (FIFO)"``, ``"a device"``, ``"a socket"``, ``"a folder"``); ``""`` for a regular file and for a
    path that does not exist or cannot be looked at. Told from ``os.stat`` alone: nothing is opened (opening a FIFO
    waits for a writer forever, and a device such as ``/dev/zero`` never ends)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return ""
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a folder" if stat.S_ISDIR(mode) else "not a regular file"


def check_detached_data_files(path: PathLike) -> None:
    """Refuse a detached volume header (:func:`detached_data_files`) whose data files cannot be trusted, before any
    voxel is read:

    * a data file that is no regular file (a FIFO, a device such as ``/dev/zero``, a socket, a folder): always, as
      reading it hangs or never ends;
    * a data file outside the header's folder (``../``, an absolute path, a link out of the folder, judged after
      resolving links): unless ``$DIFFUSIONCORE_ALLOW_DATA_OUTSIDE`` is ``1`` (then a warning names it). A header
      received from someone else could otherwise make the command read any file the user can read (``/etc/shadow``,
      a key) into a result, where its bytes can be recovered. 3D Slicer saves the data file beside its header.

    A data file that does not exist is left to the reader, which names it.

    Raises:
        InputError: naming the header, the data file, why it is refused and what to do.
    """
    p = Path(path)
    folder = Path(os.path.realpath(p.parent))
    allowed = os.environ.get(ALLOW_DATA_OUTSIDE_ENV, "").strip() == "1"
    files = detached_data_files(p)
    try:
        too_long = bool(files) and p.stat().st_size > _HEADER_PROBE
    except OSError:
        too_long = False
    if len(files) >= _MAX_DATA_FILES or too_long:  # names past those listed would go unchecked
        raise InputError(f"could not read {p}: its header lists more data files than can be checked "
                         f"({len(files):,} or more, or a header over {_HEADER_PROBE // (1 << 20)} MiB). Refused; put "
                         "the volume in one file (NIfTI, NRRD) or in a detached header with fewer data files.")  # fmt: skip
    for data in files:
        real = Path(os.path.realpath(data))
        kind = not_regular_kind(real)
        if kind:
            raise InputError(f"could not read {p}: its header reads its voxel data from {data}, which is {kind}, not "
                             "a regular file: reading it would hang or never end. Refused; put the volume's data file "
                             "(a regular file) beside its header, or give a NIfTI, NRRD or DICOM file.")  # fmt: skip
        if folder == real or folder in real.parents:
            continue
        if allowed:
            logger.warning("%s reads its voxel data from %s, outside the header's folder (allowed by %s=1): check "
                           "that this is the file you mean to use (a header can name any file).", p, real,
                           ALLOW_DATA_OUTSIDE_ENV)  # fmt: skip
            continue
        raise InputError(
            f"could not read {p}: its header reads its voxel data from {real}, outside the header's folder "
            f"{folder}. Refused: a header that points outside its folder can make the tool read any file on this "
            "computer into a result. Put the data file beside its header (and name it there without a folder, as 3D "
            f"Slicer saves it), or, if you trust this header, set {ALLOW_DATA_OUTSIDE_ENV}=1."
        )


def refuse_overwriting_inputs(inputs: Iterable[PathLike | None], outputs: Iterable[tuple[str, PathLike | None]],
                              overwrite_option: str | None = "--overwrite") -> None:
    """Refuse, whatever ``--overwrite`` says, any output that is an input file or lies inside an input folder,
    and two outputs that are one file. Called by every command with all its planned outputs before any work.

    The data files of a detached header (NRRD ``data file:``, MetaImage ``ElementDataFile``, see
    :func:`detached_data_files`) are inputs too. Files are compared by identity (device
    and inode), not by name: a symbolic or hard link to an input, a
    path through ``..`` and another spelling of the name on a case-insensitive file system all name the
    input itself. On a file system without inode numbers (:func:`file_identity`) the resolved paths are compared
    instead, which does not see hard links. A folder input (a DICOM series) protects everything below it, and the
    files directly in it are compared by identity too. Outputs that differ only in letter case are one file on
    Windows and macOS (whose disks ignore case by default).

    Args:
        inputs: the files and folders the command reads: volumes, radiographs, list files, weights.
            ``None`` and paths that do not exist (sample names) are skipped.
        outputs: ``(what, path)`` for every file the command will write, e.g. ``("--report", "r.json")``;
            ``what`` starts the message (``"the output"``, ``"--report"``). ``None`` paths are skipped.
        overwrite_option: the front end's option that replaces outputs, which the message says does not lift the
            refusal; ``None`` for a front end without one (the Slicer CLI modules, which replace their outputs).

    Raises:
        OutputError: exit code 4; the message names the output, the input and what to do.
    """
    even = f" even with {overwrite_option}" if overwrite_option else ""
    files: dict[FileIdentity, Path] = {}
    folders: dict[FileIdentity, Path] = {}
    headers: dict[FileIdentity, Path] = {}  # the data file of a detached header -> the header
    for item in inputs:
        if item is None or (ident := file_identity(item)) is None:
            continue
        path = Path(item)
        if not path.is_dir():
            files.setdefault(ident, path)
            for data in detached_data_files(path):  # a detached header's voxels are an input too
                if (data_ident := file_identity(data)) is not None and data_ident not in files:
                    files[data_ident] = data
                    headers[data_ident] = path
            continue
        folders.setdefault(ident, path)
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if not entry.is_file():
                        continue
                    if ON_WINDOWS:  # DirEntry.stat() gives st_ino 0 there: os.stat's numbers, or a hard link is missed
                        entry_ident = file_identity(entry.path)
                    else:  # the numbers DirEntry.stat() gives, with no further system call per file
                        entry_ident = _stat_identity(entry.stat(), entry.path)
                    if entry_ident is not None:
                        files.setdefault(entry_ident, Path(entry.path))
        except OSError:
            pass  # an unreadable folder is reported by the reader
    seen: dict[str, tuple[str, Path]] = {}
    for what, item in outputs:
        if item is None:
            continue
        out = Path(item)
        ident = file_identity(out)
        if ident in files:
            same = "" if os.path.abspath(out) == os.path.abspath(files[ident]) else " (the same file under another name)"
            if ident in headers:
                same += f" (the voxel data that the header {headers[ident]} reads)"
            raise OutputError(
                f"{what} {out} is the input {files[ident]}{same}: writing it would destroy the input, so it is "
                f"refused{even}. Choose another path for {what}."
            )
        real = Path(os.path.realpath(out))  # links and '..' resolved the way the file would be opened
        for folder in (real, *real.parents):
            if (ident := file_identity(folder)) in folders:
                raise OutputError(
                    f"{what} {out} lies inside the input folder {folders[ident]}: writing there would change "
                    f"what is read from that folder (a series, a cohort), so it is refused{even}. Choose a path "
                    "outside it."
                )
        key = os.path.normcase(str(real))
        if sys.platform == "darwin":  # APFS and HFS+ ignore case by default, and normcase keeps it on macOS
            key = key.casefold()
        if key in seen:
            raise OutputError(f"{what} {out} and {seen[key][0]} {seen[key][1]} are the same file: give them different names.")
        seen[key] = (what, out)


# -- parallel gzip ---------------------------------------------------------------------------------
#: zlib level of the volumes DiffusionCore writes as .nii.gz: level 1 compresses CT about 30x faster
#: than level 6 and the file is only a few per cent larger.
GZIP_LEVEL = 1
_GZIP_BLOCK = 2 << 20


def usable_cpus() -> int:
    """Threads for DiffusionCore's own parallel work (gzip, conversions): the cores this process may run
    on (its affinity mask, not the machine's count), at most ``OMP_NUM_THREADS`` when that is set, as
    for torch."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    return max(1, n)


def _deflate_block(block: bytes, level: int, last: bool) -> bytes:
    # raw deflate (no header); a sync flush ends a block on a byte boundary without the final-block bit,
    # so independently compressed blocks concatenate into one valid deflate stream
    comp = zlib.compressobj(level, zlib.DEFLATED, -15)
    return comp.compress(block) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def gzip_file(src: str | os.PathLike, dst: str | os.PathLike, *, level: int = GZIP_LEVEL, threads: int | None = None) -> None:
    """Compress ``src`` into ``dst`` as one gzip member, using ``threads`` cores (default: all usable).

    The input is cut into 2 MiB blocks deflated in parallel (zlib releases the GIL) and joined into a
    single deflate stream, the way ``pigz`` does; any gzip reader (zlib, ITK, nibabel, ``gunzip``) reads
    it. At most ``2 x threads`` blocks are in memory at once. ``dst`` is overwritten.
    """
    threads = usable_cpus() if threads is None else max(1, int(threads))
    crc = size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout, ThreadPoolExecutor(threads) as pool:
        # header: magic, deflate, no flags, no mtime (reproducible files), fastest-level hint, OS unknown
        fout.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + (b"\x04" if level == 1 else b"\x00") + b"\xff")
        pending: deque = deque()
        block = fin.read(_GZIP_BLOCK)
        while True:
            following = fin.read(_GZIP_BLOCK)  # read ahead: the last block ends the stream
            crc = zlib.crc32(block, crc)
            size += len(block)
            pending.append(pool.submit(_deflate_block, block, level, not following))
            while len(pending) > 2 * threads:
                fout.write(pending.popleft().result())
            if not following:
                break
            block = following
        while pending:
            fout.write(pending.popleft().result())
        fout.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))


# -- memory ------------------------------------------------------------------------------------------
def proc_bytes(path: str, key: str) -> int | None:
    """Bytes that a ``/proc`` file in the ``KEY:  N kB`` format gives for ``key`` (e.g. ``/proc/meminfo``
    ``MemAvailable``, ``/proc/self/status`` ``VmHWM``); None where the file or the key is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
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


def address_space_left() -> int | None:
    """Bytes this process may still map under its address-space limit (``ulimit -v``, the soft ``RLIMIT_AS``): the
    limit minus what is mapped now (``/proc/self/status`` ``VmSize``). None when there is no such limit (the usual
    case) or it cannot be read (Windows, no ``/proc``). Under the limit an allocation fails however much memory is
    free, so it caps what a run may plan to use."""
    limit = soft_limit("RLIMIT_AS")
    mapped = proc_bytes("/proc/self/status", "VmSize") if limit is not None else None
    return None if limit is None or mapped is None else max(0, limit - mapped)


def soft_limit(name: str) -> int | None:
    """This process's soft limit ``resource.<name>`` in bytes (``RLIMIT_AS``: ``ulimit -v``; ``RLIMIT_FSIZE``:
    ``ulimit -f``), or None when there is none (unlimited, or no ``resource`` module: Windows). Standard library
    only: ``python -m DiffusionCore`` reads it before it loads PyTorch."""
    try:
        import resource

        soft, _ = resource.getrlimit(getattr(resource, name))
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


#: What :func:`host_available_memory` returns when no source tells the free memory: do not refuse work we cannot judge.
UNKNOWN_MEMORY = 1 << 62
_UNMEASURED_MEMORY_SAID = False


def _windows_available_memory() -> int | None:
    """Bytes of memory a new allocation can get on Windows (``GlobalMemoryStatusEx``): the free physical memory, capped
    by what the commit limit (physical memory plus page file) leaves, since Windows refuses an allocation past that
    limit however much memory is free. None where the call is missing or fails."""
    try:
        import ctypes

        class MemoryStatusEx(ctypes.Structure):  # MEMORYSTATUSEX
            _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),
                        ("ullTotalPhys", ctypes.c_uint64), ("ullAvailPhys", ctypes.c_uint64),
                        ("ullTotalPageFile", ctypes.c_uint64), ("ullAvailPageFile", ctypes.c_uint64),
                        ("ullTotalVirtual", ctypes.c_uint64), ("ullAvailVirtual", ctypes.c_uint64),
                        ("ullAvailExtendedVirtual", ctypes.c_uint64)]  # fmt: skip

        status = MemoryStatusEx()
        status.dwLength = ctypes.sizeof(MemoryStatusEx)
        kernel32 = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined]  # our own handle: no shared argtypes changed
        kernel32.GlobalMemoryStatusEx.argtypes = [ctypes.POINTER(MemoryStatusEx)]
        if not kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return None
        available = int(status.ullAvailPhys)
        if status.ullAvailPageFile:
            available = min(available, int(status.ullAvailPageFile))
        return available or None
    except Exception:  # no ctypes.WinDLL (not Windows), a call that fails: not measured
        return None


def _sysctl_uint64(libc, name: str) -> int | None:
    """A 64-bit integer from macOS's ``sysctlbyname`` (``hw.memsize``), or None."""
    import ctypes

    value, size = ctypes.c_uint64(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint64))
    if libc.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        return None
    return int(value.value) or None


#: ``HOST_VM_INFO64`` and ``HOST_VM_INFO64_COUNT`` (``sizeof(vm_statistics64_data_t) / sizeof(integer_t)``) of
#: ``<mach/host_info.h>``; the counts read are the first fields, ``free_count`` then ``active_count``, ``inactive_count``.
_HOST_VM_INFO64, _HOST_VM_INFO64_COUNT = 4, 38
#: This process's host port (``mach_host_self``), taken once: each call adds a reference to the port that nothing
#: gives back, which would grow in a long-lived process (Slicer's, a notebook) that measures memory for every run.
_mach_host_port: int | None = None


def _mach_host(libc) -> int:
    """This process's host port (:data:`_mach_host_port`), asked of ``libc`` the first time only."""
    global _mach_host_port
    if not _mach_host_port:
        import ctypes

        libc.mach_host_self.restype = ctypes.c_uint32
        _mach_host_port = int(libc.mach_host_self())
    return _mach_host_port


def _macos_available_memory() -> int | None:
    """Bytes of memory available on macOS: the free and the inactive pages (``host_statistics64``, as ``vm_stat``
    counts them: macOS keeps most of its memory in use as caches, and inactive pages are the first it takes back, so
    the free pages alone would refuse most runs), at most the physical memory (``hw.memsize``). Where the page counts
    cannot be read, half the physical memory: a cautious guess, which may refuse or shrink a run that would have fit
    but never plans one past the machine. None where not even ``hw.memsize`` can be read."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)  # the process's own symbols: libSystem on macOS
        libc.sysctlbyname.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                      ctypes.c_void_p, ctypes.c_size_t]  # fmt: skip
        physical = _sysctl_uint64(libc, "hw.memsize")
    except Exception:  # no sysctlbyname (not macOS)
        return None
    if physical is None:
        return None
    try:
        libc.host_page_size.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_size_t)]
        libc.host_statistics64.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p,
                                           ctypes.POINTER(ctypes.c_uint32)]  # fmt: skip
        host = _mach_host(libc)
        page, counts = ctypes.c_size_t(0), (ctypes.c_uint32 * 64)()  # room to spare past the 38 fields
        count = ctypes.c_uint32(_HOST_VM_INFO64_COUNT)
        if (libc.host_page_size(host, ctypes.byref(page)) != 0 or not page.value
                or libc.host_statistics64(host, _HOST_VM_INFO64, ctypes.byref(counts), ctypes.byref(count)) != 0
                or count.value < 3):  # fmt: skip
            raise OSError("host_statistics64 failed")
        free_and_inactive = (int(counts[0]) + int(counts[2])) * int(page.value)
        return min(free_and_inactive, physical)
    except Exception:
        return physical // 2


def _platform_available_memory() -> int | None:
    """Bytes of free memory from the system's own call where there is no ``/proc`` (Windows, macOS), else None."""
    if ON_WINDOWS:
        return _windows_available_memory()
    if sys.platform == "darwin":
        return _macos_available_memory()
    return None


def host_available_memory() -> int:
    """Bytes of memory available to this process: MemAvailable, capped by a cgroup limit and by what this process's
    address-space limit (``ulimit -v``) leaves it (:func:`address_space_left`). Without ``/proc``, the system's own
    figure (``SC_AVPHYS_PAGES``; on Windows ``GlobalMemoryStatusEx``, on macOS ``host_statistics64``). Where nothing
    tells it, :data:`UNKNOWN_MEMORY` (work is then neither refused nor made smaller for want of memory), said once
    in the log with the variable that sets the figure instead."""
    global _UNMEASURED_MEMORY_SAID
    candidates = [v for v in (proc_bytes("/proc/meminfo", "MemAvailable"), _cgroup_available(), address_space_left())
                  if v is not None]  # fmt: skip
    if not candidates:
        try:
            candidates.append(int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")))
        except (ValueError, OSError, AttributeError):  # Windows: no sysconf; macOS: no SC_AVPHYS_PAGES
            measured = _platform_available_memory()
            if measured is None:
                if not _UNMEASURED_MEMORY_SAID:
                    _UNMEASURED_MEMORY_SAID = True
                    logger.warning("the free memory could not be measured on this system, so no run is refused or "
                                   "made smaller for want of memory: set %s (e.g. 8GiB) to the memory a run may use",
                                   MEMORY_LIMIT_ENV)  # fmt: skip
                return UNKNOWN_MEMORY
            candidates.append(measured)
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

    capped = memory_limit_from_env()
    limit = capped or host_available_memory()
    if n_bytes > limit:  # the user's own cap is no statement of what the machine has
        left = None if capped else address_space_left()
        if capped:
            bound, more = f"{MEMORY_LIMIT_ENV} allows {format_bytes(limit)}", f"or raise {MEMORY_LIMIT_ENV}"
        elif left is not None and left <= limit:  # the session's limit binds, not the machine
            bound = f"this session's address-space limit (ulimit -v) leaves {format_bytes(left)}"
            more = "or raise that limit (ulimit -v, or the job scheduler's memory request)"
        else:
            bound, more = f"{format_bytes(limit)} is available", "free memory, or use a machine with more memory"
        raise ResourceError(f"not enough memory: {what} needs about {format_bytes(n_bytes)}, but {bound}. "
                            f"{advice[:1].upper() + advice[1:]}, {more}.")  # fmt: skip


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (Linux ``/proc/self/statm``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes: ``VmHWM`` from /proc/self/status (Linux), else
    ``ru_maxrss`` (kibibytes on Linux and the BSDs, bytes on macOS), else the peak working set (Windows, which has no
    ``resource`` module); 0 where none can be read. A figure for reports and notes, read when a run has finished:
    it must never fail that run."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    try:
        import resource

        maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except (ImportError, OSError, ValueError, AttributeError):
        return _windows_peak_working_set() or 0
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _windows_peak_working_set() -> int | None:
    """This process's peak working set in bytes (``GetProcessMemoryInfo``'s ``PeakWorkingSetSize``, Windows), or None
    where it cannot be read."""
    try:
        import ctypes

        size_t = ctypes.c_size_t

        class ProcessMemoryCounters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS
            _fields_ = [("cb", ctypes.c_uint32), ("PageFaultCount", ctypes.c_uint32), ("PeakWorkingSetSize", size_t),
                        ("WorkingSetSize", size_t), ("QuotaPeakPagedPoolUsage", size_t),
                        ("QuotaPagedPoolUsage", size_t), ("QuotaPeakNonPagedPoolUsage", size_t),
                        ("QuotaNonPagedPoolUsage", size_t), ("PagefileUsage", size_t),
                        ("PeakPagefileUsage", size_t)]  # fmt: skip

        counters = ProcessMemoryCounters()
        counters.cb = ctypes.sizeof(ProcessMemoryCounters)
        kernel32, psapi = ctypes.WinDLL("kernel32"), ctypes.WinDLL("psapi")  # type: ignore[attr-defined]
        kernel32.GetCurrentProcess.restype = ctypes.c_void_p  # a HANDLE (the pseudo handle -1): not a C int
        psapi.GetProcessMemoryInfo.argtypes = [ctypes.c_void_p, ctypes.POINTER(ProcessMemoryCounters),
                                               ctypes.c_uint32]  # fmt: skip
        if not psapi.GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
            return None
        return int(counters.PeakWorkingSetSize) or None
    except Exception:  # no ctypes.WinDLL (not Windows), a call that fails
        return None


_ALLOCATOR_TUNED = False


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the system.

    CPU convolutions allocate and free activation buffers of a few MB at every layer; by default glibc
    maps each one afresh (``mmap``) and the kernel zeroes its pages, which costs about a third of the CPU
    time of the through-plane predictor (measured: 9.3 s -> 6.2 s). Raising the mmap and trim thresholds
    (``mallopt``) lets the heap reuse them. Process-wide and never undone, so only one-shot processes call
    it (the ``sr``, ``evaluate``, ``xray2ct``, ``evaluate-xray``, ``demo`` and every ``train`` command, the
    Slicer CLIs, the benchmarks), not the library: a long-lived process (Slicer, a test session) would keep
    every freed block. Idempotent; a no-op where glibc is absent or ``DIFFUSIONCORE_KEEP_FREED_MEMORY=0`` (the
    test suite sets it, since it runs the commands in its own process).

    Returns:
        True when the setting was applied (now or before).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("DIFFUSIONCORE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = all(
            libc.mallopt(param, value) == 1
            for param, value in ((m_mmap_threshold, 256 << 20), (m_trim_threshold, 512 << 20), (m_top_pad, 64 << 20))
        )
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


def file_size_limit() -> int | None:
    """This process's file-size limit in bytes (``ulimit -f``, the soft ``RLIMIT_FSIZE``), or None when there is none
    (unlimited, or a system without the ``resource`` module: Windows). A write past it fails with ``EFBIG``, or stops
    short without a word in a library that ignores the error (ITK)."""
    return soft_limit("RLIMIT_FSIZE")


def _file_size_reason(folder: str | os.PathLike, needed_bytes: int, exc: BaseException | None) -> str:
    """Why a write failed when it hit a limit on the size of one file (``""`` when it did not): this session's
    ``ulimit -f`` (below ``needed_bytes``, or ``exc`` is ``EFBIG``), or, for ``EFBIG`` with no such limit, the largest
    file the file system holding ``folder`` takes (FAT32: 4 GiB)."""
    too_large = isinstance(exc, OSError) and exc.errno == errno.EFBIG
    other_error = isinstance(exc, OSError) and exc.errno is not None and not too_large  # EACCES, EIO: not the limit
    limit = file_size_limit()
    if limit is not None and (too_large or (limit < needed_bytes and not other_error)):
        return (f"the file would exceed this session's file-size limit (ulimit -f: {format_bytes(limit)}; the file "
                f"needs up to {format_bytes(needed_bytes)}): raise it (ulimit -f unlimited) or write a smaller file")  # fmt: skip
    if too_large:
        return (f"the file is larger than the file system holding {folder} takes (it needs up to "
                f"{format_bytes(needed_bytes)}; FAT32, e.g. on a USB stick, takes at most 4 GiB): write to another "
                "folder, or a smaller file")  # fmt: skip
    return ""


def no_room_reason(folder: str | os.PathLike, needed_bytes: int, exc: BaseException | None = None) -> str:
    """Why a write into ``folder`` that failed most likely failed for want of room, in words (``""`` when the disk it
    is on has room for ``needed_bytes``, no file-size limit is below it, and ``exc`` is no "no space left" or "file too
    large" error): ITK says only "Error writing", with no reason. A file-size limit (``ulimit -f``, ``EFBIG``) is told
    apart from a full disk."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and (limited := _file_size_reason(folder, needed_bytes, exc)):
        return limited
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    if not full and free >= needed_bytes:
        return ""
    return (
        f"the disk holding {folder} is full ({format_bytes(free)} free; the file needs up to "
        f"{format_bytes(needed_bytes)}): free some space there or write to another folder"
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# -- native libraries' console output ---------------------------------------------------------------------
_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Capture what native code (ITK, its MetaImage and NIfTI libraries) writes to the process's stderr (file
    descriptor 2) while the block runs: such text bypasses Python and would otherwise reach the user as stray
    lines beside the one ``error:`` line. The lines are logged at debug level (``--verbose`` shows them) and
    handed back, so the caller can report their substance in its own message.

    Only one thread captures at a time; a block entered while another thread captures runs uncaptured.

    Yields:
        A list, filled with the captured lines when the block ends.
    """
    lines: list[str] = []
    if not _CAPTURE_LOCK.acquire(blocking=False):
        yield lines
        return
    try:
        try:
            sink = tempfile.TemporaryFile()
        except OSError as exc:  # no writable temporary folder at all: the block runs, its console output uncaptured
            logger.debug("native library output is not captured: no temporary file can be made (%s)", exc)
            sink = None
        if sink is None:
            yield lines
            return
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
        with sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read(1 << 16).decode("utf-8", "replace")
                lines.extend(line.strip() for line in text.splitlines() if line.strip())
                for line in lines:
                    logger.debug("native library: %s", line)
    finally:
        _CAPTURE_LOCK.release()


# -- compressed data --------------------------------------------------------------------------------------
class CompressedDataError(Exception):
    """A compressed stream that cannot be inflated: ``kind`` is ``"truncated"`` (it ends early),
    ``"corrupt"`` (its bytes or checksum are wrong) or ``"not compressed"`` (no zlib/gzip header)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def looks_compressed(head: bytes) -> bool:
    """Whether bytes start like a gzip member (1f 8b) or a zlib stream (deflate, header checksum valid)."""
    if head[:2] == b"\x1f\x8b":
        return True
    return len(head) >= 2 and head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and int.from_bytes(head[:2], "big") % 31 == 0


def inflated_size(f) -> int:
    """Inflate a zlib or gzip stream read from the binary file object ``f`` (from its current position) and
    return its uncompressed size, verifying its checksum; nothing larger than a block is held in memory.

    Args:
        f: a binary file object positioned at the stream.

    Raises:
        CompressedDataError: ``truncated`` when the stream ends before its end marker; ``corrupt`` when a byte
            or the checksum (CRC-32, Adler-32) is wrong; ``not compressed`` when it does not start like one.
    """
    inflater = zlib.decompressobj(47)  # 32 + 15: a zlib or a gzip header, detected
    size = 0
    block = f.read(_CHUNK)
    if not looks_compressed(block):
        raise CompressedDataError("not compressed", "no zlib or gzip header")
    while block:
        data = block
        while data:
            try:
                out = inflater.decompress(data, _CHUNK)
            except zlib.error as exc:
                raise CompressedDataError("corrupt", str(exc)) from None
            size += len(out)
            if inflater.eof:
                return size
            data = inflater.unconsumed_tail
        block = f.read(_CHUNK)
    if not inflater.eof:
        raise CompressedDataError("truncated", "the stream ends before its end marker")
    return size


def _jsonable(value):
    """What JSON cannot hold: arrays and tensors as lists, anything else as its text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _finite_only(value):
    """NaN and infinities as ``null`` (JSON has no such numbers; strict readers refuse ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_only(x) for k, x in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_only(x) for x in value]
    return value


#: Suffixes of single-file volumes (".dcm" files are grouped into series folders instead).
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Suffixes of list files as ``sr`` and ``evaluate`` take them (``train --data`` reads any file that is not a volume
#: as a list). ".csv": a one-column list saved from a spreadsheet (one path per line; a comma is part of the path).
LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv")
#: Bytes of a file read to tell text from an image.
_TEXT_PROBE_BYTES = 1 << 14


def is_text_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a non-empty text file (UTF-8, or Latin-1 without control bytes), judged from its first
    16 KiB: no NUL byte and no control characters besides tab, CR, LF and form feed. Images (DICOM, PNG, NIfTI,
    the voxels after a NRRD or MetaImage header) fail this at once."""
    try:
        with open(path, "rb") as f:
            head = f.read(_TEXT_PROBE_BYTES)
    except OSError:
        return False
    if not head.strip():
        return False
    controls = set(range(32)) - {9, 10, 12, 13}
    return not any(b in controls or b == 127 for b in head)


def text_file_error(path: str | os.PathLike) -> InputError | None:
    """The refusal of a text file given where one volume is read (``sr cases OUT`` with a list of volumes saved
    without a list suffix: it would be read as an image and refused for its output's name), or None when ``path``
    is not a text file. A list file (:data:`LIST_SUFFIXES`) is not refused here: the commands read it as a batch;
    nor is a volume file's text header (:data:`VOLUME_SUFFIXES`)."""
    p = Path(path)
    volume = p.name.lower().endswith(VOLUME_SUFFIXES)  # a NRRD or MetaImage header (.nhdr, .mhd) is text too
    if volume or not p.is_file() or p.suffix.lower() in LIST_SUFFIXES or not is_text_file(p):
        return None
    listing = ", ".join(LIST_SUFFIXES[:-1]) + f" or {LIST_SUFFIXES[-1]}"
    return InputError(
        f"{p} is a text file, not a volume; a list of volumes needs the suffix {listing} (rename it, e.g. "
        f"{p.with_suffix('.txt').name}), and a volume is a NIfTI, NRRD or MetaImage file or a DICOM series."
    )


def folder_writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: a private probe file is created and removed (the
    permission bits alone do not say it for root, ACLs, read-only or network file systems)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return True


def check_writable_file(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``path`` as a Path once a file can be written there (a report, a JSON of scores).

    Raises:
        OutputExistsError: the file exists without ``overwrite``.
        OutputError: ``path`` is a folder, or its folder is missing or not writable.
    """
    p = Path(path)
    check_name_length(p)
    if p.is_dir():  # --overwrite would not help: the rename onto a folder fails after the work
        raise OutputError(f"{p} is a folder: give the name of a file to write, e.g. {p / 'report.json'}")
    if p.exists() and not overwrite:
        raise OutputExistsError(p)
    if not p.parent.is_dir() or not folder_writable(p.parent):
        raise OutputError(f"cannot write {p}: the folder {p.parent} does not exist or is not writable.")
    return p


def write_json_atomic(
    data, path: str | os.PathLike, *, overwrite: bool = True, durable: bool = False, nonfinite_as_null: bool = True
) -> Path:
    """Write ``data`` as indented JSON, atomically: the file appears whole or not at all.

    Args:
        data: JSON-serialisable data; arrays and tensors become lists, other objects their text.
        path: the file.
        overwrite: replace an existing file (else :class:`OutputError`).
        durable: flush to disk before the rename (checkpoint state that a crash must not lose).
        nonfinite_as_null: write NaN and infinities as ``null`` (reports, for any JSON reader); ``False``
            keeps Python's ``NaN`` / ``Infinity`` (state read back by DiffusionCore itself).

    Raises:
        OutputError: the file exists without ``overwrite``, its folder is missing or not writable, or the file cannot
            be written whole (a full disk, a file-size limit: the message says which, as a volume's does); no partial
            file is left.
    """
    p = check_writable_file(path, overwrite=overwrite)
    text = json.dumps(_finite_only(data) if nonfinite_as_null else data, indent=2, default=_jsonable) + "\n"
    remove_stale_partials(p)
    tmp = None
    try:
        tmp = partial_file(p)
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        publish(tmp, p, overwrite=overwrite)
    except OutputError:  # OutputExistsError: a file appeared at ``p`` meanwhile
        raise
    except OSError as exc:
        why = no_room_reason(p.parent, len(text.encode("utf-8")), exc) or exc.strerror or str(exc)
        raise OutputError(f"could not write {p}: {why}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return p
