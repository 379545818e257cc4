"""The through-plane predictor, its training pairs, its training command, and adaptation to the user's scan."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import ct_phantom_array, recipe_changes

from DiffusionCore.config import config_to_dict
from DiffusionCore.degrade import degrade, enforce_consistency, thin_grid
from DiffusionCore.errors import Cancelled, ConfigError, GeometryError, WeightsError
from DiffusionCore.evaluate import evaluate
from DiffusionCore.intensity import hu_to_unit
from DiffusionCore.interpolation import interpolate
from DiffusionCore.sr.adapt import DEFAULT_ADAPT_STEPS, AdaptSettings, adapt_predictor, scan_noise_hu
from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.sr.planes import (
    PairSettings,
    PlaneSource,
    box_resample,
    kernel_look,
    sample_pairs,
    slab_mean,
)
from DiffusionCore.sr.throughplane import (
    PLANE_BATCH_FEATURE_BYTES,
    ThroughPlaneConfig,
    ThroughPlaneNet,
    cubic_planes,
    plane_batch_for,
    predict_residual,
    random_weights,
    state_dict_for_file,
    tiny_predictor,
)
from DiffusionCore.volume import Volume, write_volume
from DiffusionCore.weights.registry import save_safetensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def thick_phantom(shape=(12, 48, 48), seed=0) -> Volume:
    """A thick-slice phantom: 0.8 mm in-plane, 4 mm slices."""
    return Volume(ct_phantom_array(shape, seed=seed), spacing=(0.8, 0.8, 4.0), origin=(-5.0, 3.0, -20.0))


# -- pairs --------------------------------------------------------------------------------------------
def test_box_resample_is_the_exact_box_mean():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(40, 3))
    # width 1 from an integer start: the rows themselves
    np.testing.assert_allclose(box_resample(arr, 5.0, 1.0, 10), arr[5:15], atol=1e-5)
    # width 2.5 from 1.25: by hand, a quarter of row 1, rows 2 and 3 whole, a quarter of row 3... per box
    out = box_resample(arr, 1.25, 2.5, 3)
    manual0 = (0.75 * arr[1] + arr[2] + 0.75 * arr[3]) / 2.5
    np.testing.assert_allclose(out[0], manual0, atol=1e-5)
    # slab-averaging k boxes of width r is one box of width k*r (what makes in-plane pairs consistent)
    np.testing.assert_allclose(slab_mean(box_resample(arr, 0.5, 1.5, 24), 3), box_resample(arr, 0.5, 4.5, 8),
                               atol=1e-5)


def test_pairs_are_slab_averages_in_model_units():
    vol = ct_phantom_array((40, 64, 64))
    src = PlaneSource("phantom", vol, (2.0, 0.8, 0.8))
    thick, thin = sample_pairs([src], 4, 6, PairSettings(thick_rows=6, width=32), np.random.default_rng(1))
    assert thick.shape == (6, 1, 6, 32) and thin.shape == (6, 1, 24, 32)
    assert thick.dtype == np.float32 and -1.0 <= thin.min() and thin.max() <= 1.0
    # each thick row is the mean of its 4 thin rows (inside the HU window, where clipping does not act)
    inside = (np.abs(thin) < 0.99).all(axis=2, keepdims=True)
    means = thin.reshape(6, 1, 6, 4, 32).mean(axis=3)
    np.testing.assert_allclose(np.where(inside, means, thick), thick, atol=1e-4)


def test_a_volume_too_small_for_the_plane_is_refused_with_the_reason():
    src = PlaneSource("small", ct_phantom_array((8, 16, 16)), (2.0, 0.8, 0.8))
    with pytest.raises(Exception, match="no plane of"):
        sample_pairs([src], 8, 2, PairSettings(thick_rows=16, width=96), np.random.default_rng(0))


def _high_frequency(plane: np.ndarray) -> float:
    """The spread of the plane's second differences: what a smoother kernel lowers and a sharper one raises."""
    return float(np.diff(plane, 2, axis=-1).std() + np.diff(plane, 2, axis=-2).std())


def _pairs_with_and_without(k: int, batch: int, seed: int, **augmentation):
    """The same draws of phantom pairs without and with ``augmentation`` (PairSettings fields)."""
    src = PlaneSource("phantom", ct_phantom_array((40, 64, 64)), (2.0, 0.8, 0.8))
    plain = PairSettings(thick_rows=6, width=32, intensity_jitter=0.0)
    return [sample_pairs([src], k, batch, PairSettings(**{**plain.__dict__, **extra}), np.random.default_rng(seed))
            for extra in ({}, augmentation)]


def test_kernel_jitter_gives_pairs_another_kernels_look_and_keeps_them_consistent():
    (thick0, thin0), (thick1, thin1) = _pairs_with_and_without(4, 24, 3, kernel_jitter=1.0)
    # the thick plane is still the slab average of the (new-looking) thin plane
    inside = (np.abs(thin1) < 0.99).all(axis=2, keepdims=True)
    means = thin1.reshape(24, 1, 6, 4, 32).mean(axis=3)
    np.testing.assert_allclose(np.where(inside, means, thick1), thick1, atol=1e-4)
    # some pairs come out smoother and some sharper than the same draws without the jitter
    ratio = np.array([_high_frequency(a) / _high_frequency(b) for a, b in zip(thin1[:, 0], thin0[:, 0])])
    assert (ratio < 0.9).any() and (ratio > 1.1).any()
    # the look itself: a negative value smooths, a positive one sharpens, zero leaves the plane alone
    plane = ct_phantom_array((1, 48, 48))[0] + np.random.default_rng(0).normal(0, 20, (48, 48)).astype(np.float32)
    assert _high_frequency(kernel_look(plane, -1.0)) < 0.8 * _high_frequency(plane)
    assert _high_frequency(kernel_look(plane, 1.0)) > 1.2 * _high_frequency(plane)
    np.testing.assert_array_equal(kernel_look(plane, 0.0), plane)


def test_input_noise_reaches_the_thick_plane_only():
    (thick0, thin0), (thick1, thin1) = _pairs_with_and_without(2, 64, 5, input_noise_hu=40.0)
    np.testing.assert_array_equal(thin1, thin0)  # the target stays the clean thin plane
    scale = (hu_to_unit(np.float32(40.0)) - hu_to_unit(np.float32(0.0)))  # 40 HU in model units
    inside = (np.abs(thick0) < 0.9) & (np.abs(thick1) < 0.9)
    sd = np.array([(thick1[i] - thick0[i])[inside[i]].std() for i in range(64)]) / scale
    assert sd.max() <= 1.1 and sd.min() < 0.3 and sd.max() > 0.7  # per-pair spread drawn in [0, 40] HU


@pytest.mark.parametrize("field", ["kernel_jitter", "input_noise_hu", "intensity_jitter"])
def test_pair_augmentation_settings_are_checked(field):
    for bad in (-0.5, float("nan")):
        with pytest.raises(ConfigError, match=field):
            PairSettings(**{field: bad})


def test_validation_pairs_carry_no_augmentation(tmp_path):
    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig, validation_batches

    src = PlaneSource("phantom", ct_phantom_array((40, 64, 64)), (2.0, 0.8, 0.8))
    pairs = {"thick_rows": 6, "width": 32}
    plain = ThroughPlaneTrainConfig(pairs=pairs, val_pairs=4)
    augmented = ThroughPlaneTrainConfig(pairs={**pairs, "kernel_jitter": 1.0, "input_noise_hu": 30.0}, val_pairs=4)
    for k, (thick, thin) in validation_batches([src], plain).items():
        thick_a, thin_a = validation_batches([src], augmented)[k]
        assert torch.equal(thick, thick_a) and torch.equal(thin, thin_a)


# -- the network --------------------------------------------------------------------------------------
def test_a_fresh_predictor_returns_cubic_interpolation():
    net = ThroughPlaneNet(ThroughPlaneConfig(channels=4, blocks=1, factors=[2, 4])).eval()
    thick = torch.randn(3, 1, 7, 20)
    with torch.no_grad():
        assert torch.count_nonzero(net(thick, 4)) == 0
    assert net(thick, 4).shape == (3, 1, 28, 20)
    with pytest.raises(ConfigError, match="no head for factor 3"):
        net(thick, 3)


def test_the_two_level_predictor_sees_wider_context_on_planes_of_any_size(tmp_path):
    two = ThroughPlaneConfig(channels=4, blocks=1, factors=[2, 4], low_blocks=2, post_blocks=1)
    fresh = ThroughPlaneNet(two).eval()
    thick = torch.randn(2, 1, 7, 21)  # odd sizes: the half-resolution level is cropped back to the plane
    with torch.no_grad():
        assert torch.count_nonzero(fresh(thick, 4)) == 0  # a fresh network is still cubic interpolation
    net = random_weights(ThroughPlaneNet(two), 0, 0.3)
    flat = random_weights(ThroughPlaneNet(ThroughPlaneConfig(4, 1, [2, 4])), 0, 0.3)
    assert net(thick, 4).shape == (2, 1, 28, 21)
    # a change 12 pixels away reaches a thin pixel through the half-resolution level only
    far = thick.clone()
    far[..., 0] += 1.0
    with torch.no_grad():
        assert (net(far, 4) - net(thick, 4))[..., 12].abs().max() > 1e-3
        assert (flat(far, 4) - flat(thick, 4))[..., 12].abs().max() == 0
    # the weights file carries the architecture, and the pipeline rebuilds the same network from it
    loaded = SuperResolver.from_pretrained(str(_weights_file(tmp_path, net)), allow_unregistered=True).predictor
    with torch.no_grad():
        torch.testing.assert_close(loaded(thick, 2), net(thick, 2))
    with pytest.raises(ConfigError, match="post_blocks follow the half-resolution level"):
        ThroughPlaneConfig(channels=4, blocks=1, post_blocks=1)


def test_volume_prediction_averages_both_plane_orientations():
    net = tiny_predictor(0)
    thick = torch.randn(5, 9, 11)
    res = predict_residual(net, thick, 2, plane_batch=4)  # runs a channels-last copy of the network
    assert all(p.is_contiguous() for p in net.parameters())  # the caller's network keeps its layout
    with torch.no_grad():
        a = net(thick.permute(1, 0, 2).unsqueeze(1), 2)[:, 0].permute(1, 0, 2)  # planes over H
        b = net(thick.permute(2, 0, 1).unsqueeze(1), 2)[:, 0].permute(1, 2, 0)  # planes over W
    torch.testing.assert_close(res, 0.5 * (a + b), atol=1e-5, rtol=1e-5)


def test_volume_prediction_adds_into_a_flipped_view_without_a_volume_sized_buffer():
    """The pipeline adds the residual straight into its cubic volume, seen flipped (reversed slabs): the same values as
    the returned residual, scaled, flipped back; so a scan needs no second thin-volume array."""
    net = tiny_predictor(0)
    thick = torch.randn(5, 9, 11)
    res = predict_residual(net, thick, 2, plane_batch=4).numpy()
    base = np.random.default_rng(0).normal(size=(10, 9, 11)).astype(np.float32)
    target = base.copy()
    view = np.flip(target, (0, 2))  # negative strides, as np.flip gives them
    assert predict_residual(net, thick, 2, plane_batch=4, into=view, scale=3.0) is None
    np.testing.assert_allclose(target, base + 3.0 * np.flip(res, (0, 2)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="float32 array of shape"):
        predict_residual(net, thick, 2, into=np.zeros((10, 9, 11)))  # float64: would be cast silently


def test_plane_batches_shrink_for_planes_of_many_thick_slices():
    """A plane batch's feature maps stay bounded: 16 planes of a 64-slice 512-wide scan took 64 MiB each (about six
    at once); a 400-slice scan runs one or two planes per call, and the result does not depend on the batch."""
    per_plane = 32 * 64 * 512 * 4
    assert plane_batch_for(32, 64, 512) == min(16, PLANE_BATCH_FEATURE_BYTES // per_plane)
    assert plane_batch_for(32, 64, 512) * per_plane <= PLANE_BATCH_FEATURE_BYTES
    assert plane_batch_for(32, 400, 512) in (1, 2)
    assert plane_batch_for(32, 4000, 4000) == 1  # never none
    assert plane_batch_for(4, 5, 11) == 16  # small planes: the caller's batch
    net = tiny_predictor(0)
    thick = torch.randn(6, 7, 8)
    torch.testing.assert_close(predict_residual(net, thick, 3, plane_batch=1),
                               predict_residual(net, thick, 3, plane_batch=16), atol=1e-5, rtol=1e-5)


def test_cubic_planes_match_the_volume_interpolation():
    vol = thick_phantom()
    grid = thin_grid(vol, 4)
    cubic = interpolate(vol, grid, "cubic").array  # HU
    planes = torch.from_numpy(np.ascontiguousarray(vol.array[:, 10:12, :].transpose(1, 0, 2)))[:, None]
    np.testing.assert_allclose(cubic_planes(planes, 4)[:, 0].numpy(), cubic[:, 10:12, :].transpose(1, 0, 2),
                               atol=1e-2)


# -- the pipeline -------------------------------------------------------------------------------------
def test_pipeline_with_a_fresh_predictor_equals_cubic_plus_consistency():
    vol = thick_phantom()
    fresh = SuperResolver(None, predictor=ThroughPlaneNet(ThroughPlaneConfig(channels=4, blocks=1)).eval(),
                          weights_sha256="1" * 64, weights_name="fresh")
    out, report = fresh.run(vol, factor=4, device="cpu")
    grid = thin_grid(vol, 4)
    expected = enforce_consistency(interpolate(vol, grid, "cubic"), vol, 0)
    np.testing.assert_allclose(out.array, expected.array, atol=1e-2)
    assert report["predictor"]["used"] and report["predictor"]["factor"] == 4
    assert report["consistency_psnr"] > 100
    assert out.metadata["synthetic"] and report["weights_sha256"] == "1" * 64


def host_units(vol, factor: int) -> int:
    """Progress units of the cubic interpolation and the data consistency of a run at ``factor`` (:meth:`plan`)."""
    from DiffusionCore.sr.settings import SRRunSettings

    resolver = SuperResolver.tiny_predictor()
    grid, axis, _ = resolver.target_grid(vol, factor=factor)
    plan = resolver.plan(vol, grid, SRRunSettings(factor=factor, axis=axis, device="cpu"))
    assert plan.interp_units > 0 and plan.consistency_units > 0
    return plan.interp_units + plan.consistency_units


def test_pipeline_with_a_predictor_never_changes_the_input_and_reports_progress():
    vol = thick_phantom()
    before = vol.array.copy()
    seen = []
    out, report = SuperResolver.tiny_predictor().run(vol, factor=2, device="cpu",
                                                      progress=lambda d, t, m: seen.append((d, t)))
    np.testing.assert_array_equal(vol.array, before)
    assert out.shape == (24, 48, 48) and np.isfinite(out.array).all()
    totals = {t for _, t in seen}
    assert totals == {48 + 48 + host_units(vol, 2)} and seen[-1][0] == seen[-1][1]  # planes, interpolation, consistency
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # the output reproduces the input when thickened again (data consistency)
    np.testing.assert_allclose(degrade(out, 2).array, vol.array, atol=0.05)


def test_adaptation_takes_the_share_of_the_progress_bar_that_its_work_takes():
    """The bar moves with the time spent: adaptation counts the work of its steps in the predictor's planes. On the
    sample scans it took about half of a default run; a fixed tenth of the bar left it stalled at 10% for half the
    run (chest-dx at x4 on 2 cores: 45 s adapting, 50 s predicting)."""
    from DiffusionCore.sr.pipeline import adaptation_units

    vol = thick_phantom()

    def run(adapt):
        seen = []
        SuperResolver.tiny_predictor().run(vol, factor=2, device="cpu", adapt=adapt,
                                           progress=lambda d, t, m: seen.append((d, t, m)))  # fmt: skip
        assert len({t for _, t, _ in seen}) == 1 and seen[-1][0] == seen[-1][1]  # one total, reached at the end
        assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
        return seen[-1][1], max(d for d, _, m in seen if m.startswith("adapting to this scan"))

    planes = 48 + 48 + host_units(vol, 2)  # and the interpolation's and consistency's units
    total, adapted = run(AdaptSettings(steps=4))
    assert total == adapted + planes and adapted > 0
    total8, adapted8 = run(AdaptSettings(steps=8))
    assert adapted8 == pytest.approx(2 * adapted, abs=1)  # twice the steps, twice the share
    seconds_total, seconds_adapted = run(AdaptSettings(seconds=0.3))
    assert seconds_total == seconds_adapted + planes and seconds_adapted >= 1
    # the default 400 steps against chest-dx's geometry at x4 (64 slices, a 512 x 512 body box): the 45 s : 50 s split
    units = adaptation_units(AdaptSettings(), tiny_predictor(), 64, (0, 512, 0, 512), 4)
    assert 0.40 < units / (units + 1024) < 0.50


def test_a_target_spacing_between_factors_runs_the_nearest_factor_and_resamples():
    vol = thick_phantom()
    out, report = SuperResolver.tiny_predictor().run(vol, target_spacing=1.5, device="cpu")
    assert report["predictor"]["factor"] == 3 and report["predictor"]["resampled_to_grid"]
    assert abs(out.spacing_zyx[0] - 1.5) < 1e-6 and np.isfinite(out.array).all()


def test_a_target_spacing_too_close_to_the_input_says_which_spacings_work():
    vol = thick_phantom()  # 4 mm slices
    with pytest.raises(GeometryError, match=r"only 1\.33 times finer than the input's 4 mm.*at most 2\.67 mm, e\.g\. 2 mm"):
        SuperResolver.tiny_predictor().run(vol, target_spacing=3.0, device="cpu")


def test_predictor_only_weights_refuse_samples_with_the_fix():
    with pytest.raises(ConfigError, match="without a diffusion stage"):
        SuperResolver.tiny_predictor().run(thick_phantom(), factor=2, num_samples=2, device="cpu")


def test_cancel_stops_the_predictor_and_the_adaptation():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        SuperResolver.tiny_predictor().run(thick_phantom(), factor=2, device="cpu", cancel=cancel)
    with pytest.raises(Cancelled):
        SuperResolver.tiny_predictor().run(thick_phantom(), factor=2, device="cpu", cancel=cancel,
                                           adapt=AdaptSettings(steps=3))


def test_adaptation_needs_a_predictor():
    with pytest.raises(ConfigError, match="adaptation fine-tunes the through-plane predictor"):
        SuperResolver.tiny().run(thick_phantom((8, 32, 32)), factor=2, device="cpu", adapt=AdaptSettings(steps=1))


def _weights_file(tmp_path, net, name="tp.safetensors"):
    meta = {"family": "sr", "component": "throughplane", "config": {"throughplane": config_to_dict(net.config)}}
    path = tmp_path / name
    save_safetensors(path, state_dict_for_file(net), meta)
    return path


def test_weights_file_round_trip_and_refusals(tmp_path):
    net = tiny_predictor(3)
    path = _weights_file(tmp_path, net)
    loaded = SuperResolver.from_pretrained(str(path), allow_unregistered=True)
    assert loaded.model is None
    for a, b in zip(net.state_dict().values(), loaded.predictor.state_dict().values()):
        torch.testing.assert_close(a, b)
    bad = tiny_predictor(3)
    with torch.no_grad():
        bad.stem.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(WeightsError, match="non-finite"):
        SuperResolver.from_pretrained(str(_weights_file(tmp_path, bad, "nan.safetensors")), allow_unregistered=True)
    with pytest.raises(WeightsError, match="in no registry|not registered|unregistered"):
        SuperResolver.from_pretrained(str(path))


# -- adaptation -----------------------------------------------------------------------------------------
def test_adaptation_lowers_the_loss_on_the_scans_own_pairs_and_leaves_the_weights_alone(tmp_path):
    vol = thick_phantom((10, 64, 64))
    net = tiny_predictor(1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    settings = AdaptSettings(steps=40, batch_size=8, thick_rows=6, width=32, learning_rate=3e-3)
    adapted, report = adapt_predictor(net, vol.array, (4.0, 0.8, 0.8), 2, settings, seed=0)
    assert report["steps"] == 40 and report["skipped"] is None
    assert report["loss_after"] < report["loss_before"]
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])  # the given weights are not changed
    assert adapted is not net
    # the adapted copy (trained channels-last, the CPU's fast layout) is written as a weights file like any other
    loaded = SuperResolver.from_pretrained(str(_weights_file(tmp_path, adapted)), allow_unregistered=True).predictor
    thick = torch.randn(2, 1, 6, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(thick, 2), adapted(thick, 2), atol=1e-5, rtol=1e-5)


def test_adaptation_with_a_step_budget_is_deterministic():
    vol = thick_phantom()
    settings = AdaptSettings(steps=5, batch_size=4, thick_rows=6, width=32)
    runs = [SuperResolver.tiny_predictor().run(vol, factor=2, device="cpu", seed=7, adapt=settings) for _ in range(2)]
    np.testing.assert_array_equal(runs[0][0].array, runs[1][0].array)
    other = SuperResolver.tiny_predictor().run(vol, factor=2, device="cpu", seed=8, adapt=settings)[0]
    assert not np.array_equal(other.array, runs[0][0].array)
    rep = runs[0][1]["predictor"]["adaptation"]
    assert rep["steps"] == 5 and "loss_before" in rep and "loss_after" in rep


def test_adaptation_settings_are_checked():
    for bad in ({"seconds": float("nan")}, {"seconds": -1}, {"steps": 0}):
        with pytest.raises(ConfigError):
            AdaptSettings(**bad)
    # no budget given: the default step count (deterministic); a step count wins over a time budget
    assert AdaptSettings().steps == AdaptSettings(seconds=0).steps == DEFAULT_ADAPT_STEPS
    assert AdaptSettings(seconds=30).steps is None and AdaptSettings(seconds=30, steps=5).steps == 5


def _with_noise(arr: np.ndarray, sd: float, seed: int = 0) -> np.ndarray:
    out = arr.copy()
    body = out > -500
    out[body] += np.random.default_rng(seed).normal(0.0, sd, int(body.sum())).astype(np.float32)
    return out


def test_scan_noise_is_measured_on_the_soft_tissue_of_the_slices():
    arr = ct_phantom_array((8, 96, 96))  # 5 HU of noise in the body
    assert 3.5 < scan_noise_hu(arr) < 6.5
    assert 27.0 < scan_noise_hu(_with_noise(arr, 30.0)) < 34.0  # sqrt(5^2 + 30^2) = 30.4
    assert scan_noise_hu(np.full((4, 32, 32), -1000.0, np.float32)) == 0.0  # no soft tissue to measure it on
    # edges inside the soft-tissue range (bands of -100 and +100 HU, 8 pixels wide) do not count as noise
    bands = np.where((np.arange(64) // 8) % 2 == 0, -100.0, 100.0).astype(np.float32)
    striped = np.broadcast_to(bands, (4, 64, 64)) + np.random.default_rng(1).normal(0, 10, (4, 64, 64))
    assert 8.5 < scan_noise_hu(striped.astype(np.float32)) < 11.5


def test_adaptation_with_matched_noise_adds_what_the_pairs_lack_and_is_deterministic():
    noisy = _with_noise(thick_phantom((10, 64, 64)).array, 30.0)
    kept = noisy.copy()
    settings = AdaptSettings(steps=4, batch_size=4, thick_rows=6, width=32, match_noise=True)
    runs = [adapt_predictor(tiny_predictor(1), noisy, (4.0, 0.8, 0.8), 2, settings, seed=0) for _ in range(2)]
    np.testing.assert_array_equal(noisy, kept)  # the scan is not changed
    rep = runs[0][1]
    assert 27.0 < rep["noise_hu"] < 34.0
    # an in-plane pair's thick row averages S / pitch = 5 pixels: the noise of the other 4/5 is added
    assert rep["input_noise_hu"] == pytest.approx(rep["noise_hu"] * np.sqrt(1.0 - 0.8 / 4.0), abs=0.02)
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain, plain_rep = adapt_predictor(tiny_predictor(1), noisy, (4.0, 0.8, 0.8), 2,
                                       AdaptSettings(steps=4, batch_size=4, thick_rows=6, width=32), seed=0)
    assert "noise_hu" not in plain_rep
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), runs[0][0].parameters()))


def test_adaptation_on_a_scan_too_small_for_pairs_is_skipped_with_the_reason():
    vol = Volume(ct_phantom_array((6, 12, 12)), spacing=(0.8, 0.8, 4.0))
    adapted, report = adapt_predictor(tiny_predictor(), vol.array, (4.0, 0.8, 0.8), 4, AdaptSettings(steps=2))
    assert report["skipped"] and report["steps"] == 0


# -- evaluate ---------------------------------------------------------------------------------------------
def test_evaluate_cubic_dc_is_cubic_made_consistent():
    ref = Volume(ct_phantom_array((24, 40, 40)), spacing=(0.8, 0.8, 1.0))
    report = evaluate(ref, 4, methods=["cubic", "cubic+dc", "sr"],
                      method_options={"resolver": SuperResolver.tiny_predictor()})
    rows = {r["method"]: r for r in report["results"]}
    assert rows["cubic"]["consistency_psnr"] < 80 < rows["cubic+dc"]["consistency_psnr"]
    assert rows["sr"]["consistency_psnr"] > 80
    assert np.isfinite(rows["sr"]["psnr_body"])


def test_evaluate_progress_moves_inside_a_model_method():
    """probe 46: the bar sat at 50 % "sr: reconstructing" for 227 s of a 268 s evaluate run; the sr method's own
    progress (its planes) now moves within the method's share."""
    ref = Volume(ct_phantom_array((24, 40, 40)), spacing=(0.8, 0.8, 1.0))
    seen = []
    evaluate(ref, 4, methods=["cubic", "sr"], method_options={"resolver": SuperResolver.tiny_predictor()},
             progress=lambda d, t, m: seen.append((d, t, m)))  # fmt: skip
    total = seen[0][1]
    assert {t for _, t, _ in seen} == {total} and seen[-1][0] == total
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    inside = {d for d, _, m in seen if total // 2 < d < total and m.startswith("sr: ")}
    assert len(inside) > 2  # several steps strictly inside sr's half, not one jump at its end


@pytest.mark.parametrize(("method", "stage"), [("sr", "planes"), ("sr+adapt", "adapting")])
def test_evaluate_cancel_stops_a_model_method_midway(method, stage):
    """Cancel set while the sr method predicts its planes (sr+adapt: while it adapts) stops it there."""
    ref = Volume(ct_phantom_array((24, 40, 40)), spacing=(0.8, 0.8, 1.0))
    cancel = threading.Event()
    after = []

    def progress(done, total, message):
        if cancel.is_set():
            after.append(message)
        elif stage in message:
            cancel.set()

    options = {"resolver": SuperResolver.tiny_predictor(), "adapt": AdaptSettings(steps=50, batch_size=4)}
    with pytest.raises(Cancelled):
        evaluate(ref, 4, methods=[method], method_options=options, progress=progress, cancel=cancel)
    assert cancel.is_set() and not any("80/80 planes" in m or "consistency" in m for m in after)
    assert len(after) <= 1  # stopped at its next step or plane batch, not at the end of the method


# -- the training command -----------------------------------------------------------------------------
def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "DiffusionCore", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_sr_to_a_spacing_between_factors_writes_no_value_darker_than_air(tmp_path):
    """5 mm to 2 mm with the shipped weights: the x2 prediction resampled to 2 mm rang down to -2089 HU on a chest and
    the run stopped as numerically failed; now it writes a volume whose darkest voxel is air."""
    import nibabel as nib

    z = np.full((40, 48, 48), -1024.0, np.float32)
    z[:, 8:40, 8:40] = 40.0
    z[13:15] = 3000.0
    z[25:27, :, :20] = 1500.0
    src, out = tmp_path / "plates.nii.gz", tmp_path / "thin.nii.gz"
    write_volume(degrade(Volume(z, (0.8, 0.8, 1.25)), 4, "z"), src)
    r = _run(["sr", str(src), str(out), "--target-spacing", "2", "--no-adapt", "--progress", "none",
              "--output-dtype", "float32"])
    assert r.returncode == 0, r.stderr
    written = np.asarray(nib.load(str(out)).dataobj)  # as written: read_volume would turn deep undershoot into air
    assert written.shape[-1] == 25 and written.min() == -1024.0


@pytest.fixture
def training_volume(tmp_path):
    path = tmp_path / "thin.nii.gz"
    write_volume(Volume(ct_phantom_array((60, 64, 64), seed=3), spacing=(0.8, 0.8, 1.0)), path)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({
        "model": {"channels": 8, "blocks": 1, "factors": [2, 4]},
        "pairs": {"thick_rows": 6, "width": 32},
        "batch_size": 4, "val_every": 10, "checkpoint_every": 10, "val_pairs": 4, "learning_rate": 0.003,
    }))
    return path, cfg


def test_train_throughplane_learns_exports_resumes_and_continues_from_weights(training_volume, tmp_path):
    data, cfg = training_volume
    out = tmp_path / "run"
    env_threads = {"OMP_NUM_THREADS": "1"}
    import os

    env = {**os.environ, **env_threads}
    r = _run(["train", "throughplane", "--config", str(cfg), "--data", str(data), "--out-dir", str(out),
              "--max-steps", "30", "--seed", "1"], env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["patches"] == 120
    assert summary["validation"]["val/gain"] > 0  # better than cubic on held-out slices
    weights = out / "throughplane.safetensors"
    resolver = SuperResolver.from_pretrained(str(weights), allow_unregistered=True)
    assert resolver.predictor.factors == [2, 4]
    # `weights import` lists it with what it is (the export's description)
    r = _run(["weights", "import", str(weights), "--name", "my-predictor"],
             env={**env, "DIFFUSIONCORE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    listing = _run(["weights", "list"], env={**env, "DIFFUSIONCORE_CACHE": str(tmp_path / "cache")}).stdout
    assert "through-plane predictor (factors 2-4), trained with train throughplane for 30 steps on 1 CT volume" in listing
    # --resume continues the step count
    r = _run(["train", "throughplane", "--config", str(cfg), "--data", str(data), "--out-dir", str(out),
              "--max-steps", "40", "--resume"], env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 40
    assert "differ from the run's" not in r.stderr  # a longer run (and the seed) are free to change
    # ... and says so when it continues with other settings (they apply from there on)
    r = _run(["train", "throughplane", "--config", str(cfg), "--data", str(data), "--out-dir", str(out),
              "--max-steps", "42", "--resume", "--learning-rate", "0.0005"], env=env)
    assert r.returncode == 0, r.stderr
    assert "resuming with settings that differ from the run's" in r.stderr and "learning_rate: 0.003 -> 0.0005" in r.stderr
    assert json.loads((out / "summary.json").read_text())["validation_at_start"] == {}  # a run from scratch
    # --init-from starts a new run from exported weights, scored before its first step (the baseline of a fine-tune)
    out2 = tmp_path / "run2"
    r = _run(["train", "throughplane", "--config", str(cfg), "--data", str(data), "--out-dir", str(out2),
              "--max-steps", "1", "--init-from", str(weights)], env=env)
    assert r.returncode == 0, r.stderr
    assert "initialised" in r.stderr and f"step 0 (the starting weights, {weights})  val/psnr_x2=" in r.stderr
    at_start = json.loads((out2 / "summary.json").read_text())["validation_at_start"]
    assert at_start == json.loads(r.stdout)["validation_at_start"]
    assert at_start["val/gain"] == pytest.approx(summary["validation"]["val/gain"], abs=0.2)  # its own weights
    logged = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 0, "tag": "val/gain", "value": at_start["val/gain"]}.items() <= next(
        rec for rec in logged if rec["tag"] == "val/gain").items()  # the curve starts at the starting weights


def _torchrun_throughplane(cfg, data, out, *extra):
    """`torchrun --nproc_per_node=2 -m DiffusionCore train throughplane ...`, as a user starts it."""
    import os

    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "DiffusionCore",
         "train", "throughplane", "--config", str(cfg), "--data", str(data), "--out-dir", str(out), *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_train_throughplane_under_torchrun_is_one_run_that_resumes_exactly(training_volume, tmp_path):
    """Under torchrun the processes train one network together (the gradients of their different pairs averaged):
    one folder, one export and one summary, counting every process's planes; a run stopped and resumed under
    torchrun ends with exactly the weights of the run that went straight through (it used to be refused)."""
    from safetensors.torch import load_file

    data, cfg = training_volume
    cfg_data = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**cfg_data, "checkpoint_every": 4}))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    r = _torchrun_throughplane(cfg, data, straight, "--max-steps", "12")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"exported"') == 1  # rank 0 alone exports and prints
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["patches"] == 12 * 4 * 2 and summary["this_run"]["processes"] == 2
    val_steps = [json.loads(line)["step"] for line in (straight / "metrics.jsonl").read_text().splitlines()
                 if '"val/gain"' in line]
    assert val_steps == [10, 12]  # one process writes the log; the last step is scored too
    for args in (["--max-steps", "8"], ["--max-steps", "12", "--resume"]):
        r = _torchrun_throughplane(cfg, data, stopped, *args)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(straight / "throughplane.safetensors"), load_file(stopped / "throughplane.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((stopped / "summary.json").read_text())["patches"] == 96


def test_ranks_draw_different_planes_for_the_same_factor_at_each_step():
    from types import SimpleNamespace

    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig, _step_generators

    cfg = ThroughPlaneTrainConfig(seed=3)
    ranks = [SimpleNamespace(distributed=True, rank=r) for r in (0, 1)]
    for step in (0, 7):
        draws = [[g.random(4) for g in _step_generators(cfg, info, step, None)] for info in ranks]
        assert np.array_equal(draws[0][0], draws[1][0])  # the factor: the same head trains on every rank
        assert not np.array_equal(draws[0][1], draws[1][1])  # the pairs: each rank its own
    # one process keeps the run's own stream, which each checkpoint saves
    own = np.random.default_rng(0)
    assert _step_generators(cfg, SimpleNamespace(distributed=False, rank=0), 5, own) == (own, own)


def test_train_throughplane_refuses_bad_options(training_volume, tmp_path):
    data, cfg = training_volume
    for bad in (["--learning-rate", "nan"], ["--max-steps", "0"], ["--ema-decay", "2"]):
        r = _run(["train", "throughplane", "--config", str(cfg), "--data", str(data), "--out-dir",
                  str(tmp_path / "x"), *bad])
        assert r.returncode == 2, (bad, r.stderr)
        assert "error:" in r.stderr


def test_the_shipped_recipe_config_loads_with_every_factor_the_cli_allows():
    from pathlib import Path

    from DiffusionCore.config import load_config, read_config_file
    from DiffusionCore.degrade import MAX_FACTOR
    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig

    path = Path(__file__).parents[1] / "DiffusionCore" / "sr" / "configs" / "throughplane" / "default.json"
    cfg = load_config(read_config_file(path), ThroughPlaneTrainConfig)
    assert cfg.model.factors == list(range(2, MAX_FACTOR + 1))
    assert cfg.test_fraction == 0.3  # the held-out test region the model card's figures use
    # the augmented recipe tried on 2026-12-04 is this one with the two pair augmentations switched on
    augmented = read_config_file(Path(__file__).parents[1] / "benchmarks" / "throughplane_augment.json")
    base = read_config_file(path)
    assert recipe_changes(augmented, base) == {"pairs.input_noise_hu": (None, 30.0), "pairs.kernel_jitter": (None, 0.7)}
    load_config(augmented, ThroughPlaneTrainConfig)
    # and the one tried after it: the augmented recipe with in-plane slabs up to 20 mm
    thick = read_config_file(Path(__file__).parents[1] / "benchmarks" / "throughplane_thick20.json")
    assert recipe_changes(thick, augmented) == {"pairs.thick_mm": ([2.0, 10.0], [2.0, 20.0])}
    assert load_config(thick, ThroughPlaneTrainConfig).pairs.thick_mm == (2.0, 20.0)


# -- the sr command ---------------------------------------------------------------------------------------
def test_sr_cli_refuses_bad_adaptation_options_before_any_work(tmp_path, capsys):
    from DiffusionCore.cli.main import main

    src = tmp_path / "in.nii.gz"
    write_volume(thick_phantom(), src)
    before = src.read_bytes()
    out = tmp_path / "out.nii.gz"
    for bad in (["--adapt", "nan"], ["--adapt", "-5"], ["--adapt-steps", "0"], ["--adapt", "60", "--adapt-steps", "9"],
                ["--adapt", "5"]):
        # the last: the tiny test model is a latent diffusion model without a predictor to adapt
        rc = main(["sr", str(src), str(out), "--tiny-test-model", *bad, "--progress", "none"])
        err = capsys.readouterr().err
        assert rc == 2, (bad, err)
        assert err.strip().startswith("error:") or "\nerror:" in err
        assert not out.exists()
    assert src.read_bytes() == before


def test_a_volume_thick_along_x_gives_the_transposed_result_of_the_same_volume_thick_along_z():
    vol_z = thick_phantom((10, 24, 28))  # (z, y, x), 4 mm along z
    arr_x = np.ascontiguousarray(np.transpose(vol_z.array, (2, 1, 0)))  # (z, y, x) with x the thick axis
    vol_x = Volume(arr_x, spacing=(4.0, 0.8, 0.8))  # spacing is (x, y, z)
    resolver = SuperResolver.tiny_predictor(seed=4)
    out_z, rep_z = resolver.run(vol_z, factor=2, device="cpu")
    out_x, rep_x = resolver.run(vol_x, factor=2, device="cpu")
    assert rep_x["settings"]["axis"] == "x" and rep_x["predictor"]["used"]
    np.testing.assert_allclose(np.transpose(out_x.array, (2, 1, 0)), out_z.array, atol=1e-2)


# -- a factor the weights have no head for ------------------------------------------------------------------
def _two_head_resolver() -> SuperResolver:
    """A tiny predictor with heads for x2 and x4 only, like weights trained with "factors": [2, 4]."""
    net = random_weights(ThroughPlaneNet(ThroughPlaneConfig(channels=4, blocks=1, factors=[2, 4])), seed=2)
    return SuperResolver(None, predictor=net, weights_name="mine.safetensors", weights_sha256="2" * 64)


def test_a_whole_factor_the_weights_have_no_head_for_is_warned_of_and_noted_in_the_report(caplog):
    """x3 with heads x2 and x4 ran the x2 head and resampled onto the x3 grid; only --report showed it, while the log
    said x2 and the provenance SR x3. Now a warning and a note say so, whether the factor is given, suggested from the
    spacing (4 mm / 0.8 mm: x5) or a target spacing that many times finer; a spacing between factors stays quiet."""
    import logging

    vol = thick_phantom((8, 32, 32))
    resolver = _two_head_resolver()
    for options, asked, head in (({"factor": 3}, 3, 2), ({}, 5, 4), ({"target_spacing": 4.0 / 3.0}, 3, 2)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="DiffusionCore.sr.pipeline"):
            out, report = resolver.run(vol, device="cpu", **options)
        expected = (f"the weights mine.safetensors have through-plane predictor heads for x2, x4 only: x{asked} was "
                    f"made with the x{head} head and resampled onto the x{asked} grid; for a direct result choose "
                    f"factor 2 or 4, or train weights with factor {asked} (model.factors)")  # fmt: skip
        assert report["predictor"]["factor"] == head and report["predictor"]["resampled_to_grid"], options
        assert report["notes"] == [expected], options
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [expected], options
        assert out.shape[0] == 8 * asked
    for options in ({"factor": 4}, {"factor": 2}, {"target_spacing": 1.6}):  # a head; a spacing between x2 and x4
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="DiffusionCore.sr.pipeline"):
            _, report = resolver.run(vol, device="cpu", **options)
        assert "notes" not in report and not caplog.records, options


def test_the_shipped_heads_2_to_8_never_warn_of_a_missing_head():
    from DiffusionCore.sr.pipeline import missing_head_note

    shipped = ThroughPlaneConfig().factors
    assert shipped == [2, 3, 4, 5, 6, 7, 8]
    assert [missing_head_note(shipped, k) for k in range(2, 9)] == [""] * 7
    assert missing_head_note(shipped, 2.5) == missing_head_note(shipped, 10.0) == ""  # between factors, above 8
    assert missing_head_note([2, 3, 5], 4.0).endswith("choose factor 2, 3 or 5, or train weights with factor 4 "
                                                       "(model.factors)")  # fmt: skip
    _, report = SuperResolver.tiny_predictor().run(thick_phantom((8, 32, 32)), factor=3, device="cpu")
    assert report["predictor"]["factor"] == 3 and "notes" not in report


def test_sr_cli_warns_of_a_factor_the_weights_have_no_head_for(tmp_path, capsys):
    from DiffusionCore.cli.main import main

    net = random_weights(ThroughPlaneNet(ThroughPlaneConfig(channels=4, blocks=1, factors=[2, 4])), seed=2)
    weights = _weights_file(tmp_path, net)
    src, out, report = tmp_path / "crop.nii.gz", tmp_path / "e3.nii.gz", tmp_path / "report.json"
    write_volume(thick_phantom((8, 32, 32)), src)
    rc = main(["sr", str(src), str(out), "--weights", str(weights), "--allow-unregistered-weights", "--no-adapt",
               "--factor", "3", "--progress", "none", "--report", str(report)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    line = (f"warning: the weights {weights} have through-plane predictor heads for x2, x4 only: x3 was made with the x2 "
            "head and resampled onto the x3 grid; for a direct result choose factor 2 or 4, or train weights with "
            "factor 3 (model.factors)")  # fmt: skip
    assert line in err.splitlines(), err
    assert json.loads(report.read_text())["notes"] == [line.removeprefix("warning: ")]


# -- probe 47, finding 7: training from Python leaves the caller's process as it was ------------------------------
def _small_recipe(**overrides):
    """The shipped recipe (sr-default's architecture) on small planes, for a few steps."""
    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig

    return ThroughPlaneTrainConfig.recipe(pairs={"thick_rows": 8, "width": 32}, batch_size=2, max_steps=2,
                                          val_every=2, val_pairs=2, checkpoint_every=2, **overrides)  # fmt: skip


def test_the_recipe_is_the_shipped_config_and_fine_tunes_sr_default_from_python(training_volume, tmp_path):
    from DiffusionCore.config import load_config
    from DiffusionCore.sr.throughplane_train import DEFAULT_CONFIG, ThroughPlaneTrainConfig, train

    assert config_to_dict(ThroughPlaneTrainConfig.recipe()) == config_to_dict(
        load_config(DEFAULT_CONFIG, ThroughPlaneTrainConfig))  # fmt: skip
    assert ThroughPlaneTrainConfig.recipe(max_steps=7).max_steps == 7
    with pytest.raises(ConfigError, match="max_stepz"):
        ThroughPlaneTrainConfig.recipe(max_stepz=7)
    cfg = _small_recipe()
    assert cfg.threads == 2 and torch.get_num_threads() == 1  # the recipe's threads; the caller's one
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    summary = train(cfg, [str(training_volume[0])], str(tmp_path / "run"), init_from="sr-default")
    assert summary["exported"] and summary["steps"] == 2
    assert torch.get_num_threads() == 1  # the run's 2 threads were the run's only
    assert torch.equal(torch.get_rng_state(), state)  # neither reseeded with cfg.seed nor advanced


def test_training_that_fails_from_python_also_restores_threads_and_the_random_state(training_volume, tmp_path):
    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig, train

    cfg = ThroughPlaneTrainConfig(threads=2, max_steps=2, pairs={"thick_rows": 8, "width": 32})  # a smaller model
    torch.manual_seed(99)
    state = torch.get_rng_state()
    with pytest.raises(ConfigError, match=r"ThroughPlaneTrainConfig\.recipe\(\)"):  # raised after the run seeded
        train(cfg, [str(training_volume[0])], str(tmp_path / "run"), init_from="sr-default")
    assert torch.get_num_threads() == 1 and torch.equal(torch.get_rng_state(), state)
