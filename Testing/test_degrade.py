"""Thick-slice simulation: slab / decimation values and exact geometry along every axis."""

from __future__ import annotations

import numpy as np
import pytest

from DiffusionCore.degrade import crop_to_slabs, degrade, plan_thin_grid, thin_grid
from DiffusionCore.errors import GeometryError, InputError
from DiffusionCore.volume import Grid, Volume


def centre(grid: Grid, index_zyx: tuple[float, float, float]) -> np.ndarray:
    """LPS position (mm) of the voxel at array index (z, y, x)."""
    z, y, x = index_zyx
    return (grid.index_to_physical() @ np.array([x, y, z, 1.0]))[:3]


def slice_centre(grid: Grid, axis: int, j: float) -> np.ndarray:
    idx = [0.0, 0.0, 0.0]
    idx[axis] = j
    return centre(grid, tuple(idx))


def assert_grids_equal(a: Grid, b: Grid) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-12)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-9)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_slab_average_values_and_centres(oblique_phantom, axis, k):
    vol = oblique_phantom
    thick = degrade(vol, k, axis=axis, method="slab")
    n = vol.shape[axis] // k
    a = np.moveaxis(vol.array.astype(np.float64), axis, 0)
    expected = a[: n * k].reshape(n, k, *a.shape[1:]).mean(axis=1)
    np.testing.assert_allclose(np.moveaxis(thick.array, axis, 0), expected, atol=1e-3)
    assert thick.shape[axis] == n
    sp = np.array(vol.spacing)
    sp[2 - axis] *= k
    np.testing.assert_allclose(thick.spacing, sp)
    np.testing.assert_array_equal(thick.direction, vol.direction)
    for j in (0, n - 1):
        thin_centres = [slice_centre(vol.grid, axis, j * k + i) for i in range(k)]
        np.testing.assert_allclose(
            slice_centre(thick.grid, axis, j), np.mean(thin_centres, axis=0), atol=1e-9
        )
    assert thick.metadata["degradation"] == "slab" and thick.metadata["factor"] == k


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 3])
def test_decimation_keeps_one_slice_per_slab_in_place(oblique_phantom, axis, k):
    vol = oblique_phantom
    thick = degrade(vol, k, axis=axis, method="decimate")
    c = (k - 1) // 2
    n = vol.shape[axis] // k
    kept = np.take(vol.array, np.arange(n) * k + c, axis=axis)
    np.testing.assert_array_equal(thick.array, kept)
    for j in (0, n - 1):
        np.testing.assert_allclose(
            slice_centre(thick.grid, axis, j), slice_centre(vol.grid, axis, j * k + c), atol=1e-9
        )


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_thin_grid_of_a_slab_volume_is_the_cropped_reference_grid(oblique_phantom, axis, k):
    thick = degrade(oblique_phantom, k, axis=axis)
    assert_grids_equal(thin_grid(thick, k, axis=axis), crop_to_slabs(oblique_phantom, k, axis).grid)


def test_thin_grid_detects_the_thick_axis(oblique_phantom):
    thick = degrade(oblique_phantom, 4, axis="z")  # z spacing 10 mm vs 0.9 in-plane
    assert_grids_equal(thin_grid(thick, 4), crop_to_slabs(oblique_phantom, 4, "z").grid)


def test_crop_to_slabs_drops_trailing_slices(oblique_phantom):
    cropped = crop_to_slabs(oblique_phantom, 5, "z")  # 24 slices -> 20
    assert cropped.shape == (20, 32, 32)
    np.testing.assert_array_equal(cropped.array, oblique_phantom.array[:20])
    assert cropped.origin == oblique_phantom.origin


def test_target_spacing_matches_the_equivalent_factor(oblique_phantom):
    thick = degrade(oblique_phantom, 4, axis="z")  # 10 mm slices
    assert_grids_equal(thin_grid(thick, target_spacing=2.5), thin_grid(thick, 4))
    g = thin_grid(thick, target_spacing=3.0)  # not a divisor: as many 3 mm slices as fit in the slabs
    assert g.shape == (int(np.floor(6 * 10 / 3.0)), 32, 32)
    np.testing.assert_allclose(g.spacing[2], 3.0)
    # the first thin slice starts half a thin slice inside the first slab
    lower_edge = slice_centre(thick.grid, 0, -0.5)
    np.testing.assert_allclose(slice_centre(g, 0, -0.5), lower_edge, atol=1e-9)


@pytest.mark.parametrize("stored, target, k", [
    (np.float32(1.4), 0.7, 2),  # a float32 NIfTI header: 1.39999998 mm
    (4.999999903, 1.25, 4),  # DICOM positions written with a few decimals
    (5.0000001, 0.625, 8),
    (2.5, 2.5 / 3, 3),  # a target that is itself rounded (0.8333...)
])
def test_a_target_spacing_within_the_rounding_of_files_gives_the_factor_run(stored, target, k):
    """A radiologist asking for 0.7 mm from 1.4 mm slices gets every slice --factor 2 gives, and the same run: the
    file's 1.39999998 mm made the grid one slice short and sent the run down the resampling path."""
    thick = Grid(shape=(100, 16, 16), spacing=(0.7, 0.7, float(stored)), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    assert_grids_equal(thin_grid(thick, target_spacing=target), thin_grid(thick, k))
    grid, axis, factor = plan_thin_grid(thick, target_spacing=target)
    assert (grid.shape, axis, factor) == ((100 * k, 16, 16), 0, k)
    # a target spacing that is no whole fraction of the slices stays a resampling onto that spacing
    grid, _, factor = plan_thin_grid(thick, target_spacing=float(stored) / 2.5)
    assert factor is None and grid.shape[0] == 250


@pytest.mark.parametrize("bad", [0.0, -1.0, 10.0, 12.0, 1.0])
def test_target_spacing_out_of_range(oblique_phantom, bad):
    thick = degrade(oblique_phantom, 4, axis="z")
    with pytest.raises(GeometryError):
        thin_grid(thick, target_spacing=bad)


def test_isotropic_input_has_no_thick_axis(make_phantom):
    iso = make_phantom(spacing=(1.0, 1.0, 1.0))
    with pytest.raises(GeometryError, match="isotropic"):
        thin_grid(iso, 2)
    assert thin_grid(iso, 2, axis="z").shape == (48, 32, 32)  # an explicit axis is allowed


@pytest.mark.parametrize("factor", [1, 0, 9, 16, 2.5])
def test_factor_out_of_range(oblique_phantom, factor):
    with pytest.raises(GeometryError):
        degrade(oblique_phantom, factor)
    with pytest.raises(GeometryError):
        thin_grid(degrade(oblique_phantom, 2), factor)


def test_factor_leaving_fewer_than_two_slabs(make_phantom):
    vol = make_phantom(shape=(5, 16, 16))
    with pytest.raises(GeometryError, match="fewer than 2 slabs"):
        degrade(vol, 3)


def test_unknown_degradation(oblique_phantom):
    with pytest.raises(InputError, match="unknown degradation"):
        degrade(oblique_phantom, 2, method="gaussian")


def test_degrade_keeps_the_input_untouched(oblique_phantom):
    before = oblique_phantom.array.copy()
    degrade(oblique_phantom, 2)
    degrade(oblique_phantom, 2, method="decimate")
    np.testing.assert_array_equal(oblique_phantom.array, before)
    assert isinstance(degrade(oblique_phantom, 2), Volume)
