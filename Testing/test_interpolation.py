"""Interpolation baselines: polynomial reproduction, agreement with SimpleITK, exact output geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from DiffusionCore.degrade import thin_grid
from DiffusionCore.errors import InputError
from DiffusionCore.interpolation import INTERPOLATION_METHODS, interpolate
from DiffusionCore.volume import Grid, Volume


def along_z(values: np.ndarray, direction: np.ndarray | None = None) -> Volume:
    """A thick volume (n, 3, 4) whose slices hold ``values`` (constant in-plane), 0.8 x 0.8 x 4 mm."""
    arr = np.broadcast_to(values[:, None, None], (len(values), 3, 4)).astype(np.float32)
    return Volume(
        arr,
        spacing=(0.8, 0.8, 4.0),
        origin=(5.0, -7.0, 30.0),
        direction=np.eye(3) if direction is None else direction,
    )


def source_index(src: Grid, dst: Grid) -> np.ndarray:
    """Continuous source z index of every destination slice (both grids share x and y)."""
    m = np.linalg.inv(src.index_to_physical()) @ dst.index_to_physical()
    return m[2, 2] * np.arange(dst.shape[0]) + m[2, 3]


def assert_grid_is(out: Volume, grid: Grid) -> None:
    assert out.grid == grid  # exactly the requested grid, bit for bit


@pytest.mark.parametrize("method", ["linear", "cubic"])
@pytest.mark.parametrize("k", [2, 4])
def test_linear_ramp_is_reproduced(method, k, oblique_direction):
    n = 24
    thick = along_z(10.0 * np.arange(n) - 300.0, oblique_direction)
    grid = thin_grid(thick, k, axis="z")
    out = interpolate(thick, grid, method)
    assert_grid_is(out, grid)
    u = source_index(thick.grid, grid)
    # the cubic prefilter's mirror boundary bends the ramp near the ends; its effect decays as 0.27^distance
    margin = 8 if method == "cubic" else 1
    inner = (u >= margin) & (u <= n - 1 - margin)
    expected = 10.0 * u - 300.0
    np.testing.assert_allclose(out.array[inner, 1, 2], expected[inner], atol=1e-3)
    # beyond the outermost slice centres values are held, never extrapolated
    assert out.array[0, 0, 0] == pytest.approx(-300.0, abs=0.2 if method == "cubic" else 1e-4)


def test_cubic_polynomial_is_reproduced_by_cubic_bspline():
    n = 40
    t = np.arange(n, dtype=np.float64)
    poly = lambda x: 0.02 * (x - 20) ** 3 - 0.5 * (x - 20) ** 2 + 3.0 * x  # noqa: E731
    thick = along_z(poly(t))
    grid = thin_grid(thick, 4, axis="z")
    out = interpolate(thick, grid, "cubic")
    u = source_index(thick.grid, grid)
    inner = (u >= 12) & (u <= n - 13)
    np.testing.assert_allclose(out.array[inner, 2, 3], poly(u[inner]), rtol=1e-4, atol=2e-3)
    lin = interpolate(thick, grid, "linear")
    assert np.abs(lin.array[inner, 2, 3] - poly(u[inner])).max() > 0.05  # linear cannot do this


def test_nearest_takes_the_closest_thick_slice(oblique_direction):
    thick = along_z(np.array([0.0, 100.0, 200.0, 300.0, 400.0]), oblique_direction)
    grid = thin_grid(thick, 4, axis="z")
    out = interpolate(thick, grid, "nearest")
    u = source_index(thick.grid, grid)
    expected = 100.0 * np.clip(np.round(u), 0, 4)
    np.testing.assert_array_equal(out.array[:, 0, 0], expected)
    np.testing.assert_array_equal(np.unique(out.array), [0.0, 100.0, 200.0, 300.0, 400.0])


@pytest.mark.parametrize("method", INTERPOLATION_METHODS)
@pytest.mark.parametrize("axis", [0, 2])
def test_matches_simpleitk_resample_in_the_interior(method, axis, oblique_direction):
    rng = np.random.default_rng(3)
    arr = ndimage.gaussian_filter(rng.normal(size=(14, 12, 13)), 1.0) * 2000.0
    spacing = [0.7, 0.8, 0.9]
    spacing[2 - axis] = 3.0
    thick = Volume(
        arr.astype(np.float32), spacing=tuple(spacing), origin=(1.0, 2.0, 3.0), direction=oblique_direction
    )
    grid = thin_grid(thick, 3, axis=axis)
    ours = interpolate(thick, grid, method)
    assert_grid_is(ours, grid)
    interp = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "cubic": sitk.sitkBSpline}[
        method
    ]
    ref = sitk.GetArrayFromImage(
        sitk.Resample(
            thick.to_sitk(), grid.to_sitk_reference(), sitk.Transform(), interp, 0.0, sitk.sitkFloat32
        )
    )
    n = thick.shape[axis]
    m = np.linalg.inv(thick.index_to_physical()) @ grid.index_to_physical()
    u = m[2 - axis, 2 - axis] * np.arange(grid.shape[axis]) + m[2 - axis, 3]
    inner = np.flatnonzero((u >= 1) & (u <= n - 2))
    np.testing.assert_allclose(
        np.take(ours.array, inner, axis=axis),
        np.take(ref, inner, axis=axis),
        atol=0.05 if method == "cubic" else 1e-3,
    )


def test_non_aligned_grid_uses_3d_resampling_exactly(oblique_direction):
    """A rotated, shifted target grid: linear interpolation reproduces a linear function of position."""
    src = Volume(np.zeros((12, 14, 16), np.float32), spacing=(1.0, 1.2, 2.0), origin=(-8.0, -8.0, -12.0))
    pts = src.index_to_physical()
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in src.shape], indexing="ij")
    phys = np.einsum("ab,bzyx->azyx", pts[:3, :3], np.stack([xx, yy, zz])) + pts[:3, 3, None, None, None]
    gradient = np.array([3.0, -2.0, 5.0])
    src.array[:] = np.einsum("a,azyx->zyx", gradient, phys) + 100.0

    target = Grid(
        shape=(6, 7, 8),
        spacing=(1.1, 0.9, 1.3),
        origin=(-3.3, -2.1, -4.0),
        direction=tuple(
            Rotation.from_rotvec(np.deg2rad(12.0) * np.array([0.2, 0.9, -0.4]) / 0.9849).as_matrix().ravel()
        ),
    )
    out = interpolate(src, target, "linear")
    assert_grid_is(out, target)
    t = target.index_to_physical()
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in target.shape], indexing="ij")
    tphys = np.einsum("ab,bzyx->azyx", t[:3, :3], np.stack([xx, yy, zz])) + t[:3, 3, None, None, None]
    sidx = (
        np.einsum("ab,bzyx->azyx", np.linalg.inv(pts)[:3, :3], tphys)
        + np.linalg.inv(pts)[:3, 3, None, None, None]
    )
    inside = np.all((sidx >= 0) & (sidx <= np.array(src.shape[::-1])[:, None, None, None] - 1), axis=0)
    assert inside.mean() > 0.5
    expected = np.einsum("a,azyx->zyx", gradient, tphys) + 100.0
    np.testing.assert_allclose(out.array[inside], expected[inside], atol=1e-2)
    for method in ("nearest", "cubic"):
        assert_grid_is(interpolate(src, target, method), target)


def test_same_grid_is_identity_and_input_is_untouched(oblique_phantom):
    before = oblique_phantom.array.copy()
    for method in INTERPOLATION_METHODS:
        out = interpolate(oblique_phantom, oblique_phantom.grid, method)
        np.testing.assert_allclose(out.array, oblique_phantom.array, atol=1e-3)
    np.testing.assert_array_equal(oblique_phantom.array, before)


def test_unknown_method():
    vol = along_z(np.arange(4.0))
    with pytest.raises(InputError, match="unknown interpolation 'lanczos'"):
        interpolate(vol, vol.grid, "lanczos")
