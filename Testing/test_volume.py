"""Volume I/O: exact geometry through every format, DICOM series, refusal of unusable inputs, atomic writes."""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionCore import files as files_module
from DiffusionCore import volume as volume_module
from DiffusionCore.errors import GeometryError, InputError, OutputError, OutputExistsError, ResourceError
from DiffusionCore.volume import (
    Volume,
    axis_index,
    check_ct,
    check_image_shape,
    read_volume,
    require_ct,
    suggested_factor,
    thick_axis,
    write_volume,
)

GEOM_TOL = 1e-5  # NIfTI stores the affine in float32


def assert_same_geometry(a: Volume, b: Volume, tol: float = GEOM_TOL) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=tol, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=tol, atol=1e-3)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


# -- round trips ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_array_and_oblique_geometry(tmp_path, oblique_phantom, suffix):
    path = write_volume(oblique_phantom, tmp_path / f"ct{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, oblique_phantom.array)
    assert_same_geometry(back, oblique_phantom)
    np.testing.assert_allclose(back.index_to_physical(), oblique_phantom.index_to_physical(), atol=1e-3)


def test_integer_volume_is_written_as_int16_and_read_back_exactly(tmp_path, oblique_phantom):
    vol = oblique_phantom.with_array(np.round(oblique_phantom.array))
    path = write_volume(vol, tmp_path / "ct.nii.gz")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(read_volume(path).array, vol.array)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_affine_is_ras_version_of_our_lps_geometry(tmp_path, oblique_phantom, suffix):
    path = write_volume(oblique_phantom, tmp_path / f"ct{suffix}")
    img = nib.load(str(path))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(img.affine, lps_to_ras @ oblique_phantom.index_to_physical(), atol=1e-3)
    # nibabel indexes (i, j, k) = (x, y, z); ours is (z, y, x)
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), oblique_phantom.array)


# -- DICOM series ------------------------------------------------------------------------------------
def test_dicom_series_rescale_and_geometry(tmp_path, oblique_phantom, dicom_series_writer):
    vol = oblique_phantom.with_array(np.round(oblique_phantom.array))
    files = dicom_series_writer(tmp_path / "series", vol, intercept=-1024.0)
    stored = np.frombuffer(files[0].read_bytes()[-2 * 32 * 32 :], "<u2").reshape(32, 32)
    np.testing.assert_array_equal(stored.astype(np.float32) - 1024.0, vol.array[0])  # file holds HU + 1024
    back = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(back.array, vol.array)  # the reader applied the rescale
    assert_same_geometry(back, vol, tol=1e-6)
    assert back.metadata["n_files"] == vol.shape[0]


def test_folder_with_several_series_uses_the_largest_and_warns(
    tmp_path, make_phantom, dicom_series_writer, diffusioncore_log
):
    big = make_phantom(shape=(8, 16, 16))
    small = make_phantom(shape=(4, 16, 16), origin=(0.0, 0.0, 100.0), seed=1)
    dicom_series_writer(tmp_path / "mixed", big, series_uid="1.2.3.4.100", prefix="big")
    dicom_series_writer(tmp_path / "mixed", small, series_uid="1.2.3.4.200", prefix="small")
    back = read_volume(tmp_path / "mixed")
    assert back.shape == (8, 16, 16)
    np.testing.assert_array_equal(back.array, np.round(big.array))
    warnings = [r.getMessage() for r in diffusioncore_log if r.levelno == logging.WARNING]
    assert any("2 DICOM series" in w and "largest" in w for w in warnings), warnings


def test_series_with_a_missing_slice_is_refused(tmp_path, make_phantom, dicom_series_writer):
    dicom_series_writer(tmp_path / "gap", make_phantom(shape=(8, 16, 16)), skip=(4,))
    with pytest.raises(InputError, match="missing slices"):
        read_volume(tmp_path / "gap")


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="without a readable DICOM series"):
        read_volume(tmp_path)


# -- unusable inputs ---------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "nope.nii.gz")


def test_truncated_nifti_is_an_input_error(tmp_path, phantom):
    path = write_volume(phantom, tmp_path / "ct.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="could not read"):
        read_volume(path)


def test_garbage_and_empty_files_are_input_errors(tmp_path):
    garbage = tmp_path / "ct.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    with pytest.raises(InputError, match="could not read"):
        read_volume(garbage)
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="could not read"):
        read_volume(empty)


def test_2d_image_is_refused_with_a_pointer_to_xray2ct(tmp_path):
    path = tmp_path / "xray.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.int16)), str(path))
    with pytest.raises(InputError, match=r"2D image \(30x20\).*xray2ct"):
        read_volume(path)


def test_4d_image_is_refused(tmp_path):
    path = tmp_path / "cine.nii.gz"
    phases = [sitk.GetImageFromArray(np.full((4, 5, 6), v, np.int16)) for v in (0, 10, 20)]
    sitk.WriteImage(sitk.JoinSeries(phases), str(path))
    with pytest.raises(InputError, match="4 dimensions.*extract one phase"):
        read_volume(path)


def test_rgb_volume_is_refused(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(path))
    with pytest.raises(InputError, match="3 components per voxel"):
        read_volume(path)


def test_single_slice_and_empty_images_are_refused():
    with pytest.raises(InputError, match="single slice"):
        check_image_shape(sitk.Image([16, 16, 1], sitk.sitkInt16), "one.nii")
    with pytest.raises(InputError, match="empty"):
        check_image_shape(sitk.Image([16, 0, 4], sitk.sitkInt16), "none.nii")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_all_nan_and_some_nan_volumes_are_refused(tmp_path, phantom, suffix):
    all_nan = phantom.with_array(np.full(phantom.shape, np.nan, np.float32))
    path = write_volume(all_nan, tmp_path / f"nan{suffix}")
    with pytest.raises(InputError, match="every voxel is NaN"):
        read_volume(path)
    some = phantom.array.copy()
    some[3, 4, 5] = np.nan
    some[0, 0, 0] = np.inf
    path = write_volume(phantom.with_array(some), tmp_path / f"some{suffix}")
    with pytest.raises(InputError, match=r"2 of \d+ voxels are NaN or infinite.*-1024"):
        read_volume(path)


def test_mr_like_intensities_warn_but_load(tmp_path, phantom, diffusioncore_log):
    mr = phantom.with_array(np.clip(phantom.array + 1000.0, 0, None) * 0.5)  # 0..~950, no air at -1000
    assert any("does not look like CT" in w for w in check_ct(mr))
    read_volume(write_volume(mr, tmp_path / "mr.nii.gz"))
    assert any("does not look like CT" in r.getMessage() for r in diffusioncore_log)
    assert check_ct(phantom) == []


def test_a_refused_volume_is_refused_once_not_also_warned_of(phantom, diffusioncore_log):
    """require_ct (what sr runs before the model) raises one error for a volume it refuses, without first
    logging the same doubt as a warning; a volume it takes with a doubt (no air, but values below 0) is warned of."""
    raw = phantom.with_array(phantom.array + 1024.0)  # a CT stored without its rescale intercept: 0..
    with pytest.raises(InputError, match="subtract 1024"):
        require_ct(raw, "input volume")
    assert not [r for r in diffusioncore_log if r.levelno >= logging.WARNING]
    no_air = phantom.with_array(np.maximum(phantom.array, -150.0))
    require_ct(no_air, "input volume")
    assert any("does not look like CT" in r.getMessage() for r in diffusioncore_log)


@pytest.mark.parametrize("padding", [-2048.0, -3024.0])
def test_padding_outside_the_scan_circle_becomes_air(tmp_path, phantom, padding):
    arr = phantom.array.copy()
    arr[:, :3, :3] = padding
    back = read_volume(write_volume(phantom.with_array(arr), tmp_path / "pad.nii.gz"))
    assert back.array.min() == -1024.0
    np.testing.assert_array_equal(back.array[:, :3, :3], -1024.0)
    np.testing.assert_array_equal(back.array[:, 3:, 3:], arr[:, 3:, 3:])


def test_volume_refuses_bad_shapes_and_spacing():
    with pytest.raises(InputError, match="3D array"):
        Volume(np.zeros((4, 4), np.float32))
    with pytest.raises(GeometryError, match="spacing must be positive"):
        Volume(np.zeros((4, 4, 4), np.float32), spacing=(1.0, 0.0, 1.0))


# -- thick axis --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spacing, axis, factor",
    [
        ((0.7, 0.7, 5.0), 0, 7),
        ((0.8, 0.8, 2.5), 0, 3),
        ((0.8, 3.2, 0.8), 1, 4),
        ((2.0, 0.5, 0.5), 2, 4),
        ((0.7, 0.7, 0.9), None, 1),
        ((1.0, 1.0, 1.0), None, 1),
    ],
)
def test_thick_axis_and_suggested_factor(spacing, axis, factor):
    vol = Volume(np.zeros((4, 4, 4), np.float32), spacing=spacing)
    assert thick_axis(vol) == axis
    assert thick_axis(vol.grid) == axis
    assert suggested_factor(vol) == factor


def test_axis_names():
    assert [axis_index(a) for a in ("z", "y", "x", "Z", 0, 2)] == [0, 1, 2, 0, 0, 2]
    with pytest.raises(InputError, match="unknown axis"):
        axis_index("t")


# -- writing -----------------------------------------------------------------------------------------
def test_existing_file_is_not_overwritten_without_permission(tmp_path, phantom):
    path = write_volume(phantom, tmp_path / "out.nii.gz")
    before = path.read_bytes()
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        write_volume(phantom.with_array(phantom.array + 1), path)
    assert path.read_bytes() == before
    write_volume(phantom.with_array(phantom.array + 1), path, overwrite=True)
    np.testing.assert_array_equal(read_volume(path).array, phantom.array + 1)


def test_output_under_a_regular_file_or_missing_folder_fails_cleanly(tmp_path, phantom):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="does not exist"):
        write_volume(phantom, blocker / "out.nii.gz")
    with pytest.raises(OutputError, match="does not exist"):
        write_volume(phantom, tmp_path / "no" / "such" / "out.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_unsupported_output_format(tmp_path, phantom):
    with pytest.raises(OutputError, match="use one of") as png:
        write_volume(phantom, tmp_path / "out.png")
    assert "DICOM" not in str(png.value)
    # a .dcm name: a DICOM result is a folder of files, and the message says how to ask for one
    with pytest.raises(OutputError, match=r"give a new folder \(e\.g\. .*out\) with --output-format dicom"):
        write_volume(phantom, tmp_path / "out.dcm")


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, phantom, monkeypatch):
    path = write_volume(phantom, tmp_path / "out.nii.gz")
    before = path.read_bytes()

    def failing_write(img, filename, useCompression=False):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("Description: disk full")

    monkeypatch.setattr(volume_module.sitk, "WriteImage", failing_write)
    with pytest.raises(OutputError, match="disk full"):
        write_volume(phantom, path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_paths_with_spaces_and_non_ascii(tmp_path, oblique_phantom):
    folder = tmp_path / "Patient Ünïcødé 01" / "série ct"
    folder.mkdir(parents=True)
    path = write_volume(oblique_phantom, folder / "thin slices é.nii.gz")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, oblique_phantom.array)
    assert_same_geometry(back, oblique_phantom)
    assert os.listdir(folder) == ["thin slices é.nii.gz"]


# -- parallel gzip -------------------------------------------------------------------------------------
def test_nii_gz_is_one_gzip_member_that_itk_nibabel_and_gunzip_read(tmp_path, make_phantom, monkeypatch):
    # more than one 2 MiB compression block, compressed on two threads, still one gzip member with the
    # same bytes and geometry as ITK's own uncompressed NIfTI
    vol = make_phantom(shape=(40, 128, 128), spacing=(0.7, 0.8, 3.0), origin=(-10.0, 5.5, -300.0))
    vol.array[:] += np.random.default_rng(1).normal(0, 30, vol.shape).astype(np.float32)
    monkeypatch.setattr(volume_module, "gzip_file", lambda s, d: files_module.gzip_file(s, d, threads=2))
    gz = write_volume(vol, tmp_path / "thin.nii.gz", dtype="float32")
    plain = write_volume(vol, tmp_path / "thin.nii", dtype="float32")
    raw = plain.read_bytes()
    assert len(raw) > (2 << 20)  # two blocks
    d = zlib.decompressobj(31)
    assert d.decompress(gz.read_bytes()) == raw and d.eof and d.unused_data == b""
    assert gzip.decompress(gz.read_bytes()) == raw
    back = read_volume(gz)
    np.testing.assert_array_equal(back.array, vol.array)
    assert_same_geometry(back, vol)
    nib_img = nib.load(str(gz))
    np.testing.assert_array_equal(np.asarray(nib_img.dataobj).transpose(2, 1, 0), vol.array)
    np.testing.assert_allclose(nib_img.affine, nib.load(str(plain)).affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thin.nii", "thin.nii.gz"]  # no temporaries left


@pytest.mark.parametrize("size", [0, 1, (2 << 20), 5 * (1 << 20) + 17])
def test_gzip_file_gives_the_same_bytes_on_any_thread_count(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 16, size, dtype=np.uint8).tobytes()
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    outputs = []
    for threads in (1, 3):
        dst = tmp_path / f"data{threads}.gz"
        files_module.gzip_file(src, dst, threads=threads)
        outputs.append(dst.read_bytes())
        assert gzip.decompress(outputs[-1]) == data
    assert outputs[0] == outputs[1]


def test_int16_output_rounds_and_clips(tmp_path, phantom):
    vol = phantom.with_array(np.full(phantom.shape, 12.5, dtype=np.float32))
    vol.array[0, 0, :4] = [-40000.0, 40000.0, -0.6, 1.49]
    img = sitk.ReadImage(str(write_volume(vol, tmp_path / "a.nii.gz", dtype="int16")))
    assert img.GetPixelID() == sitk.sitkInt16
    back = sitk.GetArrayFromImage(img)
    np.testing.assert_array_equal(back[0, 0, :4], [-32768, 32767, -1, 1])
    assert np.all(back[1:] == 12)  # round half to even, like numpy


def test_parallel_work_uses_at_most_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = files_module.usable_cpus()
    assert cores == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert files_module.usable_cpus() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")  # ignored, as torch falls back to its default
    assert files_module.usable_cpus() == cores


@pytest.mark.parametrize("suffix,gzip_marker,raw_marker", [
    (".nrrd", b"encoding: gzip", b"encoding: raw"),
    (".mha", b"CompressedData = True", b"CompressedData = False"),
])
def test_compression_of_nrrd_and_mha_can_be_turned_off(tmp_path, oblique_phantom, suffix, gzip_marker, raw_marker):
    packed = write_volume(oblique_phantom, tmp_path / f"packed{suffix}")
    plain = write_volume(oblique_phantom, tmp_path / f"plain{suffix}", compress=False)
    assert gzip_marker in packed.read_bytes()[:2000] and raw_marker in plain.read_bytes()[:2000]
    assert plain.stat().st_size > packed.stat().st_size
    for path in (packed, plain):
        back = read_volume(path)
        np.testing.assert_array_equal(back.array, oblique_phantom.array)
        assert_same_geometry(back, oblique_phantom)


def test_a_full_disk_while_compressing_leaves_no_temporaries_and_keeps_the_old_file(tmp_path, phantom, monkeypatch):
    path = write_volume(phantom, tmp_path / "out.nii.gz")
    before = path.read_bytes()

    def disk_full(src, dst):
        Path(dst).write_bytes(b"\x1f\x8b half")
        raise OSError(28, "No space left on device")

    def cut_short(path, voxel_bytes):  # the one-pass compressed write tried then does not fit either
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volume_module, "gzip_file", disk_full)
    monkeypatch.setattr(volume_module, "_check_gzip_complete", cut_short)
    with pytest.raises(OutputError, match="the disk holding .* is full"):
        write_volume(phantom, path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_reading_a_large_volume_holds_its_voxels_once(tmp_path):
    """The Slicer modules read each result back (512x512x1200 float32: 1.2 GB); replacing the padding used to copy
    the whole array once more, so reading took three times the result's size at its peak. Now the array read is
    the one returned (numpy's allocations, as tracemalloc sees them: ITK's own buffer is freed as soon as it is
    copied)."""
    import tracemalloc

    arr = np.full((64, 128, 128), 40.0, np.float32)
    arr[:, :4] = -3024.0  # padding outside the scan circle
    path = write_volume(Volume(arr, (0.8, 0.8, 2.0)), tmp_path / "result.nrrd", dtype="float32", compress=False)
    tracemalloc.start()
    try:
        vol = read_volume(path, check=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert float(vol.array.min()) == -1024.0 and float(vol.array.max()) == 40.0
    assert peak < 1.5 * arr.nbytes, f"peak {peak / arr.nbytes:.2f} times the voxels"


@pytest.mark.parametrize("direction", [np.zeros((3, 3)), [[1, 0, 0], [0, 1, 0], [1, 0, 0]],
                                       [[1, 0, 0], [0, 1, 0], [0, np.nan, 1]], np.eye(3) * 1e-3, np.ones(4)])  # fmt: skip
def test_volume_refuses_a_singular_or_non_finite_direction_with_a_geometry_error(direction):
    with pytest.raises(GeometryError, match="direction"):
        Volume(np.zeros((2, 3, 4), np.float32), direction=direction)
    Volume(np.zeros((2, 3, 4), np.float32), direction=np.diag([1.0, -1.0, 1.0]))  # a flip is a valid direction


def test_with_array_and_from_grid_refuse_a_shape_mismatch_with_a_geometry_error():
    vol = Volume(np.zeros((2, 3, 4), np.float32), spacing=(1.0, 1.0, 2.0))
    with pytest.raises(GeometryError, match=r"array shape \(3, 3, 4\) differs from the volume's \(2, 3, 4\)"):
        vol.with_array(np.zeros((3, 3, 4)))
    with pytest.raises(GeometryError, match=r"array shape \(2, 3, 5\) differs from the grid's \(2, 3, 4\)"):
        Volume.from_grid(vol.grid, np.zeros((2, 3, 5)))
    assert Volume.from_grid(vol.grid, np.ones((2, 3, 4))).grid == vol.grid


def test_write_volume_without_overwrite_never_replaces_a_file_that_appeared_while_it_wrote(tmp_path, monkeypatch):
    vol = Volume(np.zeros((2, 3, 4), np.float32))
    out = tmp_path / "out.nrrd"
    check_complete = volume_module._check_complete

    def another_program_writes_out(*args, **kwargs):  # after the up-front exists-check, before the rename
        out.write_bytes(b"theirs")
        return check_complete(*args, **kwargs)

    monkeypatch.setattr(volume_module, "_check_complete", another_program_writes_out)
    with pytest.raises(OutputExistsError, match="appeared while this run was writing it and was not replaced"):
        write_volume(vol, out)
    assert out.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nrrd"]  # no partial file left
    write_volume(vol, out, overwrite=True)  # asked for: replaced
    assert read_volume(out).shape == (2, 3, 4)


def test_publish_without_overwrite_where_hard_links_fail_checks_just_before_the_rename(tmp_path, monkeypatch):
    from DiffusionCore.files import publish, write_json_atomic

    def no_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")  # what a FAT file system answers

    monkeypatch.setattr(os, "link", no_links)
    write_json_atomic({"a": 1}, tmp_path / "r.json", overwrite=False)
    assert (tmp_path / "r.json").read_text().startswith("{")
    tmp = tmp_path / "tmp"
    tmp.write_text("new")
    with pytest.raises(OutputExistsError, match="appeared while"):
        publish(tmp, tmp_path / "r.json", overwrite=False)
    assert tmp.exists() and (tmp_path / "r.json").read_text().startswith("{")


# -- Volume.from_nibabel: nibabel's RAS affine and (x, y, z) data (probe 47, finding 3) ------------------------------
def _nifti_like_read_volume(path: Path) -> tuple[Volume, Volume]:
    """The file read by the library's reader, and nibabel's image of it converted."""
    return read_volume(path, check=False), Volume.from_nibabel(nib.load(str(path)))


def _assert_same_volume(a: Volume, b: Volume) -> None:
    np.testing.assert_array_equal(a.array, b.array)
    assert a.array.dtype == b.array.dtype == np.float32
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=1e-6)  # float32 header fields
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=1e-4)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=1e-6)


def _ras_affine(direction_lps: np.ndarray, spacing: tuple[float, ...], origin_lps: tuple[float, ...]) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = direction_lps @ np.diag(spacing)
    a[:3, 3] = origin_lps
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a


@pytest.mark.parametrize("case", ["oblique", "flipped-y", "qform-only", "scaled-int16", "no-orientation", "padding"])
def test_from_nibabel_gives_what_read_volume_gives_for_the_file(tmp_path, oblique_direction, case):
    """The advice for building a Volume from an affine ignored that nibabel's is RAS and a Volume LPS: following it
    gave a volume mirrored in x and y (voxel (10, 20, 5) at LPS (219.6, 76.2) instead of (-219.6, -76.2))."""
    from conftest import ct_phantom_array

    data = ct_phantom_array((12, 20, 16)).T.copy()  # nibabel's order: (x, y, z)
    direction = oblique_direction if case != "flipped-y" else np.diag([1.0, -1.0, 1.0])
    affine = _ras_affine(direction, (0.7, 0.9, 2.5), (-101.5, 32.25, -405.0))
    img = nib.Nifti1Image(data, affine)
    if case == "qform-only":
        img.set_sform(None, code=0)
    elif case == "scaled-int16":
        img = nib.Nifti1Image(np.round((data + 1024.0) * 2).astype(np.int16), affine)
        img.header.set_slope_inter(0.5, -1024.0)
    elif case == "no-orientation":  # sform and qform codes 0: nibabel's affine centres it and flips x; ITK does not
        img = nib.Nifti1Image(data, None)
        img.header.set_zooms((0.7, 0.9, 2.5))
    elif case == "padding":  # the outside of the scan circle: -3024, replaced by air as read_volume does
        data[:3, :3, :] = -3024.0
        img = nib.Nifti1Image(data, affine)
    path = tmp_path / f"{case}.nii.gz"
    nib.save(img, str(path))
    read, converted = _nifti_like_read_volume(path)
    _assert_same_volume(read, converted)
    assert converted.metadata["source"] == str(path)
    if case == "padding":
        assert converted.array.min() == -1024.0
        assert Volume.from_nibabel(nib.load(str(path)), padding_to_air=False).array.min() == -3024.0
    if case in ("oblique", "flipped-y"):  # a voxel's place in LPS, from the affine by hand
        ijk = np.array([10, 15, 5, 1.0])
        lps = (np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine @ ijk)[:3]
        np.testing.assert_allclose((converted.index_to_physical() @ ijk)[:3], lps, atol=1e-4)
        assert converted.array[5, 15, 10] == data[10, 15, 5]


def test_from_nibabel_of_an_in_memory_image_never_changes_its_data_and_round_trips(tmp_path, oblique_phantom):
    data = oblique_phantom.array.T.copy()
    data[0, 0, :] = -3024.0  # padding, replaced in the volume only
    before = data.copy()
    img = nib.Nifti1Image(data, _ras_affine(oblique_phantom.direction, oblique_phantom.spacing, oblique_phantom.origin))
    vol = Volume.from_nibabel(img, name="mine")
    np.testing.assert_array_equal(data, before)
    assert not np.shares_memory(vol.array, data)
    assert vol.metadata == {"source": "nibabel image", "name": "mine"}
    assert_same_geometry(vol, oblique_phantom)
    write_volume(vol, tmp_path / "back.nii.gz")
    np.testing.assert_allclose(nib.load(str(tmp_path / "back.nii.gz")).affine, img.affine, atol=1e-4)


def test_from_nibabel_refuses_what_is_no_3d_image_with_what_to_do(tmp_path):
    with pytest.raises(InputError, match="needs a nibabel image .*read_volume"):
        Volume.from_nibabel(np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match=r"shape \(4, 5, 6, 1\).*squeeze_image"):
        Volume.from_nibabel(nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), np.eye(4)))
    with pytest.raises(InputError, match=r"shape \(4, 5, 6, 2\).*img.slicer"):
        Volume.from_nibabel(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)))
    flat = np.eye(4)
    flat[2, 2] = 0.0  # an sform with a zero voxel size (nibabel refuses to build one in memory: a file holds it)
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), None)
    img.header.set_sform(flat, code=1)
    nib.save(img, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(GeometryError, match=r"flat.nii.gz: the image's affine gives a voxel size of \(1, 1, 0\) mm"):
        Volume.from_nibabel(nib.load(str(tmp_path / "flat.nii.gz")))


def test_from_nibabel_without_nibabel_says_how_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_nibabel(name, *args, **kwargs):
        if name == "nibabel" or name.startswith("nibabel."):
            raise ImportError("No module named 'nibabel'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nibabel)
    with pytest.raises(InputError, match="needs nibabel, which is not installed: pip install nibabel"):
        Volume.from_nibabel(object())


def test_the_unit_direction_advice_names_from_nibabel_and_the_ras_to_lps_flip():
    with pytest.raises(GeometryError) as info:
        Volume(np.zeros((4, 5, 6), np.float32), direction=np.diag([0.5, 0.5, 2.0]))
    said = str(info.value)
    assert "Volume.from_nibabel(img)" in said and "LPS" in said and "np.diag([-1, -1, 1, 1]) @ A" in said



def test_from_nibabel_on_the_chest_dx_sample_when_it_is_cached(tmp_path):
    """The real sample file (a crop of it, written as it was read by nibabel, with an oblique and a flipped variant)."""
    from DiffusionCore import sampledata

    path = sampledata.sample_dir("chest-dx") / "chest-dx.nii.gz"
    if not path.is_file():
        pytest.skip("chest-dx is not in the sample cache (python -m DiffusionCore sample-data chest-dx)")
    whole = nib.load(str(path))
    _assert_same_volume(*_nifti_like_read_volume(path))
    crop = whole.slicer[160:224, 180:244, 20:36]
    data, affine = np.asarray(crop.dataobj), crop.affine
    turn = np.eye(4)
    turn[:3, :3] = nib.eulerangles.euler2mat(0.3, -0.2, 0.25)
    flip = affine.copy()
    flip[:3, 0] *= -1
    for name, img in (("crop", crop), ("oblique", nib.Nifti1Image(data, turn @ affine, crop.header)),
                      ("flipped", nib.Nifti1Image(data[::-1], flip, crop.header))):  # fmt: skip
        nib.save(img, str(tmp_path / f"{name}.nii.gz"))
        _assert_same_volume(*_nifti_like_read_volume(tmp_path / f"{name}.nii.gz"))


# -- torch tensors: detached and brought to the CPU, never changed (probe 47, finding 10) -----------------------------
def test_a_tensor_that_requires_grad_is_detached_and_copied_not_refused_with_torchs_error():
    torch = pytest.importorskip("torch")
    t = torch.linspace(-1000.0, 1000.0, 4 * 8 * 8).reshape(4, 8, 8).requires_grad_(True)
    before = t.detach().clone()
    vol = Volume(t, spacing=(0.5, 0.5, 2.0))
    assert vol.array.dtype == np.float32 and vol.shape == (4, 8, 8)
    np.testing.assert_array_equal(vol.array, before.numpy())
    vol.array += 1.0  # the volume's voxels are its own: the caller's tensor and its graph are untouched
    assert torch.equal(t.detach(), before) and t.requires_grad and t.grad is None
    out = (t * 2).sum()  # the graph still works
    out.backward()
    assert torch.equal(t.grad, torch.full_like(t, 2.0))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64", "int16"])
def test_tensors_of_every_real_dtype_become_float32_volumes(dtype):
    torch = pytest.importorskip("torch")
    t = torch.tensor([[[-1024.0, 0.0], [40.0, 1000.0]]] * 3).to(getattr(torch, dtype))
    vol = Volume(t[:, :, :].transpose(1, 2))  # a non-contiguous view too
    np.testing.assert_array_equal(vol.array, t.transpose(1, 2).to(torch.float32).numpy())
    with pytest.raises(InputError, match="complex tensor"):
        Volume(torch.zeros(2, 2, 2, dtype=torch.complex64))
    with pytest.raises(InputError, match="'meta' device"):
        Volume(torch.zeros(2, 2, 2, device="meta"))


def test_a_gpu_tensor_is_brought_to_the_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    t = torch.full((3, 4, 5), 40.0, device="cuda", requires_grad=True)
    vol = Volume(t)
    assert isinstance(vol.array, np.ndarray) and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, np.full((3, 4, 5), 40.0, np.float32))
    assert t.device.type == "cuda" and t.requires_grad


# -- writing without a whole-volume copy (probe 46, finding 3) -----------------------------------------------------
def _itk_whole_write(vol: Volume, voxels: np.ndarray, path: Path, header: dict[str, str], compress: bool) -> bytes:
    """What ITK writes for ``voxels`` with ``vol``'s geometry: write_volume's output before it streamed the voxels."""
    img = sitk.GetImageFromArray(voxels)
    img.SetSpacing(vol.spacing)
    img.SetOrigin(vol.origin)
    img.SetDirection(tuple(float(v) for v in vol.direction.ravel()))
    for key, value in header.items():
        img.SetMetaData(key, value)
    sitk.WriteImage(img, str(path), compress)
    return path.read_bytes()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_write_volume_files_are_byte_for_byte_what_itk_writes(tmp_path, make_phantom, suffix, dtype):
    # the voxels go to the file from the array (int16 rounded slab by slab), after ITK's own header: the file is the
    # same, byte for byte, as ITK's write of the whole image (.nii.gz: the same .nii inside the gzip)
    vol = make_phantom(shape=(37, 48, 40), spacing=(0.7, 0.8, 3.0), origin=(-10.0, 5.5, -300.0))
    rng = np.random.default_rng(3)
    vol.array[:] += rng.normal(0, 30, vol.shape).astype(np.float32)
    vol.array[5, 20, 20:23] = (40000.7, -40000.2, 2.5)  # clipped and rounded to even in int16
    header = {"ITK_FileNotes": "probe 46", "DiffusionCore_note": "streamed"}
    written = write_volume(vol, tmp_path / f"out{suffix}", dtype=dtype, compress=False, header=header)
    voxels = volume_module._rounded_int16(vol.array)[0] if dtype == "int16" else vol.array
    reference = _itk_whole_write(vol, voxels, tmp_path / f"ref{suffix.replace('.gz', '')}", header, False)
    data = gzip.decompress(written.read_bytes()) if suffix == ".nii.gz" else written.read_bytes()
    assert data == reference
    back = read_volume(written)
    np.testing.assert_array_equal(back.array, voxels.astype(np.float32))
    assert_same_geometry(back, vol)


def test_write_volume_hands_itk_no_whole_volume_copy(tmp_path, make_phantom, monkeypatch):
    # ITK's copy of the whole output was every large run's memory peak (4 bytes per voxel, 1.26 GB for
    # 1200x512x512); an int16 output also made a whole int16 array. Uncompressed files now stream the voxels.
    vol = make_phantom(shape=(30, 32, 32))
    handed: list[int] = []
    real = volume_module.sitk.GetImageFromArray
    monkeypatch.setattr(volume_module.sitk, "GetImageFromArray", lambda a, *args: handed.append(a.size) or real(a, *args))
    rounded: list[int] = []
    real_round = volume_module._rounded_int16
    monkeypatch.setattr(volume_module, "_rounded_int16", lambda a: rounded.append(a.size) or real_round(a))
    for name, dtype in [("a.nii.gz", "float32"), ("b.nii", "int16"), ("c.nrrd", "float32"), ("d.mha", "int16")]:
        write_volume(vol, tmp_path / name, dtype=dtype, compress=False)
    assert max(handed) <= 2 * 32 * 32 and not rounded  # two slices for the header, at most
    write_volume(vol, tmp_path / "e.nrrd", dtype="int16", compress=True)  # ITK compresses: it writes it whole
    assert handed[-1] == vol.array.size


# -- the read-size check (probe 46, finding 9) ----------------------------------------------------------------------
@pytest.mark.parametrize("pixel", ["int16", "float32"])
def test_reading_a_file_that_fits_under_the_memory_limit_is_not_refused(tmp_path, make_phantom, monkeypatch, pixel):
    # reading takes about 8 bytes per voxel for a 2-byte or 4-byte file (ITK's image, numpy's copy of it, the float32
    # array; measured 8.0-8.2 on 67-315 M voxels): a limit of 11 bytes per voxel is enough, where the flat 16 refused
    vol = make_phantom(shape=(20, 64, 64))
    path = write_volume(vol, tmp_path / f"ct_{pixel}.nii.gz", dtype=pixel)
    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", str(11 * vol.array.size))
    np.testing.assert_array_equal(read_volume(path).array, np.round(vol.array) if pixel == "int16" else vol.array)


def test_reading_a_float64_file_counts_its_wider_pixels(tmp_path, make_phantom, monkeypatch):
    vol = make_phantom(shape=(20, 64, 64))
    path = tmp_path / "ct_float64.nrrd"
    sitk.WriteImage(vol.to_sitk(np.float64), str(path))
    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", str(16 * vol.array.size))  # ITK's and numpy's 8 + 8, float32's 4
    with pytest.raises(ResourceError, match=r"reading ct_float64.nrrd \(64x64x20 voxels\) needs about"):
        read_volume(path)
    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", str(24 * vol.array.size))
    np.testing.assert_array_equal(read_volume(path).array, vol.array)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_a_header_write_cut_short_by_a_full_disk_is_an_output_error_that_leaves_nothing(tmp_path, phantom, monkeypatch,
                                                                                        suffix):
    # on a full disk ITK reports success for an empty file: the streamed write must not take that for a header
    monkeypatch.setattr(volume_module.sitk, "WriteImage", lambda img, name, compress=False: Path(name).write_bytes(b""))
    with pytest.raises(OutputError, match="could not write"):
        write_volume(phantom, tmp_path / f"out{suffix}", compress=False)
    assert list(tmp_path.iterdir()) == []
