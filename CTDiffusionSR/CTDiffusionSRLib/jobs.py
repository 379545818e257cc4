"""Background jobs that run a scripted CLI on MRML nodes: export inputs, follow the process, import results.

A job owns a private temporary folder (``tempfile.mkdtemp``) for the image files it hands to the CLI and
removes it when it ends, however it ends. Result nodes are created only in :meth:`CLIJob.poll` /
:meth:`CLIJob.wait`, i.e. in the thread that calls them (the GUI thread in Slicer: MRML is not thread-safe),
and a cancelled or failed job removes any node it had created, so nothing half-made stays in the scene.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from DiffusionCore.errors import DiffusionCoreError

from .process import JobState, ProcessRunner, python_executable

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]
LineCallback = Callable[[str], None]


def find_cli_script(module_dir: str | os.PathLike, name: str) -> Path:
    """Path of a scripted CLI ``<name>.py`` in the source tree (``<module>/CLI``) or a Slicer install.

    Slicer installs scripted modules into ``lib/Slicer-X.Y/qt-scripted-modules`` and scripted CLIs into
    ``lib/Slicer-X.Y/cli-modules``; the source tree keeps them in the module's ``CLI`` folder.
    """
    base = Path(module_dir)
    for candidate in (base / "CLI" / f"{name}.py", base.parent / "cli-modules" / f"{name}.py"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the command-line module {name}.py was not found next to {base}; reinstall the extension.")


def job_environment() -> dict[str, str]:
    """Environment additions for a job: DiffusionCore importable in the child Python.

    Inside Slicer, DiffusionCore sits next to the scripted modules, a folder that is on Slicer's
    ``sys.path`` but not necessarily on the ``PYTHONPATH`` a child ``PythonSlicer`` starts with.
    """
    import DiffusionCore

    root = str(Path(DiffusionCore.__file__).resolve().parent.parent)
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"PYTHONPATH": os.pathsep.join(paths)}


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
        scene: the MRML scene results go into.
        on_progress: ``(fraction, message)`` from the CLI's ``<filter-progress>``/``<filter-comment>``;
            called from a reader thread: only store values there, update widgets from a timer.
        on_line: every log line, also from a reader thread.
    """

    script_name = ""

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

    def update(self) -> None:
        """Work to do in the polling thread while the job runs (e.g. show a stage preview)."""

    # -- lifecycle ---------------------------------------------------------------------------------
    def argv(self, args: Sequence[str]) -> list[str]:
        script = find_cli_script(self.module_dir(), self.script_name)
        return [python_executable(), str(script), *args]

    def start(self) -> CLIJob:
        self.tempdir = tempfile.mkdtemp(prefix="ctdiffusion-")
        try:
            args = self.prepare(Path(self.tempdir))
            self.runner = ProcessRunner(
                self.argv(args), on_progress=self.on_progress, on_line=self._on_line, env=job_environment()
            )
            self.runner.start()
        except BaseException:
            self._cleanup()
            raise
        self.state = JobState.RUNNING
        return self

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
        if state == JobState.RUNNING:
            return state
        self._finish(state)
        return self.state

    def wait(self, timeout: float | None = None) -> JobState:
        """Block until the job ends; a job still running after ``timeout`` seconds is cancelled."""
        if self.runner is not None and self.state == JobState.RUNNING:
            self.runner.wait(timeout)
        return self.poll()

    def run(self, timeout: float | None = None) -> JobState:
        """Start and wait (scripting and tests)."""
        return self.start().wait(timeout)

    def run_for_result(self, timeout: float | None = None, what: str = "job"):
        """Start, wait and return the first result node (the logics' ``process``: scripts, self-tests).

        Raises:
            RuntimeError: the job did not complete (its error line is the message).
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

    def _finish(self, state: JobState) -> None:
        result = self.runner.result()
        self.log = result.log
        self.state = state
        try:
            if state == JobState.COMPLETED:
                self.return_values = read_return_parameters(Path(self.tempdir) / "return.txt")
                try:
                    self.result_nodes = self.import_results(Path(self.tempdir))
                except DiffusionCoreError as exc:
                    self.state, self.error = JobState.FAILED, str(exc)
            elif state == JobState.FAILED:
                self.error = result.error or "the job failed without a message; see the log."
            else:
                self.error = "cancelled"
            if self.state != JobState.COMPLETED:
                self._remove_created_nodes()
        finally:
            self._cleanup()
        self.error = self.named(self.error)
        self.log = [self.named(line) for line in self.log]
        logger.info("job %s ended: %s %s", self.script_name, self.state.value, self.error)

    def _remove_created_nodes(self) -> None:
        for node in self.created_nodes:
            if node is not None and self.scene.IsNodePresent(node):
                remove_node_and_helpers(self.scene, node)
        self.created_nodes = []
        self.result_nodes = []

    def _cleanup(self) -> None:
        if self.tempdir and os.path.isdir(self.tempdir):
            shutil.rmtree(self.tempdir, ignore_errors=True)
