"""The Qt glue both modules share (CTDiffusionSRLib/widgets.py: the job monitor and the training panel), run.

The Qt layer (PythonQt's ``qt`` module, the .ui widgets, Slicer's dialogs) exists only inside Slicer. Here a
small stand-in gives the PythonQt idioms that widgets.py uses (properties set as attributes, signals
connected by their C++ signature, a QTimer), and records the dialogs instead of showing them. Everything
below the widgets is real: MRML scenes from slicer-core, the SR job's background process with a tiny
model, the training job's process and its loss curve. What this checks is what a user sees in the panel:
the progress bar, the status line and the log through a job's life, and the training panel's buttons,
status and chart.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
import types
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CTDiffusionSR") not in sys.path:
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))

from conftest import write_fake_trainer  # noqa: E402
from CTDiffusionSRLib import mrml_io  # noqa: E402
from CTDiffusionSRLib.process import JobState  # noqa: E402
from CTDiffusionSRLib.sr_logic import SRJob, SRSettings  # noqa: E402
from CTDiffusionSRLib.testing import phantom_ct  # noqa: E402
from CTDiffusionSRLib.training import TrainingJob  # noqa: E402


# -- the stand-in for PythonQt and Slicer's dialogs ---------------------------------------------------------
class Widget:
    """A widget as PythonQt shows it: Qt properties are attributes; signals are connected by signature."""

    def __init__(self, **properties):
        self.enabled, self.visible, self.text, self.value, self.toolTip = True, True, "", 0, ""
        self.__dict__.update(properties)
        self.slots: dict[str, list] = {}

    def connect(self, signal: str, slot) -> None:
        self.slots.setdefault(signal, []).append(slot)

    def emit(self, signal: str, *args) -> None:
        """Call the connected slots; like PythonQt, a slot that takes fewer arguments than the signal carries gets
        the first ones (Slicer's ``connect("clicked(bool)", self.onApply)`` with ``def onApply(self)``)."""
        for slot in self.slots.get(signal, []):
            params = inspect.signature(slot).parameters.values()
            if any(p.kind is p.VAR_POSITIONAL for p in params):
                slot(*args)
            else:
                slot(*args[: sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)])

    def setRange(self, low: int, high: int) -> None:
        self.minimum, self.maximum = low, high

    def setMRMLScene(self, scene) -> None:
        self.scene = scene


class ComboBox(Widget):
    def __init__(self, **properties):
        super().__init__(**properties)
        self.items: list[str] = []
        self.currentIndex = -1

    @property
    def currentText(self) -> str:
        return self.items[self.currentIndex] if 0 <= self.currentIndex < len(self.items) else ""

    def clear(self) -> None:
        self.items, self.currentIndex = [], -1

    def addItems(self, items) -> None:
        self.items += list(items)
        if self.currentIndex < 0 and self.items:
            self.currentIndex = 0

    def setCurrentText(self, text: str) -> None:
        if text in self.items:
            self.currentIndex = self.items.index(text)
            self.emit("currentIndexChanged(int)", self.currentIndex)


class TextEdit(Widget):
    def __init__(self, **properties):
        super().__init__(**properties)
        self.lines: list[str] = []

    def appendPlainText(self, line: str) -> None:
        self.lines.append(line)

    def setPlainText(self, text: str) -> None:
        self.lines = text.splitlines()

    def toPlainText(self) -> str:
        return "\n".join(self.lines)


class QTimer(Widget):
    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class Dialogs:
    """Slicer's message boxes, recorded (slicer.util.errorDisplay and friends)."""

    def __init__(self):
        self.errors: list[str] = []
        self.charts: list = []

    def errorDisplay(self, text, **_kwargs) -> None:
        self.errors.append(str(text))

    def tryWithErrorDisplay(self, message="", waitCursor=False):
        dialogs = self

        class Guard:
            def __enter__(self):
                return self

            def __exit__(self, kind, exc, tb):
                if exc is not None and isinstance(exc, Exception):
                    dialogs.errors.append(f"{message}\n{exc}")
                    return True
                return False

        return Guard()


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(s)  # the colour tables the loss curve's series draw from
    slicer.mrmlScene = s
    yield s
    s.Clear(True)
    del color_logic


@pytest.fixture
def widgets(monkeypatch):
    """CTDiffusionSRLib.widgets imported against the stand-in; the dialogs it opened are ``widgets.dialogs``."""
    qt = types.ModuleType("qt")
    qt.QTimer = QTimer
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    monkeypatch.delitem(sys.modules, "CTDiffusionSRLib.widgets", raising=False)
    dialogs = Dialogs()
    monkeypatch.setattr(slicer.util, "errorDisplay", dialogs.errorDisplay)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", dialogs.tryWithErrorDisplay)
    plots = types.SimpleNamespace(logic=lambda: types.SimpleNamespace(ShowChartInLayout=dialogs.charts.append))
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(plots=plots), raising=False)
    module = importlib.import_module("CTDiffusionSRLib.widgets")
    monkeypatch.setattr(module, "ensureDependencies", lambda training=False: True)
    module.dialogs = dialogs
    yield module
    sys.modules.pop("CTDiffusionSRLib.widgets", None)


def _run_timer(timer: QTimer, until, seconds: float = 240.0) -> None:
    """Fire ``timer`` as Qt's event loop would, until ``until()`` or the deadline."""
    deadline = time.monotonic() + seconds
    while getattr(timer, "active", False) and not until() and time.monotonic() < deadline:
        timer.emit("timeout()")
        time.sleep(0.05)


# -- the job monitor ----------------------------------------------------------------------------------------
def _monitor(widgets):
    bar, status, log = Widget(), Widget(), TextEdit()
    finished = []
    monitor = widgets.JobMonitor(bar, status, log, lambda job, state: finished.append(state))
    return monitor, bar, status, log, finished


def test_the_job_monitor_follows_a_job_to_its_result_and_reports_a_deleted_output(widgets, scene):
    monitor, bar, status, log, finished = _monitor(widgets)
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my output")
    settings = SRSettings(factor=4, steps=2, device="cpu", tiny_test_model=True)
    monitor.start(SRJob(scene, node, settings, output_node=chosen, on_line=monitor.queueLine), "SR of CT_01")
    assert monitor.running and bar.visible and bar.value == 0 and status.text == "SR of CT_01: starting..."
    scene.RemoveNode(chosen)
    _run_timer(monitor.timer, lambda: bool(finished))
    assert finished == [JobState.COMPLETED] and not monitor.running and not monitor.timer.active
    assert bar.value == widgets.PROGRESS_STEPS
    assert status.text.startswith("Done in ") and "'my output' was deleted while the job ran" in status.text
    assert log.lines[0] == "--- SR of CT_01 ---" and len(log.lines) > 2  # the job's own lines reach the log
    assert [line for line in log.lines if "'my output' was deleted while the job ran; the result is in a new" in line]


def test_the_job_monitor_says_cancelled_and_what_failed(widgets, scene):
    monitor, bar, status, log, finished = _monitor(widgets)
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_02")
    monitor.start(SRJob(scene, node, SRSettings(factor=4, steps=200, device="cpu", tiny_test_model=True)), "SR")
    _run_timer(monitor.timer, lambda: bar.value > 0, seconds=120)
    assert monitor.running and 0 < bar.value < widgets.PROGRESS_STEPS, status.text  # the bar moves during the run
    monitor.cancel()
    assert finished == [JobState.CANCELLED] and status.text == "Cancelled; nothing was added to the scene."
    assert not monitor.running and not monitor.timer.active

    settings = SRSettings(factor=4, steps=2, device="cpu", weights=str(ROOT / "missing.safetensors"))
    monitor.start(SRJob(scene, node, settings, on_line=monitor.queueLine), "SR")
    _run_timer(monitor.timer, lambda: len(finished) == 2)
    assert finished[-1] == JobState.FAILED
    assert status.text.startswith("Failed: ") and "missing.safetensors" in status.text
    assert log.lines[-1].startswith("error: ") and "missing.safetensors" in log.lines[-1]


def test_a_job_that_cannot_start_leaves_the_monitor_idle(widgets, scene, monkeypatch):
    """A job whose start fails (here: its input cannot be written) is reported by the caller's dialog. The
    monitor kept it: the status line stayed at "starting...", the progress bar showed, and closing the scene
    later (which cancels the running job) then opened a second dialog, "The job failed: " with no reason."""
    monitor, bar, status, log, finished = _monitor(widgets)
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_03")
    job = SRJob(scene, node, SRSettings(factor=4, steps=2, device="cpu", tiny_test_model=True))

    def cannot_write(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job, "prepare", cannot_write)
    with pytest.raises(OSError):
        monitor.start(job, "SR of CT_03")
    assert not monitor.running and monitor.job is None and not getattr(monitor.timer, "active", False)
    assert not bar.visible and "No space left on device" in status.text
    monitor.cancel()  # what closing the scene does
    assert finished == []


# -- the training panel -------------------------------------------------------------------------------------
def _training_ui():
    names = ("trainingVolumesSelector", "trainingStartButton", "trainingStopButton", "trainingProgressBar",
             "trainingStatusLabel", "tensorBoardLabel")  # fmt: skip
    ui = types.SimpleNamespace(**{name: Widget() for name in names})
    ui.trainingPresetComboBox, ui.trainingFamilyComboBox = ComboBox(), ComboBox()
    ui.trainingConfigTextEdit = TextEdit()
    return ui


def test_the_training_panel_runs_stops_and_shows_each_runs_curve(widgets, scene, tmp_path, monkeypatch):
    """Start, the curve in the layout, Stop (a clean end), and a second run: its curve was never shown,
    because the panel remembered that it had shown the first run's."""
    write_fake_trainer(tmp_path)
    monkeypatch.setattr(TrainingJob, "module_dir", lambda self: tmp_path)
    (tmp_path / "data").mkdir()
    ui = _training_ui()
    ui.trainingFamilyComboBox.addItems(["throughplane", "sr", "xray"])
    params = types.SimpleNamespace(
        trainingOutputFolder="", trainingResume=False, trainingOverwrite=False, trainingUseSceneVolumes=False,
        trainingDataFolder=str(tmp_path / "data"), trainingFamily="throughplane", trainingDevice="cpu",
        trainingExtraArguments="",
    )  # fmt: skip
    panel = widgets.TrainingPanel(ui, lambda: params, "throughplane")
    panel.fillPresets()
    assert ui.trainingPresetComboBox.items == ["(defaults)", "default"]
    ui.trainingPresetComboBox.setCurrentText("default")
    preset = Path(panel._presets["default"]).read_text()
    assert ui.trainingConfigTextEdit.toPlainText() == preset.rstrip("\n")  # the preset's text, to edit

    panel.onStart()
    assert widgets.dialogs.errors == ["Choose an output folder for checkpoints and logs."]
    assert ui.trainingStartButton.enabled and panel.job is None

    for run in ("run1", "run2"):
        params.trainingOutputFolder = str(tmp_path / run)
        panel.onStart()
        assert panel.job is not None, widgets.dialogs.errors
        assert not ui.trainingStartButton.enabled and ui.trainingStopButton.enabled
        assert ui.trainingStatusLabel.text == "Training..." and str(tmp_path / run) in ui.tensorBoardLabel.text
        _run_timer(panel.timer, lambda: panel.job.curve is not None and len(panel.job.curve.values("train/loss")) >= 3)
        ui.trainingStopButton.emit("clicked(bool)", True)
        assert ui.trainingStatusLabel.text == "Stopping after a clean checkpoint..."
        _run_timer(panel.timer, lambda: panel.job is None, seconds=60)
        assert panel.job is None and ui.trainingStartButton.enabled and not ui.trainingStopButton.enabled
        assert ui.trainingStatusLabel.text == "Training ended; checkpoints are in the output folder."
        assert (tmp_path / run / "model.safetensors").is_file()
    assert len(widgets.dialogs.charts) == 2, "each run's loss curve is shown"
    assert widgets.dialogs.charts[0] is not widgets.dialogs.charts[1]

    params.trainingOutputFolder = str(tmp_path / "run1")  # holds a finished run: neither resume nor overwrite
    panel.onStart()
    assert "already holds a training run" in widgets.dialogs.errors[-1] and panel.job is None
