"""Values the tool changes are changed where they mean what it takes them for, and said: padding outside the scan
circle becomes air (very low values inside the image are measurements and stay), and HU beyond the int16 range are
clipped in an int16 output only with a warning naming how many and the output type that keeps them.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series

from DiffusionCore.volume import AIR_HU, Volume, read_volume, replace_padding, write_volume


def noisy_scan_with_padding(padding: float) -> np.ndarray:
    """A low-dose-looking CT (z, y, x): air and a body with SD 200 HU noise (so some voxels inside the image fall below
    -1500 HU), and ``padding`` outside a reconstruction circle."""
    rng = np.random.default_rng(0)
    arr = (rng.normal(0.0, 200.0, (6, 48, 48)) + 40.0).astype(np.float32)
    y, x = np.mgrid[-1:1:48j, -1:1:48j]
    arr[:, x**2 + y**2 > 0.35] = -1000.0 + rng.normal(0.0, 200.0, (6, int((x**2 + y**2 > 0.35).sum())))
    arr[
        :, 20:24, 20:24
    ] = -1800.0  # an in-body cluster this low (noise or streak): a measurement, not padding
    arr[:, x**2 + y**2 > 0.95] = padding
    return arr


@pytest.mark.parametrize("padding", [-2048.0, -3024.0, -32768.0])
def test_padding_becomes_air_but_low_values_inside_the_image_are_kept(tmp_path, padding, diffusioncore_log):
    arr = noisy_scan_with_padding(padding)
    outside = np.broadcast_to(np.mgrid[-1:1:48j, -1:1:48j][0] ** 2 + np.mgrid[-1:1:48j, -1:1:48j][1] ** 2 > 0.95,
                              arr.shape)  # fmt: skip
    path = write_volume(Volume(arr, (0.8, 0.8, 5.0)), tmp_path / "noisy.nii.gz", dtype="float32")
    vol = read_volume(path)
    assert np.all(vol.array[outside] == AIR_HU)  # the padding
    np.testing.assert_array_equal(vol.array[:, 20:24, 20:24], -1800.0)  # kept
    low_inside = (arr < -1500) & ~outside
    assert low_inside.sum() > 16 * 6  # noise voxels too
    # inside the image only low voxels touching the padding (a chain of them reaching it) join it
    from scipy import ndimage

    changed = (vol.array != arr) & ~outside
    near = ndimage.binary_dilation(outside, np.ones((1, 3, 3), bool), iterations=3)
    assert np.all(near[changed]) and changed.sum() < 0.1 * low_inside.sum()
    said = [r for r in diffusioncore_log if "taken as padding" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO  # once per volume
    replaced = int((arr < -1500).sum() - (vol.array < -1500).sum())
    assert f"{replaced} voxels below -1500 HU" in said[0].getMessage()
    assert f"{int((vol.array < -1500).sum())} voxels that low inside the image" in said[0].getMessage()


def test_dicom_padding_conventions_still_read_as_air(tmp_path, make_phantom):
    """Siemens-like -2048 and GE-like -3024 stored in the slices (outside a circle) read as air, as before."""
    vol = make_phantom(shape=(4, 32, 32))
    y, x = np.mgrid[-1:1:32j, -1:1:32j]
    for padding in (-2048.0, -3024.0):
        arr = vol.array.copy()
        arr[:, x**2 + y**2 > 1.0] = padding
        write_dicom_series(tmp_path / f"pad{padding:g}", vol.with_array(arr))
        got = read_volume(tmp_path / f"pad{padding:g}")
        assert got.array.min() == AIR_HU
        np.testing.assert_array_equal(got.array[:, x**2 + y**2 > 1.0], AIR_HU)


def test_replace_padding_on_an_array_leaves_an_enclosed_cluster():
    arr = np.full((2, 10, 10), 40.0, np.float32)
    arr[:, 0, :] = -3024.0  # a padding row at the edge
    arr[:, 4:6, 4:6] = -1700.0  # enclosed
    out = replace_padding(arr)
    assert np.all(out[:, 0] == AIR_HU) and np.all(out[:, 4:6, 4:6] == -1700.0)


# -- int16 output -------------------------------------------------------------------------------------------------
def test_int16_output_warns_of_clipped_voxels(tmp_path, diffusioncore_log):
    """An extended-HU result (metal to 36,000 HU) written as int16 is clipped at 32,767 HU: the warning counts the
    voxels and names the output type that keeps them."""
    arr = np.full((4, 16, 16), 40.0, np.float32)
    arr[1, 5:8, 5:8] = 36000.0  # 9 voxels above the int16 range
    arr[2, 0, 0] = -40000.0  # and one below
    path = write_volume(Volume(arr, (0.8, 0.8, 2.0)), tmp_path / "metal.nii.gz", dtype="int16")
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert back.max() == 32767 and back.min() == -32768
    warned = [r.getMessage() for r in diffusioncore_log if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "10 voxels outside the int16 range" in warned[0]
    assert "--output-dtype float32" in warned[0] and "36000" in warned[0]


def test_int16_output_in_range_and_auto_say_nothing(tmp_path, diffusioncore_log):
    arr = np.full((4, 16, 16), 40.0, np.float32)
    write_volume(Volume(arr, (0.8, 0.8, 2.0)), tmp_path / "plain.nii.gz", dtype="int16")
    arr[1, 5:8, 5:8] = 36000.0
    path = write_volume(Volume(arr, (0.8, 0.8, 2.0)), tmp_path / "auto.nii.gz")  # auto: float32 keeps them
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).max() == 36000.0
    assert not [r for r in diffusioncore_log if r.levelno >= logging.WARNING]


def padded_thick_scan() -> np.ndarray:
    """A small thick-slice chest-like scan (z, y, x) with -3024 HU outside its reconstruction circle."""
    from conftest import ct_phantom_array

    arr = ct_phantom_array((8, 40, 40))
    y, x = np.mgrid[-1:1:40j, -1:1:40j]
    arr[:, x**2 + y**2 > 0.9] = -3024.0
    return arr


def test_sr_run_on_an_in_memory_volume_with_padding_gives_the_result_of_its_file(tmp_path):
    """Probe 47, finding 5: read_volume turns padding into air, so SR on an in-memory volume (or Volume.from_sitk of
    an image SimpleITK read) saw -3024 HU beside the body and differed from the ``sr`` command's result."""
    from DiffusionCore.cli.main import main
    from DiffusionCore.sr.pipeline import SuperResolver

    arr = padded_thick_scan()
    given = arr.copy()
    vol = Volume(arr, (0.8, 0.8, 4.0), (-16.0, -16.0, 0.0))
    path = write_volume(vol, tmp_path / "padded.nrrd", dtype="float32")
    resolver = SuperResolver.tiny()
    in_memory, report = resolver.run(vol, factor=2, device="cpu")
    assert np.array_equal(vol.array, given)  # the caller's volume is not modified
    from_file, file_report = resolver.run(read_volume(path), factor=2, device="cpu")
    assert np.array_equal(in_memory.array, from_file.array)
    from_sitk, _ = resolver.run(Volume.from_sitk(sitk.ReadImage(str(path))), factor=2, device="cpu")
    assert np.array_equal(from_sitk.array, from_file.array)
    said = [n for n in report["notes"] if "taken as padding and set to air" in n]
    assert len(said) == 1 and said[0].startswith(f"{int((given < -1500).sum())} voxels below -1500 HU")
    assert not any("padding" in n for n in file_report.get("notes", []))  # read_volume replaced it already
    out = tmp_path / "cli.nrrd"
    n = torch_threads()
    assert main(["sr", str(path), str(out), "--tiny-test-model", "--factor", "2", "--device", "cpu", "--threads",
                 str(n), "--progress", "none", "--output-dtype", "float32"]) == 0  # fmt: skip
    assert np.array_equal(read_volume(out).array, in_memory.array)


def test_sr_run_keeps_low_values_inside_the_image_and_makes_no_copy_without_padding():
    from DiffusionCore.sr.pipeline import without_padding

    arr = np.full((4, 16, 16), 40.0, np.float32)
    arr[:, 6:9, 6:9] = -1700.0  # enclosed: a measurement, kept as read_volume keeps it
    vol = Volume(arr, (0.8, 0.8, 4.0))
    assert without_padding(vol) == (vol, "")
    arr[:, 0, :] = -2048.0
    out, note = without_padding(vol)
    assert out is not vol and np.all(out.array[:, 0, :] == AIR_HU) and np.all(out.array[:, 6:9, 6:9] == -1700.0)
    assert np.all(vol.array[:, 0, :] == -2048.0) and note.startswith("64 voxels below -1500 HU")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
