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
import os
from pathlib import Path

from .dicom_out import DicomSource, check_dicom_output, write_dicom_series
from .errors import OutputError
from .files import partial_file, publish, write_json_atomic
from .provenance import HEADER_PREFIX, Provenance, header_fields, nifti_descrip, sidecar_path, sidecar_record
from .volume import WRITABLE_SUFFIXES, Volume, check_output_path, write_volume

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
) -> list[Path]:
    """Write ``vol`` with its provenance; returns the paths written (see module docstring). ``compress`` False
    writes a volume file without gzip (3D Slicer's hand-off files, read once and deleted)."""
    if as_dicom:
        return [write_dicom_series(vol, output, provenance, source=dicom_source,
                                   keep_frame_of_reference=keep_frame_of_reference, overwrite=overwrite)]  # fmt: skip
    p = Path(output)
    header = {**header_fields(provenance), "ITK_FileNotes": nifti_descrip(provenance)}
    written = [write_volume(vol, p, overwrite=overwrite, dtype=dtype, compress=compress, header=header)]
    if p.name.lower().endswith((".nii", ".nii.gz")):
        written.append(
            write_json_atomic(sidecar_record(provenance, p), sidecar_path(p), overwrite=True)
        )
    return written


def dicom_source_for(path: str | os.PathLike, series_uid: str | None = None) -> DicomSource | None:
    """The DICOM headers of an input, or ``None`` when it is not DICOM."""
    return DicomSource.from_path(path, series_uid) if is_dicom_input(path) else None


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
