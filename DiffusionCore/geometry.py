"""Exact geometry: when two grids agree, sheared (non-orthonormal) grids, and gantry-tilted slice stacks.

Conventions as in :mod:`DiffusionCore.volume`: index order ``(i, j, k)`` = ``(x, y, z)``, LPS millimetres,
``direction`` columns are the unit vectors of the index axes, arrays are ``(z, y, x)``. The physical point
of voxel ``(i, j, k)`` is ``origin + direction @ (spacing * (i, j, k))``.

The readers and writers use this module to keep one promise: a voxel is read and written where it is, or
the file is refused (or, for a gantry tilt, resampled with a notice). They never move voxels silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Geometry differences below this fraction of the smallest voxel spacing are rounding (positions written
#: with few decimals, float32 affines), not misplaced voxels; larger ones are corrected or refused.
POSITION_TOL_VOXELS = 0.1
#: Slices whose in-plane positions scatter by up to this fraction of a pixel, and not in proportion to their distance
#: along the stack (no tilt), are read on the first slice's pixel grid, their jitter taken as rounding: a quarter
#: pixel is below the in-plane resolution of a CT reconstruction (its kernel spreads a point over several pixels),
#: whereas shifting every slice by interpolation would blur each one and move the grid off the input's.
POSITION_JITTER_TOL_VOXELS = 0.25


def corner_indices(shape_zyx: Sequence[int]) -> np.ndarray:
    """The 8 corner voxels of a grid of array shape ``(z, y, x)``, as index rows ``(i, j, k)``, shape (8, 3)."""
    z, y, x = (int(n) - 1 for n in shape_zyx)
    return np.array([(i, j, k) for i in (0, x) for j in (0, y) for k in (0, z)], dtype=np.float64)


def index_to_physical(spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray) -> np.ndarray:
    """4x4 matrix mapping homogeneous ``(i, j, k, 1)`` to LPS millimetres."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
    m[:3, 3] = np.asarray(origin, dtype=np.float64)
    return m


def grid_distance_mm(a: np.ndarray, b: np.ndarray, shape_zyx: Sequence[int]) -> float:
    """Largest distance (mm) between where two index-to-physical matrices (4x4) put the same voxel of a grid
    of shape ``(z, y, x)``: both maps are affine, so the largest lies at a corner."""
    idx = np.c_[corner_indices(shape_zyx), np.ones(8)]
    return float(np.max(np.linalg.norm((idx @ (a - b).T)[:, :3], axis=1)))


def nearest_orthonormal(direction: np.ndarray) -> np.ndarray:
    """The orthogonal matrix nearest to ``direction`` (polar decomposition): what a format that stores only
    rotations keeps of a sheared direction matrix (ITK's NIfTI writer does exactly this)."""
    u, _, vt = np.linalg.svd(np.asarray(direction, dtype=np.float64).reshape(3, 3))
    return u @ vt


def orthogonalisation_shift_mm(
    direction: np.ndarray, spacing: Sequence[float], shape_zyx: Sequence[int]
) -> float:
    """How far (mm) the farthest voxel moves when ``direction`` is replaced by :func:`nearest_orthonormal`
    (spacing and origin kept): 0 for an orthonormal matrix, tens of mm for a strongly sheared grid."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    a = index_to_physical(spacing, (0.0, 0.0, 0.0), d)
    b = index_to_physical(spacing, (0.0, 0.0, 0.0), nearest_orthonormal(d))
    return grid_distance_mm(a, b, shape_zyx)


def axis_angles_deg(direction: np.ndarray) -> tuple[float, float, float]:
    """Angles in degrees between the index axes (i, j), (i, k) and (j, k): all 90 for an orthogonal grid."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    cols = d / np.linalg.norm(d, axis=0)
    return tuple(  # type: ignore[return-value]
        float(np.degrees(np.arccos(np.clip(cols[:, a] @ cols[:, b], -1.0, 1.0))))
        for a, b in ((0, 1), (0, 2), (1, 2))
    )


# -- gantry tilt -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GantryTilt:
    """A stack of parallel slices whose positions drift within the slice plane, as a CT acquired with a
    tilted gantry: each slice lies in its own plane (normal ``n``), but the step from one slice to the next
    is along the table, not along ``n``.

    Attributes:
        angle_deg: angle between the mean slice-to-slice step and the slice normal.
        drift_mm: largest in-plane offset of a slice from the first slice.
        off_line_mm: largest in-plane distance of a slice from the straight line through the slices (the
            drift in proportion to the distance along the normal); near 0 for a real tilt.
        shifts_ij: ``(n_slices, 2)`` in-plane offset of each slice from the first, in pixels along the
            index axes i (image rows' direction) and j (columns' direction).
        normal_spacing: distance between slices along their normal, mm (> 0).
        direction: orthonormal 3x3 of the regular grid: the rows' and columns' directions and the normal,
            the normal oriented so that the slice index increases along it.
        line_drift_mm: the in-plane drift the straight line fitting the slices gives the farthest slice: the
            part of the drift that is in proportion to the distance (a tilt's); near 0 for random jitter.
        jitter: the drift is random jitter within :data:`POSITION_JITTER_TOL_VOXELS` of a pixel, not a tilt:
            its line drifts less than :data:`POSITION_TOL_VOXELS` of a pixel, or the slices do not follow it.
    """

    angle_deg: float
    drift_mm: float
    off_line_mm: float
    shifts_ij: np.ndarray
    normal_spacing: float
    direction: np.ndarray
    line_drift_mm: float = 0.0
    jitter: bool = False


def gantry_tilt(
    positions: np.ndarray, direction: np.ndarray, pixel_spacing: Sequence[float]
) -> GantryTilt | None:
    """The tilt of a slice stack, or ``None`` when the slices lie along their normal (within
    :data:`POSITION_TOL_VOXELS` of a pixel). A stack whose slices scatter by less than
    :data:`POSITION_JITTER_TOL_VOXELS` of a pixel, but not along a line, comes back marked ``jitter``: rounding in
    its positions, not a tilt, to be read on its own grid.

    Args:
        positions: ``(n_slices, 3)`` LPS position (mm) of the first pixel of each slice, in array order
            (DICOM ImagePositionPatient).
        direction: 3x3 whose first two columns are the unit vectors of the rows and columns
            (DICOM ImageOrientationPatient); the third column is ignored.
        pixel_spacing: in-plane spacing ``(x, y)`` in mm.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    row, col = d[:, 0], d[:, 1]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    pos = np.asarray(positions, dtype=np.float64)
    offsets = pos - pos[0]
    along = offsets @ normal
    in_plane = offsets - np.outer(along, normal)
    drift = float(np.max(np.linalg.norm(in_plane, axis=1)))
    if len(offsets) < 2 or drift <= POSITION_TOL_VOXELS * min(pixel_spacing):
        return None
    drift_per_mm = (along @ in_plane) / (along @ along)
    off_line = float(np.max(np.linalg.norm(in_plane - np.outer(along, drift_per_mm), axis=1)))
    n = len(offsets) - 1
    normal_step = float(along[-1] / n)
    mean_step = offsets[-1] / n
    angle = float(np.degrees(np.arctan2(np.linalg.norm(mean_step - normal_step * normal), abs(normal_step))))
    shifts = np.c_[offsets @ row / pixel_spacing[0], offsets @ col / pixel_spacing[1]]
    regular = np.c_[row, col, np.sign(normal_step) * normal]
    line_drift = float(np.linalg.norm(drift_per_mm) * np.max(np.abs(along)))
    tol, scatter = POSITION_TOL_VOXELS * min(pixel_spacing), POSITION_JITTER_TOL_VOXELS * min(pixel_spacing)
    jitter = drift <= scatter and (line_drift <= tol or off_line > tol)
    return GantryTilt(angle, drift, off_line, shifts, abs(normal_step), regular, line_drift, jitter)


def resample_gantry_tilt(
    array: np.ndarray, tilt: GantryTilt, fill: float
) -> tuple[np.ndarray, tuple[int, int]]:
    """Shift each slice within its own plane onto a common orthogonal grid (bilinear interpolation in the
    plane; slices are never mixed, so the through-plane resolution is untouched).

    The grid is widened so that every acquired pixel of every slice is kept; where a slice has no pixel
    (beside its field of view after the shift) the result is ``fill``.

    Args:
        array: float ``(z, y, x)``, slice k acquired at offset ``tilt.shifts_ij[k]`` from slice 0.
        tilt: from :func:`gantry_tilt`.
        fill: value outside each slice's field of view (air, in HU).

    Returns:
        The resampled float32 array ``(z, y', x')`` and the index ``(i0, j0)`` of its first voxel in
        slice 0's pixel grid (its origin is slice 0's position plus ``i0`` pixels along the rows and ``j0``
        along the columns).
    """
    from scipy import ndimage

    nz, ny, nx = array.shape
    eps = 1e-3  # pixels: rounding in the positions must not add a column
    lo = np.floor(tilt.shifts_ij.min(axis=0) + eps).astype(int)
    hi = np.ceil(tilt.shifts_ij.max(axis=0) - eps).astype(int)
    out_shape = (ny + hi[1] - lo[1], nx + hi[0] - lo[0])
    out = np.empty((nz, *out_shape), dtype=np.float32)
    for k in range(nz):
        a, b = tilt.shifts_ij[k]
        # output pixel (j', i') is slice k's pixel (j' + j0 - b, i' + i0 - a)
        ndimage.affine_transform(
            np.asarray(array[k], dtype=np.float32),
            np.ones(2),
            offset=(lo[1] - b, lo[0] - a),
            output_shape=out_shape,
            output=out[k],
            order=1,
            mode="constant",
            cval=fill,
        )
    return out, (int(lo[0]), int(lo[1]))


def across_axes_swapped(direction: np.ndarray | Sequence[float], axis: int) -> bool:
    """Whether the two array axes across ``axis`` (the thick one; 0, 1, 2 = z, y, x) are stored in the other order
    than the canonical one, in which the axis nearer the physical S-I, then A-P direction comes first (an axial scan:
    rows A-P, then columns L-R, as DICOM stores them). The same scan stored with rows and columns exchanged (a
    coronal or sagittal acquisition exported by two converters) is put in that order where a result would otherwise
    depend on it (the adaptation's random pairs), so that it depends on the physical data only.

    Args:
        direction: the 3x3 direction cosines (column c = index axis c, ITK's convention; x, y, z).
        axis: the array axis of the slices' thickness.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    first, second = (a for a in range(3) if a != axis)
    dominant = {a: int(np.argmax(np.abs(d[:, 2 - a]))) for a in (first, second)}  # 0, 1, 2 = L-R, A-P, S-I
    return dominant[first] < dominant[second]


def storage_flips(direction: np.ndarray | Sequence[float]) -> tuple[int, ...]:
    """The array axes (0, 1, 2 = z, y, x) stored in reverse of the canonical order that the networks are shown.

    The canonical order runs each array axis the positive way along its dominant physical (LPS) axis: an identity
    direction matrix (DICOM's axial order) is canonical and is never flipped. The same scan stored with its rows,
    columns or slices reversed (another sign in the direction matrix: a dcm2niix NIfTI beside its DICOM series)
    is flipped back to that order before a network sees it, and the networks' output flipped again, so that the
    result depends on the physical data only: the networks are not flip-equivariant. The grids stay as they are.

    Args:
        direction: the 3x3 direction cosines (column c = index axis c, ITK's convention; x, y, z).

    Returns:
        The array axes to flip, ascending (``()`` for an identity direction).
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return tuple(sorted(2 - c for c in range(3) if d[int(np.argmax(np.abs(d[:, c]))), c] < 0))
