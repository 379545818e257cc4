"""Probe 31: DICOM in and out, from a PACS administrator's point of view.

- D1: ``--overwrite`` replaced any folder of ``NNNNN.dcm`` files, another patient's series too: only a series whose
  every header says this software wrote it is replaced; anything else is refused, naming what the folder holds;
- D2: every run gave its series the same SeriesNumber (input + 1000): ``--series-number`` (and the Slicer CLIs'
  ``--seriesNumber``), numbers of the study's series in the folders beside the output avoided, and (M4) never above
  DICOM's IS maximum;
- D3: a series mixing patients, studies or frames of reference was read as one volume: refused, naming the attribute;
- D4: the output's header came from a localizer left out of the volume when it sorted first;
- M1: a folder holding an acquired series and an earlier SR series warned "itself a synthetic image" for the series
  that was not read;
- M2: ImageComments carried the input's absolute path into the PACS: only its name now;
- M3: the de-identification flags of the input were dropped;
- M6: an output folder the system refuses gave "internal error" after the whole run;
- M7: a DICOMDIR given to ``sr`` was "corrupt", and a folder holding one was done twice.

Small series (4 slices of 16x16 or 32x32) written by SimpleITK (conftest) and edited with pydicom; the writer is
called directly, ``sr`` runs as a subprocess with the tiny test model where the command line itself is in question.
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
from conftest import write_dicom_series, write_dicomdir

from DiffusionCore import dicom_out
from DiffusionCore.dicom_out import DicomSource, check_dicom_output, derived_series_number
from DiffusionCore.dicom_out import write_dicom_series as write_series
from DiffusionCore.errors import ConfigError, InputError, OutputError, OutputExistsError
from DiffusionCore.provenance import Provenance, read_provenance, synthetic_input_warning
from DiffusionCore.volume import read_volume

ROOT = Path(__file__).resolve().parents[1]
STUDY = "1.2.826.0.1.3680043.8.498.3101"
#: DICOM's largest SeriesNumber (IS: a signed 32-bit integer).
SERIES_NUMBER_MAX = 2**31 - 1


def _provenance(source: str = "") -> Provenance:
    return Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {"factor": 2}, input=source)


def _edit(files, **values) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        for key, value in values.items():
            setattr(ds, key, value)
        ds.save_as(f)


def _series(folder: Path, make_phantom, *, number: int = 3, study: str = STUDY, series: str = f"{STUDY}.1",
            prefix: str = "slice") -> list[Path]:  # fmt: skip
    files = write_dicom_series(folder, make_phantom(shape=(4, 16, 16), spacing=(0.8, 0.8, 4.0)), study_uid=study,
                               series_uid=series, prefix=prefix)  # fmt: skip
    _edit(files, PatientID="P-31", PatientName="Doe^Jane", SeriesNumber=number, SeriesDescription="Chest 4mm",
          FrameOfReferenceUID=f"{study}.9", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])  # fmt: skip
    return files


def _first(folder: Path) -> pydicom.Dataset:
    return pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)


def _sr(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "sr", *map(str, argv), "--factor", "2", "--no-adapt",
                           "--tiny-test-model", "--device", "cpu", "--threads", "1", "--progress", "none"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, cwd=ROOT,
                          timeout=300)  # fmt: skip


# -- D1: --overwrite replaces only a series this software wrote ---------------------------------------------------
def test_overwrite_never_replaces_another_patients_series_named_like_ours(tmp_path, make_phantom):
    """Probe 31 D1: 24 slices of another patient copied in as 00001.dcm ... were deleted by --overwrite."""
    foreign = tmp_path / "foreign"
    for n, f in enumerate(_series(tmp_path / "other", make_phantom, number=7), start=1):
        foreign.mkdir(exist_ok=True)
        shutil.copy(f, foreign / f"{n:05d}.dcm")
    before = {f.name: f.read_bytes() for f in foreign.iterdir()}
    for overwrite in (False, True):
        with pytest.raises(OutputError) as refused:
            check_dicom_output(foreign, overwrite=overwrite)
        assert not isinstance(refused.value, OutputExistsError)  # not "already holds a DICOM series": not ours
        text = str(refused.value)
        assert "4 DICOM files of patient P-31 CT series 7" in text and "not written by CTDiffusion" in text, text
    with pytest.raises(OutputError):
        write_series(make_phantom(shape=(4, 16, 16)), foreign, _provenance(), overwrite=True)
    assert {f.name: f.read_bytes() for f in foreign.iterdir()} == before

    # a series written here: refused without --overwrite (named as ours), replaced with it
    ours = write_series(make_phantom(shape=(4, 16, 16)), tmp_path / "ours", _provenance())
    with pytest.raises(OutputExistsError, match="already holds a DICOM series; pass --overwrite"):
        check_dicom_output(ours)
    write_series(make_phantom(shape=(4, 16, 16)), ours, _provenance(), overwrite=True)
    # one of its files replaced by another's (its name kept): the folder is no longer ours alone
    shutil.copy(sorted((tmp_path / "other").iterdir())[0], ours / "00002.dcm")
    with pytest.raises(OutputError, match="1 DICOM file of patient P-31") as mixed:
        check_dicom_output(ours, overwrite=True)
    assert "3 slices written by CTDiffusion" in str(mixed.value)


# -- D2: series numbers -------------------------------------------------------------------------------------------
def test_series_number_given_or_free_in_the_study_beside_the_output_and_within_the_is_range(
    tmp_path, make_phantom, monkeypatch
):
    source = DicomSource.from_files(_series(tmp_path / "src", make_phantom))
    vol = make_phantom(shape=(4, 16, 16))
    out = tmp_path / "results"
    out.mkdir()
    assert _first(write_series(vol, out / "asked", _provenance(), source=source, series_number=77)).SeriesNumber == 77
    for bad in (0, -1, SERIES_NUMBER_MAX + 1):
        with pytest.raises(ConfigError, match="1 to 2147483647"):
            write_series(vol, out / f"bad{bad}", _provenance(), source=source, series_number=bad)
    # separate runs (separate processes: nothing given before in this one) into sibling folders of one study
    numbers = []
    for name in ("run1", "run2", "run3"):
        monkeypatch.setattr(dicom_out, "_NUMBERS_GIVEN", {})
        numbers.append(int(_first(write_series(vol, out / name, _provenance(), source=source)).SeriesNumber))
    assert numbers == [1003, 1004, 1005]  # before: 1003 three times
    monkeypatch.setattr(dicom_out, "_NUMBERS_GIVEN", {})  # the same run again, replacing its own series: its number
    assert _first(write_series(vol, out / "run2", _provenance(), source=source, overwrite=True)).SeriesNumber == 1004
    # M4: an input numbered near the IS maximum (2147483000 gave 2147484000)
    big = DicomSource.from_files(_series(tmp_path / "big", make_phantom, number=2147483000, study=f"{STUDY}.2",
                                         series=f"{STUDY}.2.1"))  # fmt: skip
    assert 1 <= derived_series_number(big, f"{STUDY}.2") <= SERIES_NUMBER_MAX


def test_series_number_options_of_sr_and_xray2ct(tmp_path, make_phantom):
    series = tmp_path / "thick"
    _series(series, make_phantom)
    done = _sr(series, tmp_path / "thin", "--series-number", "4242")
    assert done.returncode == 0, done.stderr
    assert _first(tmp_path / "thin").SeriesNumber == 4242
    refused = _sr(series, tmp_path / "none", "--series-number", "2147483648")
    assert refused.returncode == 2 and "from 1 to 2147483647" in refused.stderr and not (tmp_path / "none").exists()
    from DiffusionCore.cli.main import build_parser

    xray = build_parser().parse_args(["xray2ct", "in.dcm", "out", "--series-number", "9"])
    assert xray.series_number == 9
    assert build_parser().parse_args(["xray2ct", "in.dcm", "out"]).series_number is None  # derived


# -- D3: one series, one patient, one study, one frame of reference -----------------------------------------------
@pytest.mark.parametrize(("keyword", "value"), [("PatientID", "OTHER"), ("StudyInstanceUID", "1.2.3.4.5.6"),
                                                ("FrameOfReferenceUID", "1.2.3.4.5.7")])  # fmt: skip
def test_a_series_mixing_patients_studies_or_frames_of_reference_is_refused(tmp_path, make_phantom, keyword, value):
    files = _series(tmp_path / "mixed", make_phantom)
    _edit(files[2:], **{keyword: value})
    with pytest.raises(InputError) as refused:
        read_volume(tmp_path / "mixed")
    text = str(refused.value)
    assert f"differ in {keyword}" in text and f"{value} in 2 files" in text and "in a folder of their own" in text, text
    with pytest.raises(InputError, match=f"differ in {keyword}"):
        DicomSource.from_files(files)


# -- D4: the header of a slice that was read -----------------------------------------------------------------------
def test_the_header_comes_from_a_slice_not_from_a_localizer_left_out(tmp_path, make_phantom):
    folder = tmp_path / "locfirst"
    files = _series(folder, make_phantom, prefix="B")
    _edit(files, KVP="120", WindowCenter="-600", WindowWidth="1600")
    scout = pydicom.dcmread(files[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SeriesDescription, scout.KVP, scout.SOPInstanceUID = "Topogram", "100", f"{STUDY}.1.99"
    scout.save_as(folder / "A_loc.dcm")  # sorts first
    assert read_volume(folder).shape[0] == 4  # the localizer left out of the volume
    source = DicomSource.from_path(folder)
    assert source.header.SeriesDescription == "Chest 4mm" and source.header.KVP == 120
    assert f"{STUDY}.1.99" not in {s.sop_instance_uid for s in source.instances}
    written = _first(write_series(make_phantom(shape=(4, 16, 16)), tmp_path / "out", _provenance(), source=source))
    assert written.SeriesDescription == "SR x2 2mm from Chest 4mm (synthetic)" and written.KVP == 120
    assert (written.WindowCenter, written.WindowWidth) == (-600, 1600)  # before: the default 40/400


# -- M1: the series read is judged, not the folder's first file ---------------------------------------------------
def test_an_acquired_series_beside_an_earlier_sr_series_is_not_called_synthetic(tmp_path, make_phantom):
    study = tmp_path / "study"
    acquired = _series(study, make_phantom)
    write_series(make_phantom(shape=(8, 16, 16)), tmp_path / "sr", _provenance(), source=DicomSource.from_files(acquired))
    for f in (tmp_path / "sr").iterdir():  # 00001.dcm ...: they sort before the acquired slice000.dcm
        shutil.move(f, study / f.name)
    volume = read_volume(study)
    assert volume.metadata["series_uid"] == f"{STUDY}.1"
    assert synthetic_input_warning(study, volume.metadata["series_uid"]) == ""
    sr_uid = str(_first(study).SeriesInstanceUID)
    assert "is itself a synthetic image" in synthetic_input_warning(study, sr_uid)


# -- M2, M3: what the written header says of the input --------------------------------------------------------------
def test_the_dicom_output_names_the_input_without_its_path_and_keeps_its_deidentification(tmp_path, make_phantom):
    hospital = tmp_path / "Doe_Jane_MRN123456" / "thick"
    files = _series(hospital, make_phantom)
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113100", "DCM", "Basic Application Confidentiality Profile"
    _edit(files, PatientIdentityRemoved="YES", DeidentificationMethod="Per DICOM PS 3.15 AnnexE",
          DeidentificationMethodCodeSequence=[code])  # fmt: skip
    out = write_series(make_phantom(shape=(4, 16, 16)), tmp_path / "out", _provenance(str(hospital)),
                       source=DicomSource.from_files(files))  # fmt: skip
    ds = _first(out)
    assert "MRN123456" not in ds.ImageComments and "MRN123456" not in ds.DerivationDescription
    assert " from thick by CTDiffusion" in ds.ImageComments
    assert read_provenance(sorted(out.iterdir())[0]).input == "thick"  # read back as written
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod == "Per DICOM PS 3.15 AnnexE"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


# -- M6: a folder the system refuses: an OutputError, said before any work ----------------------------------------
def test_a_series_folder_the_system_refuses_is_an_output_error(tmp_path, make_phantom, monkeypatch):
    def refused(final, suffix=""):
        raise PermissionError(1, "Operation not permitted", str(final))

    monkeypatch.setattr(dicom_out, "partial_folder", refused)  # root-squashed NFS, /sys: os.access says yes
    with pytest.raises(OutputError, match="could not write the DICOM series .*Operation not permitted"):
        write_series(make_phantom(shape=(4, 16, 16)), tmp_path / "out", _provenance())


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0 and Path("/sys/fs").is_dir()),
                    reason="needs root, for whom os.access says /sys/fs is writable")  # fmt: skip
def test_sr_into_a_folder_the_system_refuses_is_refused_before_any_work(tmp_path, make_phantom):
    _series(tmp_path / "thick", make_phantom)
    done = _sr(tmp_path / "thick", "/sys/fs/ctdiffusion-probe31")
    assert done.returncode == 4 and "is not writable" in done.stderr, done.stderr
    assert "super-resolution done" not in done.stderr and "internal error" not in done.stderr


# -- M7: a DICOMDIR -----------------------------------------------------------------------------------------------
def test_a_dicomdir_stands_for_its_folder_and_is_no_input_of_its_own(tmp_path, make_phantom):
    from DiffusionCore.cli.sr import batch_sources

    export = tmp_path / "export"
    _series(export / "PT0" / "SE0", make_phantom)
    write_dicomdir(export)
    assert batch_sources(export / "DICOMDIR")[1] == [export / "PT0" / "SE0"]  # before: "corrupt DICOM file"
    assert batch_sources(export)[1] == [export / "PT0" / "SE0"]  # before: the export folder too (done twice)


# -- M9: InstanceNumber runs the way the input's does -----------------------------------------------------------------
def _direction(folder: Path) -> float:
    """The sign of how InstanceNumber runs along z (LPS: + is superior) in a series folder."""
    pairs = []
    for f in folder.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        pairs.append((float(ds.ImagePositionPatient[2]), int(ds.InstanceNumber)))
    pairs.sort()
    numbers = [n for _, n in pairs]
    assert sorted(numbers) == list(range(1, len(numbers) + 1))  # 1..N, each once
    return float(np.sign(numbers[-1] - numbers[0]))


@pytest.mark.parametrize("head_first", [True, False])
def test_instance_numbers_run_the_way_the_inputs_do(tmp_path, make_phantom, head_first):
    """Probe 31 M9: output instance 1 was always the most inferior slice, whichever end the input numbered first, so
    a viewer sorting by number showed the result flipped against its input."""
    files = _series(tmp_path / "thick", make_phantom)
    by_z = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]), reverse=head_first)
    for n, f in enumerate(by_z, start=1):
        _edit([f], InstanceNumber=n)
    assert _direction(tmp_path / "thick") == (-1.0 if head_first else 1.0)
    done = _sr(tmp_path / "thick", tmp_path / "thin")
    assert done.returncode == 0, done.stderr
    assert _direction(tmp_path / "thin") == _direction(tmp_path / "thick")


# -- M12: invalid values of the input are not copied into the written series ----------------------------------------
def test_an_invalid_value_of_the_input_is_written_in_dicoms_form_or_left_empty(tmp_path, make_phantom):
    """Probe 31 M12: the topogram's PatientAge "59Y " went into the output as it was, which dciodvfy reports as an
    error of the written series."""
    files = _series(tmp_path / "thick", make_phantom)
    _edit(files, PatientAge="59Y ", StudyDate="2020-01-01", PatientSex="F")
    done = _sr(tmp_path / "thick", tmp_path / "thin")
    assert done.returncode == 0, done.stderr
    out = _first(tmp_path / "thin")
    assert out.PatientAge == "059Y" and out.PatientSex == "F" and out.PatientName == "Doe^Jane"
    assert "StudyDate" in out and out.StudyDate == ""  # type 2: present, empty rather than invalid
