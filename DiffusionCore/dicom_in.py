"""Reading DICOM CT input with pydicom: which series of a folder is the CT, and enhanced (multi-frame) CT files.

A folder may hold several series (a PET/CT export: the CT and the PET; a CT with its scout series): the CT series
is chosen (:func:`choose_ct_series`), series of other modalities passed over with an info line, each series named
as a user knows it (series number, description, modality). A folder holding only localizers (topograms, scouts)
or no CT series at all is refused with a message saying so.

A classic CT series is one file per slice and is read through SimpleITK/GDCM (:mod:`DiffusionCore.volume`),
which also decodes the compressed transfer syntaxes scanners and PACS send (JPEG lossless, JPEG-LS,
JPEG 2000, RLE). An enhanced CT (Enhanced CT Image Storage, or a Legacy Converted Enhanced CT) holds the
whole volume in one file, its geometry in functional groups: ITK does not read those per-frame positions,
so this module does, frame by frame:

- Plane Position (per frame): ImagePositionPatient of each frame; frames are sorted along the slice normal
  and must be evenly spaced (missing frames are refused, as for a classic series);
- Plane Orientation and Pixel Measures (shared or per frame): one orientation and one pixel spacing;
- Pixel Value Transformation (shared or per frame): RescaleSlope / RescaleIntercept to HU.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import InputError

logger = logging.getLogger(__name__)

#: DICOM modalities whose files are never slices of a volume: radiographs, mammograms, dental and fluoroscopy images,
#: ultrasound, photographs, reports, presentation states, segmentations, structure sets and plans. A folder that holds
#: only these (or only CT localizers) is skipped when volumes are collected: a cohort's patient folders (e.g.
#: LIDC-IDRI's) hold such series beside the CTs.
NOT_VOLUME_MODALITIES = frozenset({
    "CR", "DX", "RG", "MG", "IO", "PX", "XA", "RF", "US", "ES", "XC", "SM", "OP", "SR", "PR", "KO", "SEG",
    "RTSTRUCT", "RTPLAN", "RTRECORD", "DOC",
})

ENHANCED_CT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
#: Relative spread of the slice steps accepted as even (larger: missing or doubled frames).
_STEP_TOLERANCE = 0.01
_ORIENTATION_TOLERANCE = 1e-3


#: DICOM's Media Storage SOP Class of a DICOMDIR (the index of a DICOM disc or export folder, no image).
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


def is_dicomdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOMDIR file (the index of the files of a DICOM disc or export, not an image): its
    Media Storage SOP Class, or a Directory Record Sequence (header only)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        import pydicom

        with warnings.catch_warnings():  # a damaged file is the reader's to report, in our words
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["DirectoryRecordSequence"])
            sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
            return sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds
    except Exception:  # noqa: BLE001 - not DICOM, unreadable: not a DICOMDIR
        return False


#: The attributes every file of one series must share, with what a mix of them means and what to do. A series whose
#: files mix them holds several patients', studies' or patient spaces' images under one SeriesInstanceUID (a merge or
#: an anonymisation gone wrong, a re-used UID): read as one volume, one patient's slices would be filed as another's.
SERIES_IDENTITY = {
    "PatientID": ("patients", "they are the images of more than one patient", "one patient's files"),
    "StudyInstanceUID": ("studies", "they are the images of more than one study", "one study's files"),
    "FrameOfReferenceUID": ("frames of reference", "their slices lie in more than one patient space (separate "
                            "acquisitions or registrations)", "the files of one frame of reference"),
}  # fmt: skip


def check_series_identity(values: Mapping[str, Mapping[str, str]], series: str) -> None:
    """Refuse a series whose files differ in an attribute of :data:`SERIES_IDENTITY`, naming it, its values and how
    many files hold each, as the reader refuses mixed orientations and pixel spacings.

    Args:
        values: file name -> {keyword: value} for the files read as the volume (an absent value is ``""``).
        series: the series as the messages name it (its folder).

    Raises:
        InputError: the attribute, its values (with a file holding each) and what to do.
    """
    for keyword, (what, why, keep) in SERIES_IDENTITY.items():
        counts = Counter(str(v.get(keyword, "")).strip() for v in values.values())
        if len(counts) < 2:
            continue
        example = {}
        for name, v in values.items():
            example.setdefault(str(v.get(keyword, "")).strip(), Path(name).name)
        common = counts.most_common()
        shown = "; ".join(f"{value or '(none)'} in {n} file{'s' if n != 1 else ''} (e.g. {example[value]})"
                          for value, n in common[:4])  # fmt: skip
        more = f"; and {len(common) - 4} other values" if len(common) > 4 else ""
        raise InputError(
            f"the DICOM series in {series} mixes {what}: its {len(values)} files differ in {keyword}: {shown}{more}. "
            f"They are not one volume: {why}. Put {keep} in a folder of their own (sort the files by {keyword}, or "
            "export the series again from the PACS) and give that folder."
        )


#: A folder holding at most this many files is checked for an enhanced CT file (one file per series).
FEW_FILES = 4


#: Transfer syntax UID of Deflated Explicit VR Little Endian: the whole dataset after the file meta is deflated.
_DEFLATED = "1.2.840.10008.1.2.1.99"

#: Bytes read at a time while measuring a deflated dataset's inflated size.
_INFLATE_CHUNK = 1 << 20


def _deflated_start(path: str | os.PathLike) -> int | None:
    """Where the deflated dataset of a Deflated Explicit VR Little Endian file starts (after its file meta), or None
    for any other file (another transfer syntax, no DICOM, unreadable): read from the file meta alone."""
    try:
        from pydicom.filereader import read_file_meta_info

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = read_file_meta_info(path)
        if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED:
            return None
        return 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble, DICM, the group length element
    except Exception:  # noqa: BLE001 - no DICOM file meta: not a deflated file
        return None


def inflated_size(path: str | os.PathLike, cap: int) -> int | None:
    """The size of the deflated dataset of ``path`` once inflated, measured by inflating it a chunk at a time (never
    held whole), stopping once past ``cap`` bytes (then a value above ``cap``); None for a file that is not deflated
    or whose data do not inflate (left to the reader, which names a corrupt file)."""
    start = _deflated_start(path)
    if start is None:
        return None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        with open(path, "rb") as f:
            f.seek(start)
            while total <= cap:
                chunk = f.read(_INFLATE_CHUNK)
                if not chunk:
                    break
                while chunk and total <= cap:
                    total += len(inflater.decompress(chunk, _INFLATE_CHUNK))
                    chunk = inflater.unconsumed_tail
            if total <= cap:
                total += len(inflater.flush())  # what the last call held back (less than one window)
    except (OSError, zlib.error):
        return None
    return total


def check_deflated_size(path: str | os.PathLike) -> None:
    """Refuse a Deflated DICOM file whose dataset inflates to more than the memory available
    (``$DIFFUSIONCORE_MEMORY_LIMIT`` when set), before pydicom inflates it: pydicom inflates the whole dataset in
    memory even to read its header, so a file of a few hundred kB can take gigabytes (a "deflate bomb")."""
    from .files import check_memory_for, host_available_memory, memory_limit_from_env

    limit = memory_limit_from_env() or host_available_memory()
    inflated = inflated_size(path, limit)
    if inflated is not None:
        # pydicom holds the deflated bytes, the inflated dataset and, reading the pixels, a copy of them
        check_memory_for(2 * inflated, f"reading {path} (a Deflated DICOM file whose data inflate to "
                         f"{'more than ' if inflated > limit else ''}{inflated:,} bytes)",
                         "export it with an uncompressed or JPEG transfer syntax instead of Deflated")  # fmt: skip


def enhanced_ct_in(path: str | os.PathLike) -> Path | None:
    """The enhanced CT file ``path`` is, or the one a small folder holds (a folder of many files is a classic
    series, one file per slice), else ``None``."""
    p = Path(path)
    if p.is_file():
        return p if is_enhanced_ct(p) else None
    if not p.is_dir():
        return None
    files = []
    for f in p.rglob("*"):
        if f.is_file():
            files.append(f)
            if len(files) > FEW_FILES:
                return None
    found = [f for f in files if is_enhanced_ct(f)]
    return found[0] if len(found) == 1 else None


def is_enhanced_ct(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file of an enhanced (multi-frame) CT class (header only).

    Raises:
        ResourceError: a Deflated file that inflates to more than the memory available (:func:`check_deflated_size`).
    """
    check_deflated_size(path)
    try:
        import pydicom

        with warnings.catch_warnings():  # a damaged file is the classic reader's to report, in our words
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            sop_class = str(ds.get("SOPClassUID", ""))  # values are decoded (and checked) when read
    except Exception:  # noqa: BLE001 - not DICOM, unreadable: not an enhanced CT
        return False
    return sop_class in ENHANCED_CT_CLASSES


def _group(ds, frame, sequence: str, what: str, path: Path):
    """The first item of a functional group, per frame if present there, else shared."""
    for holder in (frame, ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        if holder is not None and sequence in holder and len(holder.get(sequence)):
            return holder.get(sequence)[0]
    raise InputError(
        f"{path} is an enhanced CT without {what} ({sequence}) in its functional groups: its geometry is "
        "unknown. Export the series from the scanner or PACS as classic single-frame CT images."
    )


class EnhancedCT(NamedTuple):
    """An enhanced CT's voxels and geometry, in the terms of :class:`DiffusionCore.volume.Volume`."""

    array: np.ndarray  # (z, y, x) HU, frames sorted along the slice normal
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]  # LPS mm of the first voxel
    direction: np.ndarray  # 3x3, columns = index axes
    metadata: dict
    positions: np.ndarray  # (z, 3) LPS mm of each frame's first pixel, in the array's order (a tilt drifts them)


#: Bytes per voxel of an enhanced CT beyond its stored pixels: the float32 pixels, their HU and the HU sorted by
#: position (:func:`read_enhanced_ct`).
_ENHANCED_FLOAT_COPIES = 12


def _check_enhanced_size(head, p: Path) -> None:
    """Refuse an enhanced CT whose frames cannot fit in memory, from its header (``head``, read without the pixels):
    frames x rows x columns x (the stored pixels, their decoded array and :data:`_ENHANCED_FLOAT_COPIES`)."""
    from .files import check_memory_for

    try:
        n, rows, cols, bits, samples = (int(head.get(k, 0) or 0) for k in
                                        ("NumberOfFrames", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel"))
    except (TypeError, ValueError):
        return  # left to the checks below, which name what is wrong
    stored = max(1, -(-bits // 8)) * max(1, samples)  # bytes per pixel as stored, and as decoded
    voxels = max(n, 0) * max(rows, 0) * max(cols, 0)
    check_memory_for(voxels * (2 * stored + _ENHANCED_FLOAT_COPIES),
                     f"reading the enhanced CT {p} ({n} frames of {rows}x{cols} pixels)",
                     "export a smaller region or fewer frames, or the series as classic single-frame CT images")


def read_enhanced_ct(path: str | os.PathLike) -> EnhancedCT:
    """Read an enhanced multi-frame CT file (HU, LPS geometry); :func:`DiffusionCore.volume.read_volume` does
    this for such a file or a folder holding one.

    Raises:
        InputError: missing functional groups, mixed orientations, uneven or doubled frame positions, pixel
            data that cannot be decoded (with the plugin to install).
        ResourceError: the frames, or a Deflated file's inflated data, cannot fit in memory (checked from the
            header, before any pixel is decoded).
    """
    import pydicom

    p = Path(path)
    check_deflated_size(p)
    try:  # the header first: the voxels' memory is checked before they are read and decoded
        head = pydicom.dcmread(p, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file: say so with the file's name
        raise InputError(f"corrupt DICOM file {p}: {exc}") from None
    _check_enhanced_size(head, p)
    del head
    try:
        ds = pydicom.dcmread(p)
    except Exception as exc:  # noqa: BLE001 - a damaged file: say so with the file's name
        raise InputError(f"corrupt DICOM file {p}: {exc}") from None
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    n = int(ds.get("NumberOfFrames", 0) or 0)
    if not frames or n < 2 or len(frames) != n:
        raise InputError(
            f"{p} is an enhanced CT with {n} frame(s) and {len(frames or [])} per-frame functional group(s): a "
            "volume needs at least two frames, each with its own position."
        )
    positions = np.array([[float(v) for v in _group(ds, f, "PlanePositionSequence", "frame positions", p)
                           .ImagePositionPatient] for f in frames])  # fmt: skip
    orientations = np.array([[float(v) for v in _group(ds, f, "PlaneOrientationSequence", "the orientation", p)
                              .ImageOrientationPatient] for f in frames])  # fmt: skip
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOLERANCE:
        raise InputError(f"{p} mixes frame orientations: it is not one volume; export its stacks separately.")
    measures = _group(ds, frames[0], "PixelMeasuresSequence", "the pixel spacing", p)
    row_spacing, col_spacing = (float(v) for v in measures.PixelSpacing)
    row, col = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, col)
    where = positions @ normal
    order = np.argsort(where, kind="stable")
    steps = np.diff(where[order])
    step = float(np.median(steps))
    if step <= 0 or np.abs(steps - step).max() > _STEP_TOLERANCE * step:
        raise InputError(
            f"{p}: its frames are not evenly spaced along the slice normal (steps from {steps.min():.3f} to "
            f"{steps.max():.3f} mm): frames are missing or doubled; export the complete volume."
        )
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - no decoder for its transfer syntax
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise InputError(
            f"cannot decode the pixel data of {p} (transfer syntax {getattr(syntax, 'name', syntax)}): {exc}. "
            "Install the decoder plugins (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg) or export "
            "it uncompressed."
        ) from None
    pixels = np.asarray(pixels, dtype=np.float32).reshape(n, int(ds.Rows), int(ds.Columns))
    hu = np.empty_like(pixels)
    for k, f in enumerate(frames):
        try:
            t = _group(ds, f, "PixelValueTransformationSequence", "a rescale", p)
            slope, intercept = float(t.RescaleSlope), float(t.RescaleIntercept)
        except InputError:
            slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        hu[k] = pixels[k] * slope + intercept
    hu = hu[order]
    direction = np.stack([row, col, normal], axis=1)
    return EnhancedCT(
        hu, (col_spacing, row_spacing, step), tuple(float(v) for v in positions[order[0]]), direction,
        {"series_uid": str(ds.get("SeriesInstanceUID", "")), "enhanced_ct": True}, positions[order],
    )


#: DICOM modalities of volumes that are not CT: PET, MR, nuclear medicine (SPECT), a radiotherapy dose grid. With
#: :data:`NOT_VOLUME_MODALITIES` (radiographs, reports, ...), the series a folder's CT is chosen
#: from pass over these.
NON_CT_VOLUME_MODALITIES = frozenset({"PT", "MR", "NM", "RTDOSE"})


def localizers_only_error(folder: str | os.PathLike) -> InputError:
    """The error for a DICOM series or folder that holds only localizer images (the reader's and the volume
    finder's, in the same words)."""
    return InputError(
        f"the DICOM series in {folder} holds only localizer images (topograms or scouts), no CT slices: point to "
        "the folder of the CT series itself."
    )


#: How a series was made, as :func:`describe_series` reads it from its first file, in the order a folder's CT is chosen
#: in: a scanner's acquired series (ImageType ORIGINAL, or none given) first, then one derived from it by other
#: software (a reformat: ImageType DERIVED), then a synthetic series of this software's (an SR series exported back
#: into the patient's study, which always has more slices than its input).
SERIES_ORIGINS = ("acquired", "derived", "synthetic")


#: Why a folder's series of one origin was read rather than the others (the chosen series' origin).
_PREFERRED = {
    "acquired": "a series acquired by a scanner is read rather than one derived or generated from it",
    "derived": "a derived series is read rather than a synthetic one",
}


class DicomSeries(NamedTuple):
    """One series of a folder: its files and what its first file's header says about it."""

    uid: str  # SeriesInstanceUID
    files: list[str]
    modality: str  # (0008,0060), upper case; "" when absent or unreadable
    number: str  # SeriesNumber (0020,0011); "" when absent
    description: str  # SeriesDescription (0008,103E); "" when absent
    origin: str = "acquired"  # one of SERIES_ORIGINS

    @property
    def label(self) -> str:
        """The series as a user recognises it: ``series 2 "CT 5mm" (CT, 24 files)``; the tail of its UID when the
        files carry neither number nor description; a series that was not acquired says so (``derived``,
        ``synthetic``) after its count."""
        parts = (f"series {self.number}" if self.number else "", f'"{self.description}"' if self.description else "")
        name = " ".join(part for part in parts if part) or f"series ...{self.uid[-12:]}"
        n = len(self.files)
        count = f"{n} file" if n == 1 else f"{n} files"
        if self.origin != "acquired":
            count = f"{count}, {self.origin}"
        return f"{name} ({self.modality}, {count})" if self.modality else f"{name} ({count})"


def series_origin(fields: dict[str, str]) -> str:
    """Which of :data:`SERIES_ORIGINS` a series is, from its header's ImageType and ImageComments: this software's
    series (``dicom_out``) begin their comments with "SYNTHETIC"."""
    if fields.get("ImageComments", "").upper().startswith("SYNTHETIC"):
        return "synthetic"
    return "derived" if fields.get("ImageType", "").upper().split("\\")[0].strip() == "DERIVED" else "acquired"


def header_values(path: str | os.PathLike, keywords: list[str]) -> dict[str, str] | None:
    """The values of a DICOM file's header elements named by ``keywords`` (``"Modality"``, ``"ImageType"``), read
    with pydicom (header only), as text: ``""`` where absent, multiple values joined by ``\\`` as DICOM stores them.
    Reads objects without an image too (structure sets, plans, reports), which SimpleITK cannot, and files without
    the 128-byte preamble (a file that is no DICOM then gives every value empty). ``None`` when the file cannot be
    read (the volume reader names a damaged file)."""
    try:
        check_deflated_size(path)  # pydicom would inflate the whole of a deflate bomb: left to the reader to refuse
        import pydicom
        from pydicom.multival import MultiValue

        with warnings.catch_warnings():  # a damaged file is the reader's to report, in our words
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(keywords), force=True)
            values = {}
            for key in keywords:
                value = ds.get(key)  # values are decoded (and checked) when read
                parts = list(value) if isinstance(value, MultiValue) else [] if value is None else [value]
                values[key] = "\\".join(str(v).strip() for v in parts)
    except Exception:  # noqa: BLE001 - not DICOM, unreadable: the caller decides
        return None
    return values


def unread_files_note(files: list[str] | tuple[str, ...]) -> str:
    """Text naming the files beside a series' slices that look like DICOM (``.dcm``, or the ``DICM`` marker) but that
    the series reader left out, e.g. a slice cut short by an incomplete copy: said with a "missing slices" refusal,
    whose gap such a file most likely is. ``""`` when there are none."""
    known = {os.path.realpath(f) for f in files}
    sizes = sorted(os.path.getsize(f) for f in files if os.path.isfile(f))
    usual = sizes[len(sizes) // 2] if sizes else 0
    unread = []
    for folder in sorted({os.path.dirname(f) for f in files}):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith(".") or os.path.realpath(path) in known or not os.path.isfile(path):
                continue
            if not (name.lower().endswith(".dcm") or (not os.path.splitext(name)[1] and _has_dicom_marker(path))):
                continue
            size = os.path.getsize(path)
            shorter = f" ({_kb(size)} where the slices read are {_kb(usual)}: cut short)" if size < usual else ""
            unread.append(f"{path}{shorter}")
    if not unread:
        return ""
    shown = "; ".join(unread[:3]) + (f"; and {len(unread) - 3} more" if len(unread) > 3 else "")
    return (f" {'This file' if len(unread) == 1 else 'These files'} beside the slices could not be read as "
            f"{'a slice' if len(unread) == 1 else 'slices'} of the series: {shown}. A damaged or incomplete file "
            "(an interrupted copy or download) is likely the missing slice: copy the series again.")


def _has_dicom_marker(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _kb(n: int) -> str:
    return f"{n / 1000:.1f} kB"


def describe_series(uid: str, files: list[str]) -> DicomSeries:
    """A :class:`DicomSeries` from the header of the first of ``files`` (fields left empty where it cannot be
    read: the volume reader names a damaged file)."""
    keywords = ["Modality", "SeriesNumber", "SeriesDescription", "ImageType", "ImageComments"]
    fields = header_values(files[0], keywords) or dict.fromkeys(keywords, "")
    return DicomSeries(uid, list(files), fields["Modality"].upper(), fields["SeriesNumber"],
                       fields["SeriesDescription"], series_origin(fields))  # fmt: skip


_SERIES_CHOICE = re.compile(r"(\.\.\.)?[0-9]+(\.[0-9]+)*")


def series_choice(value: int | str) -> int | str:
    """A series asked for by a user (``read_volume(series=...)``, ``sr --input-series``) as :func:`choose_ct_series`
    takes it: a SeriesNumber (an int, or text of digits) as an int; a SeriesInstanceUID (digits and dots), or its
    last components (``498.77``) or the tail a series label shows (``...480426021503``), as text.

    Raises:
        InputError: neither a number nor a UID.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip() if isinstance(value, str) else ""
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    if _SERIES_CHOICE.fullmatch(text) and "." in text:
        return text
    raise InputError(
        f"{value!r} names no DICOM series: give its SeriesNumber (a whole number, e.g. 3) or its SeriesInstanceUID "
        "(digits and dots, e.g. 1.2.840.113619.2.55.3.604688119.969.1268071029.320)."
    )


def series_choice_arg(text: str) -> int | str:
    """The argparse ``type`` of a command's ``--input-series``: :func:`series_choice`, its refusal said as argparse
    says a bad value (exit 2)."""
    import argparse

    try:
        return series_choice(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _is_wanted(s: DicomSeries, wanted: int | str) -> bool:
    """Whether ``s`` is the series :func:`series_choice` gave: its SeriesNumber, its UID, or a trailing part of it."""
    if isinstance(wanted, int):
        return re.fullmatch(r"\+?[0-9]+", s.number.strip()) is not None and int(s.number) == wanted
    if wanted.startswith("..."):
        return s.uid.endswith(wanted[3:])
    return s.uid == wanted or s.uid.endswith("." + wanted)


def _asked(wanted: int | str) -> str:
    """The series asked for, in a refusal's words."""
    if isinstance(wanted, int):
        return f"series number {wanted}"
    if wanted.startswith("..."):
        return f"series whose SeriesInstanceUID ends in {wanted[3:]}"
    return f"series with SeriesInstanceUID {wanted}"


def _wanted_series(folder: str | os.PathLike, everything: list[DicomSeries], wanted: int | str,
                   how_to_choose: str | None) -> DicomSeries:  # fmt: skip
    """The one series of ``everything`` that is ``wanted``; a refusal naming the series the folder holds, or those
    that match when more than one does."""
    found = [s for s in everything if s.uid == wanted] or [s for s in everything if _is_wanted(s, wanted)]
    if len(found) == 1:
        return found[0]
    if not found:
        how = (f"{_sentence(how_to_choose)} to choose one of them" if how_to_choose else
               "Choose one of them by its SeriesNumber or its SeriesInstanceUID")  # fmt: skip
        raise InputError(f"{folder} holds no {_asked(wanted)}; it holds {len(everything)} series: "
                         f"{'; '.join(s.label for s in everything)}. {how}.")  # fmt: skip
    named = "; ".join(f"{s.label}, SeriesInstanceUID {s.uid}" for s in found)
    if isinstance(wanted, int):
        which, how = f"numbered {wanted}", "choose it by its SeriesInstanceUID"
    else:
        which, how = f"whose SeriesInstanceUID ends in {wanted.lstrip('.')}", "give more of its SeriesInstanceUID"
    raise InputError(f"{folder} holds {len(found)} series {which}: {named}. There is no telling which one is meant: "
                     f"{how}.")  # fmt: skip


def _sentence(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:]


def choose_ct_series(
    folder: str | os.PathLike, series: dict[str, list[str]], *, wanted: int | str | None = None,
    how_to_choose: str | None = None,
) -> tuple[DicomSeries, str]:  # fmt: skip
    """The CT series of a folder holding ``series`` (SeriesInstanceUID -> files), and a note for the run's notes
    (``""`` when there was nothing to choose).

    Series of modalities that are not CT volumes (:data:`NON_CT_VOLUME_MODALITIES`, and radiographs, reports and
    the like) are passed over with an info line naming them; among the rest (CT, or no modality recorded) an acquired
    series is preferred to a derived one and that to a synthetic one (:data:`SERIES_ORIGINS`: a study retrieved after
    an SR series was exported into it holds both), and of those the largest is taken, with a warning naming the others.

    Args:
        wanted: the series the user chose, as :func:`series_choice` gives it (a SeriesNumber, a SeriesInstanceUID or
            its tail): that series is taken, whatever the others; None: chosen as above.
        how_to_choose: how the caller's user chooses a series, as a phrase that "to choose another" ends (e.g.
            ``"pass --input-series N (its SeriesNumber) or its SeriesInstanceUID"``), said when a series was chosen
            for them or none can be; None (callers without such an option): "Put one series per folder to choose
            another."

    Raises:
        InputError: no series is CT (naming the modalities found), or the largest preferred ones are the same size;
            ``wanted`` is in no series of the folder (naming those it holds), in several (naming them), or is not CT.
    """

    everything = [describe_series(uid, files) for uid, files in series.items()]
    not_ct = NOT_VOLUME_MODALITIES | NON_CT_VOLUME_MODALITIES
    if wanted is not None:
        return _chosen_by_user(folder, everything, series_choice(wanted), how_to_choose)
    passed = [s for s in everything if s.modality in not_ct]
    candidates = [s for s in everything if s.modality not in not_ct]
    if not candidates:
        modalities = ", ".join(sorted({s.modality for s in passed}))
        raise InputError(
            f"{folder} holds no CT series, only {modalities}: {'; '.join(s.label for s in passed)}. This tool works "
            "on CT only: point to the folder of a CT series."
        )
    notes = []
    if passed:
        msg = f"{folder}: passed over the series that are not CT: {'; '.join(s.label for s in passed)}"
        logger.info(msg)
        notes.append(msg + ".")
    held = f"{len(candidates)} DICOM series" if not passed else f"{len(candidates)} CT series"
    best = min(SERIES_ORIGINS.index(s.origin) for s in candidates)
    preferred = [s for s in candidates if SERIES_ORIGINS.index(s.origin) == best]
    chosen = max(preferred, key=lambda s: len(s.files))
    if sum(len(s.files) == len(chosen.files) for s in preferred) > 1:
        sizes = "largest ones" if len(preferred) == len(candidates) else f"largest {chosen.origin} ones"
        how = f"{_sentence(how_to_choose)} to choose one." if how_to_choose else ("Put each series in its own folder "
                                                                               "and choose one.")  # fmt: skip
        raise InputError(
            f"{folder} holds {held} and the {sizes} are the same size ({'; '.join(s.label for s in candidates)}): "
            f"there is no telling which one is meant. {how}"
        )
    if len(candidates) > 1:
        others = "; ".join(s.label for s in candidates if s is not chosen)
        how = f"{_sentence(how_to_choose or 'put one series per folder')} to choose another."
        if len(preferred) < len(candidates):  # e.g. the acquired CT over the SR series exported from it
            largest = "the largest of them, " if len(preferred) > 1 else ""
            msg = (f"{folder} holds {held}; using {largest}{chosen.label}: {_PREFERRED[chosen.origin]} (others: "
                   f"{others}). {how}")  # fmt: skip
        else:
            msg = f"{folder} holds {held}; using the largest, {chosen.label} (others: {others}). {how}"
        logger.warning(msg)
        notes.append(msg)
    return chosen, " ".join(notes)


def _chosen_by_user(folder: str | os.PathLike, everything: list[DicomSeries], wanted: int | str,
                    how_to_choose: str | None) -> tuple[DicomSeries, str]:  # fmt: skip
    """:func:`choose_ct_series` for a series the user chose: that series if it is one CT series of the folder, with a
    note naming the others; else a refusal."""
    chosen = _wanted_series(folder, everything, wanted, how_to_choose)
    not_ct = NOT_VOLUME_MODALITIES | NON_CT_VOLUME_MODALITIES
    if chosen.modality in not_ct:
        ct = [s for s in everything if s.modality not in not_ct]
        instead = (f"choose a CT series: {'; '.join(s.label for s in ct)}" if ct else
                   "the folder holds no CT series: point to the folder of a CT series")  # fmt: skip
        raise InputError(
            f"the series chosen in {folder}, {chosen.label}, is not CT but {chosen.modality}. This tool works on CT "
            f"only: {instead}."
        )
    if len(everything) == 1:
        return chosen, ""
    others = "; ".join(s.label for s in everything if s is not chosen)
    msg = f"{folder} holds {len(everything)} DICOM series; using {chosen.label}, the series chosen (others: {others})."
    logger.info(msg)
    return chosen, msg
