"""The same physical scan stored in another order gives the same super-resolution.

A DICOM series and its dcm2niix NIfTI hold the same voxels with the rows (or columns, or slices) in reverse
order and a direction matrix with the opposite sign. The networks are not flip-equivariant, so the pipeline
shows them one canonical storage order (:func:`DiffusionCore.sr.pipeline.storage_flips`) and flips their output
back: the result on the same physical grid is the same to float rounding, and an identity-direction volume (both
sample CTs' DICOM order) is never flipped, so its result is exactly what it was.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ct_phantom_array

from DiffusionCore.errors import InputError
from DiffusionCore.sr import pipeline
from DiffusionCore.sr.adapt import AdaptSettings
from DiffusionCore.sr.pipeline import SuperResolver, storage_flips
from DiffusionCore.volume import Grid, Volume

#: HU: what float32 rounding leaves between two storage orders (cubic interpolation and consistency run on the
#: stored arrays; the networks' share is identical).
ROUNDING_HU = 2e-3
#: Small adaptation: the pairs and the check batch must come from the canonical order too.
FEW_STEPS = AdaptSettings(steps=3, batch_size=4, check_pairs=4)


def thick_volume(thick_axis: int = 0, seed: int = 0) -> Volume:
    """A small phantom, 0.8 mm in-plane and 4 mm along ``thick_axis`` (array axis), with an off-centre bright
    spot so that no flip maps it onto itself; identity direction."""
    shape = [40, 40, 40]
    shape[thick_axis] = 8
    arr = ct_phantom_array(tuple(shape), seed=seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    arr[((x - 0.3) / 0.12) ** 2 + ((y + 0.25) / 0.1) ** 2 + ((z - 0.4) / 0.5) ** 2 < 1] = 700.0
    spacing = [0.8, 0.8, 0.8]
    spacing[2 - thick_axis] = 4.0
    return Volume(arr, tuple(spacing), (-12.0, 7.5, -30.0))


def stored_reversed(vol: Volume | Grid, axis: int) -> tuple[np.ndarray | None, tuple, tuple, np.ndarray]:
    """The same physical volume (or grid) with array ``axis`` stored in reverse: ``(array or None, spacing, origin,
    direction)``. The direction's column for that axis changes sign; the origin moves to the last voxel."""
    grid = vol.grid if isinstance(vol, Volume) else vol
    d = grid.direction_matrix.copy()
    c = 2 - axis  # array axis -> index axis (x, y, z)
    index = [0, 0, 0]
    index[c] = grid.shape[axis] - 1
    origin = tuple(grid.index_to_physical() @ np.array([*index, 1.0]))[:3]
    d[:, c] *= -1
    array = np.flip(vol.array, axis).copy() if isinstance(vol, Volume) else None
    return array, grid.spacing, origin, d


def flip_store(vol: Volume, axis: int) -> Volume:
    array, spacing, origin, direction = stored_reversed(vol, axis)
    return Volume(array, spacing, origin, direction)


def assert_same_physical_result(out: Volume, out_flipped: Volume, axis: int) -> None:
    """``out_flipped`` (a run on the input stored reversed along ``axis``) lies on ``out``'s grid stored reversed,
    and holds the same values there."""
    _, spacing, origin, direction = stored_reversed(out.grid, axis)
    assert out_flipped.shape == out.shape
    np.testing.assert_allclose(out_flipped.spacing, spacing, atol=1e-9)
    np.testing.assert_allclose(out_flipped.origin, origin, atol=1e-6)
    np.testing.assert_allclose(out_flipped.direction, direction, atol=1e-12)
    np.testing.assert_allclose(np.flip(out_flipped.array, axis), out.array, rtol=0, atol=ROUNDING_HU)


def run(resolver: SuperResolver, vol: Volume, adapt: AdaptSettings | None = None) -> Volume:
    return resolver.run(vol, factor=2, device="cpu", adapt=adapt)[0]


# -- the canonical order ------------------------------------------------------------------------------
def test_only_axes_stored_against_their_physical_direction_are_flipped():
    assert storage_flips(np.eye(3)) == ()
    assert storage_flips(np.diag([1.0, -1.0, 1.0])) == (1,)  # rows stored anterior-first (a NIfTI's y)
    assert storage_flips(np.diag([-1.0, -1.0, -1.0])) == (0, 1, 2)
    # a sagittal scan: index x runs along P, y along -S, z along L; the axis's own dominant direction counts
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    assert storage_flips(sagittal) == (1,)
    tilted = np.array([[0.98, 0.2, 0.0], [-0.2, 0.98, 0.0], [0.0, 0.0, 1.0]])
    assert storage_flips(tilted) == ()


# -- the same physical scan, another storage order -------------------------------------------------------
@pytest.mark.parametrize("thick_axis,axis", [(0, 0), (0, 1), (0, 2), (1, 1), (1, 0)])
def test_a_scan_stored_reversed_gives_the_same_result_on_the_same_physical_grid(thick_axis, axis):
    resolver = SuperResolver.tiny_predictor(seed=1)
    vol = thick_volume(thick_axis)
    assert_same_physical_result(run(resolver, vol), run(resolver, flip_store(vol, axis)), axis)


@pytest.mark.parametrize("target", [1.5, 1.3])
def test_a_target_spacing_that_does_not_divide_the_slices_gives_the_same_slices_in_either_order(target):
    # 8 slices of 4 mm: 1.5 mm leaves 0.5 mm of the extent over, 1.3 mm leaves 0.8 mm; the thin slices are
    # centred in the extent, so the slab the file stores first does not decide where they lie
    resolver = SuperResolver.tiny_predictor(seed=1)
    vol = thick_volume(0)
    out = resolver.run(vol, target_spacing=target, device="cpu")[0]
    out_flipped = resolver.run(flip_store(vol, 0), target_spacing=target, device="cpu")[0]
    assert out.shape[0] == int(8 * 4.0 / target)
    thick_centre = vol.grid.index_to_physical() @ np.array([0.0, 0.0, 3.5, 1.0])
    thin_centre = out.grid.index_to_physical() @ np.array([0.0, 0.0, (out.shape[0] - 1) / 2.0, 1.0])
    np.testing.assert_allclose(thin_centre[2], thick_centre[2], atol=1e-9)
    assert_same_physical_result(out, out_flipped, 0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_adaptation_learns_from_the_same_pairs_whatever_the_storage_order(axis):
    resolver = SuperResolver.tiny_predictor(seed=2)
    vol = thick_volume(0)
    out, report = resolver.run(vol, factor=2, device="cpu", adapt=FEW_STEPS)
    out_flipped, report_flipped = resolver.run(flip_store(vol, axis), factor=2, device="cpu", adapt=FEW_STEPS)
    adaptation, adaptation_flipped = report["predictor"]["adaptation"], report_flipped["predictor"]["adaptation"]
    assert adaptation["steps"] == 3 and adaptation["skipped"] is None
    for key in ("loss_before", "loss_after"):  # the same check batch, the same training
        assert adaptation_flipped[key] == pytest.approx(adaptation[key], rel=1e-6)
    assert_same_physical_result(out, out_flipped, axis)


def test_the_diffusion_stage_sees_the_canonical_order_too():
    resolver = SuperResolver.tiny(seed=0)
    vol = thick_volume(0)
    vol = Volume(vol.array[:2, :32, :32].copy(), vol.spacing, vol.origin)  # thin grid 4 x 32 x 32: one tile
    out = resolver.run(vol, factor=2, device="cpu")[0]
    out_flipped = resolver.run(flip_store(vol, 1), factor=2, device="cpu")[0]
    assert_same_physical_result(out, out_flipped, 1)


def test_the_test_network_is_not_flip_equivariant_so_the_tests_above_would_see_a_missing_flip(monkeypatch):
    resolver = SuperResolver.tiny_predictor(seed=1)
    vol = thick_volume(0)
    monkeypatch.setattr(pipeline, "storage_flips", lambda direction: ())
    out, out_flipped = run(resolver, vol), run(resolver, flip_store(vol, 1))
    assert np.abs(np.flip(out_flipped.array, 1) - out.array).max() > 100 * ROUNDING_HU


# -- identity direction: exactly as before ---------------------------------------------------------------
@pytest.mark.parametrize("adapt", [None, FEW_STEPS], ids=["predictor", "adapted"])
def test_an_identity_direction_volume_gives_exactly_the_result_without_canonical_order(monkeypatch, adapt):
    resolver = SuperResolver.tiny_predictor(seed=3)
    vol = thick_volume(0)
    out = run(resolver, vol, adapt)
    monkeypatch.setattr(pipeline, "storage_flips", lambda direction: ())
    np.testing.assert_array_equal(run(resolver, vol, adapt).array, out.array)


# -- the input must be a Volume -----------------------------------------------------------------------------
def test_a_bare_array_is_refused_with_how_to_make_a_volume():
    vol = thick_volume(0)
    resolver = SuperResolver.tiny_predictor()
    with pytest.raises(InputError, match=r"needs a DiffusionCore Volume.*numpy.ndarray.*read_volume.*Volume\(array"):
        resolver.run(vol.array, factor=2)
    with pytest.raises(InputError, match="needs a DiffusionCore Volume"):
        resolver.run_to_grid(vol.array, vol.grid, axis=0)


def _warnings(records) -> list[str]:
    return [r.getMessage() for r in records if r.levelname == "WARNING" and "thickest spacing" in r.getMessage()]


def test_spacing_given_in_zyx_order_by_mistake_is_warned_of_naming_both_orders(diffusioncore_log):
    """Probe 47, finding 9: ``Volume(arr, spacing=(4, 0.8, 0.8))`` for a (z, y, x) array with its slices along z
    super-resolved its columns without a word."""
    right = thick_volume(0)
    wrong = Volume(right.array, (4.0, 0.8, 0.8), right.origin)  # (z, y, x) order where Volume takes (x, y, z)
    resolver = SuperResolver.tiny()
    out, report = resolver.run(wrong, factor=2, device="cpu")
    assert out.shape == (8, 40, 80)  # what was asked: the columns, but not silently
    (said,) = _warnings(diffusioncore_log)
    assert "array axis 2 (x, 4 mm)" in said and "(x, y, z) = (4, 0.8, 0.8)" in said
    assert "Volume(array, spacing=(0.8, 0.8, 4))" in said and "axis='x'" in said
    assert said in report["notes"]
    diffusioncore_log.clear()
    _, report = resolver.run(right, factor=2, device="cpu")  # the right order: nothing to say
    assert not _warnings(diffusioncore_log) and not any("thickest spacing" in n for n in report.get("notes", []))
    resolver.run(wrong, factor=2, device="cpu", axis="x")  # the slices really are along x: said so
    assert not _warnings(diffusioncore_log)


def test_a_file_stored_with_its_slices_along_another_axis_is_not_warned_of(tmp_path, diffusioncore_log):
    """A file's spacing comes from its header: the ``sr`` command (and run on what read_volume gives) takes a scan
    whose slices are along x or y as it is, without the warning meant for arrays."""
    from DiffusionCore.cli.main import main
    from DiffusionCore.volume import read_volume, write_volume

    path = write_volume(thick_volume(2), tmp_path / "sagittal.nrrd", dtype="float32")
    out, _ = SuperResolver.tiny().run(read_volume(path), factor=2, device="cpu")
    assert out.shape == (40, 40, 16)
    assert main(["sr", str(path), str(tmp_path / "out.nrrd"), "--tiny-test-model", "--factor", "2", "--device",
                 "cpu", "--progress", "none"]) == 0  # fmt: skip
    assert not _warnings(diffusioncore_log)
    assert diffusioncore_log  # the handler heard the runs' other lines
