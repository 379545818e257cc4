"""Searching a cohort (LIDC-IDRI's layout: patient/study/series/*.dcm) for its CT series: folders of DICOM objects
without an image (structure sets, plans, reports) are skipped with their modality named, the counts said are honest
(candidates before reading, CT volumes after), and series folders reached through symbolic links are found, each
real folder once, a link loop included."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array, write_cohort_with_unreadable_series, write_dicom_series

from DiffusionCore.errors import InputError
from DiffusionCore.inputs import collect_volumes, readable_volumes
from DiffusionCore.volume import Volume, write_volume

pydicom_data = pytest.importorskip("pydicom.data")

#: pydicom's own test files of objects without an image, and their modality.
NON_IMAGE_OBJECTS = {"rtstruct.dcm": "RTSTRUCT", "rtplan.dcm": "RTPLAN", "reportsi.dcm": "SR"}


def _ct_series(folder: Path, uid_tail: int = 1) -> Path:
    """A small CT series (12 slices of 16x16 at 2.5 mm), long enough to train on."""
    vol = Volume(ct_phantom_array((12, 16, 16), seed=uid_tail), (0.8, 0.8, 2.5), (0.0, 0.0, 0.0))
    write_dicom_series(folder, vol, series_uid=f"1.2.826.0.1.3680043.8.498.7{uid_tail}")
    return folder


def _copy_test_file(name: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(pydicom_data.get_testdata_file(name), folder / name))


def _messages(records, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == level]


def _symlink(link: Path, target: Path) -> None:
    try:
        link.symlink_to(target, target_is_directory=True)
    except (OSError, NotImplementedError) as exc:  # Windows without the privilege
        pytest.skip(f"cannot make symbolic links here: {exc}")


def test_folders_of_structure_sets_plans_and_reports_are_skipped_naming_their_modality(tmp_path, diffusioncore_log):
    """SimpleITK reads no header of an object without an image, so these folders used to be listed as CT volumes
    and then refused as "a folder without a readable DICOM series"; their headers are now read with pydicom and
    the folders skipped as the README and docs/reliability.md say (`skipped ...: its DICOM files are ...`)."""
    study = tmp_path / "cohort" / "P" / "S"
    ct = _ct_series(study / "ct")
    for name, modality in NON_IMAGE_OBJECTS.items():
        _copy_test_file(name, study / modality.lower())
    _copy_test_file("rtstruct.dcm", ct)  # a structure set stored beside the slices leaves the series a series

    assert collect_volumes(tmp_path / "cohort") == [ct]
    warned = _messages(diffusioncore_log, logging.WARNING)
    for modality in NON_IMAGE_OBJECTS.values():
        said = f"skipped {study / modality.lower()}: its DICOM files are {modality} objects (no image), not a CT series"
        assert said in warned, warned
    assert len(warned) == len(NON_IMAGE_OBJECTS), warned
    with pytest.raises(InputError, match=r"no CT volumes found in .*rtplan \(.*rtplan holds RTPLAN objects \(no image\)"):
        collect_volumes(study / "rtplan")

    # training reads the CT series alone, with no "passed over ... without a readable DICOM series"
    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig, load_sources

    diffusioncore_log.clear()
    train, _ = load_sources(collect_volumes(tmp_path / "cohort"), ThroughPlaneTrainConfig())
    assert [s.name for s in train] == ["ct"]
    assert not any("passed over" in m for m in _messages(diffusioncore_log, logging.WARNING))


def test_found_counts_candidates_before_reading_and_ct_volumes_after(tmp_path, diffusioncore_log):
    """The search said "found 6 CT volume(s)" of folders not yet read (a structure set, an unreadable series), and
    "found 1 CT volume(s)" of every single input. It now says how many series or files it will read (only when that
    is news), and reading says how many CT volumes it read and how many it passed over."""
    cohort = tmp_path / "cohort"
    written = write_cohort_with_unreadable_series(cohort)  # p1 readable; p2 and p3 refused when read
    _copy_test_file("rtstruct.dcm", cohort / "p1" / "rtstruct")

    paths = collect_volumes(cohort)
    assert paths == written
    said = _messages(diffusioncore_log)
    assert "found 3 DICOM series or volume file(s) to read" in said, said
    assert not any("CT volume" in m for m in said), said  # nothing read yet: no CT volumes counted
    diffusioncore_log.clear()
    assert [p for p, _ in readable_volumes(paths)] == [cohort / "p1" / "ct"]
    said = _messages(diffusioncore_log)
    assert said[-1] == "found 1 CT volume(s); passed over 2 of the 3 found (see the warnings above)", said

    # one volume given: the search says nothing (it is no news); reading counts it
    one = tmp_path / "one.nii.gz"
    write_volume(Volume(ct_phantom_array((12, 16, 16)), (0.8, 0.8, 2.5)), one)
    diffusioncore_log.clear()
    assert collect_volumes(one) == [one] and collect_volumes(cohort / "p1" / "ct") == [cohort / "p1" / "ct"]
    assert not any(m.startswith("found") for m in _messages(diffusioncore_log)), _messages(diffusioncore_log)
    assert [p for p, _ in readable_volumes([one])] == [one]
    assert _messages(diffusioncore_log) == ["found 1 CT volume(s)"]


def test_series_folders_reached_through_symbolic_links_are_found_once_and_a_link_loop_ends(tmp_path, diffusioncore_log):
    """A train/val split made of links to a cohort's series folders: each linked series is found (they were silently
    left out), a real folder reached twice (two links, or a link and the folder itself) is read once, and a link
    back to a folder above ends the search there instead of going round."""
    series = _ct_series(tmp_path / "archive" / "LIDC-0003" / "5-crop", uid_tail=3)
    split = tmp_path / "split" / "train"
    local = _ct_series(split / "P1" / "S" / "ct", uid_tail=1)
    _symlink(split / "P3", series.parent)  # a link to a patient folder
    _symlink(split / "P1" / "S" / "again", local)  # a second way to the same series
    _symlink(split / "P1" / "loop", split)  # a loop back up to the search's top

    assert collect_volumes(tmp_path / "split") == [split / "P1" / "S" / "again", split / "P3" / "5-crop"]
    said = _messages(diffusioncore_log)
    real = os.path.realpath(split)
    assert f"skipped {split / 'P1' / 'loop'}: the same folder ({real}) as {split}, searched already" in said, said
    assert any(m.startswith(f"skipped {local}: the same folder") for m in said), said
    assert [p.name for p, _ in readable_volumes(collect_volumes(split / "P3"))] == ["5-crop"]

    # a folder given twice, or given and found below another, is searched once and said nothing of
    diffusioncore_log.clear()
    assert collect_volumes([split / "P3", split / "P3"]) == [split / "P3" / "5-crop"]
    assert not any("searched already" in m for m in _messages(diffusioncore_log))
    assert np.array_equal(
        next(readable_volumes([split / "P3" / "5-crop"]))[1].array, next(readable_volumes([series]))[1].array
    )
