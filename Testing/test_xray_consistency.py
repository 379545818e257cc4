"""The re-projection consistency step of X-ray to CT: a generated volume is made to re-project onto its input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ct_phantom_array

from DiffusionCore.intensity import hu_to_unit, unit_to_hu
from DiffusionCore.xray.consistency import drr_consistency
from DiffusionCore.xray.data import render_training_drr
from DiffusionCore.xray.pipeline import XrayToCTGenerator, projection_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FOV = 350.0


@pytest.mark.parametrize("view", ["pa", "lateral"])
def test_a_wrong_density_guess_is_corrected_to_reproject_onto_the_input(view):
    truth = ct_phantom_array((32, 32, 32), seed=1).astype(np.float32)
    # the same anatomy with the attenuation of a band of slices 30% too high: the model's layout along every
    # ray, the wrong totals on some (a uniform error is invisible: radiographs have no absolute scale)
    guess = truth.copy()
    band = guess[12:18]
    band[band > -1000] = (band[band > -1000] + 1000) * 1.3 - 1000
    xray = render_training_drr(torch.from_numpy(truth)[None, None], FOV, 32, view)
    g = hu_to_unit(torch.from_numpy(guess))[None, None]
    before = g.clone()
    out, stats = drr_consistency(g, xray, FOV, view)
    assert torch.equal(g, before)  # the input tensor is not modified
    raw = projection_error(g, xray, FOV, view)["projection_psnr"]
    fixed = projection_error(out, xray, FOV, view)["projection_psnr"]
    assert fixed > raw + 10
    err_before = np.abs(unit_to_hu(g)[0, 0].numpy() - truth).mean()
    err_after = np.abs(unit_to_hu(out)[0, 0].numpy() - truth).mean()
    assert err_after < 0.5 * err_before  # the volume itself moves towards the truth
    assert 0.05 < stats["rays_corrected"] < 0.5 and stats["mean_abs_log_ratio"] > 0.1  # only the band's rays
    air = truth <= -1000
    assert np.allclose(unit_to_hu(out)[0, 0].numpy()[air], unit_to_hu(g)[0, 0].numpy()[air])  # air stays air


def test_the_correction_is_bounded_when_the_radiograph_disagrees():
    truth = ct_phantom_array((32, 32, 32), seed=2).astype(np.float32)
    xray = torch.ones(1, 1, 32, 32) * 0.9  # a flat, dense radiograph that fits no anatomy
    g = hu_to_unit(torch.from_numpy(truth))[None, None]
    out, _ = drr_consistency(g, xray, FOV, "pa")
    mu_ratio = (unit_to_hu(out) + 1000).clamp_min(0) / (unit_to_hu(g) + 1000).clamp_min(1e-3)
    body = unit_to_hu(g) > -900
    assert float(mu_ratio[body].max()) <= 4.0 + 1e-3 and float(mu_ratio[body].min()) >= 0.25 - 1e-3
    assert torch.isfinite(out).all()


def test_xray2ct_applies_it_by_default_and_reports_it():
    gen = XrayToCTGenerator.tiny()
    truth = ct_phantom_array((32, 32, 32), seed=3).astype(np.float32)
    xray = render_training_drr(torch.from_numpy(truth)[None, None], FOV, 64, "pa")[0, 0].numpy()
    vol, report = gen.run(xray, device="cpu", steps=2)
    raw, raw_report = gen.run(xray, device="cpu", steps=2, consistency=False)
    assert report["settings"]["consistency"] is True and raw_report["settings"]["consistency"] is False
    for with_, without in zip(report["stages"], raw_report["stages"]):
        assert with_["projection_psnr"] > without["projection_psnr"]
        assert set(with_["consistency"]) == {"rays_corrected", "rays_emptied", "mean_abs_log_ratio"}
        assert without["consistency"] is None
    assert not np.array_equal(vol.array, raw.array)


def test_tissue_on_rays_the_radiograph_shows_as_air_is_removed():
    truth = ct_phantom_array((32, 32, 32), seed=4).astype(np.float32)
    xray = render_training_drr(torch.from_numpy(truth)[None, None], FOV, 32, "pa")
    guess = truth.copy()
    guess[:, 10:20, 0:2] = 40.0  # soft tissue outside the body, on rays that cross only air
    g = hu_to_unit(torch.from_numpy(guess))[None, None]
    out, stats = drr_consistency(g, xray, FOV, "pa")
    assert float(unit_to_hu(out)[0, 0, :, 10:20, 0:2].max()) < -990
    assert projection_error(out, xray, FOV, "pa")["projection_psnr"] > 40
    # the report counts the emptied rays and keeps a finite mean factor (a report's JSON holds no infinities)
    assert 0 < stats["rays_emptied"] <= stats["rays_corrected"]
    assert np.isfinite(stats["mean_abs_log_ratio"])


def test_a_thick_slice_ct_is_resampled_to_every_stage_cube(make_phantom):
    from DiffusionCore.xray.data import ct_to_cube

    # 5 mm slices are coarser than a 128^3 cube's 2.7 mm voxels, 0.7 mm pixels finer: only x and y are smoothed
    thick = make_phantom(shape=(20, 64, 64), spacing=(0.7, 0.7, 5.0), seed=8)
    for r in (64, 128):
        cube = ct_to_cube(thick, r, 350.0)
        assert cube.shape == (r, r, r) and np.isfinite(cube.array).all() and cube.array.max() > 0
