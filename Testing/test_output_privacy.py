"""A result shared with students or colleagues names its input by the file's name only (a teaching radiologist's
probe): the NRRD / MetaImage header, the NIfTI sidecar and a DICOM series recorded the input's absolute path, so a
folder such as ``/data/teaching/Smith_John_1961/`` travelled with every result. The input's name, its sha256 and its
DICOM UID identify it; only the ``--report`` JSON, the local record of the run the user asks for, keeps the path."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_sr_pipeline import thick_ct

from DiffusionCore.cli.main import main
from DiffusionCore.provenance import Provenance, read_provenance
from DiffusionCore.results import stamp_provenance, write_result
from DiffusionCore.volume import write_volume

#: A folder named after a patient, as teaching files are often kept.
PATIENT_FOLDER = "Smith_John_1961"
SR_FAST = ("--tiny-test-model", "--no-adapt", "--progress", "none", "--factor", "2", "--num-steps", "1")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def patient_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "teaching" / PATIENT_FOLDER
    folder.mkdir(parents=True)
    return folder


def file_text(path: Path) -> bytes:
    """Every byte of a written file, a gzipped one uncompressed (a NIfTI header is inside the gzip stream)."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def assert_names_input_only(path: Path, input_name: str) -> None:
    text = file_text(path)
    assert PATIENT_FOLDER.encode() not in text and b"teaching" not in text, f"{path.name} names the input's folder"
    assert input_name.encode() in text, f"{path.name} does not name the input {input_name}"


def test_sr_results_beside_the_volume_name_the_input_file_and_the_report_its_path(tmp_path):
    source = patient_folder(tmp_path) / "ct.nii.gz"
    write_volume(thick_ct(shape=(2, 12, 12)), source)
    out, report = tmp_path / "shared", tmp_path / "report.json"
    out.mkdir()
    assert main(["sr", str(source), str(out / "thin.nii.gz"), *SR_FAST, "--report", str(report)]) == 0
    assert main(["sr", str(source), str(out / "thin.nrrd"), *SR_FAST]) == 0

    for written in ("thin.json", "thin.nrrd"):  # the sidecar and the NRRD header, every byte of them
        assert_names_input_only(out / written, "ct.nii.gz")
    assert PATIENT_FOLDER.encode() not in file_text(out / "thin.nii.gz")
    assert "ctdiffusion_input:=ct.nii.gz\n" in (out / "thin.nrrd").read_bytes().decode("latin-1")

    ran = json.loads(report.read_text(encoding="utf-8"))["provenance"]
    assert ran["input"] == str(source)  # the local record of the run keeps the path
    for written in ("thin.nii.gz", "thin.nrrd"):  # read back: the name, and the digest that identifies the input
        record = read_provenance(out / written)
        assert record is not None and record.input == "ct.nii.gz"
        assert record.input_sha256 == ran["input_sha256"] and len(record.input_sha256) == 64


def test_a_dicom_series_input_is_named_by_its_folder_not_the_folders_above(tmp_path, dicom_series_writer):
    series = patient_folder(tmp_path) / "CT series"
    dicom_series_writer(series, thick_ct(shape=(2, 12, 12)))
    out = tmp_path / "thin.nrrd"
    assert main(["sr", str(series), str(out), *SR_FAST, "--allow-non-ct"]) == 0
    assert_names_input_only(out, "CT series")
    assert read_provenance(out).input == "CT series"


def test_xray2ct_results_beside_the_volume_name_the_radiograph_file_and_the_report_its_path(tmp_path):
    source = patient_folder(tmp_path) / "chest.png"
    Image.fromarray((np.random.default_rng(0).random((72, 64)) * 255).astype(np.uint8)).save(source)
    out, report = tmp_path / "shared", tmp_path / "report.json"
    out.mkdir()
    tiny = ["--tiny-test-model", "--progress", "none"]
    assert main(["xray2ct", str(source), str(out / "ct.nii.gz"), *tiny, "--save-stages", "--report", str(report)]) == 0
    assert main(["xray2ct", str(source), str(out / "ct.nrrd"), *tiny]) == 0

    for written in ("ct.json", "ct_stage1.json", "ct.nrrd"):
        assert_names_input_only(out / written, "chest.png")
    ran = json.loads(report.read_text(encoding="utf-8"))["provenance"]
    assert ran["input"] == str(source)
    record = read_provenance(out / "ct.nii.gz")
    assert record.input == "chest.png" and record.input_sha256 == ran["input_sha256"]


def test_the_library_writers_and_a_stamped_file_record_the_input_by_its_name(tmp_path):
    """``write_result`` (``save_result``, the Slicer CLIs) and ``stamp_provenance`` (a result Slicer saved) write the
    same fields: a MetaImage header and a NIfTI sidecar name the input's file, whatever path the record holds."""
    prov = Provenance(task="sr", title="SR x2 (synthetic)", weights="tiny", weights_sha256="ab" * 32,
                      input=f"/data/teaching/{PATIENT_FOLDER}/ct.nii.gz", input_sha256="cd" * 32, environment={})
    vol = thick_ct(shape=(2, 12, 12))
    for name in ("written.mha", "written.nii.gz"):
        write_result(vol, tmp_path / name, prov)
    write_volume(vol, tmp_path / "saved.nrrd")  # as 3D Slicer's own writer saves a result
    assert stamp_provenance(tmp_path / "saved.nrrd", prov)
    for name in ("written.mha", "written.json", "saved.nrrd"):
        assert_names_input_only(tmp_path / name, "ct.nii.gz")
        assert (tmp_path / name).read_bytes().count(("cd" * 32).encode()) == 1
    assert prov.input.endswith(f"{PATIENT_FOLDER}/ct.nii.gz")  # the caller's record itself is left as it was


def test_the_input_a_result_records_by_name_is_told_from_another_of_that_name_by_its_content(tmp_path):
    """What a continued batch needs now that results hold no folder (``--skip-existing``): of two inputs named
    ``chest.png``, the one whose content has the recorded sha256; the only input of a name needs no reading."""
    from DiffusionCore.results import input_digest, recorded_source

    sources = [patient_folder(tmp_path) / "chest.png", tmp_path / "chest.png", tmp_path / "other.png"]
    for seed, path in enumerate(sources):
        Image.fromarray((np.random.default_rng(seed).random((72, 64)) * 255).astype(np.uint8)).save(path)
    first = input_digest(sources[0], "xray2ct")
    assert len(first) == 64 and first != input_digest(sources[1], "xray2ct")
    made = Provenance(task="xray2ct", title="CT from radiograph (synthetic)", weights="tiny", weights_sha256="",
                      input="chest.png", input_sha256=first, environment={})  # as read back from a result file
    digests: dict[int, str] = {}
    assert recorded_source(made, sources, digests) == 0 and set(digests) == {0, 1}
    alone: dict[int, str] = {}
    assert recorded_source(made, sources[1:], alone) == 0 and alone == {}  # the only one of that name: not read
    assert recorded_source(replace(made, input_sha256="0" * 64), sources) is None  # neither has that content
    made.input = "other.png"
    assert recorded_source(made, sources) == 2
    made.input, made.input_sha256 = "gone.png", ""
    assert recorded_source(made, sources) is None
