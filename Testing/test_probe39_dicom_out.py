"""Probe 39 (a PACS administrator's check of the DICOM series ``sr`` and ``xray2ct`` write): dciodvfy, dcmdump and a
PACS import of real series.

1. Laterality was written empty on every file (dciodvfy: "should be absent (not empty) if an unpaired body part"): it
   is absent, or the input CT's own side (R, L) for a super-resolved series of it.
2. DerivationDescription (an ST: 1024 characters) put the environment before the settings and was cut mid-JSON: the
   settings' tail (``torch_threads``, ``weights``), which a bit-identical rerun needs, was lost. The settings come
   whole before the environment, which is shortened first, with words saying what was left out.
3. The input's LongitudinalTemporalInformationModified (MODIFIED: its dates were shifted) was not copied, though the
   code sequence saying so was.
4. An input without TimezoneOffsetFromUTC got this computer's offset, which by DICOM's rules also holds for the
   StudyDate and StudyTime copied from the input, and reinterpreted them.
5. ``00001.dcm`` held InstanceNumber 256 when the input's numbers run against the slices' order: a file is named by
   its InstanceNumber.
6. Every UID was under pydicom's root: ``$DIFFUSIONCORE_UID_ROOT`` gives a site's own.
7. An X-ray to CT result of a shoulder radiograph said "a chest-like volume, not a CT of that region" in the log only:
   such notes (:attr:`Provenance.notes`) end up in the ImageComments a PACS user sees.

Real series through :func:`~DiffusionCore.dicom_out.write_dicom_series`, read back with pydicom; dciodvfy checks one
file where it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, UID

from DiffusionCore.dicom_out import UID_ROOT_ENV, DicomSource, check_dicom_output, uid_root
from DiffusionCore.dicom_out import write_dicom_series as write_series
from DiffusionCore.errors import ConfigError
from DiffusionCore.provenance import (
    Provenance,
    _from_fields,
    header_fields,
    read_header_fields,
    read_provenance,
    result_caveats,
)
from DiffusionCore.xray.radiograph import body_part_note

#: The settings and environment of a real ``sr --report`` run on a DICOM series (probe 39's run1_report.json); the
#: environment's ``modified`` as a checkout with edited files records it.
RUN1_SETTINGS = {
    "factor": 4, "axis": "z", "input_spacing_xyz_mm": [0.841796875, 0.841796875, 5.0],
    "output_spacing_xyz_mm": [0.841796875, 0.841796875, 1.25], "output_size_xyz": [512, 512, 256],
    "estimate": "mean", "steps": 0, "requested_steps": None, "guidance": None, "seed": 0, "device": "cpu",
    "patch_size": None, "overlap": None, "num_samples": 1, "tile_batch": None, "data_consistency": True,
    "weights": "sr-default", "torch_threads": 1, "adapt": {"seconds": 0.0, "steps": 400, "steps_run": 400},
}  # fmt: skip
RUN1_ENVIRONMENT = {
    "commit": "d2865664d26b148b7e67817e0f988d53ad45ad23",
    "modified": "7 files: DiffusionCore/cli/evaluate.py, DiffusionCore/cli/sr.py, DiffusionCore/cli/xray.py and 4 more",
    "torch": "2.13.0+cpu", "python": "3.11.7", "platform": "Linux-6.18.44-fc-v1300-x86_64-with-glibc2.36",
}  # fmt: skip
INPUT_UID = "1.3.6.1.4.1.14519.5.2.1.6655.2359.257508444832901632590301540805"


def _run1(**changes) -> Provenance:
    fields = dict(task="sr", title="SR x4 (synthetic)", weights="sr-default", weights_sha256="a96f8b0c" * 8,
                  settings=dict(RUN1_SETTINGS), input="/data/chest-dx/dicom", input_uid=INPUT_UID,
                  input_sha256="22d168b1" * 8, environment=dict(RUN1_ENVIRONMENT), input_slice_thickness_mm=5.0,
                  date="2026-12-07T14:40:21+00:00")  # fmt: skip
    return Provenance(**{**fields, **changes})


def _source(tmp_path: Path, make_phantom, name: str = "thick", **attributes) -> tuple[DicomSource, list[Path]]:
    """A CT series of 6 slices (SimpleITK), each file given ``attributes`` (a value None: removed)."""
    files = write_dicom_series(tmp_path / name, make_phantom(shape=(6, 16, 16), spacing=(0.8, 0.8, 4.0)))
    for f in files:
        ds = pydicom.dcmread(f)
        for keyword, value in attributes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value(ds) if callable(value) else value)
        ds.save_as(f)
    return DicomSource.from_files(files), files


def _written(folder: Path, vol, prov: Provenance, source: DicomSource | None = None, **kw) -> list[Dataset]:
    write_series(vol, folder, prov, source=source, **kw)
    return [pydicom.dcmread(f) for f in sorted(folder.iterdir())]


def _sr_prov(**changes) -> Provenance:
    return Provenance(**{**dict(task="sr", title="SR x2 (synthetic)", weights="w", weights_sha256="0" * 64,
                                settings={"factor": 2}, date="2026-12-06T16:38:11+00:00", environment={}),
                         **changes})  # fmt: skip


def _dciodvfy(path: Path) -> str:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


# -- 1. Laterality: absent for an unpaired body part, not empty ----------------------------------------------------
def test_laterality_is_absent_for_an_unpaired_body_part_and_the_input_cts_side_else_unknown(tmp_path, make_phantom):
    """Absent where the body part is known unpaired (dciodvfy warned of an empty one there); the input CT's own R or L;
    empty (unknown: type 2C) where no body part is named, since dciodvfy reports an absent one as an error there."""
    vol = make_phantom(shape=(4, 16, 16))

    def laterality(name: str, source: DicomSource | None, prov: Provenance | None = None) -> set[str | None]:
        files = _written(tmp_path / f"out_{name}", vol, prov or _sr_prov(), source, keep_frame_of_reference=False)
        return {ds.Laterality if "Laterality" in ds else None for ds in files}

    chest, _ = _source(tmp_path, make_phantom, "chest", BodyPartExamined="CHEST")
    chest_empty, _ = _source(tmp_path, make_phantom, "chest_empty", BodyPartExamined="CHEST", Laterality="")
    assert laterality("chest", chest) == {None}  # before: an empty Laterality on every file
    assert laterality("chest_empty", chest_empty) == {None}
    knee_r, _ = _source(tmp_path, make_phantom, "knee_r", BodyPartExamined="KNEE", Laterality="R")
    assert laterality("knee_r", knee_r) == {"R"}  # the thin series is of the same knee
    knee, _ = _source(tmp_path, make_phantom, "knee", BodyPartExamined="KNEE")
    unnamed, _ = _source(tmp_path, make_phantom, "unnamed")
    assert laterality("knee", knee) == laterality("unnamed", unnamed) == laterality("none", None) == {""}
    # a CT made from a radiograph of the right shoulder is a chest-like volume: no side of it is claimed
    xray = _sr_prov(task="xray2ct", title="CT from radiograph (synthetic)")
    assert laterality("xray", knee_r, xray) == {""}


def test_dciodvfy_has_no_laterality_warning_for_a_chest_series(tmp_path, make_phantom):
    vol = make_phantom(shape=(4, 16, 16))
    chest, _ = _source(tmp_path, make_phantom, "chest", BodyPartExamined="CHEST")
    write_series(vol, tmp_path / "out", _sr_prov(), source=chest)
    first = sorted((tmp_path / "out").iterdir())[0]
    assert "Laterality" not in pydicom.dcmread(first)
    said = _dciodvfy(first)
    assert "CTImage" in said and "Laterality" not in said, said
    # no body part named: Laterality unknown, not absent (dciodvfy: "Missing attribute Type 2C ... <Laterality>")
    write_series(vol, tmp_path / "unknown", _sr_prov())
    said = _dciodvfy(sorted((tmp_path / "unknown").iterdir())[0])
    assert not [line for line in said.splitlines() if line.startswith("Error") and "Laterality" in line], said


# -- 2. DerivationDescription: what a rerun needs, whole ----------------------------------------------------------
def _settings_of(text: str) -> dict:
    found = re.search(r"settings (\{.*?\})(?: \(\d+ more settings left out[^()]*\))?(?:; environment .*)?$", text)
    assert found, text
    return json.loads(found.group(1))


def test_derivation_description_keeps_every_setting_and_shortens_the_environment_first(tmp_path, make_phantom):
    prov = _run1()
    text = prov.derivation()
    assert len(text) <= 1024
    assert text.startswith(f"SR x4 (synthetic) by {prov.software} (sr); weights sr-default sha256 {'a96f8b0c' * 8}; ")
    assert f"input UID {INPUT_UID}; input sha256 {'22d168b1' * 8}; input slice thickness 5 mm; settings " in text
    assert _settings_of(text) == RUN1_SETTINGS  # every key (before: cut after "tile_batch", torch_threads lost)
    assert text.index("settings {") < text.index("; environment {")  # the environment last
    assert '"commit":"d2865664d26b148b7e67817e0f988d53ad45ad23"' in text and not text.endswith("...")
    assert text.endswith("(modified's file list left out: too long)") and '"modified":"7 files"' in text

    # an environment that cannot be held at all is left out, said so; the settings stay whole
    huge = _run1(environment={**RUN1_ENVIRONMENT, "gpu": "NVIDIA H100 80GB HBM3 " * 12})
    text = huge.derivation()
    assert len(text) <= 1024 and text.endswith("; environment left out (too long)")
    assert _settings_of(text) == RUN1_SETTINGS

    # settings beyond the limit on their own: whole keys are left out from the end, and how many
    many = _run1(settings={f"key_{i:03d}": "x" * 20 for i in range(60)})
    text = many.derivation()
    assert len(text) <= 1024 and re.search(r"\((\d+) more settings left out: too long\)", text)
    kept = _settings_of(text)
    assert kept and all(many.settings[k] == v for k, v in kept.items())

    # written and read back: the settings and the environment (shortened as written) are the run's
    out = tmp_path / "out"
    source, _ = _source(tmp_path, make_phantom)
    [ds, *_] = _written(out, make_phantom(shape=(4, 16, 16)), prov, source)
    assert ds.DerivationDescription == prov.derivation() and len(ds.DerivationDescription) <= 1024
    record = read_provenance(out)
    assert record.settings == RUN1_SETTINGS and record.input_uid == INPUT_UID
    assert record.environment == {**RUN1_ENVIRONMENT, "modified": "7 files"}

    # a series written before probe 39 (the environment before the settings) still reads back
    head = ds.DerivationDescription.split("settings {")[0]
    ds.DerivationDescription = f'{head}environment {{"torch":"2.1"}}; settings {json.dumps(RUN1_SETTINGS)}'
    ds.save_as(out / "00001.dcm")
    assert read_provenance(out / "00001.dcm").environment == {"torch": "2.1"}
    assert read_provenance(out / "00001.dcm").settings == RUN1_SETTINGS


# -- 3. the de-identification flags, LongitudinalTemporalInformationModified too -----------------------------------
def test_longitudinal_temporal_information_modified_is_copied(tmp_path, make_phantom):
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113107", "DCM"
    code.CodeMeaning = "Retain Longitudinal Temporal Information Modified Dates Option"
    source, _ = _source(tmp_path, make_phantom, PatientIdentityRemoved="YES",
                        DeidentificationMethod="Per DICOM PS 3.15 AnnexE",
                        DeidentificationMethodCodeSequence=lambda ds: [code],
                        LongitudinalTemporalInformationModified="MODIFIED")  # fmt: skip
    for ds in _written(tmp_path / "out", make_phantom(shape=(4, 16, 16)), _sr_prov(), source):
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethodCodeSequence[0].CodeValue == "113107"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"  # before: absent


# -- 4. TimezoneOffsetFromUTC: never added to an input's copied dates ----------------------------------------------
def test_an_input_without_a_time_zone_offset_gets_none_added(tmp_path, make_phantom, tokyo):
    vol = make_phantom(shape=(4, 16, 16))
    prov = _sr_prov()  # made at 16:38:11 UTC on the 6th: 01:38:11 on the 7th in Tokyo
    plain, _ = _source(tmp_path, make_phantom, "plain", StudyDate="20261206", StudyTime="090000")
    first = _written(tmp_path / "out_plain", vol, prov, plain)[0]
    assert "TimezoneOffsetFromUTC" not in first  # before: +0900, which made the study's 09:00 Tokyo time
    assert (first.StudyDate, first.StudyTime) == ("20261206", "090000")
    assert (first.SeriesDate, first.SeriesTime, first.ContentDate, first.ContentTime) == (
        "20261207", "013811", "20261207", "013811")  # this computer's local time, as the input's times are taken
    # an input's malformed offset is no offset either
    bad, _ = _source(tmp_path, make_phantom, "bad", TimezoneOffsetFromUTC="+9")
    assert "TimezoneOffsetFromUTC" not in _written(tmp_path / "out_bad", vol, prov, bad)[0]
    # an input's own offset holds for the whole instance, as before
    ny, _ = _source(tmp_path, make_phantom, "ny", TimezoneOffsetFromUTC="-0500")
    first = _written(tmp_path / "out_ny", vol, prov, ny)[0]
    assert (first.SeriesDate, first.SeriesTime, first.TimezoneOffsetFromUTC) == ("20261206", "113811", "-0500")
    # no DICOM input (nothing copied): this computer's offset, as before
    assert _written(tmp_path / "out_none", vol, prov)[0].TimezoneOffsetFromUTC == "+0900"
    # each reads back as the run's time (UTC), whichever zone its dates and times are in (before: taken as UTC)
    for name in ("out_plain", "out_ny", "out_none"):
        assert read_provenance(tmp_path / name).date == "2026-12-06T16:38:11+00:00", name


# -- 5. a file is named by its InstanceNumber ----------------------------------------------------------------------
def test_files_are_named_by_their_instance_number(tmp_path, make_phantom):
    # a scanner numbering against the slices' order: 1 at the top slice
    source, _ = _source(tmp_path, make_phantom, InstanceNumber=lambda ds: 7 - int(ds.InstanceNumber))
    vol = make_phantom(shape=(8, 16, 16), spacing=(0.8, 0.8, 2.0))
    out = tmp_path / "out"
    write_series(vol, out, _sr_prov(), source=source)
    written = {f.name: pydicom.dcmread(f) for f in sorted(out.iterdir())}
    assert sorted(written) == [f"{n:05d}.dcm" for n in range(1, 9)]
    for name, ds in written.items():
        assert name == f"{int(ds.InstanceNumber):05d}.dcm"  # before: 00001.dcm held InstanceNumber 8
    # the numbers still run against the slices' order (the input's), the first file at the top
    z = {name: float(ds.ImagePositionPatient[2]) for name, ds in written.items()}
    assert z["00001.dcm"] > z["00008.dcm"]
    # replaced as a series of ours (--overwrite), atomically: the same names, new instances
    before = {name: ds.SOPInstanceUID for name, ds in written.items()}
    write_series(vol, out, _sr_prov(), source=source, overwrite=True)
    again = {f.name: pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(out.iterdir())}
    assert sorted(again) == sorted(written) and all(again[n].SOPInstanceUID != before[n] for n in again)
    assert all(n == f"{int(ds.InstanceNumber):05d}.dcm" for n, ds in again.items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


# -- 6. the site's UID root ----------------------------------------------------------------------------------------
def test_uids_are_under_the_sites_root(tmp_path, make_phantom, monkeypatch):
    monkeypatch.setenv(UID_ROOT_ENV, "1.2.840.99999.5")
    assert uid_root() == "1.2.840.99999.5."
    vol = make_phantom(shape=(6, 16, 16))
    series = [_written(tmp_path / f"out{i}", vol, _sr_prov()) for i in range(2)]  # no input: a new study and frame
    uids = []
    for files in series:
        for ds in files:
            for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID,
                        ds.file_meta.MediaStorageSOPInstanceUID):  # fmt: skip
                assert uid.startswith("1.2.840.99999.5.") and UID(uid).is_valid and len(uid) <= 64, uid
        uids += [ds.SOPInstanceUID for ds in files] + [files[0].SeriesInstanceUID, files[0].StudyInstanceUID,
                                                       files[0].FrameOfReferenceUID]  # fmt: skip
    assert len(set(uids)) == len(uids) == 2 * (6 + 3)
    # an input's study and frame are its own; the new series and instances are the site's
    source, _ = _source(tmp_path, make_phantom)
    [ds, *_] = _written(tmp_path / "sr", vol, _sr_prov(), source)
    assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.2" and ds.SeriesInstanceUID.startswith("1.2.840.99999.5.")
    monkeypatch.setenv(UID_ROOT_ENV, "2.25.")  # a root given with its dot
    assert uid_root() == "2.25."


@pytest.mark.parametrize("value", ["1.2.abc", "1.02.3", "1..2", ".1.2", "1.2.840.99999.5.123456789.123456789.1"])
def test_a_bad_uid_root_is_refused_naming_the_variable(tmp_path, make_phantom, monkeypatch, value):
    monkeypatch.setenv(UID_ROOT_ENV, value)
    with pytest.raises(ConfigError, match=UID_ROOT_ENV):
        uid_root()
    with pytest.raises(ConfigError, match=UID_ROOT_ENV):  # before any work: the output is checked before the run
        check_dicom_output(tmp_path / "out")
    with pytest.raises(ConfigError, match=UID_ROOT_ENV):
        write_series(make_phantom(shape=(2, 8, 8)), tmp_path / "out", _sr_prov())
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv(UID_ROOT_ENV)
    assert uid_root() == PYDICOM_ROOT_UID


# -- 7. the notes that qualify a result reach the PACS -------------------------------------------------------------
def test_the_xray_body_part_caveat_is_in_the_image_comments(tmp_path, make_phantom):
    shoulder = body_part_note({"body_part": "SHOULDER"})
    crop = ("the radiograph is 348x424 mm (3480x4240 pixels): its middle 348x348 mm square is used (82% of the image), "
            "leaving out 38 mm (380 columns) at the left and at the right")  # fmt: skip
    notes = result_caveats([crop, shoulder, "the radiograph was turned upright"])
    assert notes == [shoulder]  # the body part qualifies the result; the crop and other info lines do not
    prov = Provenance(task="xray2ct", title="CT from radiograph (synthetic)", weights="xray-default",
                      weights_sha256="f" * 64, settings={"view": "pa"}, input="/data/shoulder-ap/monochrome2.dcm",
                      environment={}, notes=notes)  # fmt: skip
    out = tmp_path / "out"
    files = _written(out, make_phantom(shape=(4, 16, 16)), prov, keep_frame_of_reference=False)
    for ds in files:
        assert ds.ImageComments.startswith("SYNTHETIC: ")
        assert f"Caveat: {shoulder}." in ds.ImageComments and "square is used" not in ds.ImageComments
    assert read_provenance(out).notes == [shoulder]  # read back from the series
    assert prov.as_dict()["notes"] == [shoulder]  # the --report and the NIfTI sidecar
    fields = header_fields(prov)  # the NRRD / MetaImage header
    assert _from_fields(read_header_fields(fields)).notes == [shoulder]
    assert _from_fields(read_header_fields(header_fields(_sr_prov()))).notes == []
    # an SR series' slice note still ends the comments and reads back, after a caveat
    sr = _sr_prov(input_slice_thickness_mm=10.0, settings={"factor": 2, "input_spacing_xyz_mm": [1, 1, 5]},
                  input_slice_note="overlapping slices", notes=["first. second"])  # fmt: skip
    [ds, *_] = _written(tmp_path / "sr", make_phantom(shape=(4, 16, 16)), sr)
    assert ds.ImageComments.endswith("Caveat: first. second. Input slices 10 mm thick, 5 mm apart: overlapping slices.")
    back = read_provenance(tmp_path / "sr")
    assert back.notes == ["first. second"] and back.input_slice_note == "overlapping slices"
    assert np.isclose(back.input_slice_thickness_mm, 10.0)
