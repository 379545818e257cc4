"""``python -m DiffusionCore evaluate`` as a user runs it: a real subprocess, its JSON, and its errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionCore.volume import write_volume

RESULT_KEYS = {"method", "psnr", "psnr_body", "ssim", "hu_mae_body", "consistency_psnr", "seconds"}
REPORT_KEYS = {"reference", "factor", "axis", "degradation", "hu_range", "results"}
#: What makes a figure self-describing (BENCHMARK.md): data, degradation, factor, HU range, mask, device, threads, ...
DESCRIBING_KEYS = {
    "reference_size_xyz", "reference_spacing_xyz_mm", "thick_size_xyz", "thick_spacing_xyz_mm", "slices_requested",
    "slices_scored", "slices_dropped", "body_mask", "method_details", "infinite_scores", "null_scores", "warnings",
    "date", "diffusioncore_version", "source_commit", "source_modified", "torch_version", "python_version", "torch_threads", "seed", "device",
    "device_requested", "threads_requested",
}  # fmt: skip


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "DiffusionCore", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_ct(tmp_path, make_phantom) -> Path:
    return write_volume(make_phantom(shape=(24, 32, 32), spacing=(0.8, 0.8, 1.0)), tmp_path / "small.nii.gz")


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for frag in fragments:
        assert frag in errors[0], errors[0]
    return errors[0]


def test_evaluate_writes_the_documented_json(tmp_path, small_ct):
    before = sha(small_ct)
    proc = run_cli(
        "evaluate",
        "--reference",
        str(small_ct),
        "--factor",
        "2",
        "--json",
        "r.json",
        "--progress",
        "none",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) == REPORT_KEYS | DESCRIBING_KEYS  # the keys readers had are kept
    assert report["reference_size_xyz"] == [32, 32, 24] and report["thick_size_xyz"] == [32, 32, 12]
    assert report["reference_spacing_xyz_mm"] == pytest.approx([0.8, 0.8, 1.0])
    assert report["thick_spacing_xyz_mm"] == pytest.approx([0.8, 0.8, 2.0])
    assert report["slices_requested"] is None and report["slices_scored"] == [0, 24] and report["slices_dropped"] == []
    assert report["body_mask"]["voxels"] > 0 and "HU > -500" in report["body_mask"]["definition"]
    assert report["seed"] == 0 and report["device"] == "cpu" and report["torch_threads"] >= 1
    assert report["warnings"] == [] and report["method_details"] == {}
    assert report["infinite_scores"] == {"nearest": ["consistency_psnr"]}
    assert report["factor"] == 2 and report["axis"] == "z" and report["degradation"] == "slab"
    assert report["hu_range"] == [-1024, 2048]
    assert report["reference"] == str(small_ct)
    assert [r["method"] for r in report["results"]] == ["nearest", "linear", "cubic"]
    for r in report["results"]:
        assert set(r) == RESULT_KEYS
        for key in RESULT_KEYS - {"method", "consistency_psnr"}:
            assert isinstance(r[key], float) and np.isfinite(r[key])
    by = {r["method"]: r for r in report["results"]}
    assert by["cubic"]["psnr"] > by["nearest"]["psnr"]
    assert by["nearest"]["consistency_psnr"] is None  # +inf (exactly consistent) is written as null
    assert "cubic" in proc.stdout and "PSNR" in proc.stdout  # the table
    assert sha(small_ct) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "small.nii.gz"]


def test_missing_reference(tmp_path):
    proc = run_cli("evaluate", "--reference", str(tmp_path / "nope.nii.gz"), "--factor", "2", cwd=tmp_path)
    assert_one_error_line(proc, 2, "does not exist")


def test_2d_reference_is_refused(tmp_path):
    path = tmp_path / "xray.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.int16)), str(path))
    before = sha(path)
    proc = run_cli("evaluate", "--reference", str(path), "--factor", "2", cwd=tmp_path)
    assert_one_error_line(proc, 2, "2D image")
    assert sha(path) == before


def test_factor_one_is_refused(tmp_path, small_ct):
    before = sha(small_ct)
    proc = run_cli(
        "evaluate", "--reference", str(small_ct), "--factor", "1", "--progress", "none", cwd=tmp_path
    )
    assert_one_error_line(proc, 2, "factor 1")
    assert sha(small_ct) == before


def test_methods_can_be_given_comma_or_space_separated(tmp_path, small_ct):
    """``--methods cubic,linear`` and ``--methods cubic linear`` (as ``--factors 2 4`` is given elsewhere) name the
    same methods in the same order."""
    tables = {}
    for name, methods in {"comma": ["nearest,cubic"], "space": ["nearest", "cubic"], "both": ["nearest,", "cubic"]}.items():
        proc = run_cli("evaluate", "--reference", str(small_ct), "--factor", "2", "--methods", *methods, "--progress",
                       "none", "--json", f"{name}.json", cwd=tmp_path)  # fmt: skip
        if name == "both":  # a trailing comma is an empty entry, however the list is split
            assert_one_error_line(proc, 2, "argument --methods: has an empty entry")
            continue
        assert proc.returncode == 0, proc.stderr
        tables[name] = [r["method"] for r in json.loads((tmp_path / f"{name}.json").read_text())["results"]]
    assert tables["comma"] == tables["space"] == ["nearest", "cubic"]


def test_unknown_method_is_refused(tmp_path, small_ct):
    proc = run_cli(
        "evaluate", "--reference", str(small_ct), "--factor", "2", "--methods", "cubic,lanczos", cwd=tmp_path
    )
    assert_one_error_line(proc, 2, "unknown method 'lanczos'", "cubic")


@pytest.mark.parametrize("off", [["--no-adapt"], ["--adapt", "0"]])
def test_sr_adapt_with_adaptation_turned_off_is_refused(tmp_path, small_ct, off):
    proc = run_cli("evaluate", "--reference", str(small_ct), "--factor", "2", "--methods", "cubic,sr+adapt", *off,
                   "--json", "r.json", cwd=tmp_path)  # fmt: skip
    assert_one_error_line(proc, 2, "sr+adapt", off[0])
    assert not (tmp_path / "r.json").exists()


def test_unwritable_json_path(tmp_path, small_ct):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_cli(
        "evaluate",
        "--reference",
        str(small_ct),
        "--factor",
        "2",
        "--json",
        str(blocker / "r.json"),
        cwd=tmp_path,
    )
    assert_one_error_line(proc, 4, "r.json")
    assert blocker.read_text() == "x"


def test_existing_json_needs_overwrite(tmp_path, small_ct):
    out = tmp_path / "r.json"
    out.write_text("{}")
    before = sha(small_ct)
    proc = run_cli(
        "evaluate", "--reference", str(small_ct), "--factor", "2", "--json", str(out), cwd=tmp_path
    )
    assert_one_error_line(proc, 4, "already exists", "--overwrite")
    assert out.read_text() == "{}"
    assert sha(small_ct) == before


def test_evaluate_sr_with_a_weights_file_and_the_estimate_options(tmp_path, small_ct):
    from DiffusionCore.sr.model import SRModel

    weights = tmp_path / "mine.safetensors"
    SRModel.tiny().save(weights)
    common = ["evaluate", "--reference", str(small_ct), "--factor", "2", "--methods", "cubic,sr",
              "--weights", str(weights), "--device", "cpu", "--progress", "none"]
    refused = run_cli(*common, cwd=tmp_path)
    assert_one_error_line(refused, 3, "--allow-unregistered-weights")
    conflict = run_cli(*common, "--allow-unregistered-weights", "--estimate", "mean", "--num-steps", "3", cwd=tmp_path)
    assert_one_error_line(conflict, 2, "--estimate sample")
    proc = run_cli(*common, "--allow-unregistered-weights", "--estimate", "mean", "--json", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    by = {r["method"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(by) == {"cubic", "sr"} and np.isfinite(by["sr"]["psnr"])
    # the printed table names the weights it scored (probe 38: with and without --weights it looked the same)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"weights {weights} (sha256 {sha[:12]}...)" in proc.stdout.splitlines()[1], proc.stdout
    plain = run_cli("evaluate", "--reference", str(small_ct), "--factor", "2", "--methods", "cubic", "--progress",
                    "none", cwd=tmp_path)  # fmt: skip
    assert plain.returncode == 0 and "weights" not in plain.stdout  # no model ran: no weights line


def test_a_thick_reference_is_scored_with_a_warning_and_the_scores_are_logged_in_words(tmp_path, make_phantom):
    thin = write_volume(make_phantom(shape=(24, 32, 32), spacing=(0.8, 0.8, 1.0)), tmp_path / "thin.nii.gz")
    thick = write_volume(make_phantom(shape=(24, 32, 32), spacing=(0.8, 0.8, 5.0)), tmp_path / "thick.nii.gz")
    said = {}
    for name, ref in (("thin", thin), ("thick", thick)):
        proc = run_cli("evaluate", "--reference", str(ref), "--factor", "4", "--methods", "cubic", "--progress", "none",
                       cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        said[name] = proc.stderr
    assert "simulates" not in said["thin"]
    assert "its slices are 5 mm apart, so x4 simulates 20 mm slabs" in said["thick"]
    assert "use a reference of 3 mm or less" in said["thick"]
    assert re.search(r"info: cubic: body PSNR [\d.]+ dB, 3D SSIM [\d.]+, body MAE [\d.]+ HU", said["thin"])
