"""Where a DICOM series' slices lie, as hospitals' series record it: positions rounded or jittered (along the stack
and within the slice plane), a slice stored twice, and files that disagree on the slice thickness.

Each test writes a real DICOM series (SimpleITK's writer, then pydicom for the header a test changes) and reads it
with :func:`DiffusionCore.volume.read_volume`, checking what it says and the grid it returns.
"""

from __future__ import annotations

import logging
import re
import shutil

import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series

from DiffusionCore.errors import InputError
from DiffusionCore.geometry import gantry_tilt
from DiffusionCore.volume import dicom_slice_thickness, read_volume


def set_header(path, **values) -> None:
    """Change header attributes of a DICOM file (pydicom keywords), keeping the rest."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def messages(records, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= level]


def series_with_positions(folder, vol, offsets) -> list:
    """``vol`` written as a DICOM series whose ImagePositionPatient are moved by ``offsets`` (``(n, 3)`` mm)."""
    files = write_dicom_series(folder, vol)
    for f, offset in zip(files, offsets):
        ipp = np.asarray(pydicom.dcmread(f).ImagePositionPatient, dtype=float) + offset
        set_header(f, ImagePositionPatient=[f"{v:.6f}" for v in ipp])
    return files


# -- F3: positions along the stack ----------------------------------------------------------------------------
def test_positions_rounded_far_below_the_spacing_read_without_a_word(
    tmp_path, make_phantom, diffusioncore_log
):
    """Positions off an even grid by 0.002 mm (a converter writing few decimals; ITK warns from a ten-thousandth of
    the spacing) made ITK warn of "non uniform sampling or missing slices"; that is rounding, and nothing is said."""
    vol = make_phantom(shape=(8, 16, 16), spacing=(0.8, 0.8, 3.2), direction=np.eye(3))
    offsets = np.zeros((8, 3))
    offsets[1::2, 2] = 0.002
    series_with_positions(tmp_path / "rounded", vol, offsets)
    got = read_volume(tmp_path / "rounded")
    assert got.shape == vol.shape and got.spacing[2] == pytest.approx(3.2, abs=1e-3)
    assert messages(diffusioncore_log, logging.WARNING) == []
    assert "slice_position_deviation_mm" not in got.metadata


def test_jittered_positions_are_said_in_the_tools_words(tmp_path, make_phantom, diffusioncore_log):
    """Slices up to 0.3 mm off an even 5 mm grid are read (within a tenth of the spacing), stacked at their mean
    spacing: the warning says how far they lie from it, instead of ITK's raw line."""
    vol = make_phantom(shape=(9, 16, 16), spacing=(0.8, 0.8, 5.0), direction=np.eye(3))
    jitter = np.array([0.0, 0.3, -0.2, 0.1, -0.3, 0.2, 0.0, -0.1, 0.05])
    series_with_positions(tmp_path / "jitter", vol, np.c_[np.zeros((9, 2)), jitter])
    got = read_volume(tmp_path / "jitter")
    along = vol.origin[2] + 5.0 * np.arange(9) + jitter
    mean = (along[-1] - along[0]) / 8
    deviation = np.max(np.abs(along - (along[0] + mean * np.arange(9))))
    assert got.spacing[2] == pytest.approx(mean, abs=1e-5)  # stacked at the mean spacing, as the note says
    warned = messages(diffusioncore_log, logging.WARNING)
    assert len(warned) == 1, warned
    assert (
        f"lie up to {deviation:.2g} mm" in warned[0]
        and f"stacked at their mean spacing, {mean:.4g} mm" in warned[0]
    )
    assert "ITK" not in warned[0] and "Non uniform" not in warned[0]
    assert got.metadata["slice_position_deviation_mm"] == pytest.approx(deviation, abs=1e-4)


# -- F4: two slices at one position ---------------------------------------------------------------------------
def test_a_slice_stored_twice_is_named_as_a_duplicate_file(tmp_path, make_phantom):
    files = write_dicom_series(tmp_path / "dup", make_phantom(shape=(6, 16, 16)))
    copy = files[0].parent / "resent.dcm"
    shutil.copy(files[3], copy)
    set_header(
        copy, SOPInstanceUID=pydicom.uid.generate_uid()
    )  # a PACS re-send: same image, new instance UID
    with pytest.raises(InputError) as info:
        read_volume(tmp_path / "dup")
    said = str(info.value)
    assert (
        "holds the same slice twice" in said and "identical pixel data" in said and "duplicate file" in said
    )
    assert {"slice003.dcm", "resent.dcm"} <= set(re.findall(r"\w+\.dcm", said))
    assert "Remove one of them" in said and "mixes several series" not in said


def test_two_different_slices_at_one_position_are_refused_naming_both_files(tmp_path, make_phantom):
    vol = make_phantom(shape=(6, 16, 16))
    files = write_dicom_series(tmp_path / "mixed", vol)
    other = write_dicom_series(tmp_path / "other", vol.with_array(vol.array + 100.0), series_uid=
                               "1.2.826.0.1.3680043.8.498.1", prefix="recon")  # fmt: skip
    shutil.copy(other[2], files[0].parent / "recon002.dcm")
    set_header(files[0].parent / "recon002.dcm", SOPInstanceUID=pydicom.uid.generate_uid())
    with pytest.raises(InputError) as info:
        read_volume(tmp_path / "mixed")
    said = str(info.value)
    assert "two different slices at the same position" in said and "mixes several series" in said
    assert "slice002.dcm" in said and "recon002.dcm" in said and "duplicate" not in said


# -- F11: SliceThickness of every file ------------------------------------------------------------------------
def test_files_disagreeing_on_slice_thickness_are_named(tmp_path, make_phantom, diffusioncore_log):
    """The thickness was read from the first file only: a series whose first (and last) file says 10 mm and the
    others 5 mm was taken as 10 mm thick, silently. Now the value most files give is taken, and the mix is warned of
    and recorded."""
    vol = make_phantom(shape=(8, 16, 16), spacing=(0.8, 0.8, 5.0), direction=np.eye(3))
    files = write_dicom_series(tmp_path / "thk", vol)
    for f in files:
        set_header(f, SliceThickness="10" if f in (files[0], files[-1]) else "5")
    got = read_volume(tmp_path / "thk")
    assert got.metadata["slice_thickness_mm"] == 5.0
    assert got.metadata["slice_thickness_values_mm"] == {"5": 6, "10": 2}
    warned = [m for m in messages(diffusioncore_log, logging.WARNING) if "SliceThickness" in m]
    assert len(warned) == 1 and "5 mm in 6 files" in warned[0] and "10 mm in 2 files" in warned[0]
    assert "mixed" in warned[0] or "two reconstructions" in warned[0]
    diffusioncore_log.clear()
    assert dicom_slice_thickness([str(f) for f in files]) == 5.0  # the Slicer module's reading says the same
    assert any("10 mm in 2 files" in m for m in messages(diffusioncore_log, logging.WARNING))


def test_one_slice_thickness_is_read_without_a_note(tmp_path, make_phantom, diffusioncore_log):
    files = write_dicom_series(
        tmp_path / "thk", make_phantom(shape=(6, 16, 16), spacing=(0.8, 0.8, 0.703125))
    )
    for f in files:
        set_header(f, SliceThickness="0.703125")
    got = read_volume(tmp_path / "thk")
    assert got.metadata["slice_thickness_mm"] == 0.703125  # as written, not rounded
    assert "slice_thickness_values_mm" not in got.metadata
    assert messages(diffusioncore_log, logging.WARNING) == []


# -- F12: in-plane jitter is not a gantry tilt ----------------------------------------------------------------
def test_in_plane_jitter_keeps_the_input_grid(tmp_path, make_phantom, diffusioncore_log):
    """Positions scattered by up to ~0.2 pixel within the slice plane (a sloppy converter) were read as "a gantry
    tilt of 0.0 degrees" and every slice resampled onto a wider grid. Jitter is rounding: the voxels come back as
    written, on the first slice's grid, with an info line saying how far the positions scattered."""
    vol = make_phantom(shape=(12, 24, 24), spacing=(0.8, 0.8, 2.5), direction=np.eye(3))
    vol = vol.with_array(np.round(vol.array))
    rng = np.random.default_rng(3)
    offsets = np.c_[rng.uniform(-0.1, 0.1, (12, 2)), np.zeros(12)]
    offsets[0] = 0.0
    series_with_positions(tmp_path / "jitter", vol, offsets)
    got = read_volume(tmp_path / "jitter")
    assert got.shape == vol.shape
    np.testing.assert_array_equal(got.array, vol.array)
    np.testing.assert_allclose(got.origin, vol.origin, atol=1e-6)
    assert "gantry_tilt_deg" not in got.metadata
    drift = float(np.max(np.linalg.norm(offsets[:, :2], axis=1)))
    assert got.metadata["position_jitter_mm"] == pytest.approx(drift, abs=1e-4)
    said = messages(diffusioncore_log)
    assert not any("gantry tilt of" in m for m in said)
    assert any(f"lie up to {drift:.2g} mm" in m and "without resampling" in m for m in said), said


def test_a_small_tilt_is_told_from_jitter():
    """A drift in proportion to the distance along the stack is a tilt, however small; the same drift scattered
    at random is jitter."""
    d = np.eye(3)
    along = np.arange(20) * 2.5
    line = np.c_[np.linspace(0.0, 0.15, 20), np.zeros(20), along]  # 0.15 mm over the stack: 0.19 pixel
    tilt = gantry_tilt(line, d, (0.8, 0.8))
    assert tilt is not None and not tilt.jitter and tilt.line_drift_mm == pytest.approx(0.15, abs=1e-6)
    scattered = line.copy()
    scattered[:, 0] = np.random.default_rng(0).permutation(line[:, 0])
    scattered[[0, 1], 0] = 0.0, 0.15  # drifting as far, but not with the distance
    assert gantry_tilt(scattered, d, (0.8, 0.8)).jitter
    far = scattered.copy()
    far[:, 0] *= 3  # 0.45 mm scattered (0.56 pixel): not rounding, refused by the reader as off one line
    assert not gantry_tilt(far, d, (0.8, 0.8)).jitter
