"""Write a generated CT as a DICOM series (CT Image Storage, one file per slice) with pydicom.

The series is labelled synthetic wherever it goes: ImageType ``DERIVED\\SECONDARY\\AXIAL``, a
SeriesDescription saying what the series is, its slice spacing, then its input and "(synthetic)"
(``"SR x4 1.25mm from 5mm (synthetic)"``, :func:`series_description`), ImageComments saying that the image
was generated, a DerivationDescription naming the model, the weights' sha256, the input's UID and the settings,
and a Source Image Sequence pointing at the input instances.

Identity: a new SeriesInstanceUID and new SOPInstanceUIDs under the site's UID root (``$DIFFUSIONCORE_UID_ROOT``,
:func:`uid_root`; else pydicom's); the patient and study modules of the input (a CT series for ``sr``, the radiograph
for ``xray2ct``) and its de-identification flags (PatientIdentityRemoved, DeidentificationMethod and its code
sequence, LongitudinalTemporalInformationModified: a de-identified input's shifted dates stay marked shifted); for
``sr`` also the input's FrameOfReferenceUID, since the thin grid lies in the same patient space, and its Laterality
when it names a side (R or L: the thin series is of the same side). Else Laterality is absent when the series'
BodyPartExamined (the input CT's, ``sr``) is an unpaired body part (:data:`UNPAIRED_BODY_PARTS`), and empty (its side
unknown) when it names none or a paired one. Without a DICOM input
(a NIfTI CT), the patient module stays empty and the study is new. The header is taken from a slice that was read, not
from a localizer left out of the series. The SeriesNumber is the one asked for, else derived from the input's
(:func:`derived_series_number`). The comments name the input by its file or folder name only, never its full path (a
hospital's folder names hold patients' names and record numbers).

Replacing (``overwrite``) is for a series this module wrote only: every file's header must say so (Manufacturer
``CTDiffusion``, ImageComments ``SYNTHETIC ...``); a folder of any other DICOM files is refused, naming what it holds.

InstanceNumber runs 1, 2, ... along the slices the way the input's own numbers run (head first or feet first), so a
viewer that sorts by number shows the result the way it shows its input; each file is named by its InstanceNumber
(``00001.dcm`` holds InstanceNumber 1), so a listing of the folder is in the same order.

Dates and times: the series' own (SeriesDate, ContentDate, ...) are the run's time in local time. The input's
TimezoneOffsetFromUTC is copied when it has one; an input without one gets none either (the offset would hold for the
StudyDate and StudyTime copied from it too, and reinterpret them), its times taken as this computer's local time; a
series with no DICOM input (nothing copied) gets this computer's offset.

Geometry: ImagePositionPatient of each slice (LPS, oblique grids too), ImageOrientationPatient,
PixelSpacing, SliceThickness and SpacingBetweenSlices (along the slices' normal) of the written grid. A
gantry-tilted grid (sheared along k only: the slices step along the table, not their normal) is written as a
tilted acquisition is, each slice at its own position. SliceLocation follows the input series' own convention (its
sign and offset against the position along the normal, :func:`slice_location_rule`), else is that position.

Voxels are HU rounded to whole numbers, 16 bits with Rescale Slope 1 (:func:`pixel_encoding`): signed with Intercept 0
when the values fit -32768..32767 HU; an extended-HU result beyond that (metal up to ~31,000 HU and its overshoot)
unsigned with a RescaleIntercept (-1024 HU, lower when the values reach lower) when their span fits 65,535; only
beyond that clipped to -32768..32767 HU, with a warning that counts the clipped voxels.

The input's slice thickness and what it means for the result (an overlapping or interspaced input,
:attr:`~DiffusionCore.provenance.Provenance.input_slice_note`) end the ImageComments and are in the
DerivationDescription; before them, the run's notes that qualify the result
(:attr:`~DiffusionCore.provenance.Provenance.notes`: a shoulder radiograph gave a chest-like volume) as
``Caveat: ...``; SliceThickness and SpacingBetweenSlices are the written grid's (the thin slices' spacing).

The series is written into a hidden folder beside the output (``.NAME.PID.XXXXXXXX.partial``) and renamed into
place, with the permissions of any folder the user creates (umask), when every file is written, so a failed or
cancelled run leaves no partial series. A run killed outright (``kill -9``) cannot remove its hidden folder: the
next write of the same series removes it (and keeps one of a run still writing).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dicom_in import check_series_identity
from .errors import ConfigError, InputError, OutputError, OutputExistsError
from .files import (
    check_name_length,
    folder_writable,
    no_room_reason,
    partial_folder,
    publish,
    remove_stale_partials,
    too_long_error,
)
from .provenance import NOT_ACQUIRED, SOFTWARE, SYNTHETIC_SUFFIX, Provenance, input_name
from .version import __version__
from .volume import Volume, is_localizer

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Attributes of the input copied as they are: Patient, General Study, Patient Study modules. pydicom decodes their
#: text from the input's character set and encodes it in the series' own (:data:`CHARACTER_SET`).
_PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "OtherPatientIDs", "EthnicGroup", "PatientComments",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "StudyDescription", "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)  # fmt: skip
#: Series-level attributes of an input CT that still describe the thin series (copied for super-resolution only).
_SERIES_KEYWORDS = ("PatientPosition", "BodyPartExamined", "KVP", "ConvolutionKernel", "ContrastBolusAgent")
#: BodyPartExamined values (DICOM CID 4031) of unpaired body parts, of which a series has no Laterality: the ones
#: dciodvfy also takes as unpaired. Of any other body part, or none named, the side is unknown and Laterality is empty.
UNPAIRED_BODY_PARTS = frozenset((
    "ABDOMEN", "ABDOMENPELVIS", "AORTA", "BLADDER", "BRAIN", "CERVIX", "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS",
    "COCCYX", "COLON", "CSPINE", "CTSPINE", "DUODENUM", "ESOPHAGUS", "FACE", "GALLBLADDER", "HEAD", "HEADNECK",
    "HEART", "JAW", "LARYNX", "LIVER", "LSPINE", "LSSPINE", "MEDIASTINUM", "MOUTH", "NECK", "NECKCHEST",
    "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "NOSE", "PANCREAS", "PELVIS", "PHARYNX", "PROSTATE", "RECTUM", "SKULL",
    "SPINE", "SPLEEN", "SSPINE", "STERNUM", "STOMACH", "THYROID", "TLSPINE", "TONGUE", "TRACHEA", "TSPINE", "UTERUS",
    "WHOLEBODY",
))  # fmt: skip
#: The SpecificCharacterSet of every written series: UTF-8. Its descriptions name nodes and files in any script
#: (e.g. "Thorax Müller 胸部"), which an input's Latin-1 (ISO_IR 100) could not hold: pydicom wrote "?" instead.
CHARACTER_SET = "ISO_IR 192"
#: The General Series' SeriesNumber of a derived series: the input's plus this (or this alone).
SERIES_NUMBER_OFFSET = 1000
#: The largest SeriesNumber (an IS value: a signed 32-bit integer); numbers start at 1.
SERIES_NUMBER_MAX = 2**31 - 1
#: The window of a written CT when its input gives none in HU: mediastinum.
DEFAULT_WINDOW = (40.0, 400.0)
#: The windows of a CT made from a radiograph (centre, width, explanation), the first the one the X-ray to CT module
#: shows it in: a coarse synthetic CT is read whole (lungs, mediastinum, bone) before any detail. A viewer opens the
#: first; the second is the mediastinum window a CT series usually has. (A radiograph's own window is in its pixel
#: units, so it is never copied.)
SYNTHETIC_CT_WINDOWS = ((-300.0, 1500.0, "LUNG AND SOFT TISSUE"), (40.0, 400.0, "MEDIASTINUM"))


#: Environment variable naming the site's own UID root (an organisation's registered root, e.g. ``1.2.840.99999.5.``):
#: the written series' SeriesInstanceUID, SOPInstanceUIDs and any new Study or Frame of Reference UID start with it.
UID_ROOT_ENV = "DIFFUSIONCORE_UID_ROOT"
#: The longest UID root: the rest of a UID's 64 characters are random digits, at least 32 of them (over 100 bits), so
#: that UIDs generated on many computers under one root do not collide.
UID_ROOT_MAX = 32
_UID_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


def uid_root() -> str:
    """The root of the UIDs a written series gets: ``$DIFFUSIONCORE_UID_ROOT`` (a hospital's registered root; a final
    dot is added when it has none), else pydicom's (``1.2.826.0.1.3680043.8.498.``). A PACS may accept only UIDs
    under its site's root, and a UID under pydicom's root says nothing of who made the series.

    Raises:
        ConfigError: the variable is set to something that is no UID root (digits and dots, no component with a
            leading zero, at most :data:`UID_ROOT_MAX` characters).
    """
    from pydicom.uid import PYDICOM_ROOT_UID

    value = os.environ.get(UID_ROOT_ENV, "").strip()
    if not value:
        return PYDICOM_ROOT_UID
    root = value if value.endswith(".") else value + "."
    if not _UID_ROOT.match(root):
        raise ConfigError(f"environment variable {UID_ROOT_ENV}: {value!r} is no UID root: give your organisation's "
                          "registered root, digits separated by dots with no leading zeros (e.g. 1.2.840.99999.5), "
                          f"or unset {UID_ROOT_ENV} to use pydicom's")  # fmt: skip
    if len(root) > UID_ROOT_MAX:
        raise ConfigError(f"environment variable {UID_ROOT_ENV}: {value!r} is {len(root)} characters long (with its "
                          f"final dot); a UID root may have at most {UID_ROOT_MAX}, so that the UIDs made from it (64 "
                          "characters at most) keep enough random digits to be unique: use a shorter root (a "
                          f"sub-root of your organisation's), or unset {UID_ROOT_ENV} to use pydicom's")  # fmt: skip
    return root


def new_uid() -> str:
    """A new UID under :func:`uid_root`."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=uid_root()))


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # a dependency of the package; only a broken install lacks it
        raise OutputError(
            "writing DICOM needs the pydicom package, which is missing: reinstall DiffusionCore "
            "(pip install -e .) or write NIfTI/NRRD instead"
        ) from exc
    return pydicom


@dataclass(frozen=True)
class SourceInstance:
    """One input instance: its SOP class and instance UIDs and, for slices, its position (ImagePositionPatient),
    InstanceNumber and SliceLocation as the input has them."""

    sop_class_uid: str
    sop_instance_uid: str
    position: tuple[float, float, float] | None = None
    instance_number: int | None = None
    slice_location: float | None = None


@dataclass
class DicomSource:
    """What the written series takes from its DICOM input: the patient and study attributes, the series'
    frame of reference and window, and the instances it derives from."""

    header: Any  # pydicom Dataset of the first instance read as the volume (no localizer), without pixel data
    instances: list[SourceInstance] = field(default_factory=list)
    #: the SeriesNumbers of the study's series known besides this one (in the files read, in Slicer's DICOM database),
    #: which a derived series does not take (:func:`derived_series_number`)
    study_series_numbers: frozenset[int] = frozenset()

    @classmethod
    def from_path(cls, path: str | os.PathLike, series_uid: str | None = None) -> DicomSource:
        """Read the headers (never the pixels) of a DICOM file or of the series in a folder.

        Args:
            path: a DICOM file (a radiograph) or a folder holding a series.
            series_uid: the series to take from the folder (default: the largest one).

        Raises:
            InputError: no DICOM file at ``path``.
        """
        p = Path(path)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        return cls.from_files(files, series_uid, where=str(p))

    @classmethod
    def from_files(
        cls, files: list[str | os.PathLike], series_uid: str | None = None, *, where: str = "the given files"
    ) -> DicomSource:
        """Read the headers of these DICOM files (e.g. the instances a Slicer node was loaded from).

        The header is that of the first file (by name) that is no localizer (a topogram stored in the CT series is left
        out of the volume, and so of the header and the source instances).

        Raises:
            InputError: no readable DICOM file; the chosen series' files mix patients, studies or frames of reference
                (:func:`~DiffusionCore.dicom_in.check_series_identity`).
        """
        pydicom = _pydicom()
        p = where
        by_series: dict[str, list[Any]] = {}
        for f in files:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
                continue
            if "SOPInstanceUID" not in ds:
                continue
            by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
        if not by_series:
            raise InputError(f"{p} holds no readable DICOM file: the DICOM output needs a DICOM input's headers")
        if series_uid is not None and series_uid in by_series:
            chosen = by_series[series_uid]
        else:
            chosen = max(by_series.values(), key=len)
        chosen = [ds for ds in chosen if not is_localizer(_text(ds.get("ImageType")))] or chosen  # the slices read
        if len(chosen) > 1:
            values = {str(getattr(ds, "filename", "") or n): {kw: _text(ds.get(kw)) for kw in ("PatientID",
                      "StudyInstanceUID", "FrameOfReferenceUID")} for n, ds in enumerate(chosen)}  # fmt: skip
            check_series_identity(values, p)
        study = str(chosen[0].get("StudyInstanceUID", ""))
        numbers = frozenset(
            number for datasets in by_series.values() for ds in datasets[:1]
            if str(ds.get("StudyInstanceUID", "")) == study and (number := _whole_number(ds)) is not None
        )  # fmt: skip
        instances = []
        for ds in chosen:
            pos = ds.get("ImagePositionPatient")
            instances.append(SourceInstance(
                str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                tuple(float(v) for v in pos) if pos is not None and len(pos) == 3 else None,
                _whole_number(ds, "InstanceNumber"), _decimal_number(ds, "SliceLocation"),
            ))  # fmt: skip
        return cls(header=chosen[0], instances=instances, study_series_numbers=numbers)

    @property
    def series_uid(self) -> str:
        return str(self.header.get("SeriesInstanceUID", ""))


#: The steepest slice stack a DICOM series is written with: the slices' step may lean from their normal by up to
#: this angle (a gantry tilt; clinical scanners tilt by 30 degrees at most).
MAX_DICOM_TILT_DEG = 45.0


def check_dicom_geometry(vol: Volume) -> np.ndarray:
    """The direction matrix, if a DICOM series can hold the grid, else an OutputError. A DICOM image has
    perpendicular rows and columns (ImageOrientationPatient), and each slice its own position
    (ImagePositionPatient), so it holds an orthonormal grid and also a gantry-tilted one: rows and columns
    perpendicular, the step from slice to slice leaning from their normal (as a tilted acquisition stores it,
    and as 3D Slicer reads a tilted series: a grid sheared along k only)."""
    d = np.asarray(vol.direction, dtype=np.float64).reshape(3, 3)
    row, col, step = d[:, 0], d[:, 1], d[:, 2]
    in_plane = abs(float(row @ col)) < 1e-4 and np.allclose(np.linalg.norm(d, axis=0), 1.0, atol=1e-4)
    normal = np.cross(row, col)
    lean = float(np.degrees(np.arccos(np.clip(abs(float(step @ normal)) / max(float(np.linalg.norm(normal)), 1e-12),
                                              0.0, 1.0))))  # fmt: skip
    if not in_plane or lean > MAX_DICOM_TILT_DEG:
        what = ("its rows and columns are not perpendicular" if not in_plane
                else f"its slices step {lean:.0f} degrees from their normal")  # fmt: skip
        raise OutputError(
            f"the volume's grid is sheared ({what}), which a DICOM CT series cannot hold exactly: write NRRD or "
            "MHA instead (--output-format file and a .nrrd or .mha name)"
        )
    return d


def _ds_text(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


#: The longest SeriesDescription: an LO value, 64 characters.
DESCRIPTION_MAX = 64


def series_description(source: DicomSource | None, title: str, slice_spacing_mm: float | None = None) -> str:
    """What the series is, then the input it came from, in at most :data:`DESCRIPTION_MAX` characters, always ending in
    " (synthetic)": ``"SR x4 1.25mm from 5mm (synthetic)"`` for a 1.25 mm result of a "5mm" series (a PACS list that
    showed "5mm SR x4 ..." had a reader take the thin series for the thick one), ``"CT from radiograph Chest PA
    (synthetic)"`` for a title that says what it came from itself.

    Args:
        source: the DICOM input, whose SeriesDescription is named (its own " (synthetic)" left out), or ``None``.
        title: the run's title (``"SR x4 (synthetic)"``); its " (synthetic)" moves to the end.
        slice_spacing_mm: the written slices' spacing (along their normal), said after the title's label unless the
            label says a spacing itself (``"SR 1.5 mm"``); ``None``: not said.

    Too long a text loses the end of the input's description first, then the description, then the end of the label.
    """
    label = title.strip().removesuffix(SYNTHETIC_SUFFIX).strip()
    if label.lower() == "synthetic":  # the title of a result whose run is not known says nothing more
        label = ""
    if slice_spacing_mm and 0 < slice_spacing_mm < float("inf") and not re.search(r"\d\s*mm\b", label):
        label = f"{label} {slice_spacing_mm:.3g}mm".strip()  # "1.25mm", as a scanner's own "5mm" says it
    base = str(source.header.get("SeriesDescription", "")).strip() if source is not None else ""
    base = base.removesuffix(SYNTHETIC_SUFFIX).strip()  # a synthetic input's mark: said once, at the end
    joint = " " if " from " in f" {label} " else " from "  # "CT from radiograph Chest PA", "SR x4 1.25mm from 5mm"
    room = DESCRIPTION_MAX - len(label) - len(joint) - len(SYNTHETIC_SUFFIX)
    if base and room >= 4:
        return f"{label}{joint}{base[:room].rstrip()}{SYNTHETIC_SUFFIX}".lstrip()
    return f"{label[: DESCRIPTION_MAX - len(SYNTHETIC_SUFFIX)].rstrip()}{SYNTHETIC_SUFFIX}".lstrip()


def _fmt(value: float) -> str:
    """A DS value: as many significant digits as its 16 characters hold."""
    for digits in range(12, 5, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.6g}"


def _nearest_sources(source: DicomSource | None, positions: np.ndarray, normal: np.ndarray) -> list[list[SourceInstance]]:
    """For each written slice, the input instances it derives from: the input slice nearest along the
    normal (SR), or every input instance (a radiograph, or inputs without positions)."""
    if source is None:
        return [[] for _ in positions]
    placed = [s for s in source.instances if s.position is not None]
    if len(placed) < 2:
        return [list(source.instances) for _ in positions]
    where = np.array([np.dot(s.position, normal) for s in placed])
    out = []
    for p in positions:
        out.append([placed[int(np.argmin(np.abs(where - float(np.dot(p, normal)))))]])
    return out


def _text(value: Any) -> str:
    """A header value as text, a multi-valued one joined by ``\\`` as DICOM stores it (``""`` when absent)."""
    if value is None:
        return ""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return str(value)
    return "\\".join(str(v) for v in value)


def instance_numbers(source: DicomSource | None, positions: np.ndarray, normal: np.ndarray) -> list[int]:
    """The InstanceNumber of each written slice (at ``positions``): 1, 2, ... in the direction the input's own numbers
    run along the slices' normal (a scanner numbers head first or feet first, and viewers and hanging protocols that
    sort by number show the result the way they show its input); in the order of the slices when the input says
    nothing (no DICOM input, one slice, numbers that do not follow the positions)."""
    along = positions @ normal
    order = np.arange(len(along))
    known = [(float(np.dot(i.position, normal)), i.instance_number) for i in (source.instances if source else [])
             if i.position is not None and i.instance_number is not None]  # fmt: skip
    if len(known) >= 2:
        where, number = np.array(known).T
        if np.ptp(where) > 0 and np.ptp(number) > 0 and float(np.corrcoef(where, number)[0, 1]) < 0:
            order = np.argsort(np.argsort(-along, kind="stable"), kind="stable")  # numbers fall along the normal
        else:
            order = np.argsort(np.argsort(along, kind="stable"), kind="stable")
    return [int(r) + 1 for r in order]


def _whole_number(ds: Any, keyword: str = "SeriesNumber") -> int | None:
    """A dataset's SeriesNumber (or another IS attribute, e.g. InstanceNumber), or None (absent, empty or not a
    number)."""
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return None


def _decimal_number(ds: Any, keyword: str) -> float | None:
    """A dataset's DS attribute (e.g. SliceLocation) as a finite number, or None (absent, empty or not a number)."""
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


#: How closely (mm) an input's SliceLocation must follow a straight line of its slices' positions along the normal for
#: the written series to follow that line: DS values rounded to whole millimetres pass; a SliceLocation that is no
#: function of the position (a table position of another reference, one file of another numbering) does not.
SLICE_LOCATION_TOLERANCE_MM = 0.5


def slice_location_rule(source: DicomSource | None, normal: np.ndarray) -> tuple[float, float]:
    """``(a, b)``: the SliceLocation of a written slice at ``position`` is ``a * (position . normal) + b``, the input
    series' own convention. Scanners differ: many write the position along the slices' normal, others the table's
    z coordinate, which for slices whose normal points to the feet (ImageOrientationPatient 1,0,0/0,-1,0, or a
    feet-first patient) has the opposite sign; a viewer that overlays SliceLocation then showed opposite numbers for the
    same anatomy in the input and the result. Fitted to the input's slices that carry SliceLocation (at least two at
    different positions, within :data:`SLICE_LOCATION_TOLERANCE_MM` of one line; a slope within 1% of +-1 counts as
    exactly that); ``(1, 0)``, the position along the normal, when the input says nothing usable or is no DICOM."""
    known = [(float(np.dot(i.position, normal)), i.slice_location) for i in (source.instances if source else [])
             if i.position is not None and i.slice_location is not None]  # fmt: skip
    if len(known) < 2:
        return 1.0, 0.0
    where, location = np.array(known, dtype=np.float64).T
    if np.ptp(where) <= SLICE_LOCATION_TOLERANCE_MM:
        return 1.0, 0.0
    slope, offset = np.polyfit(where, location, 1)
    if abs(abs(slope) - 1.0) < 0.01:  # the usual case: +-1, and an offset (0 for most scanners)
        slope = float(np.sign(slope))
        offset = float(np.median(location - slope * where))
    if abs(slope) < 1e-3 or np.max(np.abs(slope * where + offset - location)) > SLICE_LOCATION_TOLERANCE_MM + 1e-6:
        logger.debug("the input's SliceLocation does not follow its positions: the written series has its own")
        return 1.0, 0.0
    return float(slope), float(offset)


#: The largest value 16-bit pixels hold: unsigned 0..65535, signed -32768..32767.
UINT16_MAX = 65535
INT16_RANGE = (-32768, 32767)
#: The RescaleIntercept of an unsigned series (HU = stored - 1024: the convention of many CT scanners), unless the
#: values reach lower.
UNSIGNED_INTERCEPT = -1024


def pixel_encoding(hu: np.ndarray, what: str = "the series") -> tuple[np.ndarray, int, int]:
    """The stored pixels of ``hu`` (rounded to whole HU), their PixelRepresentation (1 signed, 0 unsigned) and
    RescaleIntercept (Rescale Slope 1 always).

    Signed 16 bits with intercept 0 when every value fits :data:`INT16_RANGE`, as before and as most CT series are
    stored. Else unsigned 16 bits with intercept :data:`UNSIGNED_INTERCEPT` (or the lowest value, when lower; or
    higher, when the top would not fit) when the values' span fits :data:`UINT16_MAX`: an extended-HU result (metal
    at 31,000 HU, its overshoot to 36,000 HU) is written whole, where int16 clipped 363 voxels at 32,767 HU without a
    word. Only a span beyond that is clipped to :data:`INT16_RANGE`, with a warning that counts the clipped voxels
    (``what`` names the series in it).
    """
    values = np.rint(hu)
    lo, hi = float(values.min()), float(values.max())
    if INT16_RANGE[0] <= lo and hi <= INT16_RANGE[1]:
        return values.astype("<i2"), 1, 0
    if hi - lo <= UINT16_MAX:
        intercept = max(min(int(lo), UNSIGNED_INTERCEPT), int(hi) - UINT16_MAX)
        return (values - intercept).astype("<u2"), 0, intercept
    clipped = int(np.count_nonzero(values < INT16_RANGE[0]) + np.count_nonzero(values > INT16_RANGE[1]))
    logger.warning(
        "%s: %d voxels clipped to %d..%d HU: the result's values (%.6g to %.6g HU) span more than the %d steps of "
        "16-bit DICOM pixels; write NRRD or NIfTI (float32) to keep them", what, clipped, *INT16_RANGE, lo, hi,
        UINT16_MAX,
    )  # fmt: skip
    return np.clip(values, *INT16_RANGE).astype("<i2"), 1, 0


#: The SeriesNumbers this process has given derived series, by StudyInstanceUID.
_NUMBERS_GIVEN: dict[str, set[int]] = {}
#: What :func:`sibling_series_numbers` read of a folder: (real path, modification time) -> (StudyInstanceUID,
#: SeriesNumber); a batch writing hundreds of series into one folder reads each sibling's header once.
_SIBLING_HEADERS: dict[tuple[str, int], tuple[str, int | None]] = {}


def check_series_number(number: int) -> int:
    """``number`` when it is a SeriesNumber DICOM can hold (1 to :data:`SERIES_NUMBER_MAX`), else a ConfigError."""
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= SERIES_NUMBER_MAX:
        raise ConfigError(f"a series number must be a whole number from 1 to {SERIES_NUMBER_MAX} (DICOM's IS "
                          f"range); got {number!r}")  # fmt: skip
    return number


def _first_file_header(folder: Path) -> tuple[str, int | None] | None:
    """(StudyInstanceUID, SeriesNumber) of the first file of ``folder`` (by name, not hidden), read without pixels;
    None when it holds no readable DICOM file there."""
    pydicom = _pydicom()
    try:
        first = min((f for f in folder.iterdir() if not f.name.startswith(".") and f.is_file()), default=None)
        if first is None:
            return None
        ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesNumber"])
        return str(ds.get("StudyInstanceUID", "")), _whole_number(ds)
    except Exception:  # noqa: BLE001 - not DICOM, unreadable, gone: it names no series number
        return None


def sibling_series_numbers(folder: str | os.PathLike, study_uid: str) -> frozenset[int]:
    """The SeriesNumbers of the study ``study_uid``'s series in the folders beside ``folder`` (the output's), from
    one header per folder (its first file; folders that hold no DICOM file, or another study's, count for nothing):
    the results of several runs filed side by side, and sent to one study, each get a number of their own."""
    out = Path(folder)
    parent = out.parent if str(out.parent) else Path(".")
    numbers = set()
    try:
        entries = [e for e in parent.iterdir() if e.name != out.name and not e.name.startswith(".")]
    except OSError:
        return frozenset()
    for entry in entries:
        try:
            if not entry.is_dir():
                continue
            key = (os.path.realpath(entry), entry.stat().st_mtime_ns)
        except OSError:
            continue
        if key not in _SIBLING_HEADERS:
            _SIBLING_HEADERS[key] = _first_file_header(entry) or ("", None)
        study, number = _SIBLING_HEADERS[key]
        if study == study_uid and number is not None:
            numbers.add(number)
    return frozenset(numbers)


def derived_series_number(
    source: DicomSource | None, study_uid: str, folder: str | os.PathLike | None = None, requested: int | None = None
) -> int:
    """The SeriesNumber of a series derived from ``source`` in the study ``study_uid``, written into ``folder``.

    ``requested`` (``--series-number``) when given. Else the input's number plus :data:`SERIES_NUMBER_OFFSET` (that
    offset alone without one, or when the sum would pass :data:`SERIES_NUMBER_MAX`), or the first number after it that
    no series of the study known here has: ``source.study_series_numbers`` (the input folder's and Slicer's DICOM
    database's), those this process has given in the study before, and those of the study's series in the folders
    beside ``folder`` (:func:`sibling_series_numbers`: earlier runs' results). A PACS lists a study's series by
    number, and the SR series of one CT, its uncertainty map and every later export had the same. Numbers stay within
    1 .. :data:`SERIES_NUMBER_MAX` (an IS value), wrapping round to 1.
    """
    taken = (source.study_series_numbers if source is not None else frozenset()) | _NUMBERS_GIVEN.get(study_uid, set())
    if folder is not None:
        taken |= sibling_series_numbers(folder, study_uid)
    if requested is not None:
        candidate = check_series_number(requested)
        if candidate in taken:
            logger.warning("series number %d is taken by another series of this study known here; written as asked "
                           "(--series-number)", candidate)  # fmt: skip
    else:
        number = _whole_number(source.header) if source is not None else None
        candidate = (number if number is not None and number > 0 else 0) + SERIES_NUMBER_OFFSET
        if candidate > SERIES_NUMBER_MAX:  # an input numbered near the IS maximum
            candidate = SERIES_NUMBER_OFFSET
        for _ in range(len(taken) + 1):  # at most every taken number is passed
            if candidate not in taken:
                break
            candidate = candidate + 1 if candidate < SERIES_NUMBER_MAX else 1
    _NUMBERS_GIVEN.setdefault(study_uid, set()).add(candidate)
    return candidate


def local_date_time(iso: str, offset: str = "") -> tuple[Any, Any, str]:
    """DICOM's DA and TM of the ISO 8601 time ``iso`` (the provenance's date, in UTC; a time without a zone is taken
    as UTC; an empty or unreadable one is now) in local time, with the TimezoneOffsetFromUTC that says which: DA and TM
    are local times, so a UTC clock written as they are put a series made in Tokyo at 01:38 on the previous day at
    16:38. Local is this computer's zone, or ``offset`` (``"+0900"``, the input's TimezoneOffsetFromUTC), which then
    holds for the study's dates and times copied from the input as well. The offset returned is the zone's; whether
    it is written is :func:`_base_dataset`'s choice (not for a DICOM input that gives none)."""
    _pydicom()
    from pydicom.valuerep import DA, DT, TM

    try:
        when = datetime.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        when = datetime.datetime.now(datetime.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    try:
        zone = DT(f"20000101{offset.strip()}").tzinfo if offset.strip() else None
    except ValueError:  # an input's malformed offset: this computer's zone
        zone = None
    local = when.astimezone(zone).replace(microsecond=0)
    return DA(local.date()), TM(local.time()), local.strftime("%z")


def _valid_offset(value: Any) -> str:
    """A TimezoneOffsetFromUTC of an input (``"+0900"``), or ``""`` when it has none or one DICOM cannot read."""
    text = _text(value).strip()
    return text if re.fullmatch(r"[+-](0\d|1[0-4])[0-5]\d", text) else ""


_AGE = re.compile(r"^\s*0*(\d{1,3})\s*([DWMY])\s*$", re.I)


def _copy_valid(src: Any, ds: Any, keyword: str) -> None:
    """Copy ``keyword`` from the input's header when it holds a value valid for its VR. Scanners and PACS exports
    write some that are not (PatientAge "59Y " instead of "059Y"), which a validator such as dciodvfy then reports
    as an error of the written series: an age is written in DICOM's form, anything else invalid is left out (the
    attributes copied are optional or may be empty), with a line in the log."""
    if keyword not in src:
        return
    from pydicom import config
    from pydicom.multival import MultiValue
    from pydicom.valuerep import validate_value

    elem = src.data_element(keyword)
    value = elem.value
    if elem.VR == "AS" and isinstance(value, str) and (age := _AGE.match(value)):
        value = f"{int(age[1]):03d}{age[2].upper()}"
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        if elem.VR not in ("SQ", "PN", "UN") and value not in (None, ""):
            for item in items:  # the text each value is written as (a DSfloat, an IS as their strings)
                validate_value(elem.VR, item if isinstance(item, (str, bytes)) else str(item), config.RAISE)
    except (ValueError, TypeError) as exc:
        logger.info("the input's %s is not a valid %s value (%s): left out of the written series", keyword, elem.VR,
                    exc)  # fmt: skip
        return
    setattr(ds, keyword, value)


def _base_dataset(
    source: DicomSource | None, prov: Provenance, *, keep_frame: bool, folder: Path | None = None,
    series_number: int | None = None, slice_spacing_mm: float | None = None,
) -> tuple[Any, dict[str, str]]:
    """The attributes shared by every slice, and the UIDs of the new series (written into ``folder``);
    ``slice_spacing_mm``: the written slices' spacing, which the SeriesDescription of a super-resolution result says."""
    _pydicom()
    from pydicom.dataset import Dataset

    ds = Dataset()
    src = source.header if source is not None else None
    if src is not None:
        for kw in _PATIENT_STUDY_KEYWORDS:
            _copy_valid(src, ds, kw)
        if prov.task == "sr" and src.get("Modality") == "CT":  # not a CT generated from a topogram, whose
            for kw in _SERIES_KEYWORDS:  # kVp and kernel are the scout's, not the generated volume's
                _copy_valid(src, ds, kw)
            if _text(src.get("Laterality")).strip().upper() in ("R", "L"):  # the same side of a paired body part
                ds.Laterality = _text(src.get("Laterality")).strip().upper()
    # Laterality (type 2C): absent for an unpaired body part (dciodvfy warned on every file of an empty one); empty,
    # its side unknown, where no body part is named (a radiograph's is never copied: its side is not the side of the
    # chest-like CT made from it) or a paired one without a side: dciodvfy reports an absent one there as an error
    if "Laterality" not in ds and _text(ds.get("BodyPartExamined")).strip().upper() not in UNPAIRED_BODY_PARTS:
        ds.Laterality = ""
    uids = {
        "series": new_uid(),
        "study": str(ds.get("StudyInstanceUID", "")) or new_uid(),
        "frame": (str(src.get("FrameOfReferenceUID", "")) if (keep_frame and src is not None) else "") or new_uid(),
    }
    ds.SpecificCharacterSet = CHARACTER_SET
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # fmt: skip
        if kw not in ds:
            setattr(ds, kw, "")  # type 2: present, may be empty
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.SeriesNumber = derived_series_number(source, uids["study"], folder, series_number)
    ds.SeriesDescription = series_description(source, prov.title, slice_spacing_mm if prov.task == "sr" else None)
    if "PatientPosition" not in ds:
        ds.PatientPosition = ""  # type 2C for CT: unknown for a CT made from a radiograph
    input_offset = _valid_offset(src.get("TimezoneOffsetFromUTC")) if src is not None else ""
    date, clock, offset = local_date_time(prov.date, input_offset)
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = clock
    if src is None or input_offset:  # one offset holds for every date and time of the instance, the study's copied too
        ds.TimezoneOffsetFromUTC = offset
    ds.Manufacturer = SOFTWARE
    ds.ManufacturerModelName = f"{SOFTWARE} {prov.task}"
    ds.SoftwareVersions = __version__
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.DerivationDescription = _ds_text(prov.derivation(), 1024)
    slices = f" {prov.input_slices()}" if prov.input_slices() else ""  # e.g. 10 mm slices every 5 mm: said to a reader
    caveats = f" {prov.caveats()}" if prov.caveats() else ""  # e.g. a shoulder radiograph gave a chest-like volume
    ds.ImageComments = _ds_text(
        f"SYNTHETIC: {NOT_ACQUIRED}. {prov.title} from {input_name(prov.input) or 'the input'} by {prov.software}, "
        f"weights {prov.weights} (sha256 {prov.weights_sha256}).{caveats}{slices}", 10240,
    )  # fmt: skip
    if "KVP" not in ds:
        ds.KVP = ""
    ds.AcquisitionNumber = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    if _window_in_hu(src):
        ds.WindowCenter = src.WindowCenter
        ds.WindowWidth = src.WindowWidth
    elif prov.task == "xray2ct":
        ds.WindowCenter = [_fmt(c) for c, _, _ in SYNTHETIC_CT_WINDOWS]
        ds.WindowWidth = [_fmt(w) for _, w, _ in SYNTHETIC_CT_WINDOWS]
        ds.WindowCenterWidthExplanation = [name for _, _, name in SYNTHETIC_CT_WINDOWS]
    else:
        ds.WindowCenter, ds.WindowWidth = (_fmt(v) for v in DEFAULT_WINDOW)
    return ds, uids


def _window_in_hu(src: Any) -> bool:
    """Whether the input's WindowCenter/WindowWidth may be copied to the written CT: only a CT image's (in HU), not a
    radiograph's or a CT localizer's (in their own pixel units, e.g. 15000/30000), which would show the CT blank."""
    if src is None or "WindowCenter" not in src or "WindowWidth" not in src:
        return False
    value = src.get("ImageType") or ""
    image_type = value if isinstance(value, str) else "\\".join(str(v) for v in value)
    return str(src.get("Modality", "")).upper() == "CT" and not is_localizer(image_type)


def write_dicom_series(
    vol: Volume,
    folder: str | os.PathLike,
    provenance: Provenance,
    *,
    source: DicomSource | None = None,
    keep_frame_of_reference: bool = True,
    overwrite: bool = False,
    series_number: int | None = None,
) -> Path:
    """Write ``vol`` (HU) as a CT DICOM series into ``folder``, atomically.

    Args:
        vol: the generated volume; slices are taken along its third index axis (k).
        folder: the series folder: new, empty, or (with ``overwrite``) a series this function wrote before.
        provenance: what made the volume (:class:`~DiffusionCore.provenance.Provenance`).
        source: the DICOM input's headers (:meth:`DicomSource.from_path`), or ``None``.
        keep_frame_of_reference: reuse the input's FrameOfReferenceUID (SR: the same patient space); ``False``
            for a volume whose space is not the input's (a CT generated from a radiograph).
        overwrite: replace a series this function wrote here before (never any other files).
        series_number: the SeriesNumber (1 to :data:`SERIES_NUMBER_MAX`); default: :func:`derived_series_number`.

    Returns:
        The series folder.

    Raises:
        OutputError: the folder holds other files, cannot be written, or the grid is sheared.
        ConfigError: ``series_number`` out of range.
    """
    _pydicom()
    if series_number is not None:
        check_series_number(series_number)
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    out = check_dicom_output(folder, overwrite=overwrite)
    d = check_dicom_geometry(vol)
    sx, sy, sz = vol.spacing
    nz = vol.shape[0]
    origin = np.asarray(vol.origin, dtype=np.float64)
    positions = np.stack([origin + k * sz * d[:, 2] for k in range(nz)])
    normal = np.cross(d[:, 0], d[:, 1])
    between = sz * abs(float(d[:, 2] @ normal))  # along the normal: sz itself unless the grid is tilted
    base, _ = _base_dataset(source, provenance, keep_frame=keep_frame_of_reference, folder=out,
                            series_number=series_number, slice_spacing_mm=between)
    refs = _nearest_sources(source, positions, normal)
    numbers = instance_numbers(source, positions, normal)
    pixels, base.PixelRepresentation, intercept = pixel_encoding(vol.array, f"the DICOM series {out}")
    base.RescaleIntercept = str(intercept)
    location_slope, location_offset = slice_location_rule(source, normal)
    orientation = [_fmt(v) for v in (*d[:, 0], *d[:, 1])]
    spacing = [_fmt(sy), _fmt(sx)]  # row spacing (between rows), then column spacing
    if removed := remove_stale_partials(out):
        logger.info("removed what an interrupted earlier run left beside %s: %s", out.name, ", ".join(removed))
    tmp = None
    try:
        tmp = partial_folder(out)  # inside the try: a folder the system refuses (EPERM, ENOSPC) is said as such
        for k in range(nz):
            ds = base.copy()
            ds.SOPInstanceUID = new_uid()
            ds.InstanceNumber = numbers[k]
            ds.ImagePositionPatient = [_fmt(v) for v in positions[k]]
            ds.ImageOrientationPatient = orientation
            ds.PixelSpacing = spacing
            ds.SliceThickness = _fmt(between)
            ds.SpacingBetweenSlices = _fmt(between)
            ds.SliceLocation = _fmt(location_slope * float(np.dot(positions[k], normal)) + location_offset)
            ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[2])
            if refs[k]:
                items = []
                for ref in refs[k]:
                    item = Dataset()
                    item.ReferencedSOPClassUID = ref.sop_class_uid
                    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
                    items.append(item)
                ds.SourceImageSequence = items
            ds.PixelData = pixels[k].tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            ds.save_as(tmp / f"{numbers[k]:05d}.dcm", enforce_file_format=True)  # 00001.dcm: InstanceNumber 1
        _publish_folder(tmp, out)
    except OSError as exc:
        raise OutputError(f"could not write the DICOM series {out}: {_write_failure_reason(out, pixels.nbytes, exc)}"
                          ) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %d DICOM slices to %s (%s)", nz, out, base.SeriesDescription)
    return out


def _system_error(exc: OSError) -> OSError:
    """The system's own error behind ``exc``: pydicom re-raises an OSError met while writing an element as a new
    OSError without its errno, whose text holds the flattened traceback (``With tag (7FE0,0010) got exception: ...;
    Traceback ...``); the original is its cause."""
    seen: OSError | BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def _write_failure_reason(out: Path, voxel_bytes: int, exc: OSError) -> str:
    """Why writing the series ``out`` failed, in the words volume files get (a full disk:
    :func:`~DiffusionCore.files.no_room_reason`), else the system's reason, never pydicom's traceback."""
    system = _system_error(exc)
    too_long = too_long_error(out, system)
    if too_long is not None:
        return str(too_long).removeprefix(f"cannot write {out}: ")
    parent = out.parent if str(out.parent) else Path(".")
    return no_room_reason(parent, voxel_bytes, system) or system.strerror or str(system).splitlines()[0]


def _file_label(ds: Any) -> str:
    """What a foreign DICOM file is, as a PACS user knows it: patient, modality, series number and description."""
    parts = [f"patient {ds.get('PatientID')}" if str(ds.get("PatientID", "")).strip() else "",
             str(ds.get("Modality", "")).strip(),
             f"series {ds.get('SeriesNumber')}" if str(ds.get("SeriesNumber", "")).strip() else "",
             f'"{ds.get("SeriesDescription")}"' if str(ds.get("SeriesDescription", "")).strip() else ""]  # fmt: skip
    return " ".join(part for part in parts if part) or "no patient or series named"


def folder_holdings(folder: Path) -> tuple[bool, str]:
    """(whether ``folder`` holds only a series written by :func:`write_dicom_series`, what it holds in words).

    Ours: every entry is a file named ``NNNNN.dcm`` whose header (read without pixels) has Manufacturer
    ``CTDiffusion`` and ImageComments beginning with ``SYNTHETIC``, as :func:`_base_dataset` marks every slice. Else the
    words say what is there: e.g. ``24 DICOM files of patient P-7 CT series 3 "Thorax" (not written by CTDiffusion)``,
    or ``2 files that are no DICOM (notes.txt, ...)``."""
    pydicom = _pydicom()
    ours, foreign, other = [], [], []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not entry.is_file():
            other.append(name + "/")
            continue
        try:
            ds = pydicom.dcmread(entry, stop_before_pixels=True, specific_tags=[
                "Manufacturer", "ImageComments", "PatientID", "Modality", "SeriesNumber", "SeriesDescription"])
            marked = (str(ds.get("Manufacturer", "")) == SOFTWARE
                      and str(ds.get("ImageComments", "")).startswith("SYNTHETIC"))  # fmt: skip
        except Exception:  # noqa: BLE001 - no DICOM file, or unreadable: not ours
            other.append(name)
            continue
        if marked and name.endswith(".dcm") and name[:-4].isdigit():
            ours.append(ds)
        else:
            foreign.append(ds)
    if not foreign and not other:
        title = str(ours[0].get("SeriesDescription", "")).strip() if ours else ""
        return bool(ours), f"a DICOM series written by {SOFTWARE} ({len(ours)} files{', ' + title if title else ''})"
    said = []
    if foreign:
        labels = sorted({_file_label(ds) for ds in foreign})
        shown = "; ".join(labels[:3]) + (f"; and {len(labels) - 3} more" if len(labels) > 3 else "")
        said.append(f"{len(foreign)} DICOM file{'s' if len(foreign) != 1 else ''} of {shown} (not written by "
                    f"{SOFTWARE})")  # fmt: skip
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        said.append(f"{len(other)} other file{'s' if len(other) != 1 else ''} ({shown})")
    if ours:
        said.append(f"{len(ours)} slice{'s' if len(ours) != 1 else ''} written by {SOFTWARE}")
    return False, " and ".join(said)


def check_dicom_output(folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check a series folder before any work: its parent exists and a folder can be created in it, and the folder is
    new, empty, or (with ``overwrite``) a series written here before (:func:`folder_holdings`: every file's header
    says so). Never deletes anything else, whatever ``overwrite`` says."""
    out = Path(folder)
    uid_root()  # a bad $DIFFUSIONCORE_UID_ROOT is said before any work, not after the model ran
    check_name_length(out)  # the folder's name and its temporary folder's: ENAMETOOLONG said as such
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"the output folder {parent} does not exist; create it first.")
    if not folder_writable(parent):  # a probe file: the permission bits alone do not say it for root or NFS
        raise OutputError(f"the output folder {parent} is not writable; choose another output path.")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out} is a file; a DICOM series is written into a folder: give a folder name")
        if any(out.iterdir()):
            ours, holds = folder_holdings(out)
            if not ours:
                raise OutputError(
                    f"{out} already holds other files: {holds}. A DICOM series is written into a new or empty "
                    f"folder, and only a series {SOFTWARE} wrote is ever replaced (--overwrite too): give another "
                    "folder"
                )
            if not overwrite:  # ours: the Slicer export's refusal ends in these words too
                raise OutputExistsError(out, "already holds a DICOM series")
    return out


def _publish_folder(tmp: Path, out: Path) -> None:
    """Move the finished series into place, readable as any folder the user creates (umask); a replaced series
    is moved aside (into ``.NAME.PID.XXXXXXXX.partial.old``, stale once its process is gone) and removed only
    after the rename."""
    old = None
    if out.exists():
        old = partial_folder(out, ".old")
        os.replace(out, old / "series")
    publish(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
