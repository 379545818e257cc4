"""Finding the radiographs of an ``xray2ct`` batch: a folder of them (searched recursively) or a list file.

A folder's radiographs are its image files (PNG, JPEG, TIFF, BMP: each tried, so that a broken one is named rather
than left out) and the files whose header shows a radiograph (:func:`~.radiograph.radiograph_file_kind`: a DICOM
CR, DX, RF or XA image or a CT topogram, a 2D NRRD, MetaImage or NIfTI image). Other files (a CT series' slices, 3D
volumes, reports, a MetaImage's pixel file) are passed over and counted. Hidden entries are skipped; symbolic links to
folders are followed, each real folder searched once (:func:`~DiffusionCore.inputs.walk_folder`). A list file (one
path per line, as ``sr`` takes it: :func:`~DiffusionCore.inputs.read_list_file`) names radiograph files or folders of
them; a line naming a missing file is warned about and kept, so that the batch names it as failed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InputError
from ..files import LIST_SUFFIXES, text_file_error
from ..inputs import read_list_file, walk_folder
from .radiograph import IMAGE_SUFFIXES, RADIOGRAPH_FORMATS, radiograph_file_kind

logger = logging.getLogger(__name__)

#: How many passed-over files a folder's log line names before it counts the rest.
NAMED_PASSED_OVER = 3


def _is_radiograph_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or bool(radiograph_file_kind(path))


class _Search:
    """What one search for radiographs keeps across its folders and list files."""

    def __init__(self) -> None:
        self.searched: dict[str, Path] = {}
        self.passed_over: list[Path] = []

    def folder(self, folder: Path) -> list[Path]:
        found: list[Path] = []
        for _, files in walk_folder(folder, self.searched):
            for f in files:
                (found if _is_radiograph_file(f) else self.passed_over).append(f)
        return found

    def expand(self, path: Path) -> list[Path]:
        if path.is_dir():
            return self.folder(path)
        if path.suffix.lower() in LIST_SUFFIXES:
            return read_list_file(path, self.expand, noun="radiograph")
        return [path]


def radiograph_batch(path: Path) -> tuple[bool, list[Path]]:
    """(batch?, radiographs) for ``xray2ct``'s INPUT: a folder or a list file (:data:`~DiffusionCore.files.LIST_SUFFIXES`)
    is a batch, found as the module docstring says, in the order of the list (a folder's sorted by path), each file
    once; any other file is one radiograph.

    Raises:
        InputError: the path does not exist, a list file without a list suffix, or no radiograph found.
    """
    if not path.exists():
        raise InputError(f"{path} does not exist. Check the path (and quote it if it contains spaces).")
    if path.is_file() and path.suffix.lower() not in LIST_SUFFIXES:
        text = text_file_error(path)  # a list of radiographs saved without a list suffix: named as such
        if text is not None:
            raise text
        return False, [path]
    search = _Search()
    found = list(dict.fromkeys(search.expand(path)))
    passed = search.passed_over
    if passed:
        names = ", ".join(p.name for p in passed[:NAMED_PASSED_OVER])
        more = f" and {len(passed) - NAMED_PASSED_OVER} more" if len(passed) > NAMED_PASSED_OVER else ""
        logger.info("passed over %d file(s) in %s that are not radiographs (%s%s): CT slices, 3D volumes and other "
                    "files", len(passed), path, names, more)  # fmt: skip
    if not found:
        other = f" ({len(passed)} other file(s) passed over, e.g. {passed[0].name})" if passed else ""
        raise InputError(f"no radiographs found in {path}{other}: expected {RADIOGRAPH_FORMATS} files, one radiograph "
                         "each")  # fmt: skip
    return True, found
