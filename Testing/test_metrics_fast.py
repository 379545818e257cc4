"""The fast metrics against their direct definitions, and one reference shared by many scored volumes.

The 3D SSIM runs as three 1D Gaussian passes in float32, slab by slab; these tests pin it to the plain
formula (a full 3D window, float64), so a change in window, constants or border rule shows up here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from DiffusionCore import metrics
from DiffusionCore.degrade import crop_to_slabs, degrade, thin_grid
from DiffusionCore.evaluate import evaluate
from DiffusionCore.interpolation import interpolate
from DiffusionCore.metrics import ReferenceStats, body_mask, hu_mae, psnr, quality_report, ssim3d
from DiffusionCore.volume import Volume


def direct_ssim3d(ref, test, hu_range=(-1024.0, 2048.0), sigma=1.5, truncate=3.5):
    """Mean SSIM from its definition: a full 3D Gaussian window at every voxel whose window fits, float64."""
    radius = int(truncate * sigma + 0.5)
    g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    g /= g.sum()
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    x = np.clip(np.asarray(ref, np.float64), *hu_range)
    y = np.clip(np.asarray(test, np.float64), *hu_range)

    def local_mean(a):
        return np.einsum("zyxijk,ijk->zyx", sliding_window_view(a, w.shape), w)

    ux, uy = local_mean(x), local_mean(y)
    vx, vy, cxy = local_mean(x * x) - ux**2, local_mean(y * y) - uy**2, local_mean(x * y) - ux * uy
    c1, c2 = (0.01 * (hu_range[1] - hu_range[0])) ** 2, (0.03 * (hu_range[1] - hu_range[0])) ** 2
    s = (2 * ux * uy + c1) * (2 * cxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def direct_body_mask(a, threshold=-500.0, spacing_zyx=(1.0, 1.0, 1.0)):
    """The body mask from its definition: the largest component of ``a > threshold`` and every other one of at least
    BODY_PART_MIN_MM3 that holds a BODY_PART_MIN_SIDE_MM square in an axial slice (a binary erosion of the whole
    thresholded volume by that square, which, face-connected, fits in one component or none), then scipy's
    fill-holes in 3D and in every axial slice (array axis 0)."""
    tissue = a > threshold
    labels, n = ndimage.label(tissue)
    if n == 0:
        return np.zeros(a.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    side = [math.ceil(metrics.BODY_PART_MIN_SIDE_MM / s) for s in spacing_zyx[1:]]
    fits = np.unique(labels[ndimage.binary_erosion(tissue, np.ones((1, *side), bool))])
    big = np.flatnonzero(sizes * math.prod(spacing_zyx) >= metrics.BODY_PART_MIN_MM3)
    mask = np.isin(labels, [np.argmax(sizes), *np.intersect1d(big, fits[fits > 0])])
    mask = ndimage.binary_fill_holes(mask)
    for z in range(mask.shape[0]):
        mask[z] = ndimage.binary_fill_holes(mask[z])
    return mask


def ct_like(shape, seed):
    """A smooth random volume spanning air to bone, with values outside [-1024, 2048] to be clipped."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=shape), 1.2) * 5000.0
    a[rng.random(shape) < 0.01] = 3000.0
    a[rng.random(shape) < 0.01] = -2000.0
    return a.astype(np.float32)


@pytest.fixture
def pair():
    ref = ct_like((17, 14, 15), 0)
    test = ref + ct_like((17, 14, 15), 1) * 0.2
    return ref, test


def test_ssim3d_equals_the_direct_formula(pair):
    ref, test = pair
    expected = direct_ssim3d(ref, test)
    assert 0.3 < expected < 0.99
    assert ssim3d(ref, test) == pytest.approx(expected, abs=1e-6)
    assert ssim3d(ref, test, chunk=1) == pytest.approx(expected, abs=1e-6)  # one slice per slab
    assert ssim3d(ref, ref) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(("hu_range", "sigma"), [((-200.0, 300.0), 1.5), ((-1024.0, 2048.0), 1.0)])
def test_ssim3d_equals_the_direct_formula_for_other_ranges_and_windows(pair, hu_range, sigma):
    ref, test = pair
    expected = direct_ssim3d(ref, test, hu_range=hu_range, sigma=sigma)
    assert ssim3d(ref, test, hu_range=hu_range, sigma=sigma) == pytest.approx(expected, abs=1e-6)
    stats = ReferenceStats(ref)
    ssim3d(stats, test)  # the default range and window are cached too, and must not be reused here
    assert ssim3d(stats, test, hu_range=hu_range, sigma=sigma) == pytest.approx(expected, abs=1e-6)


def test_reference_stats_give_the_same_figures_as_the_bare_reference(pair, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_VOXELS", 100)  # many slabs: seams must not show
    ref, test = pair
    mask = direct_body_mask(ref)
    assert mask.any() and not mask.all()
    stats = ReferenceStats(ref)
    assert ssim3d(stats, test) == ssim3d(ref, test)
    d = np.clip(ref.astype(np.float64), -1024, 2048) - np.clip(test.astype(np.float64), -1024, 2048)
    assert psnr(stats, test) == pytest.approx(10 * math.log10(3072.0**2 / np.mean(d * d)), rel=1e-12)
    assert psnr(stats, test, mask=mask) == pytest.approx(10 * math.log10(3072.0**2 / np.mean(d[mask] ** 2)))
    assert hu_mae(stats, test, mask=mask) == pytest.approx(np.abs(d[mask]).mean(), rel=1e-12)
    assert quality_report(stats, test) == quality_report(ref, test)


def test_reference_stats_compute_once_and_hand_out_read_only_arrays(pair):
    ref, _ = pair
    stats = ReferenceStats(ref)
    mean, var = stats.local_moments()
    assert mean.shape == var.shape == (7, 4, 5)  # one window radius (5) less at every border
    assert stats.local_moments()[0] is mean and stats.body_mask() is stats.body_mask()
    assert body_mask(stats) is stats.body_mask()
    for a in (mean, var, stats.body_mask()):
        with pytest.raises(ValueError, match="read-only"):
            a[0, 0, 0] = 0
    with pytest.raises(ValueError, match="shapes differ"):
        ssim3d(stats, ref[:-1])
    with pytest.raises(ValueError, match="too small"):
        ReferenceStats(ref[:10]).local_moments()


@pytest.mark.parametrize("seed", range(3))
def test_body_mask_equals_scipy_fill_holes(seed):
    rng = np.random.default_rng(seed)
    a = np.full((12, 40, 40), -1000.0, np.float32)
    a[1:11, 5:35, 5:35] = 40.0  # the body
    a[ndimage.gaussian_filter(rng.normal(size=a.shape), 1.5) > 0.12] = -800.0  # lungs, airways, holes
    a[rng.random(a.shape) < 0.02] = 100.0  # specks outside
    assert np.array_equal(body_mask(a), direct_body_mask(a))


def test_body_mask_of_the_phantom_equals_scipy_fill_holes(phantom):
    assert np.array_equal(body_mask(phantom), direct_body_mask(phantom.array, spacing_zyx=phantom.spacing_zyx))


@pytest.mark.parametrize("seed", range(4))
def test_body_mask_with_several_parts_equals_its_definition(seed):
    """Blobs of every size and shape at 4 mm voxels (125 voxels make the least volume of a body part, 7 x 7 pixels
    the least square), with holes: each part is kept or dropped as the definition says, and the holes between
    the parts kept are filled as in one volume."""
    rng = np.random.default_rng(seed)
    a = np.where(ndimage.gaussian_filter(rng.normal(size=(12, 64, 64)), 2.0) > 0.08, 40.0, -1000.0)
    a[rng.random(a.shape) < 0.01] = -800.0  # holes
    a[:, 56:] = -1000.0
    a[:, 60:62, 20:40] = 100.0  # a thin plate below the rest, as a table (a candidate by its size)
    vol = Volume(a.astype(np.float32), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    labels, n = ndimage.label(a > -500)
    sizes = np.bincount(labels.ravel())[1:]
    assert n > 3 and (sizes >= 125).sum() > 2  # several candidate parts besides the largest
    expected = direct_body_mask(vol.array, spacing_zyx=vol.spacing_zyx)
    assert np.array_equal(body_mask(vol), expected)
    assert np.array_equal(ReferenceStats(vol).body_mask(), expected)
    assert not expected[:, 60:62].any()  # the plate is left out


def test_evaluate_scores_each_method_as_if_alone(phantom):
    methods = ("nearest", "linear", "cubic")
    together = evaluate(phantom, 2, methods=methods)["results"]
    ref = crop_to_slabs(phantom, 2, "z")
    thick = degrade(ref, 2, "z")
    grid = thin_grid(thick, 2, axis="z")
    for name, row in zip(methods, together):
        assert row["method"] == name
        alone = evaluate(phantom, 2, methods=(name,))["results"][0]
        by_hand = quality_report(ref, interpolate(thick, grid, name), thick_input=thick, factor=2, axis="z")
        for key, value in by_hand.items():
            assert row[key] == alone[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, key)
        assert row["ssim"] == pytest.approx(
            direct_ssim3d(ref.array, interpolate(thick, grid, name).array), abs=1e-6
        )


def test_the_body_mask_fills_axial_slices_however_the_scan_is_stored():
    # a trunk with an airway along the head-foot axis that runs out of the scan at both ends: 3D hole filling
    # leaves it open, filling each axial slice closes it; a scan stored in sagittal slices (array axis 0 along
    # the patient's left-right) must get the same mask, not one filled in its sagittal planes
    z, y, x = np.meshgrid(np.arange(12), np.arange(32), np.arange(32), indexing="ij")
    r2 = (y - 15.5) ** 2 + (x - 15.5) ** 2
    arr = np.full((12, 32, 32), -1000.0, np.float32)
    arr[r2 < 13**2] = 40.0
    arr[r2 < 3**2] = -1000.0
    axial = Volume(arr, (0.8, 0.8, 2.5), (0.0, 0.0, 0.0))
    assert body_mask(axial)[6, 16, 16]  # the airway counts as body
    # the same voxels stored as (x, z, y): index i runs along y, j along z, k along x
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    sagittal = Volume(np.ascontiguousarray(arr.transpose(2, 0, 1)), (0.8, 2.5, 0.8), (0.0, 0.0, 0.0), direction)
    expected = body_mask(axial).transpose(2, 0, 1)
    assert np.array_equal(body_mask(sagittal), expected)
    assert np.array_equal(ReferenceStats(sagittal).body_mask(), expected)
