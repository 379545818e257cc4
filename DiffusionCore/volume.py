"""CT volumes in HU with exact geometry, and their file formats.

Conventions (the same everywhere in DiffusionCore):

* ``Volume.array`` is float32 with shape ``(z, y, x)`` in Hounsfield units, i.e. the array order of
  ``SimpleITK.GetArrayFromImage``: array axis 0 is the slice index k, axis 2 the column index i.
* Geometry follows ITK: ``spacing`` and ``origin`` are given in index order ``(i, j, k)`` = ``(x, y, z)``,
  in millimetres, in the LPS patient frame; ``direction`` is the 3x3 matrix whose column ``c`` is the unit
  vector of index axis ``c`` in LPS. The physical point of voxel ``(i, j, k)`` is
  ``origin + direction @ (spacing * (i, j, k))``.
* Axis names used on the command line (``z``, ``y``, ``x``) refer to the *array* axes 0, 1, 2.

Readers accept NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd) and a folder holding a
DICOM series (rescale slope and intercept applied). Writers produce NIfTI, NRRD or MHA atomically.

Geometry is exact or refused (:mod:`DiffusionCore.geometry`): a gantry-tilted DICOM series is resampled
onto an orthogonal grid with a warning; a NIfTI's sform wins over a pixdim or qform that contradicts it;
a sheared grid is never written to NIfTI, which would orthogonalise it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .dicom_in import (
    check_deflated_size,
    check_series_identity,
    choose_ct_series,
    enhanced_ct_in,
    header_values,
    localizers_only_error,
    read_enhanced_ct,
    series_choice,
    unread_files_note,
)
from .errors import (
    ConfigError,
    DiffusionCoreError,
    GeometryError,
    InputError,
    NumericalError,
    OutputError,
    OutputExistsError,
    ResourceError,
    not_for_this_tool,
)
from .files import (
    CompressedDataError,
    check_detached_data_files,
    check_name_length,
    detached_data_files,  # noqa: F401 - re-exported: callers and tests take it from here
    folder_writable,
    gzip_file,
    inflated_size,
    native_stderr_captured,
    no_room_reason,
    not_regular_kind,
    partial_file,
    publish,
    remove_stale_partials,
    text_file_error,
    too_long_error,
    usable_cpus,
)
from .geometry import (
    POSITION_TOL_VOXELS,
    axis_angles_deg,
    gantry_tilt,
    grid_distance_mm,
    index_to_physical,
    orthogonalisation_shift_mm,
    resample_gantry_tilt,
)
from .provenance import has_provenance_fields, minimal_provenance, provenance_header

logger = logging.getLogger(__name__)

#: Values below this are padding markers (-2048, -3024, -32768 outside the scan circle), not tissue:
#: air is about -1000 HU, so nothing real lies this low.
PADDING_THRESHOLD_HU = -1500.0
AIR_HU = -1024.0
#: A CT in HU spans at least this many HU (air to soft tissue); less means another modality or units.
MIN_CT_RANGE_HU = 200.0
#: A spacing ratio at or above this makes an axis "thick" (through-plane).
THICK_AXIS_MIN_RATIO = 1.5

AXIS_NAMES = ("z", "y", "x")
WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def axis_index(axis: str | int) -> int:
    """Array axis (0, 1, 2) for an axis name ``'z'``, ``'y'``, ``'x'`` or an int."""
    if isinstance(axis, int | np.integer) and 0 <= int(axis) <= 2:
        return int(axis)
    if isinstance(axis, str) and axis.lower() in AXIS_NAMES:
        return AXIS_NAMES.index(axis.lower())
    raise InputError(f"unknown axis {axis!r}: use z, y or x (array axes 0, 1, 2)")


#: Smallest |determinant| of a volume's direction matrix: direction cosines have |det| 1, and an
#: (almost) singular matrix maps the voxel grid onto a plane, which no resampling or writer can handle.
MIN_DIRECTION_DETERMINANT = 1e-6
#: Largest relative error of the length of a direction column that is taken as it is: direction cosines are unit
#: vectors, rounded in DICOM headers (``ImageOrientationPatient``, a few decimals) and in NIfTI's float32 quaternions.
DIRECTION_UNIT_TOL = 1e-3
#: Up to this error a column is rounding (an ``ImageOrientationPatient`` written with two decimals, 0.98 / 0.17, is
#: 0.5% short) and is scaled to unit length; beyond it the matrix is refused (a voxel size folded into it: 2 * I).
DIRECTION_ROUNDING_TOL = 2e-2


@dataclass(frozen=True)
class Grid:
    """A voxel grid in physical space (no intensities).

    Attributes:
        shape: array shape ``(z, y, x)``.
        spacing: voxel size in mm, ITK order ``(x, y, z)``.
        origin: LPS position in mm of the centre of voxel ``(0, 0, 0)``.
        direction: 3x3 direction cosines, column c = index axis c (ITK convention).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 numbers, row-major, hashable

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array-axis order ``(z, y, x)``."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(i, j, k, 1)`` to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def to_sitk_reference(self) -> sitk.Image:
        """An empty image carrying this grid (for ``sitk.Resample``)."""
        z, y, x = self.shape
        img = sitk.Image([int(x), int(y), int(z)], sitk.sitkUInt8)
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(d) for d in self.direction])
        return img


@dataclass(eq=False, repr=False)
class Volume:
    """A CT volume: float32 HU array ``(z, y, x)`` plus ITK geometry (see module docstring).

    ``==`` is identity (two volumes with equal voxels are still two volumes): compare ``a.grid == b.grid`` and
    ``np.array_equal(a.array, b.array)`` for equal contents.

    Attributes:
        array: float32 array, shape ``(z, y, x)``, Hounsfield units. Given as a numpy array (a C-contiguous
            float32 one is shared, not copied) or a torch tensor on any device, with or without ``requires_grad``:
            it is detached and brought to the CPU as float32, copied unless it is a plain float32 CPU tensor (shared
            then, as an array is); a tensor that requires grad is always copied, so its graph is never touched.
        spacing: mm per voxel, ``(x, y, z)``.
        origin: LPS mm of voxel ``(0, 0, 0)``.
        direction: 3x3 float64 direction cosines (columns = index axes).
        metadata: free-form provenance (source path, series UID, notes); never used for computation.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = _as_numpy(self.array)
        if arr.ndim != 3:
            raise InputError(f"a volume needs a 3D array (z, y, x); got {arr.ndim}D with shape {arr.shape}")
        if 0 in arr.shape:
            raise InputError(f"a volume needs at least one voxel along each axis; got an empty array of shape "
                             f"{arr.shape} (z, y, x): check the slicing or cropping that made it")  # fmt: skip
        self.array = np.ascontiguousarray(arr, dtype=np.float32)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        direction = np.asarray(self.direction, dtype=np.float64)
        if direction.size != 9:
            raise GeometryError(f"direction needs a 3x3 matrix (9 numbers); got shape {direction.shape}")
        self.direction = direction.reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise InputError("spacing and origin need three values each (x, y, z)")
        finite = bool(np.isfinite(self.direction).all())
        if not finite or abs(np.linalg.det(self.direction)) < MIN_DIRECTION_DETERMINANT:
            problem = ("holds NaN or Inf" if not finite else
                       f"is singular (determinant {np.linalg.det(self.direction):.3g})")  # fmt: skip
            raise GeometryError(
                f"the direction matrix {self.direction.tolist()} {problem}: its columns must be the unit "
                "directions of the x, y and z index axes, e.g. np.eye(3). Fix the orientation in the file "
                "header or pass a valid direction."
            )
        lengths = np.linalg.norm(self.direction, axis=0)
        off = float(np.abs(lengths - 1.0).max())
        if DIRECTION_UNIT_TOL < off <= DIRECTION_ROUNDING_TOL:  # rounded cosines: the directions they mean
            logger.info("direction cosines of lengths %s scaled to unit length (rounded in the header)",
                        np.round(lengths, 6).tolist())  # fmt: skip
            self.direction = self.direction / lengths
        elif off > DIRECTION_ROUNDING_TOL:
            raise GeometryError(
                f"the direction matrix's columns must be unit vectors (the directions of the x, y and z index axes); "
                f"their lengths are {np.round(lengths, 6).tolist()}. The voxel size goes in `spacing` (x, y, z), not "
                "in the direction. From a nibabel image, use Volume.from_nibabel(img). From a 4x4 affine A of your "
                "own: Volume's geometry is LPS (as ITK and DICOM), so an RAS affine (NIfTI, nibabel) needs "
                "A = np.diag([-1, -1, 1, 1]) @ A first; then spacing = np.linalg.norm(A[:3, :3], axis=0), "
                "direction = A[:3, :3] / spacing, origin = A[:3, 3], and the array in (z, y, x) order (nibabel's "
                "(x, y, z) data transposed: data.T)."
            )
        if not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise GeometryError(
                f"voxel spacing must be positive and finite; got {self.spacing} mm. "
                "Fix the spacing in the file header (e.g. in 3D Slicer: Volumes > Volume Information)."
            )
        if not all(np.isfinite(o) for o in self.origin):
            raise GeometryError(f"the origin must be finite; got {self.origin} mm (x, y, z). Fix the origin in the "
                                "file header, or pass the position of voxel (0, 0, 0) in mm.")  # fmt: skip

    def __repr__(self) -> str:
        direction = "identity" if np.array_equal(self.direction, np.eye(3)) else np.round(self.direction, 4).tolist()
        meta = repr(self.metadata)
        meta = meta if len(meta) <= 200 else meta[:197] + "..."
        return (f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing={self.spacing}, origin={self.origin}, "
                f"direction={direction}, metadata={meta})")  # fmt: skip

    # -- geometry -----------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def grid(self) -> Grid:
        return Grid(
            shape=self.shape,
            spacing=self.spacing,
            origin=self.origin,
            direction=tuple(float(v) for v in self.direction.ravel()),
        )

    def content_sha256(self) -> str:
        """Hex sha256 of the voxels (float32, array order) and the grid (shape, spacing, origin, direction): the
        same for the same CT whatever file or format it was read from. Results record their input's
        (``input_sha256`` in the report and the provenance), so a result can be traced to the very scan."""
        from .files import sha256_arrays

        grid = np.concatenate([np.asarray(v, np.float64).ravel() for v in (self.spacing, self.origin, self.direction)])
        return sha256_arrays(np.asarray(self.array, np.float32), grid)

    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(i, j, k, 1)`` to LPS millimetres."""
        return self.grid.index_to_physical()

    def with_array(self, array: np.ndarray, **metadata) -> Volume:
        """A new volume with the same geometry and another array of the same shape.

        Args:
            array: ``(z, y, x)``, the shape of this volume (converted to float32; a float32 array is shared).
            **metadata: entries added to (or replacing) a copy of this volume's metadata.

        Raises:
            GeometryError: the array's shape differs from the volume's.
        """
        if tuple(np.shape(array)) != self.shape:
            raise GeometryError(f"array shape {np.shape(array)} differs from the volume's {self.shape} (z, y, x): "
                                "with_array keeps the geometry, so the array must have the same shape.")  # fmt: skip
        return Volume(array, self.spacing, self.origin, self.direction.copy(), {**self.metadata, **metadata})

    def copy(self) -> Volume:
        """An independent copy: the array, direction and metadata dict are copied (metadata values are shared)."""
        return Volume(self.array.copy(), self.spacing, self.origin, self.direction.copy(), dict(self.metadata))

    @classmethod
    def from_grid(cls, grid: Grid, array: np.ndarray, **metadata) -> Volume:
        """A volume on ``grid`` (e.g. ``other.grid``) holding ``array``.

        Args:
            grid: the geometry (shape ``(z, y, x)``, spacing/origin ``(x, y, z)``, direction).
            array: ``(z, y, x)`` of ``grid.shape``, HU (converted to float32).
            **metadata: the new volume's metadata.

        Raises:
            GeometryError: the array's shape differs from the grid's.
        """
        if tuple(np.shape(array)) != tuple(grid.shape):
            raise GeometryError(f"array shape {np.shape(array)} differs from the grid's {grid.shape} (z, y, x): "
                                "give an array of the grid's shape.")  # fmt: skip
        return cls(array, grid.spacing, grid.origin, grid.direction_matrix, dict(metadata))

    # -- SimpleITK ----------------------------------------------------------------------------------
    def to_sitk(self, dtype: type | np.dtype = np.float32) -> sitk.Image:
        """This volume as a SimpleITK image: voxels cast to ``dtype`` (float32 by default; ``np.int16`` for
        compact HU) with spacing, origin and direction set; SimpleITK's index order is ``(x, y, z)``."""
        img = sitk.GetImageFromArray(self.array.astype(dtype, copy=False))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, *, source: str = "image", **metadata) -> Volume:
        """A Volume from a SimpleITK image, with the checks of :func:`check_image_shape`."""
        check_image_shape(img, source)
        arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
        return cls(arr, img.GetSpacing(), img.GetOrigin(), np.asarray(img.GetDirection()).reshape(3, 3), metadata)

    # -- nibabel ------------------------------------------------------------------------------------
    @classmethod
    def from_nibabel(cls, img, *, padding_to_air: bool = True, **metadata) -> Volume:
        """A Volume from a nibabel image (``nibabel.load(path)``, or a ``Nifti1Image`` built in memory): the same
        voxels and geometry as :func:`read_volume` gives for the file (``read_volume(path, check=False)``).

        nibabel and this library differ in two conventions, both converted here:

        * nibabel's data is ``(x, y, z)`` (index i first); a Volume's array is ``(z, y, x)``: it is transposed.
        * nibabel's ``img.affine`` maps ``(i, j, k)`` to **RAS** millimetres; a Volume's spacing, origin and
          direction are **LPS** (ITK, DICOM): the affine is flipped in x and y (``diag(-1, -1, 1, 1) @ affine``),
          then ``spacing`` = its column lengths, ``direction`` = its columns over them, ``origin`` = its last column.

        The voxels are ``np.asarray(img.dataobj)`` (the header's scaling, scl_slope and scl_inter, applied) as
        float32, in a copy: the image and its data are never modified. The affine is nibabel's best one (the sform
        when its code is set, else the qform), which is what :func:`read_volume` reads too; a NIfTI image that
        records no orientation (sform and qform codes 0) lies at the origin along the LPS axes with its pixdim
        spacing, as :func:`read_volume` (ITK) reads it, not centred and flipped in x as nibabel's ``img.affine`` has
        it.

        Args:
            img: a nibabel spatial image with 3D data (NIfTI-1/2, MGH, Analyze, ...).
            padding_to_air: replace padding markers (below -1500 HU reaching a slice's edge, outside the scan
                circle) by air, as :func:`read_volume` does (:func:`replace_padding`); ``False`` keeps the voxels as
                stored.
            **metadata: the volume's metadata (``source`` defaults to the image's file name).

        Raises:
            InputError: nibabel is not installed; ``img`` is not a nibabel image; data that is not 3D (a 4D
                image with one volume: ``nibabel.funcs.squeeze_image(img)``; several: pick one, ``img.slicer[...,
                t]``) or not numeric.
            GeometryError: an affine with a zero or non-finite voxel size, or a singular one (as :class:`Volume`).
        """
        try:
            import nibabel as nib
        except ImportError:
            raise InputError("Volume.from_nibabel needs nibabel, which is not installed: pip install nibabel (or "
                             "read the file with DiffusionCore.read_volume(path), which needs no nibabel for NRRD, "
                             "MHA or DICOM)") from None  # fmt: skip
        if not isinstance(img, nib.spatialimages.SpatialImage):
            raise InputError(f"Volume.from_nibabel needs a nibabel image (nibabel.load(path)); got "
                             f"{type(img).__module__}.{type(img).__qualname__}. For a numpy array use "
                             "Volume(array_zyx, spacing, origin, direction); for a file, read_volume(path).")  # fmt: skip
        name = img.get_filename()
        source = str(metadata.get("source") or name or "nibabel image")
        shape = tuple(int(n) for n in img.shape)
        if len(shape) != 3:
            hint = ("nibabel.funcs.squeeze_image(img) drops the trailing axes of length 1"
                    if len(shape) > 3 and math.prod(shape[3:]) == 1 else
                    "pick one 3D volume first, e.g. img.slicer[..., 0]" if len(shape) > 3 else
                    "a CT volume has three axes")  # fmt: skip
            raise InputError(f"{source}: a volume needs 3D data; this nibabel image's data has shape {shape} "
                             f"(x, y, z, ...): {hint}")  # fmt: skip
        header = img.header
        if isinstance(img, nib.Nifti1Pair) and not int(header["sform_code"]) and not int(header["qform_code"]):
            # no orientation recorded (NIfTI's "method 1"): read as ITK, hence read_volume, reads it, at the origin
            # along the LPS axes; nibabel's img.affine would centre it and flip x (the Analyze convention)
            zooms = np.abs(np.asarray(header.get_zooms()[:3], dtype=np.float64))
            affine = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])  # RAS, the LPS identity once flipped below
        else:
            affine = np.asarray(img.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise GeometryError(f"{source}: the image's affine {affine.tolist()} is not a finite 4x4 matrix: fix the "
                                "header's sform or qform (e.g. with nibabel: img.set_sform(...)) and load it again")  # fmt: skip
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # nibabel's affine is RAS; a Volume's geometry is LPS
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        if not np.all(spacing > 0):
            raise GeometryError(f"{source}: the image's affine gives a voxel size of "
                                f"({', '.join(f'{v:g}' for v in spacing)}) mm (x, y, z): a zero voxel size has no "
                                "geometry; fix the header's sform or qform (or pixdim) and load it again")  # fmt: skip
        data = np.asarray(img.dataobj)
        if data.dtype.kind not in "biuf":
            raise InputError(f"{source}: the image holds {data.dtype} voxels, not numbers (an RGB or complex image?): "
                             "a CT volume holds one number per voxel, in HU")  # fmt: skip
        arr = np.array(data.T, dtype=np.float32, order="C")  # (x, y, z) -> (z, y, x), a copy of its own
        del data
        vol = cls(arr, tuple(spacing), tuple(lps[:3, 3]), lps[:3, :3] / spacing, {"source": source, **metadata})
        if padding_to_air:
            vol.array = replace_padding(vol.array, source)
        return vol


def _as_numpy(array: object) -> np.ndarray:
    """``array`` as a numpy array: a torch tensor (any device, ``requires_grad`` or not, any float or integer dtype)
    is detached and brought to the CPU, never changed itself; a CPU tensor that needs no conversion shares its memory,
    as a float32 numpy array does, and one that requires grad is copied, so that nothing writes into its graph."""
    if type(array).__module__.split(".")[0] != "torch":
        return np.asarray(array)
    import torch

    if not isinstance(array, torch.Tensor):
        return np.asarray(array)
    t = array.detach()
    if t.is_complex():
        raise InputError(f"a volume holds one real number per voxel (HU); got a complex tensor ({t.dtype}): pass "
                         "its magnitude (tensor.abs()) or real part (tensor.real)")  # fmt: skip
    if t.device.type == "meta":
        raise InputError("the tensor is on the 'meta' device: it holds no voxels (only a shape); compute it on a real "
                         "device first")  # fmt: skip
    dtype = t.dtype if t.dtype in (torch.float32, torch.float64) or not t.is_floating_point() else torch.float32
    t = t.to(device="cpu", dtype=dtype)  # bfloat16/float16 have no numpy dtype: float32 holds them exactly
    if array.requires_grad and t.data_ptr() == array.data_ptr():
        t = t.clone()  # the Volume must not share memory with a leaf of the caller's graph
    return t.numpy()


# -- checks ------------------------------------------------------------------------------------------
def check_image_shape(img: sitk.Image, source: str) -> None:
    """Refuse images that are not single-component 3D volumes with at least two slices on every axis."""
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        raise not_for_this_tool(InputError(
            f"{source} has {ncomp} components per voxel (RGB or vector image); a greyscale CT volume is "
            "needed. Export the CT itself (scalar HU values), not a screenshot or colour rendering."
        ))
    dim = img.GetDimension()
    size = img.GetSize()
    if dim == 2:
        raise not_for_this_tool(InputError(
            f"{source} is a 2D image ({size[0]}x{size[1]}); a 3D CT volume is needed. For a radiograph use "
            "the X-ray to CT tool (xray2ct); for a CT, load the whole series (the folder of DICOM slices)."
        ))
    if dim != 3:
        raise not_for_this_tool(InputError(
            f"{source} has {dim} dimensions (size {tuple(size)}); a 3D CT volume is needed. "
            "For a 4D (time or multi-phase) series, extract one phase first."
        ))
    if min(size) == 0:
        raise InputError(f"{source} is empty (size {tuple(size)}).")
    if min(size) < 2:
        raise not_for_this_tool(InputError(
            f"{source} has size {tuple(size)} (x, y, z): a single slice, not a volume. "
            "Load the whole series (all slices) instead."
        ))


#: Attribute set on a :class:`Volume` whose CT doubts were logged already (:func:`mark_ct_checked`).
_CT_TOLD = "_ct_doubts_told"


def mark_ct_checked(vol: Volume) -> Volume:
    """Record that ``vol``'s intensities were checked and any doubt logged, naming its file: the SR pipeline's own
    check then refuses what it refuses without logging the same doubt a second time."""
    setattr(vol, _CT_TOLD, True)
    return vol


def check_ct(vol: Volume | np.ndarray, source: str = "volume") -> list[str]:
    """Refuse non-finite volumes; return (and log) warnings for volumes that do not look like CT in HU.

    Args:
        vol: a Volume, or its voxel array (any shape and dtype, HU).
    """
    arr = vol.array if isinstance(vol, Volume) else np.asarray(vol)
    _require_finite(arr, source)
    return _ct_doubts(float(arr.min()), float(arr.max()), source, log=not getattr(vol, _CT_TOLD, False))


def _ct_doubts(lo: float, hi: float, source: str, log: bool = True) -> list[str]:
    """The warnings (logged unless ``log`` is False, and returned) for a finite volume whose values run from ``lo``
    to ``hi``."""
    warnings: list[str] = []
    if lo == hi:
        warnings.append(f"{source} is constant ({lo:g} everywhere): there is no image content to work with.")
    elif lo > -200.0 or hi < 0.0 or (hi - lo) < 200.0:
        warnings.append(
            f"{source} does not look like CT in Hounsfield units (values {lo:g} to {hi:g}; CT has air near "
            "-1000 and soft tissue near 0-100). MR or normalised images give meaningless results here."
        )
    for w in warnings if log else ():
        logger.warning(w)
    return warnings


def _require_finite(arr: np.ndarray, source: str) -> None:
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - np.count_nonzero(finite))
        if bad == arr.size:
            raise InputError(f"{source}: every voxel is NaN or infinite; the file holds no image data.")
        raise InputError(
            f"{source}: {bad} of {arr.size} voxels are NaN or infinite. Replace them (e.g. with -1024 HU for "
            "air) before running; the tool does not guess values for them."
        )


#: What a failed result's message ends with where the library refuses it (the commands add their own ending).
NOT_RETURNED = "; nothing was written or returned. Check the weights and options; if they are right, report it"


def require_finite_voxels(hu: np.ndarray, what: str, tail: str = NOT_RETURNED) -> None:
    """Refuse a result that holds NaN or infinite voxels (one pass, no scratch volume), before it is written or
    returned (an integer cast would turn NaN into 0 HU and hide the failure).

    Raises:
        NumericalError: naming how many voxels are not finite, then ``tail``.
    """
    if math.isfinite(float(hu.sum(dtype=np.float64))):
        return
    bad = int(np.count_nonzero(~np.isfinite(hu)))
    raise NumericalError(f"{what} holds {bad} NaN or infinite voxels (of {hu.size}): the computation failed "
                         f"numerically{tail}")  # fmt: skip


def require_ct(
    vol: Volume | np.ndarray,
    source: str = "volume",
    how_to_allow: str = "pass --allow-non-ct (allow_non_ct=True in Python)",
) -> None:
    """Refuse volumes a CT model cannot work on: non-finite voxels (see :func:`check_ct`), a constant
    volume, or intensities that are not CT in Hounsfield units.

    CT in HU always holds values below 0 (air near -1000, fat near -100) and spans hundreds of HU; MR,
    PET, normalised images ([0, 1], [-1, 1]) and CT stored without its rescale intercept (0..4095) do
    not.

    ``how_to_allow`` ends the refusal of non-CT intensities: the way the caller's front end runs it anyway.

    Raises:
        InputError: NaN/Inf voxels, a constant volume, or non-CT intensities.
    """
    arr = vol.array if isinstance(vol, Volume) else np.asarray(vol)
    _require_finite(arr, source)
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise InputError(
            f"{source} is constant ({lo:g} everywhere): there is no image content to work with. Check that "
            "the right file or series was exported."
        )
    if lo >= 0.0 or (hi - lo) < MIN_CT_RANGE_HU:
        raise not_for_this_tool(InputError(
            f"{source} does not look like CT in Hounsfield units (values {lo:g} to {hi:g}; CT has air near "
            "-1000 and soft tissue near 0-100): the model is trained on CT only, so MR, PET or normalised "
            "images give meaningless results. For a CT stored without its rescale intercept, fix the header "
            f"(e.g. subtract 1024); if this really is CT in HU, {how_to_allow}."
        ))
    # the milder doubts, as warnings, about what passes (refused volumes are not warned of), once per volume
    _ct_doubts(lo, hi, source, log=not getattr(vol, _CT_TOLD, False))


def replace_padding(arr: np.ndarray, source: str = "volume") -> np.ndarray:
    """Padding markers outside the scan circle (-2048, -3024, -32768, a DICOM PixelPaddingValue, ...) become air
    (-1024 HU), in place when ``arr`` is a writable float32 array of its own (a volume just read: no second copy of a
    large result), else in a float32 copy.

    Padding is what lies below :data:`PADDING_THRESHOLD_HU` *and* reaches the edge of its slice (array axis 0)
    through such voxels: the outside of the reconstruction circle (or of a smaller field of view) always does, in
    whichever plane the volume is stored, since the outside of a convex field of view is connected to the image's
    edge. Voxels that low inside the image (noise in the air or the lungs of a low-dose scan) are measurements and
    are kept. An info line names ``source`` and the number of voxels replaced (once per call, i.e. per volume).
    """
    return replace_padding_counted(arr, source)[0]


def replace_padding_counted(arr: np.ndarray, source: str = "volume") -> tuple[np.ndarray, int]:
    """:func:`replace_padding`, and how many voxels it set to air."""
    from scipy import ndimage

    own = arr.dtype == np.float32 and arr.flags.writeable and arr.flags.c_contiguous and arr.base is None
    out = arr if own else np.array(arr, dtype=np.float32, copy=True)
    if out.ndim != 3:
        below = out < PADDING_THRESHOLD_HU
        np.copyto(out, np.float32(AIR_HU), where=below)
        return out, int(np.count_nonzero(below))
    replaced = kept = 0
    for k in range(out.shape[0]):
        below = out[k] < PADDING_THRESHOLD_HU
        n_below = int(np.count_nonzero(below))
        if not n_below:
            continue
        labels, count = ndimage.label(below)  # 4-connected: isolated noise voxels do not chain up to the edge
        at_edge = np.zeros(count + 1, dtype=bool)
        at_edge[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
        at_edge[0] = False
        padding = at_edge[labels]
        out[k][padding] = np.float32(AIR_HU)
        n = int(np.count_nonzero(padding))
        replaced += n
        kept += n_below - n
    if replaced or kept:
        inside = (f"; {kept} voxel{'s' if kept != 1 else ''} that low inside the image (noise, not padding) kept as "
                  "read") if kept else ""  # fmt: skip
        logger.info("%s: %d voxels below %g HU reaching the image's edge (outside the scan circle) taken as padding "
                    "and set to air (%g HU)%s", source, replaced, PADDING_THRESHOLD_HU, AIR_HU, inside)  # fmt: skip
    return out, replaced


def thick_axis(vol: Volume | Grid, min_ratio: float = THICK_AXIS_MIN_RATIO) -> int | None:
    """Array axis (0=z, 1=y, 2=x) whose spacing is clearly larger than the other two, else ``None``.

    The through-plane axis of a thick-slice CT has a spacing at least ``min_ratio`` times the largest of
    the other two. ``None`` means the volume is (nearly) isotropic: nothing to super-resolve.
    """
    sp = np.asarray(vol.spacing_zyx)
    ax = int(np.argmax(sp))
    others = np.delete(sp, ax)
    if sp[ax] >= min_ratio * others.max():
        return ax
    return None


def suggested_factor(vol: Volume | Grid, axis: int | None = None) -> int:
    """Integer factor that brings the thick axis close to the in-plane spacing (1 when isotropic)."""
    ax = thick_axis(vol) if axis is None else axis
    if ax is None:
        return 1
    sp = np.asarray(vol.spacing_zyx)
    inplane = np.delete(sp, ax).max()
    return max(1, int(round(sp[ax] / inplane)))


# -- reading -----------------------------------------------------------------------------------------
def sitk_message(exc: Exception) -> str:
    """The substance of a SimpleITK exception, without ITK's source paths and object addresses."""
    text = str(exc).strip().splitlines()
    for line in text:
        if "Description:" in line or "ERROR" in line.upper():
            line = line.split("Description:")[-1].strip()
            return re.sub(r"^ITK ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", line)
    return text[-1] if text else type(exc).__name__


#: Words in ITK's console output that mean the voxel data were not read as the header describes them (MetaIO
#: prints "Uncompress failed" and reads on, leaving garbage voxels).
_ITK_READ_FAILURES = ("fail", "not read completely", "error", "cannot", "corrupt")
#: ITK's notes about what this module checks and reports itself, in its own words (a NIfTI sform that
#: contradicts the voxel size: :func:`_nifti_sform_geometry`); not repeated as warnings.
_ITK_HANDLED_HERE = ("sform",)


def itk_utf8_name(path: str | os.PathLike, error: type[DiffusionCoreError] = InputError) -> str:
    """``path`` as UTF-8 text, the encoding SimpleITK passes file names to ITK in.

    Under a locale whose encoding is not UTF-8 (``LC_ALL=C`` with ``PYTHONUTF8=0``), Python holds the non-ASCII
    bytes of a file name it found on disk as lone surrogates, which SimpleITK cannot convert: the process would
    abort in C++. Such a name whose bytes are UTF-8 is decoded here (ITK then opens the same bytes); any other (a
    Latin-1 name copied from a Windows share) is refused with ``error`` (an output's: :class:`OutputError`).

    Raises:
        InputError: the name's bytes are not UTF-8; the message names the path and what to do.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    raw = os.fsencode(text)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        utf8 = sys.getfilesystemencoding().lower().replace("-", "") == "utf8"
        how = ("Rename the file or folder with UTF-8 (e.g. ASCII) characters: its name is in another encoding "
               "(e.g. Latin-1, as a Windows share or an old USB stick may give it)") if utf8 else (
               "Rename the file or folder with UTF-8 (e.g. ASCII) characters, or run with a UTF-8 locale "
               "(PYTHONUTF8=1 or LANG=C.UTF-8)")  # fmt: skip
        # the name as every other message shows it (lone surrogates, \udce9), not in a second spelling
        raise error(f"cannot pass the file name {text} to ITK: it is not UTF-8 text. {how}.") from None


def itk_path(path: str | os.PathLike, error: type[DiffusionCoreError] = InputError) -> str:
    """``path`` as text ITK can open: UTF-8 (:func:`itk_utf8_name`) and, on Windows without the UTF-8 code page,
    ASCII (:func:`_itk_ascii_path`: the folder's or file's short 8.3 name).

    Raises:
        InputError: ``error``, naming the path and what to do: its name is not UTF-8, or on Windows it has
            characters the code page cannot spell and no ASCII short name.
    """
    text = itk_utf8_name(path, error)
    if not _itk_needs_ascii(text):
        return text
    spelled = _itk_ascii_path(text)
    if spelled is None:
        raise _no_ascii_spelling(text, error)
    return spelled


# -- Windows: ITK opens files by their name in the ANSI code page --------------------------------------------------
#: The Windows code page of UTF-8: with it active (Windows' "Beta: Use Unicode UTF-8 for worldwide language support",
#: or a program manifest that asks for it) ITK opens any name.
_UTF8_CODE_PAGE = 65001
#: Where to turn on the UTF-8 code page, as Windows 10 and 11 name the way there.
_UTF8_SETTING = ('turn on "Beta: Use Unicode UTF-8 for worldwide language support" (Windows Settings > Time & '
                 'language > Language & region > Administrative language settings > Change system locale) and '
                 'restart Windows')  # fmt: skip


def _on_windows() -> bool:
    """Whether this is Windows (a function, so that tests can take Windows' way on any system)."""
    return os.name == "nt"


def _windows_ansi_code_page() -> int:
    """The ANSI code page ITK's file names are read in on Windows (``GetACP``: 1252 in Western Europe, 65001 for
    UTF-8)."""
    import ctypes

    return int(ctypes.windll.kernel32.GetACP())  # type: ignore[attr-defined]


def _windows_short_path(path: str) -> str | None:
    """The 8.3 spelling of the existing file or folder ``path`` (``C:\\Users\\JOS~1``; a part without a short name
    stays long: 8.3 names can be turned off per volume), or None where Windows gives none."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    short_path_name = kernel32.GetShortPathNameW
    short_path_name.argtypes = (wintypes.LPCWSTR, wintypes.LPWSTR, wintypes.DWORD)
    short_path_name.restype = wintypes.DWORD
    size = short_path_name(path, None, 0)
    if not size:
        return None
    buffer = ctypes.create_unicode_buffer(size)
    written = short_path_name(path, buffer, size)
    return buffer.value if 0 < written < size else None


def _itk_needs_ascii(text: str) -> bool:
    """Whether ITK cannot open the path ``text`` as it is spelled: SimpleITK hands ITK the name in UTF-8 and ITK's
    readers and writers open it with the narrow (ANSI) fopen, so on Windows a non-ASCII name is not found unless the
    code page is UTF-8 (SimpleITK issues 651, 1255; ITK issue 4388)."""
    return not text.isascii() and _on_windows() and _windows_ansi_code_page() != _UTF8_CODE_PAGE


def _itk_ascii_path(text: str) -> str | None:
    """An ASCII spelling of the path ``text`` that opens the same file on Windows, or None where there is none.

    The folder is spelled by its short 8.3 name; so is the file itself when its own name is not ASCII, if that short
    name keeps what ITK recognises the format by (:func:`_short_name_keeps_format`). A file to be created has no
    short name yet: its name must be ASCII (:func:`write_volume` writes through an ASCII-named temporary file)."""
    folder, name = os.path.split(text)
    if name.isascii() or not os.path.exists(text):
        if not name.isascii():
            return None
        if folder.isascii():  # an ASCII folder, or none: the current one, which ITK opens from whatever its name
            return text
        short_folder = _windows_short_path(os.path.abspath(folder))
        return os.path.join(short_folder, name) if short_folder is not None and short_folder.isascii() else None
    short = _windows_short_path(os.path.abspath(text))
    if short is None or not short.isascii():
        return None
    return short if os.path.isdir(text) or _short_name_keeps_format(name, os.path.basename(short)) else None


def _short_name_keeps_format(name: str, short_name: str) -> bool:
    """Whether ITK still reads the file ``name`` by its 8.3 name ``short_name``: ITK picks some readers by the suffix
    (``.jpeg``), and NIfTI tells its kinds by the whole suffix, so ``CT~1.NII`` reads but ``CT~1.GZ`` (a ``.nii.gz``)
    and ``XR~1.JPE`` do not; ``.NRR`` reads, as the NRRD reader is named explicitly (:func:`image_io`)."""
    suffix, short_suffix = _suffix(Path(name)), Path(short_name).suffix.lower()
    return suffix == short_suffix or (image_io(name) == "NrrdImageIO" and suffix[:4] == short_suffix)


def _itk_ascii_alias(name: str) -> str:
    """``name`` in ASCII letters (``Müller.nii.gz`` -> ``Muller.nii.gz``, ``胸部.nrrd`` -> ``__.nrrd``): the name of
    the temporary file ITK writes where its code page cannot spell the output's own name (:func:`_itk_partial_file`)."""
    import unicodedata

    return "".join(ch if ch.isascii() else unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "_"
                   for ch in name)  # fmt: skip


def _no_ascii_spelling(
    path: str | os.PathLike, error: type[DiffusionCoreError], within: str | os.PathLike | None = None
) -> DiffusionCoreError:
    """The ``error`` for a path ITK cannot open on this Windows (:func:`_itk_needs_ascii`) for want of an ASCII
    spelling, naming its non-ASCII parts (those of ``within``, its folder for an output, where given) and the three
    ways out."""
    parts = _unspellable_parts(os.fspath(within if within is not None else path))
    named = " and ".join(f'"{part}"' for part in parts[:3]) or "its name"
    output = issubclass(error, OutputError)
    verb, move = ("cannot write", "write it") if output else ("could not read", "move the file")
    return error(
        f"{verb} {path}: ITK, which reads and writes the volume files, cannot open a path with {named} in it on this "
        f"Windows (it takes file names in the code page {_windows_ansi_code_page()}, not in Unicode), and Windows has "
        f"no short ASCII (8.3) name for {'them' if len(parts) > 1 else 'it'} that ITK can use. Rename {named} with "
        f"ASCII letters only, {move} to a folder whose path is ASCII only, or {_UTF8_SETTING}."
    )


def _unspellable_parts(text: str) -> list[str]:
    """The non-ASCII parts of the path ``text`` that ITK cannot be given in ASCII: those without a short 8.3 name
    (or, for a file, one that keeps its format: :func:`_short_name_keeps_format`); all non-ASCII parts where none of
    them can be told so (a path that does not exist)."""
    found, prefix = [], Path(os.path.abspath(text))
    for current in (prefix, *prefix.parents):
        if current.name.isascii():
            continue
        short = _windows_short_path(str(current)) if current.exists() else None
        name = os.path.basename(short) if short else ""
        if not (name.isascii() and name) or not (current.is_dir() or _short_name_keeps_format(current.name, name)):
            found.append(current.name)
    return found[::-1] or [part for part in Path(text).parts if not part.isascii()]


def _check_itk_can_write(p: Path) -> None:
    """Refuse, before any work, an output ITK could not create on this Windows (:func:`_itk_needs_ascii`): its folder
    needs an ASCII spelling (the file itself is written under an ASCII name, then renamed by Python, which takes any).
    Nothing happens elsewhere.

    Raises:
        OutputError: the folder has non-ASCII characters and no short 8.3 name; the message says what to do.
    """
    if not _itk_needs_ascii(str(p)):
        return
    folder = p.parent if str(p.parent) else Path(".")
    if _itk_ascii_path(str(folder / _itk_ascii_alias(p.name))) is None:
        raise _no_ascii_spelling(p, OutputError, within=folder)


def _itk_partial_file(final: Path, suffix: str) -> str:
    """:func:`~DiffusionCore.files.partial_file` for a file ITK writes: where ITK cannot create the output's own name
    (:func:`_itk_needs_ascii`), named after its ASCII alias (:func:`_itk_ascii_alias`) instead, in the same folder."""
    if _itk_needs_ascii(final.name):
        return partial_file(final.with_name(_itk_ascii_alias(final.name)), suffix)
    return partial_file(final, suffix)


def _itk_text(value: str) -> str:
    """``value`` (header text, e.g. an input's file name found on disk) as text SimpleITK can take: bytes kept as
    lone surrogates read as UTF-8, and any that are not escaped (``\\xe9``); never refused, as a file name is."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(value).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return value.encode("utf-8", "backslashreplace").decode("ascii")


def _itk(call, *args, reading: Path | None = None, handled: Sequence[str] = ()):
    """``call(*args)`` (a SimpleITK function) with ITK's own console output kept off the terminal
    (:func:`~DiffusionCore.files.native_stderr_captured`; logged at debug level). Text arguments (file names)
    pass through :func:`itk_path`.

    Args:
        reading: the file being read: output reporting a read failure (while ITK returns an image anyway)
            refuses it with an InputError naming what ITK said.
        handled: beginnings of ITK's lines that the caller checks and reports itself, in its own words (left out).
    """
    args = tuple(itk_path(a) if isinstance(a, str) else a for a in args)
    with native_stderr_captured() as native:
        result = call(*args)
    said = [_itk_substance(line) for line in native if not line.startswith("WARNING: In ")]
    said = [line for line in said if line]
    failures = [line for line in said if any(w in line.lower() for w in _ITK_READ_FAILURES)]
    if reading is not None and failures:
        raise InputError(
            f"could not read {reading}: ITK reported \"{failures[0]}\" while reading its voxels, so they are not "
            "what its header describes: the file is corrupt. Export or copy it again."
        )
    said = [line for line in said if not any(h in line for h in (*_ITK_HANDLED_HERE, *handled))]
    if reading is not None and said:  # a warning of ITK's about this file, in our words and format
        logger.warning("%s: %s (reported by ITK while reading it)", reading, "; ".join(dict.fromkeys(said)))
    return result


def _itk_substance(line: str) -> str:
    """An ITK console line without its object address (``ImageSeriesReader (0x55e5...): ``)."""
    return re.sub(r"^\w+ \(0x[0-9a-fA-F]+\):\s*", "", line).strip()


def _refuse_special_files(folder: Path) -> None:
    """Refuse a DICOM folder holding a file that is no regular file (a FIFO, a device, a socket), before GDCM's scan
    of the folder opens it: GDCM then leaves real slices out of the series and the refusal blames them."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        kind = not_regular_kind(folder / name)
        if kind and kind != "a folder":
            raise InputError(f"could not read the DICOM series in {folder}: {folder / name} is {kind}, not a regular "
                             "file, and reading it would hang or never end. Move it out of the folder (or copy the "
                             "series' files to a folder of their own) and try again.")  # fmt: skip


def _read_dicom_series(
    folder: Path, wanted: int | str | None = None, how_to_choose: str | None = None
) -> tuple[sitk.Image, dict]:
    series: dict[str, list[str]] = {}
    search_dirs = [folder] + sorted(p for p in folder.rglob("*") if p.is_dir())
    for d in search_dirs:
        _refuse_special_files(d)
        spelled = itk_path(d)  # Windows: the folder's short name where its code page cannot spell it
        try:
            ids = _itk(sitk.ImageSeriesReader.GetGDCMSeriesIDs, spelled)
        except RuntimeError:
            ids = ()
        for uid in ids:
            files = _respelled(_itk(sitk.ImageSeriesReader.GetGDCMSeriesFileNames, spelled, uid), spelled, str(d))
            if len(files) > len(series.get(uid, [])):
                series[uid] = files
    if not series:
        raise InputError(
            f"{folder} is a folder without a readable DICOM series. Point to the folder that holds the "
            "slices of one CT series (files ending in .dcm or without extension)."
        )
    # the CT series (or the one the user chose); the others (PET, a scout series) named
    chosen, note = choose_ct_series(folder, series, wanted=wanted, how_to_choose=how_to_choose)
    files = chosen.files
    meta: dict = {"series_uid": chosen.uid, "n_files": len(files)}
    if note:
        meta["note"] = note
    headers = {f: dicom_header(f) for f in files}  # each file's header read once, for every check below
    files = _without_localizers(files, headers, folder, meta)
    _check_identity(files, headers, folder)
    thickness = series_slice_thickness({f: _slice_thickness(headers[f]) for f in files}, f"the DICOM series in {folder}",
                                       meta)  # fmt: skip
    if thickness is not None:
        meta["slice_thickness_mm"] = thickness
    stored = series_stored_max_hu(headers[f] for f in files)
    if stored is not None:
        meta["stored_max_hu"] = stored
    positions = _slice_positions(files, headers, folder)
    _check_series_size(files, headers, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([itk_path(f) for f in files])
    try:  # ITK's "non uniform sampling" line is replaced by _note_uneven_positions' own (missing slices are refused)
        img = _itk(reader.Execute, reading=folder, handled=(_ITK_NON_UNIFORM,))
    except RuntimeError as exc:
        raise InputError(f"could not read the DICOM series in {folder}: {sitk_message(exc)}") from None
    _note_uneven_positions(positions, _tag_numbers(headers[files[0]], "0020|0037"), folder, meta)
    img = _regularize_gantry_tilt(img, positions, folder, meta)
    return img, meta


def _respelled(files: Sequence[str], spelled: str, folder: str) -> list[str]:
    """The files GDCM found in the folder it was given as ``spelled`` (its 8.3 name on Windows: :func:`itk_path`), in
    the folder's own spelling ``folder``, as messages name them; unchanged where the two are one (Linux, macOS)."""
    if not _itk_needs_ascii(folder) or spelled == folder:
        return list(files)
    return [folder + f[len(spelled):] if f.startswith(spelled) and f[len(spelled):][:1] in ("/", "\\") else f
            for f in files]  # fmt: skip


#: The beginning of ITK's warning about a series whose slice positions are not exactly evenly spaced (it shows for
#: a rounding of 0.00007 mm as for a missing slice): :func:`_note_uneven_positions` says what it means instead.
_ITK_NON_UNIFORM = "Non uniform sampling"

#: Slices closer than this share of the slice spacing to an evenly spaced grid are evenly spaced but for rounding: the
#: few decimals converters write positions with (0.00005 to 0.005 mm) stay far below it, and a slice placed a
#: hundredth of a spacing off is moved much less than its own slice profile can resolve, so nothing is said.
#: Further off (up to :data:`_MAX_SPACING_DEVIATION`, beyond which the series is refused) a note says how far.
SLICE_POSITION_ROUNDING = 0.01


def _note_uneven_positions(positions: np.ndarray, iop: np.ndarray | None, folder: Path, meta: dict) -> None:
    """Say (warning; ``meta["slice_position_deviation_mm"]``) how far the slices of a series lie from an evenly
    spaced grid along their normal when that is more than :data:`SLICE_POSITION_ROUNDING` of the spacing: ITK stacks
    them at their mean spacing (the first to the last slice's distance over the number of steps), so each slice is
    placed that far at most from where it was acquired."""
    if iop is None or iop.shape != (6,) or len(positions) < 3:
        return
    along = np.sort(positions @ np.cross(iop[:3], iop[3:]))
    mean = float(along[-1] - along[0]) / (len(along) - 1)
    deviation = float(np.max(np.abs(along - (along[0] + mean * np.arange(len(along))))))
    if mean <= 0 or deviation <= SLICE_POSITION_ROUNDING * mean:
        return
    meta["slice_position_deviation_mm"] = round(deviation, 4)
    logger.warning(
        "the slices of the DICOM series in %s lie up to %.2g mm (%.1f%% of their spacing) from an evenly spaced grid "
        "along their normal (ImagePositionPatient): stacked at their mean spacing, %.4g mm, so each slice is placed at "
        "most %.2g mm from where it was acquired", folder, deviation, 100 * deviation / mean, mean, deviation,
    )  # fmt: skip


def series_slice_thickness(
    values: Mapping[str, float | None], series: str, meta: dict | None = None
) -> float | None:
    """The SliceThickness (mm) of a series from that of each of its files (``values``: file -> thickness, None where a
    file gives none): the value most files give. Files that disagree (beyond rounding) hint at a series mixing two
    reconstructions; a warning names the values, each with how many files give it and one of them, and ``meta`` (when
    given) records them as ``slice_thickness_values_mm`` (value -> number of files)."""
    given = {f: round(v, 3) for f, v in values.items() if v is not None}  # equal but for rounding: one value
    if not given:
        return None
    counts = Counter(given.values())
    common = counts.most_common()
    value = next(values[f] for f, v in given.items() if v == common[0][0])  # as written, not rounded
    if len(common) > 1:
        example = {}
        for f, v in given.items():
            example.setdefault(v, Path(f).name)
        shown = "; ".join(
            f"{v:g} mm in {n} file{'s' if n != 1 else ''} (e.g. {example[v]})" for v, n in common[:4]
        )
        more = f"; and {len(common) - 4} other values" if len(common) > 4 else ""
        logger.warning(
            "%s: its files give different slice thicknesses (SliceThickness): %s%s. Taken as %g mm, the value most "
            "files give; different thicknesses in one series hint at two reconstructions mixed in one folder: check "
            "that it holds one series only", series, shown, more, value,
        )  # fmt: skip
        if meta is not None:
            meta["slice_thickness_values_mm"] = {f"{v:g}": n for v, n in common}
    return float(value)


def _slice_thickness(r: sitk.ImageFileReader) -> float | None:
    """SliceThickness (0018,0050) in mm of a DICOM slice's header, or None when it has no usable value."""
    try:
        value = float(r.GetMetaData("0018|0050").strip()) if r.HasMetaDataKey("0018|0050") else 0.0
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _stored_max_hu(r: sitk.ImageFileReader) -> float | None:
    """The highest HU a DICOM slice can hold: the largest pixel value its BitsStored (0028,0101) and
    PixelRepresentation (0028,0103) allow, rescaled by its RescaleSlope and RescaleIntercept; None when the header
    does not say (or says something unusable)."""

    def number(key: str, default: float | None) -> float | None:
        values = _tag_numbers(r, key)
        return default if not r.HasMetaDataKey(key) else (float(values[0]) if values is not None else None)

    bits, signed = number("0028|0101", None), number("0028|0103", 0.0)
    slope, intercept = number("0028|1053", 1.0), number("0028|1052", 0.0)
    if bits is None or signed is None or slope is None or intercept is None or not 1 <= bits <= 32 or slope <= 0:
        return None
    top = 2.0 ** (int(bits) - 1) - 1 if signed else 2.0 ** int(bits) - 1
    value = top * slope + intercept
    return value if math.isfinite(value) else None


def series_stored_max_hu(headers: Iterable[sitk.ImageFileReader]) -> float | None:
    """The highest HU any slice of a series can hold (:func:`_stored_max_hu`; the largest over its files, which may
    rescale differently), or None when a file does not say: the scanner's cap on every thin slice it makes, which the
    consistency step keeps (:func:`DiffusionCore.degrade.physical_ceiling`)."""
    values = [_stored_max_hu(r) for r in headers]
    if not values or any(v is None for v in values):
        return None
    return max(v for v in values if v is not None)


def _slice_headers(files: list[str]) -> dict[str, sitk.ImageFileReader]:
    """The headers of a CT series given as its files (e.g. those a Slicer node was loaded from), localizers and files
    that cannot be read left out: the volume itself comes from elsewhere, so such a file only lacks a note."""
    headers = {}
    for file in files:
        try:
            reader = dicom_header(file)
        except (InputError, ResourceError):  # a deflate bomb: no note
            continue
        if not _header_is_localizer(reader):
            headers[file] = reader
    return headers


def dicom_stored_max_hu(files: list[str]) -> float | None:
    """:func:`series_stored_max_hu` of a CT series given as its files (:func:`_slice_headers`); None when no file can
    be read or one does not say."""
    return dicom_series_facts(files)[1]


def dicom_series_facts(files: list[str]) -> tuple[float | None, float | None]:
    """What a CT series given as its files (e.g. those a Slicer node was loaded from) says that its voxels do not,
    each file's header read once: its SliceThickness (:func:`dicom_slice_thickness`) and the highest HU its files can
    store (:func:`dicom_stored_max_hu`)."""
    headers = _slice_headers(files)
    values = {file: _slice_thickness(reader) for file, reader in headers.items()}
    series = f"the DICOM series of {Path(files[0]).parent}" if files else "the series"
    return series_slice_thickness(values, series), series_stored_max_hu(headers.values())


def dicom_slice_thickness(files: list[str]) -> float | None:
    """The SliceThickness in mm of a CT series given as its files (e.g. those a Slicer node was loaded from): the
    value most of its slices that are not localizers give (:func:`series_slice_thickness`, which warns when they
    differ); None when no file says, or none can be read (the file then only lacks this note: the volume itself
    comes from elsewhere)."""
    return dicom_series_facts(files)[0]


def is_localizer(image_type: str) -> bool:
    """Whether a DICOM ImageType (0008,0008) value (``"ORIGINAL\\PRIMARY\\LOCALIZER"``) marks a localizer: a CT
    topogram or scout, a projection image rather than a slice."""
    return "LOCALIZER" in [v.strip() for v in image_type.upper().split("\\")]


def _header_is_localizer(r: sitk.ImageFileReader) -> bool:
    """:func:`is_localizer` of a DICOM file's header (its ImageType)."""
    return is_localizer(r.GetMetaData("0008|0008") if r.HasMetaDataKey("0008|0008") else "")


def _without_localizers(
    files: list[str], headers: dict[str, sitk.ImageFileReader], folder: Path, meta: dict
) -> list[str]:
    """The series' files less its localizer images (ImageType LOCALIZER: the topogram or scout that some scanners
    store in the CT series itself), which are projections, not slices of the volume; the run's notes say so."""
    kept = []
    for f in files:
        if not _header_is_localizer(headers[f]):
            kept.append(f)
    if not kept:
        raise localizers_only_error(folder)
    if len(kept) < len(files):
        msg = (f"{folder}: left out {len(files) - len(kept)} localizer image(s) (topogram or scout) of the series; "
               "they are projections, not slices")
        logger.info(msg)
        meta["note"] = f"{meta['note']} {msg}." if meta.get("note") else msg + "."
        meta["n_files"] = len(kept)
    return kept


#: SimpleITK's keys of the attributes of :data:`~DiffusionCore.dicom_in.SERIES_IDENTITY`.
_IDENTITY_TAGS = {"PatientID": "0010|0020", "StudyInstanceUID": "0020|000d", "FrameOfReferenceUID": "0020|0052"}


def _check_identity(files: Sequence[str], headers: dict[str, sitk.ImageFileReader], folder: Path) -> None:
    """Refuse a series whose slices mix patients, studies or frames of reference
    (:func:`~DiffusionCore.dicom_in.check_series_identity`): GDCM groups files by SeriesInstanceUID alone."""
    values = {f: {keyword: headers[f].GetMetaData(key) if headers[f].HasMetaDataKey(key) else ""
                  for keyword, key in _IDENTITY_TAGS.items()} for f in files}  # fmt: skip
    check_series_identity(values, str(folder))


#: Slices whose orientations (ImageOrientationPatient) differ by more than this are not one volume.
_MAX_ORIENTATION_DIFFERENCE = 1e-3


def _tag_numbers(reader: sitk.ImageFileReader, key: str) -> np.ndarray | None:
    """A DICOM header's multi-valued decimal tag (``"a\\b\\c"``) as numbers, or None when absent or not numbers."""
    if not reader.HasMetaDataKey(key):
        return None
    try:
        return np.array([float(v) for v in reader.GetMetaData(key).split("\\")])
    except ValueError:
        return None


def dicom_image_position(file: str) -> np.ndarray | None:
    """ImagePositionPatient (LPS mm) of a DICOM file, read from its header alone; None when the header does not record
    a usable one or cannot be read."""
    try:
        position = _tag_numbers(dicom_header(file), "0020|0032")
    except (InputError, ResourceError):  # a deflate bomb: no note
        return None
    return position if position is not None and position.shape == (3,) and np.all(np.isfinite(position)) else None


def _slice_positions(files: Sequence[str], headers: dict[str, sitk.ImageFileReader], folder: Path) -> np.ndarray:
    """ImagePositionPatient of every file, ``(n, 3)`` in file order (which is the array's slice order). Refuses
    series whose slices do not record their position and orientation, series with missing or doubled slices (a
    gap or a repeat along the slice normal), unevenly spaced ones and series that mix slice orientations."""
    if len(files) < 2:
        raise InputError(f"the DICOM series in {folder} has only {len(files)} slice; a volume needs several.")
    positions = []
    first_iop = None
    for n, f in enumerate(files):
        ipp, iop = _tag_numbers(headers[f], "0020|0032"), _tag_numbers(headers[f], "0020|0037")
        if ipp is None or iop is None or ipp.shape != (3,) or iop.shape != (6,) or not np.all(np.isfinite(ipp)):
            raise InputError(
                f"the DICOM series in {folder} does not record where its slices lie: {Path(f).name} (slice {n + 1}) "
                "has no usable ImagePositionPatient and ImageOrientationPatient, so the slices' spacing, order and "
                "orientation are unknown (ITK would stack them 1 mm apart). Export the series with its geometry, or "
                "convert it to NIfTI or NRRD with its slice spacing set."
            )
        if first_iop is None:
            first_iop = iop
        elif np.max(np.abs(iop - first_iop)) > _MAX_ORIENTATION_DIFFERENCE:
            angle = max(_angle_deg(iop[:3], first_iop[:3]), _angle_deg(iop[3:], first_iop[3:]))
            raise InputError(
                f"the DICOM series in {folder} mixes slice orientations: {Path(f).name} (slice {n + 1}) is "
                f"turned {angle:.1f} degrees from the first slice, so the slices do not form one volume "
                "(a localizer or a reformatted image mixed in?). Keep only the slices of one acquisition."
            )
        positions.append(ipp)
    pos = np.asarray(positions)
    normal = np.cross(first_iop[:3], first_iop[3:])
    order = np.argsort(pos @ normal, kind="stable")
    steps = np.diff((pos @ normal)[order])
    same = np.flatnonzero(steps <= 1e-6)
    if same.size:
        raise _same_position_error(files[order[same[0]]], files[order[same[0] + 1]], len(same), folder)
    median = float(np.median(steps))
    worst = int(np.argmax(steps))
    big = steps > 1.5 * median
    if big.any() and not np.any(big[1:] & big[:-1]):  # isolated gaps; a run of wider steps is a second spacing
        damaged = unread_files_note(list(files))  # a slice file cut short, which the series reader left out
        raise InputError(
            f"the DICOM series in {folder} is missing slices: a gap of {steps[worst]:.2f} mm after slice "
            f"{worst + 1} where the spacing is {median:.2f} mm.{damaged or ' Re-export the complete series.'}"
        )
    _check_even_spacing(np.sort(pos @ normal), steps, folder)
    return pos


def _same_position_error(first: str, second: str, pairs: int, folder: Path) -> InputError:
    """The refusal of a series holding two slices at one position (``first`` and ``second``; ``pairs`` positions
    hold two), naming both files: identical pixel data are one slice stored twice (a PACS re-send or a repeated copy,
    under a new SOPInstanceUID), different images two acquisitions or reconstructions mixed in one series."""
    names = [os.path.relpath(f, folder) if os.path.abspath(f).startswith(os.path.abspath(folder)) else Path(f).name
             for f in (first, second)]  # fmt: skip
    more = f" ({pairs - 1} other position{'s' if pairs > 2 else ''} hold two slices too)" if pairs > 1 else ""
    if _same_pixels(first, second):
        return InputError(
            f"the DICOM series in {folder} holds the same slice twice: {names[0]} and {names[1]} lie at the same "
            f"position with identical pixel data{more}, a duplicate file (an image sent twice by the PACS, or copied "
            f"twice). Remove one of them (e.g. {names[1]}) from the folder and run again."
        )
    return InputError(
        f"the DICOM series in {folder} has two different slices at the same position: {names[0]} and {names[1]} "
        f"hold different images there{more}, so it mixes several series or acquisitions. Separate them into one "
        "folder per series."
    )


def _same_pixels(first: str, second: str) -> bool:
    """Whether two DICOM files hold the same image (size and values in HU); False when either cannot be read."""
    try:
        a, b = (sitk.GetArrayFromImage(_itk(sitk.ReadImage, f)) for f in (first, second))
    except RuntimeError:
        return False
    return a.shape == b.shape and bool(np.array_equal(a, b))


def check_series_slices(files: Sequence[str], series: str) -> None:
    """The checks reading a DICOM series makes on where its slices lie (each records its position and orientation;
    no slice missing or doubled; one orientation; one slice spacing), on the headers of ``files`` alone, so that a
    front end can refuse the series before a job reads it. ``series`` names it in the messages (a folder, or the
    volume's name in 3D Slicer).

    Raises:
        InputError: what reading the series would refuse, in the same words.
    """
    _slice_positions(list(files), {f: dicom_header(f) for f in files}, Path(series))


#: Slices further than this fraction of the mean slice spacing from where an evenly spaced stack puts them are
#: not one regular volume (the grid would misplace them); closer, it is rounding or jitter in the positions.
_MAX_SPACING_DEVIATION = 0.1


def _check_even_spacing(along: np.ndarray, steps: np.ndarray, folder: Path) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal (``along``: their sorted positions,
    ``steps`` the differences): a volume has one slice spacing, and ITK would stack them at their mean spacing,
    placing some slices millimetres away from where they were acquired (a protocol with two slice spacings, e.g.
    5 mm through the posterior fossa and 10 mm above it; a series merged from two reconstructions)."""
    mean = float(along[-1] - along[0]) / (len(along) - 1)
    off = np.abs(along - (along[0] + mean * np.arange(len(along))))
    worst = int(np.argmax(off))
    if off[worst] <= _MAX_SPACING_DEVIATION * mean:
        return
    lo, hi = int(np.argmin(steps)), int(np.argmax(steps))
    raise InputError(
        f"the slices of the DICOM series in {folder} are not evenly spaced: {steps[lo]:.2f} mm apart after slice "
        f"{lo + 1} but {steps[hi]:.2f} mm after slice {hi + 1} (sorted along the slice normal). A volume has one "
        f"slice spacing, so slice {worst + 1} would be placed {off[worst]:.1f} mm from where it was acquired. Put "
        "the slices of each spacing in their own folder (e.g. the two parts of a protocol with two slice spacings) "
        "and run each."
    )


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def _regularize_gantry_tilt(img: sitk.Image, positions: np.ndarray, folder: Path, meta: dict) -> sitk.Image:
    """A gantry-tilted series (the step between slices is not along the slice normal) resampled onto an
    orthogonal grid, with a warning naming the tilt; other series are returned as read.

    ITK stacks a tilted series as if it were orthogonal: the slice spacing becomes the table step (too long
    by 1 / cos(tilt)) and the in-plane drift of the slices is dropped. Here each slice is shifted within its
    own plane to where its ImagePositionPatient puts it (see :func:`_tilt_corrected`)."""
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = img.GetSpacing()
    corrected = _tilt_corrected(sitk.GetArrayViewFromImage(img), positions, direction, spacing[:2],
                                f"the DICOM series in {folder}", meta)  # fmt: skip
    if corrected is None:
        return img
    arr, origin, regular, normal_spacing = corrected
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing((spacing[0], spacing[1], normal_spacing))
    out.SetOrigin(origin)
    out.SetDirection(tuple(float(v) for v in regular.ravel()))
    return out


def _tilt_corrected(
    array: np.ndarray, positions: np.ndarray, direction: np.ndarray, spacing_xy: Sequence[float], what: str, meta: dict
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray, float] | None:
    """A gantry-tilted stack (``array`` (z, y, x), slice k's first pixel at ``positions[k]`` LPS) resampled onto an
    orthogonal grid, or None when the slices lie along their normal. Each slice is shifted within its own plane to
    where its position puts it (:func:`geometry.resample_gantry_tilt`), so every voxel lands at its physical
    position; slices are never mixed. A warning names the tilt (``meta`` records it). For a classic series and an
    enhanced multi-frame CT alike.

    Returns:
        ``(array, origin LPS, direction 3x3, slice spacing along the normal)``.

    Raises:
        InputError: slices that drift, but not along one line (no single geometry places every voxel).
        ResourceError: the widened grid does not fit in memory.
    """
    tilt = gantry_tilt(positions, direction, spacing_xy)
    if tilt is None:
        return None
    if tilt.jitter:  # rounding in the positions, not a tilt: the slices stay on their own pixel grid
        pixels = tilt.drift_mm / min(spacing_xy)
        msg = (f"the slices of {what} lie up to {tilt.drift_mm:.2g} mm ({pixels:.2f} pixel) off the first slice's "
               "pixel grid within their plane, scattered rather than drifting with the distance as a gantry tilt "
               "would (ImagePositionPatient): taken as rounding, the slices are read on the first slice's pixel "
               "grid, without resampling")  # fmt: skip
        logger.info(msg)
        meta["position_jitter_mm"] = round(tilt.drift_mm, 4)
        meta["geometry_note"] = msg
        return None
    if tilt.off_line_mm > POSITION_TOL_VOXELS * min(spacing_xy):
        raise InputError(
            f"the slices of {what} do not follow one line: their positions "
            f"(ImagePositionPatient) drift within the slice plane by up to {tilt.drift_mm:.1f} mm, and not "
            f"in proportion to their distance (one lies {tilt.off_line_mm:.2f} mm off the straight line "
            "fitting them), so no single geometry places every voxel. Re-export the series from the scanner "
            "or PACS."
        )
    from .files import check_memory_for

    lo, hi = tilt.shifts_ij.min(axis=0), tilt.shifts_ij.max(axis=0)
    nz, ny, nx = array.shape
    voxels = (nx + hi[0] - lo[0] + 2) * (ny + hi[1] - lo[1] + 2) * nz
    check_memory_for(
        int(voxels) * _READ_BYTES_PER_VOXEL,
        f"resampling the gantry-tilted {what.removeprefix('the ')}",
        "crop the series or re-export it without the tilt",
    )
    arr, (i0, j0) = resample_gantry_tilt(array, tilt, fill=AIR_HU)
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    origin = positions[0] + i0 * spacing_xy[0] * d[:, 0] + j0 * spacing_xy[1] * d[:, 1]
    table = float(np.linalg.norm(positions[-1] - positions[0])) / (nz - 1)
    msg = (
        f"{what} was acquired with a gantry tilt of {tilt.angle_deg:.1f} degrees (its "
        f"slices drift {tilt.drift_mm:.1f} mm within their plane and lie {tilt.normal_spacing:.3g} mm apart "
        f"along their normal, {table:.3g} mm along the table): resampled onto an orthogonal grid of "
        f"{arr.shape[2]}x{arr.shape[1]}x{arr.shape[0]} voxels (x, y, z), each slice shifted within its own "
        f"plane (linear interpolation); beyond a slice's field of view the grid holds air ({AIR_HU:g} HU)."
    )
    logger.warning(msg)
    meta["gantry_tilt_deg"] = round(tilt.angle_deg, 3)
    meta["geometry_note"] = msg
    return arr, tuple(float(v) for v in origin), tilt.direction, float(tilt.normal_spacing)


def _nifti1_spacing_fields(p: Path) -> tuple[list[float], int] | None:
    """The spatial voxel size (pixdim) and sform_code of a NIfTI-1 file as stored (ITK and nibabel replace a
    zero pixdim by 1 when they read it), or ``None`` when the header cannot be read or is not NIfTI-1."""
    import gzip
    import struct
    import zlib

    try:
        opener = gzip.open if _suffix(p) == ".nii.gz" else open
        with opener(p, "rb") as f:
            raw = f.read(348)
    except (OSError, EOFError, zlib.error):
        return None  # unreadable: the reader says so
    if len(raw) < 348:
        return None
    for endian in ("<", ">"):
        if struct.unpack_from(f"{endian}i", raw, 0)[0] == 348:
            break
    else:
        return None  # not NIfTI-1 (NIfTI-2 or not NIfTI at all): the reader decides
    ndim = struct.unpack_from(f"{endian}h", raw, 40)[0]
    pixdim = struct.unpack_from(f"{endian}8f", raw, 76)
    sform_code = struct.unpack_from(f"{endian}h", raw, 254)[0]
    return [float(v) for v in pixdim[1 : 1 + max(0, min(3, ndim))]], int(sform_code)


def _check_nifti_spacing(p: Path) -> None:
    """Refuse a NIfTI-1 file without sform whose voxel size (pixdim) is zero or not finite: ITK and nibabel
    both silently replace it by 1 mm, which would give the volume a made-up geometry. (With an sform, the
    sform gives the geometry: :func:`_nifti_sform_geometry`.)"""
    fields = _nifti1_spacing_fields(p)
    if fields is None:
        return
    spatial, sform_code = fields
    if sform_code == 0 and any(v == 0.0 or not np.isfinite(v) for v in spatial):
        raise GeometryError(
            f"{p} records a voxel spacing of ({', '.join(f'{v:g}' for v in spatial)}) mm (pixdim): zero or undefined spacing has no "
            "geometry to work with (readers would silently assume 1 mm). Fix the spacing in the header, e.g. "
            "in 3D Slicer (Volumes > Volume Information) or with nibabel, and save the file again."
        )


def _nifti_sform_geometry(img: sitk.Image, p: Path, meta: dict) -> sitk.Image:
    """``img`` (as ITK read the NIfTI file ``p``) with the geometry of the file's sform when it has a valid
    one (sform_code > 0) that ITK's geometry contradicts, as nibabel and 3D Slicer read it.

    ITK takes the voxel size from pixdim even when the sform says otherwise (a pixdim of 0 becomes 1 mm), and
    falls back to the qform for a sheared sform; either would misplace voxels by up to the whole extent."""
    import nibabel as nib

    if img.GetDimension() != 3:
        return img
    try:
        header = nib.load(str(p)).header
        sform, code = header.get_sform(coded=True)
        qform, qcode = header.get_qform(coded=True)
    except Exception:  # the checks before this one have read the header: nothing to add here
        return img
    if not code or sform is None or not np.all(np.isfinite(sform)):
        return img
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(sform, dtype=np.float64)  # nibabel's affine is RAS
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    degenerate = abs(np.linalg.det(lps[:3, :3])) < 1e-12 * float(np.prod(spacing))
    if not np.all((spacing > 0) & np.isfinite(spacing)) or degenerate:
        return img  # a degenerate sform holds no geometry; ITK's reading stands
    itk_matrix = index_to_physical(img.GetSpacing(), img.GetOrigin(), np.reshape(img.GetDirection(), (3, 3)))
    shape = tuple(reversed(img.GetSize()))
    moved = grid_distance_mm(itk_matrix, lps, shape)
    if moved <= POSITION_TOL_VOXELS * float(spacing.min()):
        _note_qform_disagreement(p, qform, qcode, lps, shape, float(spacing.min()), meta)
        return img
    fields = _nifti1_spacing_fields(p)
    pixdim = fields[0] if fields else img.GetSpacing()
    msg = (
        f"{p}: the header's voxel size (pixdim {', '.join(f'{v:g}' for v in pixdim)} mm) or qform "
        f"contradicts its sform (voxel size {', '.join(f'{v:.4g}' for v in spacing)} mm), which would move "
        f"voxels by up to {moved:.1f} mm; using the sform, as nibabel and 3D Slicer do."
    )
    logger.warning(msg)
    meta["geometry_note"] = msg
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    img.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))
    return img


def _note_qform_disagreement(p: Path, qform: np.ndarray | None, qcode: int, sform_lps: np.ndarray,
                             shape: tuple[int, ...], least_spacing: float, meta: dict) -> None:
    """Warn (and note in ``meta``) when the NIfTI file ``p`` holds a valid qform that places the voxels elsewhere than
    its sform, which is read (as nibabel, ITK and 3D Slicer read it): a viewer that reads the qform shows the input
    elsewhere than the result, whose qform and sform agree."""
    if not qcode or qform is None or not np.all(np.isfinite(qform)):
        return
    q_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(qform, dtype=np.float64)
    apart = grid_distance_mm(q_lps, sform_lps, shape)
    if apart <= POSITION_TOL_VOXELS * least_spacing:
        return
    msg = (f"{p}: its qform and sform place the voxels up to {apart:.1f} mm apart; the sform is read, as nibabel, ITK "
           "and 3D Slicer read it (a viewer that reads the qform shows this input elsewhere; the result's qform and "
           "sform agree)")  # fmt: skip
    logger.warning(msg)
    meta.setdefault("geometry_note", msg)


def _check_nifti(p: Path) -> np.ndarray | None:
    """Checks ITK's NIfTI reader skips: it reads a truncated file without complaint (missing voxels become
    0) and turns NaN into 0. Raises InputError for a truncated file; for float data returns the boolean
    mask ``(z, y, x)`` of non-finite voxels when there are any, else ``None``."""
    import gzip
    import zlib

    import nibabel as nib

    _check_nifti_spacing(p)
    try:
        img = nib.load(str(p))
        hdr = img.header
        shape = [int(v) for v in hdr.get_data_shape()]
        voxels = math.prod(shape)  # Python ints: a corrupt header cannot overflow this
        expected = int(hdr.get_data_offset()) + voxels * hdr.get_data_dtype().itemsize
    except Exception as exc:  # nibabel raises several types for a bad header
        raise InputError(f"could not read {p}: {exc}. The file is not a valid NIfTI image.") from None
    if _suffix(p) == ".nii.gz":
        size = 0
        try:
            with gzip.open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    size += len(chunk)
        except EOFError:
            size = -1
        except (OSError, zlib.error) as exc:  # a wrong byte or a failed CRC-32: not an incomplete copy
            raise InputError(_corrupt_message(p, "gzip", str(exc))) from None
    else:
        size = p.stat().st_size
    if size < expected:
        raise InputError(
            f"could not read {p}: the file is truncated (incomplete copy or download). Copy it again."
        )
    if hdr.get_data_dtype().kind != "f":
        return None
    from .files import check_memory_for

    check_memory_for(voxels * 2 * hdr.get_data_dtype().itemsize, f"checking {p.name} for NaN voxels", "crop the volume")
    try:
        bad = ~np.isfinite(np.asanyarray(img.dataobj))
    except Exception as exc:  # a header that passed the size check but still does not describe the data
        raise InputError(f"could not read {p}: {exc}. The file is not a valid NIfTI image.") from None
    return bad.T.copy() if bad.any() else None


#: Bytes per voxel while reading a DICOM series (or resampling a gantry-tilted one): its slices' pixels (up to 8
#: bytes), the float32 array and a copy. Not re-measured; a single file's cost is :func:`_read_bytes_per_voxel`'s.
_READ_BYTES_PER_VOXEL = 16

#: What reading a single file (NIfTI, NRRD, MetaImage) needs per voxel besides its stored pixels' own two copies
#: (ITK's image and numpy's copy of it): the float32 array (none more for a float32 file: it is numpy's copy itself),
#: and a margin for the padding and CT checks' boolean masks (1 byte each, one at a time).
_READ_MARGIN_BYTES_PER_VOXEL = 2


def _read_bytes_per_voxel(itemsize: int, is_float32: bool) -> int:
    """Host memory reading a single volume file needs per voxel stored as ``itemsize``-byte values: ITK's image and
    numpy's copy of it (``2 x itemsize``), the float32 array (``4``, unless the file is float32 already) and a margin.

    Measured on 2026-12-07 with ``read_volume`` alone (``ru_maxrss`` after the read less before it, in a process that
    has imported torch and DiffusionCore, 1 thread; probe 46's files): int16 ``.nii.gz`` of 78.6 M and 314.6 M voxels
    8.17 and 8.04 bytes per voxel (0.64 and 2.53 GB), float32 ``.nii.gz`` of 67.1 M and 251.7 M voxels 8.21 and 8.05.
    The model says 8 for both; with the margin the check counts 10 (22-25 % above). The flat 16 it replaces refused
    int16 files that fit (512x512x300 under a 1 GiB limit); a float64 file needs 22.
    """
    return 2 * int(itemsize) + (0 if is_float32 else 4) + _READ_MARGIN_BYTES_PER_VOXEL


#: Bytes per stored component of ITK's scalar and vector pixel types (any other type: 8, the widest).
_ITK_COMPONENT_BYTES: dict[int, int] = {
    **dict.fromkeys((sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkVectorUInt8, sitk.sitkVectorInt8), 1),
    **dict.fromkeys((sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkVectorUInt16, sitk.sitkVectorInt16), 2),
    **dict.fromkeys((sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkFloat32, sitk.sitkVectorUInt32, sitk.sitkVectorInt32,
                     sitk.sitkVectorFloat32), 4),
}


#: MetaImage files with more dimensions than this are refused before ITK parses them.
_MAX_METAIMAGE_DIMS = 8


def check_metaimage_header(p: Path) -> None:
    """Validate the text header of a MetaImage file (``.mha`` / ``.mhd``) before ITK reads it: ITK's
    MetaIO crashes the whole process (segmentation fault) on a header whose ``NDims`` is negative or huge.

    Raises:
        InputError: ``NDims`` or ``DimSize`` is missing, not an integer, or out of range.
    """
    if _suffix(p) not in (".mha", ".mhd"):
        return
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise InputError(f"could not read {p}: {exc.strerror or exc}") from None
    fields: dict[str, str] = {}
    for raw_line in head.split(b"\n"):
        key, sep, value = raw_line.decode("latin-1").partition("=")
        if not sep:
            continue
        key = key.strip().lower()
        fields.setdefault(key, value.strip())
        if key == "elementdatafile":
            break
    bad = f"{p} is not a valid MetaImage file"
    try:
        ndims = int(fields["ndims"].split()[0])
    except (KeyError, ValueError, IndexError):
        raise InputError(f"{bad} (no valid NDims in its header); the file is corrupt. Export it again.") from None
    if not 1 <= ndims <= _MAX_METAIMAGE_DIMS:
        raise InputError(f"{bad} (NDims = {ndims} in its header); the file is corrupt. Export it again.")
    try:
        sizes = [int(v) for v in fields["dimsize"].split()]
    except (KeyError, ValueError):
        raise InputError(f"{bad} (no valid DimSize in its header); the file is corrupt. Export it again.") from None
    if len(sizes) < ndims or min(sizes[:ndims]) < 1:
        raise InputError(f"{bad} (DimSize = {fields['dimsize']} for NDims = {ndims}); the file is corrupt.")


def _corrupt_message(p: Path, what: str, detail: str) -> str:
    return (f"could not read {p}: its {what}-compressed data are corrupt ({detail}): the file was damaged (a bad "
            "disk, a faulty transfer), not cut short. Copy it again from its source.")  # fmt: skip


def _header_fields(p: Path, separator: str) -> tuple[dict[str, str], int] | None:
    """The ``key SEP value`` lines of a text header (MetaImage ``=``, NRRD ``:``), lower-case keys, and the
    offset of the data after it: after MetaImage's ``ElementDataFile = LOCAL`` line or NRRD's blank line."""
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    fields: dict[str, str] = {}
    offset = 0
    for raw in head.split(b"\n"):
        offset += len(raw) + 1
        line = raw.decode("latin-1").strip()
        if separator == ":" and not line:
            return fields, offset  # NRRD: a blank line ends the header
        key, sep, value = line.partition(separator)
        if sep and not line.startswith("#"):
            fields.setdefault(key.strip().lower(), value.strip().lstrip("="))
        if separator == "=" and key.strip().lower() == "elementdatafile":
            return fields, offset
    return None


#: Bytes per voxel of MetaImage element types.
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}  # fmt: skip


#: Bytes per voxel of NRRD types (every spelling of the NRRD format's ``type:`` field, lower case).
_NRRD_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}  # fmt: skip


def _check_nrrd_header_whole(p: Path) -> None:
    """Refuse a NRRD file cut short inside its header (no blank line ends it before the end of the file): ITK says
    only ``ReadImageInformation: ...`` with its object's address."""
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(min(size, 1 << 16))
    except OSError:
        return
    if head.startswith(b"NRRD000") and size < (1 << 16) and b"\n\n" not in head.replace(b"\r\n", b"\n"):
        raise InputError(f"could not read {p}: the file is truncated (it ends inside its header, before the voxel "
                         "data: an incomplete copy or download). Copy it again.")  # fmt: skip


def _check_compressed_data(p: Path) -> None:
    """Check the voxel data of a MetaImage or NRRD file against its header before ITK reads them: ITK's
    MetaImage reader prints "Uncompress failed" and returns garbage voxels (a constant or wild volume) when the
    header's ``CompressedData`` does not match the data, and both readers report a damaged gzip stream as a
    read error without saying why. Distinguishes a header that lies about compression, a truncated file and
    corrupt compressed data (a wrong byte or checksum).

    Raises:
        InputError: naming which of these it is.
    """
    suffix = _suffix(p)
    if suffix in (".mha", ".mhd"):
        parsed = _header_fields(p, "=")
        if parsed is None:
            return
        fields, offset = parsed
        data_file = fields.get("elementdatafile", "")
        if data_file.upper() != "LOCAL":
            if not data_file or " " in data_file or "headersize" in fields:
                return  # a list or pattern of files, or an explicit header size: left to ITK
            p, offset = p.parent / data_file, 0
        try:
            dims = [int(v) for v in fields.get("dimsize", "").split()]
            channels = int(fields.get("elementnumberofchannels", "1"))
            item = _MET_BYTES[fields.get("elementtype", "").upper()]
        except (ValueError, KeyError):
            return
        expected = math.prod(dims) * channels * item
        compressed = fields.get("compresseddata", "false").lower() == "true"
        claim = f"CompressedData = {'True' if compressed else 'False'}"
    elif suffix == ".nrrd":
        parsed = _header_fields(p, ":")
        if parsed is None:
            _check_nrrd_header_whole(p)
            return
        fields, offset = parsed
        if any(key in fields for key in ("data file", "datafile", "byte skip", "byteskip", "line skip", "lineskip")):
            return  # detached data, or data not right after the header: left to ITK
        encoding = fields.get("encoding", "raw").lower()
        if encoding == "raw":
            try:
                item = _NRRD_BYTES[" ".join(fields.get("type", "").lower().split())]
                expected = math.prod(int(v) for v in fields.get("sizes", "").split()) * item
            except (KeyError, ValueError):
                return
            compressed, claim = False, f"encoding: {encoding}"
        elif encoding in ("gzip", "gz"):
            compressed, expected, claim = True, None, f"encoding: {encoding}"
        else:
            return
    else:
        return
    if not p.is_file():
        return
    with open(p, "rb") as f:
        f.seek(offset)
        if compressed:
            try:
                inflated = inflated_size(f)
            except CompressedDataError as exc:
                if exc.kind == "not compressed":
                    raise InputError(
                        f"could not read {p}: its header says the voxel data are compressed ({claim}), but they "
                        "are not: the header does not describe the data. Fix the header or export the file again."
                    ) from None
                if exc.kind == "truncated":
                    raise InputError(f"could not read {p}: the file is truncated (incomplete copy or download). "
                                     "Copy it again.") from None  # fmt: skip
                raise InputError(_corrupt_message(p, "zlib" if suffix in (".mha", ".mhd") else "gzip", exc.detail)) from None
            if expected is not None and inflated != expected:
                raise InputError(
                    f"could not read {p}: its compressed voxel data hold {inflated} bytes where its header "
                    f"(DimSize, ElementType) describes {expected}: the header does not describe the data. "
                    "Export the file again."
                )
            return
        start = f.read(2)
        available = len(start) + max(0, p.stat().st_size - offset - 2)
        if expected is not None and available < expected:
            f.seek(offset)
            try:
                compressed_anyway = inflated_size(f) == expected
            except CompressedDataError:
                compressed_anyway = False
            if compressed_anyway:
                raise InputError(
                    f"could not read {p}: its header says the voxel data are not compressed ({claim}), but they "
                    "are (zlib): the header does not describe the data. Fix the header (CompressedData = True) or "
                    "export the file again."
                )
            raise InputError(
                f"could not read {p}: the file is truncated (its header describes {expected} bytes of voxels, "
                f"{available} are there; an incomplete copy or download). Copy it again."
            )


#: SimpleITK's reader of each volume-file suffix (lower case). ITK picks a reader by the suffix with its case: its
#: MetaImage reader takes ``x.mha`` but not ``x.MHA`` (a Windows name), which the folder scan collects as a volume.
_IMAGE_IOS = {".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
              ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}  # fmt: skip


def image_io(path: str | os.PathLike) -> str:
    """The SimpleITK ImageIO that reads ``path``, chosen from its lower-cased suffix (:data:`_IMAGE_IOS`); ``""``
    (ITK chooses) for any other name, e.g. a DICOM file."""
    return _IMAGE_IOS.get(_suffix(Path(path)), "")


def _image_information(p: Path) -> sitk.ImageFileReader:
    """A reader of the volume file ``p`` that has read its header alone (ITK's ``ReadImageInformation``: no voxel).

    Raises:
        RuntimeError: ITK could not read the header.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(itk_path(p))
    reader.SetImageIO(image_io(p))
    _itk(reader.ReadImageInformation)
    return reader


def header_grid(path: str | os.PathLike) -> Grid | None:
    """The grid of a volume file (NIfTI, NRRD, MetaImage) from its header alone, no voxel read; ``None`` where a
    header does not tell it cheaply: a DICOM series (a folder, or an enhanced CT file: the series read and its slice
    spacing are known only once every file's header has been read, which :func:`read_volume` does), an image that is
    not one 3D scalar volume, or a header that cannot be read (reading the file then says why)."""
    p = Path(path)
    if not image_io(p) or not p.is_file():
        return None
    try:
        check_metaimage_header(p)  # ITK's MetaIO crashes on some headers: read_volume refuses them, naming why
        reader = _image_information(p)
    except (RuntimeError, DiffusionCoreError):
        return None
    size = [int(n) for n in reader.GetSize()]
    if len(size) != 3 or min(size) < 1 or int(reader.GetNumberOfComponents()) != 1:
        return None
    return Grid(shape=(size[2], size[1], size[0]), spacing=tuple(float(s) for s in reader.GetSpacing()),
                origin=tuple(float(o) for o in reader.GetOrigin()),
                direction=tuple(float(d) for d in reader.GetDirection()))  # fmt: skip


def _check_read_size(p: Path, n_slices: int | None = None) -> None:
    """Read only the header of ``p`` and refuse a volume that cannot fit in memory, before ITK allocates it
    (a corrupt or hostile header can claim billions of voxels). ``n_slices`` multiplies a single DICOM
    slice's size by the number of files of its series."""
    from .files import check_memory_for

    check_metaimage_header(p)
    _check_compressed_data(p)
    try:
        reader = _image_information(p)
    except RuntimeError as exc:
        raise InputError(
            f"could not read {p}: {sitk_message(exc)}. Supported: NIfTI (.nii, .nii.gz), NRRD, MHA, "
            "or a folder with a DICOM series. The file may be corrupt or truncated."
        ) from None
    size = [int(v) for v in reader.GetSize()]
    if n_slices is not None:
        size = size[:2] + [n_slices]
    voxels = int(np.prod(size, dtype=np.float64)) * max(1, int(reader.GetNumberOfComponents()))
    pixel = reader.GetPixelID()
    per_voxel = _READ_BYTES_PER_VOXEL if n_slices is not None else _read_bytes_per_voxel(
        _ITK_COMPONENT_BYTES.get(pixel, 8), pixel == sitk.sitkFloat32)  # fmt: skip
    check_memory_for(
        voxels * per_voxel,
        f"reading {p.name} ({'x'.join(map(str, size))} voxels)",
        "crop or downsample the volume (e.g. in 3D Slicer: Crop Volume)",
    )


def _check_series_size(files: Sequence[str], headers: dict[str, sitk.ImageFileReader], folder: Path) -> None:
    """:func:`_check_read_size` for a DICOM series: the largest slice of any file times the number of files
    (one corrupt slice header can claim a huge image). Refuses a series whose slices differ in size, naming
    the odd file."""
    sizes = {f: _slice_size(headers[f]) for f in files}
    counts: dict[tuple[int, ...], int] = {}
    for size in sizes.values():
        counts[size] = counts.get(size, 0) + 1
    if len(counts) > 1:
        usual = max(counts, key=lambda k: counts[k])
        odd = next(f for f, size in sizes.items() if size != usual)
        shown = "x".join(map(str, sizes[odd][:2]))
        raise InputError(
            f"the DICOM series in {folder} mixes slice sizes: {Path(odd).name} is {shown} pixels"
            f"{' with ' + str(sizes[odd][2]) + ' components' if sizes[odd][2] != usual[2] else ''}, where "
            f"{counts[usual]} of its {len(files)} slices are {'x'.join(map(str, usual[:2]))}: it is not a slice of "
            "this volume. Remove it (or keep only the slices of one acquisition) and try again."
        )
    _check_pixel_spacings(files, headers, folder)
    largest = max(files, key=lambda f: math.prod(sizes[f]))
    _check_read_size(Path(largest), n_slices=len(files))


def _check_pixel_spacings(files: Sequence[str], headers: dict[str, sitk.ImageFileReader], folder: Path) -> None:
    """Refuse a series whose slices differ in pixel spacing (PixelSpacing, 0028,0030), naming the odd file: ITK
    stacks every slice at the first one's spacing, so a slice of another field of view would be stretched (by up to
    the difference times its width: tens of mm across a 512-pixel slice)."""
    spacings: dict[str, tuple[float, ...]] = {}
    for f in files:
        numbers = _tag_numbers(headers[f], "0028|0030")
        if numbers is None:
            return  # no spacing recorded: nothing to compare
        spacings[f] = tuple(round(float(v), 4) for v in numbers)
    counts = Counter(spacings.values())
    if len(counts) < 2:
        return
    usual = counts.most_common(1)[0][0]

    def same(value: tuple[float, ...]) -> bool:  # equal but for rounding
        return len(value) == len(usual) and bool(np.allclose(value, usual, rtol=1e-3, atol=1e-4))

    odd = next((f for f, value in spacings.items() if not same(value)), None)
    if odd is None:
        return
    shown = " x ".join(f"{v:g}" for v in spacings[odd])
    raise InputError(
        f"the DICOM series in {folder} mixes pixel spacings: {Path(odd).name} has {shown} mm pixels, where "
        f"{counts[usual]} of its {len(files)} slices have {' x '.join(f'{v:g}' for v in usual)} mm: it is not a slice "
        "of this volume (another reconstruction or field of view). Remove it (or keep only the slices of one "
        "acquisition) and try again."
    )


def dicom_header(file: str) -> sitk.ImageFileReader:
    """A reader holding ``file``'s header (no pixels read); InputError names a corrupt file, ResourceError a Deflated
    file that inflates to more than the memory available (GDCM inflates the whole dataset to read its header)."""
    check_deflated_size(file)
    reader = sitk.ImageFileReader()
    reader.SetFileName(itk_path(file))
    try:
        _itk(reader.ReadImageInformation)
    except RuntimeError as exc:
        raise InputError(f"corrupt DICOM file {file}: {sitk_message(exc)}") from None
    return reader


def _slice_size(reader: sitk.ImageFileReader) -> tuple[int, int, int]:
    """(columns, rows, components per pixel) of one DICOM file, from its header."""
    cols, rows = (int(v) for v in reader.GetSize()[:2])
    return cols, rows, max(1, int(reader.GetNumberOfComponents()))


def read_volume(
    path: str | os.PathLike, *, check: bool = True, series: int | str | None = None, how_to_choose: str | None = None
) -> Volume:
    """Read a CT volume from a file or a DICOM series folder.

    Args:
        path: NIfTI / NRRD / MHA file, or a folder of DICOM slices (its CT series; the largest, if several).
        check: run :func:`check_ct` (refuse NaN/Inf, warn on non-CT intensities).
        series: the series of a DICOM folder to read: its SeriesNumber (an int or text of digits) or its
            SeriesInstanceUID (or the UID's last components, unique in the folder); ``metadata["series_uid"]`` records
            it. Refused for a file other than an enhanced CT, and for a series the folder does not hold (the message
            lists those it holds), holds twice (by number: give the UID) or that is not CT.
        how_to_choose: how the caller's user chooses a series, said when a folder holds several and one was taken for
            them (see :func:`~DiffusionCore.dicom_in.choose_ct_series`); e.g. the ``sr`` command's
            ``"pass --input-series N (its SeriesNumber) or its SeriesInstanceUID"``.

    Returns:
        A :class:`Volume` in HU; padding below -1500 HU reaching the image's edge is replaced by air (-1024 HU,
        :func:`replace_padding`). A gantry-tilted DICOM series comes back resampled onto an orthogonal grid (with a
        warning; ``metadata["gantry_tilt_deg"]``); one whose slices only scatter within a fraction of a pixel is
        read on its own grid (an info line; ``metadata["position_jitter_mm"]``).

    Raises:
        InputError: missing or unreadable file, 2D/4D/RGB image, single slice, NaN/Inf voxels; a DICOM
            series with missing slices, mixed slice orientations or slices off one line.
        GeometryError: zero or undefined voxel spacing.
        ResourceError: the volume cannot fit in the available memory (checked from the header first).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist. Check the path (and quote it if it contains spaces).")
    if not p.is_dir() and (kind := not_regular_kind(p)):  # looked at, never opened: a FIFO's open waits forever
        raise InputError(f"could not read {p}: it is {kind}, not a regular file: reading it would hang or never end. "
                         "Give the volume file itself (NIfTI, NRRD, MetaImage, DICOM) or a DICOM folder.")  # fmt: skip
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(f"could not read {p}: the file is empty (0 bytes: an interrupted copy, download or export). "
                         "Copy or export it again.")  # fmt: skip
    if p.is_file() and (text := text_file_error(p)) is not None:
        raise text  # a list of volumes without a list suffix, a note: said as such, not as ITK's "no reader"
    meta: dict = {}
    nonfinite = None
    wanted = None if series is None else series_choice(series)
    enhanced = enhanced_ct_in(p) if p.is_dir() or _suffix(p) not in WRITABLE_SUFFIXES else None
    if wanted is not None and enhanced is None and not p.is_dir():
        raise InputError(f"{p} is a file, not a DICOM folder: a series ({series}) is chosen among the series of a "
                         "DICOM folder. Give the folder that holds the series, or leave the series out.")  # fmt: skip
    if wanted is not None and enhanced is not None:  # its one series, or a refusal naming it
        uid = (header_values(enhanced, ["SeriesInstanceUID"]) or {}).get("SeriesInstanceUID", "")
        choose_ct_series(p, {uid: [str(enhanced)]}, wanted=wanted, how_to_choose=how_to_choose)
    if enhanced is not None:  # one multi-frame file: its geometry is in functional groups ITK does not read
        ct = read_enhanced_ct(enhanced)
        extra = {**ct.metadata, "source": str(p)}
        corrected = _tilt_corrected(ct.array, ct.positions, ct.direction, ct.spacing[:2], f"the enhanced CT {enhanced}",
                                    extra)  # fmt: skip
        if corrected is None:
            vol = Volume(ct.array, ct.spacing, ct.origin, ct.direction, extra)
        else:
            arr, origin, regular, normal_spacing = corrected
            vol = Volume(arr, (*ct.spacing[:2], normal_spacing), origin, regular, extra)
        if check:
            check_ct(vol, str(p))
        vol.array = replace_padding(vol.array, str(p))
        return vol
    if p.is_dir():
        img, extra = _read_dicom_series(p, wanted, how_to_choose)
        meta.update(extra)
    else:
        if _suffix(p) in (".nii", ".nii.gz"):
            nonfinite = _check_nifti(p)
        check_detached_data_files(p)  # before any voxel is read: no data file outside its folder, no FIFO
        _check_read_size(p)
        try:
            img = _itk(sitk.ReadImage, str(p), sitk.sitkUnknown, image_io(p), reading=p)
        except RuntimeError as exc:
            raise InputError(
                f"could not read {p}: {sitk_message(exc)}. Supported: NIfTI (.nii, .nii.gz), NRRD, MHA, "
                "or a folder with a DICOM series. The file may be corrupt or truncated."
            ) from None
        if _suffix(p) in (".nii", ".nii.gz"):
            img = _nifti_sform_geometry(img, p, meta)
    vol = Volume.from_sitk(img, source=str(p), **meta)
    del img  # the voxels are in the array now: a large volume is not held twice
    vol.metadata["source"] = str(p)
    if nonfinite is not None and nonfinite.shape == vol.shape:
        vol.array[nonfinite] = np.nan  # ITK read them as 0
    if check:
        check_ct(vol, str(p))
    vol.array = replace_padding(vol.array, str(p))
    return vol


# -- writing -----------------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def split_volume_suffix(name: str | os.PathLike) -> tuple[str, str]:
    """``(stem, suffix)`` of a file name whose suffix is a writable volume format (``"ct.nii.gz"`` ->
    ``("ct", ".nii.gz")``, any case); ``(name, "")`` otherwise."""
    text = Path(name).name
    suffix = _suffix(Path(text))
    if suffix in WRITABLE_SUFFIXES:
        return text[: -len(suffix)], text[-len(suffix):]
    return text, ""


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Validate an output path before any work is done (format, folder writable, no silent overwrite), and
    delete the hidden temporary files of this output that a killed earlier run left (``.NAME.*.partial*``
    of a process that no longer runs)."""
    p = Path(path)
    suffix = _suffix(p)
    if suffix not in WRITABLE_SUFFIXES:
        dicom = (" A DICOM result is a series of files: give a new folder (e.g. "
                 f"{p.with_suffix('')}) with --output-format dicom.") if suffix == ".dcm" else ""
        raise OutputError(f"cannot write {p.name}: use one of {', '.join(WRITABLE_SUFFIXES)}.{dicom}")
    check_name_length(p)  # the name and its temporary file's: ENAMETOOLONG said as such, before any work
    parent = p.parent if str(p.parent) else Path(".")
    try:
        if not parent.is_dir():
            raise OutputError(f"the output folder {parent} does not exist; create it first.")
        if not folder_writable(parent):
            raise OutputError(f"the output folder {parent} is not writable; choose another output path.")
        if p.exists() and not overwrite:
            raise OutputExistsError(p)
        if p.is_dir():
            raise OutputError(f"{p} is a folder; give a file name such as result.nii.gz")
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise too_long_error(p, exc) or OutputError(f"cannot write {p}: {exc.strerror or exc}") from None
    _check_itk_can_write(p)  # Windows: a folder ITK cannot spell in its code page, refused before the work
    removed = remove_stale_partials(p)
    if _itk_needs_ascii(p.name):  # those of a temporary file named in ASCII (:func:`_itk_partial_file`)
        removed += remove_stale_partials(p.with_name(_itk_ascii_alias(p.name)))
    if removed:
        logger.info("removed %d temporary file(s) that an interrupted earlier run left beside %s: %s", len(removed),
                    p.name, ", ".join(removed))  # fmt: skip
    return p


#: Formats whose geometry is an orthonormal direction matrix only (NIfTI's qform is a rotation; ITK writes
#: the sform from it too): a sheared grid written there is orthogonalised, which moves voxels. NRRD
#: (space directions) and MetaImage (TransformMatrix) hold any direction matrix, exactly.
_ORTHONORMAL_ONLY_SUFFIXES = (".nii", ".nii.gz")


def check_output_geometry(vol: Volume | Grid, path: str | os.PathLike) -> None:
    """Refuse to write a grid the output format cannot hold: a sheared (non-orthonormal) direction matrix
    in NIfTI, which would move voxels (by up to tens of mm). Cheap; call it before the work that produces
    the volume, as :func:`write_volume` does before writing.

    Raises:
        OutputError: the format would move some voxel by more than a tenth of a voxel; the message names
            the formats that keep the geometry (NRRD, MHA).
    """
    p = Path(path)
    if _suffix(p) not in _ORTHONORMAL_ONLY_SUFFIXES:
        return
    grid = vol.grid if isinstance(vol, Volume) else vol
    moved = orthogonalisation_shift_mm(grid.direction_matrix, grid.spacing, grid.shape)
    if moved <= POSITION_TOL_VOXELS * min(grid.spacing):
        return
    angles = ", ".join(f"{a:.1f}" for a in axis_angles_deg(grid.direction_matrix))
    stem = p.name[: -len(_suffix(p))]
    raise OutputError(
        f"cannot write {p.name}: the volume's grid is sheared (its axes meet at {angles} degrees, not 90) "
        f"and NIfTI holds only orthogonal grids, so writing it would move voxels by up to {moved:.1f} mm. "
        f"Write it as NRRD ({stem}.nrrd) or MHA ({stem}.mha), which keep this geometry exactly."
    )


def _rounded_int16(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """``arr`` rounded to the nearest integer and clipped to the int16 range, slab by slab on all cores
    (numpy releases the GIL), with one slab-sized temporary per worker; and how many voxels were clipped."""
    out = np.empty(arr.shape, dtype=np.int16)
    threads = usable_cpus()
    step = max(1, -(-arr.shape[0] // (4 * threads)))

    def convert(start: int) -> int:
        part = np.round(arr[start : start + step])
        clipped = int(np.count_nonzero((part < -32768) | (part > 32767)))
        np.clip(part, -32768, 32767, out=part)
        out[start : start + step] = part
        return clipped

    with ThreadPoolExecutor(threads) as pool:
        clipped = sum(pool.map(convert, range(0, arr.shape[0], step)))
    return out, clipped


#: What a library caller does about an output that exists (the command line's own message names ``--overwrite``).
API_OVERWRITE_ADVICE = "pass overwrite=True to replace it (--overwrite on the command line), or choose another name"


def _itk_image_like(vol: Volume, voxels: np.ndarray, header: Mapping[str, str]) -> sitk.Image:
    """A SimpleITK image of ``voxels`` (a copy, ``(z, y, x)``) with ``vol``'s geometry and the text fields ``header``."""
    img = sitk.GetImageFromArray(voxels)
    img.SetSpacing(vol.spacing)
    img.SetOrigin(vol.origin)
    img.SetDirection(tuple(float(v) for v in vol.direction.ravel()))
    for key, value in header.items():
        img.SetMetaData(key, _itk_text(value))
    return img


#: Voxels converted and written at a time by :func:`_write_streamed` (16 MiB of float32).
_STREAM_VOXELS = 1 << 22


def _output_slabs(arr: np.ndarray, dtype: np.dtype, counts: list[int]) -> Iterable[np.ndarray]:
    """``arr`` ``(z, y, x)`` as C-contiguous ``dtype`` slabs of whole slices, in file order. int16 is rounded and
    clipped as :func:`_rounded_int16` does, the clipped voxels added to ``counts[0]``; float32 slabs of a float32 array
    are views, not copies."""
    step = max(1, _STREAM_VOXELS // max(1, arr[:1].size))
    for start in range(0, arr.shape[0], step):
        part = arr[start : start + step]
        if dtype == np.int16:
            part = np.round(part)
            counts[0] += int(np.count_nonzero((part < -32768) | (part > 32767)))
            np.clip(part, -32768, 32767, out=part)
        yield np.ascontiguousarray(part, dtype=dtype)


def _sized_header(head: bytes, suffix: str, shape: tuple[int, int, int], written_z: int) -> bytes | None:
    """The header ITK wrote for the first ``written_z`` slices of a ``(z, y, x)`` ``shape`` volume, made to say the
    whole volume's size; None where its size field is not where this expects it (then ITK writes the volume)."""
    nz, ny, nx = shape
    if suffix in (".nii", ".nii.gz"):
        for order in "<>":
            sizeof_hdr = int(np.frombuffer(head[:4], dtype=order + "i4")[0]) if len(head) >= 4 else 0
            if sizeof_hdr == 348:  # NIfTI-1: dim[8] int16 at byte 40
                kind, at = order + "i2", 40
            elif sizeof_hdr == 540:  # NIfTI-2: dim[8] int64 at byte 16
                kind, at = order + "i8", 16
            else:
                continue
            dims = np.frombuffer(head, dtype=kind, count=8, offset=at).copy()
            if list(dims[:4]) != [3, nx, ny, written_z] or nz > np.iinfo(kind).max:
                return None
            dims[3] = nz
            return head[:at] + dims.tobytes() + head[at + dims.nbytes :]
        return None
    key = {".nrrd": b"sizes: ", ".mha": b"DimSize = "}.get(suffix)
    if key is None:
        return None
    line = key + f"{nx} {ny} {written_z}\n".encode()
    if head.count(line) != 1:
        return None
    return head.replace(line, key + f"{nx} {ny} {nz}\n".encode())


def _write_streamed(
    vol: Volume, arr: np.ndarray, dtype: np.dtype, header: Mapping[str, str], tmp: str, suffix: str
) -> int | None:
    """Write ``arr`` (``(z, y, x)``) uncompressed into ``tmp`` (``.nii``/``.nii.gz``'s plain ``.nii``, ``.nrrd``,
    ``.mha``) as ITK would, byte for byte, without ITK's whole-volume copy: ITK writes the first two slices (header
    and geometry), the header is made to say the whole size, then the voxels follow from the array slab by slab.

    Returns:
        How many voxels were clipped to the int16 range; None (``tmp`` not written) where this cannot be done (a
        single slice, a header this does not recognise): the caller lets ITK write the whole volume.
    """
    if arr.ndim != 3 or arr.shape[0] < 2:
        return None
    counts = [0]
    first = next(iter(_output_slabs(arr[:2], dtype, counts)))
    _itk(sitk.WriteImage, _itk_image_like(vol, first, header), itk_path(tmp, OutputError), False)
    written = os.path.getsize(tmp)
    if written <= first.nbytes:  # cut short (a full disk: ITK reports success): ITK's own write says why
        return None
    with open(tmp, "rb") as f:
        head = f.read(written - first.nbytes)
        if f.read() != first.tobytes():  # not a header and the raw voxels after it
            return None
    head = _sized_header(head, suffix, arr.shape, 2)
    if head is None:
        return None
    counts = [0]
    with open(tmp, "wb") as f:
        f.write(head)
        for slab in _output_slabs(arr, dtype, counts):
            f.write(memoryview(slab).cast("B"))
    return counts[0]


def write_volume(
    vol: Volume,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str = "auto",
    compress: bool = True,
    header: dict[str, str] | None = None,
) -> Path:
    """Write a volume atomically (temporary file in the same folder, then rename).

    Args:
        vol: the volume.
        path: ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.mha``.
        overwrite: replace an existing file.
        dtype: ``"auto"`` (int16 when every voxel is an integer in range, else float32; lossless),
            ``"int16"`` (rounded and clipped HU, as scanners store CT) or ``"float32"``.
        compress: gzip the voxels of ``.nrrd`` and ``.mha`` files. Hand-off files that are read once and
            deleted (the Slicer modules' temporary files) skip it: a 256x512x512 float32 volume then
            writes in ~1 s instead of ~5 s. ``.nii`` and ``.nii.gz`` follow their suffix.
        header: text fields for the file's header: NRRD and MetaImage keep every key (the provenance of
            :mod:`DiffusionCore.provenance`); NIfTI keeps only ``ITK_FileNotes``, as its ``descrip`` (80 bytes).
            A volume whose ``metadata`` says it is synthetic (a model's result) is never written unmarked: without
            provenance fields in ``header`` it gets the least provenance its metadata gives (marked synthetic, the
            weights' sha256: :func:`~DiffusionCore.provenance.minimal_provenance`); the full record (settings,
            input, weights) needs :func:`DiffusionCore.save_result`.

    Returns:
        The path written.

    Raises:
        OutputError: the path cannot be written (it exists and ``overwrite`` is False, ...), or its format cannot
            hold the volume's geometry (a sheared grid in NIfTI: see :func:`check_output_geometry`).
        ConfigError: ``dtype`` is not one of the three above.
    """
    try:
        p = check_output_path(path, overwrite=overwrite)
    except OutputExistsError as exc:
        raise exc.advising(API_OVERWRITE_ADVICE) from None
    itk_utf8_name(p, OutputError)  # a name ITK cannot take, said of the user's path (not of its temporary file)
    check_output_geometry(vol, p)
    arr = vol.array
    if dtype == "auto":
        as_int = bool(np.all(arr == np.round(arr))) and arr.min() >= -32768 and arr.max() <= 32767
        dtype = "int16" if as_int else "float32"
    if dtype not in ("int16", "float32"):
        raise ConfigError(f"dtype {dtype!r} cannot be written: choose 'auto' (int16 when every voxel is a whole HU "
                          "value in range, else float32), 'int16' or 'float32'")  # fmt: skip
    out_dtype = np.dtype(np.int16 if dtype == "int16" else np.float32)
    nbytes = arr.size * out_dtype.itemsize
    clipped = 0

    def warn_clipped() -> None:
        if clipped:
            logger.warning(
                "%s: %d voxel%s outside the int16 range (-32768 to 32767 HU; the volume spans %g to %g HU) clipped to "
                "it: write float32 to keep %s (--output-dtype float32 on the command line, dtype='float32' in "
                "Python)", p.name, clipped, "s" if clipped != 1 else "", float(np.nanmin(arr)), float(np.nanmax(arr)),
                "them" if clipped != 1 else "it",
            )  # fmt: skip

    if vol.metadata.get("synthetic") and not has_provenance_fields(header):
        header = {**(header or {}), **provenance_header(minimal_provenance(vol.metadata))}
        logger.info("%s is marked synthetic with the weights' sha256 only: DiffusionCore.save_result(volume, path, "
                    "report) writes the run's full provenance (settings, input, weights)", p.name)  # fmt: skip
    fields = header or {}

    def whole_image() -> sitk.Image:  # a copy of every voxel: only where ITK itself must write them all
        nonlocal clipped
        if dtype == "int16":
            out, clipped = _rounded_int16(arr)
        else:
            out = arr.astype(np.float32, copy=False)
        return _itk_image_like(vol, out, fields)

    suffix = _suffix(p)
    # .nii.gz: ITK writes the plain .nii (header and geometry), then all cores gzip it (ITK's own gzip is
    # single-threaded and ~10x slower on a 512x512x256 volume). That needs room for both files at once; when the
    # plain one does not fit (a nearly full disk, ulimit -f) ITK's own one-pass gzip writes the .nii.gz alone.
    gzip_after = suffix == ".nii.gz"
    temps: list[str] = []

    def remove_temps() -> None:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        temps.clear()

    try:
        try:
            for ext in (".nii", suffix) if gzip_after else (suffix,):
                temps.append(_itk_partial_file(p, ext))
            compressed = compress and suffix in (".nrrd", ".mha")
            # An uncompressed file is ITK's header and then the raw voxels: the voxels go straight from the volume's
            # array (int16 converted slab by slab), with no whole-volume copy for ITK (4 bytes per voxel, the peak of
            # a large run's write). A compressed NRRD or MetaImage (or a single slice) is written by ITK whole.
            streamed = None if compressed else _write_streamed(vol, arr, out_dtype, fields, temps[0], suffix)
            if streamed is None:
                _itk(sitk.WriteImage, whole_image(), itk_path(temps[0], OutputError), compressed)
            else:
                clipped = streamed
            _check_complete(temps[0], nbytes, compressed=compressed)
            if gzip_after:
                gzip_file(temps[0], temps[1])
        except (RuntimeError, OSError) as exc:
            remove_temps()  # the free space and the limit are judged without them
            if not (gzip_after and no_room_reason(p.parent, 2 * nbytes, exc)):
                raise
            logger.info("no room for %s uncompressed beside its .nii.gz: compressing it while it is written (slower)",
                        p.name)  # fmt: skip
            try:
                temps.append(_itk_partial_file(p, suffix))
                _itk(sitk.WriteImage, whole_image(), itk_path(temps[0], OutputError), True)
                _check_gzip_complete(temps[0], nbytes)
            except (RuntimeError, OSError):
                raise exc from None  # it did not fit either: the first failure says why (a full disk, ulimit -f)
        publish(temps[-1], p, overwrite=overwrite)  # without overwrite: never over a file that appeared meanwhile
    except OutputExistsError:
        raise
    except (RuntimeError, OSError) as exc:
        remove_temps()  # before the free space is measured for the message
        raise _write_failure(p, nbytes, exc) from None
    finally:
        remove_temps()
    warn_clipped()
    return p


def write_image(img: sitk.Image, path: str | os.PathLike) -> Path:
    """Write a SimpleITK image as it is (e.g. a 2D radiograph handed to a command), uncompressed, with the checks of
    :func:`write_volume`: a full disk or an unwritable folder is an OutputError that says why (ITK's own exception
    quotes its source files). Not atomic: for files in a job's private folder."""
    p = Path(path)
    nbytes = img.GetNumberOfPixels() * img.GetNumberOfComponentsPerPixel() * img.GetSizeOfPixelComponent()
    # Windows: a path its code page cannot spell, as ITK can open it (or refused as an output, before ITK fails)
    name = itk_path(p, OutputError) if _itk_needs_ascii(str(p)) else str(p)
    try:
        _itk(sitk.WriteImage, img, name)
        _check_complete(str(p), nbytes, compressed=False)
    except (RuntimeError, OSError) as exc:
        raise _write_failure(p, nbytes, exc) from None
    return p


def _write_failure(path: Path, voxel_bytes: int, exc: RuntimeError | OSError) -> OutputError:
    """Why writing ``path`` failed, in words: a full disk (:func:`~DiffusionCore.files.no_room_reason`), else what ITK
    or the system said."""
    if isinstance(exc, OSError) and (too_long := too_long_error(path, exc)) is not None:
        return too_long
    why = no_room_reason(path.parent, voxel_bytes, exc) or (
        sitk_message(exc) if isinstance(exc, RuntimeError) else str(exc))
    return OutputError(f"could not write {path}: {why}")


#: The bytes before the voxels of a single-file NIfTI: NIfTI-1 (348 and 4 extension bytes) and NIfTI-2 (540 and 4).
_NIFTI_VOXEL_OFFSETS = (352, 544)


def _check_gzip_complete(path: str, voxel_bytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` unless the ``.nii.gz`` ITK has just written ends with gzip's trailer for the whole
    file (:func:`~DiffusionCore.files.gzip_ends_with_size`): one cut short by a full disk or a file-size limit does not.
    Cheap: the file is not read."""
    from .files import gzip_ends_with_size

    if not any(gzip_ends_with_size(path, 0, offset + voxel_bytes) for offset in _NIFTI_VOXEL_OFFSETS):
        raise OSError(errno.ENOSPC, "the compressed file was cut short", path)


#: Free space below which a compressed file ITK has just written is taken as cut short (its size cannot be checked).
_NEARLY_FULL_BYTES = 1 << 20


def _check_complete(path: str, voxel_bytes: int, *, compressed: bool) -> None:
    """Raise ``OSError(ENOSPC)`` when ITK's write of ``path`` cannot be whole: on a full disk ITK reports success for a
    NRRD of 0 bytes. An uncompressed file holds at least its voxels' bytes; a compressed one that leaves the disk
    (nearly) full is taken as cut short. ``OSError(EFBIG)`` instead when the file-size limit (``ulimit -f``) cut it:
    the file reached the limit, or an uncompressed file's voxels alone exceed it."""
    from .files import file_size_limit

    size = os.path.getsize(path)
    limit = file_size_limit()
    at_limit = limit is not None and size >= limit  # a write stops there, whether or not ITK noticed
    short = at_limit or (size < voxel_bytes if not compressed else (
        size == 0 or shutil.disk_usage(os.path.dirname(path) or ".").free < _NEARLY_FULL_BYTES
    ))
    if short:
        limited = at_limit or (not compressed and limit is not None and limit < voxel_bytes)
        code = errno.EFBIG if limited else errno.ENOSPC
        raise OSError(code, os.strerror(code), path)


def crop_slices(vol: Volume, axis: str | int, start: int, stop: int) -> Volume:
    """Slices ``start..stop-1`` of ``vol`` along ``axis`` (a copy), with the origin moved so that every kept
    voxel stays where it was.

    Raises:
        InputError: the range is empty or leaves the volume.
    """
    ax = axis_index(axis)
    n = vol.shape[ax]
    if not 0 <= start < stop <= n:
        raise InputError(f"slices {start}..{stop - 1} along {'zyx'[ax]}: the volume has slices 0..{n - 1}")
    idx = 2 - ax
    origin = np.asarray(vol.origin) + vol.grid.direction_matrix[:, idx] * vol.spacing[idx] * start
    arr = np.take(vol.array, np.arange(start, stop), axis=ax)
    return Volume(arr, vol.spacing, tuple(float(o) for o in origin), vol.direction.copy(), dict(vol.metadata))
