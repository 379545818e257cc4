"""Probe 39 (a PACS administrator's): a DICOM series written from an input that holds no patient or study.

``sr`` on a NIfTI CT and ``xray2ct`` on a PNG radiograph, with ``--output-format dicom``, wrote a series with an empty
PatientID and PatientName, no StudyDate or StudyTime and a study of its own, without a word: a PACS filed it under an
unknown patient or quarantined it (dcmgpdir: "required attribute PatientID (0010,0020) empty"). Now such a run is
refused before any work, naming the input and what to do; ``--patient-id`` and ``--patient-name`` name the patient
(refused with a DICOM input, whose patient the series joins, and without a DICOM output); a batch checks every input
before any work and refuses the whole run, naming the inputs that are not DICOM. And ``--series-number N`` taken by
another series of the study known here is warned of before the work, not only once the series is written.

Real subprocess runs of the tiny test models, on the CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import ct_phantom_array, write_dicom_series
from PIL import Image

from DiffusionCore.volume import Volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
ADVICE = "--patient-id ID --patient-name NAME"


def _run(command: str, *argv, tiny: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "DiffusionCore", command, *map(str, argv), *tiny,
                           "--tiny-test-model", "--device", "cpu", "--progress", "none", "--threads", "1"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, cwd=ROOT,
                          timeout=300)  # fmt: skip


def _sr(*argv) -> subprocess.CompletedProcess:
    return _run("sr", *argv, tiny=("--factor", "2"))


def _xray(*argv) -> subprocess.CompletedProcess:
    return _run("xray2ct", *argv)


def _nifti(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(Volume(ct_phantom_array((8, 32, 32), seed), spacing=(0.9, 0.9, 4.0)), path)
    return path


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((72, 64)) * 255).astype(np.uint8)).save(path)
    return path


def _series(folder: Path, seed: int = 0, *, number: int = 3, study: str = "1.2.826.0.1.3680043.8.498.2",
            uid: str = "1.2.826.0.1.3680043.8.498.1") -> Path:  # fmt: skip
    """A thick CT series of patient P-0042 (SeriesNumber ``number``) in the study ``study``."""
    vol = Volume(ct_phantom_array((8, 32, 32), seed), spacing=(0.9, 0.9, 4.0))
    write_dicom_series(folder, vol, series_uid=uid, study_uid=study)
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.SeriesNumber = "Doe^Jane", "P-0042", number
        ds.StudyDate, ds.StudyTime = "20260101", "101500"
        ds.save_as(f)
    return folder


def _first(folder: Path) -> pydicom.Dataset:
    return pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- 1. the refusal, before any work -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kind", [("ct.nii.gz", "a NIfTI file"), ("ct.nrrd", "an NRRD file"),
                                        ("ct.mha", "a MetaImage file")])  # fmt: skip
def test_sr_refuses_a_dicom_series_from_a_ct_file_that_holds_no_patient(tmp_path, name, kind):
    source = _nifti(tmp_path / name)
    before = _files(tmp_path)
    out = tmp_path / "series"
    done = _sr(source, out, "--output-format", "dicom")
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {source} is {kind}: it holds no patient or study"), error
    assert "a PACS files under an unknown patient" in error
    assert "Give the DICOM series itself as INPUT" in error and ".nii.gz / .nrrd" in error and error.endswith(ADVICE)
    assert "random weights" not in done.stderr  # refused before the weights are loaded
    assert _files(tmp_path) == before and not out.exists()


def test_xray2ct_refuses_a_dicom_series_from_a_png_radiograph(tmp_path):
    source = _png(tmp_path / "chest.png")
    out = tmp_path / "ct"
    done = _xray(source, out, "--output-format", "dicom", "--save-stages")
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {source} is a PNG image: it holds no patient or study"), error
    assert "Give the DICOM radiograph itself as INPUT" in error and error.endswith(ADVICE)
    assert "random weights" not in done.stderr
    assert _files(tmp_path) == ["chest.png"]


# -- 2. --patient-id and --patient-name ------------------------------------------------------------------------------
def test_sr_patient_options_name_the_patient_of_a_series_made_from_a_nifti_file(tmp_path):
    source = _nifti(tmp_path / "ct.nii.gz")
    out = tmp_path / "series"
    done = _sr(source, out, "--output-format", "dicom", "--patient-id", "RES-0007", "--patient-name", "Doe^Jane")
    assert done.returncode == 0, done.stderr
    said = done.stderr.index(f"info: the DICOM series from {source} is filed under patient ID 'RES-0007', name "
                             "'Doe^Jane', in a new study of its own (a NIfTI file holds no study)")  # fmt: skip
    assert said < done.stderr.index("random weights")  # said before the work
    files = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(out.glob("*.dcm"))]
    assert len(files) == 16
    assert {ds.PatientID for ds in files} == {"RES-0007"} and {str(ds.PatientName) for ds in files} == {"Doe^Jane"}
    first = files[0]
    assert first.StudyDate == first.SeriesDate and first.StudyTime == first.SeriesTime  # the new study is made now
    assert len(first.TimezoneOffsetFromUTC) == 5  # the local time they are in, which holds for the study's too
    assert len({ds.StudyInstanceUID for ds in files}) == 1 and first.SeriesDescription == "SR x2 2mm (synthetic)"
    if shutil.which("dciodvfy"):  # the DICOMDIR warnings of the probe's series are gone
        check = subprocess.run(["dciodvfy", str(sorted(out.glob("*.dcm"))[0])], capture_output=True, text=True)
        report = check.stdout + check.stderr
        for keyword in ("PatientID", "StudyDate", "StudyTime"):
            assert f"</{keyword}(" not in report, report


def test_xray2ct_patient_options_name_the_patient_of_every_series_it_writes(tmp_path):
    source = _png(tmp_path / "chest.png")
    out = tmp_path / "ct"
    done = _xray(source, out, "--output-format", "dicom", "--save-stages", "--patient-id", "RES-0008",
                 "--patient-name", "Müller^Anna")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "is filed under patient ID 'RES-0008', name 'Müller^Anna', in a new study of its own (a PNG image holds " \
        "no study)" in done.stderr
    final, stage = _first(out), _first(tmp_path / "ct_stage1")
    for ds in (final, stage):
        assert ds.PatientID == "RES-0008" and str(ds.PatientName) == "Müller^Anna" and ds.StudyDate == ds.SeriesDate


def test_patient_options_are_refused_where_they_do_not_belong(tmp_path):
    dicom = _series(tmp_path / "thick")
    nifti = _nifti(tmp_path / "ct.nii.gz")
    before = _files(tmp_path)
    # a DICOM input: its own patient; another named here would mis-file the series
    done = _sr(dicom, tmp_path / "thin", "--patient-id", "OTHER")
    assert done.returncode == 2, done.stderr
    assert f"and {dicom} is DICOM: the series is written in the input's own patient and study" in done.stderr
    # no DICOM output: a volume file holds no patient
    done = _sr(nifti, tmp_path / "thin.nii.gz", "--patient-id", "RES-1")
    assert done.returncode == 2, done.stderr
    assert "name the patient of a DICOM series, and this run writes" in done.stderr
    assert "give --output-format dicom" in done.stderr
    # a name without an ID is filed under an unknown patient all the same
    done = _xray(_png(tmp_path / "x" / "chest.png"), tmp_path / "ct", "--output-format", "dicom",
                 "--patient-name", "Doe^Jane")  # fmt: skip
    assert done.returncode == 2 and "--patient-name needs --patient-id" in done.stderr, done.stderr
    # values DICOM cannot hold, refused when the command line is parsed
    for option, value, why in (("--patient-id", "A\\B", "holds a backslash"),
                               ("--patient-id", "X" * 65, "has 65 characters, and DICOM holds at most 64"),
                               ("--patient-id", "   ", "is empty"),
                               ("--patient-name", "Doe^Jane\x07", "holds the control character '\\x07'"),
                               ("--patient-name", "a^b^c^d^e^f", "has 6 parts separated by ^")):  # fmt: skip
        done = _sr(nifti, tmp_path / "series", "--output-format", "dicom", "--patient-id", "RES-1", option, value)
        assert done.returncode == 2, done.stderr
        assert f"argument {option}: {why}" in done.stderr, done.stderr
    assert _files(tmp_path) == sorted([*before, "x", "x/chest.png"])


# -- 3. batches: every input checked before any work -----------------------------------------------------------------
def test_a_batch_of_series_and_ct_files_is_refused_whole_naming_the_files(tmp_path):
    """A folder of a DICOM series and two NIfTI files: nothing is done (not the series either), and the error names
    the files; --patient-id does not pass them, since the series has a patient of its own."""
    folder = tmp_path / "in"
    _series(folder / "chest")
    _nifti(folder / "a.nii.gz")
    _nifti(folder / "b.nii.gz", 1)
    out = tmp_path / "out"
    done = _sr(folder, out, "--output-format", "dicom")
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: 2 of the 3 volumes of this batch are not DICOM: {folder / 'a.nii.gz'} (NIfTI "
                            f"file), {folder / 'b.nii.gz'} (NIfTI file). They hold no patient or study"), error
    assert "Nothing was done" in error and "run them as a batch of their own with --patient-id ID" in error
    assert not out.exists()
    done = _sr(folder, out, "--output-format", "dicom", "--patient-id", "RES-1")
    assert done.returncode == 2 and "1 of the 3 volumes of this batch are DICOM" in done.stderr, done.stderr
    assert not out.exists()
    assert _sr(folder, out).returncode == 0  # NIfTI files (auto): a batch writes .nii.gz for every input


def test_a_batch_of_png_radiographs_needs_their_patient_for_dicom_series(tmp_path):
    folder = tmp_path / "in"
    _png(folder / "a.png")
    _png(folder / "b.png", 1)
    out = tmp_path / "out"
    done = _xray(folder, out, "--output-format", "dicom")
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: 2 of the 2 radiographs of this batch are not DICOM: "), error
    assert f"{folder / 'a.png'} (PNG image)" in error and error.endswith(f"if they are one patient's: {ADVICE}")
    assert not out.exists()
    done = _xray(folder, out, "--output-format", "dicom", "--patient-id", "RES-9")
    assert done.returncode == 0, done.stderr
    assert ("warning: all 2 DICOM series of this batch are filed under the one patient ID 'RES-9', no name, each in a "
            "new study of its own") in done.stderr
    a, b = _first(out / "a"), _first(out / "b")
    assert a.PatientID == b.PatientID == "RES-9" and a.StudyInstanceUID != b.StudyInstanceUID


# -- 4. --series-number taken: said before the work ------------------------------------------------------------------
def test_a_series_number_taken_in_the_study_is_warned_of_before_the_work(tmp_path):
    source = _series(tmp_path / "thick", number=3)
    done = _sr(source, tmp_path / "thin", "--series-number", "3")
    assert done.returncode == 0, done.stderr
    early = done.stderr.index(f"warning: series number 3 is taken by another series of the study of {source} known "
                              f"here (in {source}); it will be written as asked (--series-number)")  # fmt: skip
    assert early < done.stderr.index("random weights") < done.stderr.index("wrote 16 DICOM slices")
    assert _first(tmp_path / "thin").SeriesNumber == 3  # as asked
    # a series of the study beside OUTPUT (an earlier run's result) has the number
    assert _sr(source, tmp_path / "thin7", "--series-number", "7").returncode == 0
    done = _sr(source, tmp_path / "again", "--series-number", "7")
    assert done.returncode == 0, done.stderr
    assert f"known here (in a folder beside {tmp_path / 'again'}); it will be written as asked" in done.stderr
    # a number no series of the study has: no warning
    done = _sr(source, tmp_path / "thin9", "--series-number", "9")
    assert done.returncode == 0 and "is taken" not in done.stderr, done.stderr


def test_a_batch_giving_one_study_the_number_twice_is_warned_before_it_fails(tmp_path):
    """Two series of one study in a batch both get --series-number 8: said before the first is read. A run that fails
    later, before anything is written, has said it too."""
    folder = tmp_path / "in"
    _series(folder / "a", number=2)
    _series(folder / "b", 1, number=4, uid="1.2.826.0.1.3680043.8.498.11")
    out = tmp_path / "out"
    done = _sr(folder, out, "--output-format", "dicom", "--series-number", "8")
    assert done.returncode == 0, done.stderr
    assert (f"series number 8 is taken by another series of the study of {folder / 'b'} known here ({out / 'a'}, "
            "written before it in this run)") in done.stderr
    assert done.stderr.index("series number 8 is taken") < done.stderr.index("random weights")
    assert _first(out / "a").SeriesNumber == _first(out / "b").SeriesNumber == 8

    # a run that stops before any series is written (here: over its memory budget) has said it all the same
    done = _sr(folder / "a", tmp_path / "thin", "--series-number", "2", "--memory-limit", "1KiB")
    assert done.returncode != 0 and not (tmp_path / "thin").exists(), done.stderr
    assert "warning: series number 2 is taken by another series of the study of" in done.stderr, done.stderr
