"""The Windows defects of the Slicer side that portability review 42 found, each pinned by a test run on Linux.

* D3: every job (``PythonSlicer``), Cancel's ``taskkill`` and the sample download client opened a console window on
  Windows; closing it ended the job. They are started with ``CREATE_NO_WINDOW`` there (and jobs still in a process
  group of their own), as Slicer's ``launchConsoleProcess`` does.
* M2: a job folder left in ``%TEMP%`` by a killed Slicer (the input CT and the result: patient data) was never
  removed on Windows, which has no ``os.getuid``.
* M8: in a Visual Studio or Xcode build tree the scripted CLIs are in ``cli-modules/<CONFIG>``: Apply said "reinstall
  the extension".

Windows is simulated within reach of the code under test: ``DiffusionCore.processes.ON_WINDOWS`` and the Windows-only
``subprocess`` flags set, ``subprocess.Popen`` / ``subprocess.run`` recorded by fakes, ``os.getuid`` deleted.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

from CTDiffusionSRLib import jobs, process  # noqa: E402

from DiffusionCore import processes, sampledata  # noqa: E402
from DiffusionCore.cli.missing import OWNER_FILE  # noqa: E402

# Windows' values (winbase.h); Linux's subprocess has neither
CREATE_NO_WINDOW = 0x08000000
CREATE_NEW_PROCESS_GROUP = 0x00000200


def simulate_windows(monkeypatch) -> None:
    """The process-starting code behaves as on Windows."""
    monkeypatch.setattr(processes, "ON_WINDOWS", True)
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", CREATE_NO_WINDOW, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", CREATE_NEW_PROCESS_GROUP, raising=False)


@pytest.fixture
def windows(monkeypatch):
    simulate_windows(monkeypatch)


class FakePopen:
    """Records how a process was started; it runs until it is waited for."""

    started: list[tuple[list[str], dict]] = []

    def __init__(self, argv, **kwargs):
        FakePopen.started.append((list(argv), kwargs))
        self.pid = 4242
        self.stdout, self.stderr = io.StringIO(""), io.StringIO("")
        self.returncode = None

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.returncode = 1
        return 1


@pytest.fixture
def fake_popen(monkeypatch):
    FakePopen.started = []
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    return FakePopen.started


# -- D3: no console window --------------------------------------------------------------------------------------------
def test_a_job_starts_without_a_console_window_on_windows_and_in_its_own_session_on_linux(fake_popen, monkeypatch):
    process.ProcessRunner(["PythonSlicer", "CTDiffusionSRBatch.py", "in.nrrd", "out.nrrd"]).start()
    (_, linux), = fake_popen
    assert linux["start_new_session"] is True and "creationflags" not in linux  # Linux: as before

    fake_popen.clear()
    simulate_windows(monkeypatch)
    process.ProcessRunner(["PythonSlicer", "CTDiffusionSRBatch.py", "in.nrrd", "out.nrrd"]).start()
    (argv, kwargs), = fake_popen
    assert argv[:2] == ["PythonSlicer", "CTDiffusionSRBatch.py"]
    # no window to close by mistake, and still a group of its own for Cancel's tree kill
    assert kwargs["creationflags"] == CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP
    assert "start_new_session" not in kwargs
    assert kwargs["stdout"] == subprocess.PIPE and kwargs["stderr"] == subprocess.PIPE  # progress still comes


def test_cancel_on_windows_kills_the_process_tree_without_flashing_a_window(windows, fake_popen, monkeypatch):
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: ran.append((cmd, kwargs)))
    runner = process.ProcessRunner(["PythonSlicer", "job.py"]).start()
    runner.cancel()
    (cmd, kwargs), = ran
    assert cmd == ["taskkill", "/F", "/T", "/PID", "4242"]
    assert kwargs["creationflags"] == CREATE_NO_WINDOW  # only hidden: taskkill needs no group of its own
    assert runner.result().state == process.JobState.CANCELLED


def test_the_sample_download_client_opens_no_console_window_on_windows(monkeypatch, tmp_path):
    ran = []

    def pip_download(cmd, **kwargs):
        ran.append(kwargs)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sampledata.subprocess, "run", pip_download)
    package = sampledata.SAMPLES["shoulder-ap"].package
    command = [sys.executable, "-m", "pip", "download", package.spec]
    sampledata._run_client(command, tmp_path, package)
    simulate_windows(monkeypatch)
    sampledata._run_client(command, tmp_path, package)
    linux, windows = ran
    assert "creationflags" not in linux and "start_new_session" not in linux  # Linux: as before
    assert windows["creationflags"] == CREATE_NO_WINDOW
    assert windows["capture_output"] is True  # its error is still read


# -- M2: stale job folders on Windows ---------------------------------------------------------------------------------
def _job_folder(parent: Path, name: str, pid: int, host: str | None = None) -> Path:
    folder = parent / f"{jobs.JOB_FOLDER_PREFIX}{name}"
    folder.mkdir()
    (folder / OWNER_FILE).write_text(f"{pid} {host or socket.gethostname()}", encoding="utf-8")
    (folder / "input.nrrd").write_bytes(b"a copy of the patient's CT")
    return folder


def test_a_killed_jobs_folder_is_removed_on_windows_without_os_getuid(tmp_path, monkeypatch, ended_pid):
    stale = _job_folder(tmp_path, "stale", ended_pid)
    running = _job_folder(tmp_path, "running", os.getpid())
    elsewhere = _job_folder(tmp_path, "elsewhere", ended_pid, host="another-machine.example")
    unmarked = tmp_path / f"{jobs.JOB_FOLDER_PREFIX}starting"
    unmarked.mkdir()  # a job starting this moment, its marker not written yet

    # where there are user ids, another user's folder is kept
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    assert jobs.remove_stale_job_folders(tmp_path) == [] and stale.is_dir()

    monkeypatch.delattr(os, "getuid")  # Windows
    assert jobs.remove_stale_job_folders(tmp_path) == [str(stale)]
    assert not stale.exists()
    # every other guard holds: a running owner, another machine's job, a folder without the marker
    assert running.is_dir() and elsewhere.is_dir() and unmarked.is_dir()


# -- M8: a multi-configuration build tree -----------------------------------------------------------------------------
def _build_tree(tmp_path: Path, config: str, names: tuple[str, ...]) -> Path:
    """A Slicer build tree made by Visual Studio or Xcode: scripted modules in ``qt-scripted-modules``, scripted CLIs
    in ``cli-modules/<config>``; returns the scripted modules' folder."""
    lib = tmp_path / "lib" / "Slicer-5.8"
    (lib / "qt-scripted-modules").mkdir(parents=True)
    (lib / "cli-modules" / config).mkdir(parents=True)
    for name in names:
        (lib / "cli-modules" / config / f"{name}.py").write_text("", encoding="utf-8")
    return lib / "qt-scripted-modules"


@pytest.mark.parametrize("config", ["Release", "Debug", "RelWithDebInfo", "MinSizeRel"])
def test_the_cli_is_found_in_a_multi_config_build_tree(tmp_path, config):
    modules = _build_tree(tmp_path, config, ("CTDiffusionSRBatch",))
    found = jobs.find_cli_script(modules, "CTDiffusionSRBatch")
    assert found == modules.parent / "cli-modules" / config / "CTDiffusionSRBatch.py"

    # an install (no configuration folder) and the source tree are looked in first, as before
    installed = modules.parent / "cli-modules" / "CTDiffusionSRBatch.py"
    installed.write_text("", encoding="utf-8")
    assert jobs.find_cli_script(modules, "CTDiffusionSRBatch") == installed
    source = ROOT / "CTDiffusionSR"
    assert jobs.find_cli_script(source, "CTDiffusionSRBatch") == source / "CLI" / "CTDiffusionSRBatch.py"
    with pytest.raises(FileNotFoundError, match="DiffusionTrain.py was not found next to .*reinstall the extension"):
        jobs.find_cli_script(modules, "DiffusionTrain")


def test_the_xray_job_finds_its_cli_in_a_multi_config_build_tree(tmp_path, monkeypatch):
    pytest.importorskip("vtk", reason="the X-ray module's logic needs VTK")
    from XrayToCTLib.xray_logic import XrayJob

    modules = _build_tree(tmp_path, "Release", (XrayJob.script_name,))
    monkeypatch.setattr(XrayJob, "module_dir", lambda self: modules)
    job = XrayJob.__new__(XrayJob)  # only its command line is asked for
    assert job.argv(["radiograph.nrrd"])[1:] == [
        str(modules.parent / "cli-modules" / "Release" / f"{XrayJob.script_name}.py"), "radiograph.nrrd"
    ]
