"""Background jobs that run a scripted CLI on MRML nodes: export inputs, follow the process, import results.

A job owns a private temporary folder (``tempfile.mkdtemp``, ``ctdiffusion-*``) for the image files it hands to
the CLI and removes it when it ends, however it ends: completed, failed, cancelled, interrupted (Ctrl-C in
:meth:`CLIJob.wait`), stopped because its scene was closed, or at the exit of the Python that started it. A folder
that outlives its process all the same (the process was killed) holds a marker naming that process, and the next
job started removes it (:func:`remove_stale_job_folders`). Result nodes are created only in :meth:`CLIJob.poll` /
:meth:`CLIJob.wait`, i.e. in the thread that calls them (the GUI thread in Slicer: MRML is not thread-safe),
and a cancelled or failed job removes any node it had created, so nothing half-made stays in the scene.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from DiffusionCore.cli.missing import OWNER_FILE, TORCH_CACHE_PREFIX, mark_owner
from DiffusionCore.errors import DiffusionCoreError, OutputError, ResourceError
from DiffusionCore.files import format_bytes, pid_running

from .process import JobState, ProcessRunner, python_executable

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]
LineCallback = Callable[[str], None]

#: How a job's temporary folder is named (``tempfile.mkdtemp(prefix=...)``).
JOB_FOLDER_PREFIX = "ctdiffusion-"
#: How the private folder is named that keeps a finished result memory kept from the scene
#: (:meth:`CLIJob._keep_result_files`): in the temp folder with the jobs' folders, but not ``ctdiffusion-*``, so that
#: :func:`remove_stale_job_folders` never takes it for a job's.
KEPT_RESULT_PREFIX = "ctdiffusion_result_"
#: The file in a job's temporary folder that names the process owning it, ``PID HOST``, is ``OWNER_FILE``; the
#: compile cache folder a job's command makes (``TORCH_CACHE_PREFIX``, DiffusionCore.cli.missing.own_torch_cache)
#: has it too, naming the command's process.
STALE_FOLDER_PREFIXES = (JOB_FOLDER_PREFIX, TORCH_CACHE_PREFIX)
#: What a cancelled job's error says when nothing more is known (the user pressed Cancel).
CANCELLED = "cancelled"


def remove_stale_job_folders(parent: str | os.PathLike | None = None) -> list[str]:
    """Delete the temporary folders of jobs whose process is gone (killed, or ended without cleaning up).

    Only a folder named ``ctdiffusion-*`` (a job's) or ``diffusioncore-torch-*`` (the compile cache of a job's
    command, left when it was killed) in ``parent`` (the temp folder), owned by this user, holding the
    :data:`OWNER_FILE` of a process on this machine that no longer runs. A folder without the marker (written by
    an older version, or a job starting this moment) or of a process that runs is kept.

    Returns:
        The folders removed.
    """
    folder = Path(parent if parent is not None else tempfile.gettempdir())
    removed = []
    try:
        candidates = [path for prefix in STALE_FOLDER_PREFIXES for path in folder.glob(f"{prefix}*")]
    except OSError:
        return removed
    host = socket.gethostname()
    # Windows has no user ids (os.getuid): its temp folder (%TEMP%) is the user's own, and the owner file's process
    # and host still decide
    uid = os.getuid() if hasattr(os, "getuid") else None
    for candidate in candidates:
        try:
            if candidate.is_symlink() or not candidate.is_dir():
                continue
            if uid is not None and candidate.stat().st_uid != uid:
                continue
            owner = (candidate / OWNER_FILE).read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError):
            continue
        if len(owner) != 2 or not owner[0].isdigit() or owner[1] != host or pid_running(int(owner[0])):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        if not candidate.exists():
            removed.append(str(candidate))
    if removed:
        logger.info("removed %d temporary folder(s) that jobs of ended processes left: %s", len(removed),
                    ", ".join(removed))  # fmt: skip
    return removed


#: How to give jobs another temporary folder (the end of the messages about the temp folder).
OTHER_TEMP_FOLDER = (
    "set the TMPDIR environment variable (TEMP on Windows) to a writable folder with room before starting Slicer, or "
    "set tempfile.tempdir in its Python console."
)


def temp_folder_problem(folder: str, exc: OSError) -> OutputError:
    """The error of a job whose temporary folder cannot be made or written in ``folder`` (the temp folder): the
    system's reason (read-only file system, no space left on device, permission denied) and what to do."""
    return OutputError(
        f"cannot create the job's temporary files in {folder}: {exc.strerror or exc}. Free space there or make it "
        f"writable, or use another folder: {OTHER_TEMP_FOLDER}"
    )


def check_temp_room(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Refuse a job whose files (``what``: e.g. "the input and the result") will not fit on the disk of its
    temporary ``folder``, before any work: a result refused by a full disk after minutes of computing is lost.

    Raises:
        OutputError: naming the free space, the space needed and what to do.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free >= needed_bytes:
        return
    raise OutputError(
        f"the temp folder {Path(folder).parent} has {format_bytes(free)} free; this job needs about "
        f"{format_bytes(needed_bytes)} there for {what}. Free space there, or use another folder: {OTHER_TEMP_FOLDER}"
    )


def import_failure_message(exc: BaseException) -> str:
    """The error of a job whose result could not be imported into the scene (``exc`` is not a
    DiffusionCoreError, whose own text says it): one line, no traceback (that goes to the log)."""
    if isinstance(exc, MemoryError):
        return (
            "not enough memory to load the result into Slicer; nothing was imported. Free memory (close volumes you "
            "no longer need, or other programs) and Apply again, or ask for a smaller result (e.g. crop the input)."
        )
    return (
        f"the result could not be loaded into the scene ({exception_text(exc)}); nothing was imported. The log "
        "has the details."
    )


def with_sentence(text: str, sentence: str) -> str:
    """``text`` followed by ``sentence`` (when there is one), ``text`` ending with a full stop."""
    if not sentence:
        return text
    text = text.rstrip()
    return f"{text}{'' if text.endswith('.') else '.'} {sentence}"


def exception_text(exc: BaseException) -> str:
    """``"ValueError: its first line"``: an unexpected exception named in a message, without its traceback."""
    detail = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


#: Jobs started in this process and not yet ended (weakly: an ended job is not kept alive).
_RUNNING_JOBS: weakref.WeakSet = weakref.WeakSet()


def running_jobs() -> list:
    """The jobs started in this process that have not ended."""
    return list(_RUNNING_JOBS)


@atexit.register
def _stop_running_jobs() -> None:
    """Python exits (a script ends, Slicer quits) while jobs run: stop their processes, remove their folders."""
    for job in list(_RUNNING_JOBS):
        job._stop_at_exit()


#: The build configurations of a multi-configuration build tree (Visual Studio, Xcode), whose scripted CLIs Slicer's
#: ``SlicerMacroBuildScriptedCLI`` puts in ``cli-modules/<CONFIG>``: the usual one first.
MULTI_CONFIG_BUILD_TYPES = ("Release", "RelWithDebInfo", "Debug", "MinSizeRel")


def find_cli_script(module_dir: str | os.PathLike, name: str) -> Path:
    """Path of a scripted CLI ``<name>.py`` in the source tree (``<module>/CLI``), a Slicer install or build tree.

    Slicer installs scripted modules into ``lib/Slicer-X.Y/qt-scripted-modules`` and scripted CLIs into
    ``lib/Slicer-X.Y/cli-modules``; the source tree keeps them in the module's ``CLI`` folder. A build tree made by
    a multi-configuration generator (Visual Studio, Xcode) has the CLIs in ``cli-modules/<CONFIG>`` (e.g.
    ``cli-modules/Release``), while the scripted modules stay where an install has them.
    """
    base = Path(module_dir)
    installed = base.parent / "cli-modules"
    candidates = [base / "CLI" / f"{name}.py", installed / f"{name}.py"]
    candidates += [installed / config / f"{name}.py" for config in MULTI_CONFIG_BUILD_TYPES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the command-line module {name}.py was not found next to {base}; reinstall the extension.")


def job_environment() -> dict[str, str]:
    """Environment additions for a job: DiffusionCore importable in the child Python, this process named as
    the one whose end stops the job's command (a killed Slicer leaves no worker computing on), and the child's
    stdout and stderr written as UTF-8, the encoding :class:`~CTDiffusionSRLib.process.ProcessRunner` reads them
    in (a piped Python on Windows would write cp1252: "José" would reach the module as "Jos\ufffd").

    Inside Slicer, DiffusionCore sits next to the scripted modules, a folder that is on Slicer's
    ``sys.path`` but not necessarily on the ``PYTHONPATH`` a child ``PythonSlicer`` starts with.
    """
    import DiffusionCore
    from DiffusionCore.cli.common import PARENT_PID_VARIABLE

    root = str(Path(DiffusionCore.__file__).resolve().parent.parent)
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"PYTHONPATH": os.pathsep.join(paths), PARENT_PID_VARIABLE: str(os.getpid()), "PYTHONIOENCODING": "utf-8"}


def read_return_parameters(path: str | os.PathLike) -> dict[str, str]:
    """Parse a Slicer return-parameter file (``name = value`` lines)."""
    values: dict[str, str] = {}
    p = Path(path)
    if not p.is_file():
        return values
    for line in p.read_text(encoding="utf-8").splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def remove_node_and_helpers(scene, node) -> None:
    """Remove a node with its display and storage nodes and its subject hierarchy item.

    (Slicer's application logic removes a volume's display nodes with it; a bare scene does not.)
    """
    helpers = []
    if node.IsA("vtkMRMLDisplayableNode"):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    sh = scene.GetSubjectHierarchyNode()
    if sh is not None:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.RemoveItem(item, False, False)
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and scene.IsNodePresent(helper):
            scene.RemoveNode(helper)


class CLIJob:
    """One run of a scripted CLI for the modules. Subclasses write inputs and import outputs.

    Args:
        scene: the MRML scene results go into. Closing it (``StartCloseEvent``: File > Close Scene, ``Clear``)
            stops a running job (:attr:`stop_when_scene_closes`): its result belongs to the closed scene.
        on_progress: ``(fraction, message)`` from the CLI's ``<filter-progress>``/``<filter-comment>``;
            called from a reader thread: only store values there, update widgets from a timer.
        on_line: every log line, also from a reader thread.
    """

    script_name = ""
    #: whether closing the scene stops the job (a job whose results belong to the scene's patient)
    stop_when_scene_closes = True

    def __init__(self, scene, *, on_progress: ProgressCallback | None = None, on_line: LineCallback | None = None):
        self.scene = scene
        self.on_progress = on_progress
        self.on_line = on_line
        self.tempdir: str | None = None
        self.runner: ProcessRunner | None = None
        self.state: JobState | None = None
        self.error = ""
        self.log: list[str] = []
        self.created_nodes: list = []
        self.result_nodes: list = []
        self.return_values: dict[str, str] = {}
        #: what the user should know about a completed job (e.g. a chosen output deleted while it ran)
        self.notices: list[str] = []
        #: the files the job hands its input nodes over in: (path, the node's role, how the log names it); see named()
        self.handed_over: list[tuple[str, str, str]] = []
        self._cancel_reason = CANCELLED  # what the error says when the job is cancelled
        self._scene_observer: int | None = None
        self._folder_finalizer: weakref.finalize | None = None

    # -- to override -------------------------------------------------------------------------------
    def module_dir(self) -> Path:
        return Path(__file__).resolve().parent.parent

    def prepare(self, tempdir: Path) -> list[str]:
        """Write the input files into ``tempdir``; return the CLI's arguments (after the script)."""
        raise RuntimeError("a CLIJob subclass must define prepare()")

    def import_results(self, tempdir: Path) -> list:
        """Create or update result nodes from the files in ``tempdir`` (job completed)."""
        return []

    def handle_line(self, line: str) -> None:
        """Extra per-line parsing (reader thread)."""

    def kept_nodes(self) -> list:
        """The nodes a job that did not complete leaves in the scene as results of their own (none by default: a
        cancelled or failed job removes what it made; an X-ray to CT job keeps the stages it showed)."""
        return []

    def ended(self) -> None:
        """Work to do once the job has ended, however it ended (its state and error are set; the nodes of a job that
        did not complete are removed), e.g. say what a cancelled job kept."""

    def update(self) -> None:
        """Work to do in the polling thread while the job runs (e.g. show a stage preview)."""

    # -- lifecycle ---------------------------------------------------------------------------------
    def argv(self, args: Sequence[str]) -> list[str]:
        script = find_cli_script(self.module_dir(), self.script_name)
        return [python_executable(), str(script), *args]

    def start(self) -> CLIJob:
        """Hand the inputs over in a new temporary folder and start the CLI's process.

        Raises:
            OutputError: the temporary folder cannot be made or written (read-only or full temp disk).
            DiffusionCoreError: the inputs cannot be handed over (:meth:`prepare`).
        """
        remove_stale_job_folders()
        self._make_folder()
        try:
            try:
                args = self.prepare(Path(self.tempdir))
            except DiffusionCoreError:
                raise
            except OSError as exc:  # writing the hand-off files (a DiffusionCore writer says why itself)
                raise temp_folder_problem(str(Path(self.tempdir).parent), exc) from exc
            self.runner = ProcessRunner(
                self.argv(args), on_progress=self.on_progress, on_line=self._on_line, env=job_environment()
            )
            self.runner.start()
        except BaseException:
            self._cleanup()
            raise
        self.state = JobState.RUNNING
        _RUNNING_JOBS.add(self)
        self._observe_scene()
        return self

    def _make_folder(self) -> None:
        """The private temporary folder, with the :data:`OWNER_FILE` that lets a later job remove it should this
        process die first; removed when this job is garbage-collected unfinished or Python exits."""
        folder = tempfile.gettempdir()
        try:
            self.tempdir = tempfile.mkdtemp(prefix=JOB_FOLDER_PREFIX, dir=folder)
        except OSError as exc:
            raise temp_folder_problem(folder, exc) from exc
        # at exit, _stop_running_jobs stops the process first and then removes the folder
        self._folder_finalizer = weakref.finalize(self, shutil.rmtree, self.tempdir, True)
        self._folder_finalizer.atexit = False
        try:
            mark_owner(self.tempdir)
        except OSError as exc:
            self._cleanup()
            raise temp_folder_problem(folder, exc) from exc

    def hand_over(self, path: str | Path, role: str, node) -> None:
        """Record that ``node`` (in the role ``role``, e.g. ``"the reference CT"``) goes to the command as ``path``, so
        that the log and the error name the node (:meth:`named`)."""
        self.handed_over.append((str(path), role, f"{role} '{node.GetName()}'"))

    def named(self, text: str) -> str:
        """``text`` (a log line, the error) with the hand-off files named by the nodes they hold: the command only
        knows ``/tmp/ctdiffusion-.../reference.nrrd``, the user chose "LIDC ref"."""
        for path, role, label in self.handed_over:
            file_name = Path(path).name if Path(path).suffix else ""  # a folder's bare name is a common word
            for said in (f"{role} {path}", path, file_name):
                if said:
                    text = text.replace(said, label)
        return text

    def _on_line(self, line: str) -> None:
        self.handle_line(line)  # what the command wrote, hand-off files included (e.g. stage records)
        if self.on_line:
            self.on_line(self.named(line))

    @property
    def progress(self) -> float:
        return self.runner.progress if self.runner else 0.0

    def poll(self) -> JobState:
        """Advance the job (call from the GUI thread, e.g. a QTimer); returns the state."""
        if self.state != JobState.RUNNING or self.runner is None:
            return self.state or JobState.FAILED
        state = self.runner.poll()
        try:
            self.update()
        except DiffusionCoreError as exc:
            self.error = str(exc)
        except Exception as exc:  # a bug or a resource showing a preview: the job goes on, its result comes at the end
            self._update_failed(exc)
        if state == JobState.RUNNING:
            return state
        self._finish(state)
        return self.state

    def _update_failed(self, exc: Exception) -> None:
        """:meth:`update` raised something unexpected: said once (a notice and a log line), and the job goes on."""
        notice = f"Showing the job's progress in the scene failed ({exception_text(exc)}); the job goes on."
        if notice in self.notices:
            logger.debug("update() failed again", exc_info=True)
            return
        logger.exception("update() of job %s failed", self.script_name)
        self.notices.append(notice)
        if self.on_line:
            self.on_line("warning: " + notice)

    def wait(self, timeout: float | None = None) -> JobState:
        """Block until the job ends; a job still running after ``timeout`` seconds is cancelled. Interrupted
        (Ctrl-C in a script: ``KeyboardInterrupt``), the job is cancelled before the exception goes on."""
        try:
            if self.runner is not None and self.state == JobState.RUNNING:
                self.runner.wait(timeout)
                if self.runner.timed_out:
                    self._cancel_reason = (
                        f"the job ran past the timeout of {timeout:g} s and was stopped; nothing was imported."
                    )
            return self.poll()
        except BaseException as exc:
            how = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"stopped by {exception_text(exc)}"
            self._stop(f"{how} while the job ran; nothing was imported.")
            raise

    def run(self, timeout: float | None = None) -> JobState:
        """Start and wait (scripting and tests)."""
        return self.start().wait(timeout)

    def run_for_result(self, timeout: float | None = None, what: str = "job"):
        """Start, wait and return the first result node (the logics' ``process``: scripts, self-tests).

        Raises:
            RuntimeError: the job did not complete (its error line is the message, e.g. that it ran past
                ``timeout``).
        """
        import time

        start = time.time()
        state = self.run(timeout)
        logger.info("%s %s in %.1f s", what, state.value, time.time() - start)
        if state != JobState.COMPLETED:
            raise RuntimeError(self.error)
        return self.result_nodes[0]

    def cancel(self) -> None:
        """Kill the CLI's process tree and drop anything this job created."""
        if self.runner is not None and self.state == JobState.RUNNING:
            self.runner.cancel()
            self._finish(JobState.CANCELLED)

    def _stop(self, reason: str) -> None:
        """Cancel a running job for ``reason`` (its error; through :meth:`cancel`, which subclasses extend)."""
        if self.state == JobState.RUNNING:
            self._cancel_reason = reason
            self.cancel()

    def _observe_scene(self) -> None:
        event = getattr(self.scene, "StartCloseEvent", None)
        if self.stop_when_scene_closes and event is not None:
            self._scene_observer = self.scene.AddObserver(event, self._on_scene_closing)

    def _forget_scene(self) -> None:
        if self._scene_observer is not None:
            self.scene.RemoveObserver(self._scene_observer)
            self._scene_observer = None

    def _on_scene_closing(self, caller=None, event=None) -> None:
        self._stop("the scene was closed while the job ran; the job was stopped and its result discarded.")

    def _stop_at_exit(self) -> None:
        """Python exits: stop the process and remove the folder (the scene is left alone: it is going away too)."""
        if self.state != JobState.RUNNING or self.runner is None:
            return
        logger.info("Python exits while job %s runs: stopping it", self.script_name)
        self.runner.cancel()
        self.state, self.error = JobState.CANCELLED, "Python exited while the job ran; it was stopped."
        self._cleanup()

    def _finish(self, state: JobState) -> None:
        _RUNNING_JOBS.discard(self)
        self._forget_scene()
        result = self.runner.result()
        self.log = result.log
        self.state = state
        try:
            if state == JobState.COMPLETED:
                self._import_results()
            elif state == JobState.FAILED:
                self.error = result.error or "the job failed without a message; see the log."
            else:
                self.error = self._cancel_reason
            if self.state != JobState.COMPLETED:
                self._remove_created_nodes()
            self.ended()
        except BaseException:  # interrupted while importing (Ctrl-C): nothing half-made stays
            self.state = JobState.CANCELLED
            self.error = "interrupted while the result was imported; nothing was imported."
            self._remove_created_nodes()
            raise
        finally:
            self._cleanup()
            self.error = self.named(self.error)
            self.log = [self.named(line) for line in self.log]
            logger.info("job %s ended: %s %s", self.script_name, self.state.value, self.error)

    def _import_results(self) -> None:
        """Read the return parameters and import the results; any failure fails the job with a one-line error (the
        traceback of one that is not a DiffusionCoreError goes to the log)."""
        before = self._scene_node_ids()
        try:
            self.return_values = read_return_parameters(Path(self.tempdir) / "return.txt")
            self.result_nodes = self.import_results(Path(self.tempdir))
        except DiffusionCoreError as exc:
            self.state, self.error = JobState.FAILED, with_sentence(str(exc), self._keep_result_files(exc))
            self.created_nodes += self._half_made_nodes(before)
        except Exception as exc:  # the traceback is for the log: a MemoryError's says nothing more
            level = logging.DEBUG if isinstance(exc, MemoryError) else logging.ERROR
            logger.log(level, "importing the results of job %s failed", self.script_name, exc_info=True)
            self.state, self.error = JobState.FAILED, with_sentence(import_failure_message(exc), self._keep_result_files(exc))
            self.created_nodes += self._half_made_nodes(before)

    def result_files(self, tempdir: Path) -> list[tuple[Path, str]]:
        """The finished result files in ``tempdir`` worth keeping when they cannot be loaded into the scene for want
        of memory, with the names they are kept under: ``(path, "CT_01 SR x4 (synthetic).nrrd")``."""
        return []

    def _keep_result_files(self, exc: BaseException) -> str:
        """A finished result that memory running out kept from the scene is not thrown away with the job's folder:
        its files move to a private folder (``tempfile.mkdtemp``, :data:`KEPT_RESULT_PREFIX`, readable by this user
        alone, as the job's own folder is) in the temp folder, each file readable by this user alone (a patient's
        image, under a name that may hold the patient's: the shared temp folder is open to every user of the
        machine), and the returned sentence (for the error) says where."""
        if not isinstance(exc, MemoryError | ResourceError):
            return ""
        results = self.result_files(Path(self.tempdir))
        if not results:
            return ""
        try:
            folder = Path(tempfile.mkdtemp(prefix=KEPT_RESULT_PREFIX, dir=tempfile.gettempdir()))  # mode 0700
        except OSError:
            return ""
        kept = []
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path, name in results:
            safe = re.sub(r'[\\/:*?"<>|]', "_", name)  # a node's name may hold what a file name cannot
            target = folder / f"{Path(safe).stem} {stamp}{Path(safe).suffix}"
            try:
                shutil.move(str(path), target)
            except OSError:
                continue
            with contextlib.suppress(OSError):  # a move across file systems copies the job file's mode; the folder
                os.chmod(target, 0o600)  # is this user's alone all the same
            kept.append(str(target))
        if not kept:
            shutil.rmtree(folder, ignore_errors=True)
            return ""
        return (f"The result was kept in {', '.join(kept)}: load it (File > Add Data) when memory allows, or delete "
                "it.")  # fmt: skip

    def _scene_node_ids(self) -> set[str]:
        if self.scene is None:
            return set()
        return {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}

    def _half_made_nodes(self, before: set[str]) -> list:
        """The data nodes (volumes, tables, ...) a failed import added that the job holds no reference to: left
        half-made by the call that failed (e.g. memory ran out filling a new volume node), so never handed back.
        A node the job holds (a result node, an X-ray stage preview) is the job's to keep or drop (created_nodes);
        display and storage nodes go with their data node."""
        held = set()
        for value in vars(self).values():
            for item in value if isinstance(value, list | tuple) else (value,):
                if callable(getattr(item, "GetID", None)) and callable(getattr(item, "GetScene", None)):
                    held.add(item.GetID())
        nodes = []
        for node_id in self._scene_node_ids() - before - held:
            node = self.scene.GetNodeByID(node_id)
            if node is not None and (node.IsA("vtkMRMLDisplayableNode") or node.IsA("vtkMRMLTableNode")):
                nodes.append(node)
        return nodes

    def _remove_created_nodes(self) -> None:
        for node in self.created_nodes:
            if node is not None and self.scene.IsNodePresent(node):
                remove_node_and_helpers(self.scene, node)
        self.created_nodes = []
        self.result_nodes = []

    def _cleanup(self) -> None:
        if self._folder_finalizer is not None:
            self._folder_finalizer.detach()  # (calling it would do nothing once Python is shutting down)
        if self.tempdir and os.path.isdir(self.tempdir):
            shutil.rmtree(self.tempdir, ignore_errors=True)
