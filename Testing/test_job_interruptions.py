"""A Slicer job interrupted in the ways a script or a crash interrupts it, on real MRML (slicer-core) with real worker
processes running the tiny test models.

What must hold: the result failing to load (memory running out) fails the job with one plain line and leaves no node;
a timeout says so; Ctrl-C, the end of the script and the scene being closed stop the worker and remove the job's
temporary folder (a full copy of the patient's CT); a folder left by a process that was killed is removed by the next
job started, never one of a process that runs; a temp folder that cannot be written is named, with what to do.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CTDiffusionSR") not in sys.path:
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))

from CTDiffusionSRLib import jobs, mrml_io, sr_logic  # noqa: E402
from CTDiffusionSRLib.process import JobState  # noqa: E402
from CTDiffusionSRLib.sr_logic import SRJob, SRSettings  # noqa: E402
from CTDiffusionSRLib.testing import phantom_ct  # noqa: E402

from DiffusionCore.errors import OutputError  # noqa: E402

FAST = {"factor": 4, "axis": "z", "device": "cpu", "tiny_test_predictor": True, "adapt_to_scan": False}
#: a job that runs for a minute unless stopped: the tiny predictor adapting to the scan for 60 s
SLOW = {**FAST, "adapt_to_scan": True, "adapt_seconds": 60.0}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture
def scene(scene):
    """conftest's scene, with the subject hierarchy Slicer always has."""
    mrml_io.subject_hierarchy(scene)
    return scene


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _job_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("ctdiffusion-*"))


def _until_adapting(job, timeout: float = 120) -> None:
    """Poll until the worker is at work (adapting the predictor), as the module's timer would."""
    deadline = time.monotonic() + timeout
    while job.poll() == JobState.RUNNING and "adapting" not in (job.runner.comment or ""):
        assert time.monotonic() < deadline, "the worker did not start adapting"
        time.sleep(0.05)
    assert job.state == JobState.RUNNING, job.error


# -- the result cannot be loaded into the scene ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (MemoryError("Unable to allocate 1.2 GiB for an array"), "not enough memory to load the result into Slicer"),
        (ValueError("vtkImageData rejected the array\nsecond line"), "the result could not be loaded into the scene "
                                                                      "(ValueError: vtkImageData rejected the array)"),
    ],
)  # fmt: skip
def test_a_result_that_cannot_be_loaded_fails_the_job_and_leaves_no_node(scene, job_tmp, monkeypatch, raised, said):
    """Memory runs out (or anything else goes wrong) once the new node exists but before it holds the result: the job
    fails with one plain line, the half-made "(synthetic)" node goes, and polling again changes nothing (the module's
    timer said "Done" and its result display failed with IndexError)."""
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")

    def node_then_failure(scene_, volume, name, **kwargs):  # what add_volume_node does when filling the node fails
        scene_.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene_.GenerateUniqueName(name))
        raise raised

    monkeypatch.setattr(sr_logic, "add_volume_node", node_then_failure)
    before = _node_ids(scene)
    job = SRJob(scene, node, SRSettings(**FAST))
    assert job.run(timeout=240) == JobState.FAILED
    assert job.error.startswith(said) and "nothing was imported" in job.error, job.error
    assert "\n" not in job.error and "Traceback" not in job.error
    assert job.result_nodes == [] and _node_ids(scene) == before
    assert job.poll() == JobState.FAILED
    assert _job_folders(job_tmp) == []


def test_a_finished_result_that_memory_keeps_from_the_scene_is_kept_on_disk(scene, job_tmp, monkeypatch):
    """Slicer's memory filled up while a long job ran: the result, computed for minutes, was refused when read back
    ("not enough memory: reading output.nrrd ... needs about 4.7 GiB") and deleted with the job's folder. Now it is
    kept in the temp folder, under the result's name, and the error says where."""
    from DiffusionCore.errors import ResourceError
    from DiffusionCore.volume import read_volume

    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT/01")

    def no_memory(path):
        raise ResourceError(f"not enough memory: reading {path} (24x32x32 voxels) needs about 4.7 GiB")

    monkeypatch.setattr(sr_logic, "read_volume_file", no_memory)
    job = SRJob(scene, node, SRSettings(**FAST))
    assert job.run(timeout=240) == JobState.FAILED
    kept = sorted(job_tmp.glob("*/CT_01 SR x4 (synthetic) *.nrrd"))  # "/" is no file name character; in a private folder
    assert len(kept) == 1 and read_volume(kept[0], check=False).shape == (24, 32, 32)
    assert job.error == (f"not enough memory: reading the result of 'CT/01' (24x32x32 voxels) needs about 4.7 GiB. "
                         f"The result was kept in {kept[0]}: load it (File > Add Data) when memory allows, or delete "
                         "it.")  # fmt: skip
    assert _job_folders(job_tmp) == [] and _node_ids(scene) >= {node.GetID()}


def test_an_update_that_raises_is_said_once_and_the_job_goes_on(scene, job_tmp, monkeypatch):
    """What the module's timer calls while the job runs raises: the exception does not escape the timer; the job
    goes on to its result, with a notice and a warning line in the log."""
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    monkeypatch.setattr(SRJob, "update", lambda self: 1 / 0)
    lines = []
    job = SRJob(scene, node, SRSettings(**FAST), on_line=lines.append).start()
    while job.poll() == JobState.RUNNING:  # the module's timer
        time.sleep(0.05)
    assert job.state == JobState.COMPLETED, job.error
    notice = "Showing the job's progress in the scene failed (ZeroDivisionError: division by zero); the job goes on."
    assert job.notices.count(notice) == 1 and lines.count("warning: " + notice) == 1
    assert len(job.result_nodes) == 1 and scene.IsNodePresent(job.result_nodes[0])


# -- timeout, Ctrl-C, the end of the script --------------------------------------------------------------------
def test_a_timeout_says_it_ran_past_the_timeout(scene, job_tmp):
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    before = _node_ids(scene)
    job = SRJob(scene, node, SRSettings(**SLOW))
    with pytest.raises(RuntimeError, match=r"^the job ran past the timeout of 3 s and was stopped; nothing was "):
        job.run_for_result(timeout=3, what="super-resolution")
    assert job.state == JobState.CANCELLED and not _alive(job.runner.pid)
    assert _job_folders(job_tmp) == [] and _node_ids(scene) == before


def test_ctrl_c_while_waiting_stops_the_worker_and_removes_the_folder(scene, job_tmp):
    """Ctrl-C in a script that waits for a job (the logic's process(): run_for_result): the KeyboardInterrupt goes
    on, after the worker was stopped and the folder removed (the worker, in its own session, gets no SIGINT)."""
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    before = _node_ids(scene)
    job = SRJob(scene, node, SRSettings(**SLOW))

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        signal.setitimer(signal.ITIMER_REAL, 8.0)  # Python's SIGINT handler raises KeyboardInterrupt the same way
        with pytest.raises(KeyboardInterrupt):
            job.run_for_result(timeout=120)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert job.state == JobState.CANCELLED and job.error.startswith("interrupted (Ctrl-C) while the job ran")
    assert not _alive(job.runner.pid)
    assert _job_folders(job_tmp) == [] and _node_ids(scene) == before


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {module_dir!r})
    import slicer
    from CTDiffusionSRLib import mrml_io
    from CTDiffusionSRLib.process import JobState
    from CTDiffusionSRLib.sr_logic import SRJob, SRSettings
    from CTDiffusionSRLib.testing import phantom_ct

    scene = slicer.vtkMRMLScene()
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    job = SRJob(scene, node, SRSettings(**{slow!r})).start()
    while job.poll() == JobState.RUNNING and "adapting" not in (job.runner.comment or ""):
        time.sleep(0.05)
    print(job.runner.pid, job.tempdir, flush=True)
    if sys.argv[1] == "kill":  # Slicer crashes, or is killed
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(0)  # a script that started a job and ended (Slicer --python-script, Slicer quitting)
    """
)


def _start_job_in_a_child(tmp_path: Path, folder: Path, how: str) -> tuple[int, int, Path]:
    """Run a script that starts a job with ``folder`` as its temp folder, then ends ``how``: (its exit code, the
    worker's pid, the job's folder)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(module_dir=str(ROOT / "CTDiffusionSR"), slow=SLOW), encoding="utf-8")
    child = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=240,
                           env={**ENV, "TMPDIR": str(folder)})  # fmt: skip
    assert child.stdout.strip(), child.stderr
    worker, tempdir = child.stdout.split()
    return child.returncode, int(worker), Path(tempdir)


def test_a_script_that_ends_while_its_job_runs_stops_it_and_removes_its_folder(tmp_path, job_tmp):
    code, worker, folder = _start_job_in_a_child(tmp_path, job_tmp, "exit")
    assert code == 0 and folder.parent == job_tmp
    assert not _alive(worker), "the worker must be stopped when the Python that started it exits"
    assert not folder.exists() and _job_folders(job_tmp) == []


def test_a_folder_left_by_a_killed_process_is_removed_when_the_next_job_starts(scene, tmp_path, job_tmp):
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    running = SRJob(scene, node, SRSettings(**SLOW)).start()  # a job of this process, running throughout
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    worker = None
    try:
        code, worker, stale = _start_job_in_a_child(tmp_path, job_tmp, "kill")
        assert code == -signal.SIGKILL and stale.is_dir()  # nothing could clean up
        # kept: a folder without the owner marker (an older version's, or one being made now), and a folder of a
        # process that runs (another Slicer: here a sleeping child)
        unmarked = job_tmp / "ctdiffusion-unmarked"
        unmarked.mkdir()
        (unmarked / "input.nrrd").write_bytes(b"x")
        alive = job_tmp / "ctdiffusion-alive"
        alive.mkdir()
        (alive / jobs.OWNER_FILE).write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        finished = SRJob(scene, node, SRSettings(**FAST))
        assert finished.run(timeout=240) == JobState.COMPLETED, finished.error
        assert not stale.exists(), "the killed process's folder must go when a job starts"
        assert unmarked.is_dir() and alive.is_dir() and Path(running.tempdir).is_dir()
    finally:
        running.cancel()
        sleeper.kill()
        sleeper.wait()
        if worker is not None and _alive(worker):  # the orphaned worker of the killed process (its own group)
            os.killpg(worker, signal.SIGKILL)
    assert _job_folders(job_tmp) == ["ctdiffusion-alive", "ctdiffusion-unmarked"]


def test_the_worker_of_a_killed_process_stops_by_itself(tmp_path, job_tmp):
    """Slicer killed or crashed: its job's worker, in a process group of its own, must not compute on to the end. A
    worker that prints progress also stops at its next line (the pipe is gone); a silent one (a long step, a training
    run between its log lines) stops through the watch of the next test."""
    worker = None
    try:
        code, worker, _folder = _start_job_in_a_child(tmp_path, job_tmp, "kill")
        assert code == -signal.SIGKILL
        deadline = time.monotonic() + 60
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker must stop once the process that started it has ended"
    finally:
        if worker is not None and _alive(worker):
            os.killpg(worker, signal.SIGKILL)


def test_a_command_stops_when_the_application_named_as_its_parent_ends(tmp_path):
    """What a job's command does (:func:`DiffusionCore.cli.common.sigterm_cancels`) when the process its
    environment names (jobs.job_environment) ends: it stops as on SIGTERM, with exit code 130 and a line saying why."""
    from DiffusionCore.cli.common import PARENT_PID_VARIABLE

    assert jobs.job_environment()[PARENT_PID_VARIABLE] == str(os.getpid())
    script = tmp_path / "command.py"
    script.write_text(textwrap.dedent(
        """
        import sys, threading, time
        from DiffusionCore.cli.common import run_guarded, sigterm_cancels

        def work():
            with sigterm_cancels(threading.Event(), "the command"):
                print("working", flush=True)
                time.sleep(120)
            return 0

        sys.exit(run_guarded(work))
        """
    ), encoding="utf-8")  # fmt: skip
    application = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        command = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env={**ENV, PARENT_PID_VARIABLE: str(application.pid)})  # fmt: skip
        assert command.stdout.readline().strip() == "working"
        time.sleep(1.5)
        assert command.poll() is None, "the command must run on while the application runs"
        application.kill()
        application.wait()
        _out, err = command.communicate(timeout=60)
    finally:
        application.kill()
        application.wait()
    assert command.returncode == 130
    assert f"the command was stopped: the application that started it (process {application.pid}) has ended" in err


def test_telling_whether_a_process_runs_never_signals_it_on_windows(monkeypatch):
    """On Windows, os.kill(pid, 0) terminates the process: asking whether the owner of a stale file runs must not."""
    from DiffusionCore import files

    def kill(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig}) called")

    monkeypatch.setattr(files.os, "kill", kill)
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    assert files.pid_running(os.getppid()) is True  # not told here (no Windows API): kept, as the docstring says


# -- the scene is closed -------------------------------------------------------------------------------------
def test_closing_the_scene_stops_the_job(scene, job_tmp):
    """A script's job (no module panel to cancel it) whose scene is closed (File > Close Scene) must not put the
    previous patient's result into the next scene."""
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    observers = scene.HasObserver(scene.StartCloseEvent)
    job = SRJob(scene, node, SRSettings(**SLOW)).start()
    _until_adapting(job)
    scene.Clear(0)
    assert job.state == JobState.CANCELLED and job.error.startswith("the scene was closed while the job ran")
    assert not _alive(job.runner.pid) and _job_folders(job_tmp) == []
    assert job.wait(10) == JobState.CANCELLED
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert scene.HasObserver(scene.StartCloseEvent) == observers, "the job stops observing its scene when it ends"


def test_a_completed_job_stops_observing_its_scene(scene, job_tmp):
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    observers = scene.HasObserver(scene.StartCloseEvent)
    job = SRJob(scene, node, SRSettings(**FAST)).start()
    assert scene.HasObserver(scene.StartCloseEvent)
    assert job.wait(240) == JobState.COMPLETED, job.error
    assert scene.HasObserver(scene.StartCloseEvent) == observers


# -- the temp folder cannot be written -----------------------------------------------------------------------
def test_a_read_only_temp_folder_is_named_with_what_to_do(scene, job_tmp, monkeypatch):
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(job_tmp)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(OutputError) as raised:
        SRJob(scene, node, SRSettings(**FAST)).start()
    message = str(raised.value)
    assert message.startswith(f"cannot create the job's temporary files in {job_tmp}: Read-only file system. ")
    assert "TMPDIR" in message and "\n" not in message and _job_folders(job_tmp) == []


def test_a_job_whose_files_will_not_fit_in_the_temp_folder_is_refused_before_any_work(scene, small_disk, monkeypatch):
    """The input fitted in a small temp disk, the whole computation ran, and writing the result failed ("the disk
    ... is full"): minutes lost, for a size known before the start. Now the job is refused at once, with both sizes."""
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")  # 6x32x32: 24 KiB in, 96 KiB out at x4
    before = _node_ids(scene)
    with pytest.raises(OutputError, match=rf"the temp folder {re.escape(str(small_disk))} has .* free; this job needs "
                                          r"about 120\.0 KiB there for the input and the result\. Free space there, "
                                          r"or use another folder: set the TMPDIR environment variable"):
        SRJob(scene, node, SRSettings(**FAST)).start()
    assert os.listdir(small_disk) == [] and _node_ids(scene) == before


def test_a_second_job_into_the_output_of_a_running_one_is_refused(scene, job_tmp):
    """Two jobs writing into the same chosen output: the one that finished last silently replaced the other's
    result, and both reported success (a script; the panel runs one job at a time)."""
    first_input = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    second_input = mrml_io.add_volume_node(scene, phantom_ct(seed=3), "CT_02")
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my output")
    job = SRJob(scene, first_input, SRSettings(**SLOW), output_node=output).start()
    try:
        with pytest.raises(OutputError, match="'my output' is the output of a job that is still running"):
            SRJob(scene, second_input, SRSettings(**FAST), output_node=output)
    finally:
        job.cancel()
    assert SRJob(scene, second_input, SRSettings(**FAST), output_node=output).run(timeout=240) == JobState.COMPLETED


def test_an_int16_ct_is_handed_over_as_int16_with_the_same_result(scene, job_tmp):
    """A CT loaded from DICOM is int16; it was handed over as float32: twice the bytes to write, keep in the temp
    folder and read (315 MB instead of 157 MB for 512x512x300)."""
    import SimpleITK as sitk

    vol = phantom_ct()
    vol.array[:] = np.round(vol.array)
    as_int16 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT int16")
    mrml_io.set_node_from_volume(as_int16, vol, dtype=np.int16)
    as_float = mrml_io.add_volume_node(scene, vol, "CT float32")
    job = SRJob(scene, as_int16, SRSettings(**SLOW)).start()
    try:
        handed = sitk.ReadImage(str(Path(job.tempdir) / "input.nrrd"))
        assert handed.GetPixelID() == sitk.sitkInt16
    finally:
        job.cancel()
    results = [mrml_io.array_from_node(SRJob(scene, node, SRSettings(**FAST)).run_for_result(240))
               for node in (as_int16, as_float)]  # fmt: skip
    np.testing.assert_array_equal(results[0], results[1])
