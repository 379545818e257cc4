"""Extended-HU CT (probe 33, F1): metal up to ~31,000 HU is valid CT, and its result is written, whole.

A scanner's extended CT scale stores metal up to ~30,000 HU. Cubic interpolation and the through-plane predictor
overshoot next to such metal (the report's series, -1024..30,970 HU in 5 mm slices: the x2 result reached 36,361 HU,
0.17 of the input's span above its maximum), so the final check's fixed -2048..32767 HU refused the result after the
work as "the computation failed numerically ... report it", and ``--allow-non-ct`` (the way through) then wrote the
DICOM series as int16 with 363 voxels clipped at 32,767 HU without a word. Now the check's top follows the input's
own range (:func:`~DiffusionCore.cli.common.result_range`), and the DICOM writer stores such a result unsigned with
a RescaleIntercept (:func:`~DiffusionCore.dicom_out.pixel_encoding`), clipping (and counting) only what no 16-bit
encoding holds.

Through the real ``sr`` command (the default weights, as the report ran it) on a phantom written as NIfTI and as a
DICOM series; the DICOM output is read back by pydicom and the project's reader, and checked by ``dciodvfy`` when
it is installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series

from DiffusionCore.cli.common import RESULT_HU_RANGE, check_result, result_range
from DiffusionCore.dicom_out import pixel_encoding
from DiffusionCore.dicom_out import write_dicom_series as write_series
from DiffusionCore.errors import NumericalError
from DiffusionCore.provenance import Provenance
from DiffusionCore.volume import Volume, read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]


def sr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "sr", *map(str, args), "--factor", "2", "--no-adapt",
                           "--device", "cpu", "--progress", "none"], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def extended_hu_thick(seed: int = 1) -> Volume:
    """5 mm slabs (8 x 48 x 48, 0.7 mm pixels) of a thin phantom: a water body in air, a metal rod and a sphere of
    28,000-31,000 HU (no plateau at the maximum, as real metal on an extended scale), like the report's series."""
    rng = np.random.default_rng(seed)
    n, size, px, dz = 16, 48, 0.7, 2.5
    zz, yy, xx = np.mgrid[0:n, 0:size, 0:size].astype(np.float32)
    thin = np.full((n, size, size), -1024.0, np.float32)
    body = ((yy - 24) ** 2 + (xx - 24) ** 2) * px**2 <= 15**2
    thin[body] = rng.normal(40.0, 20.0, int(body.sum()))
    rod = (((yy - 30) ** 2 + (xx - 24) ** 2) * px**2 <= 9) & (zz >= 3) & (zz <= 11)
    sphere = ((yy - 18) ** 2 * px**2 + (xx - 18) ** 2 * px**2 + (zz - 8) ** 2 * dz**2) <= 25
    metal = rod | sphere
    thin[metal] = rng.uniform(28000.0, 31000.0, int(metal.sum()))
    thick = thin.reshape(n // 2, 2, size, size).mean(axis=1)
    return Volume(np.round(thick), (px, px, 5.0), (-16.0, -16.0, 40.0), np.eye(3))


def test_result_range_follows_an_extended_hu_input_and_keeps_the_ct_range():
    ct = Volume(np.linspace(-1024, 3071, 8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16), (0.7, 0.7, 5.0))
    assert tuple(result_range(ct)) == RESULT_HU_RANGE  # an ordinary CT: as before
    metal = extended_hu_thick()
    low, high = result_range(metal)
    lo, hi = float(metal.array.min()), float(metal.array.max())
    assert low == RESULT_HU_RANGE[0] and hi > 30000
    assert high >= hi + 0.45 * (hi - lo)  # the report's overshoot was 0.17 of the span: room for it and more
    check_result(metal.with_array(np.full(metal.shape, 36361.0, np.float32) * (metal.array > 0)),
                 "the sr result", hu_range=result_range(metal))  # the report's result: accepted  # fmt: skip
    blown = metal.with_array(metal.array * 10.0)  # a blow-up: still refused, saying what to try
    with pytest.raises(NumericalError) as refused:
        check_result(blown, "the sr result for m.nii.gz", hu_range=result_range(metal))
    message = str(refused.value)
    assert "the input's own -1024..30" in message and "--device cpu" in message and "--weights" in message
    assert "nothing was written" in message


def test_sr_writes_an_extended_hu_result_whole(tmp_path):
    thick = extended_hu_thick()
    src = write_volume(thick, tmp_path / "metal.nii.gz", dtype="float32")
    out = tmp_path / "thin.nii.gz"
    done = sr(src, out)
    assert done.returncode == 0, done.stderr  # refused as "failed numerically ... report it" before
    result = read_volume(out, check=False).array
    assert result.max() > 32767.0  # the overshoot next to the metal, kept in the float32 file
    assert result.max() < float(thick.array.max()) + 0.3 * float(np.ptp(thick.array))


def test_sr_writes_an_extended_hu_dicom_series_unsigned_with_an_intercept(tmp_path):
    thick = extended_hu_thick()
    source = tmp_path / "metal_dcm"
    for f in write_dicom_series(source, thick, intercept=-1024.0):  # stored HU + 1024, unsigned 16-bit, as
        ds = pydicom.dcmread(f)  # Siemens-like extended series are: they store up to 65535 - 1024 HU
        assert int(ds.pixel_array.min()) >= 0
        ds.PixelRepresentation = 0
        ds.save_as(f)
    assert read_volume(source).array.max() == pytest.approx(float(thick.array.max()))
    assert read_volume(source).metadata["stored_max_hu"] == 65535 - 1024  # room above the input's maximum
    series, nifti = tmp_path / "thin_dcm", tmp_path / "thin.nii.gz"
    done = sr(source, series)
    assert done.returncode == 0, done.stderr
    assert "clipped" not in done.stderr
    assert sr(source, nifti).returncode == 0  # the same run, as float32
    files = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    for ds in files:
        assert ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) == -1024.0
        assert float(ds.RescaleSlope) == 1.0 and ds.pixel_array.dtype == np.uint16
    as_dicom, as_float = read_volume(series, check=False).array, read_volume(nifti, check=False).array
    assert as_float.max() > 32767.0
    assert np.abs(as_dicom - as_float).max() <= 0.5  # nothing clipped: every voxel within rounding
    if shutil.which("dciodvfy"):
        for f in sorted(series.iterdir())[:2]:
            check = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
            errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
            assert errors == [], errors


def test_pixel_encoding_keeps_int16_for_ct_and_clips_only_what_16_bits_cannot_hold(tmp_path, caplog):
    ct = np.array([-1024.4, 0.0, 3071.0], np.float32)
    stored, signed, intercept = pixel_encoding(ct)
    assert (signed, intercept, stored.dtype.str) == (1, 0, "<i2") and stored.tolist() == [-1024, 0, 3071]
    low = np.array([-3000.0, 36000.0], np.float32)  # reaching below -1024: the intercept goes with it
    stored, signed, intercept = pixel_encoding(low)
    assert (signed, intercept) == (0, -3000) and (stored.astype(int) + intercept).tolist() == [-3000, 36000]

    wide = Volume(np.full((2, 8, 8), -1024.0, np.float32), (1.0, 1.0, 2.0))
    wide.array[0, :2, :3] = 70000.0  # a span of 71,024: no 16-bit encoding holds it
    prov = Provenance(
        task="sr", title="SR x2 (synthetic)", weights="w", weights_sha256="0" * 64, environment={}
    )
    with caplog.at_level(logging.WARNING, logger="DiffusionCore"):
        out = write_series(wide, tmp_path / "wide", prov)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("6 voxels clipped to -32768..32767 HU" in m and "NRRD or NIfTI" in m for m in said), said
    back = read_volume(out, check=False).array
    assert back.max() == 32767.0 and int(np.count_nonzero(back == 32767.0)) == 6


def test_values_below_minus_2048_inside_the_image_pass_the_result_check_through_sr(tmp_path):
    """Probe 35, N6: since only padding that reaches the image's edge becomes air, a metal artefact's dark streak at
    the scanner's floor (-3024 HU) inside the body is kept as read; the result check's bottom then follows the input,
    where the fixed -2048 HU refused the run after the work as a numerical failure."""
    thick = extended_hu_thick()
    arr = np.clip(thick.array, -1024, 3071)  # an ordinary CT ...
    arr[:, 20:23, 14:34] = -3024.0  # ... with a streak inside the body, not reaching the image's edge
    streak = thick.with_array(arr)
    low, high = result_range(streak)
    assert low < -3024 and high == RESULT_HU_RANGE[1]
    src = write_volume(streak, tmp_path / "streak.nii.gz", dtype="float32")
    done = sr(src, tmp_path / "thin.nii.gz")
    assert done.returncode == 0, done.stderr
    assert read_volume(tmp_path / "thin.nii.gz", check=False).array.min() < -2048  # the streak, kept
