"""What a written DICOM series says of its slices (probe 33, F5 and F8), through the real ``sr`` command on DICOM
series written by SimpleITK and edited as scanners write them.

- F8: SliceLocation follows the input series' own convention. Many scanners write the table's z coordinate, which
  for slices whose normal points to the feet (ImageOrientationPatient 1,0,0/0,-1,0, as the LIDC series are stored)
  is minus the position along the normal; the result wrote +125 where the input slice at the same place said -125,
  and viewers overlaying "slice location" showed opposite numbers for the same anatomy.
- F5: the input's slice thickness, and the note on an overlapping or interspaced input, travel with the result:
  10 mm slices every 5 mm are not 5 mm slabs, and a reader of the result could not tell. They are in the provenance
  (sidecar, NRRD header fields, report) and in the DICOM series' ImageComments and DerivationDescription; the series'
  own SliceThickness stays the thin grid's spacing (the thickness of the slices it holds as a grid: a viewer or
  planning system that reads 10 mm there would take the thin slices for overlapping 10 mm slabs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series

from DiffusionCore.dicom_out import DicomSource, slice_location_rule
from DiffusionCore.provenance import read_provenance
from DiffusionCore.volume import read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
#: ImageOrientationPatient 1,0,0/0,-1,0 with the slices stepping towards the feet: the normal is -z.
FEET_NORMAL = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])


def sr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "sr", *map(str, args), "--factor", "2",
                           "--tiny-test-model", "--device", "cpu", "--progress", "none"], capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def write_series(
    folder: Path, make_phantom, direction: np.ndarray, *, slice_location=None, thickness=None
) -> Path:
    """An 8-slice 5 mm CT series; ``slice_location(ipp, normal)`` gives each file's SliceLocation (None: none
    written), ``thickness`` its SliceThickness (default: the spacing)."""
    vol = make_phantom(
        shape=(8, 32, 32), spacing=(0.9, 0.9, 5.0), origin=(-14.0, -20.0, 100.0), direction=direction
    )
    write_dicom_series(folder, vol)
    normal = np.cross(direction[:, 0], direction[:, 1])
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        if "SliceLocation" in ds:
            del ds.SliceLocation
        if slice_location is not None:
            ds.SliceLocation = (
                f"{slice_location(np.array([float(v) for v in ds.ImagePositionPatient]), normal):.4f}"
            )
        if thickness is not None:
            ds.SliceThickness = f"{thickness:g}"
        ds.save_as(f)
    return folder


def written(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]


def test_slice_location_follows_an_input_that_writes_the_table_z(tmp_path, make_phantom):
    source = write_series(tmp_path / "feet", make_phantom, FEET_NORMAL, slice_location=lambda ipp, n: ipp[2])
    inputs = written(source)
    assert all(float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2])) for ds in inputs)
    done = sr(source, tmp_path / "thin")
    assert done.returncode == 0, done.stderr
    out = written(tmp_path / "thin")
    assert len(out) == 16
    for ds in out:  # the input's convention: SliceLocation = z, where the position along the normal is -z
        z = float(ds.ImagePositionPatient[2])
        assert float(ds.SliceLocation) == pytest.approx(z, abs=1e-3), (ds.SliceLocation, z)


def test_slice_location_keeps_an_offset_and_is_the_position_without_one(tmp_path, make_phantom):
    offset = write_series(
        tmp_path / "offset", make_phantom, np.eye(3), slice_location=lambda ipp, n: ipp @ n - 40.0
    )
    assert sr(offset, tmp_path / "thin_offset").returncode == 0
    for ds in written(tmp_path / "thin_offset"):
        assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]) - 40.0, abs=1e-3)

    silent = write_series(
        tmp_path / "none", make_phantom, FEET_NORMAL
    )  # no SliceLocation: the position along the
    assert sr(silent, tmp_path / "thin_none").returncode == 0  # normal, as before
    for ds in written(tmp_path / "thin_none"):
        assert float(ds.SliceLocation) == pytest.approx(-float(ds.ImagePositionPatient[2]), abs=1e-3)


def test_slice_location_rule_ignores_numbers_that_do_not_follow_the_positions(tmp_path, make_phantom):
    source = write_series(tmp_path / "odd", make_phantom, FEET_NORMAL, slice_location=lambda ipp, n: ipp[2])
    files = sorted(source.iterdir())
    normal = np.array([0.0, 0.0, -1.0])
    assert slice_location_rule(DicomSource.from_path(source), normal) == pytest.approx((-1.0, 0.0))
    ds = pydicom.dcmread(files[3])
    ds.SliceLocation = "7"  # one file of another numbering: no line holds them all
    ds.save_as(files[3])
    assert slice_location_rule(DicomSource.from_path(source), normal) == (1.0, 0.0)
    assert slice_location_rule(None, normal) == (1.0, 0.0)


def test_the_input_slice_thickness_and_its_note_travel_with_the_result(tmp_path, make_phantom):
    source = write_series(tmp_path / "overlap", make_phantom, np.eye(3), thickness=10.0)  # 10 mm every 5 mm
    series, nifti, nrrd = tmp_path / "thin", tmp_path / "thin.nii.gz", tmp_path / "thin.nrrd"
    for out in (series, nifti, nrrd):
        done = sr(source, out, *(["--report", tmp_path / "r.json"] if out == nifti else []))
        assert done.returncode == 0, done.stderr
        assert "10 mm thick but 5 mm apart" in done.stderr  # the run's warning ...
    record = json.loads((tmp_path / "thin.json").read_text())[
        "provenance"
    ]  # ... and the record of the result
    assert record["input_slice_thickness_mm"] == 10.0
    assert record["input_slice_note"].startswith(
        "the series' slices are 10 mm thick but 5 mm apart (an overlapping"
    )
    assert (
        json.loads((tmp_path / "r.json").read_text())["provenance"]["input_slice_note"]
        == record["input_slice_note"]
    )
    header = nrrd.read_bytes()[:20000].decode("latin-1")
    assert (
        "ctdiffusion_input_slice_thickness_mm:=10\n" in header
        and "ctdiffusion_input_slice_note:=the series'" in header
    )

    files = written(series)
    for ds in files:
        assert ds.ImageComments.endswith(
            f"Input slices 10 mm thick, 5 mm apart: {record['input_slice_note']}."
        )
        assert "; input slice thickness 10 mm; " in ds.DerivationDescription
        assert float(ds.SliceThickness) == pytest.approx(2.5)  # the thin grid's: the slices it holds
        assert float(ds.SpacingBetweenSlices) == pytest.approx(2.5)
    for path in (nifti, nrrd, sorted(series.iterdir())[0]):
        back = read_provenance(path)
        assert back is not None and back.input_slice_thickness_mm == 10.0, path
        assert back.input_slice_note == record["input_slice_note"], path

    plain = tmp_path / "plain.nii.gz"  # a NIfTI input: no thickness known, none claimed
    write_volume(read_volume(source), tmp_path / "plain_in.nii.gz")
    assert sr(tmp_path / "plain_in.nii.gz", plain).returncode == 0
    plain_record = json.loads((tmp_path / "plain.json").read_text())["provenance"]
    assert plain_record["input_slice_thickness_mm"] is None and plain_record["input_slice_note"] == ""
    assert read_provenance(plain).input_slice_thickness_mm is None


def test_an_input_as_thick_as_its_spacing_is_recorded_without_a_note(tmp_path, make_phantom):
    source = write_series(tmp_path / "slabs", make_phantom, np.eye(3))
    assert sr(source, tmp_path / "thin").returncode == 0
    ds = written(tmp_path / "thin")[0]
    assert ds.ImageComments.endswith("(sha256 " + ds.ImageComments.split("(sha256 ")[1].split(")")[0]
                                     + "). Input slices 5 mm thick, 5 mm apart.")  # fmt: skip
    back = read_provenance(sorted((tmp_path / "thin").iterdir())[0])
    assert back.input_slice_thickness_mm == 5.0 and back.input_slice_note == ""
    assert read_provenance(tmp_path / "thin") == back  # the series' folder, as sr's OUTPUT names it (probe 35, N5)


def test_the_input_slices_are_said_with_their_own_spacing_whichever_axis_the_run_refined():
    """Probe 35, N7: a coronal series (its slices array axis 0, 0.7 mm apart, SliceThickness 0.7) refined along y
    was said to have 'Input slices 0.7 mm thick, 5 mm apart': the thickness paired with the refined axis' spacing."""
    from DiffusionCore.provenance import Provenance

    prov = Provenance(task="sr", title="SR x2 (synthetic)", weights="w", weights_sha256="ab" * 32,
                      settings={"axis": "y", "input_spacing_xyz_mm": [0.7, 5.0, 0.7]}, input="coronal",
                      input_slice_thickness_mm=0.7)  # fmt: skip
    assert prov.input_slices() == "Input slices 0.7 mm thick, 0.7 mm apart."
