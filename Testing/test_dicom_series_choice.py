"""Which series of a DICOM folder `sr` reads: the CT series of a PET/CT export (the PET passed over, never run with
--allow-non-ct), a clear refusal for a folder holding no CT series or only a scout, and several series named as a
user knows them (series number, description, modality), not by a UID tail."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from conftest import write_dicom_series

from DiffusionCore.errors import InputError
from DiffusionCore.volume import read_volume

PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"


def _relabel(files, **tags) -> None:
    """Set (or, with None, remove) header fields of each of ``files``."""
    for f in files:
        ds = pydicom.dcmread(f)
        for key, value in tags.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        if "SOPClassUID" in tags:
            ds.file_meta.MediaStorageSOPClassUID = tags["SOPClassUID"]
        ds.save_as(f)


def _pet_series(folder: Path, make_phantom, n: int = 10) -> list:
    """A PET series (Modality PT, SUV-like values) of more files than the CT beside it: the largest series."""
    pet = make_phantom(shape=(n, 16, 16), spacing=(3.2, 3.2, 3.0), seed=3)
    files = write_dicom_series(folder, pet.with_array(pet.array * 0 + 5), series_uid="1.2.826.0.1.3680043.8.498.55",
                               intercept=0.0, prefix="PT")  # fmt: skip
    _relabel(files, Modality="PT", SOPClassUID=PET_STORAGE, SeriesNumber=5, SeriesDescription="PET AC")
    return files


def _sr(folder: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "sr", str(folder), str(out), "--factor", "2",
                           "--tiny-test-model", "--device", "cpu"], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=Path(__file__).resolve().parents[1], timeout=300)  # fmt: skip


def test_sr_on_a_pet_ct_folder_takes_the_ct_series_and_refuses_a_pet_alone(tmp_path, make_phantom):
    """A PET/CT export holds the CT series and a PET series of more files: `sr` takes the CT, naming the PET it
    passed over; a folder of the PET alone is refused as holding no CT series, without suggesting --allow-non-ct
    (which would super-resolve the PET)."""
    folder = tmp_path / "petct"
    ct = write_dicom_series(folder, make_phantom(shape=(6, 32, 32), spacing=(0.8, 0.8, 4.0)), prefix="IM")
    _relabel(ct, SeriesNumber=2, SeriesDescription="CT 4mm")
    _pet_series(folder, make_phantom)
    out = tmp_path / "thin.nii.gz"
    done = _sr(folder, out)
    assert done.returncode == 0, done.stderr
    assert read_volume(out).shape == (12, 32, 32)  # the CT, two slices for each of its six
    assert 'passed over the series that are not CT: series 5 "PET AC" (PT, 10 files)' in done.stderr
    assert "allow-non-ct" not in done.stderr and "does not look like CT" not in done.stderr

    pet_only = tmp_path / "pet"
    _pet_series(pet_only, make_phantom)
    done = _sr(pet_only, tmp_path / "pet_sr.nii.gz")
    assert done.returncode == 2, done.stderr
    assert f'{pet_only} holds no CT series, only PT: series 5 "PET AC" (PT, 10 files)' in done.stderr
    assert "allow-non-ct" not in done.stderr


def test_sr_on_a_folder_holding_only_a_localizer_says_so(tmp_path, make_phantom):
    """A folder holding only the topogram: `sr` says that, in the reader's words, not "no CT volumes found ...
    expected NIfTI" after a warning."""
    files = write_dicom_series(tmp_path / "scout", make_phantom(shape=(2, 32, 32)))
    _relabel(files[1:], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    files[0].unlink()
    done = _sr(tmp_path / "scout", tmp_path / "out.nii.gz")
    assert done.returncode == 2, done.stderr
    assert (f"the DICOM series in {tmp_path / 'scout'} holds only localizer images (topograms or scouts), "
            "no CT slices") in done.stderr  # fmt: skip
    assert "expected NIfTI" not in done.stderr and "skipped" not in done.stderr


def test_several_series_are_named_by_number_description_and_modality(tmp_path, make_phantom, diffusioncore_log):
    """The warning names each series by its number, description and modality (the UID tail only where the files
    have neither number nor description), and counts "1 file"; the run's notes say the same."""
    folder = tmp_path / "mixed"
    big = write_dicom_series(folder, make_phantom(shape=(6, 16, 16)), series_uid="1.2.826.0.1.3680043.8.498.77",
                             prefix="ct")  # fmt: skip
    _relabel(big, SeriesNumber=2, SeriesDescription="CT 5mm")
    one = write_dicom_series(folder, make_phantom(shape=(1, 16, 16), seed=1),
                             series_uid="1.2.826.0.1.3680043.8.498.480426021503", prefix="one")  # fmt: skip
    _relabel(one, SeriesNumber=None, SeriesDescription=None)
    vol = read_volume(folder)
    assert vol.shape == (6, 16, 16)
    said = [r.getMessage() for r in diffusioncore_log if r.levelno == logging.WARNING]
    expected = (f'{folder} holds 2 DICOM series; using the largest, series 2 "CT 5mm" (CT, 6 files) (others: '
                "series ...480426021503 (CT, 1 file))")  # fmt: skip
    assert any(expected in m for m in said), said
    assert expected in vol.metadata["note"]

    tie = tmp_path / "tie"
    a = write_dicom_series(tie, make_phantom(shape=(4, 16, 16)), series_uid="1.2.826.0.1.3680043.8.498.81", prefix="a")
    _relabel(a, SeriesNumber=3, SeriesDescription="soft tissue")
    b = write_dicom_series(tie, make_phantom(shape=(4, 16, 16), seed=2), series_uid="1.2.826.0.1.3680043.8.498.82",
                           prefix="b")  # fmt: skip
    _relabel(b, SeriesNumber=4, SeriesDescription="lung")
    with pytest.raises(InputError, match="the largest ones are the same size") as refused:
        read_volume(tie)
    assert 'series 3 "soft tissue" (CT, 4 files)' in str(refused.value)
    assert 'series 4 "lung" (CT, 4 files)' in str(refused.value)


def test_a_study_folder_is_read_as_its_acquired_series_not_the_synthetic_one_exported_into_it(
    tmp_path, make_phantom, diffusioncore_log
):
    """Probe 16: a study retrieved after an SR export holds the source series (12 files) and the SR series (24): the
    largest, the synthetic one, was read and super-resolved again. The acquired series is read, the others named; a
    scanner's reformat (ImageType DERIVED) comes before a synthetic series; a folder of synthetic series alone still
    reads, with the usual choice of the largest."""
    from DiffusionCore.dicom_out import DicomSource
    from DiffusionCore.dicom_out import write_dicom_series as write_series
    from DiffusionCore.provenance import Provenance

    study = tmp_path / "study"
    thick = make_phantom(shape=(4, 16, 16), spacing=(0.8, 0.8, 4.0))
    uid = "1.2.826.0.1.3680043.8.498.163"  # a study of its own: its derived series is 1003
    source = write_dicom_series(study / "source", thick, prefix="src", study_uid=uid, series_uid=f"{uid}.1")
    _relabel(source, SeriesNumber=3, SeriesDescription="Chest 5mm", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    prov = Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {"factor": 2})
    thin = make_phantom(shape=(8, 16, 16), spacing=(0.8, 0.8, 2.0))
    write_series(thin, study / "sr", prov, source=DicomSource.from_files(source))
    vol = read_volume(study)
    assert vol.shape == (4, 16, 16) and vol.metadata["series_uid"] == str(pydicom.dcmread(source[0]).SeriesInstanceUID)
    said = [r.getMessage() for r in diffusioncore_log if r.levelno == logging.WARNING]
    expected = (f'{study} holds 2 DICOM series; using series 3 "Chest 5mm" (CT, 4 files): a series acquired by a '
                'scanner is read rather than one derived or generated from it (others: series 1003 "SR x2 2mm from Chest '
                '5mm (synthetic)" (CT, 8 files, synthetic))')  # fmt: skip
    assert any(expected in m for m in said), said
    assert expected in vol.metadata["note"]
    # a reformat of another vendor's (DERIVED, more slices) is read before the synthetic series, after the acquired one
    reformat = write_dicom_series(study / "mpr", make_phantom(shape=(6, 16, 16), seed=4), study_uid=uid,
                                  series_uid=f"{uid}.90", prefix="mpr")  # fmt: skip
    _relabel(reformat, SeriesNumber=4, SeriesDescription="MPR", ImageType=["DERIVED", "SECONDARY", "MPR"])
    assert read_volume(study).shape == (4, 16, 16)
    for f in source:
        os.remove(f)
    assert read_volume(study).shape == (6, 16, 16)
    for f in reformat:
        os.remove(f)
    assert read_volume(study).shape == (8, 16, 16)  # the synthetic series alone: read (the sr command warns)
