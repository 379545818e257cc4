"""Finding the radiographs of an ``xray2ct`` batch: a folder of them (searched recursively) or a list file.

A folder's radiographs are its image files (PNG, JPEG, TIFF, BMP: each tried, so that a broken one is named rather
than left out) and the files whose header shows a radiograph (:func:`~.radiograph.radiograph_file_kind`: a DICOM
CR, DX, RF or XA image or a CT topogram, a 2D NRRD, MetaImage or NIfTI image). Other files (a CT series' slices, 3D
volumes, reports, a MetaImage's pixel file, DICOM secondary captures, which may show anything) are passed over, counted
per folder and kind for the log and the report. Hidden entries are skipped; symbolic links to folders are followed,
each real folder searched once (:func:`~DiffusionCore.inputs.walk_folder`). A DICOMDIR (the index of a DICOM disc or
export) stands for the folder that holds it. A list file (one path per line, as ``sr`` takes it:
:func:`~DiffusionCore.inputs.read_list_file`) names radiograph files or folders of them; a line naming a missing file
is warned about and kept, so that the batch names it as failed.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from ..dicom_in import header_values
from ..errors import InputError
from ..files import LIST_SUFFIXES, text_file_error
from ..inputs import is_dicom_file, read_list_file, walk_folder
from ..volume import is_localizer
from .radiograph import (
    IMAGE_SUFFIXES,
    RADIOGRAPH_FORMATS,
    RADIOGRAPH_MODALITIES,
    dicomdir_message,
    radiograph_file_kind,
)

logger = logging.getLogger(__name__)

#: How many kinds of passed-over files the log line names before it counts the rest.
NAMED_PASSED_OVER = 3
#: DICOM modalities of pictures whose content the header does not say (a scanned film, a screenshot, a report page).
SECONDARY_CAPTURE = {"OT": "secondary captures (Modality OT)", "SC": "secondary captures (Modality SC)"}


def _why_passed_over(path: Path) -> str:
    """``""`` for a radiograph, else what the file is, in a few words, for the log and the report. A DICOM file's header
    is read once (its Modality and ImageType); an image file is tried whatever it holds."""
    if path.suffix.lower() in IMAGE_SUFFIXES and not is_dicom_file(path):  # a DICOM named .png is DICOM
        return ""
    if is_dicom_file(path):
        fields = header_values(path, ["Modality", "ImageType"]) or {}
        modality = (fields.get("Modality") or "").strip().upper()
        if modality in RADIOGRAPH_MODALITIES or (modality == "CT" and is_localizer(fields.get("ImageType", ""))):
            return ""
        if modality in SECONDARY_CAPTURE:
            return (f"DICOM {SECONDARY_CAPTURE[modality]}: pictures of anything; give one alone as INPUT if it is a "
                    "radiograph")  # fmt: skip
        return f"DICOM files of Modality {modality}" if modality else "DICOM files without an image"
    # a 2D NRRD, MetaImage or NIfTI image, or a DICOM file without the preamble's mark, by its header
    try:
        kind = radiograph_file_kind(path)
    except InputError:  # Windows: a name ITK cannot open there; passed over, as another file the search cannot use
        return "files whose names ITK cannot open on this Windows (rename them with ASCII letters)"
    return "" if kind else "files that are no radiograph (not an image, or a 3D volume)"


class _Search:
    """What one search for radiographs keeps across its folders and list files."""

    def __init__(self) -> None:
        self.searched: dict[str, Path] = {}
        self.passed_over: Counter[tuple[Path, str]] = Counter()  # (folder, why) -> files
        self.first: dict[tuple[Path, str], str] = {}  # (folder, why) -> the first such file's name

    def folder(self, folder: Path) -> list[Path]:
        found: list[Path] = []
        for root, files in walk_folder(folder, self.searched):
            for f in files:
                why = _why_passed_over(f)
                if not why:
                    found.append(f)
                    continue
                kind = (root, why)
                self.passed_over[kind] += 1
                self.first.setdefault(kind, f.name)
        return found

    def report(self) -> list[dict[str, Any]]:
        """What was passed over: ``{"folder", "why", "files", "first"}`` per folder and kind."""
        return [{"folder": str(folder), "why": why, "files": n, "first": self.first[(folder, why)]}
                for (folder, why), n in self.passed_over.items()]  # fmt: skip

    def expand(self, path: Path) -> list[Path]:
        if path.is_dir():
            return self.folder(path)
        if path.suffix.lower() in LIST_SUFFIXES:
            return read_list_file(path, self.expand, noun="radiograph")
        return [path]


class RadiographBatch(NamedTuple):
    """What ``xray2ct``'s INPUT names (:func:`radiograph_batch`)."""

    batch: bool  # a folder, a list file or a DICOMDIR
    sources: list[Path]  # the radiographs
    passed_over: list[dict[str, Any]]  # what the search passed over (:meth:`_Search.report`)
    folder: Path | None  # the folder searched (a DICOMDIR's), or None for a list file or one radiograph
    searched: list[Path] = []  # every folder searched, those a list file names too (no output may go inside them)


def radiograph_batch(path: Path) -> RadiographBatch:
    """What ``xray2ct``'s INPUT names (:class:`RadiographBatch`): a folder or a list file
    (:data:`~DiffusionCore.files.LIST_SUFFIXES`) is a batch, found as the module docstring says, in the order of the list (a folder's sorted by path), each file
    once; a DICOMDIR is the batch of its folder; any other file is one radiograph.

    Raises:
        InputError: the path does not exist, a list file without a list suffix, or no radiograph found.
    """
    if not path.exists():
        raise InputError(f"{path} does not exist. Check the path (and quote it if it contains spaces).")
    if path.is_file() and path.suffix.lower() not in LIST_SUFFIXES:
        if dicomdir_message(path):
            logger.info("%s is a DICOMDIR, the index of a DICOM disc or export: doing the radiographs of its folder %s",
                        path, path.parent)  # fmt: skip
            path = path.parent
        else:
            text = text_file_error(path)  # a list of radiographs saved without a list suffix: named as such
            if text is not None:
                raise text
            return RadiographBatch(False, [path], [], None)
    search = _Search()
    found = list(dict.fromkeys(search.expand(path)))
    passed = search.report()
    total = sum(p["files"] for p in passed)
    if passed:
        kinds = "; ".join(f"{p['files']} in {p['folder']}: {p['why']} (e.g. {p['first']})" for p in passed[:NAMED_PASSED_OVER])
        more = f"; and {len(passed) - NAMED_PASSED_OVER} more folder(s) or kind(s)" if len(passed) > NAMED_PASSED_OVER else ""
        logger.info("passed over %d file(s) that are not radiographs: %s%s", total, kinds, more)
    if not found:
        other = f" ({total} other file(s) passed over, e.g. {passed[0]['first']}: {passed[0]['why']})" if passed else ""
        raise InputError(f"no radiographs found in {path}{other}: expected {RADIOGRAPH_FORMATS} files, one radiograph "
                         "each")  # fmt: skip
    return RadiographBatch(True, found, passed, path if path.is_dir() else None, list(search.searched.values()))
