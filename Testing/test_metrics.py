"""HU metrics: PSNR, 3D SSIM, HU-MAE, body mask and consistency, checked against hand values and skimage."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from DiffusionCore.degrade import crop_to_slabs, degrade, thin_grid
from DiffusionCore.errors import ConfigError, GeometryError, InputError
from DiffusionCore.interpolation import interpolate
from DiffusionCore.metrics import (
    BODY_MASK_DEFINITION,
    ReferenceStats,
    body_mask,
    consistency_psnr,
    hu_mae,
    psnr,
    quality_report,
    ssim3d,
)
from DiffusionCore.volume import Volume

PEAK = 3072.0  # width of the default HU range [-1024, 2048]


def test_psnr_of_a_constant_offset():
    ref = np.zeros((4, 5, 6), np.float32)
    assert psnr(ref, ref + 10.0) == pytest.approx(10 * math.log10(PEAK**2 / 100.0), abs=1e-9)  # 49.74 dB
    assert psnr(ref, ref) == math.inf


def test_psnr_inside_a_mask_and_with_another_range():
    ref = np.zeros((2, 4, 4), np.float32)
    test = ref.copy()
    test[0] = 30.0
    test[1] = 3.0
    mask = np.zeros(ref.shape, bool)
    mask[1] = True
    assert psnr(ref, test, mask=mask) == pytest.approx(10 * math.log10(PEAK**2 / 9.0))
    mse_all = (30.0**2 + 3.0**2) / 2
    assert psnr(ref, test) == pytest.approx(10 * math.log10(PEAK**2 / mse_all))
    assert psnr(ref, test, hu_range=(-100.0, 100.0)) == pytest.approx(10 * math.log10(200.0**2 / mse_all))
    with pytest.raises(ValueError, match="mask is empty"):
        psnr(ref, test, mask=np.zeros(ref.shape, bool))


def test_psnr_clips_both_volumes_to_the_hu_range():
    ref = np.array([-3000.0, 3000.0, 0.0, 0.0]).reshape(1, 2, 2)
    test = np.array([-1024.0, 2048.0, 0.0, 0.0]).reshape(1, 2, 2)
    assert psnr(ref, test) == math.inf  # differences outside [-1024, 2048] do not count
    test2 = test.copy()
    test2[0, 1, 1] = 20.0
    assert psnr(ref, test2) == pytest.approx(10 * math.log10(PEAK**2 / (400.0 / 4)))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_volumes_on_different_grids_are_refused_and_rounding_is_not():
    """Two volumes of one shape placed elsewhere in space (a one-slice shift, another spacing) used to be scored
    voxel by voxel as if they lay on each other; rounding of a file header's origin must still pass."""
    a = np.random.default_rng(0).normal(0.0, 300.0, (12, 16, 16)).astype(np.float32)
    ref = Volume(a, (0.7, 0.7, 2.5), origin=(-100.0, 50.0, 10.0))
    rounded = Volume(a + 5.0, (0.7, 0.7, 2.5), origin=(-100.001, 50.0, 10.002))
    expected = 10 * math.log10(PEAK**2 / 25.0)
    assert psnr(ref, rounded) == pytest.approx(expected, abs=0.01)
    assert psnr(ReferenceStats(ref), rounded) == pytest.approx(expected, abs=0.01)
    shifted = Volume(a + 5.0, (0.7, 0.7, 2.5), origin=(-100.0, 50.0, 12.5))
    coarser = Volume(a + 5.0, (0.7, 0.7, 5.0), origin=(-100.0, 50.0, 10.0))
    for test in (shifted, coarser):
        for score in (psnr, hu_mae, ssim3d, quality_report):
            with pytest.raises(ValueError, match="same shape .* but lie on different grids: the same voxel is up to"):
                score(ReferenceStats(ref) if score is ssim3d else ref, test)
    assert psnr(a, shifted.array + 0.0) == pytest.approx(expected, abs=0.01)  # bare arrays carry no grid


@pytest.mark.parametrize("where", ["reference", "test"])
def test_a_nan_voxel_is_refused_with_a_count_not_scored_as_nan(where):
    a = np.zeros((12, 12, 12), np.float32)
    bad = a.copy()
    bad[3, 4, 5] = bad[6, 7, 8] = np.nan
    ref, test = (bad, a + 1.0) if where == "reference" else (a, bad)
    for score in (psnr, hu_mae, ssim3d):
        with pytest.raises(ValueError, match=f"cannot score: the {where} volume holds 2 NaN voxels"):
            score(ref, test)
    assert psnr(a, np.full_like(a, np.inf)) == pytest.approx(10 * math.log10(PEAK**2 / 2048.0**2))  # clipped


def test_hu_mae_by_hand():
    ref = np.zeros((1, 2, 2), np.float32)
    test = np.array([10.0, -20.0, 0.0, 5000.0]).reshape(1, 2, 2)
    assert hu_mae(ref, test) == pytest.approx((10 + 20 + 0 + 2048) / 4)  # 5000 clipped to 2048
    mask = np.array([True, True, False, False]).reshape(1, 2, 2)
    assert hu_mae(ref, test, mask=mask) == pytest.approx(15.0)


def _smooth_random(shape, seed, scale=600.0):
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * scale * 4).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim3d_matches_skimage(seed):
    ref = _smooth_random((20, 22, 24), seed) - 300.0
    test = ref + _smooth_random((20, 22, 24), seed + 10, scale=150.0)
    test[2, 3, 4] = 5000.0  # outside the range: clipping must happen before SSIM
    ours = ssim3d(ref, test)
    ref_c, test_c = (
        np.clip(ref, -1024, 2048).astype(np.float64),
        np.clip(test, -1024, 2048).astype(np.float64),
    )
    theirs = structural_similarity(
        ref_c, test_c, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=PEAK
    )
    assert 0.2 < ours < 0.999
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert ssim3d(ref, ref) == pytest.approx(1.0, abs=1e-9)


def test_ssim3d_refuses_volumes_smaller_than_the_window():
    with pytest.raises(ValueError, match="too small"):
        ssim3d(np.zeros((10, 20, 20)), np.zeros((10, 20, 20)))


def test_body_mask_fills_the_lungs_and_excludes_outside_air(phantom):
    arr = phantom.array
    mask = body_mask(phantom)
    outside = body_outside_air(arr)
    lungs = (arr < -500) & ~outside
    assert lungs.sum() > 100
    assert mask[lungs].all()
    assert mask[arr > -500].all()
    assert not mask[outside].any()


def body_outside_air(arr):
    """Air connected to the volume's in-plane border, slice by slice."""
    out = np.zeros(arr.shape, bool)
    for z in range(arr.shape[0]):
        labels, _ = ndimage.label(arr[z] < -500)
        edge = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
        out[z] = np.isin(labels, list(edge))
    return out


def legs_on_a_table() -> Volume:
    """Two legs apart (fat, muscle, a bone; 48 mm across) on a CT table (a plate 4 mm thick and a 10 mm rail),
    with specks in the air between them: 12 slices of 2.5 mm, 1 mm pixels."""
    z, y, x = np.meshgrid(np.arange(12), np.arange(96), np.arange(128), indexing="ij")
    a = np.full((12, 96, 128), -1000.0, np.float32)
    for cx, r in ((36, 24), (92, 22)):  # the right leg a little thicker
        d = np.hypot(y - 44, x - cx)
        a[d < r] = -90.0  # fat
        a[d < r - 5] = 40.0  # muscle
        a[np.hypot(y - 44, x - cx + 2 * np.sin(z / 3)) < 6] = 1100.0  # bone
    a[:, 74:78, 4:124] = 200.0  # the table top
    a[:, 78:88, 60:70] = 200.0  # its rail
    a[5, 20, 64] = a[5:7, 60:62, 64:66] = 50.0  # specks (fluff, a drop of noise)
    return Volume(a, (1.0, 1.0, 2.5), (0.0, 0.0, 0.0))


def test_body_mask_keeps_every_body_part_and_leaves_out_the_table():
    """Two legs apart are two components: the mask kept the larger only, so body PSNR and MAE measured one leg
    (50% of the tissue). Now each part that a 25 mm square fits in, and of 10 cm^3 or more, is body; the table
    (a plate and a rail: no such square) and the specks (too small) are not."""
    vol = legs_on_a_table()
    a = vol.array
    mask = body_mask(vol)
    legs = (a > -500) & (np.arange(96)[None, :, None] < 70)
    legs[5, 20, 64] = legs[5:7, 60:62, 64:66] = False  # the specks
    assert mask[legs].all()  # both legs, not one
    assert mask[:, 44, 36].all() and mask[:, 44, 92].all()
    assert not mask[:, 74:].any()  # the table
    assert not mask[5, 20, 64] and not mask[5, 60, 64]  # the specks
    assert not mask[:, 44, 62:68].any()  # the air between the legs
    assert np.array_equal(ReferenceStats(vol).body_mask(), mask)
    # the same scan stored in sagittal slices (array axis 0 along x): the square lies in the axial plane still
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    sagittal = Volume(np.ascontiguousarray(a.transpose(2, 0, 1)), (2.5, 1.0, 1.0), (0.0, 0.0, 0.0), direction)
    assert np.array_equal(body_mask(sagittal), mask.transpose(2, 0, 1))
    assert "25 x 25 mm square" in BODY_MASK_DEFINITION and "10 cm^3" in BODY_MASK_DEFINITION


def test_body_mask_of_pure_air_is_empty():
    assert not body_mask(np.full((4, 8, 8), -1000.0)).any()


def test_consistency_of_a_slab_consistent_output_is_high(oblique_phantom):
    ref = crop_to_slabs(oblique_phantom, 4, "z")
    thick = degrade(ref, 4, "z")
    assert consistency_psnr(ref, thick, 4, "z") > 60.0  # the reference itself is perfectly consistent
    blurred = ref.with_array(ndimage.uniform_filter1d(ref.array, 7, axis=0))
    assert consistency_psnr(blurred, thick, 4, "z") < consistency_psnr(ref, thick, 4, "z") - 10.0
    with pytest.raises(ValueError, match="not on the input's thin grid"):
        consistency_psnr(crop_to_slabs(oblique_phantom, 2, "z"), thick, 2, "z")


def test_quality_report_keys_and_cubic_beats_nearest(oblique_phantom):
    ref = crop_to_slabs(oblique_phantom, 2, "z")
    thick = degrade(ref, 2, "z")
    grid = thin_grid(thick, 2, axis="z")
    rep = {
        m: quality_report(ref, interpolate(thick, grid, m), thick_input=thick, factor=2, axis="z")
        for m in ("nearest", "cubic")
    }
    assert set(rep["cubic"]) == {"psnr", "psnr_body", "ssim", "hu_mae_body", "consistency_psnr"}
    assert rep["cubic"]["psnr"] > rep["nearest"]["psnr"]
    assert rep["cubic"]["ssim"] > rep["nearest"]["ssim"]


# -- masks that are not bool, and the keyword-only hu_range / mask (probe 47, findings 1 and 6) -----------------------
def _cube_pair(n: int = 12):
    """A soft-tissue cube in air, and a noisy copy: the masked scores differ clearly from the whole volume's."""
    ref = np.full((n, n, n), -1000.0, np.float32)
    ref[3:9, 3:9, 3:9] = 40.0
    test = ref + np.random.default_rng(0).normal(0.0, 10.0, ref.shape).astype(np.float32)
    return ref, test


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.float32, np.float64])
def test_a_0_1_mask_of_any_number_type_scores_as_the_bool_mask(dtype):
    """A label file read with SimpleITK or nibabel gives a uint8 (or float64) mask: numpy took it as indices of
    voxels, not a selection, and psnr scored 49.58 dB instead of 50.22 dB without a word."""
    ref, test = _cube_pair()
    mask = body_mask(ref)
    d = (ref - test).astype(np.float64)[mask]
    want_psnr, want_mae = 10 * math.log10(PEAK**2 / np.mean(d**2)), float(np.abs(d).mean())
    labels = mask.astype(dtype)
    assert psnr(ref, test, mask=labels) == pytest.approx(want_psnr, abs=1e-9)
    assert hu_mae(ref, test, mask=labels) == pytest.approx(want_mae, abs=1e-9)
    report = quality_report(Volume(ref), Volume(test), mask=labels)
    assert report["psnr_body"] == pytest.approx(want_psnr, abs=1e-9)
    assert report["hu_mae_body"] == pytest.approx(want_mae, abs=1e-9)
    assert labels.dtype == dtype and labels.max() == 1  # the caller's mask is left as it was


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        (lambda m: m.astype(np.uint8) * 2, "uint8.* 216 voxels that are neither 0 nor 1 .values from 0 to 2"),
        (lambda m: m.astype(np.float32) * 0.5, "float32.* neither 0 nor 1"),
        (lambda m: np.where(m, np.nan, 0.0), "float64.* neither 0 nor 1 .values from 0 to 0"),
        (lambda m: m.astype(np.complex64), "dtype complex64"),
        (lambda m: m.astype(str), "dtype <U5"),
    ],
    ids=["label-2", "float-half", "nan", "complex", "text"],
)
def test_a_mask_that_is_not_0_and_1_is_refused_with_its_dtype_and_values(mask, words):
    ref, test = _cube_pair()
    bad = mask(body_mask(ref))
    for score in (psnr, hu_mae):
        with pytest.raises(InputError, match=words) as info:
            score(ref, test, mask=bad)
        assert "labels == k" in str(info.value) or "bool array" in str(info.value)
    with pytest.raises(InputError, match=words):
        quality_report(Volume(ref), Volume(test), mask=bad)


def test_a_mask_of_another_shape_is_a_geometry_error_naming_both_shapes():
    ref, test = _cube_pair()
    for score in (psnr, hu_mae):
        with pytest.raises(GeometryError, match=r"the mask has shape \(12, 12, 11\), the volumes \(12, 12, 12\)"):
            score(ref, test, mask=np.ones((12, 12, 11), np.uint8))


def test_hu_range_and_mask_are_keyword_only_and_the_old_positional_calls_still_work_with_a_warning():
    ref, test = _cube_pair()
    mask = body_mask(ref)
    want = psnr(ref, test, hu_range=(-200.0, 200.0), mask=mask)
    with pytest.warns(DeprecationWarning, match=r"psnr\(\): passing hu_range, mask by position is deprecated"):
        assert psnr(ref, test, (-200.0, 200.0), mask) == want
    with pytest.warns(DeprecationWarning, match=r"hu_mae\(\): passing mask, hu_range by position"):
        assert hu_mae(ref, test, mask, (-200.0, 200.0)) == hu_mae(ref, test, mask=mask, hu_range=(-200.0, 200.0))
    with pytest.warns(DeprecationWarning, match=r"ssim3d\(\): passing hu_range by position"):
        assert ssim3d(ref, test, (-200.0, 200.0)) == ssim3d(ref, test, hu_range=(-200.0, 200.0))
    with pytest.raises(TypeError, match="multiple values for argument 'mask'"):
        hu_mae(ref, test, mask, mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the keyword calls warn of nothing
        psnr(ref, test, mask=mask, hu_range=(-1024.0, 2048.0))


def test_a_mask_passed_where_psnr_takes_hu_range_says_to_pass_mask_by_keyword():
    """``psnr(ref, test, mask)``, written by analogy with the old ``hu_mae(ref, test, mask)``, raised numpy's
    "boolean subtract" TypeError."""
    ref, test = _cube_pair()
    with pytest.raises(ConfigError, match=r"hu_range must be two numbers .*shape \(12, 12, 12\).*pass it as mask="):
        with pytest.warns(DeprecationWarning):
            psnr(ref, test, body_mask(ref))


@pytest.mark.parametrize("hu_range", [(2048.0, -1024.0), (0.0, 0.0), (-1024.0, math.inf), (1.0,), "wide"])
def test_an_empty_or_reversed_hu_range_is_refused_not_scored_as_perfect(hu_range):
    """``psnr(ref, test, hu_range=(2048, -1024))`` clipped both volumes to one value and returned inf."""
    ref, test = _cube_pair()
    for score in (psnr, hu_mae, ssim3d):
        with pytest.raises(ConfigError, match="hu_range must be two"):
            score(ref, test, hu_range=hu_range)
    with pytest.raises(ConfigError, match="lo < hi|two numbers"):
        quality_report(Volume(ref), Volume(test), hu_range=hu_range)
