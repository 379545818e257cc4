"""Writing a generated volume with its provenance, in the format its output path asks for.

``sr`` and ``xray2ct`` (and the Slicer CLIs) write every result through :func:`write_result`:

- a DICOM series (:mod:`DiffusionCore.dicom_out`) when the output is a folder and DICOM is asked for, or is
  the natural choice (a DICOM input and an output path without a volume-file suffix: :func:`wants_dicom`);
- NRRD or MetaImage with the provenance in header fields;
- NIfTI with "SYNTHETIC ..." in ``descrip`` and the whole provenance in a JSON sidecar (``x.nii.gz`` ->
  ``x.json``), written atomically next to it.

:func:`stamp_provenance` adds the same fields to a file another program wrote (Slicer's own Save of a result
node, whose writer keeps no custom header fields).
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Any

from .dicom_out import DicomSource, check_dicom_output, write_dicom_series
from .errors import InputError, OutputError, OutputExistsError
from .files import partial_file, publish, write_json_atomic
from .provenance import (
    HEADER_PREFIX,
    Provenance,
    header_fields,
    input_name,
    nifti_descrip,
    provenance_header,
    result_caveats,
    sidecar_path,
    sidecar_record,
    sr_label,
)
from .volume import (
    API_OVERWRITE_ADVICE,
    WRITABLE_SUFFIXES,
    Volume,
    axis_index,
    check_output_path,
    write_volume,
)

logger = logging.getLogger(__name__)

#: ``--output-format`` choices: ``auto`` (DICOM for a DICOM input written to a folder, else the suffix),
#: ``dicom`` (a series folder) or ``file`` (the suffix decides: NIfTI, NRRD, MHA).
OUTPUT_FORMATS = ("auto", "dicom", "file")


def has_volume_suffix(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in WRITABLE_SUFFIXES)


def is_dicom_input(path: str | os.PathLike) -> bool:
    """A DICOM file, or a folder holding DICOM files (by content, not name; the first files found decide)."""
    from .inputs import is_dicom_file

    p = Path(path)
    if p.is_file():
        return is_dicom_file(p)
    if p.is_dir():
        for n, f in enumerate(x for x in p.rglob("*") if x.is_file()):
            if is_dicom_file(f):
                return True
            if n >= 50:
                break
    return False


def wants_dicom(output_format: str, source: str | os.PathLike, output: str | os.PathLike) -> bool:
    """Whether a result goes out as a DICOM series.

    ``dicom``: always; ``file``: never; ``auto``: when the input is DICOM and the output path has no volume
    suffix (a folder, new or existing).
    """
    if output_format == "dicom":
        return True
    if output_format == "file":
        return False
    return is_dicom_input(source) and not has_volume_suffix(output)


def planned_files(output: str | os.PathLike, as_dicom: bool) -> list[Path]:
    """Every path a result writes: the series folder, or the file and (NIfTI) its JSON sidecar."""
    p = Path(output)
    if as_dicom:
        return [p]
    name = p.name.lower()
    return [p, sidecar_path(p)] if name.endswith((".nii", ".nii.gz")) else [p]


def planned_outputs(output: str | os.PathLike, as_dicom: bool, what: str = "the output") -> list[tuple[str, Path]]:
    """:func:`planned_files` labelled for :func:`~DiffusionCore.files.refuse_overwriting_inputs`: ``what`` for the
    result, and the sidecar named as such (``--report ct.json`` beside ``ct.nii.gz`` clashes with the sidecar, a file
    the user never named)."""
    files = planned_files(output, as_dicom)
    return [(what, files[0]), *((f"{what}'s provenance sidecar", f) for f in files[1:])]


def check_result_output(output: str | os.PathLike, as_dicom: bool, *, overwrite: bool = False) -> None:
    """Check before any work that the result (and its sidecar) can be written."""
    if as_dicom:
        check_dicom_output(output, overwrite=overwrite)
        return
    for path in planned_files(output, False):
        if path.suffix.lower() == ".json":
            if path.exists() and not overwrite:
                from .errors import OutputExistsError

                raise OutputExistsError(path, f"(the provenance sidecar of {Path(output).name}) already exists")
        else:
            check_output_path(path, overwrite=overwrite)


#: Header bytes of one written DICOM slice (patient, study, series, geometry and provenance attributes), an upper bound.
DICOM_SLICE_HEADER_BYTES = 16 * 1024


def check_room_for_result(
    output: str | os.PathLike,
    shape: tuple[int, ...],
    *,
    dtype: str,
    as_dicom: bool,
    extra_bytes: int = 0,
    compressed: bool | None = None,
) -> None:
    """Refuse, before any work, a result of ``shape`` voxels that cannot fit where it goes: a DICOM series or a
    ``.nii`` file larger than the disk's free space or this session's file-size limit (``ulimit -f``). A compressed
    file (``.nii.gz``, ``.nrrd``, ``.mha``) is often several times smaller than its voxels, so for it the shortfall is
    a warning, not a refusal. ``extra_bytes``: what else the run writes there (an uncertainty map's voxels).
    ``compressed``: whether the file is written compressed; by default told from its suffix (the Slicer batch CLI
    writes its ``.nrrd`` uncompressed: ``False``).

    Raises:
        OutputError: the result cannot fit, naming the free space, what it needs and what to do.
    """
    import math

    from .files import no_room_reason

    voxels = math.prod(int(n) for n in shape)
    out = Path(output)
    if as_dicom:
        needed = voxels * 2 + int(shape[0]) * DICOM_SLICE_HEADER_BYTES  # int16 slices, one file each
        compressed = False
    else:
        needed = voxels * (2 if dtype == "int16" else 4)
        if compressed is None:
            compressed = "".join(out.suffixes[-2:]).lower() == ".nii.gz" or out.suffix.lower() in (".nrrd", ".mha")
    folder = out.parent if str(out.parent) else Path(".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # a folder made for the output: the disk of the nearest one that exists
    per_file = needed if not as_dicom else int(shape[1]) * int(shape[2]) * 2 + DICOM_SLICE_HEADER_BYTES
    reason = no_room_reason(folder, needed + extra_bytes) or (no_room_reason(folder, per_file) if as_dicom else "")
    if not reason:
        return
    if compressed:
        logger.warning("%s may not fit: %s (that is its uncompressed size; compressed it is often several times "
                       "smaller)", out.name, reason)  # fmt: skip
        return
    raise OutputError(f"no room for {out}: {reason}. Nothing was computed")


def check_replaced_result(output: str | os.PathLike, what: str = "the output") -> None:
    """A result volume that a Slicer CLI module writes, checked before any work: replaced when it exists (Slicer hands
    over fresh temporary paths and re-runs into the same node), and so is a NIfTI output's provenance sidecar when it
    comes with that volume; a sidecar that exists without it (beside ``out.nii`` when ``out.nii.gz`` is asked for)
    belongs to another result and is refused.

    Raises:
        OutputError: exit code 4; the folder is missing or not writable, the format unknown, or the sidecar exists.
    """
    from .errors import OutputExistsError

    try:
        check_result_output(output, False, overwrite=Path(output).exists())
    except OutputExistsError as exc:
        raise exc.advising(f"this run would replace it: move it away, or give {what} another name") from None


def write_result(
    vol: Volume,
    output: str | os.PathLike,
    provenance: Provenance,
    *,
    as_dicom: bool = False,
    dicom_source: DicomSource | None = None,
    keep_frame_of_reference: bool = True,
    overwrite: bool = False,
    dtype: str = "auto",
    compress: bool = True,
    series_number: int | None = None,
) -> list[Path]:
    """Write ``vol`` with its provenance; returns the paths written (see module docstring). ``compress`` False
    writes a volume file without gzip (3D Slicer's hand-off files, read once and deleted). ``series_number``: the
    SeriesNumber of a DICOM series (default: derived from the input's,
    :func:`~DiffusionCore.dicom_out.derived_series_number`); a volume file has none."""
    if as_dicom:
        return [write_dicom_series(vol, output, provenance, source=dicom_source,
                                   keep_frame_of_reference=keep_frame_of_reference, overwrite=overwrite,
                                   series_number=series_number)]  # fmt: skip
    p = Path(output)
    header = provenance_header(provenance)
    written = [write_volume(vol, p, overwrite=overwrite, dtype=dtype, compress=compress, header=header)]
    if p.name.lower().endswith((".nii", ".nii.gz")):
        written.append(
            write_json_atomic(sidecar_record(provenance, p), sidecar_path(p), overwrite=True)
        )
    return written


def sr_provenance(job_source: str | os.PathLike, volume_metadata: dict[str, Any], report: dict[str, Any]) -> Provenance:
    """The provenance of one super-resolution result, from its report (``volume_metadata``: the input's)."""
    settings = report["settings"]
    spacing_xyz = settings.get("output_spacing_xyz_mm") or []
    axis = settings.get("axis")  # the thick axis: its output spacing is the new slice spacing
    thin = spacing_xyz[2 - axis_index(axis)] if axis is not None and len(spacing_xyz) == 3 else None
    title = f"{sr_label(settings.get('factor'), thin)} (synthetic)"
    thickness = input_slice_thickness(volume_metadata)
    return Provenance(
        task="sr", title=title, weights=str(settings.get("weights", "")),
        weights_sha256=str(report.get("weights_sha256", "")), settings=settings, input=str(job_source),
        input_uid=str(volume_metadata.get("series_uid", "")), input_sha256=str(report.get("input_sha256", "")),
        input_slice_thickness_mm=thickness, input_slice_note=_input_slice_note(thickness, settings, volume_metadata),
    )  # fmt: skip


def input_slice_thickness(volume_metadata: dict[str, Any]) -> float | None:
    """The input series' SliceThickness (mm) as read (``metadata["slice_thickness_mm"]``: a DICOM series, or the
    Slicer module's node), or None when it is not known or not a positive number."""
    try:
        value = float(volume_metadata.get("slice_thickness_mm") or 0.0)
    except (TypeError, ValueError):
        return None
    return value if value > 0 and value != float("inf") else None


def _input_slice_note(thickness: float | None, settings: dict[str, Any], volume_metadata: dict[str, Any]) -> str:
    """The run's own note on a slice thickness unlike the spacing (:func:`~DiffusionCore.degrade.thickness_note`,
    one place for its words), from the report's settings: the thick axis and the input's spacing along it. Only the
    slice axis (array axis 0, z) of a series has a recorded thickness. An interspaced series that ran as asked
    (``allow_interspaced``) adds what that means (:data:`~DiffusionCore.degrade.INTERSPACED_RUN_NOTE`), and files
    that gave different thicknesses (``volume_metadata["slice_thickness_values_mm"]``) are named."""
    spacing, axis = settings.get("input_spacing_xyz_mm") or [], settings.get("axis")
    if not thickness or axis != "z" or len(spacing) != 3:
        return ""
    from .degrade import INTERSPACED_RUN_NOTE, is_interspaced, thickness_note

    notes = [thickness_note(float(thickness), float(spacing[2]))]
    if is_interspaced(float(thickness), float(spacing[2])):
        notes.append(INTERSPACED_RUN_NOTE)
    values = volume_metadata.get("slice_thickness_values_mm")
    if isinstance(values, dict) and len(values) > 1:
        given = ", ".join(f"{v} mm in {n} file{'s' if n != 1 else ''}" for v, n in values.items())
        notes.append(f"the series' files gave different slice thicknesses ({given}), taken as {float(thickness):g} mm")
    return "; ".join(n for n in notes if n)


def xray_provenance(source: str | os.PathLike, report: dict, weights: str, input_uid: str = "") -> Provenance:
    """The provenance of an X-ray to CT result, from its report."""
    return Provenance(task="xray2ct", title="CT from radiograph (synthetic)", weights=weights,
                      weights_sha256=str(report.get("weights_sha256", "")), settings=report.get("settings", {}),
                      input=str(source), input_uid=input_uid,
                      input_sha256=str(report.get("input_sha256", "")),
                      notes=result_caveats(report.get("notes")))  # fmt: skip


def _is_xray_report(report: dict[str, Any]) -> bool:
    return report.get("family") == "xray" or "stages" in report


def result_provenance(
    volume: Volume, report: dict[str, Any], *, input: str | os.PathLike | Volume | None = None, weights: str = ""
) -> Provenance:
    """The full provenance of a result of ``SuperResolver.run`` or ``XrayToCTGenerator.run`` (the Volume and the
    report it returned); ``input``: the input's path, or the input Volume (its source and DICOM series UID are
    recorded; a Radiograph's source); ``weights``: the weights' name where the report does not say it (X-ray to CT).

    Raises:
        InputError: ``report`` is not the report of a run, or not the report of ``volume``.
    """
    if not isinstance(report, dict) or not isinstance(report.get("settings"), dict):
        raise InputError(f"the report must be the dict that run returned with the volume; got {type(report).__name__}"
                         ": pass both values of `volume, report = model.run(...)`")  # fmt: skip
    ran, marked = str(report.get("weights_sha256", "")), str(volume.metadata.get("weights_sha256", ""))
    if ran and marked and ran != marked:
        raise InputError(f"the report is of a run with weights sha256 {ran[:12]}..., the volume of weights "
                         f"{marked[:12]}...: pass the report that run returned with this volume")  # fmt: skip
    meta = getattr(input, "metadata", None)  # an input Volume (or Radiograph): its source and DICOM UIDs
    source = str(meta.get("source", "")) if isinstance(meta, dict) else str(input or "")
    meta = meta if isinstance(meta, dict) else {}
    if source and source != "array" and Path(source).exists():
        source = os.path.abspath(source)  # the caller's record; the files written name only the input's file
    if _is_xray_report(report):
        name = weights or str(report.get("weights") or report["settings"].get("weights") or "")
        if not name and ran:
            from .weights.registry import registered_name

            name = registered_name(ran) or ""  # the registered weights of that sha256 (a file of one's own: none)
        return xray_provenance(source, report, name)
    return sr_provenance(source, meta, report)


def save_result(
    volume: Volume,
    path: str | os.PathLike,
    report: dict[str, Any],
    *,
    input: str | os.PathLike | Volume | None = None,
    weights: str = "",
    overwrite: bool = False,
    dtype: str = "auto",
) -> list[Path]:
    """Write a model's result with its full provenance, as the ``sr`` and ``xray2ct`` commands do: marked synthetic,
    with the run's settings, the weights and their sha256, the input (its file or folder name and sha256, not the
    folders it lies in: :func:`~DiffusionCore.provenance.input_name`) and the date (NRRD / MetaImage header fields;
    NIfTI "SYNTHETIC ..." in ``descrip`` and a JSON sidecar ``x.json``; read back with
    :func:`~DiffusionCore.provenance.read_provenance`).

    Args:
        volume, report: what ``SuperResolver.run`` or ``XrayToCTGenerator.run`` returned.
        path: ``.nrrd``, ``.mha``, ``.nii.gz`` or ``.nii``.
        input: the input's path, Volume or Radiograph, recorded by its name as the result's source (optional).
        weights: the weights' name when the report does not say it (X-ray to CT; optional).
        overwrite, dtype: as for :func:`~DiffusionCore.volume.write_volume`.

    Returns:
        The paths written (the file, and a NIfTI file's sidecar).

    Raises:
        InputError: ``report`` is not the report of ``volume``'s run.
        OutputError: the path cannot be written (exists without ``overwrite=True``, unknown format, ...).
    """
    provenance = result_provenance(volume, report, input=input, weights=weights)
    try:
        check_result_output(path, False, overwrite=overwrite)  # a NIfTI file's sidecar too
    except OutputExistsError as exc:
        raise exc.advising(API_OVERWRITE_ADVICE) from None
    return write_result(volume, path, provenance, overwrite=overwrite, dtype=dtype)


def input_digest(source: str | os.PathLike, task: str) -> str:
    """The content sha256 of an input as ``sr`` (``task`` ``"sr"``) or ``xray2ct`` reads it: the ``input_sha256`` its
    results record (``Volume.content_sha256``, ``Radiograph.content_sha256``); ``""`` when it cannot be read so (a
    DICOM folder of several series, a file gone)."""
    try:
        if task == "xray2ct":
            from .xray.radiograph import read_radiograph

            return read_radiograph(source).content_sha256()
        from .volume import read_volume

        return read_volume(source, check=False).content_sha256()
    except Exception as exc:  # noqa: BLE001 - an input that cannot be read is matched by no result
        logger.debug("no content digest of %s: %s", source, exc)
        return ""


def recorded_source(
    recorded: Provenance, sources: list[Path], digests: dict[int, str] | None = None
) -> int | None:
    """The index in ``sources`` of the input a result was made from, as its files record it (its name,
    :func:`~DiffusionCore.provenance.input_name`, and its ``input_sha256``; no folder), or None: the only input of
    that name or, where several share it (``sub/chest.png`` beside a new ``chest.png``), the only one of them whose
    content has the recorded sha256. Only those are read; ``digests`` (index -> sha256) keeps them across calls."""
    name = input_name(recorded.input)
    named = [i for i, s in enumerate(sources) if name and Path(s).name == name]
    if len(named) <= 1 or not recorded.input_sha256:
        return named[0] if len(named) == 1 else None
    digests = {} if digests is None else digests
    for i in named:
        if i not in digests:
            digests[i] = input_digest(sources[i], recorded.task)
    same = [i for i in named if digests[i] == recorded.input_sha256]
    return same[0] if len(same) == 1 else None


def dicom_source_for(path: str | os.PathLike, series_uid: str | None = None) -> DicomSource | None:
    """The DICOM headers of an input, or ``None`` when it is not DICOM."""
    return DicomSource.from_path(path, series_uid) if is_dicom_input(path) else None


def named_patient_source(patient_id: str, patient_name: str = "", date: str = "") -> DicomSource:
    """What a DICOM series made from an input that holds no patient (a NIfTI CT, a PNG radiograph) takes from the
    command line's ``--patient-id`` and ``--patient-name`` (a PN value, ``Family^Given``), in place of a DICOM input's
    headers: PatientID, PatientName and, for the new study the series forms, StudyDate and StudyTime, those of the
    series itself (``date``: the provenance's ISO 8601 date, in this computer's local time, as the writer gives the
    series' own: :func:`~DiffusionCore.dicom_out.local_date_time`), with the TimezoneOffsetFromUTC that says which
    (the writer writes the input's, and the one offset holds for every date and time of the series). No
    StudyInstanceUID, frame of reference or source instances: the writer gives the series a study and a frame of
    reference of their own, as for no source at all."""
    from pydicom.dataset import Dataset

    from .dicom_out import local_date_time

    header = Dataset()
    header.PatientID = patient_id
    header.PatientName = patient_name
    header.StudyDate, header.StudyTime, header.TimezoneOffsetFromUTC = local_date_time(date)
    return DicomSource(header=header)


def _nrrd_header_end(data: bytes) -> int:
    """Index just past the blank line that ends an attached NRRD header (the length of a detached one)."""
    end = data.find(b"\n\n")
    return len(data) if end < 0 else end + 2


def _stamped_nrrd(data: bytes, fields: dict[str, str]) -> bytes:
    end = _nrrd_header_end(data)
    lines = [
        ln for ln in data[:end].decode("latin-1").splitlines() if ln and not ln.startswith(HEADER_PREFIX)
    ]
    lines += [f"{k}:={v}" for k, v in fields.items()]
    return ("\n".join(lines) + "\n\n").encode("latin-1") + data[end:]


def _stamped_metaimage(data: bytes, fields: dict[str, str]) -> bytes:
    marker = data.find(b"\nElementDataFile") + 1  # the last header line; the voxels of a .mha follow it
    if marker <= 0:
        raise OutputError("not a MetaImage header (no ElementDataFile line)")
    kept = [
        ln for ln in data[:marker].decode("latin-1").splitlines() if ln and not ln.startswith(HEADER_PREFIX)
    ]
    kept += [f"{k} = {v}" for k, v in fields.items()]
    return ("\n".join(kept) + "\n").encode("latin-1") + data[marker:]


def stamp_provenance(path: str | os.PathLike, provenance: Provenance) -> bool:
    """Add the provenance to a volume file written by another program, in place and atomically.

    NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) get the header fields (earlier ones are
    replaced; the voxel bytes are copied unchanged); NIfTI gets "SYNTHETIC ..." in ``descrip`` and the JSON
    sidecar. Returns False for a format that has no place for them (nothing is changed).

    Raises:
        OutputError: the file is missing, unreadable, not of the format its suffix says, or not writable.
    """
    p = Path(path)
    name = p.name.lower()
    if not p.is_file():
        raise OutputError(f"cannot add the provenance to {p}: no such file")
    fields = header_fields(provenance)
    try:
        if name.endswith((".nii", ".nii.gz")):
            gz = name.endswith(".gz")
            raw = p.read_bytes()
            data = bytearray(gzip.decompress(raw) if gz else raw)
            if len(data) < 348 or int.from_bytes(data[:4], "little") not in (348, 0x5C010000):
                raise OutputError("not a NIfTI-1 file")
            data[148:228] = nifti_descrip(provenance).encode("ascii").ljust(80, b"\0")  # the descrip field
            tmp = partial_file(p)
            Path(tmp).write_bytes(gzip.compress(bytes(data), compresslevel=6) if gz else bytes(data))
            publish(tmp, p)
            write_json_atomic(sidecar_record(provenance, p), sidecar_path(p), overwrite=True)
            return True
        if name.endswith((".nrrd", ".nhdr")):
            stamped = _stamped_nrrd(p.read_bytes(), fields)
        elif name.endswith((".mha", ".mhd")):
            stamped = _stamped_metaimage(p.read_bytes(), fields)
        else:
            return False
        tmp = partial_file(p)
        Path(tmp).write_bytes(stamped)
        publish(tmp, p)
        return True
    except OutputError as exc:
        raise OutputError(f"cannot add the provenance to {p}: {exc}") from None
    except (OSError, ValueError, EOFError, gzip.BadGzipFile) as exc:
        raise OutputError(f"cannot add the provenance to {p}: {exc}") from None
