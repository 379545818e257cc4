"""Probe 39: the headless training commands and ``weights import``.

* ``weights import`` confirms the import once (the command's line on stdout; the library's own "imported weights"
  info line came on stderr too);
* two training volumes of the same file name in different folders (``a/ct.nii.gz``, ``b/ct.nii.gz``) are told apart
  in the training log by their shortest distinguishing parent path; a unique one keeps its short name;
* a batch's report lists what the folder search did not take for an input (``left_out``: files that are no volume,
  DICOM folders holding no CT series) apart from the inputs the run passed over (``passed_over``), and its summary
  counts each.

Tiny runs (the TINY config of test_train_probe15) on phantoms, in this process; real subprocesses for the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array
from test_train_probe15 import TINY

from DiffusionCore.cli.main import main
from DiffusionCore.sr.model import SRModel
from DiffusionCore.volume import Volume, write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _ct(path: Path, seed: int = 3, slices: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(Volume(ct_phantom_array((slices, 64, 64), seed=seed), spacing=(0.8, 0.8, 1.0)), path)
    return path


def _cli(cache: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "DiffusionCore", *argv], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", env={**ENV, "DIFFUSIONCORE_CACHE": str(cache)},
                          cwd=ROOT, timeout=300)  # fmt: skip


# ----------------------------------------------------------------------------- 3: weights import confirms once
def test_weights_import_confirms_the_import_once(tmp_path):
    weights = tmp_path / "vae.safetensors"
    SRModel.tiny(seed=0).save(weights, component="vae")
    cache = tmp_path / "cache"
    done = _cli(cache, "weights", "import", str(weights), "--name", "site-vae")
    assert done.returncode == 0, done.stderr
    said = (done.stdout + done.stderr).splitlines()
    confirmations = [line for line in said if "imported" in line]
    assert len(confirmations) == 1, said  # it said it twice: the command's line and the registry's info line
    assert confirmations[0] in done.stdout.splitlines()
    assert "site-vae (sr, sha256 " in confirmations[0] and "--weights site-vae" in confirmations[0]
    assert (cache / "weights" / "site-vae.safetensors").is_file()

    again = _cli(cache, "weights", "import", str(weights), "--name", "site-vae")  # the same file again: once too
    assert again.returncode == 0, again.stderr
    assert [line for line in (again.stdout + again.stderr).splitlines() if "imported" in line] \
        == confirmations  # fmt: skip


def test_the_python_api_still_logs_its_import(tmp_path, cache_home, diffusioncore_log):
    """The filter is the command's: a Python caller of import_weights still gets the library's info line."""
    from DiffusionCore.weights.registry import import_weights

    weights = tmp_path / "vae.safetensors"
    SRModel.tiny(seed=0).save(weights, component="vae")
    import_weights(weights, "api-vae")
    assert any(r.getMessage().startswith("imported weights 'api-vae'") for r in diffusioncore_log)


# ----------------------------------------------------------------------------- 2: volumes of the same file name
@pytest.fixture(scope="module")
def same_names(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("probe39")
    cohort = d / "cohort"
    _ct(cohort / "a" / "ct.nii.gz", 3)
    _ct(cohort / "b" / "ct.nii.gz", 4)
    _ct(cohort / "c" / "solo.nii.gz", 5)
    (d / "tiny.json").write_text(json.dumps({**TINY, "val_every": 2, "checkpoint_every": 100}))
    return {"cohort": cohort, "cfg": d / "tiny.json"}


def test_train_throughplane_logs_volumes_of_the_same_file_name_by_their_folders(same_names, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "throughplane", "--data", str(same_names["cohort"]), "--out-dir", str(out), "--threads",
                 "1", "--config", str(same_names["cfg"]), "--max-steps", "1"]) == 0  # fmt: skip
    said = capsys.readouterr().err.splitlines()
    regions = [line.removeprefix("info: ").split(":")[0] for line in said if ": train slices " in line]
    assert regions == [str(Path("a", "ct.nii.gz")), str(Path("b", "ct.nii.gz")), "solo.nii.gz"], said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == regions  # the summary names them alike


# ----------------------------------------------------------------------------- 4: a batch's left_out and passed_over
@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """A folder as a study export holds it: a volume, a MetaImage header with its voxels file, a README, pictures and
    notes in a subfolder, and a radiograph's DICOM folder."""
    import SimpleITK as sitk
    from conftest import write_cr_radiograph

    folder = tmp_path / "study"
    _ct(folder / "a.nii.gz", 3, slices=12)
    sitk.WriteImage(sitk.GetImageFromArray(ct_phantom_array((12, 64, 64), seed=4)), str(folder / "b.mhd"))  # + b.raw
    (folder / "README.txt").write_text("the study's scans\n", encoding="utf-8")
    (folder / "docs").mkdir()
    (folder / "docs" / "notes.txt").write_text("notes\n", encoding="utf-8")
    (folder / "docs" / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    write_cr_radiograph(folder / "cr" / "IM0001.dcm")
    return folder


def test_the_folder_search_records_what_it_did_not_take_for_a_volume(mixed_folder):
    from DiffusionCore.inputs import NOT_VOLUME_FILES, collect_volumes

    left_out: list[dict] = []
    found = collect_volumes(mixed_folder, left_out=left_out)
    assert [p.name for p in found] == ["a.nii.gz", "b.mhd"]
    by_folder = {Path(e["folder"]).name: e for e in left_out}
    assert set(by_folder) == {"study", "docs", "cr"}
    assert by_folder["study"] == {"folder": str(mixed_folder), "why": NOT_VOLUME_FILES, "files": 1,
                                  "first": "README.txt"}  # b.mhd's voxels file (b.raw / b.zraw) is no left-out file
    assert by_folder["docs"]["files"] == 2 and by_folder["docs"]["first"] == "notes.txt"
    assert by_folder["cr"]["why"] == "DICOM files of no CT series (CR images)" and by_folder["cr"]["files"] == 1


def test_a_batch_report_lists_what_the_search_left_out_apart_from_what_the_run_passed_over(tmp_path):
    """An xray2ct batch (its search reports what it passed over as batch.Plan.passed_over): the report's summary
    counted only the inputs the run passed over while its passed_over list held the search's folder entries too; now
    ``left_out`` lists (and the summary counts) the files the search did not take, apart."""
    from PIL import Image

    folder = tmp_path / "radiographs"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(0).random((72, 64)) * 255).astype(np.uint8)).save(folder / "a.png")
    (folder / "notes.txt").write_text("radiographs of the study\n", encoding="utf-8")
    (folder / "more notes.txt").write_text("more\n", encoding="utf-8")
    report = tmp_path / "report.json"
    assert main(["xray2ct", str(folder), str(tmp_path / "cts"), "--report", str(report), "--tiny-test-model",
                 "--progress", "none"]) == 0  # fmt: skip
    data = json.loads(report.read_text(encoding="utf-8"))
    [entry] = data["left_out"]
    assert entry["folder"] == str(folder) and entry["files"] == 2 and entry["first"] == "more notes.txt"
    assert data["summary"]["left_out"] == 2 and data["summary"]["passed_over"] == 0
    assert data["passed_over"] == [entry]  # kept where earlier reports listed it


# ----------------------------------------------------------------------------- 1: train vae / sr: passed_over
@pytest.fixture(scope="module")
def patient_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("probe39sr") / "Doe^Jane MRN 0042"  # named after a patient, as exports are
    _ct(d / "a" / "ct.nii.gz", 3, slices=40)
    _ct(d / "b" / "ct.nii.gz", 4, slices=40)
    (d / "broken.nii.gz").write_text("this is a text file, not a volume\n")
    return d


def test_train_vae_and_sr_list_what_they_passed_over_and_their_weights_say_only_how_many(patient_folder, tmp_path):
    """train throughplane listed them in summary.json; train vae / sr wrote no summary.json, and their exported
    weights' config named the --data folder (train.data), which may be a patient's name."""
    from test_sr_training import _cfg

    from DiffusionCore.sr.training import train_sr, train_vae
    from DiffusionCore.weights.header import read_safetensors_header

    vae_out, sr_out = tmp_path / "vae", tmp_path / "sr"
    vae = train_vae(_cfg(patient_folder, max_steps=1), out_dir=vae_out)
    sr = train_sr(_cfg(patient_folder, max_steps=1, vae_weights=str(vae_out)), out_dir=sr_out)
    broken = patient_folder / "broken.nii.gz"
    for result, out, weights in ((vae, vae_out, "vae.safetensors"), (sr, sr_out, "sr_model.safetensors")):
        summary = json.loads((out / "summary.json").read_text())
        assert [p["volume"] for p in summary["passed_over"]] == [str(broken)]
        assert summary["passed_over"][0]["why"].startswith("could not read it")
        assert result["passed_over"] == summary["passed_over"]  # what the command prints
        assert summary["data"] == [str(Path("a", "ct.nii.gz")), str(Path("b", "ct.nii.gz"))]  # told apart (item 2)
        header = read_safetensors_header(out / weights)[1]
        assert header["training"] == {"volumes": 2, "passed_over": 1}
        assert "Doe^Jane" not in json.dumps(header) and "broken" not in json.dumps(header)
        assert header["config"]["train"]["data"] == []
    assert SRModel.from_pretrained(sr_out / "sr_model.safetensors", allow_unregistered=True) is not None  # loads


def test_an_sr_batch_report_counts_the_volumes_it_passed_over_and_lists_what_the_search_left_out(tmp_path,
                                                                                                 make_phantom):
    """``sr FOLDER``: summary.passed_over counted the volumes the run passed over (an isotropic one) and nothing said
    what the folder search did not take (a README); now ``left_out`` lists it, and the summary counts both apart."""
    from DiffusionCore.inputs import NOT_VOLUME_FILES

    folder = tmp_path / "study"
    folder.mkdir()
    write_volume(make_phantom(shape=(8, 32, 32), spacing=(1.0, 1.0, 4.0)), folder / "thick.nii.gz")
    write_volume(make_phantom(shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0)), folder / "iso.nii.gz")
    (folder / "README.txt").write_text("the study's scans\n", encoding="utf-8")
    report = tmp_path / "report.json"
    assert main(["sr", str(folder), str(tmp_path / "out"), "--report", str(report), "--progress", "none",
                 "--num-steps", "1", "--tiny-test-model"]) == 0  # fmt: skip
    data = json.loads(report.read_text(encoding="utf-8"))
    assert [Path(p["volume"]).name for p in data["passed_over"]] == ["iso.nii.gz"]
    assert data["left_out"] == [{"folder": str(folder), "why": NOT_VOLUME_FILES, "files": 1, "first": "README.txt"}]
    assert data["summary"]["passed_over"] == 1 and data["summary"]["left_out"] == 1 and data["summary"]["written"] == 1
