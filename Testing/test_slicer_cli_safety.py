"""The scripted CLI modules (CTDiffusionSRBatch, XrayToCTGenerate) and the X-ray module's logic keep the promises of
docs/reliability.md that the core commands keep: an input is never written, every output is checked before any work,
SIGTERM (Slicer's Cancel) ends a run with exit code 130, one line and nothing written, and the X-ray to CT reference
CT is checked before the generation, not after it.

The scripts run as Slicer runs them (command lines built from their XML by ``slicer_command_line``) and as README
shows them, on real files written by DiffusionCore; the logic runs on real MRML nodes.
"""

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

pytest.importorskip("ctk_cli")
slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

from CTDiffusionSRLib import mrml_io  # noqa: E402
from CTDiffusionSRLib.testing import phantom_ct, phantom_radiograph  # noqa: E402
from test_slicer_cli import run_like_slicer, slicer_command_line  # noqa: E402

from DiffusionCore.volume import Volume, write_volume  # noqa: E402

SR = "CTDiffusionSRBatch"
XRAY = "XrayToCTGenerate"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def leftovers(folder: Path) -> list[Path]:
    """Hidden temporary files of an interrupted write (``.NAME.PID.XXXX.partial...``)."""
    return [p for p in folder.rglob("*") if "partial" in p.name]


def files_in(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def ct_file(tmp_path) -> Path:
    path = tmp_path / "thick.nrrd"
    write_volume(phantom_ct(), path)
    return path


@pytest.fixture
def radiograph_file(tmp_path) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray((phantom_radiograph(64) * 3000).astype(np.float32))
    image.SetSpacing((5.0, 5.0))
    path = tmp_path / "chest.mha"
    sitk.WriteImage(image, str(path))
    return path


def assert_refused_before_any_work(proc, code: int, words: tuple[str, ...], tmp_path: Path, before: dict) -> None:
    """One ``error:`` line with ``words``, exit ``code``, no progress printed, and the folder as it was."""
    errors = error_lines(proc.stderr)
    assert proc.returncode == code, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(word in errors[0] for word in words), errors[0]
    assert "<filter-progress>" not in proc.stdout and "stage-ready" not in proc.stdout  # no work was done
    assert files_in(tmp_path) == before  # the inputs byte for byte, and nothing new
    assert not leftovers(tmp_path)


# -- A: outputs checked before any work; an input is never written --------------------------------------------------
def _sr_cases(tmp_path: Path, ct: Path) -> dict[str, tuple[dict, Path | None, int, tuple[str, ...]]]:
    (tmp_path / "reports").mkdir()
    (tmp_path / "other.json").write_text('{"provenance": "of out.nii"}\n')
    return {
        "output is the input": ({"outputVolume": ct}, None, 4, ("the output", "is the input", "thick.nrrd")),
        "report is the input": ({"reportFile": ct}, None, 4, ("--reportFile", "is the input", "thick.nrrd")),
        "uncertainty is the input": ({"uncertaintyVolume": ct, "numSamples": 2, "numSteps": 2}, None, 4,
                                     ("--uncertaintyVolume", "is the input")),  # fmt: skip
        "report is a folder": ({"reportFile": tmp_path / "reports"}, None, 4, ("reports is a folder", "report.json")),
        "return file is a folder": ({}, tmp_path / "reports", 4, ("reports is a folder",)),
        "return file is the input": ({}, ct, 4, ("--returnparameterfile", "is the input")),
        "another result's sidecar": ({"outputVolume": tmp_path / "other.nii.gz"}, None, 4,
                                     ("other.json", "provenance sidecar of other.nii.gz", "already exists",
                                      "move it away")),  # fmt: skip
    }


@pytest.mark.parametrize("case", ["output is the input", "report is the input", "uncertainty is the input",
                                  "report is a folder", "return file is a folder", "return file is the input",
                                  "another result's sidecar"])  # fmt: skip
def test_sr_cli_refuses_an_output_that_hits_an_input_or_a_folder_before_any_work(tmp_path, ct_file, case):
    values, return_file, code, words = _sr_cases(tmp_path, ct_file)[case]
    argv = slicer_command_line(
        SR,
        {"inputVolume": ct_file, "outputVolume": tmp_path / "out.nrrd", "factor": 2, "noAdapt": True,
         "device": "cpu", "tinyTestModel": True, **values},
        return_file,
    )  # fmt: skip
    before = files_in(tmp_path)
    proc, _ = run_like_slicer(argv)
    assert_refused_before_any_work(proc, code, words, tmp_path, before)


def test_the_cli_modules_refuse_writing_over_an_input_without_naming_an_overwrite_option_they_lack(tmp_path, ct_file,
                                                                                                     radiograph_file):
    """The core's refusal says "refused even with --overwrite"; the CLI modules have no --overwrite (they replace their
    outputs), so their users read of an option they cannot find. Their refusal names what to do instead, choosing
    another path, and the sr command keeps its own words."""
    from conftest import write_dicom_series

    series = tmp_path / "series"
    write_dicom_series(series, phantom_ct())
    runs = (
        (SR, {"inputVolume": ct_file, "outputVolume": ct_file, "factor": 2, "tinyTestModel": True},
         f"the output {ct_file} is the input {ct_file}: writing it would destroy the input, so it is refused. Choose "
         "another path for the output."),
        (SR, {"inputVolume": series, "outputVolume": tmp_path / "out.nrrd", "reportFile": series / "report.json",
              "factor": 2, "tinyTestModel": True},
         f"--reportFile {series / 'report.json'} lies inside the input folder {series}: writing there would change what "
         "is read from that folder (a series, a cohort), so it is refused. Choose a path outside it."),
        (XRAY, {"inputRadiograph": radiograph_file, "outputVolume": tmp_path / "ct.nrrd", "reportFile": radiograph_file,
                "tinyTestModel": True},
         f"--reportFile {radiograph_file} is the input {radiograph_file}: writing it would destroy the input, so it is "
         "refused. Choose another path for --reportFile."),
    )  # fmt: skip
    for name, values, said in runs:
        before = files_in(tmp_path)
        proc, _ = run_like_slicer(slicer_command_line(name, {"device": "cpu", **values}))
        assert_refused_before_any_work(proc, 4, (said,), tmp_path, before)
        assert "overwrite" not in proc.stderr.lower()
    core = subprocess.run([sys.executable, "-m", "DiffusionCore", "sr", str(ct_file), str(ct_file), "--overwrite",
                           "--tiny-test-model"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert core.returncode == 4 and error_lines(core.stderr) == [
        f"error: the output {ct_file} is the input {ct_file}: writing it would destroy the input, so it is refused even "
        "with --overwrite. Choose another path for the output."], core.stderr  # fmt: skip


def test_sr_cli_as_readme_shows_it_refuses_its_input_as_output_and_replaces_its_own_output(tmp_path, ct_file):
    """``python CTDiffusionSRBatch.py --factor 2 --noAdapt in.nrrd in.nrrd`` replaced the scan with its result (exit
    0). The output Slicer asks for is still replaced, sidecar and all: Slicer re-runs into the same node."""
    script = slicer_command_line(SR, {"inputVolume": "", "outputVolume": ""})[:2]
    before = files_in(tmp_path)
    proc = subprocess.run([*script, "--factor", "2", "--noAdapt", "--tinyTestModel", str(ct_file), str(ct_file)],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert_refused_before_any_work(proc, 4, ("is the input", "refused"), tmp_path, before)
    out = tmp_path / "thin.nii.gz"
    for _ in range(2):
        proc = subprocess.run([*script, "--factor", "2", "--noAdapt", "--tinyTestModel", str(ct_file), str(out)],
                              capture_output=True, text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert out.is_file() and (tmp_path / "thin.json").is_file()
    assert sha256(ct_file) == before["thick.nrrd"]


def _xray_cases(tmp_path: Path, radiograph: Path, reference: Path) -> dict:
    (tmp_path / "reports").mkdir()
    return {
        "output is the input": ({"outputVolume": radiograph}, None, 4, ("the output", "is the input", "chest.mha")),
        "report is the input": ({"reportFile": radiograph}, None, 4, ("--reportFile", "is the input", "chest.mha")),
        "report is the reference": ({"reportFile": reference, "referenceVolume": reference}, None, 4,
                                    ("--reportFile", "is the input", "ref.nrrd")),  # fmt: skip
        "output is the reference": ({"outputVolume": reference, "referenceVolume": reference}, None, 4,
                                    ("the output", "is the input", "ref.nrrd")),  # fmt: skip
        "report is a folder": ({"reportFile": tmp_path / "reports"}, None, 4, ("reports is a folder",)),
        "return file is a folder": ({}, tmp_path / "reports", 4, ("reports is a folder",)),
    }


@pytest.mark.parametrize("case", ["output is the input", "report is the input", "report is the reference",
                                  "output is the reference", "report is a folder", "return file is a folder"])  # fmt: skip
def test_xray_cli_refuses_an_output_that_hits_an_input_or_a_folder_before_any_work(tmp_path, radiograph_file, case):
    reference = tmp_path / "ref.nrrd"
    write_volume(phantom_ct(shape=(12, 32, 32), spacing=(8.0, 8.0, 8.0)), reference)
    values, return_file, code, words = _xray_cases(tmp_path, radiograph_file, reference)[case]
    argv = slicer_command_line(
        XRAY,
        {"inputRadiograph": radiograph_file, "outputVolume": tmp_path / "ct.nrrd", "numStages": 1, "numSteps": 1,
         "device": "cpu", "tinyTestModel": True, "stageDirectory": tmp_path / "stages", **values},
        return_file,
    )  # fmt: skip
    before = files_in(tmp_path)
    proc, _ = run_like_slicer(argv)
    assert_refused_before_any_work(proc, code, words, tmp_path, before)
    assert not (tmp_path / "stages").exists()


# -- C: the reference CT checked before the generation --------------------------------------------------------------
@pytest.mark.parametrize("case", ["three slices", "missing", "the radiograph", "not CT"])
def test_xray_cli_checks_the_reference_ct_before_generating(tmp_path, radiograph_file, case):
    """A bad --referenceVolume was found only after the whole generation, which was then thrown away."""
    rng = np.random.default_rng(0)
    references = {
        "three slices": (phantom_ct(shape=(3, 32, 32), spacing=(8.0, 8.0, 8.0)), ("3 slices along z", "at least 4")),
        "missing": (None, ("does not exist",)),
        "the radiograph": (radiograph_file, ("2D image", "3D CT volume is needed")),
        "not CT": (Volume(rng.random((12, 32, 32)).astype(np.float32), (8.0, 8.0, 8.0)),
                   ("does not look like CT", "--referenceVolume")),  # fmt: skip
    }
    made, words = references[case]
    reference = made if isinstance(made, Path) else tmp_path / "ref.nrrd"
    if isinstance(made, Volume):
        write_volume(made, reference)
    argv = slicer_command_line(
        XRAY,
        {"inputRadiograph": radiograph_file, "outputVolume": tmp_path / "ct.nrrd", "referenceVolume": reference,
         "numStages": 1, "numSteps": 1, "device": "cpu", "tinyTestModel": True,
         "stageDirectory": tmp_path / "stages", "reportFile": tmp_path / "report.json"},
        tmp_path / "return.txt",
    )  # fmt: skip
    before = files_in(tmp_path)
    proc, _ = run_like_slicer(argv)
    assert_refused_before_any_work(proc, 2, (reference.name, *words), tmp_path, before)
    assert not (tmp_path / "stages").exists()


# -- B: SIGTERM (Slicer's Cancel) --------------------------------------------------------------------------------
def terminate_after(argv: list[str], marker: str, timeout: float = 120) -> tuple[int, str, str]:
    """Start ``argv`` as Slicer does, send SIGTERM once a stdout line starts with ``marker``; (code, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(marker):
                proc.send_signal(signal.SIGTERM)
                break
            assert time.monotonic() < deadline, "the run never printed " + marker
        else:
            pytest.fail(f"the run ended before printing {marker}: {proc.stderr.read()}")
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + out, err


def assert_stopped_by_sigterm(code: int, err: str, what: str) -> None:
    """Exit 130 with one error line that says the run was stopped and nothing was written, and no traceback."""
    errors = error_lines(err)
    assert code == 130, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0] == f"error: {what} was stopped by signal SIGTERM; no output was written."


def test_sr_cli_stops_on_sigterm_with_130_one_line_and_no_output(tmp_path, ct_file):
    """Slicer's Cancel sends SIGTERM: the script ended with 143, no message, and could leave .partial files."""
    argv = slicer_command_line(
        SR,
        {"inputVolume": ct_file, "outputVolume": tmp_path / "out.nrrd", "factor": 2, "device": "cpu",
         "tinyTestPredictor": True, "adaptSteps": 20000, "reportFile": tmp_path / "report.json"},
        tmp_path / "return.txt",
    )  # fmt: skip
    before = sha256(ct_file)
    code, _out, err = terminate_after(argv, "<filter-progress>")
    assert_stopped_by_sigterm(code, err, "super-resolution")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thick.nrrd"]  # no output, report, return file or partial
    assert sha256(ct_file) == before


def test_xray_cli_stops_on_sigterm_with_130_one_line_and_no_output(tmp_path, radiograph_file):
    """Cancelled after its first stage: the stage preview and the folder made for it go too."""
    argv = slicer_command_line(
        XRAY,
        {"inputRadiograph": radiograph_file, "outputVolume": tmp_path / "ct.nrrd", "numStages": 2, "numSteps": 1000,
         "numSamples": 2, "device": "cpu", "tinyTestModel": True, "stageDirectory": tmp_path / "stages",
         "reportFile": tmp_path / "report.json"},
        tmp_path / "return.txt",
    )  # fmt: skip
    before = sha256(radiograph_file)
    code, out, err = terminate_after(argv, "stage-ready ")
    assert_stopped_by_sigterm(code, err, "X-ray to CT")
    assert '"stage": 2' not in out  # it stopped during stage 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.mha"]  # no output, preview, report or partial
    assert sha256(radiograph_file) == before


# -- C: the X-ray module refuses a bad Reference CT when Apply is pressed ---------------------------------------------
def _radiograph_node(scene):
    from test_slicer_lib import _radiograph_node as make

    return make(scene, (phantom_radiograph(64) * 3000).astype(np.float32), spacing=(5.0, 5.0))


@pytest.mark.parametrize("case", ["small CT", "the radiograph", "a label map", "not CT"])
def test_xray_job_refuses_a_bad_reference_ct_before_it_starts(scene, tmp_path, monkeypatch, case):
    """XrayJob(reference_node=...) checked the reference only after the whole generation, which was then lost, and
    the message named the job's private file (/tmp/ctdiffusion-.../reference.nrrd) instead of the node."""
    import tempfile

    from XrayToCTLib import XrayJob, XraySettings

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the job's private folders would appear here
    radiograph = _radiograph_node(scene)
    rng = np.random.default_rng(0)
    if case == "small CT":
        reference = mrml_io.add_volume_node(scene, phantom_ct(shape=(3, 32, 32), spacing=(8.0, 8.0, 8.0)), "small CT")
        words = ("Reference CT 'small CT' has 3 slices along z", "at least 4 voxels")
    elif case == "the radiograph":
        reference = radiograph
        words = ("Reference CT 'chest PA' is 2D (64x64x1", "not a CT volume", "no reference")
    elif case == "a label map":
        reference = mrml_io.add_volume_node(scene, phantom_ct(shape=(12, 32, 32), spacing=(8.0, 8.0, 8.0)), "labels",
                                            class_name="vtkMRMLLabelMapVolumeNode")  # fmt: skip
        words = ("Reference CT 'labels' is not a scalar (greyscale) volume",)
    else:
        noise = Volume(rng.random((12, 32, 32)).astype(np.float32), (8.0, 8.0, 8.0))
        reference = mrml_io.add_volume_node(scene, noise, "MR")
        words = ("Reference CT 'MR' does not look like CT", "no reference")
    before = mrml_io.array_from_node(reference).copy()
    settings = XraySettings(num_stages=1, steps=1, device="cpu", tiny_test_model=True)
    started = time.monotonic()
    from DiffusionCore.errors import InputError

    with pytest.raises(InputError) as refused:
        XrayJob(scene, radiograph, settings, reference_node=reference)
    message = str(refused.value)
    assert all(word in message for word in words), message
    assert "ctdiffusion-" not in message and "reference.nrrd" not in message
    assert time.monotonic() - started < 5  # refused at once, not after a generation
    np.testing.assert_array_equal(mrml_io.array_from_node(reference), before)
    assert not list(tmp_path.iterdir())


def test_xray_job_accepts_a_ct_reference_and_the_check_says_nothing_of_none(scene):
    from XrayToCTLib import XrayJob, XraySettings
    from XrayToCTLib.xray_logic import check_reference_input

    radiograph = _radiograph_node(scene)
    reference = mrml_io.add_volume_node(scene, phantom_ct(shape=(12, 32, 32), spacing=(8.0, 8.0, 8.0)), "CT")
    assert check_reference_input(None) == "" and check_reference_input(reference) == ""
    settings = XraySettings(num_stages=1, steps=1, device="cpu", tiny_test_model=True)
    assert XrayJob(scene, radiograph, settings, reference_node=reference).reference_node is reference


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
