"""Choosing the series of a DICOM folder that holds several (a study exported from a PACS with a 4 mm and a 2 mm
series of one scan): ``read_volume(series=...)`` and ``sr --input-series`` read the series asked for, by its
SeriesNumber or its SeriesInstanceUID, instead of the largest; a series the folder does not hold, holds twice or that
is not CT is refused naming the folder's series; a file is refused the option; the warning about a folder of several
series says how to choose another."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series
from test_dicom_in import _enhanced_ct
from test_dicom_series_choice import _pet_series, _relabel

from DiffusionCore.dicom_in import choose_ct_series, series_choice
from DiffusionCore.errors import InputError
from DiffusionCore.volume import read_volume, write_volume

THICK_UID = "1.2.826.0.1.3680043.8.498.71"
THIN_UID = "1.2.826.0.1.3680043.8.498.72"
CLI_HOW = "pass --input-series N (its SeriesNumber) or its SeriesInstanceUID"
THICK_LABEL = 'series 2 "CT 4mm" (CT, 6 files)'
THIN_LABEL = 'series 3 "CT 2mm" (CT, 12 files)'


def _study(folder: Path, make_phantom, thick_slices: int = 6):
    """A folder holding a thick series (number 2, ``thick_slices`` slices of 4 mm) and a thin one of the same scan
    (number 3, twice as many slices of 2 mm: the largest); returns the two volumes written."""
    thick = make_phantom(shape=(thick_slices, 32, 32), spacing=(0.8, 0.8, 4.0), seed=1)
    thin = make_phantom(shape=(2 * thick_slices, 32, 32), spacing=(0.8, 0.8, 2.0), seed=2)
    _relabel(write_dicom_series(folder, thick, series_uid=THICK_UID, prefix="thick"), SeriesNumber=2,
             SeriesDescription="CT 4mm")  # fmt: skip
    _relabel(write_dicom_series(folder, thin, series_uid=THIN_UID, prefix="thin"), SeriesNumber=3,
             SeriesDescription="CT 2mm")  # fmt: skip
    return thick, thin


def _warnings(records) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


def test_read_volume_reads_the_series_asked_for_by_number_or_uid(tmp_path, make_phantom, diffusioncore_log):
    """The thin series is the largest and is read by default (the warning says how to choose another, in the words
    of the caller when it gives them); asked for by its number (int or text), its UID or the UID's tail, the thick
    one is read, its UID recorded, and the note names the others."""
    folder = tmp_path / "study"
    thick, thin = _study(folder, make_phantom)
    default = read_volume(folder)
    assert default.shape == (12, 32, 32) and default.metadata["series_uid"] == THIN_UID
    expected = (f"{folder} holds 2 DICOM series; using the largest, {THIN_LABEL} (others: {THICK_LABEL}). Put one "
                "series per folder to choose another.")  # fmt: skip
    assert expected in _warnings(diffusioncore_log), _warnings(diffusioncore_log)
    diffusioncore_log.clear()
    read_volume(folder, how_to_choose=CLI_HOW)
    expected = (f"{folder} holds 2 DICOM series; using the largest, {THIN_LABEL} (others: {THICK_LABEL}). Pass "
                "--input-series N (its SeriesNumber) or its SeriesInstanceUID to choose another.")  # fmt: skip
    assert expected in _warnings(diffusioncore_log), _warnings(diffusioncore_log)

    for asked in (2, "2", " 2 ", THICK_UID, "498.71", "...8.498.71"):
        diffusioncore_log.clear()
        vol = read_volume(folder, series=asked)
        assert vol.shape == (6, 32, 32), asked
        assert np.allclose(vol.spacing, (0.8, 0.8, 4.0)) and vol.metadata["series_uid"] == THICK_UID
        assert np.abs(vol.array - np.rint(thick.array)).max() == 0
        assert vol.metadata["note"] == (f"{folder} holds 2 DICOM series; using {THICK_LABEL}, the series chosen "
                                        f"(others: {THIN_LABEL}).")  # fmt: skip
        assert not _warnings(diffusioncore_log), _warnings(diffusioncore_log)  # chosen: nothing to warn about
    vol = read_volume(folder, series=3)
    assert vol.shape == (12, 32, 32) and np.abs(vol.array - np.rint(thin.array)).max() == 0


def test_a_series_not_held_held_twice_or_not_ct_is_refused_naming_the_folders_series(tmp_path, make_phantom):
    folder = tmp_path / "study"
    _study(folder, make_phantom)
    with pytest.raises(InputError) as refused:
        read_volume(folder, series=7)
    assert str(refused.value) == (f"{folder} holds no series number 7; it holds 2 series: {THICK_LABEL}; {THIN_LABEL}. "
                                  "Choose one of them by its SeriesNumber or its SeriesInstanceUID.")  # fmt: skip
    with pytest.raises(InputError) as refused:
        read_volume(folder, series="1.2.3.4", how_to_choose=CLI_HOW)
    assert str(refused.value) == (
        f"{folder} holds no series with SeriesInstanceUID 1.2.3.4; it holds 2 series: {THICK_LABEL}; {THIN_LABEL}. "
        "Pass --input-series N (its SeriesNumber) or its SeriesInstanceUID to choose one of them."
    )
    with pytest.raises(InputError, match="'abc' names no DICOM series: give its SeriesNumber"):
        read_volume(folder, series="abc")
    with pytest.raises(InputError, match="names no DICOM series"):
        series_choice(True)

    # two series numbered 2 (a re-used number): refused naming both with their UIDs; the UID chooses
    twice = tmp_path / "twice"
    _study(twice, make_phantom)
    _relabel(sorted(twice.glob("thin*.dcm")), SeriesNumber=2)
    with pytest.raises(InputError) as refused:
        read_volume(twice, series=2)
    message = str(refused.value)
    assert message.startswith(f"{twice} holds 2 series numbered 2: ")
    assert f"{THICK_LABEL}, SeriesInstanceUID {THICK_UID}" in message
    assert f'series 2 "CT 2mm" (CT, 12 files), SeriesInstanceUID {THIN_UID}' in message
    assert message.endswith("There is no telling which one is meant: choose it by its SeriesInstanceUID.")
    assert read_volume(twice, series=THIN_UID).shape == (12, 32, 32)

    # a PET series beside the CT: chosen, it is refused as not CT, naming the CT series; a scout series is CT but
    # holds no slices: refused as the reader refuses a folder of localizers
    _pet_series(folder, make_phantom)
    with pytest.raises(InputError) as refused:
        read_volume(folder, series=5)
    assert str(refused.value) == (f'the series chosen in {folder}, series 5 "PET AC" (PT, 10 files), is not CT but PT. '
                                  f"This tool works on CT only: choose a CT series: {THICK_LABEL}; {THIN_LABEL}.")
    assert read_volume(folder, series=2).shape == (6, 32, 32)
    pet_only = tmp_path / "pet"
    _pet_series(pet_only, make_phantom)
    with pytest.raises(InputError, match="is not CT but PT. This tool works on CT only: the folder holds no CT series"):
        read_volume(pet_only, series="5")
    scout = write_dicom_series(folder, make_phantom(shape=(2, 32, 32)), series_uid="1.2.826.0.1.3680043.8.498.79",
                               prefix="scout")  # fmt: skip
    _relabel(scout, SeriesNumber=1, SeriesDescription="Topogram", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(InputError, match="holds only localizer images"):
        read_volume(folder, series=1)


def test_a_file_or_a_single_series_folder_with_a_series(tmp_path, make_phantom):
    """A volume file has no series to choose: refused. A folder of one series is read when the series matches and
    refused naming its series when it does not. An enhanced CT (one file, as given or in its folder) the same."""
    nifti = tmp_path / "ct.nii.gz"
    write_volume(make_phantom(shape=(6, 16, 16)), nifti)
    with pytest.raises(InputError) as refused:
        read_volume(nifti, series=2)
    assert str(refused.value) == (f"{nifti} is a file, not a DICOM folder: a series (2) is chosen among the series of "
                                  "a DICOM folder. Give the folder that holds the series, or leave the series out.")
    one = tmp_path / "one"
    _relabel(write_dicom_series(one, make_phantom(shape=(6, 16, 16)), series_uid=THICK_UID), SeriesNumber=2,
             SeriesDescription="CT 4mm")  # fmt: skip
    vol = read_volume(one, series=2)
    assert vol.shape == (6, 16, 16) and vol.metadata["series_uid"] == THICK_UID and "note" not in vol.metadata
    with pytest.raises(InputError, match='holds no series number 9; it holds 1 series: series 2 "CT 4mm" '
                                         r"\(CT, 6 files\)\. Choose one of them"):  # fmt: skip
        read_volume(one, series=9)

    enhanced_dir = tmp_path / "enhanced"
    enhanced_dir.mkdir()
    path = _enhanced_ct(enhanced_dir / "enhanced.dcm", make_phantom(shape=(6, 16, 16), spacing=(0.8, 0.8, 3.0)))
    _relabel([path], SeriesNumber=4, SeriesDescription="Enhanced")
    uid = str(pydicom.dcmread(path).SeriesInstanceUID)
    for given in (path, enhanced_dir):
        for asked in (4, uid):
            vol = read_volume(given, series=asked)
            assert vol.shape == (6, 16, 16) and vol.metadata["enhanced_ct"] and vol.metadata["series_uid"] == uid
        with pytest.raises(InputError) as refused:
            read_volume(given, series=2)
        assert str(refused.value) == (f'{given} holds no series number 2; it holds 1 series: series 4 "Enhanced" (CT, '
                                      "1 file). Choose one of them by its SeriesNumber or its SeriesInstanceUID.")


def test_choose_ct_series_says_how_to_choose_in_the_callers_words(tmp_path, make_phantom):
    """The tie refusal says how to choose in the caller's words when it gives them, else as before."""
    folder = tmp_path / "tie"
    a = write_dicom_series(folder, make_phantom(shape=(4, 16, 16)), series_uid="1.2.826.0.1.3680043.8.498.81",
                           prefix="a")  # fmt: skip
    b = write_dicom_series(folder, make_phantom(shape=(4, 16, 16), seed=2), series_uid="1.2.826.0.1.3680043.8.498.82",
                           prefix="b")  # fmt: skip
    series = {"1.2.826.0.1.3680043.8.498.81": [str(f) for f in a], "1.2.826.0.1.3680043.8.498.82": [str(f) for f in b]}
    with pytest.raises(InputError, match=r"is meant\. Put each series in its own folder and choose one\.$"):
        choose_ct_series(folder, series)
    with pytest.raises(InputError, match=r"is meant\. Pass --input-series N \(its SeriesNumber\) or its "
                                         r"SeriesInstanceUID to choose one\.$"):  # fmt: skip
        choose_ct_series(folder, series, how_to_choose=CLI_HOW)
    chosen, note = choose_ct_series(folder, series, wanted="498.82")
    assert chosen.uid == "1.2.826.0.1.3680043.8.498.82" and "the series chosen" in note
    alike = {"1.2.826.0.1.3.11": series["1.2.826.0.1.3680043.8.498.81"], "1.2.826.0.1.4.11": b}
    with pytest.raises(InputError, match=r"holds 2 series whose SeriesInstanceUID ends in 11: .*meant: give more of"):
        choose_ct_series(folder, alike, wanted="...11")  # a tail both UIDs end in
    assert choose_ct_series(folder, alike, wanted="4.11")[0].uid == "1.2.826.0.1.4.11"


def _sr(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "sr", *map(str, args), "--factor", "2",
                           "--tiny-test-model", "--device", "cpu"], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=Path(__file__).resolve().parents[1], timeout=300)  # fmt: skip


def test_sr_input_series_super_resolves_the_series_asked_for(tmp_path, make_phantom):
    """`sr --input-series 2` on a study of a 4 mm and a 2 mm series super-resolves the 4 mm one (6 slices -> 12),
    not the larger 2 mm one it takes by default (12 -> 24, with a warning saying how to choose); a series the folder
    lacks, a file INPUT and a value that is no series are refused (exit 2); in a batch it applies to the DICOM folders,
    and a volume file beside them is read as usual."""
    folder = tmp_path / "study"
    _study(folder, make_phantom)
    out = tmp_path / "thin.nii.gz"
    done = _sr(folder, out, "--input-series", "2")
    assert done.returncode == 0, done.stderr
    vol = read_volume(out)
    assert vol.shape == (12, 32, 32) and np.isclose(vol.spacing[2], 2.0)
    assert "holds 2 DICOM series; using the largest" not in done.stderr

    default = _sr(folder, tmp_path / "default.nii.gz")
    assert default.returncode == 0, default.stderr
    assert read_volume(tmp_path / "default.nii.gz").shape == (24, 32, 32)
    assert (f"(others: {THICK_LABEL}). Pass --input-series N (its SeriesNumber) or its SeriesInstanceUID to choose "
            "another.") in default.stderr  # fmt: skip

    missing = _sr(folder, tmp_path / "none.nii.gz", "--input-series", "7")
    assert missing.returncode == 2, missing.stderr
    assert (f"{folder} holds no series number 7; it holds 2 series: {THICK_LABEL}; {THIN_LABEL}. Pass --input-series "
            "N (its SeriesNumber) or its SeriesInstanceUID to choose one of them.") in missing.stderr  # fmt: skip
    assert not (tmp_path / "none.nii.gz").exists()

    bad = _sr(folder, tmp_path / "bad.nii.gz", "--input-series", "CT 4mm")
    assert bad.returncode == 2 and "argument --input-series: 'CT 4mm' names no DICOM series" in bad.stderr, bad.stderr

    nifti = tmp_path / "volumes" / "ct.nii.gz"
    nifti.parent.mkdir()
    write_volume(make_phantom(shape=(5, 32, 32), spacing=(0.8, 0.8, 4.0)), nifti)
    refused = _sr(nifti, tmp_path / "file.nii.gz", "--input-series", "2")
    assert refused.returncode == 2, refused.stderr
    assert f"{nifti} is a file, not a DICOM folder: a series (2) is chosen among the series of a DICOM folder" in (
        refused.stderr)

    os.replace(folder, nifti.parent / "study")  # a batch: the study folder and the volume file
    batch = _sr(nifti.parent, tmp_path / "batch", "--input-series", THICK_UID)
    assert batch.returncode == 0, batch.stderr
    assert read_volume(tmp_path / "batch" / "study.nii.gz").shape == (12, 32, 32)
    assert read_volume(tmp_path / "batch" / "ct.nii.gz").shape == (10, 32, 32)


def _evaluate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "evaluate", "--factor", "2", "--methods", "cubic",
                           *map(str, args)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def test_evaluate_reference_series_scores_the_series_asked_for(tmp_path, make_phantom):
    """`evaluate --reference-series 2` scores the 4 mm series of a study (its 12 slices, 6 slabs of 2), not the
    larger 2 mm one it takes by default (with a warning saying how to choose, in evaluate's words); the JSON records
    the series scored; a series the folder lacks and a volume file with the option are refused naming the problem."""
    import json

    folder = tmp_path / "study"
    _, thin = _study(folder, make_phantom, thick_slices=12)  # evaluate needs 11 slices or more (the SSIM window)
    done = _evaluate("--reference", folder, "--reference-series", "2", "--json", tmp_path / "thick.json")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "thick.json").read_text())
    assert report["reference_series_uid"] == THICK_UID
    assert report["slices_scored"] == [0, 12], report["slices_scored"]  # the range scored: 12 slices
    assert "holds 2 DICOM series; using the largest" not in done.stderr

    done = _evaluate("--reference", folder, "--json", tmp_path / "default.json")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "default.json").read_text())["reference_series_uid"] == THIN_UID
    assert ("Pass --reference-series N (its SeriesNumber) or its SeriesInstanceUID to choose another."
            in done.stderr), done.stderr  # fmt: skip

    done = _evaluate("--reference", folder, "--reference-series", "7")
    assert done.returncode != 0 and "holds no series number 7" in done.stderr, done.stderr
    assert 'series 2 "CT 4mm"' in done.stderr and "Pass --reference-series N" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    nifti = tmp_path / "ct.nii.gz"
    write_volume(thin, nifti)
    done = _evaluate("--reference", nifti, "--reference-series", "2")
    assert done.returncode != 0 and "Traceback" not in done.stderr and "ct.nii.gz" in done.stderr, done.stderr
