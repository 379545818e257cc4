"""The ``sr`` command end to end (tiny random-weight model): outputs on the thin grid, Slicer progress,
batches shared across torchrun ranks, and bad inputs that end with one ``error:`` line, an exit code, the
input untouched and no partial output."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_sr_pipeline import thick_ct

from DiffusionCore.cli.main import main
from DiffusionCore.degrade import thin_grid
from DiffusionCore.volume import Volume, read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]


def sr_command(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "DiffusionCore", "sr", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})}, **kw,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name)


@pytest.fixture
def thick_file(tmp_path) -> Path:
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])  # oblique
    path = tmp_path / "thick.nrrd"
    write_volume(thick_ct(shape=(2, 32, 48), direction=direction), path)
    return path


def test_sr_writes_thin_grid_output_with_slicer_progress_and_report(tmp_path, thick_file):
    out = tmp_path / "thin.nii.gz"
    before = digest(thick_file)
    res = sr_command(str(thick_file), str(out), "--tiny-test-model", "--factor", "4", "--progress", "slicer",
                     "--report", str(tmp_path / "report.json"))
    assert res.returncode == 0, res.stderr
    thick = read_volume(thick_file)
    result = read_volume(out)
    grid = thin_grid(thick, 4)
    assert result.shape == grid.shape == (8, 32, 48)
    np.testing.assert_allclose(result.spacing, grid.spacing, atol=1e-5)
    np.testing.assert_allclose(result.origin, grid.origin, atol=1e-4)
    np.testing.assert_allclose(result.direction.ravel(), grid.direction, atol=1e-6)
    fractions = [float(line[len("<filter-progress>"):-len("</filter-progress>")])
                 for line in res.stdout.splitlines() if line.startswith("<filter-progress>")]
    assert len(fractions) >= 4 and fractions[-1] == 1.0
    assert all(0.0 <= a <= b <= 1.0 for a, b in zip(fractions, fractions[1:]))
    # the bar does not sit at 1.0 while the file is written: writing has its own comment and the last step
    lines = res.stdout.splitlines()
    writing = lines.index("<filter-comment>writing thin.nii.gz</filter-comment>")
    assert float(lines[writing + 1][len("<filter-progress>"):-len("</filter-progress>")]) < 1.0
    assert lines[writing + 2:] == ["<filter-comment>written</filter-comment>", "<filter-progress>1.0000</filter-progress>"]
    assert "meaningless" in res.stderr
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["weights_sha256"]) == 64 and report["settings"]["factor"] == 4
    assert report["settings"]["estimate"] == "mean" and report["settings"]["steps"] == 1  # the default
    assert set(report["timings"]) >= {"read", "interpolate", "model", "blend", "consistency", "write"}
    assert digest(thick_file) == before


def test_a_target_spacing_names_the_result_by_its_slice_spacing(tmp_path):
    """4 mm slices to 1.5 mm (no integer factor): the result's title (what its sidecar, NIfTI header and DICOM
    SeriesDescription carry) says "SR 1.5 mm", the new slice spacing, not the 0.8 mm in-plane pixel size."""
    import json

    src = tmp_path / "thick.nrrd"
    write_volume(thick_ct(), src)  # 0.8 x 0.8 x 4 mm
    out = tmp_path / "thin.nii.gz"
    assert main(["sr", str(src), str(out), "--tiny-test-model", "--target-spacing", "1.5",
                 "--progress", "none"]) == 0
    assert read_volume(out).spacing[2] == pytest.approx(1.5)
    side = json.loads(out.with_name("thin.json").read_text())
    assert side["provenance"]["title"] == "SR 1.5 mm (synthetic)"
    assert main(["sr", str(src), str(tmp_path / "x2.nii.gz"), "--tiny-test-model", "--factor",
                 "2", "--progress", "none"]) == 0
    assert json.loads((tmp_path / "x2.json").read_text())["provenance"]["title"] == "SR x2 (synthetic)"


def test_a_thin_scan_made_finer_than_its_pixels_is_warned_of(tmp_path, capsys):
    """A thin 0.6 mm CT given by mistake with --factor 4 --axis z: 0.15 mm slices, four times the data, nothing to
    gain, and not a word said."""
    vol = thick_ct()
    src = write_volume(Volume(vol.array, (0.6, 0.6, 0.6)), tmp_path / "thin 0.6 mm.nrrd")
    assert main(["sr", str(src), str(tmp_path / "finer.nii.gz"), "--tiny-test-model", "--factor", "4", "--axis", "z",
                 "--progress", "none"]) == 0  # fmt: skip
    assert ("warning: the result's slices will be 0.15 mm apart, finer than the input's 0.6 mm pixels "
            f"({vol.shape[0] * 4} slices, ") in capsys.readouterr().err
    assert main(["sr", str(tmp_path / "finer.nii.gz"), str(tmp_path / "x2.nii.gz"), "--tiny-test-model", "--factor",
                 "2", "--axis", "x", "--progress", "none"]) == 0  # 0.6 mm to 0.3 mm beside 0.15 mm pixels: no warning
    assert "finer than" not in capsys.readouterr().err


def test_batch_folder_is_shared_across_ranks_and_keeps_names(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(("a.nii.gz", "b.nrrd", "c.mha")):
        write_volume(thick_ct(shape=(2, 32, 32), seed=i), src / name)
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "DiffusionCore", "sr", str(src), str(out), "--tiny-test-model", "--factor", "4",
             "--num-samples", "2", "--uncertainty", str(tmp_path / "unc"), "--progress", "none", "--num-steps", "1"],
            cwd=ROOT, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sorted(os.listdir(out)) == ["a.json", "a.nii.gz", "b.nrrd", "c.mha"]  # a.json: the NIfTI's provenance
    assert sorted(os.listdir(tmp_path / "unc")) == ["a.json", "a.nii.gz", "b.nrrd", "c.mha"]  # maps: provenance too
    assert "a.nii.gz" in logs[0][1] and "c.mha" in logs[0][1] and "b.nrrd" in logs[1][1]  # rank 0: a, c; rank 1: b
    assert read_volume(out / "b.nrrd").shape == (8, 32, 32)
    assert read_volume(tmp_path / "unc" / "a.nii.gz").array.max() > 0


def test_terminate_during_inference_leaves_no_output(tmp_path):
    src = tmp_path / "big.nii.gz"
    write_volume(thick_ct(shape=(8, 64, 64)), src)
    out = tmp_path / "out.nii.gz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "DiffusionCore", "sr", str(src), str(out), "--tiny-test-model", "--factor", "4",
         "--use-patches", "--patch-size", "8", "32", "32", "--progress", "slicer"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 90
    for line in proc.stdout:  # wait until sampling has started
        if line.startswith("<filter-progress>") and float(line[17:23]) > 0:
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: sr was stopped by signal SIGTERM; no output was written."
    ]
    assert not out.exists() and leftovers(tmp_path) == []


# -- bad inputs: one error line, the class exit code, input untouched, no output ---------------------------
def _write_2d(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.int16)), str(path))


def _write_isotropic(path: Path) -> None:
    write_volume(thick_ct(shape=(8, 16, 16), spacing=(1.0, 1.0, 1.0)), path)


def _write_nan(path: Path) -> None:
    vol = thick_ct(shape=(3, 16, 16))
    vol.array[1, 2, 3] = np.nan
    write_volume(vol, path, dtype="float32")


def _write_pickle(path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, path)


CASES = {
    "2d image": (_write_2d, [], 2, "2D image"),
    "isotropic": (_write_isotropic, [], 2, "isotropic"),
    "nan": (_write_nan, [], 2, "NaN"),
    "missing weights": (None, ["--weights", "{tmp}/nope.safetensors"], 3, "no such file"),
    "pickle weights": (None, ["--weights", "{tmp}/evil.safetensors", "--allow-unregistered-weights"], 3, "pickle"),
    "existing output": (None, ["--existing"], 4, "already exists"),
    "missing output folder": (None, ["--output-in-missing-folder"], 4, "does not exist"),
    "output is a file's child": (None, ["--output-under-file"], 4, "does not exist"),
    "uncertainty without samples": (None, ["--uncertainty", "{tmp}/u.nii.gz"], 2, "--num-samples"),
    "samples of the mean": (None, ["--estimate", "mean", "--num-samples", "2"], 2, "--estimate sample"),
    "steps of the mean": (None, ["--estimate", "mean", "--num-steps", "4"], 2, "--estimate sample"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_end_with_one_error_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(tmp_path / "cache"))
    write, extra, code, words = CASES[case]
    src = tmp_path / "input.nii.gz"
    (write or (lambda p: write_volume(thick_ct(shape=(2, 32, 32)), p)))(src)
    _write_pickle(tmp_path / "evil.safetensors")
    out = tmp_path / "result.nii.gz"
    args = [a.format(tmp=tmp_path) for a in extra]
    if "--existing" in args:
        args.remove("--existing")
        out.write_bytes(b"keep me")
    if "--output-in-missing-folder" in args:
        args.remove("--output-in-missing-folder")
        out = tmp_path / "missing" / "result.nii.gz"
    if "--output-under-file" in args:
        args.remove("--output-under-file")
        out = src / "result.nii.gz"
    if not any(a.startswith("--weights") for a in args):
        args.append("--tiny-test-model")
    before = digest(src)
    listing = sorted(os.listdir(tmp_path))
    rc = main(["sr", str(src), str(out), "--progress", "none", *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == code, err
    assert len(errors) == 1 and words in errors[0], err
    assert digest(src) == before
    if case == "existing output":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == listing  # nothing new, no partial files


def test_no_default_weights_says_how_to_pass_them(tmp_path, capsys, monkeypatch, no_bundled_weights):
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "input.nii.gz"
    write_volume(thick_ct(shape=(2, 32, 32)), src)
    rc = main(["sr", str(src), str(tmp_path / "out.nii.gz"), "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 3 and "no default SR weights are installed" in err and "--weights" in err


def test_batch_list_file_and_volume_api(tmp_path, capsys):
    a = tmp_path / "one.nii.gz"
    write_volume(thick_ct(shape=(2, 32, 32)), a)
    listing = tmp_path / "volumes.txt"
    listing.write_text("one.nii.gz\n")
    rc = main(["sr", str(listing), str(tmp_path / "out"), "--tiny-test-model", "--progress", "none",
               "--output-dtype", "int16", "--factor", "2", "--num-steps", "2"])
    assert rc == 0, capsys.readouterr().err
    result = read_volume(tmp_path / "out" / "one.nii.gz")
    assert isinstance(result, Volume) and result.shape == (4, 32, 32)
    assert sitk.ReadImage(str(tmp_path / "out" / "one.nii.gz")).GetPixelID() == sitk.sitkInt16


def test_batch_goes_on_after_a_bad_volume_and_says_which_failed(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_volume(thick_ct(shape=(2, 32, 32)), src / "good.nii.gz")
    _write_nan(src / "bad.nii.gz")
    rc = main(["sr", str(src), str(tmp_path / "out"), "--tiny-test-model", "--progress", "none", "--num-steps", "1"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 7 and len(errors) == 1 and "1 of 2 volumes failed" in errors[0]  # 7: some failed, others written
    assert [line for line in err.splitlines() if line.startswith("warning: failed: ")] == [
        f"warning: failed: {src / 'bad.nii.gz'}: 1 of 768 voxels are NaN or infinite. Replace "
        "them (e.g. with -1024 HU for air) before running; the tool does not guess values for them."
    ]  # each failure on a line of its own, below the closing line
    assert sorted(os.listdir(tmp_path / "out")) == ["good.json", "good.nii.gz"]  # the result and its provenance


def test_a_synthetic_input_is_named_as_such_and_the_uncertainty_map_is_labelled(tmp_path):
    """A result taken as the input of another run, or as an evaluation's reference (e.g. a file picked by mistake):
    the commands say it is synthetic; an acquired scan gives no such warning. The uncertainty map carries its own
    provenance."""
    from DiffusionCore.provenance import read_provenance

    src = tmp_path / "thick.nrrd"
    write_volume(thick_ct(shape=(8, 32, 32)), src)
    first = sr_command(str(src), str(tmp_path / "thin.nrrd"), "--tiny-test-model", "--factor", "2", "--num-samples",
                       "2", "--num-steps", "1", "--uncertainty", str(tmp_path / "unc.nrrd"), "--progress", "none")
    assert first.returncode == 0, first.stderr
    assert "synthetic image" not in first.stderr
    assert read_provenance(tmp_path / "unc.nrrd").title == "SR x2 uncertainty (synthetic)"
    assert read_provenance(tmp_path / "thin.nrrd").title == "SR x2 (synthetic)"
    again = sr_command(str(tmp_path / "thin.nrrd"), str(tmp_path / "again.nrrd"), "--tiny-test-model", "--factor",
                       "2", "--progress", "none")
    assert again.returncode == 0, again.stderr
    assert "thin.nrrd is itself a synthetic image (SR x2 (synthetic), made with tiny-test-model" in again.stderr
    scored = subprocess.run(
        [sys.executable, "-m", "DiffusionCore", "evaluate", "--reference", str(tmp_path / "thin.nrrd"), "--factor",
         "2", "--methods", "cubic", "--progress", "none"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert scored.returncode == 0, scored.stderr
    assert "thin.nrrd is itself a synthetic image" in scored.stderr
    tiny = subprocess.run(  # 8 slices: fewer than the 3D SSIM window
        [sys.executable, "-m", "DiffusionCore", "evaluate", "--reference", str(src), "--factor", "2", "--methods",
         "cubic", "--progress", "none"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert tiny.returncode == 2 and "internal error" not in tiny.stderr
    assert "a volume of 8x32x32 voxels is too small to score: the 3D SSIM window is 11 voxels" in tiny.stderr


def test_a_batch_refuses_a_volume_file_name_as_its_output_folder(tmp_path, capsys):
    """`sr FOLDER out.nii.gz` made a folder called out.nii.gz, into which a later `sr one.nii.gz out.nii.gz` then
    wrote without a word."""
    src = tmp_path / "in"
    src.mkdir()
    write_volume(thick_ct(shape=(2, 32, 32)), src / "a.nii.gz")
    write_volume(thick_ct(shape=(2, 32, 32)), src / "b.nii.gz")
    rc = main(["sr", str(src), str(tmp_path / "out.nii.gz"), "--tiny-test-model", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 4 and "the input is a batch" in err and "out.nii.gz is a volume file's name: give a folder" in err
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_a_patient_folder_holding_one_ct_series_is_one_input(tmp_path, capsys):
    # a patient's folder: its CT series in one subfolder, a treatment plan in another (passed over); OUTPUT a file
    from conftest import write_dicom_series
    from pydicom.data import get_testdata_file

    patient = tmp_path / "patient"
    write_dicom_series(patient / "ct", thick_ct(shape=(3, 32, 32)))
    (patient / "plan").mkdir()
    (patient / "plan" / "plan.dcm").write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes())
    out = tmp_path / "thin.nii.gz"
    rc = main(["sr", str(patient), str(out), "--tiny-test-model", "--no-adapt", "--factor", "2", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert out.is_file() and read_volume(out).shape[0] == 6
    assert f"{patient} holds one CT volume, {patient / 'ct'}" in err


def test_a_batch_whose_every_volume_fails_writes_nothing_and_says_so(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _write_nan(src / "bad.nii.gz")
    _write_isotropic(src / "iso.nii.gz")
    rc = main(["sr", str(src), str(tmp_path / "out"), "--tiny-test-model", "--progress", "none"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    # probe 32 (M8): the isotropic volume is passed over (not for sr), not failed
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("error: 1 volume(s) failed and 1 were passed over "
                                                                 "(not for this command), nothing was written")
    assert "the others were written" not in errors[0]
    assert not (tmp_path / "out").exists()  # the folder this run made is gone again
    (tmp_path / "kept").mkdir()  # a folder the user made stays
    assert main(["sr", str(src), str(tmp_path / "kept"), "--tiny-test-model", "--progress", "none"]) == 2
    assert (tmp_path / "kept").is_dir()


def test_a_report_that_is_a_folder_or_the_outputs_sidecar_is_refused_before_any_work(tmp_path, thick_file, capsys):
    """--report DIR --overwrite failed after the result was written (the rename onto a folder), with an internal
    error; --report OUT.json beside OUT.nii.gz named a file the user never gave."""
    (tmp_path / "reports").mkdir()
    out = tmp_path / "thin.nii.gz"
    rc = main(["sr", str(thick_file), str(out), "--tiny-test-model", "--progress", "none", "--report",
               str(tmp_path / "reports"), "--overwrite"])
    assert rc == 4 and "reports is a folder: give the name of a file to write" in capsys.readouterr().err
    assert not out.exists()
    rc = main(["sr", str(thick_file), str(out), "--tiny-test-model", "--progress", "none", "--report",
               str(tmp_path / "thin.json")])
    err = capsys.readouterr().err
    assert rc == 4 and "and the output's provenance sidecar" in err and "thin.json are the same file" in err
    assert not out.exists()


def test_an_axis_named_by_hand_that_is_not_the_thick_one_is_warned_of(tmp_path, thick_file, capsys):
    rc = main(["sr", str(thick_file), str(tmp_path / "a.nii.gz"), "--tiny-test-model", "--progress", "none",
               "--axis", "x", "--factor", "2", "--num-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 0 and "axis x (0.8 mm) is not the volume's thick axis (z, 4 mm)" in err
    rc = main(["sr", str(thick_file), str(tmp_path / "b.nii.gz"), "--tiny-test-model", "--progress", "none",
               "--axis", "z", "--factor", "2", "--num-steps", "1"])
    assert rc == 0 and "thick axis" not in capsys.readouterr().err


def test_a_volume_that_does_not_look_like_ct_is_warned_of_once_by_its_file_name(tmp_path, capsys):
    src = tmp_path / "faint.nii.gz"
    write_volume(Volume(np.full((4, 32, 32), -1024.0, np.float32) + np.arange(32, dtype=np.float32) * 10,
                        spacing=(0.8, 0.8, 3.2)), src)
    rc = main(["sr", str(src), str(tmp_path / "out.nii.gz"), "--tiny-test-model", "--progress", "none",
               "--num-steps", "1"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "does not look like CT" in line]
    assert rc == 0 and len(warnings) == 1 and "faint.nii.gz" in warnings[0]


def test_command_line_mistakes_end_with_one_line_naming_the_commands_help(tmp_path, thick_file, capsys):
    for args, said in (
        (["sr", str(thick_file), "o.nii.gz", "--factorr", "4"], "unrecognized arguments: --factorr 4"),
        (["sr", str(thick_file), "o.nii.gz", "--factor", "abc"], "invalid int value: 'abc'"),
        (["sr", "--adapt", str(thick_file), "o.nii.gz"], "write --adapt after INPUT OUTPUT, or give it a number"),
    ):
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], lines
        assert lines[0].endswith("; see python -m DiffusionCore sr --help")
    assert main(["train", "throughplane", "--data", "x"]) == 2
    assert capsys.readouterr().err.strip().endswith("see python -m DiffusionCore train throughplane --help")


def test_options_of_a_diffusion_stage_are_said_once_to_do_nothing_with_the_shipped_weights(tmp_path):
    """The shipped sr-default is a through-plane predictor with no diffusion stage: --guidance-scale, --use-patches,
    --patch-size, --overlap and --tile-batch act on that stage alone. Given, they are named once for the whole batch,
    in one line, and the volumes are written as without them; left out, nothing is said."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.nrrd", "b.nrrd"):
        write_volume(thick_ct(shape=(4, 24, 32), seed=len(name)), src / name)
    diffusion = ["--guidance-scale", "3", "--use-patches", "--patch-size", "8", "32", "32", "--overlap", "2", "8", "8",
                 "--tile-batch", "2"]  # fmt: skip
    outputs = {}
    for run, options in (("given", diffusion), ("left-out", [])):
        res = sr_command(str(src), str(tmp_path / run), "--weights", "sr-default", "--factor", "2", "--no-adapt",
                         "--progress", "none", *options)  # fmt: skip
        assert res.returncode == 0, res.stderr
        said = [line for line in res.stderr.splitlines() if "no effect" in line]
        outputs[run] = [read_volume(tmp_path / run / name).array for name in ("a.nrrd", "b.nrrd")]
        if options:
            assert said == ["warning: --guidance-scale, --use-patches, --patch-size, --overlap and --tile-batch have no "
                            "effect with the weights sr-default: they act on the latent diffusion stage alone, and these "
                            "weights are a through-plane predictor without one"], res.stderr
            assert "using patches as requested" not in res.stderr
        else:
            assert said == [], res.stderr
    for given, plain in zip(outputs["given"], outputs["left-out"]):
        np.testing.assert_array_equal(given, plain)
    one = sr_command(str(src / "a.nrrd"), str(tmp_path / "one.nrrd"), "--factor", "2", "--no-adapt", "--overlap", "2",
                     "8", "8", "--progress", "none")  # the default weights, one option  # fmt: skip
    assert one.returncode == 0, one.stderr
    assert [line for line in one.stderr.splitlines() if "no effect" in line] == [
        "warning: --overlap has no effect with the weights sr-default: it acts on the latent diffusion stage alone, and "
        "these weights are a through-plane predictor without one"]  # fmt: skip


def test_allow_non_ct_accepts_a_result_in_the_inputs_own_range(tmp_path):
    """``--allow-non-ct`` on an MR volume stored as values up to 35,000: the run passed every check and then
    stopped after the work with "failed numerically ... report it", since its result (values like its input's) lay
    above 32767, the final check's CT range. Now the check takes the input's own range when non-CT values are
    allowed; without the option the input is refused before any work, as before."""
    rng = np.random.default_rng(0)
    mr = Volume((rng.random((4, 32, 32)) * 30000 + 5000).astype(np.float32), (0.8, 0.8, 4.0), (0, 0, 0), np.eye(3))
    src = write_volume(mr, tmp_path / "mr.nrrd", dtype="float32")
    out = tmp_path / "mr_thin.nrrd"
    res = sr_command(str(src), str(out), "--tiny-test-model", "--factor", "2", "--progress", "none",
                     "--allow-non-ct")
    assert res.returncode == 0, res.stderr
    assert read_volume(out, check=False).array.max() > 32767
    res = sr_command(str(src), str(tmp_path / "refused.nrrd"), "--tiny-test-model", "--factor", "2",
                     "--progress", "none")
    assert res.returncode == 2 and "does not look like CT" in res.stderr


def test_the_reports_peak_memory_includes_writing_the_result(tmp_path, thick_file, monkeypatch):
    """--report's peak_rss_bytes is the process's peak with the result written (an integer cast or DICOM slices can
    take more than the run itself), not the peak the engine saw before writing."""
    import json

    import DiffusionCore.cli.sr as sr_cli
    from DiffusionCore.files import peak_rss_bytes

    seen = {}
    real_write = sr_cli.write_result

    def write_with_a_large_buffer(*args, **kwargs):
        buffer = np.ones(100_000_000, dtype=np.float64)  # 800 MB touched, far above the tiny run's peak
        seen["peak"] = peak_rss_bytes()
        del buffer
        return real_write(*args, **kwargs)

    monkeypatch.setattr(sr_cli, "write_result", write_with_a_large_buffer)
    report = tmp_path / "r.json"
    rc = main(["sr", str(thick_file), str(tmp_path / "out.nii.gz"), "--tiny-test-model", "--factor", "2",
               "--report", str(report)])  # fmt: skip
    assert rc == 0
    recorded = json.loads(report.read_text())["memory"]["peak_rss_bytes"]
    # the kernel's peak counter lags by a few pages; the engine's own peak was far below 800 MB
    assert recorded >= seen["peak"] - 2**20 and seen["peak"] > 800_000_000
