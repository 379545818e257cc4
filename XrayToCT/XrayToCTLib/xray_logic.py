"""Radiograph-to-CT on MRML nodes: the input radiograph, the background job and the per-stage preview.

A radiograph loaded in Slicer (DICOM CR/DX, PNG, JPEG) is a single-slice scalar volume node (or a vector
node for colour-encoded greyscale files). It is written to a private temporary file (a colour-encoded one as its
channels: the command makes it grey, in its own process, not in Slicer's GUI thread), the XrayToCTGenerate
CLI runs in a background process, and each finished stage updates ONE result node in place: "<input> CT
stage 1 (synthetic)" appears after the first stage, then becomes stage 2, and the last stage's volume is "<input> CT
(synthetic)". A finished stage is a result of its own, of lower resolution: a cancel or a failure during a later stage
keeps the node as that stage made it (its name and provenance say which stage), and a notice says so. A stage
preview that cannot be read (a damaged file, memory running out) is said in a notice; the job goes on.

Geometry: the radiograph is handed over as Slicer displays it, with its linear parent transforms, and a reference CT
is scored where Slicer shows it (``world=True`` of :mod:`CTDiffusionSRLib.mrml_io`); a non-linear transform is
refused, naming the volume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from CTDiffusionSRLib.jobs import CLIJob, check_temp_room, exception_text
from CTDiffusionSRLib.mrml_io import (
    add_volume_node,
    dicom_source_files,
    free_name,
    geometry_from_ijk_to_ras,
    ijk_to_ras,
    in_scene,
    input_stamp,
    irregular_dicom_series,
    place_beside,
    read_job_report,
    read_volume_file,
    recorded_environment,
    recorded_input,
    remember_place,
    set_node_from_volume,
    set_provenance,
    synthetic_name,
    transform_problem,
    write_job_input,
)
from CTDiffusionSRLib.process import JobState
from CTDiffusionSRLib.sr_logic import check_weights

from DiffusionCore.dicom_out import SYNTHETIC_CT_WINDOWS
from DiffusionCore.errors import InputError, OutputError
from DiffusionCore.xray.radiograph import (
    COLOUR_CHANNELS,
    RADIOGRAPH_MODALITIES,
    check_projection_modality,
    header_view,
    image_directions,
    orient_as_displayed,
    radiograph_pixels,
    read_dicom_header,
    window_bounds,
)

try:
    from slicer.i18n import tr as _
except ImportError:  # outside the Slicer application (tests, plain Python): the English text

    def _(text: str) -> str:
        return text


logger = logging.getLogger(__name__)

STAGE_LINE_PREFIX = "stage-ready "
#: The grids (voxels per side) of the stages when the weights do not say before the job runs (the shipped cascade's;
#: the tiny test model's are TINY_STAGE_SIDES): what the temp-room check counts the stage previews and the result at.
DEFAULT_STAGE_SIDES = (64, 128, 256)
TINY_STAGE_SIDES = (16, 32)
#: Display window/level for generated CT (HU): the first window its DICOM series carries, a soft-tissue/lung compromise.
CT_WINDOW_LEVEL = (SYNTHETIC_CT_WINDOWS[0][1], SYNTHETIC_CT_WINDOWS[0][0])


@dataclass
class XraySettings:
    """What the user chose for one generation (0 / "" mean "the model's default").

    Attributes:
        num_stages: stages of the cascade to run (1 = 64^3 preview ... 3 = 256^3; 0 = every stage the weights have).
        view: "auto" (what the radiograph's DICOM header says, else "pa"), "pa" or "lateral".
        field_of_view: cube width in mm; 0 = automatic.
        invert: invert the radiograph first, for an image whose bones appear dark (a negative exported as
            PNG/JPEG). Never needed for DICOM MONOCHROME1: see :func:`photometric_note`.
        weights: registered name or .safetensors path; "" = bundled default.
        allow_unregistered_weights: accept a file whose sha256 is not registered.
        steps: sampling steps per stage; 0 = model default.
        num_samples: samples averaged per stage; 0 = model default.
        seed: sampler seed.
        threads: CPU threads of the computation; 0 = automatic (``OMP_NUM_THREADS`` or all cores). The result depends
            on it (the same seed, device and thread count give the same result).
        device: "auto", "cpu" or "cuda".
        tiny_test_model: a random tiny model (self-tests only).
        consistency: make each stage re-project onto the radiograph (off: the network's output alone).
    """

    num_stages: int = 0
    view: str = "auto"
    field_of_view: float = 0.0
    invert: bool = False
    weights: str = ""
    allow_unregistered_weights: bool = False
    steps: int = 0
    num_samples: int = 0
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    tiny_test_model: bool = False
    consistency: bool = True

    def cli_arguments(self) -> list[str]:
        """Flags of XrayToCTGenerate for these settings (booleans as bare flags)."""
        args = [
            "--numStages", str(int(self.num_stages)),
            "--view", self.view,
            "--fieldOfView", repr(float(self.field_of_view)),
            "--numSteps", str(int(self.steps)),
            "--numSamples", str(int(self.num_samples)),
            "--seed", str(int(self.seed)),
            "--device", self.device,
        ]
        if self.threads:
            args += ["--threads", str(int(self.threads))]
        if self.weights:
            args += ["--weights", self.weights]
        for flag, on in (
            ("--invertIntensities", self.invert),
            ("--allowUnregisteredWeights", self.allow_unregistered_weights),
            ("--tinyTestModel", self.tiny_test_model),
            ("--noConsistency", not self.consistency),
        ):
            if on:
                args.append(flag)
        return args


def _stored_pixels(node, tags: dict[str, str] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """The node's pixels as they are stored, a view of its image data (never copied, never to be written to):
    ``(H, W)`` or ``(H, W, C)`` for colour-encoded greyscale, in file order and the node's own type; and which IJK
    axes are its columns and its rows. A volume one voxel thick along any axis is a 2D image (e.g. a W x 1 x H coronal
    projection computed in Slicer).

    Raises:
        InputError: no pixels, a 3D volume, or a multi-frame radiograph (named so from ``tags``, its DICOM header).
    """
    from vtk.util import numpy_support

    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"'{node.GetName()}' holds no pixels; load a radiograph first.")
    nx, ny, nz = image.GetDimensions()
    if 1 not in (nx, ny, nz):
        modality = (tags or {}).get("modality", "").strip().upper()
        if modality in RADIOGRAPH_MODALITIES:
            raise InputError(
                f"'{node.GetName()}' is a multi-frame radiograph ({nz} frames of {nx}x{ny}, DICOM Modality {modality}); "
                "X-ray to CT takes one frontal chest radiograph: save the frame you want as a single-frame image and "
                "load that."
            )
        raise InputError(
            f"'{node.GetName()}' is a 3D volume ({nx}x{ny}x{nz}); a single 2D radiograph is needed "
            "(for a CT volume use the CT Diffusion SR module)."
        )
    flat = 2 if nz == 1 else (nx, ny).index(1)  # the IJK axis one voxel thick
    columns, rows = (axis for axis in range(3) if axis != flat)
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    ncomp = image.GetPointData().GetScalars().GetNumberOfComponents()
    planes = scalars.reshape(nz, ny, nx, ncomp)
    plane = planes[(slice(None),) * (2 - flat) + (0,)]  # (rows, columns, ncomp): a view, whichever axis is flat
    return (plane if ncomp > 1 else plane[..., 0]), (columns, rows)


def _pixels(node, tags: dict[str, str] | None = None, *, keep_integers: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """The node's pixels as ``(H, W)`` float32 in file order (:func:`_stored_pixels`; ``keep_integers``: an integer
    image in its own type), and which IJK axes are its columns and its rows; colour-encoded greyscale is accepted.
    Refused as ``xray2ct`` refuses them (:func:`~DiffusionCore.xray.radiograph.radiograph_pixels`): real colour, a
    thumbnail, NaN or infinite values, a 3D volume, and a multi-frame radiograph. A float32 image is the node's own
    pixels, not a copy: never to be written to."""
    stored, axes = _stored_pixels(node, tags)
    return radiograph_pixels(stored, f"'{node.GetName()}'", keep_integers=keep_integers), axes


def _orient_channels_as_displayed(
    channels: np.ndarray, spacing: tuple[float, float], direction: np.ndarray
) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """:func:`~DiffusionCore.xray.radiograph.orient_as_displayed` for an ``(H, W, C)`` colour-encoded image: each
    pixel's C values are turned as one (a record of C values per pixel), so the image is copied once when it is
    turned, and not at all when it is not."""
    h, w, c = channels.shape
    # already contiguous, unless the node is one voxel thick along x or y
    channels = np.ascontiguousarray(channels)
    records = channels.view(np.dtype((np.void, c * channels.itemsize))).reshape(h, w)
    records, spacing, turned = orient_as_displayed(records, spacing, direction)
    return records.view(channels.dtype).reshape(*records.shape, c), spacing, turned


def _placed(
    node, pixels: np.ndarray, axes: tuple[int, int], as_displayed: bool
) -> tuple[np.ndarray, tuple[float, float]]:
    """``(pixels, pixel spacing (row, col) mm)`` of ``node``'s ``pixels`` (``(H, W)``, or ``(H, W, C)`` colour
    channels; ``axes``: the IJK axes of their columns and rows, :func:`_stored_pixels`), turned to how Slicer shows the
    node when ``as_displayed`` (see :func:`radiograph_from_node`).

    Raises:
        InputError: a non-linear transform (:func:`~CTDiffusionSRLib.mrml_io.transform_problem`).
    """
    columns, rows = axes
    spacing, _origin, direction = geometry_from_ijk_to_ras(ijk_to_ras(node, world=True, what="The radiograph"))
    row_col = (float(spacing[rows]), float(spacing[columns]))
    if not as_displayed:
        return pixels, row_col
    turn = orient_as_displayed if pixels.ndim == 2 else _orient_channels_as_displayed
    pixels, turned_spacing, turned = turn(pixels, row_col, np.asarray(direction)[:, [columns, rows]])
    if turned:
        logger.info("'%s' is %s, as Slicer displays it", node.GetName(), turned)
    return pixels, turned_spacing or row_col


def radiograph_from_node(
    node, *, as_displayed: bool = False, tags: dict[str, str] | None = None, keep_integers: bool = False
) -> tuple[np.ndarray, tuple[float, float]]:
    """``(pixels (H, W) float32, pixel spacing (row, col) mm)`` of a radiograph node; the node is untouched (the
    pixels may be a view of its own: never write to them).

    Args:
        as_displayed: turn the pixels to how Slicer shows the node in the view of its plane
            (:func:`~DiffusionCore.xray.radiograph.orient_as_displayed`: e.g. an image stored mirrored with a
            direction of -1 along x, which Slicer shows the right way round); else the stored row and column order
            (which a DICOM header's PatientOrientation describes).
        tags: the node's DICOM header tags, when the caller has read them (:func:`dicom_header_tags`).
        keep_integers: an integer radiograph's pixels in their own type (what the job hands over), not float32.

    The geometry is the node's as Slicer displays it: with its linear parent transforms (e.g. an image stored upside
    down and shown upright by a 180-degree rotation).

    Raises:
        InputError: no usable pixels (:func:`_pixels`), or a non-linear transform
            (:func:`~CTDiffusionSRLib.mrml_io.transform_problem`).
    """
    pixels, axes = _pixels(node, tags, keep_integers=keep_integers)
    return _placed(node, pixels, axes, as_displayed)


def photometric_note(photometric_interpretation: str) -> str:
    """What the log says about a DICOM radiograph's Photometric Interpretation ("" when nothing to say).

    A MONOCHROME1 radiograph (high stored values display dark) needs no inversion here: Slicer's DICOM
    reader (vtkITKArchetypeImageSeriesReader with ITK's GDCMImageIO, Slicer's default reader) already
    returns its pixels inverted to MONOCHROME2 meaning, bone bright, and so does the reader of the
    command-line module. Inverting again would make bone dark, so the module never inverts on its own;
    the "Invert intensities" box is for images whose bones really appear dark.
    """
    if (photometric_interpretation or "").strip().upper() == "MONOCHROME1":
        return _(
            "MONOCHROME1 radiograph: Slicer's DICOM reader already shows it with bone bright; it is used as "
            "loaded (tick 'Invert intensities' only if bones appear dark)."
        )
    return ""


def dicom_header_file(node) -> str:
    """The DICOM file ``node`` was loaded from (through Slicer's DICOM database), or ``""`` when it was not loaded
    from DICOM (a PNG, JPEG or NRRD file; outside Slicer). Its header tells the radiograph's modality, view and
    orientation, which the node itself does not keep."""
    files = dicom_source_files(node) if node is not None else []
    return files[0] if files else ""


def dicom_header_tags(node) -> dict[str, str]:
    """The header tags of the DICOM file ``node`` was loaded from (:func:`read_dicom_header`); empty when it was not
    loaded from DICOM or the file can no longer be read (it is then used as a plain image)."""
    path = dicom_header_file(node)
    if not path:
        return {}
    try:
        return read_dicom_header(path)
    except InputError as exc:
        logger.warning("the DICOM header of '%s' cannot be read (%s); it is used as a plain image", node.GetName(), exc)
        return {}


def photometric_interpretation(node) -> str:
    """The DICOM Photometric Interpretation of the file ``node`` was loaded from ("" when not DICOM)."""
    return dicom_header_tags(node).get("photometric", "")


def view_problem(node, settings: XraySettings, resolved, name: str, tags: dict[str, str] | None = None) -> str:
    """Why the radiograph's view does not fit the chosen weights (``""`` when it does, or when nothing says): the
    view chosen in the module, or with View ``auto`` the one its DICOM header gives, against the view the weights
    were trained on. The command would stop with the engine's message; the module says it, in its own words, when
    Apply is pressed. ``tags``: the node's header tags when the caller has read them (:func:`dicom_header_tags`)."""
    if resolved is None:
        return ""
    configs = resolved.metadata.get("configs") or [{}]
    trained = str(((configs[0] or {}).get("data") or {}).get("view", "pa"))
    if settings.view != "auto":
        view, said = settings.view, "View is set to " + settings.view
    else:
        tags = dicom_header_tags(node) if tags is None else tags
        found = header_view(tags, image_directions(tags)) if tags else None
        if found is None:
            return ""
        view, said = found[0], "its DICOM header: " + found[1]
    if view == trained:
        return ""
    wanted = "frontal (PA or AP)" if trained == "pa" else trained
    fix = f", or choose View: {trained} if the header is wrong" if settings.view == "auto" else ""
    return (
        f"'{node.GetName()}' is marked {view} ({said}), and the weights {name} were trained on {trained} radiographs: "
        f"use a {wanted} radiograph{fix}."
    )


#: How many nodes' verdicts :func:`check_xray_input` and :func:`check_reference_input` keep (the most recently
#: checked).
VERDICTS_KEPT = 8
#: node ID -> (what the verdict depends on (:func:`_verdict_key`), the verdict)
_verdicts: OrderedDict[str, tuple[tuple, str]] = OrderedDict()


def _remembered(verdicts: OrderedDict[str, tuple[tuple, str]], node, key: tuple, judge: Callable[[], str]) -> str:
    """``judge()``, kept in ``verdicts`` for ``node`` (its ID) under ``key`` (what the verdict depends on): asked again
    with the same key, the kept verdict; the :data:`VERDICTS_KEPT` most recently asked nodes are kept."""
    node_id = node.GetID()
    known = verdicts.get(node_id) if node_id else None
    if known is not None and known[0] == key:
        verdicts.move_to_end(node_id)
        return known[1]
    verdict = judge()
    if node_id:
        verdicts[node_id] = (key, verdict)
        while len(verdicts) > VERDICTS_KEPT:
            verdicts.popitem(last=False)
    return verdict


def _verdict_key(node, tags: dict[str, str]) -> tuple:
    """What :func:`check_xray_input` says of ``node`` depends on: its name and class, its pixels and geometry
    (:func:`~CTDiffusionSRLib.mrml_io.input_stamp`: the image's and its scalars' modification times, which change when
    they are edited or replaced, and the IJK-to-RAS matrix), its parent transforms (each one's ID and modification
    time: a matrix edited, a warp put in) and its DICOM header's ``tags``. The settings (seed, steps, stages) are not
    in it: changing them does not read the pixels again."""
    transforms = []
    parent = node.GetParentTransformNode()
    while parent is not None and len(transforms) < 64:
        transforms.append((parent.GetID(), parent.GetMTime()))
        parent = parent.GetParentTransformNode()
    return node.GetName(), node.GetClassName(), input_stamp(node), tuple(transforms), tuple(sorted(tags.items()))


#: (DICOM file, its modification time) -> its header tags, as :func:`_header_tags` last read them
_read_headers: OrderedDict[tuple[str, int | None], dict[str, str]] = OrderedDict()


def _header_tags(node) -> dict[str, str]:
    """:func:`dicom_header_tags`, the file read again only when it changed (the panel asks on every change of a
    setting)."""
    path = dicom_header_file(node)
    if not path:
        return {}
    try:
        stamp = (path, os.stat(path).st_mtime_ns)
    except OSError:
        stamp = (path, None)
    if stamp not in _read_headers:
        _read_headers[stamp] = dicom_header_tags(node)
        while len(_read_headers) > VERDICTS_KEPT:
            _read_headers.popitem(last=False)
    return dict(_read_headers[stamp])


def check_xray_input(node, tags: dict[str, str] | None = None) -> str:
    """Why ``node`` cannot be used as a radiograph, or ``""`` when it can (the Apply tooltip, and the job before it
    starts). ``tags``: the node's header tags when the caller has read them (:func:`dicom_header_tags`).

    The pixels are read once per change of the node (:func:`_verdict_key`): the panel asks on every change of a
    setting, and a 6000x7000 colour screenshot took seconds and 1.6 GB each time. The image must have something to
    show by the test the job's command applies (:func:`~DiffusionCore.xray.radiograph.window_bounds`), so that a nearly
    uniform image is refused here, not by the background job after it started."""
    if node is None:
        return "Select a radiograph (load a DICOM CR/DX, PNG or JPEG image)."
    if node.IsA("vtkMRMLLabelMapVolumeNode"):  # a segmentation's labels, not intensities (as the SR module says)
        return f"'{node.GetName()}' is a label map, not a radiograph: choose the image itself."
    tags = _header_tags(node) if tags is None else tags
    return _remembered(_verdicts, node, _verdict_key(node, tags), lambda: _input_verdict(node, tags))


def _input_verdict(node, tags: dict[str, str]) -> str:
    """:func:`check_xray_input` itself, reading the pixels: the memory it takes is one float32 copy of the image
    (none more for a float32 node, whose own pixels are checked)."""
    name = f"'{node.GetName()}'"
    try:
        stored, _ = _stored_pixels(node, tags)
        pixels = radiograph_pixels(stored, name)
        ijk_to_ras(node, world=True, what="The radiograph")  # a non-linear transform is refused
        check_projection_modality(tags, name)
        window_bounds(pixels, name, scratch=not np.may_share_memory(pixels, stored))  # the node's own: not reordered
    except InputError as exc:
        return str(exc)
    return ""


#: node ID -> (what the reference CT's voxel check depends on (:func:`_reference_voxels_key`), its verdict)
_reference_verdicts: OrderedDict[str, tuple[tuple, str]] = OrderedDict()


def _reference_voxels_key(node) -> tuple:
    """What the voxel part of :func:`check_reference_input` says of ``node`` depends on: the node's modification time
    (a rename: the message names it; a new image) and :func:`~CTDiffusionSRLib.mrml_io.input_stamp` (its image's and
    its scalars' modification times, which change when the voxels are edited or replaced)."""
    return node.GetMTime(), input_stamp(node)


def check_reference_input(node) -> str:
    """Why ``node`` cannot be the Reference CT the generated CT is scored against, or ``""`` when it can (also when
    none is chosen: the reference is optional). Checked when Apply is pressed, as XrayToCTGenerate checks its
    --referenceVolume before any work: the scores are computed only after the whole generation, so a bad reference
    found then would throw the generated CT away. Refused: no greyscale volume, a 2D image (the radiograph itself),
    fewer than ``MIN_CT_VOXELS`` voxels along an axis, NaN or infinite voxels, intensities that are not CT in HU, a
    non-linear transform (but Slicer's regularization of a tilted DICOM series, which is read from its files).

    The panel asks on every change of a setting: the voxels are read once per change of the node
    (:func:`_reference_voxels_verdict`: a 512x512x600 CT took 0.1-0.2 s and a 157 MB temporary each time), the rest
    is asked each time."""
    from DiffusionCore.xray.data import cube_size_problem, too_small_message

    if node is None:
        return ""
    name = f"Reference CT '{node.GetName()}'"
    fix = "choose the CT this radiograph shows, or no reference."
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        return f"{name} is not a scalar (greyscale) volume: {fix}"
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return f"{name} holds no voxels: {fix}"
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        return f"{name} is a colour/vector image; a greyscale CT is needed: {fix}"
    problem = transform_problem(node, "The reference CT")
    if problem and irregular_dicom_series(node) is None:  # a tilted series under the regularization: its files are read
        return problem
    nx, ny, nz = image.GetDimensions()
    if min(nx, ny, nz) == 1:
        return f"{name} is 2D ({nx}x{ny}x{nz} voxels along x, y, z), a radiograph or one slice, not a CT volume: {fix}"
    why = cube_size_problem((nz, ny, nx))  # the voxel counts (a tilted series under Slicer's regularization
    if why:  # transform has no plain grid, and is read from its files for the job)
        return too_small_message(name, why)
    return _reference_voxels_verdict(node, name, fix)


def _reference_voxels_verdict(node, name: str, fix: str) -> str:
    """The part of :func:`check_reference_input` that reads every voxel (NaN or infinite values, the HU range), once
    per change of the node (:func:`_reference_voxels_key`); ``name`` and ``fix`` are its message's words."""
    from vtk.util import numpy_support

    from DiffusionCore.volume import check_ct

    def judge() -> str:
        try:
            scalars = node.GetImageData().GetPointData().GetScalars()
            doubts = check_ct(numpy_support.vtk_to_numpy(scalars), name)  # a view of the voxels, no copy
        except InputError as exc:
            return str(exc)
        return f"{doubts[0]} The reference scores need a CT in Hounsfield units: {fix}" if doubts else ""

    return _remembered(_reference_verdicts, node, _reference_voxels_key(node), judge)


def write_radiograph(node, path: str | Path, as_displayed: bool | None = None) -> Path:
    """Write the radiograph node as a 2D image (MetaImage keeps values, their type and the pixel spacing): an integer
    radiograph in its own type, any other as float32, and colour-encoded greyscale (RGB, RGBA) as its channels in their
    own type, which the command's reader (:func:`~DiffusionCore.xray.radiograph.read_radiograph`) makes grey, and
    refuses when they are real colour, as it does for a colour file.

    This runs in Slicer's GUI thread when Apply is pressed (:meth:`XrayJob.prepare`): making a 4000x5000 RGB image
    grey there froze Slicer for seconds before the job and its progress bar started; now the job's process does it.

    ``as_displayed``: the pixels as Slicer displays the node (:func:`radiograph_from_node`); by default so for a node
    not loaded from DICOM (a PNG, JPEG, NRRD, MetaImage or NIfTI file), and in the stored order for one loaded from
    Slicer's DICOM database, whose header's orientation the command applies (``--dicomHeader``)."""
    if as_displayed is None:
        as_displayed = not dicom_header_file(node)
    stored, axes = _stored_pixels(node)
    if stored.ndim == 3 and stored.shape[-1] in COLOUR_CHANNELS:
        pixels = stored  # not made grey here: the command does, in the background
    else:
        pixels = radiograph_pixels(stored, f"'{node.GetName()}'", keep_integers=True)
    pixels, (row_mm, col_mm) = _placed(node, pixels, axes, as_displayed)
    from DiffusionCore.volume import write_image

    # an integer radiograph in its own type (uint16: half the bytes); colour channels as one vector pixel
    image = sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3)
    image.SetSpacing((col_mm, row_mm))
    return write_image(image, path)


def dicom_patient_id(node) -> str:
    """The DICOM PatientID of the files ``node`` was loaded from (through Slicer's DICOM database); ``""`` when it was
    not loaded from DICOM, the files are gone, or the header gives none."""
    from DiffusionCore.dicom_in import header_values

    files = dicom_source_files(node) if node is not None else []
    values = header_values(files[0], ["PatientID"]) if files else None
    return (values or {}).get("PatientID", "").strip()


def different_patients_notice(radiograph_node, reference_node) -> str:
    """What the module says when the radiograph and the reference CT are of two patients, by their DICOM PatientIDs
    (``""`` when they agree, or when either is unknown: not loaded from DICOM)."""
    if reference_node is None:
        return ""
    ids = dicom_patient_id(radiograph_node), dicom_patient_id(reference_node)
    if not all(ids) or ids[0] == ids[1]:
        return ""
    return (
        f"The radiograph '{radiograph_node.GetName()}' (PatientID {ids[0]}) and the reference CT "
        f"'{reference_node.GetName()}' (PatientID {ids[1]}) are of different patients: the reference scores compare "
        "two different patients and mean little."
    )


def turned_by_transform(node) -> bool:
    """Whether a linear parent transform turns, mirrors or scales ``node`` (its displayed axes differ from its own)."""
    parent = node.GetParentTransformNode()
    if parent is None or not parent.IsTransformToWorldLinear():
        return False
    return not np.allclose(ijk_to_ras(node, world=True)[:3, :3], ijk_to_ras(node)[:3, :3], atol=1e-6)


def _geometry_stamp(node) -> tuple:
    """:func:`~CTDiffusionSRLib.mrml_io.input_stamp` with the node's displayed geometry (a transform edited while a job
    runs changes what the job would be handed too)."""
    try:
        world = tuple(ijk_to_ras(node, world=True).ravel())
    except InputError:  # put under a non-linear transform meanwhile
        world = None
    return input_stamp(node), world


def grid_text(shape) -> str:
    """A volume's grid as a reader says it: ``64^3`` for a cube, else ``64x64x32`` (``(z, y, x)`` voxels)."""
    sizes = [int(n) for n in shape]
    return f"{sizes[0]}^3" if len(set(sizes)) == 1 else "x".join(map(str, sizes))


def unreadable_reason(exc: BaseException, path: str = "") -> tuple[str, str]:
    """Why a volume file could not be read: ``(what the user is told, the reader's message)``. The message is the
    exception named with its first line (:func:`~CTDiffusionSRLib.jobs.exception_text`), without the job's private
    file ``path``."""
    detail = exception_text(exc)
    if path:
        detail = detail.replace(path, "the file")
    if isinstance(exc, MemoryError):
        return "there was not enough memory to read it", detail
    return "its file could not be read (damaged or cut short)", detail


class XrayJob(CLIJob):
    """Generate a synthetic CT from a radiograph node with XrayToCTGenerate in a background process.

    ``stage_errors`` maps stage -> re-projection figures (``{"projection_psnr": dB, "projection_ncc": r}``)
    as the stages finish; ``preview_node`` is the result node, updated after every stage: "<input> CT stage N
    (synthetic)" for an earlier stage's preview, "<input> CT (synthetic)" for the last stage's volume (a name the user
    gave it meanwhile is kept; made unique in the scene). The log lines and the error name the nodes the user chose,
    not the files they were handed over in.

    A shown stage is a result in its own right, so the preview node is in ``created_nodes`` (what a job that does not
    complete removes) only while it is being made: a cancel or a failure during a later stage keeps it as the last
    shown stage made it, and a notice names it (:meth:`kept_notice`). A stage preview that cannot be read is skipped
    with a notice and a log line; the job goes on.
    """

    script_name = "XrayToCTGenerate"
    #: the weights the previews record: (name, sha256), when known before the job runs
    _weights: tuple[str, str] = ("", "")
    #: the hand-off files in the job's temporary folder
    RADIOGRAPH_FILE = "radiograph.mha"
    REFERENCE_NAME = "reference"

    def __init__(self, scene, input_node, settings: XraySettings, *, reference_node=None, **kwargs):
        super().__init__(scene, **kwargs)
        tags = _header_tags(input_node)  # read once: the checks below and the command's --dicomHeader use it
        reason = check_xray_input(input_node, tags)
        if reason:
            raise InputError(reason)
        reason = check_reference_input(reference_node)  # now, not after the whole generation
        if reason:
            raise InputError(reason)
        if not 0 <= settings.num_stages <= 3:
            raise InputError(f"the number of stages must be 1, 2 or 3 (0: all the weights have); got {settings.num_stages}.")
        #: the stages' grids (voxels per side), as the weights give them: the temp-room check counts their files
        self.stage_sides = TINY_STAGE_SIDES if settings.tiny_test_model else DEFAULT_STAGE_SIDES
        if not settings.tiny_test_model:
            from DiffusionCore.weights.registry import first_available

            weights = settings.weights or first_available("xray")
            resolved = check_weights(weights, "xray", settings.allow_unregistered_weights) if weights else None
            problem = view_problem(input_node, settings, resolved, weights, tags)
            if problem:
                raise InputError(problem)
            if resolved is not None:  # recorded on the stage previews; the final result records the command's report
                self._weights = (weights, resolved.sha256)
                sides = [int((c or {}).get("resolution", 0)) for c in resolved.metadata.get("configs") or []]
                if sides and all(sides):
                    self.stage_sides = tuple(sides)
        self.input_node = input_node
        self.reference_node = reference_node
        self.settings = settings
        #: the DICOM file the radiograph was loaded from: the command reads its modality, view and orientation
        self.dicom_header = dicom_header_file(input_node) if tags else ""
        if self.dicom_header and turned_by_transform(input_node):
            self.notices.append(
                f"'{input_node.GetName()}' is under a transform that turns or scales it in the views; a radiograph "
                "loaded from DICOM is used as its DICOM header orients it, not as the transform shows it."
            )
        notice = different_patients_notice(input_node, reference_node)
        if notice:
            self.notices.append(notice)
        self.preview_node = None
        self.stage_errors: dict[int, dict[str, float]] = {}
        self.stages_shown: list[int] = []
        #: the number of stages the command runs, once its first stage says so
        self.stages_planned: int | None = None
        self._given_name = ""  # the name the job last gave the preview: another one is the user's
        self._grid = ""  # the preview's grid (grid_text) as the last shown stage made it
        self._pending: list[dict] = []
        self._pending_lock = threading.Lock()
        self.reference_metrics: dict = {}
        self._stamps: dict[str, tuple] = {}  # the inputs as the job read them (prepare)
        self.recorded_input = ("", "")  # the radiograph's name and DICOM UID then (prepare): it may be deleted later
        #: the engine's settings as run (the report's ``settings``: steps, device, view, torch_threads, ...) and the
        #: run's environment (its output file's record): known once the job ends; the stage previews record None / {}
        self.report_settings: dict | None = None
        self.input_sha256 = ""  # the radiograph's content digest, once the job's report gives it
        self.environment: dict[str, str] = {}
        self._capped_said = False  # the notice that the weights have fewer stages than chosen (update)

    def module_dir(self) -> Path:
        return Path(__file__).resolve().parent.parent

    def hand_off_bytes(self) -> int:
        """About what the job's files take in its temporary folder, counted before any work: the radiograph as handed
        over (an integer one in its own type, a colour-encoded one as its channels, else float32), the reference CT as
        float32, a float32 preview of every stage the job runs and the result (the last stage's grid again), each with
        room for its header."""
        header = 4096
        stored, _ = _stored_pixels(self.input_node)  # a view: its type and size, nothing read
        if stored.ndim == 3 and stored.shape[-1] in COLOUR_CHANNELS:  # as stored (write_radiograph)
            per_pixel = stored.dtype.itemsize * stored.shape[-1]
        else:
            per_pixel = stored.dtype.itemsize if stored.dtype.kind in "iu" else 4
        needed = stored.shape[0] * stored.shape[1] * per_pixel + header
        if self.reference_node is not None:
            needed += int(np.prod(self.reference_node.GetImageData().GetDimensions())) * 4 + header
        stages = self.stage_sides[: self.settings.num_stages or len(self.stage_sides)]
        needed += sum(4 * side**3 + header for side in stages) + 4 * stages[-1] ** 3 + header
        return needed

    def prepare(self, tempdir: Path) -> list[str]:
        name = self.input_node.GetName()
        what = f"the radiograph '{name}'" + (", the reference CT" if self.reference_node is not None else "")
        check_temp_room(tempdir, self.hand_off_bytes(), f"{what}, the stage previews and the result")
        # as Slicer displays it, unless the command turns it by the DICOM header it is handed
        radiograph = tempdir / self.RADIOGRAPH_FILE
        write_radiograph(self.input_node, radiograph, as_displayed=not self.dicom_header)
        self._stamps = {"radiograph": _geometry_stamp(self.input_node)}
        self.recorded_input = recorded_input(self.input_node)
        remember_place(self.input_node)  # where the CT goes should the radiograph be deleted while the job runs
        self.handed_over = []
        self.hand_over(radiograph, "the radiograph", self.input_node)
        args = self.settings.cli_arguments()
        if self.reference_node is not None:  # a tilted series is read from its files, as the SR module reads it
            reference = write_job_input(self.reference_node, tempdir, self.REFERENCE_NAME, world=True)
            self._stamps["reference"] = _geometry_stamp(self.reference_node)
            self.hand_over(reference, "the reference CT", self.reference_node)
            args += ["--referenceVolume", reference]
        if self.dicom_header:
            args += ["--dicomHeader", self.dicom_header]
        # what the command says of its own files names what they hold, not the job's private folder
        self.handed_over.append((str(tempdir / "output.nrrd"), "the result", f"the result of '{name}'"))
        for stage in range(1, len(DEFAULT_STAGE_SIDES) + 1):
            path = tempdir / "stages" / f"stage{stage}.nrrd"
            self.handed_over.append((str(path), f"stage {stage}", f"stage {stage}'s preview of '{name}'"))
        self.handed_over.append((str(tempdir), "the job's folder", f"the temp folder {tempdir.parent}"))
        args += [
            "--stageDirectory", str(tempdir / "stages"),
            "--reportFile", str(tempdir / "report.json"),
            "--returnparameterfile", str(tempdir / "return.txt"),
        ]
        return [*args, str(radiograph), str(tempdir / "output.nrrd")]

    def handle_line(self, line: str) -> None:
        if line.startswith(STAGE_LINE_PREFIX):
            try:
                record = json.loads(line[len(STAGE_LINE_PREFIX) :])
            except json.JSONDecodeError:
                return
            with self._pending_lock:
                self._pending.append(record)

    def _stage_name(self, stage: int) -> str:
        """The result's name after ``stage``: the last stage's without its number (it is the result, not a preview)."""
        last = self.stages_planned is not None and stage >= self.stages_planned
        return synthetic_name(self.input_node.GetName(), "CT" if last else f"CT stage {stage}")

    def _show(self, volume, stage: int) -> None:
        if self.preview_node is not None and not in_scene(self.scene, self.preview_node):
            self.notices.append(
                f"The preview volume '{self.preview_node.GetName()}' was deleted while the job ran; "
                f"stage {stage} is in a new volume."
            )
            self.preview_node = None
        if self.preview_node is None:
            self.preview_node = add_volume_node(self.scene, volume, self._stage_name(stage))
            self.created_nodes.append(self.preview_node)  # until its stage is shown (below)
            display = self.preview_node.GetDisplayNode()
            if display is not None:
                display.SetAutoWindowLevel(False)
                display.SetWindowLevel(*CT_WINDOW_LEVEL)
            place_beside(self.scene, self.input_node, self.preview_node)
            self._given_name = self.preview_node.GetName()
        else:
            set_node_from_volume(self.preview_node, volume)
            if self.preview_node.GetName() == self._given_name:  # else the user renamed it: theirs is kept
                self.preview_node.SetName(free_name(self.scene, self._stage_name(stage), self.preview_node))
                self._given_name = self.preview_node.GetName()
        self._grid = grid_text(volume.shape)
        self._record_provenance(stage)
        self.stages_shown.append(stage)
        # a finished stage is a result: a cancel or a failure later on keeps it (see kept_notice)
        self.created_nodes = [node for node in self.created_nodes if node is not self.preview_node]

    def _record_provenance(self, stage: int, model: str = "", sha: str = "") -> None:
        """Record on the preview node how it was made: the stage it holds, of how many, on which grid; the panel's
        settings and, once the job has reported them, the engine's as run (``report_settings``, as the SR module
        records them) and the run's environment."""
        planned = self.stages_planned
        settings = {**dataclasses.asdict(self.settings), "stage": stage, "stages_planned": planned,
                    "grid": self._grid, "projection_errors": self.stage_errors,
                    "report_settings": self.report_settings}  # fmt: skip
        title = "CT from radiograph (synthetic)"
        if planned is None or stage < planned:  # a stage preview, which a cancel or a failure may leave as the result
            of = f" of {planned}" if planned else ""
            title = f"CT from radiograph, stage {stage}{of}, {self._grid} (synthetic)"
        set_provenance(self.preview_node, kind="xray-to-ct", model=model or self._weights[0],
                       weights_sha256=sha or self._weights[1], settings=settings, source=self.input_node,
                       title=title, recorded_input=self.recorded_input, environment=self.environment,
                       input_sha256=self.input_sha256)  # fmt: skip
        self.preview_node.SetAttribute("CTDiffusion.ProjectionErrors", json.dumps(self.stage_errors))

    def update(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for record in pending:
            stage = int(record["stage"])
            if record.get("stages"):
                self.stages_planned = int(record["stages"])
                self._say_capped_stages()
            self.stage_errors[stage] = dict(record.get("projection") or {})
            if record.get("file") and Path(record["file"]).is_file():
                try:
                    volume = read_volume_file(record["file"])
                except Exception as exc:  # a damaged file, memory running out: the job goes on without this preview
                    self._preview_unreadable(stage, *unreadable_reason(exc, record["file"]))
                    continue
                self._show(volume, stage)

    def _say_capped_stages(self) -> None:
        """Say once that the weights have fewer stages than Stages asks for: the module runs every stage they have
        (as the command does, with a warning in its log), and the status line and the log say so."""
        asked, have = self.settings.num_stages, self.stages_planned
        if self._capped_said or not asked or have is None or have >= asked:
            return
        self._capped_said = True
        weights = "the tiny test model" if self.settings.tiny_test_model else (
            f"the weights {self._weights[0] or self.settings.weights or '(default)'}")  # fmt: skip
        notice = (f"Stages is set to {asked}, but {weights} {'has' if self.settings.tiny_test_model else 'have'} "
                  f"{have} stage{'s' if have > 1 else ''}: the generation runs {'every one' if have > 1 else 'it'}. "
                  "Set Stages to 'all the weights have' to run every stage without this notice.")  # fmt: skip
        logger.warning("%s", notice)
        self.notices.append(notice)
        if self.on_line:
            self.on_line(f"warning: {notice}")

    def _preview_unreadable(self, stage: int, reason: str, detail: str) -> None:
        """Say that stage ``stage``'s preview is not shown, and why (the job goes on; its result comes at the end);
        the log has the reader's message (``detail``) too."""
        notice = f"Stage {stage}'s preview could not be shown: {reason}."
        if self.stages_shown and in_scene(self.scene, self.preview_node):
            notice += f" '{self.preview_node.GetName()}' still shows stage {self.stages_shown[-1]}."
        notice += " The generation goes on; its result is added when it finishes."
        logger.warning("%s (%s)", notice, detail)
        self.notices.append(notice)
        if self.on_line:
            self.on_line(f"warning: {notice} ({detail})")

    # -- a job that does not complete keeps its last shown stage ------------------------------------------------
    def kept_notice(self) -> str:
        """What a cancelled or failed job kept (``""`` when nothing): the preview node, as the last shown stage made
        it, e.g. "Cancelled during stage 2 of 2; stage 1's result (64^3) was kept as 'chest PA CT stage 1
        (synthetic)'." """
        if self.state not in (JobState.CANCELLED, JobState.FAILED) or not self.stages_shown:
            return ""
        if self.preview_node is None or not in_scene(self.scene, self.preview_node) or self.scene.IsClosing():
            return ""  # deleted by the user, or going with the scene
        stage, planned = self.stages_shown[-1], self.stages_planned
        how = "Cancelled" if self.state == JobState.CANCELLED else "The generation stopped"
        if planned is not None and stage >= planned:
            return f"{how} after its last stage; the result ({self._grid}) was kept as '{self.preview_node.GetName()}'."
        of = f" of {planned}" if planned else ""
        return (
            f"{how} during stage {stage + 1}{of}; stage {stage}'s result ({self._grid}) was kept as "
            f"'{self.preview_node.GetName()}'. It is a lower-resolution synthetic CT; Apply again for the full result."
        )

    def _finished_before_failing(self) -> bool:
        """A job that failed after its last stage was shown (its output file could not be written: a full disk; the
        reference scores failed) made its whole result all the same: it completes, with the result node as the
        result (Export works) and a notice that says what failed. It had said "only stage 1's result was kept", and
        the panel showed "Failed" with Export disabled."""
        if self.state != JobState.FAILED or not self.stages_shown or self.stages_planned is None:
            return False
        if self.stages_shown[-1] < self.stages_planned or self.preview_node is None:
            return False
        if not in_scene(self.scene, self.preview_node) or self.scene.IsClosing():
            return False
        error = self.named(self.error).rstrip(".")
        self.notices.append(
            f"The generation finished, but what followed its last stage failed: {error}. "
            f"'{self.preview_node.GetName()}' holds the full result (stage {self.stages_shown[-1]} of "
            f"{self.stages_planned}, {self._grid})."
        )
        logger.warning("%s", self.notices[-1])
        self.state, self.error, self.result_nodes = JobState.COMPLETED, "", [self.preview_node]
        return True

    def ended(self) -> None:
        """Say what a cancelled or failed job kept; a job that failed after its last stage completes."""
        if self._finished_before_failing():
            return
        notice = self.kept_notice()
        if notice:
            logger.info("%s", notice)
            self.notices.append(notice)
            # the shared runner's message for a killed worker says nothing was imported: a stage was kept
            kept = f"only stage {self.stages_shown[-1]}'s result was kept"
            if "nothing was imported" in self.error:
                self.error = self.error.replace("nothing was imported", kept)
            elif self.error and self.state == JobState.FAILED:
                self.error = f"{self.error.rstrip('.')}; {kept}."

    def kept_nodes(self) -> list:
        return [self.preview_node] if self.kept_notice() else []

    def _changed_inputs_notices(self) -> list[str]:
        """What the user should know about an input changed or deleted while the job ran (the result was made from,
        and the reference scores compare with, the input as it was when the job started), in the SR job's words."""
        notices = []
        radiograph, reference = self._stamps.get("radiograph"), self._stamps.get("reference")
        if radiograph is not None and not in_scene(self.scene, self.input_node):
            notices.append(
                f"'{self.recorded_input[0]}' was deleted while the job ran; the result was made from it as it was "
                "when the job started, and records its name."
            )
        elif radiograph is not None and _geometry_stamp(self.input_node) != radiograph:
            notices.append(
                f"'{self.input_node.GetName()}' was changed while the job ran; the result was made from it as it was "
                "when the job started. Apply again for a result of the radiograph as it is now."
            )
        if reference is not None and not in_scene(self.scene, self.reference_node):
            notices.append(
                f"The reference CT '{self.reference_node.GetName()}' was deleted while the job ran; the scores compare "
                "the result with it as it was when the job started."
            )
        elif reference is not None and _geometry_stamp(self.reference_node) != reference:
            notices.append(
                f"The reference CT '{self.reference_node.GetName()}' was changed while the job ran; the scores compare "
                "the result with it as it was when the job started."
            )
        return notices

    def import_results(self, tempdir: Path) -> list:
        self.update()
        out = tempdir / "output.nrrd"
        if not out.is_file():
            raise OutputError("the generation finished without writing its output; see the log.")
        last = max(self.stage_errors) if self.stage_errors else max(1, self.settings.num_stages)
        self.stages_planned = last  # the output is the last stage's volume
        self._show(read_volume_file(str(out)), last)
        report = read_job_report(tempdir / "report.json")
        self.report_settings = report.get("settings")
        self.input_sha256 = str(report.get("input_sha256") or "")
        self.environment = recorded_environment(out, report)  # the job's, as its output file records it
        model = self.return_values.get("modelName") or str(report.get("model", ""))
        sha = self.return_values.get("weightsSha256") or str(report.get("weights_sha256", ""))
        self._record_provenance(last, model, sha)
        self.reference_metrics = report.get("reference_metrics", {})
        self.notices += self._changed_inputs_notices()
        return [self.preview_node]
