"""Geometry that a medical physicist checked (probe 44): the same scan stored head first and feet first gives the same
voxels for a target spacing that does not divide the slice spacing (5 mm to 2 mm: a thin slice centred on the border
of two slabs was put into one by floating-point rounding, up to 1254 HU apart); two equally coarse axes are named as
such, not called isotropic; a second coarse axis across the slices is warned of."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ct_phantom_array

from DiffusionCore.degrade import plan_thin_grid, slab_of
from DiffusionCore.errors import GeometryError
from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.volume import Volume


def test_a_thin_slice_on_a_slab_border_belongs_to_the_same_slab_whatever_the_rounding():
    # 1.5 is the border of slabs 1 and 2; the product of affines gives it a few 1e-15 off either way
    coords = np.array([1.499999999999996, 1.5, 1.500000000000004, 1.4999, 0.2])
    assert slab_of(coords, 4).tolist() == [2, 2, 2, 1, 0]  # on the border: the one further along the axis
    assert slab_of(coords, 4, reverse=True).tolist() == [1, 1, 1, 1, 0]  # stored reversed: the lower index


@pytest.mark.parametrize("target", [2.0, 1.5])
def test_head_first_and_feet_first_give_the_same_voxels_for_any_target_spacing(target):
    arr = ct_phantom_array((12, 32, 32), seed=5)
    head_first = Volume(arr, (0.8, 0.8, 5.0), (-12.0, 20.0, -319.0))
    top = -319.0 + 5.0 * 11
    feet_first = Volume(arr[::-1].copy(), (0.8, 0.8, 5.0), (-12.0, 20.0, top), np.diag([1.0, 1.0, -1.0]))
    resolver = SuperResolver.tiny_predictor(seed=2)
    a, _ = resolver.run(head_first, target_spacing=target, device="cpu", adapt=None)
    b, _ = resolver.run(feet_first, target_spacing=target, device="cpu", adapt=None)
    assert a.shape == b.shape and np.allclose(b.direction, np.diag([1.0, 1.0, -1.0]))
    # the same physical slices: b's last is a's first
    assert b.origin[2] + target * (b.shape[0] - 1) * -1 == pytest.approx(a.origin[2])
    np.testing.assert_allclose(b.array[::-1], a.array, atol=0.01)


def test_two_equally_coarse_axes_are_named_not_called_isotropic():
    grid = Volume(np.zeros((8, 8, 64), np.float32), (0.842, 5.0, 5.0)).grid  # z 5, y 5, x 0.842 mm
    with pytest.raises(GeometryError, match=r"two axes are equally coarse, z \(5 mm\) and y \(5 mm\), beside a fine "
                                            r"one .*Pass --axis"):  # fmt: skip
        plan_thin_grid(grid)
    with pytest.raises(GeometryError, match=r"already \(nearly\) isotropic"):
        plan_thin_grid(Volume(np.zeros((8, 8, 8), np.float32), (1.0, 1.0, 1.2)).grid)


def test_a_second_coarse_axis_across_the_slices_is_warned_of(caplog):
    grid = Volume(np.zeros((8, 16, 64), np.float32), (0.842, 3.0, 5.0)).grid  # z 5, y 3, x 0.842 mm
    with caplog.at_level("WARNING", logger="DiffusionCore"):
        plan_thin_grid(grid, factor=4)
    assert "the two axes across the slices differ (y 3 mm, x 0.842 mm)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="DiffusionCore"):
        plan_thin_grid(Volume(np.zeros((8, 16, 64), np.float32), (0.842, 0.842, 5.0)).grid, factor=4)
    assert "differ" not in caplog.text


def test_adaptation_gives_the_same_voxels_when_rows_and_columns_are_stored_exchanged():
    """A coronal acquisition exported by two converters can hold its rows and columns in either order: the adapted
    result must depend on the physical data only (its random pairs were drawn by storage order: up to 256 HU apart)."""
    from DiffusionCore.sr.adapt import AdaptSettings

    arr = ct_phantom_array((10, 40, 48), seed=7)
    axial = Volume(arr, (0.8, 0.8, 5.0), (-20.0, 15.0, -300.0))
    exchanged = Volume(np.ascontiguousarray(arr.transpose(0, 2, 1)), (0.8, 0.8, 5.0), (-20.0, 15.0, -300.0),
                       np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))  # columns A-P, rows L-R
    resolver = SuperResolver.tiny_predictor(seed=3)
    settings = AdaptSettings(steps=6, batch_size=4, check_pairs=4)
    a, ra = resolver.run(axial, factor=2, device="cpu", adapt=settings, seed=1)
    b, rb = resolver.run(exchanged, factor=2, device="cpu", adapt=settings, seed=1)
    assert ra["predictor"]["adaptation"]["steps"] == rb["predictor"]["adaptation"]["steps"] == 6
    np.testing.assert_allclose(b.array.transpose(0, 2, 1), a.array, atol=0.01)


def test_a_nifti_whose_qform_and_sform_disagree_is_read_by_its_sform_and_said_to(tmp_path, caplog):
    import nibabel as nib

    from DiffusionCore.volume import read_volume

    affine = np.diag([-0.8, -0.8, 5.0, 1.0])  # RAS: an axial CT as dcm2niix writes it
    img = nib.Nifti1Image(ct_phantom_array((6, 16, 16), seed=1).transpose(2, 1, 0), affine)
    img.set_sform(affine, code=1)
    shifted = affine.copy()
    shifted[2, 3] = 10.0
    img.set_qform(shifted, code=1)  # 10 mm away along S-I
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    with caplog.at_level("WARNING", logger="DiffusionCore"):
        vol = read_volume(path)
    assert vol.origin[2] == pytest.approx(0.0)  # the sform's place
    assert "its qform and sform place the voxels up to 10.0 mm apart; the sform is read" in caplog.text
    assert "up to 10.0 mm apart" in vol.metadata["geometry_note"]
    caplog.clear()
    img.set_qform(affine, code=1)
    nib.save(img, path)
    with caplog.at_level("WARNING", logger="DiffusionCore"):
        read_volume(path)
    assert "qform and sform" not in caplog.text
