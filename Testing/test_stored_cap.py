"""The scanner's storage cap (a DICOM series' BitsStored and rescale) bounds the super-resolved volume.

A 12-bit series with RescaleIntercept -1024 stores nothing above 3071 HU, and a thin series of the same scanner
cannot either. When the thick input's maximum is a plateau (clipped metal) that plateau is the ceiling already; when
it is not (a dense object only partly in every slab), thin voxels may be brighter than every slab, but not brighter
than the files can hold.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series

from DiffusionCore.degrade import degrade, enforce_consistency, physical_ceiling, slab_means, thin_grid
from DiffusionCore.interpolation import interpolate
from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.volume import Volume, dicom_stored_max_hu, read_volume


def dense_plate_thick() -> Volume:
    """5 mm slabs of a body crossed by a 2.5 mm plate of 3000 HU: every slab sees half of it (about 1,525 HU at most,
    no plateau), and cubic interpolation between the slabs overshoots well above that."""
    z = np.full((40, 24, 24), -1024.0, np.float32)
    z[:, 4:20, 4:20] = 40.0
    z[13:15] = 3000.0
    tissue = (z > -1024) & (z < 3000)
    z[tissue] += np.random.default_rng(0).normal(0.0, 5.0, int(tissue.sum())).astype(np.float32)
    return degrade(Volume(z, (0.8, 0.8, 1.25)), 4, "z")


def twelve_bit(paths, intercept: float) -> None:
    """Mark written slices as 12-bit unsigned storage (the pixel values already lie within 0..4095)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        assert int(ds.pixel_array.min()) >= 0 and int(ds.pixel_array.max()) <= 4095
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleIntercept = f"{intercept:g}"
        ds.save_as(path)


def test_the_ceiling_is_the_stored_maximum_when_the_input_has_no_plateau():
    thick = dense_plate_thick()
    top = float(thick.array.max())
    assert physical_ceiling(thick) is None  # no plateau and nothing known of the files
    capped = thick.with_array(thick.array, stored_max_hu=1600.0)
    assert physical_ceiling(capped) == 1600.0
    # a stored maximum below the input's own maximum (a file that breaks its own BitsStored) sets no ceiling
    assert physical_ceiling(thick.with_array(thick.array, stored_max_hu=top - 1)) is None
    # a plateau (clipped input) stays the tighter ceiling
    plateau = thick.with_array(np.minimum(thick.array, np.float32(1000.0)), stored_max_hu=1600.0)
    assert physical_ceiling(plateau) == 1000.0

    grid = thin_grid(thick, target_spacing=1.25)
    cubic = interpolate(thick, grid, "cubic")
    free = enforce_consistency(cubic, thick, 0)
    assert free.array.max() > 1700  # thin voxels brighter than any slab, and than the cap below
    out = enforce_consistency(interpolate(capped, grid, "cubic"), capped, 0)
    assert out.array.max() <= 1600.0 + 1e-3
    means, rows = slab_means(out.array, capped.grid, grid, 0)
    np.testing.assert_allclose(means, capped.array[rows], atol=0.05)  # the slabs still reproduce the input


@pytest.mark.parametrize("bits12", [True, False])
def test_a_dicom_series_records_what_its_files_can_store(tmp_path, bits12):
    thick = dense_plate_thick()
    folder = tmp_path / "series"
    intercept = -2500.0 if bits12 else -1024.0
    paths = write_dicom_series(folder, thick, intercept=intercept)
    if bits12:
        twelve_bit(paths, intercept)
    vol = read_volume(folder)
    expected = 4095 + intercept if bits12 else 32767 + intercept  # 16-bit signed storage, as SimpleITK writes it
    assert vol.metadata["stored_max_hu"] == expected
    assert dicom_stored_max_hu([str(p) for p in paths]) == expected
    np.testing.assert_allclose(vol.array, np.round(thick.array), atol=0.5)  # the HU themselves are untouched
    # a NIfTI file records no storage range
    from DiffusionCore.volume import write_volume

    nifti = write_volume(vol, tmp_path / "v.nii.gz")
    assert "stored_max_hu" not in read_volume(nifti).metadata


def test_super_resolution_of_a_12_bit_series_stays_within_what_it_can_store(tmp_path):
    thick = dense_plate_thick()
    paths = write_dicom_series(tmp_path / "series", thick, intercept=-2500.0)
    twelve_bit(paths, -2500.0)  # stores at most 4095 - 2500 = 1595 HU; the input reaches about 1,525 HU
    vol = read_volume(tmp_path / "series")
    resolver = SuperResolver.tiny_predictor(seed=0)
    out, _ = resolver.run(vol, factor=4)
    assert float(out.array.max()) <= 1595.0 + 1e-3
    # the same volume without the record of its files goes above it
    unrecorded = Volume(vol.array.copy(), vol.spacing, vol.origin, vol.direction)
    free, _ = resolver.run(unrecorded, factor=4)
    assert float(free.array.max()) > 1595.0
    means, rows = slab_means(out.array, vol.grid, out.grid, 0)
    np.testing.assert_allclose(means, vol.array[rows], atol=0.05)
