"""Finding the CT volumes a command uses (training data, a batch of ``sr`` inputs).

Volumes can be given as

* a folder: every NIfTI / NRRD / MetaImage file below it, and every folder holding a DICOM series
  (``.dcm`` files or extension-less files with the DICOM preamble), recursively; hidden entries skipped;
* a text file with one path per line (relative paths are relative to the text file; ``#`` starts a comment);
* a single volume file;
* a list of any of these.

Each returned path is something :func:`DiffusionCore.volume.read_volume` opens (a file or a DICOM folder).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError

logger = logging.getLogger(__name__)

#: Suffixes of single-file volumes (".dcm" files are grouped into series folders instead).
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_DICOM_MAGIC_OFFSET = 128


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_volume_file(path: Path) -> bool:
    """True for a NIfTI / NRRD / MetaImage file name."""
    return _suffix(path) in VOLUME_SUFFIXES


def is_dicom_file(path: Path) -> bool:
    """True for ``*.dcm`` or a file with the ``DICM`` marker after the 128-byte preamble."""
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(_DICOM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _scan_folder(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        root_path = Path(root)
        has_dicom = False
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = root_path / name
            if is_volume_file(p):
                found.append(p)
            elif not has_dicom and is_dicom_file(p):
                has_dicom = True
        if has_dicom:
            found.append(root_path)
    return found


def _read_list_file(path: Path) -> list[Path]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"cannot read {path} as a list of volumes ({exc}): give a folder, a volume file, or a text file "
            "with one path per line"
        ) from exc
    out: list[Path] = []
    for number, line in enumerate(lines, start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        p = Path(entry).expanduser()
        if not p.is_absolute():
            p = path.parent / p
        if not p.exists():
            raise InputError(f"{path}, line {number}: {entry} does not exist; fix or remove that line")
        out.extend(_expand(p))
    return out


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        return _scan_folder(path)
    if is_volume_file(path) or is_dicom_file(path):
        return [path.parent] if path.suffix.lower() == ".dcm" or not path.suffix else [path]
    return _read_list_file(path)


def collect_volumes(data: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """All CT volumes named by ``data`` (folder, list file, volume file, or a list of these).

    Args:
        data: see the module docstring.

    Returns:
        Volume files and DICOM series folders, without duplicates; folder contents sorted by path, list
        order kept.

    Raises:
        InputError: a path does not exist, or no CT volume was found.
    """
    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    if not items:
        raise InputError("no training data given: pass a folder of CT volumes, a list file, or volume files")
    found: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if not p.exists():
            raise InputError(f"{p} does not exist: check the path")
        found.extend(_expand(p))
    unique = list(dict.fromkeys(found))
    if not unique:
        where = ", ".join(str(i) for i in items)
        raise InputError(
            f"no CT volumes found in {where}: expected NIfTI (.nii, .nii.gz), NRRD, MHA/MHD files or folders "
            "holding DICOM series"
        )
    logger.info("found %d CT volume(s)", len(unique))
    return unique
