"""Probe 26 (a reproducibility audit) and probe 25 D14: what a result's provenance says of the code and environment that
made it (D2), the provenance of the volumes ``evaluate --save-volumes`` writes (D5) and the folder it leaves when it
fails (D14), what the ``evaluate-xray`` JSON records (D6), and ``x.nii.gz`` / ``x.nii`` sharing one sidecar (D10)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import chest_like_ct
from test_evaluate_cli import assert_one_error_line, run_cli

from DiffusionCore.cli.main import main
from DiffusionCore.provenance import Provenance, header_fields, read_provenance, sidecar_record
from DiffusionCore.results import write_result
from DiffusionCore.version import commit_of_checkout
from DiffusionCore.volume import Volume, write_volume

ROOT = Path(__file__).resolve().parents[1]


def _provenance(**settings) -> Provenance:
    return Provenance(task="sr", title="SR x4 (synthetic)", weights="sr-default", weights_sha256="ab" * 32,
                      settings={"factor": 4, "device": "cpu", **settings}, input="/data/thick.nii.gz")  # fmt: skip


def _head_commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


# -- D2: the code and the environment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nrrd", "ct.mha", "series"])
def test_every_result_records_the_commit_torch_python_and_platform(tmp_path, name):
    """Every output said only "CTDiffusion 0.1.0", a version that never changed over 567 commits."""
    out = tmp_path / name
    vol = Volume(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 2.0))
    write_result(vol, out, _provenance(), as_dicom=name == "series")
    read_from = next(iter(sorted(out.iterdir()))) if out.is_dir() else out
    env = read_provenance(read_from).environment
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["platform"] == platform.platform()
    commit = _head_commit()
    if commit:  # this source runs from a git checkout: its commit identifies the code
        assert env["commit"] == commit


def test_the_header_field_is_one_line_and_a_file_without_it_still_reads(tmp_path):
    field = header_fields(_provenance())["ctdiffusion_environment"]
    assert "\n" not in field and json.loads(field)["python"] == platform.python_version()
    old = tmp_path / "old.nrrd"  # written before the environment was recorded
    write_result(Volume(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 2.0)), old, _provenance())
    text = old.read_bytes()
    start = text.index(b"ctdiffusion_environment:=")
    old.write_bytes(text[:start] + text[text.index(b"\n", start) + 1:])
    record = read_provenance(old)
    assert record.environment == {} and record.settings["factor"] == 4 and record.weights == "sr-default"
    side = tmp_path / "old.json"  # an old NIfTI sidecar
    write_result(Volume(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 2.0)), tmp_path / "old.nii.gz", _provenance())
    data = json.loads(side.read_text())
    del data["provenance"]["environment"]
    side.write_text(json.dumps(data))
    record = read_provenance(tmp_path / "old.nii.gz")
    assert record.environment == {} and record.weights == "sr-default"


def test_the_commit_is_read_from_head_a_loose_ref_or_packed_refs_without_git(tmp_path):
    sha_a, sha_b, sha_c = "a" * 40, "b" * 40, "c" * 40
    git = tmp_path / "checkout" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha_b} refs/heads/main\n{sha_c} refs/heads/x\n")
    assert commit_of_checkout(tmp_path / "checkout") == sha_b  # a packed branch
    (git / "refs" / "heads" / "main").write_text(sha_a + "\n")
    assert commit_of_checkout(tmp_path / "checkout") == sha_a  # a loose ref wins over the packed one
    (git / "HEAD").write_text(sha_c + "\n")
    assert commit_of_checkout(tmp_path / "checkout") == sha_c  # a detached HEAD
    worktree = tmp_path / "worktree"
    (git / "worktrees" / "w").mkdir(parents=True)
    (git / "worktrees" / "w" / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "worktrees" / "w" / "commondir").write_text("../..\n")
    worktree.mkdir()
    (worktree / ".git").write_text(f"gitdir: {git / 'worktrees' / 'w'}\n")
    assert commit_of_checkout(worktree) == sha_a  # a worktree's branch lives in the main git directory
    assert commit_of_checkout(tmp_path / "installed") == ""  # no checkout: an installed copy


def test_an_installed_copy_records_no_commit(tmp_path):
    """A copy of the package outside any checkout (the Slicer extension, a wheel) records no commit."""
    import shutil

    shutil.copytree(ROOT / "DiffusionCore", tmp_path / "DiffusionCore", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-c", "from DiffusionCore.provenance import environment; "
                           "import json; print(json.dumps(environment()))"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    assert "commit" not in env and env["torch"] == torch.__version__


# -- D5 and D14: evaluate --save-volumes ------------------------------------------------------------------------------


def test_saved_model_volumes_record_weights_input_and_their_methods_settings(tmp_path, make_phantom):
    """The sidecars of sr / sr+adapt had "weights": "", the input as typed (relative) and no adaptation steps,
    threads or device: the volume could not be made again from them."""
    from DiffusionCore.sr.throughplane import tiny_predictor
    from DiffusionCore.sr.throughplane_train import export_predictor

    weights = tmp_path / "mine.safetensors"
    export_predictor(tiny_predictor(0), weights, {})
    write_volume(make_phantom(shape=(24, 48, 48), spacing=(0.8, 0.8, 1.0)), tmp_path / "ct.nii.gz")
    proc = run_cli("evaluate", "--reference", "ct.nii.gz", "--factor", "2", "--methods", "cubic,sr,sr+adapt",
                   "--weights", str(weights), "--allow-unregistered-weights", "--device", "cpu", "--adapt-steps", "2",
                   "--seed", "3", "--threads", "1", "--json", "r.json", "--save-volumes", "vols", "--progress",
                   "none", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    for method in ("sr", "sr+adapt"):
        side = json.loads((tmp_path / "vols" / f"{method}.json").read_text())
        assert side["output"] == f"{method}.nii.gz"
        prov = side["provenance"]
        assert prov["weights"] == str(weights) and prov["weights_sha256"] == report["weights_sha256"]
        assert prov["input"] == "ct.nii.gz"  # its name only: a file beside the volume leaves the folders out
        settings = prov["settings"]
        assert settings["method"] == method and settings["seed"] == 3 and settings["factor"] == 2
        assert settings["device"] == "cpu" and settings["torch_threads"] == 1
        assert settings["adapt"] == report["method_details"][method]["adapt"]
        read = read_provenance(tmp_path / "vols" / f"{method}.nii.gz")
        assert read.weights == str(weights) and read.settings["torch_threads"] == 1
    adapted = json.loads((tmp_path / "vols" / "sr+adapt.json").read_text())["provenance"]["settings"]["adapt"]
    assert adapted["steps"] == 2 and adapted["steps_run"] == 2
    assert json.loads((tmp_path / "vols" / "sr.json").read_text())["provenance"]["settings"]["adapt"] is None
    cubic = json.loads((tmp_path / "vols" / "cubic.json").read_text())
    assert cubic["output"] == "cubic.nii.gz" and cubic["provenance"]["weights"] == ""
    assert cubic["provenance"]["input"] == "ct.nii.gz"


def test_a_save_folder_is_removed_when_the_run_fails_before_writing_into_it(tmp_path, small_disk):
    """Probe 25 D14: the message said the disk was full (exit 4), but the empty folder stayed."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 300.0, (24, 48, 48)).astype(np.float32)  # does not compress into 64 KiB
    write_volume(Volume(noise, (0.8, 0.8, 1.0)), tmp_path / "ct.nii.gz")
    vols = small_disk / "vols"
    proc = run_cli("evaluate", "--reference", "ct.nii.gz", "--factor", "2", "--methods", "cubic", "--save-volumes",
                   str(vols), "--progress", "none", cwd=tmp_path)  # fmt: skip
    assert_one_error_line(proc, 4, "full")
    assert not vols.exists() and os.listdir(small_disk) == []


# -- D6: the evaluate-xray JSON -----------------------------------------------------------------------------------------

TINY = ["--tiny-test-model", "--progress", "none", "--methods", "model,mean-ct"]


def test_the_evaluate_xray_json_records_what_evaluate_records_and_the_values_used(tmp_path):
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    ct = write_volume(Volume(chest_like_ct(), (14.0, 14.0, 14.0)), tmp_path / "p1.nii.gz")
    out = tmp_path / "x.json"
    assert main(["evaluate-xray", "--reference", str(ct), "--json", str(out), "--seed", "2", *TINY]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    for key in ("date", "diffusioncore_version", "source_commit", "torch_version", "python_version", "torch_threads", "device",
                "weights", "weights_sha256"):  # fmt: skip
        assert key in report, key
    assert report["torch_version"] == torch.__version__ and report["device"] == "cpu"
    cfgs = XrayToCTGenerator.tiny().cascade.configs
    settings = report["settings"]
    assert settings["steps"] == [c.diffusion.sampling_steps for c in cfgs]  # not null: the weights' own
    assert settings["num_samples"] == [c.diffusion.num_samples for c in cfgs]
    assert settings["lifting_start_t"] == pytest.approx(cfgs[0].diffusion.lifting_start_t)
    assert settings["device"] == "cpu" and settings["torch_threads"] == report["torch_threads"]
    assert settings["seed"] == 2 and report["reference_file"] == str(ct)
    again = tmp_path / "y.json"
    assert main(["evaluate-xray", "--reference", str(ct), "--json", str(again), "--steps", "2", "--num-samples", "1",
                 "--lifting-start", "0.5", *TINY]) == 0  # fmt: skip
    given = json.loads(again.read_text(encoding="utf-8"))["settings"]
    assert given["steps"] == [2] * len(cfgs) and given["num_samples"] == [1] * len(cfgs)
    assert given["lifting_start_t"] == 0.5


def test_a_sample_ct_is_named_alike_given_by_name_or_found_in_a_folder(tmp_path, monkeypatch):
    """`reference` was `chest-dx` for one reference and the sample's cache path when several were given."""
    from DiffusionCore import sampledata
    from DiffusionCore.xray.evaluate import evaluate_xray, reference_label
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    monkeypatch.setattr(sampledata, "sample_dir", lambda name: tmp_path / "samples" / name)
    cached = tmp_path / "samples" / "chest-dx" / "ct.nii.gz"
    cached.parent.mkdir(parents=True)
    write_volume(Volume(chest_like_ct(), (14.0, 14.0, 14.0)), cached)
    from DiffusionCore.volume import read_volume

    ref = read_volume(cached)
    generator = XrayToCTGenerator.tiny()
    by_path = evaluate_xray(generator, ref, reference_name=str(cached), methods=("mean-ct",))
    by_name = evaluate_xray(generator, ref, reference_name="chest-dx", methods=("mean-ct",))
    assert by_path["reference"] == by_name["reference"] == "chest-dx"
    assert by_path["reference_file"] == by_name["reference_file"] == str(cached)
    assert by_path["settings"]["steps"] is None  # no diffusion ran: no steps were used
    own = tmp_path / "mine.nii.gz"
    assert reference_label(str(own)) == str(own)


# -- D10: x.nii.gz and x.nii share the sidecar x.json ------------------------------------------------------------------


def test_a_nifti_file_is_never_described_by_the_sidecar_of_its_namesake(tmp_path, make_phantom):
    """`sr dxA q.nii.gz --factor 4`, then `sr dxB q.nii --factor 2 --overwrite`: q.json was replaced and
    read_provenance('q.nii.gz') then said dxB at x2."""
    make = [sys.executable, "-m", "DiffusionCore", "sr"]
    for name, seed in (("dxA.nii.gz", 0), ("dxB.nii.gz", 1)):
        write_volume(make_phantom(seed=seed), tmp_path / name)
    fast = ["--tiny-test-model", "--no-adapt", "--progress", "none"]
    for src, out, factor in (("dxA.nii.gz", "q.nii.gz", "4"), ("dxB.nii.gz", "q.nii", "2")):
        done = subprocess.run([*make, src, out, "--factor", factor, "--overwrite", *fast], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
    gz, plain = read_provenance(tmp_path / "q.nii.gz"), read_provenance(tmp_path / "q.nii")
    assert json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))["output"] == "q.nii"  # the sidecar says whose
    assert plain.settings["factor"] == 2 and plain.input.endswith("dxB.nii.gz")
    assert gz.title == "SR x4 (synthetic)" and gz.settings.get("factor") != 2 and "dxB" not in gz.input


def test_a_sidecar_that_names_another_output_is_not_read_for_this_one(tmp_path):
    vol = Volume(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 2.0))
    prov = _provenance()
    write_result(vol, tmp_path / "x.nii.gz", prov)
    assert read_provenance(tmp_path / "x.nii.gz").weights == "sr-default"
    (tmp_path / "x.json").write_text(json.dumps(sidecar_record(_provenance(factor=2), tmp_path / "x.nii")))
    record = read_provenance(tmp_path / "x.nii.gz")  # the descrip alone: the title and the weights' sha256 prefix
    assert record.title == "SR x4 (synthetic)" and record.weights == "" and record.settings == {}
    (tmp_path / "x.json").write_text(json.dumps(sidecar_record(prov, tmp_path / "x.nii.gz")))
    assert read_provenance(tmp_path / "x.nii.gz").settings["factor"] == 4
    plain = write_volume(vol, tmp_path / "x.nii")  # not a result, beside one: the sidecar is not its
    assert read_provenance(plain) is None


def test_evaluate_xray_takes_threads_as_xray2ct_does_and_records_them(tmp_path):
    """`evaluate-xray --threads N` (it refused the option that xray2ct and the benchmarks take): applied before the
    work and recorded, so a figure can be rerun at the thread count it was made with."""
    ct = write_volume(Volume(chest_like_ct(), (14.0, 14.0, 14.0)), tmp_path / "p1.nii.gz")
    for threads in (1, 2):
        out = tmp_path / f"x{threads}.json"
        proc = run_cli("evaluate-xray", "--reference", str(ct), "--json", str(out), "--threads", str(threads), *TINY,
                       cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert json.loads(out.read_text(encoding="utf-8"))["torch_threads"] == threads
