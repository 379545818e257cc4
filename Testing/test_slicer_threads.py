"""The Slicer front ends set the CPU thread count, which a result depends on (the same seed, device and thread count
give the same result): a "CPU threads" box in each module's advanced settings (0: automatic), passed to the batch CLIs
as --threads, applied before the work and recorded in the result's settings (torch_threads); "Evaluate on this
volume" passes it to `evaluate` too. Before, a module's result could not be reproduced on the command line with
--threads, nor a command-line result in the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")
ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

import test_probe27_slicer_cli  # noqa: E402
from conftest import write_cr_radiograph  # noqa: E402

ct_file = test_probe27_slicer_cli.ct_file  # the fixture: a small thick CT file
SR_SCRIPT = ROOT / "CTDiffusionSR" / "CLI" / "CTDiffusionSRBatch.py"
XRAY_SCRIPT = ROOT / "XrayToCT" / "CLI" / "XrayToCTGenerate.py"
#: the default the box overrides (the test session's workers set MKL_NUM_THREADS=1 too, which torch would take)
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONUTF8": "1"}


def _run(script: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, env=ENV, timeout=300,
                          encoding="utf-8", errors="backslashreplace")  # fmt: skip


def _threads_recorded(report: Path) -> int:
    return int(json.loads(report.read_text())["provenance"]["settings"]["torch_threads"])


def test_the_sr_modules_thread_count_reaches_the_run_and_its_record(tmp_path, ct_file):
    from CTDiffusionSRLib.sr_logic import SRSettings

    for threads, expected in ((1, 1), (0, 2)):  # 0: automatic, here OMP_NUM_THREADS
        settings = SRSettings(threads=threads, factor=2, device="cpu", tiny_test_predictor=True, adapt_steps=2)
        report = tmp_path / f"report{threads}.json"
        proc = _run(SR_SCRIPT, *settings.cli_arguments(), "--reportFile", report, ct_file, tmp_path / f"o{threads}.nrrd")
        assert proc.returncode == 0, proc.stderr
        assert _threads_recorded(report) == expected


def test_the_xray_modules_thread_count_reaches_the_run_and_its_record(tmp_path):
    from XrayToCTLib.xray_logic import XraySettings

    radiograph = write_cr_radiograph(tmp_path / "chest.dcm")
    settings = XraySettings(threads=1, num_stages=1, steps=1, device="cpu", tiny_test_model=True)
    report = tmp_path / "report.json"
    proc = _run(XRAY_SCRIPT, *settings.cli_arguments(), "--reportFile", report, radiograph, tmp_path / "ct.nrrd")
    assert proc.returncode == 0, proc.stderr
    assert _threads_recorded(report) == 1


def test_the_module_parameter_and_evaluation_job_carry_the_thread_count(tmp_path):
    """The panel's box is bound to a parameter that reaches the settings, and "Evaluate on this volume" passes it."""
    import ast

    for module_file, lib in (("CTDiffusionSR/CTDiffusionSRLib/sr_widget.py", "sr"),
                             ("XrayToCT/XrayToCTLib/xray_widget.py", "xray")):  # fmt: skip
        tree = ast.parse((ROOT / module_file).read_text(encoding="utf-8"))
        keywords = {k.arg: ast.unparse(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                    for k in node.keywords}  # fmt: skip
        assert keywords.get("threads") == "p.threads", (lib, "the settings do not take the panel's thread count")

    from CTDiffusionSRLib import mrml_io
    from CTDiffusionSRLib.sr_logic import EvaluationJob, SRSettings

    from DiffusionCore.volume import Volume

    scene = slicer.vtkMRMLScene()
    arr = np.full((16, 24, 24), -1000.0, np.float32)
    arr[:, 6:18, 6:18] = 40.0
    node = mrml_io.add_volume_node(scene, Volume(arr, (0.8, 0.8, 1.0)), "thin")
    job = EvaluationJob.for_settings(scene, node, 2, SRSettings(threads=3, adapt_to_scan=False))
    args = job.prepare(tmp_path)
    assert args[args.index("--threads") + 1] == "3" and job.requested()["threads"] == 3
    job = EvaluationJob.for_settings(scene, node, 2, SRSettings(adapt_to_scan=False))
    assert "--threads" not in job.prepare(tmp_path)
