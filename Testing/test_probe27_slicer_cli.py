"""Probe 27: the Slicer scripted CLIs (CTDiffusionSRBatch.py, XrayToCTGenerate.py) agree with ``python -m
DiffusionCore``.

- a CT made from a DICOM radiograph records its SOPInstanceUID (the input's, or --dicomHeader's), as xray2ct does;
- a closed stdout pipe (``| true``) fails no run, and an internal error advises nothing these scripts lack (--debug);
- a file name in another encoding than UTF-8, under a UTF-8 locale, is met with rename advice, not locale advice;
- the SR CLI's out-of-memory advice holds for the shipped sr-default weights;
- --seed takes 0..2**32-1 only, as sr and xray2ct do;
- --reportFile records the provenance, as sr --report and xray2ct --report do; argument errors name no hidden option
  and point out a dash-led file name.

Every script runs as a subprocess, as Slicer runs it, with the tiny test models and small inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cr_radiograph

ROOT = Path(__file__).resolve().parents[1]
SR_SCRIPT = ROOT / "CTDiffusionSR" / "CLI" / "CTDiffusionSRBatch.py"
XRAY_SCRIPT = ROOT / "XrayToCT" / "CLI" / "XrayToCTGenerate.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1", "LC_ALL": "C.UTF-8"}
SR_TINY = ["--tinyTestModel", "--numSteps", "1", "--factor", "2", "--device", "cpu", "--noAdapt"]
XRAY_TINY = ["--tinyTestModel", "--numSteps", "1", "--numStages", "1", "--device", "cpu"]


def run_script(script: Path, *args, stdout=subprocess.PIPE, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                          env=ENV, timeout=timeout, encoding="utf-8", errors="backslashreplace")  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def ct_file(tmp_path) -> Path:
    from DiffusionCore.volume import Volume, write_volume

    arr = np.full((4, 24, 24), -1000.0, np.float32)
    arr[:, 6:18, 6:18] = 40.0
    arr[:, 10:14, 10:14] = 700.0
    return write_volume(Volume(arr, (0.8, 0.8, 3.2), (0.0, 0.0, 0.0)), tmp_path / "thick.nrrd", dtype="float32")


@pytest.fixture
def dicom_radiograph(tmp_path) -> Path:
    """A small DICOM radiograph (CR, 0.5 x 0.4 mm pixels); SimpleITK gives it a SOPInstanceUID."""
    return write_cr_radiograph(tmp_path / "dicom" / "chest.dcm")


def sop_instance_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- item 3: the radiograph's UID ---------------------------------------------------------------------------------
def test_xray_cli_records_a_dicom_radiographs_uid_in_the_file_and_the_report(tmp_path, dicom_radiograph):
    from DiffusionCore.provenance import read_provenance

    uid = sop_instance_uid(dicom_radiograph)
    out, report = tmp_path / "xct.nrrd", tmp_path / "xct_report.json"
    proc = run_script(XRAY_SCRIPT, *XRAY_TINY, "--reportFile", report, dicom_radiograph, out)
    assert proc.returncode == 0, proc.stderr
    prov = read_provenance(out)
    assert prov is not None and prov.input_uid == uid  # before: ""
    # item 11: the report records the provenance, as xray2ct --report does
    recorded = json.loads(report.read_text())["provenance"]
    assert recorded["input_uid"] == uid and recorded["task"] == "xray2ct" and recorded["environment"]


def test_xray_cli_records_the_uid_of_the_dicom_header_slicer_passes(tmp_path, dicom_radiograph):
    """As the module runs it: the node's pixels in a temporary file, the file it was loaded from as --dicomHeader."""
    import SimpleITK as sitk

    from DiffusionCore.provenance import read_provenance

    image = sitk.ReadImage(str(dicom_radiograph))
    image = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[0].astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "handoff.mha"))
    out = tmp_path / "xct.nrrd"
    proc = run_script(XRAY_SCRIPT, *XRAY_TINY, "--dicomHeader", dicom_radiograph, tmp_path / "handoff.mha", out)
    assert proc.returncode == 0, proc.stderr
    assert read_provenance(out).input_uid == sop_instance_uid(dicom_radiograph)


# -- item 5: a closed stdout pipe; the internal error's advice ------------------------------------------------------
def _with_reader_gone(script: Path, *args) -> subprocess.CompletedProcess:
    """stdout a pipe whose reading end is closed before the run starts, as in ``... | true``."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return run_script(script, *args, stdout=write_end)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("which", ["sr", "xray"])
def test_a_closed_stdout_pipe_keeps_the_output_and_exit_code_0(tmp_path, ct_file, dicom_radiograph, which):
    script, args, source = {"sr": (SR_SCRIPT, SR_TINY, ct_file), "xray": (XRAY_SCRIPT, XRAY_TINY, dicom_radiograph)}[which]
    out = tmp_path / "out.nrrd"
    proc = _with_reader_gone(script, *args, source, out)
    assert proc.returncode == 0, proc.stderr  # before: 1, "internal error (BrokenPipeError ...)", no output
    assert "internal error" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert out.is_file()


def _run_main_with(script: Path, patch: str, *args) -> subprocess.CompletedProcess:
    """The script's main() in a subprocess, after ``patch`` (Python source) has replaced a part of the engine."""
    code = (
        "import importlib.util, sys\n"
        f"{patch}\n"
        f"spec = importlib.util.spec_from_file_location('cli', {str(script)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "sys.exit(mod.main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, env=ENV, timeout=300,
                          encoding="utf-8", errors="backslashreplace")  # fmt: skip


@pytest.mark.parametrize("which", ["sr", "xray"])
def test_an_internal_error_advises_what_the_slicer_cli_has_not_debug(tmp_path, ct_file, dicom_radiograph, which):
    if which == "sr":
        patch = ("from DiffusionCore.sr.pipeline import SuperResolver\n"
                 "def boom(*a, **k): raise ValueError('a bug')\nSuperResolver.run = boom")  # fmt: skip
        proc = _run_main_with(SR_SCRIPT, patch, *SR_TINY, ct_file, tmp_path / "o.nrrd")
    else:
        patch = ("from DiffusionCore.xray.pipeline import XrayToCTGenerator\n"
                 "def boom(*a, **k): raise ValueError('a bug')\nXrayToCTGenerator.run = boom")  # fmt: skip
        proc = _run_main_with(XRAY_SCRIPT, patch, *XRAY_TINY, dicom_radiograph, tmp_path / "o.nrrd")
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "internal error (ValueError: a bug)" in line
    assert "--debug" not in line and "Error Log" in line and "report it" in line  # before: "Run again with --debug"


# -- item 7: the SR CLI's out-of-memory advice -----------------------------------------------------------------------
def test_the_sr_clis_out_of_memory_advice_holds_for_the_shipped_weights(tmp_path, ct_file):
    patch = ("from DiffusionCore.sr.pipeline import SuperResolver\n"
             "def boom(*a, **k): raise MemoryError()\nSuperResolver.run = boom")  # fmt: skip
    proc = _run_main_with(SR_SCRIPT, patch, *SR_TINY, ct_file, tmp_path / "o.nrrd")
    assert proc.returncode == 5, proc.stderr
    (line,) = error_lines(proc.stderr)
    # before: "use a smaller patch size, fewer samples, or the GPU" (sr-default takes neither)
    assert "--factor" in line and "--targetSpacing" in line and "Adapt to this scan" in line, line
    assert "--adaptSteps" in line and "with weights that have a diffusion stage" in line, line
    assert "or the GPU" not in line


# -- item 6: a file name in another encoding under a UTF-8 locale -----------------------------------------------------
@pytest.mark.parametrize("command", ["sr", "xray2ct"])
def test_a_latin1_file_name_under_a_utf8_locale_is_met_with_rename_advice(tmp_path, command):
    name = b"rad\xe9.nrrd"
    (tmp_path / os.fsdecode(name)).write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "DiffusionCore", command, name, b"out.nrrd"], cwd=tmp_path,
                          capture_output=True, env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
    stderr = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == 2, stderr
    (line,) = error_lines(stderr)
    assert "rad" in line and "another encoding" in line and "rename" in line, line
    assert "locale" not in line  # before: "run with a UTF-8 locale", which a UTF-8 locale cannot follow


def test_locale_advice_stays_where_the_file_system_encoding_is_not_utf8(monkeypatch):
    from DiffusionCore.cli.main import undecodable_argument_advice

    assert "rename" in undecodable_argument_advice("rad\\xe9.nrrd")
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "ascii")  # LC_ALL=C with PYTHONUTF8=0
    assert "PYTHONUTF8=1" in undecodable_argument_advice("thick_中文.nrrd")


# -- item 2: the seed's range -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["-1", "4294967296", "18446744073709551616"])
@pytest.mark.parametrize("which", ["sr", "xray"])
def test_the_slicer_clis_refuse_a_seed_outside_0_to_2_32_minus_1(tmp_path, ct_file, dicom_radiograph, which, seed):
    script, args, source = {"sr": (SR_SCRIPT, SR_TINY, ct_file), "xray": (XRAY_SCRIPT, XRAY_TINY, dicom_radiograph)}[which]
    proc = run_script(script, *args, f"--seed={seed}", source, tmp_path / "o.nrrd")
    assert proc.returncode == 2, proc.stderr  # before: 0 (a repeat of a smaller seed), or 1 (internal error)
    (line,) = error_lines(proc.stderr)
    assert "--seed" in line and "from 0 to 4294967295" in line
    assert not (tmp_path / "o.nrrd").exists() and "filter-progress" not in proc.stdout


@pytest.mark.parametrize("script", [SR_SCRIPT, XRAY_SCRIPT])
def test_the_slicer_clis_take_the_largest_seed(script):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_seed", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build_parser().parse_args(["--seed", "4294967295", "a", "b"]).seed == 4294967295


# -- item 11: the report's provenance; argument errors ------------------------------------------------------------------
def test_the_sr_clis_report_records_the_provenance(tmp_path, ct_file):
    from DiffusionCore.provenance import read_provenance

    out, report = tmp_path / "thin.nrrd", tmp_path / "report.json"
    proc = run_script(SR_SCRIPT, *SR_TINY, "--reportFile", report, ct_file, out)
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads(report.read_text())["provenance"]  # before: no "provenance"
    # the report (a local record of the run) names the input by its path, the file beside the result by its name
    assert recorded["input"] == str(ct_file) and read_provenance(out).input == Path(ct_file).name
    assert {**recorded, "input": Path(ct_file).name} == read_provenance(out).as_dict()
    assert recorded["task"] == "sr" and recorded["environment"]


@pytest.mark.parametrize("script", [SR_SCRIPT, XRAY_SCRIPT])
def test_argument_errors_name_no_hidden_option_and_point_out_a_dash_led_file(tmp_path, script):
    proc = run_script(script, "--tinyTest", "a.nrrd", "b.nrrd")
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert "tinyTestModel" not in line and "tinyTestPredictor" not in line, line  # before: "could match --tinyTest..."
    (tmp_path / "-w.nrrd").write_bytes(b"")
    proc = subprocess.run([sys.executable, str(script), "-w.nrrd", "o.nrrd"], cwd=tmp_path, capture_output=True,
                          text=True, env=ENV, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert "-w.nrrd looks like an option" in line and "./-w.nrrd" in line, line  # before: "required: outputVolume"


def test_a_result_that_fails_its_final_check_advises_what_every_front_end_has():
    """Probe 27: "run again with --debug" reached the Slicer CLIs' and modules' users, who have no --debug."""
    import numpy as np

    from DiffusionCore.cli.common import check_result
    from DiffusionCore.errors import NumericalError
    from DiffusionCore.volume import Volume

    with pytest.raises(NumericalError) as info:
        check_result(Volume(np.full((4, 8, 8), np.nan, np.float32), (1.0, 1.0, 1.0)), "the generated CT")
    assert "if they are right, report it (on the command line, --debug shows the traceback)" in str(info.value)
    assert "run again with --debug" not in str(info.value)
