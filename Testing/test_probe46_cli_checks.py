"""Large volumes, probe 46: the front ends refuse work that cannot end well before they do it.

- ``sr`` and the Slicer batch CLI check a result's memory from the input file's header, before the volume is read
  (a 512x512x1200 volume took 18 s and 2.8 GB to read before it was refused), with the run's own message;
- the Slicer batch CLI checks its output's room (disk, ``ulimit -f``) before the work, as ``sr`` does (it ran 98 s,
  then failed to write);
- ``evaluate`` checks its own memory from the header and ``--slices``, under ``DIFFUSIONCORE_MEMORY_LIMIT`` too;
- ``sr --help`` says what the float32 default costs against int16.

The files whose header is checked before reading are real NIfTI headers followed by too few voxels: a run that read
them first would stop on the read (or its own size check), not on the memory of the result. Every command runs in a
subprocess, as a user runs it.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ct_phantom_array

from DiffusionCore.errors import ResourceError
from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.volume import Volume, read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
SR_CLI = ROOT / "CTDiffusionSR" / "CLI" / "CTDiffusionSRBatch.py"


def run(argv: list[str], limit: str | None = None, file_size: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFUSIONCORE_MEMORY_LIMIT", None)
    if limit:
        env["DIFFUSIONCORE_MEMORY_LIMIT"] = limit

    def limit_file_size() -> None:  # ulimit -f in the child only
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run(argv, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          env=env, cwd=ROOT, preexec_fn=limit_file_size if file_size else None)  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def header_only_nifti(path: Path, shape_xyz=(512, 512, 400), zooms=(0.7, 0.7, 5.0)) -> Path:
    """A NIfTI file of int16 ``shape_xyz`` voxels by its header, holding only 4 KiB of them: reading it fails."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape_xyz)
    header.set_data_dtype(np.int16)
    header.set_zooms(zooms)
    header.set_qform(np.diag([*zooms, 1.0]), code=1)
    header.set_sform(np.diag([*zooms, 1.0]), code=1)
    with open(path, "wb") as f:
        f.write(header.binaryblock)
        f.write(b"\0" * 4)  # no extension
        f.write(b"\0" * 4096)
    return path


def small_ct(path: Path, slices: int = 8) -> Path:
    """A real thick-slice CT file: ``slices`` x 64 x 64 voxels, 0.8 mm pixels, 3.2 mm slices."""
    write_volume(Volume(ct_phantom_array((slices, 64, 64)), spacing=(0.8, 0.8, 3.2)), path)
    return path


# -- finding 2: the memory of a result, from the header, before reading ---------------------------------------------
@pytest.mark.parametrize("how", ["environment", "--memory-limit"])
def test_sr_refuses_a_result_too_large_for_memory_from_the_header_before_reading(tmp_path, how):
    src = header_only_nifti(tmp_path / "thick.nii")
    out = tmp_path / "thin.nii.gz"
    argv = [sys.executable, "-m", "DiffusionCore", "sr", str(src), str(out), "--factor", "4", "--no-adapt",
            "--threads", "1"]  # fmt: skip
    if how == "environment":
        proc = run(argv, limit="1GiB")
        said = "DIFFUSIONCORE_MEMORY_LIMIT allows 1.0 GiB"
    else:
        proc = run([*argv, "--memory-limit", "1GiB"])
        said = "above the limit of 1.0 GiB; raise the limit"
    errors = error_lines(proc.stderr)
    assert proc.returncode == 5, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "super-resolving onto 1600x512x512 voxels needs about" in errors[0], errors[0]
    assert said in errors[0], errors[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["thick.nii"]


def test_slicer_cli_refuses_a_result_too_large_for_memory_from_the_header_before_reading(tmp_path):
    src = header_only_nifti(tmp_path / "thick.nii")
    out = tmp_path / "thin.nrrd"
    proc = run([sys.executable, str(SR_CLI), "--factor", "4", "--noAdapt", "--threads", "1", str(src), str(out)],
               limit="1GiB")  # fmt: skip
    errors = error_lines(proc.stderr)
    assert proc.returncode == 5, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "super-resolving onto 1600x512x512 voxels needs about" in errors[0], errors[0]
    assert "DIFFUSIONCORE_MEMORY_LIMIT allows 1.0 GiB" in errors[0], errors[0]
    assert "<filter-progress>" not in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thick.nii"]


def test_the_header_check_says_what_the_run_itself_says(tmp_path, monkeypatch):
    """The early refusal is the run's own: the message SuperResolver.run gives for the volume read, word for word."""
    src = small_ct(tmp_path / "thick.nii.gz", slices=4)
    proc = run([sys.executable, "-m", "DiffusionCore", "sr", str(src), str(tmp_path / "thin.nii.gz"), "--factor", "4",
                "--no-adapt", "--threads", "1"], limit="64MiB")  # fmt: skip
    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", "64MiB")
    with pytest.raises(ResourceError) as caught:
        SuperResolver.from_pretrained("sr-default").run(read_volume(src), factor=4)
    assert proc.returncode == 5, proc.stderr
    assert f"error: {caught.value}" in error_lines(proc.stderr), (proc.stderr, str(caught.value))


# -- finding 4: the Slicer batch CLI checks the room for its output before the work ---------------------------------
def test_slicer_cli_refuses_an_output_over_the_file_size_limit_before_any_work(tmp_path):
    src = small_ct(tmp_path / "thick.nrrd")  # 8x64x64: x4 is 32x64x64 float32, 512 KiB uncompressed
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "thin.nrrd"
    proc = run([sys.executable, str(SR_CLI), "--factor", "4", "--noAdapt", "--threads", "1", str(src), str(out)],
               file_size=128 << 10)  # fmt: skip
    errors = error_lines(proc.stderr)
    assert proc.returncode == 4, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"no room for {out}" in errors[0] and "ulimit -f" in errors[0], errors[0]
    assert "Nothing was computed" in errors[0], errors[0]
    assert "<filter-progress>" not in proc.stdout  # refused before the work: no progress at all
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no partial file


def test_slicer_cli_writes_when_the_file_size_limit_leaves_room(tmp_path):
    src = small_ct(tmp_path / "thick.nrrd")
    out = tmp_path / "thin.nrrd"
    proc = run([sys.executable, str(SR_CLI), "--factor", "4", "--noAdapt", "--threads", "1", str(src), str(out)],
               file_size=4 << 20)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_volume(out).shape == (32, 64, 64)


# -- finding 6: evaluate's own memory check --------------------------------------------------------------------------
def test_evaluate_refuses_before_reading_with_need_limit_and_what_fits(tmp_path):
    ref = header_only_nifti(tmp_path / "ref.nii", zooms=(0.7, 0.7, 1.25))
    proc = run([sys.executable, "-m", "DiffusionCore", "evaluate", "--reference", str(ref), "--slices", "0", "200",
                "--factor", "4", "--methods", "cubic,sr", "--threads", "1"], limit="1GiB")  # fmt: skip
    errors = error_lines(proc.stderr)
    assert proc.returncode == 5, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = errors[0]
    assert "evaluating" in line and "(200x512x512 voxels scored, methods cubic, sr) needs about" in line, line
    assert "DIFFUSIONCORE_MEMORY_LIMIT allows 1.0 GiB" in line, line
    assert "--slices 0 " in line and "without sr: about" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.nii"]


def test_evaluate_scores_a_slice_range_that_fits(tmp_path):
    ref = tmp_path / "ref.nii.gz"
    write_volume(Volume(ct_phantom_array((24, 32, 32)), spacing=(0.8, 0.8, 1.0)), ref)
    proc = run([sys.executable, "-m", "DiffusionCore", "evaluate", "--reference", str(ref), "--slices", "4", "20",
                "--factor", "4", "--methods", "cubic", "--threads", "1", "--progress", "none"], limit="2GiB")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "cubic" in proc.stdout


# -- finding 8: the output type's cost, in --help --------------------------------------------------------------------
def test_sr_help_says_what_float32_costs_and_how_to_get_int16():
    proc = run([sys.executable, "-m", "DiffusionCore", "sr", "--help"])
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    assert "2.5 times smaller" in text and "--output-dtype int16 for smaller files" in text, text
