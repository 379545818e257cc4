"""Finding the CT volumes a command uses (training data, a batch of ``sr`` inputs).

Volumes can be given as

* a folder: every NIfTI / NRRD / MetaImage file below it, and every folder holding a DICOM series
  (``.dcm`` files or extension-less files with the DICOM preamble), recursively, through symbolic links to folders
  too (each real folder searched once, so a link loop ends); hidden entries skipped, and DICOM folders that hold no
  CT series (radiographs, scouts, single images, reports, structure sets, plans: :data:`NOT_VOLUME_MODALITIES`, and
  any object without an image) passed over with a warning;
* a text file with one path per line (see :func:`_read_list_file`: UTF-8, relative paths taken from the list file's
  folder, a line starting with ``#`` a comment);
* a single volume file;
* the name of a CT sample (``chest-lidc``, ``chest-dx``: fetched and sha256-checked, as ``sr`` takes it) where no such
  path exists;
* a list of any of these.

Each returned path is something :func:`DiffusionCore.volume.read_volume` opens (a file or a DICOM folder);
:func:`readable_volumes` reads them for training, passing over DICOM series that cannot be read as one volume.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from .dicom_in import NOT_VOLUME_MODALITIES, header_values, localizers_only_error
from .errors import InputError
from .files import VOLUME_SUFFIXES

logger = logging.getLogger(__name__)

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


#: The header elements :func:`_dicom_kind` decides from: keyword -> SimpleITK's tag key.
_KIND_TAGS = {"SOPClassUID": "0008|0016", "Modality": "0008|0060", "NumberOfFrames": "0028|0008",
              "ImageType": "0008|0008", "Rows": "0028|0010"}  # fmt: skip


def _kind_fields(path: Path) -> dict[str, str] | None:
    """:data:`_KIND_TAGS` of a DICOM file's header, read by SimpleITK, or by pydicom where SimpleITK cannot (it reads
    no object without an image: structure sets, plans, reports); None when neither can."""
    from .volume import dicom_header

    try:
        r = dicom_header(str(path))
    except InputError:
        fields = header_values(path, list(_KIND_TAGS))
        return fields if fields and (fields["SOPClassUID"] or fields["Modality"]) else None  # else: no DICOM
    fields = {name: r.GetMetaData(key).strip() if r.HasMetaDataKey(key) else "" for name, key in _KIND_TAGS.items()}
    return {**fields, "Rows": str(r.GetSize()[1])}  # SimpleITK reads the headers of images only


def _dicom_kind(path: Path) -> tuple[str, int] | None:
    """``(what the file is if it is no slice of a volume, or "", its number of frames)`` from its header, or None
    when the header cannot be read (left to the volume reader, which names the file)."""
    from .volume import is_localizer

    fields = _kind_fields(path)
    if fields is None:
        return None
    modality = fields["Modality"].upper()
    try:
        frames = int(fields["NumberOfFrames"] or 1)
    except ValueError:
        frames = 1
    if not fields["Rows"]:  # no Image Pixel module: a structure set, plan, report, key object, DICOMDIR, ...
        return f"{modality or 'DICOM'} objects (no image)", frames
    if modality in NOT_VOLUME_MODALITIES:
        return f"{modality} images", frames
    if is_localizer(fields["ImageType"]):
        return _LOCALIZERS, frames
    return "", frames


def _not_a_ct_series(dicom_files: Iterable[Path]) -> str:
    """Why a folder's DICOM files hold no CT series (e.g. "CR images"), or ``""`` when they may: decided from the
    headers of as few files as it takes (the first, for a CT series)."""
    files = iter(dicom_files)
    kinds: set[str] = set()
    for path in files:
        kind = _dicom_kind(path)
        if kind is None:
            return ""
        what, frames = kind
        if what:
            kinds.add(what)
            continue
        if frames > 1 or next(files, None) is not None:  # a multi-frame volume, or a second file: a series
            return ""
        return "a single image, not a series of slices"
    return ", ".join(sorted(kinds))


#: Why a DICOM folder holding only CT localizers is no CT series (:func:`_dicom_kind`).
_LOCALIZERS = "CT localizers (topograms or scouts)"


class _Scan:
    """What a search for volumes keeps across the folders and list files it goes through."""

    def __init__(self) -> None:
        self.skipped: list[tuple[Path, str]] = []  # DICOM folders that hold no CT series, and why
        self.searched: dict[str, Path] = {}  # real path of each folder searched -> the path it was searched by


def walk_folder(folder: Path, searched: dict[str, Path]) -> Iterator[tuple[Path, list[Path]]]:
    """Each folder below ``folder`` (itself first, then its subfolders, sorted) with its files, sorted: recursively,
    through symbolic links to folders too (a cohort split into train/val by links to series), hidden entries skipped.

    Args:
        searched: real path of each folder searched -> the path it was searched by, shared across the calls of one
            search, so that a link loop ends and a folder reached twice (two links, given twice) is searched once.
    """
    for root, dirs, files in os.walk(folder, followlinks=True):
        root_path = Path(root)
        real = os.path.realpath(root)
        if real in searched:
            dirs[:] = []
            if searched[real] != root_path:
                logger.info("skipped %s: the same folder (%s) as %s, searched already", root_path, real,
                            searched[real])  # fmt: skip
            continue
        searched[real] = root_path
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield root_path, [root_path / n for n in sorted(files) if not n.startswith(".")]


def _scan_folder(folder: Path, scan: _Scan) -> list[Path]:
    found: list[Path] = []
    for root_path, paths in walk_folder(folder, scan.searched):
        found.extend(p for p in paths if is_volume_file(p))
        dicom = (p for p in paths if not is_volume_file(p) and is_dicom_file(p))  # read lazily: few are needed
        first = next(dicom, None)
        if first is None:
            continue
        why = _not_a_ct_series(itertools.chain([first], dicom))
        if why:
            scan.skipped.append((root_path, why))  # said once the scan is over: in the error, if nothing is left
            continue
        found.append(root_path)
    return found


def _read_list_file(path: Path, scan: _Scan) -> list[Path]:
    """The volumes a list file names (:func:`read_list_file`), folders among them searched for volumes."""
    return read_list_file(path, lambda p: _expand(p, scan))


def read_list_file(path: Path, expand: Callable[[Path], list[Path]], noun: str = "volume") -> list[Path]:
    """The inputs a list file names, each existing path given to ``expand`` (a folder searched, a file kept, as the
    command takes them); ``noun``: what they are, for the messages. One path per line, in UTF-8 (a byte-order mark,
    as Windows tools write, is ignored; so are CR-LF line ends and blank lines).

    * A relative path is taken from the list file's folder, not the working folder.
    * A line whose first non-blank character is ``#`` is a comment; so is the rest of a line from a ``#`` after a
      space or tab (``data/case1  # DICOM``), unless the whole line names a path that exists (``Serie #3/``). A
      ``#`` inside a name (``Patient#12/``) is always part of it.
    * One pair of double quotes around a path is removed (Windows Explorer's "Copy as path" adds them).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}): save it as "
            "UTF-8 (e.g. Notepad's \"UTF-8\" encoding, Excel's \"CSV UTF-8\"), one path per line"
        ) from None
    except OSError as exc:
        raise InputError(
            f"cannot read {path} as a list of {noun}s ({exc}): give a folder, a {noun} file, or a text file "
            "with one path per line"
        ) from exc
    entries = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    entries = [(number, entry) for number, entry in entries if entry and not entry.startswith("#")]
    named = [(number, entry, *_list_entry(entry, path.parent)) for number, entry in entries]
    if named and _is_header(path, named):
        number, entry = named[0][:2]
        logger.info("%s, line %d: %s is the column's header, not a path: skipped", path, number, entry)
        named = named[1:]
    out: list[Path] = []
    for number, _, p, relative in named:
        if not p.exists():  # as an unreadable entry: named here, then passed over (sr, evaluate) or refused (train)
            where = f"{p} (relative paths are taken from the list file's folder)" if relative else str(p)
            logger.warning("%s, line %d: %s does not exist; fix or remove that line (the other %ss go on)",
                           path, number, where, noun)  # fmt: skip
            out.append(p)
            continue
        out.extend(expand(p))
    return out


#: First lines of a one-column list saved from a spreadsheet that name the column, not a volume (lower case).
LIST_HEADERS = ("path", "paths", "file", "files", "filename", "file name", "filepath", "file path", "volume",
                "volumes", "input", "inputs", "image", "images", "scan", "scans", "ct", "series", "case", "cases",
                "radiograph", "radiographs", "xray", "x-ray", "xrays", "x-rays")


def _is_header(path: Path, named: list[tuple[int, str, Path, bool]]) -> bool:
    """Whether the first entry of a list file is a spreadsheet's column header (``path``, as Excel writes a one-column
    CSV with a title): it is no existing path, and it is one of :data:`LIST_HEADERS`, or (in a ``.csv``) every other
    entry exists."""
    _, entry, p, _ = named[0]
    if p.exists():
        return False
    if entry.strip('"').strip().lower() in LIST_HEADERS:
        return True
    rest = named[1:]
    return path.suffix.lower() == ".csv" and bool(rest) and all(q.exists() for *_, q, _ in rest)


def _list_entry(entry: str, folder: Path) -> tuple[Path, bool]:
    """(the path, relative?) a list file's line names (see :func:`_read_list_file`): the whole line where it
    exists, else the line without a trailing comment; relative paths taken from ``folder``."""

    def resolved(text: str) -> tuple[Path, bool]:
        text = text.strip()
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1].strip()
        p = Path(text).expanduser()
        return (p, False) if p.is_absolute() else (folder / p, True)

    whole = resolved(entry)
    comment = re.search(r"\s#", entry)
    if comment is None or whole[0].exists():
        return whole
    return resolved(entry[: comment.start()])


def dicom_file_series(path: Path) -> Path:
    """The folder read for a single DICOM file given as input (its series is read from the folder), after
    checking that the file itself is a readable DICOM image: a corrupt file is named, not its folder.

    Raises:
        InputError: the file's header cannot be read; the message names the file and what to do.
    """
    from .volume import dicom_header

    try:
        dicom_header(str(path))
    except InputError as exc:
        raise InputError(f"{exc}. The DICOM file given cannot be read, so neither can its series: copy or export "
                         f"it again, or give the folder of a readable CT series.") from None  # fmt: skip
    return path.parent


def _expand(path: Path, scan: _Scan) -> list[Path]:
    if path.is_dir():
        return _scan_folder(path, scan)
    if is_volume_file(path) or is_dicom_file(path):
        return [dicom_file_series(path)] if path.suffix.lower() == ".dcm" or not path.suffix else [path]
    return _read_list_file(path, scan)


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
    from .sampledata import sample_or_path

    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    if not items:
        raise InputError("no training data given: pass a folder of CT volumes, a list file, or volume files")
    found: list[Path] = []
    scan = _Scan()
    for item in items:
        p = sample_or_path(item, "ct").expanduser()  # a CT sample's name that is no path here: its fetched file
        if not p.exists():
            raise InputError(f"{p} does not exist: check the path")
        found.extend(_expand(p, scan))
    unique = list(dict.fromkeys(found))
    skipped = scan.skipped
    if not unique:
        if len(items) == 1 and skipped == [(p, _LOCALIZERS)]:  # the folder given is a scout series: say just that
            raise localizers_only_error(p)
        where = ", ".join(str(i) for i in items)
        passed_over = f" ({'; '.join(f'{folder} holds {why}' for folder, why in skipped)})" if skipped else ""
        raise InputError(
            f"no CT volumes found in {where}{passed_over}: expected NIfTI (.nii, .nii.gz), NRRD, MHA/MHD files or "
            "folders holding DICOM series of CT slices"
        )
    for folder, why in skipped:
        logger.warning("skipped %s: its DICOM files are %s, not a CT series", folder, why)
    # candidates, not yet read (readable_volumes counts the CT volumes); one input that is itself a volume: no news
    logger.log(logging.INFO if len(unique) > 1 or skipped else logging.DEBUG,
               "found %d DICOM series or volume file(s) to read", len(unique))  # fmt: skip
    return unique


def readable_volumes(paths: Iterable[str | os.PathLike]):
    """Read each volume of ``paths`` (from :func:`collect_volumes`) in turn, yielding ``(path, Volume)``.

    A DICOM series folder that cannot be read as one regular CT volume (missing slices, slices unevenly spaced or
    in mixed orientations, a corrupt file, no CT values) is passed over with a warning naming it and why, as folders
    holding no CT series are when the volumes are collected: a cohort (e.g. LIDC-IDRI) holds a few such series, and
    one of them must not stop a training run on the rest. A volume file that cannot be read stops with its error, and
    so does a run in which no volume can be read (InputError listing why each failed). Once all are read, an info
    line counts the CT volumes read, and those passed over.
    """
    from .volume import read_volume

    failed: list[str] = []
    read = 0
    for p in paths:
        path = Path(p)
        try:
            vol = read_volume(path)
        except InputError as exc:
            if not path.is_dir():
                raise
            failed.append(f"{path}: {exc}")
            logger.warning("passed over %s: %s", path, exc)
            continue
        read += 1
        yield path, vol
    if not read and failed:
        raise InputError("none of the CT volumes could be read: " + "; ".join(failed))
    passed = f"; passed over {len(failed)} of the {read + len(failed)} found (see the warnings above)" if failed else ""
    logger.info("found %d CT volume(s)%s", read, passed)


def done_through(paths: Sequence[str | os.PathLike], path: str | os.PathLike) -> int:
    """How many of ``paths`` are behind once :func:`readable_volumes` has yielded ``path`` (1-based): the ones it
    passed over count, so that progress over a cohort reaches its total."""
    target = Path(path)
    return next(n for n, p in enumerate(paths, start=1) if Path(p) == target)
