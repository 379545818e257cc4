"""Interpolation baselines: nearest, linear and cubic B-spline resampling onto a target grid.

These are what every learned super-resolution must beat. Resampling happens in physical space, so the
output lies exactly on the target grid (e.g. :func:`DiffusionCore.degrade.thin_grid`) and opens aligned
with the reference in any viewer. When the target grid differs from the source only along one array axis
(the usual thick-to-thin case) a fast separable 1D path is used; otherwise SimpleITK resamples in 3D.
Outside the outermost source slices values are extended from the nearest slice (no fill value).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .volume import Grid, Volume

INTERPOLATION_METHODS = ("nearest", "linear", "cubic")
_SITK_INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "cubic": sitk.sitkBSpline}


def _index_map(src: Grid, dst: Grid) -> np.ndarray:
    """4x4 matrix from destination voxel index (i, j, k, 1) to continuous source index."""
    return np.linalg.inv(src.index_to_physical()) @ dst.index_to_physical()


def single_axis(src: Grid, dst: Grid, tol: float = 1e-4) -> int | None:
    """Array axis along which ``dst`` differs from ``src`` when all other axes coincide, else ``None``."""
    m = _index_map(src, dst)
    lin, shift = m[:3, :3], m[:3, 3]
    if not np.allclose(lin - np.diag(np.diag(lin)), 0.0, atol=tol):
        return None
    candidates = []
    for idx in range(3):
        ax = 2 - idx
        same = abs(lin[idx, idx] - 1.0) < tol and abs(shift[idx]) < tol and src.shape[ax] == dst.shape[ax]
        if not same:
            candidates.append(ax)
    if len(candidates) > 1:
        return None
    return candidates[0] if candidates else 0


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror-reflect integer indices into ``[0, n-1]`` (scipy's ``mode='mirror'``)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx > n - 1, period - idx, idx)


def cubic_matrix(n: int, coords: np.ndarray) -> np.ndarray:
    """The interpolating cubic B-spline along one axis as a matrix: ``(len(coords), n)`` float64.

    Row ``j`` holds the weights of the ``n`` samples at continuous index ``coords[j]`` (clamped to
    ``[0, n-1]``): scipy's order-3 prefilter with mirror boundaries composed with the cubic B-spline basis,
    the same operator as ``scipy.ndimage`` order 3 and SimpleITK's ``sitkBSpline``.
    """
    u = np.clip(np.asarray(coords, dtype=np.float64), 0.0, n - 1.0)
    from scipy import ndimage  # imported on first use: `import DiffusionCore` stays light (Slicer's start)

    prefilter = ndimage.spline_filter1d(np.eye(n), order=3, axis=0, mode="mirror")  # column k: the k-th impulse
    i0 = np.floor(u).astype(int)
    t = u - i0
    weights = (
        (1.0 - t) ** 3 / 6.0,
        (4.0 - 6.0 * t**2 + 3.0 * t**3) / 6.0,
        (1.0 + 3.0 * t + 3.0 * t**2 - 3.0 * t**3) / 6.0,
        t**3 / 6.0,
    )
    out = np.zeros((len(u), n), dtype=np.float64)
    for off, w in zip(range(-1, 3), weights):
        out += prefilter[_mirror(i0 + off, n)] * w[:, None]
    return out


def interpolate_1d(arr: np.ndarray, coords: np.ndarray, axis: int, method: str) -> np.ndarray:
    """Resample ``arr`` along ``axis`` at continuous indices ``coords`` (clamped to the first/last slice).

    ``cubic`` is an interpolating cubic B-spline (prefilter with mirror boundaries, then the cubic
    B-spline basis), the same as ``scipy.ndimage`` order 3 and SimpleITK's ``sitkBSpline``.
    """
    n = arr.shape[axis]
    u = np.clip(np.asarray(coords, dtype=np.float64), 0.0, n - 1.0)
    a = np.moveaxis(arr, axis, 0)
    if method == "nearest":
        out = a[np.clip(np.floor(u + 0.5).astype(int), 0, n - 1)]
    elif method == "linear":
        i0 = np.clip(np.floor(u).astype(int), 0, max(n - 2, 0))
        t = (u - i0).astype(np.float32)[:, None, None]
        i1 = np.minimum(i0 + 1, n - 1)
        out = a[i0] * (1.0 - t) + a[i1] * t
    elif method == "cubic":
        # one matrix product (n_out x n) @ (n x voxels per slice) in float32: the prefilter and the basis
        # folded into one small float64 operator, then BLAS; float32 rounding only (~1e-4 HU)
        w = cubic_matrix(n, u).astype(np.float32)
        flat = np.ascontiguousarray(a, dtype=np.float32).reshape(n, -1)
        out = (w @ flat).reshape((len(u),) + a.shape[1:])
    else:
        raise InputError(f"unknown interpolation {method!r}: use one of {', '.join(INTERPOLATION_METHODS)}")
    return np.ascontiguousarray(np.moveaxis(out.astype(np.float32, copy=False), 0, axis))


def interpolate(vol: Volume, grid: Grid, method: str = "cubic") -> Volume:
    """Resample ``vol`` onto ``grid`` with ``nearest``, ``linear`` or ``cubic`` (B-spline) interpolation.

    Args:
        vol: source volume (e.g. thick slices).
        grid: target grid (e.g. ``thin_grid(vol, 4)`` or a reference volume's ``.grid``).
        method: one of :data:`INTERPOLATION_METHODS`.

    Returns:
        A volume on ``grid`` (float32 HU).
    """
    if method not in INTERPOLATION_METHODS:
        raise InputError(f"unknown interpolation {method!r}: use one of {', '.join(INTERPOLATION_METHODS)}")
    ax = single_axis(vol.grid, grid)
    if ax is not None:
        m = _index_map(vol.grid, grid)
        idx = 2 - ax
        coords = m[idx, idx] * np.arange(grid.shape[ax]) + m[idx, 3]
        arr = interpolate_1d(vol.array, coords, ax, method)
    else:
        out = sitk.Resample(
            vol.to_sitk(),
            grid.to_sitk_reference(),
            sitk.Transform(),
            _SITK_INTERPOLATORS[method],
            -1024.0,
            sitk.sitkFloat32,
            True,  # nearest-neighbour extrapolation outside the source
        )
        arr = sitk.GetArrayFromImage(out)
    return Volume.from_grid(grid, arr, **{**vol.metadata, "method": method})
