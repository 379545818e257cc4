"""SuperResolver and tiling: exact geometry, seamless blending, memory fallback, cancel, progress, samples.

Most tests drive the pipeline with a per-voxel stand-in model (fast, and exact: tiling must not change a
per-voxel function at all); the tests that need the real network path use ``SRModel.tiny()`` with one or
two small patches.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from DiffusionCore.degrade import (
    degrade,
    enforce_consistency,
    physical_ceiling,
    physical_floor,
    slab_means,
    slab_of,
    slab_operator,
    thin_grid,
)
from DiffusionCore.errors import (
    Cancelled,
    ConfigError,
    GeometryError,
    InputError,
    NumericalError,
    ResourceError,
    WeightsError,
)
from DiffusionCore.intensity import hu_to_unit, unit_to_hu
from DiffusionCore.interpolation import interpolate
from DiffusionCore.metrics import consistency_psnr
from DiffusionCore.sr.pipeline import SuperResolver, tile_seed
from DiffusionCore.tiling import (
    apply_tiled,
    choose_plan,
    device_available_memory,
    fit_patch_size,
    plan_tiles,
)
from DiffusionCore.volume import Volume


def thick_ct(shape=(6, 24, 40), spacing=(0.8, 0.8, 4.0), direction=None, seed=0) -> Volume:
    """A small thick-slice CT-like volume: an elliptic body with a bright disc, smooth along z."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    arr = np.full(shape, -1000.0)
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1
    arr[body] = 40.0 + 300.0 * np.sin(2.5 * z[body] + x[body])
    arr[(x / 0.2) ** 2 + ((y - 0.3) / 0.2) ** 2 < 1] = 900.0
    arr += np.random.default_rng(seed).normal(0.0, 10.0, shape)
    return Volume(arr.astype(np.float32), spacing, (-12.5, 30.0, -100.0), np.eye(3) if direction is None else direction)


def per_voxel(u: torch.Tensor) -> torch.Tensor:
    """The stand-in model's per-voxel function (model units in and out)."""
    return 0.8 * torch.tanh(1.5 * u) + 0.05


class PerVoxelModel(torch.nn.Module):
    """Implements the SRModel interface with a per-voxel function: tiling must leave it unchanged."""

    latent_downsample = (2, 8, 8)
    min_patch = (2, 8, 8)
    weights_sha256 = "ab" * 32

    def __init__(self, bytes_per_voxel: int = 64):
        super().__init__()
        self.bytes_per_voxel = bytes_per_voxel
        self.config = SimpleNamespace(diffusion=SimpleNamespace(num_inference_steps=3, guidance_scale=1.0))
        self.patch_shapes: list[tuple[int, ...]] = []

    default_estimate = "sample"  # a step count per patch, so progress and cancel are counted in steps

    def resolve_estimate(self, estimate):
        return estimate or self.default_estimate

    def super_resolve_patch(self, cond, *, steps, guidance, generator, cancel, step_callback, estimate):
        steps = 1 if estimate == "mean" else steps
        self.patch_shapes.append(tuple(cond.shape[2:]))
        assert cond.ndim == 5 and cond.shape[1] == 1
        for i in range(steps):
            if step_callback is not None:
                step_callback(i + 1, steps)
        return per_voxel(cond)

    def estimate_patch_memory(self, patch_shape, batch=1, device="cpu"):
        return int(np.prod(patch_shape)) * self.bytes_per_voxel * batch


# -- tiling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,patch,overlap",
    [((37, 70, 50), (16, 32, 32), (4, 8, 8)), ((9, 20, 33), (8, 16, 16), (2, 6, 5)), ((64, 40, 40), (32, 40, 40), (8, 8, 8))],
)
def test_blend_weights_sum_to_one_and_are_positive(shape, patch, overlap):
    plan = plan_tiles(shape, patch, overlap)
    total = np.zeros(plan.padded_shape)
    count = np.zeros(plan.padded_shape)
    for tile in plan.tiles():
        assert tile.weight.shape == plan.patch_size
        assert tile.weight.min() > 0
        total[tile.slices] += tile.weight
        count[tile.slices] += 1
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    np.testing.assert_allclose(total[count == 1], 1.0, atol=1e-6)  # a lone tile has full weight
    assert plan.n_tiles == len(list(plan.tiles())) > 1


def test_neighbouring_tiles_overlap_at_least_as_requested():
    plan = plan_tiles((100, 300, 300), (32, 128, 128), (8, 32, 32))
    for starts, p, o, n in zip(plan.starts, plan.patch_size, plan.overlap, plan.padded_shape):
        assert starts[0] == 0 and starts[-1] + p == n
        assert all(p - (b - a) >= o for a, b in zip(starts, starts[1:]))


def test_patch_smaller_than_volume_reproduces_per_voxel_function_exactly():
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(37, 70, 50)).astype(np.float32)
    plan = plan_tiles(arr.shape, (16, 32, 32), (4, 8, 8), multiple=(2, 8, 8))
    assert plan.n_tiles > 8
    out = apply_tiled(arr, plan, lambda patch, tile: np.sin(patch) * 3.0)
    np.testing.assert_allclose(out, np.sin(arr) * 3.0, rtol=0, atol=2e-6)


def test_volume_smaller_than_patch_is_padded_and_cropped_back():
    arr = np.arange(5 * 20 * 9, dtype=np.float32).reshape(5, 20, 9)
    plan = plan_tiles(arr.shape, (32, 256, 256), (8, 64, 64), multiple=(4, 16, 16), min_patch=(8, 32, 32))
    assert plan.n_tiles == 1
    assert plan.patch_size == (8, 32, 32)  # shrunk to the volume, rounded up to multiples / min_patch
    assert plan.padded_shape == (8, 32, 32)
    padded = plan.pad(arr)
    np.testing.assert_array_equal(padded[:5, :20, :9], arr)
    np.testing.assert_array_equal(padded[5, :20, :9], arr[3])  # reflection without repeating the edge
    out = apply_tiled(arr, plan, lambda patch, tile: patch * 2.0)
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr * 2.0)


def test_patch_sizes_are_rounded_to_the_model_multiples():
    assert fit_patch_size((300, 300, 300), (30, 100, 250), (4, 16, 16), (8, 32, 32)) == (28, 96, 240)
    assert fit_patch_size((300, 300, 300), (3, 10, 10), (4, 16, 16), (8, 32, 32)) == (8, 32, 32)
    assert fit_patch_size((10, 300, 40), (32, 256, 256), (4, 16, 16), (8, 32, 32)) == (12, 256, 48)


# -- the pipeline with a per-voxel stand-in model ----------------------------------------------------
def expected_per_voxel(vol: Volume, factor: int) -> np.ndarray:
    cubic = interpolate(vol, thin_grid(vol, factor), "cubic")
    return unit_to_hu(per_voxel(torch.from_numpy(hu_to_unit(cubic.array))).numpy())


def test_tiled_equals_untiled_for_a_per_voxel_model():
    vol = thick_ct()
    sr = SuperResolver(PerVoxelModel())
    tiled, rep_t = sr.run(vol, factor=4, patch_size=(8, 16, 16), overlap=(2, 4, 4), data_consistency=False)
    whole, rep_w = sr.run(vol, factor=4, patch_size=(64, 64, 64), data_consistency=False)
    assert rep_t["tiles"]["count"] > 20 and rep_w["tiles"]["count"] == 1
    np.testing.assert_allclose(tiled.array, whole.array, atol=1e-3)
    np.testing.assert_allclose(whole.array, expected_per_voxel(vol, 4), atol=1e-3)


def test_output_lies_exactly_on_the_thin_grid_for_an_oblique_volume():
    c, s = np.cos(0.4), np.sin(0.4)
    direction = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    vol = thick_ct(direction=direction)
    out, report = SuperResolver(PerVoxelModel()).run(vol, factor=3)
    grid = thin_grid(vol, 3)
    assert out.shape == grid.shape == (18, 24, 40)
    np.testing.assert_allclose(out.spacing, grid.spacing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.origin, grid.origin, rtol=0, atol=1e-9)
    np.testing.assert_allclose(out.direction.ravel(), grid.direction, rtol=0, atol=1e-12)
    # the report names its axis order: x, y, z for spacing and size alike (the array's shape is z, y, x)
    assert report["settings"]["output_size_xyz"] == [40, 24, 18]
    assert report["settings"]["output_spacing_xyz_mm"] == list(grid.spacing)


def test_thick_axis_other_than_z_and_target_spacing():
    vol = thick_ct(shape=(24, 6, 40), spacing=(0.8, 3.0, 0.8))  # thick along y (array axis 1)
    out, report = SuperResolver(PerVoxelModel()).run(vol, target_spacing=1.0)
    grid = thin_grid(vol, target_spacing=1.0)
    assert report["settings"]["axis"] == "y"
    assert out.shape == grid.shape == (24, 18, 40)
    np.testing.assert_allclose(out.origin, grid.origin, atol=1e-9)
    # data consistency also holds for a non-integer grid: thin centres averaged per thick slab
    from DiffusionCore.degrade import slab_means

    means, rows = slab_means(out.array, vol.grid, out.grid, 1)
    np.testing.assert_allclose(means, np.moveaxis(vol.array, 1, 0)[rows], atol=0.05)


def test_factor_defaults_to_the_spacing_ratio():
    vol = thick_ct(spacing=(0.8, 0.8, 2.5))
    out, report = SuperResolver(PerVoxelModel()).run(vol)
    assert report["settings"]["factor"] == 3
    assert out.shape == (18, 24, 40)


def test_input_volume_is_not_modified():
    vol = thick_ct()
    before = (vol.array.copy(), vol.spacing, vol.origin, vol.direction.copy(), dict(vol.metadata))
    SuperResolver(PerVoxelModel()).run(vol, factor=2)
    np.testing.assert_array_equal(vol.array, before[0])
    assert (vol.spacing, vol.origin, vol.metadata) == (before[1], before[2], before[4])
    np.testing.assert_array_equal(vol.direction, before[3])


def test_isotropic_and_nan_inputs_are_refused():
    sr = SuperResolver(PerVoxelModel())
    with pytest.raises(GeometryError, match="isotropic"):
        sr.run(thick_ct(spacing=(1.0, 1.0, 1.0)))
    bad = thick_ct()
    bad.array[2, 3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        sr.run(bad, factor=2)


def test_data_consistency_reproduces_the_input():
    vol = thick_ct()
    sr = SuperResolver(PerVoxelModel())  # the stand-in shifts and compresses intensities: inconsistent
    raw, rep_raw = sr.run(vol, factor=4, data_consistency=False)
    fixed, rep_fixed = sr.run(vol, factor=4, data_consistency=True)
    assert rep_raw["consistency_psnr"] < 35
    assert rep_fixed["consistency_psnr"] > 70
    assert consistency_psnr(fixed, vol, 4, "z") > 70
    np.testing.assert_allclose(degrade(fixed, 4, "z").array, vol.array, atol=0.05)
    # the correction is smooth: no step between consecutive thin slices beyond the raw result's
    steps_raw = np.abs(np.diff(raw.array, axis=0)).max()
    steps_fixed = np.abs(np.diff(fixed.array, axis=0)).max()
    assert steps_fixed < 1.5 * steps_raw + 50


def test_enforce_consistency_leaves_consistent_volumes_unchanged():
    thin = Volume(np.random.default_rng(0).normal(0, 200, (24, 6, 7)).astype(np.float32), (0.7, 0.7, 1.0))
    thick = degrade(thin, 4, "z")
    again = enforce_consistency(thin, thick, 0)
    np.testing.assert_allclose(again.array, thin.array, atol=1e-3)


@pytest.mark.parametrize("axis", [0, 2])
def test_enforce_consistency_in_place_equals_the_copy_and_the_copy_keeps_the_input(axis):
    rng = np.random.default_rng(axis)
    truth = Volume(rng.normal(0, 200, (24, 10, 12)).astype(np.float32), (0.7, 0.7, 1.0) if axis == 0 else (1.0, 0.7, 0.7))
    thick = degrade(truth, 4, "zyx"[axis])
    guess = truth.with_array(truth.array + rng.normal(0, 50, truth.shape).astype(np.float32))
    before = guess.array.copy()
    copied = enforce_consistency(guess, thick, axis)
    np.testing.assert_array_equal(guess.array, before)
    np.testing.assert_allclose(degrade(copied, 4, "zyx"[axis]).array, thick.array, atol=1e-2)
    same = enforce_consistency(guess, thick, axis, in_place=True)
    assert same.array is guess.array
    np.testing.assert_array_equal(same.array, copied.array)


def plate_phantom(air: float = -1024.0, cap: float | None = None) -> Volume:
    """5 mm slabs of a body in air crossed by thin dense plates: cubic interpolation rings far below air at them.
    The tissue carries a little noise, so no value but air is shared by many voxels; ``cap`` clips the thick
    volume there, as a scanner stores nothing denser than its cap."""
    z = np.full((40, 24, 24), air, np.float32)
    z[:, 4:20, 4:20] = 40.0
    z[13:15] = 3000.0  # a 2.5 mm plate: the 5 mm slabs see half of it
    z[25:27, :, :10] = 1500.0
    tissue = z > air
    z[tissue] += np.random.default_rng(0).normal(0.0, 5.0, int(tissue.sum())).astype(np.float32)
    thick = degrade(Volume(z, (0.8, 0.8, 1.25)), 4, "z")
    return thick if cap is None else thick.with_array(np.minimum(thick.array, np.float32(cap)))


@pytest.mark.parametrize("spacing", [1.25, 2.0, 0.7])  # x4; 5 -> 2 mm (slabs of 2 or 3 slices); 7 or 8
def test_consistency_leaves_no_voxel_darker_than_air_and_still_reproduces_the_input(spacing):
    thick = plate_phantom()
    grid = thin_grid(thick, target_spacing=spacing)
    cubic = interpolate(thick, grid, "cubic")
    unfloored = enforce_consistency(cubic, thick, 0, floor=False)
    assert unfloored.array.min() < -1500  # the ringing is real: far darker than air
    out = enforce_consistency(cubic, thick, 0)
    assert out.array.min() == -1024.0
    means, rows = slab_means(out.array, thick.grid, grid, 0)
    np.testing.assert_allclose(means, thick.array[rows], atol=0.05)  # every slab still averages to the input
    slab = slab_of(slab_operator(thick.grid, grid, 0)[2], thick.shape[0])
    mended = 0
    for s in np.unique(slab):  # only the slab columns that rang below air change
        rang = (unfloored.array[slab == s] < -1024.0).any(axis=0)
        np.testing.assert_array_equal(out.array[slab == s][:, ~rang], unfloored.array[slab == s][:, ~rang])
        mended += int(rang.sum())
    assert mended > 0


def test_the_floor_is_air_or_the_inputs_own_darkest_value():
    assert physical_floor(plate_phantom()) == -1024.0
    noisy = plate_phantom(air=-1100.0)  # a scanner whose air noise reaches below -1024 HU
    assert physical_floor(noisy) == -1100.0
    out = enforce_consistency(interpolate(noisy, thin_grid(noisy, 4), "cubic"), noisy, 0)
    assert out.array.min() == -1100.0
    assert physical_floor(plate_phantom().with_array(plate_phantom().array + 1500.0)) == -1024.0  # no air in view


def test_no_voxel_exceeds_the_scanners_cap_when_the_input_is_clipped_at_one():
    capped = plate_phantom(cap=1000.0)  # the plate's slabs clipped at 1000 HU: a plateau, as on both sample chests
    assert physical_ceiling(capped) == 1000.0 and physical_ceiling(plate_phantom()) is None  # no plateau, no cap
    grid = thin_grid(capped, target_spacing=2.0)
    cubic = interpolate(capped, grid, "cubic")
    assert enforce_consistency(cubic, capped, 0, floor=False).array.max() > 1200  # ringing above the cap
    out = enforce_consistency(cubic, capped, 0)
    assert out.array.max() == 1000.0 and out.array.min() == -1024.0
    means, rows = slab_means(out.array, capped.grid, grid, 0)
    np.testing.assert_allclose(means, capped.array[rows], atol=0.05)
    # without a cap, thin slices may be brighter than every thick slab
    free = enforce_consistency(interpolate(plate_phantom(), grid, "cubic"), plate_phantom(), 0)
    assert free.array.max() > plate_phantom().array.max() + 100


def test_a_volume_far_deeper_below_air_than_ringing_is_refused_not_floored():
    thick = plate_phantom()  # -1024..about 1525 HU: nothing below about -1024 - 2 * 2549 HU can be ringing
    grid = thin_grid(thick, 4)
    guess = interpolate(thick, grid, "cubic").array.copy()
    guess[5, 3, 3] = -20000.0  # a broken model's voxel
    with pytest.raises(NumericalError, match=r"reaches -[\d.]+ HU, more than twice the input's value range below air \(-61\d\d[\d.]* HU\)"):
        enforce_consistency(Volume.from_grid(grid, guess), thick, 0)
    out = enforce_consistency(Volume.from_grid(grid, guess), thick, 0, floor=False)  # without the floor: no check
    assert out.array.min() < -10000


def test_progress_total_is_known_in_advance_and_monotone():
    calls = []
    vol = thick_ct()
    _, report = SuperResolver(PerVoxelModel()).run(
        vol, factor=4, patch_size=(8, 16, 16), overlap=(2, 4, 4), num_samples=2, progress=lambda d, t, m: calls.append((d, t, m))
    )
    totals = {t for _, t, _ in calls}
    expected = 2 * report["tiles"]["count"] * 3
    assert totals == {expected}
    done = [d for d, _, _ in calls]
    assert done[0] == 0 and done[-1] == expected
    assert all(b >= a for a, b in zip(done, done[1:]))


def test_memory_estimate_falls_back_to_smaller_tiles():
    vol = thick_ct(shape=(8, 64, 64))
    model = PerVoxelModel(bytes_per_voxel=1000)
    sr = SuperResolver(model)
    fixed = 32 * 64 * 64 * 4 * 5  # whole-volume arrays of the 32x64x64 thin grid
    limit = fixed + 16 * 32 * 32 * 1000 + 16 * 32 * 32 * 12 + 1  # room for a 16x32x32 patch, not more
    out, report = sr.run(vol, factor=4, patch_size=(32, 64, 64), overlap=(4, 8, 8), memory_limit=limit, data_consistency=False)
    assert report["tiles"]["reduced_from"][0] == [32, 64, 64]
    assert np.prod(report["settings"]["patch_size"]) <= 16 * 32 * 32
    assert all(np.prod(s) <= 16 * 32 * 32 for s in model.patch_shapes)
    assert report["memory"]["host_estimate_bytes"] <= limit
    np.testing.assert_allclose(out.array, expected_per_voxel(vol, 4), atol=1e-3)


def test_resource_error_states_the_estimate_when_nothing_fits():
    sr = SuperResolver(PerVoxelModel())
    with pytest.raises(ResourceError, match=r"estimate .*MiB|estimate .*KiB"):
        sr.run(thick_ct(), factor=4, memory_limit=10_000)


def test_choose_plan_keeps_the_request_when_it_fits():
    plan, budget, tried = choose_plan(
        (64, 512, 512), (32, 256, 256), (8, 64, 64), multiple=(4, 16, 16), min_patch=(8, 32, 32),
        patch_bytes=lambda s: int(np.prod(s)) * 100, host_fixed_bytes=10, on_device=True,
        host_limit=1 << 40, device_limit=1 << 40,
    )
    assert plan.patch_size == (32, 256, 256) and tried == [] and budget.fits
    assert plan.grid_counts == (3, 3, 3)


# -- the real network path (tiny random-weight model) ---------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> SuperResolver:
    return SuperResolver.tiny(seed=0)


def small_thick() -> Volume:
    return thick_ct(shape=(2, 32, 48), spacing=(0.8, 0.8, 4.0))  # thin grid 8 x 32 x 48


@pytest.mark.parametrize("estimate", ["mean", "sample"])
def test_tiny_model_pipeline_equals_blending_its_tiles(tiny, estimate):
    vol = small_thick()
    out, report = tiny.run(
        vol, factor=4, patch_size=(8, 32, 32), overlap=(0, 0, 16), seed=5, data_consistency=False, estimate=estimate
    )
    assert report["settings"]["estimate"] == estimate
    assert report["settings"]["steps"] == (1 if estimate == "mean" else tiny.default_steps)
    assert report["tiles"]["count"] == 2
    cond = hu_to_unit(interpolate(vol, thin_grid(vol, 4), "cubic").array)
    plan = plan_tiles(cond.shape, (8, 32, 32), (0, 0, 16), multiple=tiny.model.latent_downsample, min_patch=tiny.model.min_patch)

    def one_tile(patch, tile):
        gen = torch.Generator().manual_seed(tile_seed(5, 0, tile.index))
        x = torch.from_numpy(np.ascontiguousarray(patch))[None, None]
        with torch.inference_mode():
            y = tiny.model.super_resolve_patch(
                x, steps=None if estimate == "mean" else tiny.default_steps, guidance=1.0, generator=gen,
                estimate=estimate,
            )
        return y[0, 0].numpy()

    expected = unit_to_hu(apply_tiled(cond, plan, one_tile))
    np.testing.assert_allclose(out.array, expected, atol=0.05)
    assert report["weights_sha256"] == tiny.model.weights_sha256 and len(report["weights_sha256"]) == 64
    for stage in ("interpolate", "model", "blend", "consistency", "total"):
        assert report["timings"][stage] >= 0
    assert report["memory"]["peak_rss_bytes"] > 0


def test_same_seed_same_sample_other_seed_differs_and_the_mean_needs_no_seed(tiny):
    vol = thick_ct(shape=(2, 32, 32))
    a, _ = tiny.run(vol, factor=4, seed=3, estimate="sample")
    b, _ = tiny.run(vol, factor=4, seed=3, estimate="sample")
    c, _ = tiny.run(vol, factor=4, seed=4, estimate="sample")
    np.testing.assert_array_equal(a.array, b.array)
    assert np.abs(a.array - c.array).mean() > 0.1
    m3, _ = tiny.run(vol, factor=4, seed=3)
    m4, _ = tiny.run(vol, factor=4, seed=4)
    np.testing.assert_array_equal(m3.array, m4.array)  # the default, the mean, is deterministic
    assert np.abs(m3.array - a.array).mean() > 0.1


def test_num_samples_gives_mean_and_std_volume(tiny):
    vol = thick_ct(shape=(2, 32, 32))
    out, report = tiny.run(vol, factor=4, num_samples=3, seed=1, data_consistency=False)
    unc = report["uncertainty"]
    assert isinstance(unc, Volume) and unc.grid == out.grid
    assert np.all(unc.array >= 0) and np.isfinite(unc.array).all() and unc.array.mean() > 0.1
    single, rep1 = tiny.run(vol, factor=4, num_samples=1, seed=1, data_consistency=False)
    assert rep1["uncertainty"] is None
    assert not np.array_equal(single.array, out.array)  # the mean of 3 samples, not the first one


def test_cancel_stops_within_one_step(tiny):
    vol = thick_ct(shape=(2, 32, 32))
    cancel = threading.Event()
    seen = []

    def progress(done, total, message):
        seen.append(done)
        if done >= 1:
            cancel.set()

    with pytest.raises(Cancelled):
        tiny.run(vol, factor=4, progress=progress, cancel=cancel)
    assert max(seen) <= 1  # no step after the one during which cancel was set
    with pytest.raises(Cancelled):
        tiny.run(vol, factor=4, cancel=cancel)  # already set: stops before the first step


def test_evaluate_method_sr_needs_weights_and_uses_registered_default(tmp_path, monkeypatch, tiny, no_bundled_weights):
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(tmp_path / "cache"))
    import importlib

    evaluate_mod = importlib.import_module("DiffusionCore.evaluate")
    from DiffusionCore.sr import pipeline
    from DiffusionCore.weights import import_weights

    monkeypatch.setattr(pipeline, "_RESOLVERS", {})
    fn = evaluate_mod.get_method("sr")
    thin = Volume(np.repeat(thick_ct(shape=(4, 32, 32)).array, 4, axis=0), (0.8, 0.8, 1.0))
    with pytest.raises(WeightsError, match="no default SR weights"):
        evaluate_mod.evaluate(thin, 4, methods=["sr"])
    tiny.model.save(tmp_path / "tiny.safetensors")
    import_weights(tmp_path / "tiny.safetensors", "tiny-test")
    result = evaluate_mod.evaluate(thin, 4, methods=["cubic", "sr"], method_options={"num_steps": 2, "device": "cpu"})
    assert [r["method"] for r in result["results"]] == ["cubic", "sr"]
    assert result["results"][1]["consistency_psnr"] > 60
    assert fn is evaluate_mod.get_method("sr")


def test_progress_counts_the_steps_the_model_really_runs(tiny):
    calls = []
    vol = thick_ct(shape=(2, 32, 32))
    _, report = tiny.run(vol, factor=4, steps=50, progress=lambda d, t, m: calls.append((d, t)))
    n_train = tiny.model.config.diffusion.num_train_timesteps  # ResShift cannot take more steps than T
    assert report["settings"]["steps"] == n_train and report["settings"]["requested_steps"] == 50
    assert {t for _, t in calls} == {n_train}
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1][0] == n_train


def test_the_default_mean_is_one_step_per_tile_and_sampling_options_ask_for_samples(tiny):
    vol = thick_ct(shape=(2, 32, 32))
    calls = []
    _, report = tiny.run(vol, factor=4, progress=lambda d, t, m: calls.append((d, t)))
    s = report["settings"]
    assert s["estimate"] == "mean" and s["steps"] == 1
    assert {t for _, t in calls} == {report["tiles"]["count"]}  # one network evaluation per tile
    for kwargs in ({"steps": 2}, {"num_samples": 2}, {"estimate": "sample"}):
        _, rep = tiny.run(vol, factor=4, data_consistency=False, **kwargs)
        assert rep["settings"]["estimate"] == "sample", kwargs
    for kwargs in ({"num_samples": 2}, {"steps": 3}):
        with pytest.raises(ConfigError, match="estimate 'sample'"):
            tiny.run(vol, factor=4, estimate="mean", **kwargs)


def test_several_tiles_per_model_call_blend_the_same_way():
    vol = thick_ct()
    model = PerVoxelModel()
    calls = []
    out1, _ = SuperResolver(model).run(vol, factor=4, patch_size=(8, 16, 16), overlap=(2, 4, 4), data_consistency=False)
    model.patch_shapes.clear()
    out3, rep = SuperResolver(model).run(
        vol, factor=4, patch_size=(8, 16, 16), overlap=(2, 4, 4), data_consistency=False, tile_batch=3,
        progress=lambda d, t, m: calls.append(d),
    )
    assert rep["settings"]["tile_batch"] == 3 and len(model.patch_shapes) == -(-rep["tiles"]["count"] // 3)
    np.testing.assert_array_equal(out1.array, out3.array)
    assert calls[-1] == rep["tiles"]["count"] * 3 and calls == sorted(calls)


def test_gpu_memory_counts_what_the_allocator_caches_from_an_earlier_run(monkeypatch):
    """A second run in one process (the next volume of a batch) must see the memory that PyTorch's caching
    allocator kept from the first as available: the driver reports it as used, and without it the tiles
    shrink to the smallest (measured on an H100: 1984 tiles instead of 5)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 60 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 1 * gib)
    assert device_available_memory("cuda") == 61 * gib


def test_slices_far_thicker_than_the_pixels_get_the_largest_factor_and_the_report_says_so(caplog):
    # 12 mm slices over 0.8 mm pixels would ask for x15: the model goes to x8 (1.5 mm slices), and a report read
    # later (the batch CLI's, the module's) must say why the slices are not as thin as the pixels
    from conftest import ct_phantom_array

    arr = ct_phantom_array((4, 32, 32), seed=3)
    vol = Volume(arr, (0.8, 0.8, 12.0), (0.0, 0.0, 0.0))
    resolver = SuperResolver.tiny_predictor(seed=1)
    with caplog.at_level("WARNING", logger="DiffusionCore"):
        out, report = resolver.run(vol, device="cpu")
    assert out.shape[0] == 32 and out.spacing[2] == pytest.approx(1.5)
    said = [n for n in report.get("notes", []) if "largest supported factor 8" in n]
    assert len(said) == 1 and "slices of 1.5 mm, not the 0.8 mm of the in-plane spacing" in said[0]
    assert said[0] in caplog.text
    assert not resolver.run(vol, factor=8, device="cpu")[1].get("notes")  # asked for: nothing to explain
