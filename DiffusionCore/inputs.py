"""Finding the CT volumes a command uses (training data, a batch of ``sr`` inputs).

Volumes can be given as

* a folder: every NIfTI / NRRD / MetaImage file below it, and every folder holding a DICOM series
  (``.dcm`` files or extension-less files with the DICOM preamble), recursively, through symbolic links to folders
  too (each real folder searched once, so a link loop ends); hidden entries skipped, and DICOM folders that hold no
  CT series (radiographs, scouts, single images, reports, structure sets, plans: :data:`NOT_VOLUME_MODALITIES`, and
  any object without an image) passed over with a warning;
* a text file with one path per line (see :func:`read_list_file`: UTF-8, relative paths taken from the list file's
  folder, a line starting with ``#`` a comment, the first column of a spreadsheet's ``.csv``);
* a single volume file;
* the name of a CT sample (``chest-lidc``, ``chest-dx``: fetched and sha256-checked, as ``sr`` takes it) where no such
  path exists;
* a list of any of these.

Each returned path is something :func:`DiffusionCore.volume.read_volume` opens (a file or a DICOM folder);
:func:`readable_volumes` reads them for training, passing over DICOM series that cannot be read as one volume, and
volumes that are no acquired CT (this software's synthetic results, ``prepare-xray-data`` cubes, non-CT values).
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .dicom_in import NOT_VOLUME_MODALITIES, header_values, localizers_only_error
from .errors import InputError, ResourceError
from .files import VOLUME_SUFFIXES, not_regular_kind

logger = logging.getLogger(__name__)

_DICOM_MAGIC_OFFSET = 128


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_volume_file(path: Path) -> bool:
    """True for a NIfTI / NRRD / MetaImage file name."""
    return _suffix(path) in VOLUME_SUFFIXES


def has_dicom_marker(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds the ``DICM`` marker after the 128-byte preamble (a DICOM file, Part 10), whatever its
    name: DICOM receivers and PACS exports name files by their UID (``1.2.840.113619.2.55.3.12345``), discs
    ``IM000001``, others ``.dicom``; the preamble itself may be anything (a TIFF header, in a dual-format file)."""
    if not_regular_kind(path):  # a FIFO's open waits for a writer forever; a device never ends
        return False
    try:
        with open(path, "rb") as f:
            f.seek(_DICOM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: Path) -> bool:
    """True for a file with the ``DICM`` marker (:func:`has_dicom_marker`), whatever its name or suffix, and for a
    ``*.dcm`` file without it (a dataset written without the preamble)."""
    return path.suffix.lower() == ".dcm" or has_dicom_marker(path)


#: The header elements :func:`_dicom_kind` decides from: keyword -> SimpleITK's tag key.
_KIND_TAGS = {"SOPClassUID": "0008|0016", "Modality": "0008|0060", "NumberOfFrames": "0028|0008",
              "ImageType": "0008|0008", "Rows": "0028|0010"}  # fmt: skip


def _kind_fields(path: Path) -> dict[str, str] | None:
    """:data:`_KIND_TAGS` of a DICOM file's header, read by SimpleITK, or by pydicom where SimpleITK cannot (it reads
    no object without an image: structure sets, plans, reports); None when neither can."""
    from .volume import dicom_header

    try:
        r = dicom_header(str(path))
    except ResourceError:
        return None  # a Deflated file too large to inflate: left to the volume reader, which refuses it by name
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


#: Why the search of a folder left out its files that are neither a volume file nor DICOM (a folder holding no DICOM).
NOT_VOLUME_FILES = "files that are no CT volume (not NIfTI, NRRD, MetaImage or DICOM)"


class _Scan:
    """What a search for volumes keeps across the folders and list files it goes through."""

    def __init__(self) -> None:
        self.skipped: list[tuple[Path, str]] = []  # DICOM folders that hold no CT series, and why
        self.searched: dict[str, Path] = {}  # real path of each folder searched -> the path it was searched by
        self.left_out: dict[tuple[Path, str], list[Path]] = {}  # (folder, why) -> the files it did not take

    def leave_out(self, folder: Path, why: str, files: list[Path]) -> None:
        if files:
            self.left_out.setdefault((folder, why), []).extend(files)

    def left_out_report(self) -> list[dict[str, Any]]:
        """What the search did not take for a volume: ``{"folder", "why", "files", "first"}`` per folder and kind (as
        ``xray2ct``'s search reports what it passed over)."""
        return [{"folder": str(folder), "why": why, "files": len(files), "first": files[0].name}
                for (folder, why), files in self.left_out.items()]  # fmt: skip


#: Folders of virtual file systems: a link into one is not followed by a folder search (/proc alone holds a link
#: to / per process, and its files never end).
_VIRTUAL_FOLDERS = ("/proc", "/sys", "/dev")


def _unfollowed_link(link: Path, top: str) -> str:
    """Why a folder search does not follow the symbolic link ``link`` to a folder, or ``""`` when it does: a link to
    the file system's root, to the folder searched (``top``, a real path) or one of its parents (the search would
    cover the whole disk, or come back to where it started), or into a virtual file system
    (:data:`_VIRTUAL_FOLDERS`)."""
    real = os.path.realpath(link)
    if real == os.path.dirname(real):  # "/" (or a drive's root)
        return f"it links to the file system's root ({real})"
    if top == real:
        return f"it links back to the folder searched ({top})"
    if top.startswith(real.rstrip(os.sep) + os.sep):
        return f"it links to {real}, which holds the folder searched ({top}): following it would search all of {real}"
    for virtual in _VIRTUAL_FOLDERS:
        if real == virtual or real.startswith(virtual + os.sep):
            return f"it links into {virtual}, a virtual file system"
    return ""


def walk_folder(folder: Path, searched: dict[str, Path]) -> Iterator[tuple[Path, list[Path]]]:
    """Each folder below ``folder`` (itself first, then its subfolders, sorted) with its regular files, sorted:
    recursively, through symbolic links to folders too (a cohort split into train/val by links to series), hidden
    entries skipped. A link to the file system's root, to ``folder`` or one of its parents, or into ``/proc``,
    ``/sys`` or ``/dev`` is not followed (a warning names it: the search would cover the whole disk); files that are
    no regular file (a FIFO, whose opening waits forever, a device, a socket) are left out with a warning.

    Args:
        searched: real path of each folder searched -> the path it was searched by, shared across the calls of one
            search, so that a link loop ends and a folder reached twice (two links, given twice) is searched once.
    """
    top = os.path.realpath(folder)
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
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            why = _unfollowed_link(root_path / d, top) if os.path.islink(root_path / d) else ""
            if why:
                logger.warning("did not follow the symbolic link %s: %s. Link to the series folders themselves "
                               "instead.", root_path / d, why)  # fmt: skip
            else:
                kept.append(d)
        dirs[:] = kept
        paths = []
        for n in sorted(n for n in files if not n.startswith(".")):
            kind = not_regular_kind(root_path / n)
            if kind:
                logger.warning("skipped %s: it is %s, not a regular file (reading it would hang or never end)",
                               root_path / n, kind)  # fmt: skip
            else:
                paths.append(root_path / n)
        yield root_path, paths


def _not_volume_files(paths: list[Path]) -> list[Path]:
    """The files of ``paths`` (one folder's) that are no volume file, nor the voxels of a detached header among them
    (``a.mhd``'s ``a.raw``, an ``.nhdr``'s ``.raw.gz``: :func:`~DiffusionCore.files.detached_data_files`)."""
    from .files import detached_data_files

    others = [p for p in paths if not is_volume_file(p)]
    if not others:
        return []
    data = {str(f) for p in paths if _suffix(p) in (".nhdr", ".mhd") for f in detached_data_files(p)}
    return [p for p in others if str(p) not in data]


def _scan_folder(folder: Path, scan: _Scan) -> list[Path]:
    found: list[Path] = []
    for root_path, paths in walk_folder(folder, scan.searched):
        found.extend(p for p in paths if is_volume_file(p))
        dicom = (p for p in paths if not is_volume_file(p) and is_dicom_file(p))  # read lazily: few are needed
        first = next(dicom, None)
        if first is None:  # every file was looked at: those that are no volume file are no DICOM file either
            scan.leave_out(root_path, NOT_VOLUME_FILES, _not_volume_files(paths))
            continue
        why = _not_a_ct_series(itertools.chain([first], dicom))
        if why:
            scan.skipped.append((root_path, why))  # said once the scan is over: in the error, if nothing is left
            scan.leave_out(root_path, f"DICOM files of no CT series ({why})", _not_volume_files(paths))
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
    * In a ``.csv`` (a spreadsheet's, e.g. ``filename,label``), a line of several columns that names no existing path
      as a whole names its first column (:func:`first_column`: quoted fields may hold commas); the others are ignored
      (said once). A first line naming a column (:data:`LIST_HEADERS`) is skipped, as in a one-column list.
    * Where the system's separator is ``/``, a missing path written with Windows separators (``..\\in\\chest.png``)
      is read with ``/`` when that exists (said once); when it does not either, the warning says that ``\\`` is no
      separator here.

    A line naming no existing path is warned about (a broken symbolic link as such, with its target) and returned
    as it is, for the command to pass over as unreadable (``sr``, ``xray2ct``, training: :func:`readable_volumes`).
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
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    in_columns = path.suffix.lower() == ".csv"
    named = [(number, line, _list_entry(line, path.parent, in_columns)) for number, line in lines
             if line and not line.startswith("#")]  # fmt: skip
    if named and _is_header(path, [entry for *_, entry in named]):
        number, line, _ = named[0]
        logger.info("%s, line %d: %s is the column's header, not a path: skipped", path, number, line)
        named = named[1:]
    columns = next(((number, line) for number, line, entry in named if entry.first_column), None)
    if columns is not None:
        logger.info("%s has several columns (line %d: %s): the first is taken as the %s's path, the others are "
                    "ignored", path, *columns, noun)  # fmt: skip
    slashes = next(((number, line, entry.path) for number, line, entry in named if entry.slashes), None)
    if slashes is not None:
        logger.info("%s writes its paths with Windows separators (\\); read with / instead (line %d: %s is %s)",
                    path, *slashes)  # fmt: skip
    out: list[Path] = []
    for number, _, entry in named:
        if not entry.path.exists():  # as an unreadable entry: named here, then passed over (sr, xray2ct, train)
            logger.warning("%s, line %d: %s; fix or remove that line (the other %ss go on)", path, number,
                           _missing_entry(entry), noun)  # fmt: skip
            out.append(entry.path)
            continue
        out.extend(expand(entry.path))
    return out


#: First lines of a one-column list saved from a spreadsheet that name the column, not a volume (lower case).
LIST_HEADERS = ("path", "paths", "file", "files", "filename", "file name", "filepath", "file path", "volume",
                "volumes", "input", "inputs", "image", "images", "scan", "scans", "ct", "series", "case", "cases",
                "radiograph", "radiographs", "xray", "x-ray", "xrays", "x-rays")


class _ListEntry(NamedTuple):
    """The path a list file's line names (:func:`_list_entry`)."""

    path: Path
    relative: bool  # taken from the list file's folder
    text: str  # the part of the line it was read from, unquoted
    first_column: bool = False  # the first column of a CSV line of several
    slashes: bool = False  # written with Windows separators, read with /


def _is_header(path: Path, named: list[_ListEntry]) -> bool:
    """Whether the first entry of a list file is a spreadsheet's column header (``path``, as Excel writes a one-column
    CSV with a title; ``filename`` of ``filename,label``): it is no existing path, and it is one of
    :data:`LIST_HEADERS`, or (in a ``.csv``) every other entry exists."""
    first, rest = named[0], named[1:]
    if first.path.exists():
        return False
    if first.text.lower() in LIST_HEADERS:
        return True
    return path.suffix.lower() == ".csv" and bool(rest) and all(e.path.exists() for e in rest)


#: Column separators of a spreadsheet's CSV: the comma, and the semicolon Excel writes where the decimal mark is one.
CSV_DELIMITERS = (",", ";")


def first_column(line: str) -> str | None:
    """The first field of a CSV line of several (``chest.png,1``, ``x.png,``, ``"a,b.png",1``, ``chest.png;1``),
    read by the :mod:`csv` module; None for a line of one field or an empty first one."""
    for delimiter in CSV_DELIMITERS:
        try:
            fields = next(csv.reader([line], delimiter=delimiter))
        except (csv.Error, StopIteration):
            continue
        if len(fields) > 1:
            return fields[0].strip() or None
    return None


def _list_entry(line: str, folder: Path, in_columns: bool = False) -> _ListEntry:
    """The path a list file's line names (see :func:`read_list_file`), relative paths taken from ``folder``: the
    first that exists of the whole line, the line without a trailing comment, and (``in_columns``: a ``.csv``) its
    first column; each as written, then (where the separator is ``/``) with its ``\\`` read as ``/``. When none
    exists, the last of them as written (the one the line most likely means: its first column, in a CSV)."""

    def resolved(text: str, first: bool = False) -> _ListEntry:
        text = text.strip()
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1].strip()
        p = Path(text).expanduser()
        return _ListEntry(p, False, text, first) if p.is_absolute() else _ListEntry(folder / p, True, text, first)

    tried = [resolved(line)]
    comment = re.search(r"\s#", line)
    if comment is not None:
        tried.append(resolved(line[: comment.start()]))
    first = first_column(line) if in_columns else None
    if first is not None:
        tried.append(resolved(first, first=True))
    found = next((entry for entry in tried if entry.path.exists()), None)
    if found is None and os.sep == "/":
        forward = (resolved(e.text.replace("\\", "/"), e.first_column)._replace(slashes=True)
                   for e in tried if "\\" in e.text)  # fmt: skip
        found = next((entry for entry in forward if entry.path.exists()), None)
    return found or tried[-1]


def broken_link_note(path: Path) -> str:
    """``"PATH is a broken symbolic link (to TARGET, which does not exist)"`` for a missing path that is a link, else
    ``""``."""
    if not path.is_symlink():
        return ""
    try:
        target = os.readlink(path)
    except OSError:
        return f"{path} is a broken symbolic link"
    return f"{path} is a broken symbolic link (to {target}, which does not exist)"


def _missing_entry(entry: _ListEntry) -> str:
    """What a list file's warning says of an entry that names no existing path."""
    broken = broken_link_note(entry.path)
    if broken:
        return broken
    said = f"{entry.path} (relative paths are taken from the list file's folder)" if entry.relative else str(entry.path)
    windows = os.sep == "/" and "\\" in entry.text
    hint = " (on Linux and macOS \\ is not a folder separator: write / between folders)" if windows else ""
    return f"{said} does not exist{hint}"


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
    kind = not_regular_kind(path)
    if kind:  # never opened: a FIFO's open waits for a writer forever, a device never ends
        raise InputError(f"{path} is {kind}, not a regular file: reading it would hang or never end. Give a volume "
                         "file, a DICOM folder or a list file (a regular file) instead.")  # fmt: skip
    if is_volume_file(path):
        return [path]
    if is_dicom_file(path):  # by its content, whatever its name (1.2.840....12345, IM000001, x.dicom): its series
        return [dicom_file_series(path)]
    return _read_list_file(path, scan)


class VolumePaths(list):
    """What :func:`collect_volumes` found (a list of paths), with ``named``: the volume files named one by one (on the
    command line or as a CT sample's name), not found inside a folder or a list file. :func:`readable_volumes` stops
    at one of those that cannot be used (the user chose it), and passes over the others."""

    named: frozenset[Path] = frozenset()


def stops_the_run(paths: Iterable[str | os.PathLike], path: str | os.PathLike) -> bool:
    """Whether ``path`` (one of ``paths``), being unusable, stops a training run rather than being passed over: a
    volume file named one by one (:attr:`VolumePaths.named`) does; one found in a folder or a list file, and a DICOM
    series folder, do not. ``paths`` not from :func:`collect_volumes` (a plain list): every volume file does."""
    named = getattr(paths, "named", None)
    return Path(path) in named if named is not None else not Path(path).is_dir()


def collect_volumes(data: str | os.PathLike | Iterable[str | os.PathLike],
                    searched: dict[str, Path] | None = None, *,
                    left_out: list[dict[str, Any]] | None = None) -> VolumePaths:
    """All CT volumes named by ``data`` (folder, list file, volume file, or a list of these).

    Args:
        data: see the module docstring.
        searched: filled, when given, with the real path of every folder searched -> the path it was searched by
            (those a list file names too), for a caller that must keep its outputs out of them.
        left_out: extended, when given, with what the search of the folders did not take for a volume, for a batch's
            report: ``{"folder", "why", "files", "first"}`` per folder and kind (``files``: how many, ``first``: the
            first one's name): the files of a folder holding no DICOM that are no volume file (:data:`NOT_VOLUME_FILES`:
            a ``README.txt``, pictures), and the DICOM folders holding no CT series. Not the files beside a DICOM
            series that are no DICOM (telling them would read every slice's header), nor hidden ones.

    Returns:
        Volume files and DICOM series folders, without duplicates; folder contents sorted by path, list
        order kept (a :class:`VolumePaths`, which knows the files named one by one).

    Raises:
        InputError: a path does not exist, or no CT volume was found.
    """
    from .sampledata import sample_or_path

    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    if not items:
        raise InputError("no training data given: pass a folder of CT volumes, a list file, or volume files")
    found: list[Path] = []
    named: set[Path] = set()  # volume files named one by one, not found in a folder or a list file
    scan = _Scan()
    if searched is not None:
        scan.searched = searched
    for item in items:
        p = sample_or_path(item, "ct").expanduser()  # a CT sample's name that is no path here: its fetched file
        if not p.exists():
            raise InputError(f"{broken_link_note(p) or f'{p} does not exist'}: check the path")
        found.extend(_expand(p, scan))
        if p.is_file() and is_volume_file(p):
            named.add(p)
    unique = VolumePaths(dict.fromkeys(found))
    unique.named = frozenset(named)
    if left_out is not None:
        left_out.extend(scan.left_out_report())
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


def not_training_ct(path: str | os.PathLike) -> tuple[int, str]:
    """Why the volume at ``path`` must not be trained on, told before it is read: ``(level, why)``, else
    ``(0, "")``.

    * a synthetic image this software made (an ``sr`` or ``xray2ct`` result: its header, NIfTI sidecar or DICOM tags
      say so, :func:`~DiffusionCore.provenance.read_provenance`): a model trained on it learns its own estimate;
    * a cube that ``prepare-xray-data`` wrote (``NNNN_name/cube_R.nii.gz`` beside that folder's ``manifest.json``): a
      resampled copy of a CT that is read as such (``train xray`` takes the prepared folder itself).
    """
    from .provenance import SOFTWARE, SYNTHETIC_SUFFIX, read_provenance

    p = Path(path)
    first = next((f for f in sorted(p.iterdir()) if f.is_file()), p) if p.is_dir() else p  # a series: its first file
    record = read_provenance(first)
    if record is not None:
        made_with = f", weights {record.weights}" if record.weights else ""
        return logging.WARNING, (f"a synthetic image made by {SOFTWARE} ({record.title.removesuffix(SYNTHETIC_SUFFIX)}"
                                 f"{made_with}), not an acquired CT")  # fmt: skip
    if p.is_file() and re.fullmatch(r"cube_\d+\.nii\.gz", p.name) and (p.parent.parent / "manifest.json").is_file():
        return logging.INFO, (f"a resampled copy of a CT that prepare-xray-data wrote into {p.parent.parent} "
                              "(train xray takes that folder itself as --data)")  # fmt: skip
    return 0, ""


def readable_volumes(paths: Iterable[str | os.PathLike], unusable: Callable[[Path, Any], str] | None = None, *,
                     passed_over: list[tuple[Path, str]] | None = None):
    """Read each volume of ``paths`` (from :func:`collect_volumes`) in turn, yielding ``(path, Volume)``: the CTs a
    training run trains on.

    A DICOM series folder that cannot be read as one regular CT volume (missing slices, slices unevenly spaced or
    in mixed orientations, a corrupt file, no CT values) is passed over with a warning naming it and why, as folders
    holding no CT series are when the volumes are collected: a cohort (e.g. LIDC-IDRI) holds a few such series, and
    one of them must not stop a training run on the rest. So is, with one line naming it and why, a volume that is no
    acquired CT (:func:`not_training_ct`: a synthetic result of this software, a ``prepare-xray-data`` cube) or whose
    values are not CT in HU (as ``sr`` refuses it: :func:`~DiffusionCore.volume.require_ct`). A volume file found in
    a folder or a list file that cannot be read (not a volume, damaged, NaN/Inf voxels, a list's missing line) is
    passed over the same way; one named by itself (:func:`stops_the_run`) stops with its error, and so does a run in
    which no volume is left (InputError listing why each was passed over). ``unusable(path, volume)``, where given,
    says why a CT read cannot serve the run (e.g. too small for its training planes; "" when it can): that one is
    passed over too, with a warning naming it and why. Once all are read, an info line counts the CT volumes used,
    and those passed over. ``passed_over``, where given, gets ``(path, why)`` of each one passed over.
    """
    from .volume import check_ct, mark_ct_checked, read_volume, require_ct

    failed: list[str] = []
    read = chosen = 0  # chosen: passed over for what they are, not because they could not be read

    def pass_over(path: Path, why: object, level: int = logging.WARNING) -> None:
        failed.append(f"{path}: {why}")
        if passed_over is not None:
            passed_over.append((path, str(why)))
        logger.log(level, "passed over %s: %s", path, why)

    for p in paths:
        path = Path(p)
        level, why = not_training_ct(path)
        if why:
            chosen += 1
            pass_over(path, why, level)
            continue
        try:
            vol = read_volume(path, check=False)
            doubts = check_ct(mark_ct_checked(vol), str(path))  # NaN/Inf voxels: as a file that cannot be read
        except InputError as exc:
            if stops_the_run(paths, path):  # a file the user named: their choice, so it stops the run
                raise
            text, unread = str(exc), f"could not read {path}: "  # the path said once: "passed over PATH: why"
            why = f"could not read it: {text.removeprefix(unread)}" if text.startswith(unread) else \
                text.removeprefix(f"{path}: ")
            pass_over(path, why)  # a series, or a file of a folder or list: one bad one must not stop the rest
            continue
        lo, hi = (float(vol.array.min()), float(vol.array.max())) if doubts else (0.0, 0.0)
        try:
            if lo != hi:  # a constant volume (a blank scout) keeps its doubt, said below, and the other checks
                require_ct(vol, str(path))
        except InputError:  # its words name --allow-non-ct, an option of sr: say it as training sees it
            why = (f"its values run from {lo:g} to {hi:g}, not CT in Hounsfield units (air near -1000, soft tissue "
                   "near 0-100): MR, PET or normalised images")
            chosen += 1
            pass_over(path, why)
            continue
        for doubt in doubts:  # the CT model's doubts about a volume it does train on (a warning each, as read_volume)
            logger.warning(doubt)
        why = unusable(path, vol) if unusable is not None else ""
        if why:
            chosen += 1
            pass_over(path, why)
            continue
        read += 1
        yield path, vol
    if not read and failed:
        lead = "no CT volume is left to train on" if chosen else "none of the CT volumes could be read"
        raise InputError(f"{lead}: " + "; ".join(failed))
    passed = f"; passed over {len(failed)} of the {read + len(failed)} found (see the warnings above)" if failed else ""
    logger.info("found %d CT volume(s)%s", read, passed)


def done_through(paths: Sequence[str | os.PathLike], path: str | os.PathLike) -> int:
    """How many of ``paths`` are behind once :func:`readable_volumes` has yielded ``path`` (1-based): the ones it
    passed over count, so that progress over a cohort reaches its total."""
    target = Path(path)
    return next(n for n, p in enumerate(paths, start=1) if Path(p) == target)
