"""The Qt glue of both modules, run: the shared job monitor and training panel (CTDiffusionSRLib/widgets.py) and
the two panels themselves (the SR and X-ray panels over their shared lifecycle, module_widget.py).

The Qt layer (PythonQt's ``qt`` module, the .ui widgets, Slicer's dialogs) exists only inside Slicer. Here a
small stand-in gives the PythonQt idioms that widgets.py uses (properties set as attributes, signals
connected by their C++ signature, a QTimer), and records the dialogs instead of showing them. Everything
below the widgets is real: MRML scenes from slicer-core, the SR job's background process with a tiny
model or the shipped weights, the training job's process and its loss curve, the slice views' MRML nodes. A
panel's .ui is read from its file, so every widget the code touches must exist there; the parameter node is a
stand-in for Slicer's parameterNodeWrapper over a real scripted module node (values and node references kept on
it, Modified events observed). What this checks is what a user sees: the Apply button's state and tooltip, the
progress bar, the status line and the log through a job's life, the result in the views, and the training
panel's buttons, status and chart.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import time
import types
import unittest
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CTDiffusionSR") not in sys.path:
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))

from conftest import save_scene, write_fake_trainer  # noqa: E402
from CTDiffusionSRLib import mrml_io  # noqa: E402
from CTDiffusionSRLib.process import JobState  # noqa: E402
from CTDiffusionSRLib.sr_logic import SRJob, SRSettings  # noqa: E402
from CTDiffusionSRLib.testing import phantom_ct, phantom_radiograph  # noqa: E402
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

    def blockSignals(self, block: bool) -> bool:
        was, self.blocked = getattr(self, "blocked", False), bool(block)
        return was

    def emit(self, signal: str, *args) -> None:
        """Call the connected slots; like PythonQt, a slot that takes fewer arguments than the signal carries gets
        the first ones (Slicer's ``connect("clicked(bool)", self.onApply)`` with ``def onApply(self)``)."""
        for slot in [] if getattr(self, "blocked", False) else self.slots.get(signal, []):
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
            self.emit("currentTextChanged(QString)", text)


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
        self.infos: list[str] = []
        self.charts: list = []

    def errorDisplay(self, text, **_kwargs) -> None:
        self.errors.append(str(text))

    def infoDisplay(self, text, **_kwargs) -> None:
        self.infos.append(str(text))

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
    monkeypatch.setattr(slicer.util, "infoDisplay", dialogs.infoDisplay)
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: None)
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
        trainingExtraArguments="", trainingFromShippedWeights=False,
    )  # fmt: skip
    panel = widgets.TrainingPanel(ui, lambda: params, "throughplane")
    panel.fillPresets()
    assert ui.trainingPresetComboBox.items == ["(defaults)", "default"]
    assert ui.trainingPresetComboBox.currentText == "default"  # the shipped weights' recipe, selected
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

    # Resume (e.g. after restarting Slicer, the text back at the defaults): the run keeps its own settings
    ui.trainingConfigTextEdit.setPlainText("{}")
    params.trainingResume = True
    panel.onStart()
    assert panel.job is not None, widgets.dialogs.errors
    ui.trainingStopButton.emit("clicked(bool)", True)
    _run_timer(panel.timer, lambda: panel.job is None, seconds=60)
    argv = json.loads((tmp_path / "run1" / "argv.json").read_text())
    assert "--resume" in argv and argv[argv.index("--config") + 1] == str(tmp_path / "run1" / "config.json")
    assert (tmp_path / "run1" / "config.json").read_text() == json.dumps(json.loads(preset), indent=2)
    assert json.loads(ui.trainingConfigTextEdit.toPlainText()) == json.loads(preset)  # shown in the panel

    # "Start from the shipped weights": a new run that continues sr-default (the command's --init-from)
    params.trainingFromShippedWeights = True
    panel.onStart()  # with Resume still ticked: refused, naming both
    assert "untick 'Start from the shipped weights' (or Resume)" in widgets.dialogs.errors[-1] and panel.job is None
    params.trainingResume, params.trainingOutputFolder = False, str(tmp_path / "run3")
    params.trainingExtraArguments = "--max-steps 5"
    panel.onStart()
    assert panel.job is not None, widgets.dialogs.errors
    ui.trainingStopButton.emit("clicked(bool)", True)
    _run_timer(panel.timer, lambda: panel.job is None, seconds=60)
    argv = json.loads((tmp_path / "run3" / "argv.json").read_text())
    assert argv[argv.index("--extraArguments") + 1] == "--init-from sr-default --max-steps 5"  # the CLI splits it
    params.trainingFamily, params.trainingOutputFolder = "sr", str(tmp_path / "run4")  # no weights ship for it
    panel.onStart()
    assert "no weights ship for 'sr'" in widgets.dialogs.errors[-1] and panel.job is None


# -- the panels ---------------------------------------------------------------------------------------------
class NodeComboBox(Widget):
    def currentNode(self):
        return None

    def checkedNodes(self) -> list:
        return []


#: .ui widget classes -> stand-ins (anything else is a plain Widget)
UI_CLASSES = {"QComboBox": ComboBox, "QPlainTextEdit": TextEdit, "qMRMLNodeComboBox": NodeComboBox,
              "qMRMLCheckableNodeComboBox": NodeComboBox}  # fmt: skip


def load_ui(path) -> Widget:
    """slicer.util.loadUI: the .ui's root widget, holding a stand-in for every named widget in the file."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    children = {w.get("name"): UI_CLASSES.get(w.get("class"), Widget)() for w in root.iter("widget")}
    return Widget(children=children)


def parameter_node_wrapper(cls):
    """Slicer's @parameterNodeWrapper, reduced to what the panels use: typed parameters with defaults kept on a
    vtkMRMLScriptedModuleNode (nodes as node references), its Modified events, connectGui/disconnectGui."""
    import json
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name) for name in hints if hasattr(cls, name)}

    def base(hint):
        return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint

    def is_node(hint) -> bool:
        types_ = typing.get_args(hint) or (hint,)
        return all(isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode) for t in types_)

    class Wrapper:
        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)

        def __getattr__(self, name):
            if name not in hints:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            hint = base(hints[name])
            if is_node(hint):
                return self.parameterNode.GetNodeReference(name)
            text = self.parameterNode.GetParameter(name)
            value = json.loads(text) if text else defaults.get(name)
            return Path(value) if hint is Path else value

        def __setattr__(self, name, value):
            if name not in hints:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            if is_node(base(hints[name])):
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(name, json.dumps(str(value) if isinstance(value, Path) else value))
            self.parameterNode.Modified()

        def AddObserver(self, *args):
            return self.parameterNode.AddObserver(*args)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

        def connectGui(self, ui):
            return ("gui", id(ui))

        def disconnectGui(self, tag):
            pass

    Wrapper.__name__ = cls.__name__
    return Wrapper


class ScriptedLoadableModuleLogic:
    def getParameterNode(self):
        name = type(self).__name__.removesuffix("Logic")
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        return node or slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", name)


class SaveDialog:
    """qt.QFileDialog in save mode, answered with ``answer`` = (file, filter), as the user would choose them."""

    AcceptSave = 1
    answer: tuple[str, str] = ("", "")

    def __init__(self, parent, caption, folder, filters):
        self.filters = filters.split(";;")

    def setAcceptMode(self, mode) -> None:
        self.mode = mode

    def exec_(self) -> bool:
        assert self.answer[1] in self.filters and self.mode == self.AcceptSave
        return bool(self.answer[0])

    def selectedFiles(self) -> list[str]:
        return [self.answer[0]]

    def selectedNameFilter(self) -> str:
        return self.answer[1]


class Answers:
    """What the user answers in the open-file and text dialogs (qt.QFileDialog.getOpenFileName, QInputDialog)."""

    open_file = ""
    name = ""


SaveDialog.getOpenFileName = staticmethod(lambda parent, caption, folder, filters: Answers.open_file)


class ScriptedLoadableModuleTest(unittest.TestCase):
    """Slicer's self-test base: a TestCase whose delayDisplay shows each step (recorded here)."""

    shown: list[str] = []

    def delayDisplay(self, message, msec=None) -> None:
        self.shown.append(str(message))


class Views:
    """What the panels ask of Slicer's views (slicer.util.setSliceViewerLayers, resetSliceViews), recorded."""

    def __init__(self):
        self.layers: list[dict] = []

    def setSliceViewerLayers(self, **kwargs) -> None:
        self.layers.append(kwargs)


@pytest.fixture
def panels(widgets, monkeypatch):
    """The two panel modules imported against the stand-in; ``panels.views`` records the view changes."""
    xray_dir = str(ROOT / "XrayToCT")
    monkeypatch.syspath_prepend(xray_dir)
    qt = sys.modules["qt"]
    qt.QFileDialog = SaveDialog
    qt.QLineEdit = types.SimpleNamespace(Normal=0)
    qt.QInputDialog = types.SimpleNamespace(getText=lambda parent, title, label, mode, text: Answers.name)
    settings: dict = {}
    qt.QSettings = lambda: types.SimpleNamespace(value=lambda key, default="": settings.get(key, default),
                                                 setValue=settings.__setitem__)  # fmt: skip
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameter_node_wrapper
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    scripted.ScriptedLoadableModule = scripted.ScriptedLoadableModuleWidget = type("Base", (), {})
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    views = Views()
    monkeypatch.setattr(slicer.util, "loadUI", load_ui)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda root: types.SimpleNamespace(**root.children))
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", views.setSliceViewerLayers)
    monkeypatch.setattr(slicer.util, "resetSliceViews", lambda: None)
    names = ("CTDiffusionSRLib.module_widget", "CTDiffusionSRLib.sr_widget", "XrayToCTLib.xray_widget")
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    module_widget = importlib.import_module("CTDiffusionSRLib.module_widget")
    monkeypatch.setattr(module_widget, "ensureDependencies", lambda training=False: True)
    sr_widget = importlib.import_module("CTDiffusionSRLib.sr_widget")
    monkeypatch.setattr(sr_widget, "ensureDependencies", lambda training=False: True)
    xray_widget = importlib.import_module("XrayToCTLib.xray_widget")
    yield types.SimpleNamespace(sr=sr_widget, xray=xray_widget, module_widget=module_widget, views=views,
                                dialogs=widgets.dialogs)
    for name in names:
        sys.modules.pop(name, None)


def _open(panel_class):
    panel = panel_class(types.SimpleNamespace(isEntered=True))
    panel.enter()
    return panel, panel._parameterNode, panel.ui


def _until_idle(panel, seconds: float = 240.0) -> None:
    _run_timer(panel.monitor.timer, lambda: not panel.monitor.running, seconds)


def test_the_sr_panel_runs_the_shipped_weights_on_the_scenes_ct_and_shows_the_result(panels, scene, tmp_path):
    from CTDiffusionSRLib import views

    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    panel, p, ui = _open(panels.sr.SRWidget)
    assert p.inputVolume is node  # the scene's CT is taken as the input
    assert ui.weightsComboBox.currentText == "sr-default"  # the shipped weights, preselected
    assert ui.applyButton.enabled and ui.applyButton.text == "Apply"
    assert ui.applyButton.toolTip == "Super-resolve the input into a new synthetic volume."
    assert not ui.compareFadeButton.enabled and not ui.exportResultButton.enabled
    p.adaptToScan = False  # seconds instead of a minute; adaptation has tests of its own
    ui.applyButton.emit("clicked(bool)", True)
    assert panel.monitor.running and ui.applyButton.text == "Cancel" and ui.applyButton.enabled
    assert ui.progressBar.visible
    job, said_while_importing = panel.monitor.job, []
    importing = job.import_results
    job.import_results = lambda folder: said_while_importing.append(ui.statusLabel.text) or importing(folder)
    _until_idle(panel)
    assert said_while_importing == ["Loading the result into the scene..."]  # not "written" at 100% for seconds
    assert panels.dialogs.errors == [] and ui.statusLabel.text.startswith("Done in "), ui.statusLabel.text
    result = p.resultVolume
    assert result is not None and result.GetName() == "CT_01 SR x5 (synthetic)"
    assert mrml_io.provenance(result)["weights_sha256"] == json.loads(
        (ROOT / "DiffusionCore" / "weights" / "registry.json").read_text())["weights"]["sr-default"]["sha256"]
    assert ui.applyButton.text == "Apply" and ui.compareFadeButton.enabled and ui.exportResultButton.enabled
    red = views.composite_node(scene, "Red")
    assert red.GetBackgroundVolumeID() == node.GetID() and red.GetForegroundVolumeID() == result.GetID()
    assert red.GetForegroundOpacity() == pytest.approx(0.5)
    ui.fadeSlider.emit("valueChanged(double)", 1.0)
    assert red.GetForegroundOpacity() == pytest.approx(1.0)
    ui.compareSideBySideButton.emit("clicked(bool)", True)
    yellow = views.composite_node(scene, "Yellow")
    assert red.GetBackgroundVolumeID() == node.GetID() and yellow.GetBackgroundVolumeID() == result.GetID()
    # Export result, twice to the same file: the save dialog has asked whether to replace it
    SaveDialog.answer = (str(tmp_path / "CT_01 SR.nrrd"), "NRRD with provenance fields (*.nrrd)")
    for _ in range(2):
        ui.exportResultButton.emit("clicked(bool)", True)
    assert panels.dialogs.errors == [] and len(panels.dialogs.infos) == 2, panels.dialogs.errors
    assert f"to {tmp_path / 'CT_01 SR.nrrd'}" in panels.dialogs.infos[-1]
    assert b"ctdiffusion_synthetic:=true" in (tmp_path / "CT_01 SR.nrrd").read_bytes()[:4000]
    panel.cleanup()


def test_the_sr_panel_says_why_apply_is_disabled_and_a_second_press_cancels(panels, scene):
    panel, p, ui = _open(panels.sr.SRWidget)
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == "Select an input CT volume."
    flat = mrml_io.add_volume_node(scene, phantom_ct(shape=(1, 32, 32)), "scout")
    p.inputVolume = flat
    assert not ui.applyButton.enabled and "'scout' is 2D" in ui.applyButton.toolTip
    p.inputVolume = mrml_io.add_volume_node(scene, phantom_ct(), "CT_02")
    assert ui.applyButton.enabled
    p.weights = "no-such-weights"
    assert not ui.applyButton.enabled and "no-such-weights" in ui.applyButton.toolTip
    p.weights = "sr-default"
    nodes_before = scene.GetNumberOfNodes()
    ui.applyButton.emit("clicked(bool)", True)  # with the default adaptation: long enough to cancel
    _run_timer(panel.monitor.timer, lambda: ui.progressBar.value > 0, seconds=120)
    assert panel.monitor.running
    ui.applyButton.emit("clicked(bool)", True)
    assert not panel.monitor.running and ui.statusLabel.text == "Cancelled; nothing was added to the scene."
    assert ui.applyButton.text == "Apply" and p.resultVolume is None and panels.dialogs.errors == []
    assert scene.GetNumberOfNodes() == nodes_before
    panel.cleanup()


def test_a_double_click_on_apply_starts_the_job_and_does_not_cancel_it(panels, scene, monkeypatch):
    """Apply turns into Cancel as the job starts; Qt delivers a double click's second click right after the first
    one's handler returns, which used to cancel the job the first click had just started."""
    panel, p, ui = _open(panels.sr.SRWidget)
    p.inputVolume = mrml_io.add_volume_node(scene, phantom_ct(), "CT_03")
    monkeypatch.setattr(panels.module_widget, "doubleClickSeconds", lambda: 3600.0)  # any click is "soon"
    ui.applyButton.emit("clicked(bool)", True)
    ui.applyButton.emit("clicked(bool)", True)  # the second click of the double click
    assert panel.monitor.running and panels.dialogs.errors == []
    monkeypatch.setattr(panels.module_widget, "doubleClickSeconds", lambda: 0.0)  # a later, deliberate click
    ui.applyButton.emit("clicked(bool)", True)
    assert not panel.monitor.running and ui.statusLabel.text == "Cancelled; nothing was added to the scene."
    panel.cleanup()


def test_the_double_click_interval_is_qts_or_half_a_second(widgets, monkeypatch):
    assert widgets.doubleClickSeconds() == widgets.DEFAULT_DOUBLE_CLICK_SECONDS  # the stand-in has no QApplication
    monkeypatch.setattr(sys.modules["qt"], "QApplication", types.SimpleNamespace(doubleClickInterval=lambda: 250),
                        raising=False)  # fmt: skip
    assert widgets.doubleClickSeconds() == 0.25


def test_closing_the_scene_stops_the_job_without_an_error_dialog(panels, scene):
    mrml_io.add_volume_node(scene, phantom_ct(), "CT_03")
    panel, p, ui = _open(panels.sr.SRWidget)
    ui.applyButton.emit("clicked(bool)", True)
    assert panel.monitor.running
    job = panel.monitor.job
    scene.Clear(False)  # File > Close Scene
    assert job.state == JobState.CANCELLED and not panel.monitor.running
    assert panels.dialogs.errors == [] and not _alive_pid(job.runner.pid)
    assert panel._parameterNode is not None and panel._parameterNode.inputVolume is None  # a fresh parameter node
    panel.cleanup()


def _alive_pid(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_the_xray_panel_shows_each_stage_and_its_projection_error(panels, scene):
    import numpy as np
    import vtk
    from vtk.util import numpy_support

    panel, p, ui = _open(panels.xray.XrayWidget)
    assert ui.weightsComboBox.currentText == "xray-default"
    assert not ui.applyButton.enabled and "Select a radiograph" in ui.applyButton.toolTip
    pixels = (phantom_radiograph(64) * 3000).astype(np.float32)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chest PA")
    image = vtk.vtkImageData()
    image.SetDimensions(64, 64, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(pixels.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(5.0, 5.0, 1.0)
    p.inputRadiograph = node
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    p.referenceVolume = node  # the radiograph itself picked as the reference: said before any work
    assert not ui.applyButton.enabled and "Reference CT 'chest PA' is 2D" in ui.applyButton.toolTip
    p.referenceVolume = mrml_io.add_volume_node(scene, phantom_ct(shape=(12, 32, 32), spacing=(8.0, 8.0, 8.0)), "ref")
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    ui.applyButton.emit("clicked(bool)", True)
    assert panel.monitor.running and ui.projectionErrorLabel.text == "-"
    _until_idle(panel)
    assert panels.dialogs.errors == [] and ui.statusLabel.text.startswith("Done in "), ui.statusLabel.text
    assert "Against the reference CT: " in ui.statusLabel.text and "psnr" in ui.statusLabel.text.lower()
    result = p.resultVolume
    assert result is not None and result.GetName() == "chest PA CT (synthetic)"
    assert ui.projectionErrorLabel.text.startswith("stage 1: PSNR ") and "NCC" in ui.projectionErrorLabel.text
    assert panels.views.layers[-1] == {"background": result, "fit": True}
    assert ui.exportResultButton.enabled
    panel.cleanup()


def test_import_weights_registers_the_file_and_selects_it_or_says_why_not(panels, scene, cache_home, tmp_path):
    import shutil

    panel, p, ui = _open(panels.sr.SRWidget)
    mrml_io.add_volume_node(scene, phantom_ct(), "CT_04")
    p.inputVolume = scene.GetFirstNodeByName("CT_04")
    mine = tmp_path / "my weights.safetensors"
    shutil.copy(ROOT / "DiffusionCore" / "weights" / "sr-default.safetensors", mine)
    Answers.open_file, Answers.name = str(mine), "my-sr"
    ui.importWeightsButton.emit("clicked(bool)", True)
    assert panels.dialogs.errors == [] and ui.statusLabel.text.startswith("Imported my-sr (sha256 ")
    assert "my-sr" in ui.weightsComboBox.items and ui.weightsComboBox.currentText == "my-sr"
    assert p.weights == "my-sr" and ui.applyButton.enabled  # chosen, and usable
    Answers.open_file, Answers.name = str(ROOT / "DiffusionCore" / "weights" / "xray-default.safetensors"), "xr"
    ui.importWeightsButton.emit("clicked(bool)", True)  # X-ray weights offered to the SR module
    assert len(panels.dialogs.errors) == 1 and panels.dialogs.errors[0].startswith("Could not import the weights.")
    assert "xray" in panels.dialogs.errors[0] and "xr" not in ui.weightsComboBox.items and p.weights == "my-sr"
    Answers.open_file = ""  # the dialog was cancelled
    ui.importWeightsButton.emit("clicked(bool)", True)
    assert len(panels.dialogs.errors) == 1 and p.weights == "my-sr"
    panel.cleanup()


def test_evaluate_on_this_volume_fills_a_table_and_shows_it(panels, scene, monkeypatch):
    shown = []
    selection = types.SimpleNamespace(SetActiveTableID=shown.append)
    app = types.SimpleNamespace(
        layoutManager=lambda: types.SimpleNamespace(setLayout=lambda layout: shown.append(("layout", layout))),
        applicationLogic=lambda: types.SimpleNamespace(GetSelectionNode=lambda: selection,
                                                       PropagateTableSelection=lambda: shown.append("propagated")),
    )  # fmt: skip
    monkeypatch.setattr(slicer, "app", app, raising=False)
    thin = mrml_io.add_volume_node(scene, phantom_ct(shape=(24, 32, 32), spacing=(0.8, 0.8, 1.0)), "thin CT")
    panel, p, ui = _open(panels.sr.SRWidget)
    p.adaptToScan = False
    p.evaluationFactor = 4
    assert p.inputVolume is thin and ui.evaluateButton.enabled
    ui.evaluateButton.emit("clicked(bool)", True)
    assert panel.monitor.running and ui.applyButton.text == "Cancel"
    assert not ui.evaluateButton.enabled  # it did nothing while a job ran, yet looked pressable
    _until_idle(panel)
    assert ui.evaluateButton.enabled and ui.applyButton.text == "Apply"
    assert panels.dialogs.errors == [], panels.dialogs.errors
    table = scene.GetFirstNodeByName("thin CT evaluation x4 slab, not adapted")
    assert table is not None and shown[-2:] == [table.GetID(), "propagated"]
    methods = [table.GetTable().GetValue(r, 0).ToString() for r in range(table.GetTable().GetNumberOfRows())]
    assert methods == ["cubic", "cubic+dc", "sr"]
    assert p.resultVolume is None  # an evaluation is not a result
    panel.cleanup()


def test_a_new_cache_folder_lists_the_weights_imported_there_at_once(panels, scene, cache_home, tmp_path, monkeypatch):
    import os

    from DiffusionCore.weights import import_weights

    shared = tmp_path / "shared cache"
    shared.mkdir()
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(shared))
    import_weights(ROOT / "DiffusionCore" / "weights" / "sr-default.safetensors", "team-sr", family="sr")
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(cache_home))
    panel, p, ui = _open(panels.sr.SRWidget)
    assert "team-sr" not in ui.weightsComboBox.items
    ui.cacheFolderPathLineEdit.emit("currentPathChanged(QString)", str(shared))
    assert os.environ["DIFFUSIONCORE_CACHE"] == str(shared)  # this process and the jobs it starts
    assert "team-sr" in ui.weightsComboBox.items and "sr-default" in ui.weightsComboBox.items
    panel.cleanup()


def test_the_result_is_compared_with_the_volume_it_was_made_from(panels, scene):
    """The user picks another input while a job runs (or after it): the result was faded over, and compared side
    by side with, whatever the selector then held, a different scan."""
    from CTDiffusionSRLib import views

    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_05")
    other = mrml_io.add_volume_node(scene, phantom_ct(seed=1), "CT_06")
    panel, p, ui = _open(panels.sr.SRWidget)
    p.inputVolume, p.adaptToScan = node, False
    ui.applyButton.emit("clicked(bool)", True)
    p.inputVolume = other  # chosen while the job runs
    _until_idle(panel)
    result = p.resultVolume
    assert result is not None and result.GetName().startswith("CT_05 SR")
    red = views.composite_node(scene, "Red")
    assert red.GetBackgroundVolumeID() == node.GetID() and red.GetForegroundVolumeID() == result.GetID()
    ui.compareSideBySideButton.emit("clicked(bool)", True)
    assert red.GetBackgroundVolumeID() == node.GetID()
    assert views.composite_node(scene, "Yellow").GetBackgroundVolumeID() == result.GetID()
    ui.compareFadeButton.emit("clicked(bool)", True)
    assert red.GetBackgroundVolumeID() == node.GetID() and red.GetForegroundVolumeID() == result.GetID()
    panel.cleanup()


@pytest.mark.parametrize("module", ["CTDiffusionSR", "XrayToCT"])
def test_the_modules_self_tests_pass(panels, scene, module, monkeypatch):
    """What "Reload and Test" runs in Slicer (developer mode): the module file's Test class, here with torch."""
    monkeypatch.syspath_prepend(str(ROOT / module))
    monkeypatch.delitem(sys.modules, module, raising=False)
    shell = importlib.import_module(module)
    ScriptedLoadableModuleTest.shown = []
    case = getattr(shell, module + "Test")("runTest")
    outcome = unittest.TestResult()
    case.run(outcome)
    sys.modules.pop(module, None)
    assert outcome.wasSuccessful(), [text for _, text in outcome.errors + outcome.failures]
    assert ScriptedLoadableModuleTest.shown[-1] == "Test passed"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2  # its input and its result


def test_opening_a_panel_makes_results_of_scenes_loaded_later_keep_their_label_when_saved(panels, scene, tmp_path):
    earlier = slicer.vtkMRMLScene()  # the session that made the result and saved the scene
    source = mrml_io.add_volume_node(earlier, phantom_ct(), "CT_07")
    result = mrml_io.add_volume_node(earlier, phantom_ct(seed=1), "CT_07 SR x4 (synthetic)")
    mrml_io.set_provenance(result, kind="super-resolution", model="sr-default", weights_sha256="ab" * 32,
                           settings={}, source=source, title="SR x4 (synthetic)")  # fmt: skip
    save_scene(earlier, (source, result), tmp_path / "earlier.mrml")
    panel, p, ui = _open(panels.xray.XrayWidget)  # either panel
    scene.SetURL(str(tmp_path / "earlier.mrml"))
    scene.Import()  # File > Load Scene, after the panel was opened
    loaded = scene.GetFirstNodeByName("CT_07 SR x4 (synthetic)")
    loaded.GetStorageNode().SetFileName(str(tmp_path / "again.nrrd"))
    assert loaded.GetStorageNode().WriteData(loaded)
    assert b"ctdiffusion_synthetic:=true" in (tmp_path / "again.nrrd").read_bytes()[:4000]
    panel.cleanup()


# -- the overrides of the engine's refusals: Allow interspaced slices, Allow non-CT intensities ---------------------
def _interspaced_dicom_node(scene, folder: Path, monkeypatch, name: str = "HRCT"):
    """A node loaded from Slicer's DICOM database (its files known through ``slicer.dicomDatabase``) of a real CT
    DICOM series with 1 mm slices every 4 mm (an HRCT-type protocol), as Testing/test_interspaced.py makes it."""
    import pydicom
    from conftest import ct_phantom_array, write_dicom_series
    from CTDiffusionSRLib.testing import DicomDatabaseStandIn

    from DiffusionCore.volume import Volume, read_volume

    files = write_dicom_series(folder, Volume(ct_phantom_array((6, 64, 64)), (0.8, 0.8, 4.0), (0.0, 0.0, 0.0)))
    uids = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SliceThickness = "1"
        ds.save_as(f)
        uids.append(str(ds.SOPInstanceUID))
    database = DicomDatabaseStandIn()
    database.files = {uid: str(f) for uid, f in zip(uids, files)}
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    node = mrml_io.add_volume_node(scene, read_volume(folder), name)
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    return node


def test_an_interspaced_series_is_refused_naming_the_checkbox_and_runs_once_it_is_ticked(panels, scene, tmp_path,
                                                                                         monkeypatch):  # fmt: skip
    """Apply on an HRCT-type series loaded from DICOM: refused at once, the dialog telling the user to tick "Allow
    interspaced slices" under Advanced (not the sr command's flag); ticked, the same Apply runs the job to a result
    that records the permission."""
    node = _interspaced_dicom_node(scene, tmp_path / "hrct", monkeypatch)
    panel, p, ui = _open(panels.sr.SRWidget)
    assert p.inputVolume is node and p.allowInterspaced is False and ui.applyButton.enabled, ui.applyButton.toolTip
    p.adaptToScan = False  # seconds instead of a minute
    ui.applyButton.emit("clicked(bool)", True)
    assert not panel.monitor.running and p.resultVolume is None
    [said] = panels.dialogs.errors
    assert said.startswith("Could not start the super-resolution.\n'HRCT' has 1 mm slices 4 mm apart"), said
    assert "To run it anyway, tick 'Allow interspaced slices' under Advanced" in said, said
    assert "--allow-interspaced" not in said and "(allow_interspaced=True in Python)" not in said, said
    assert ui.applyButton.text == "Apply" and ui.applyButton.enabled
    panels.dialogs.errors.clear()
    p.allowInterspaced = True  # the checkbox, through its parameter node binding
    assert panel.logic.settingsFrom(p).allow_interspaced is True
    ui.applyButton.emit("clicked(bool)", True)
    assert panel.monitor.running, panels.dialogs.errors
    assert "--allowInterspaced" in panel.monitor.job.settings.cli_arguments()
    _until_idle(panel)
    assert panels.dialogs.errors == [] and ui.statusLabel.text.startswith("Done in "), ui.statusLabel.text
    result = p.resultVolume
    assert result is not None and result.GetName().startswith("HRCT SR x") and scene.IsNodePresent(result)
    assert result.GetImageData() is not None and result.GetImageData().GetDimensions()[2] > 6  # thinner slices
    panel.cleanup()


def test_the_non_ct_checkbox_turns_apply_on_and_off_and_its_tooltip_names_the_checkbox(panels, scene, monkeypatch):
    """A CT stored without its intercept (0..~2000, no values below 0): Apply is disabled, its tooltip saying why and
    to tick "Allow non-CT intensities" under Advanced; ticking the box enables Apply (and the job gets the
    permission), unticking disables it again. The voxels are read once per node change or box change, not on every
    setting."""
    import numpy as np
    from CTDiffusionSRLib import sr_logic

    from DiffusionCore.volume import Volume

    ct = phantom_ct()
    shifted = Volume(np.clip(ct.array, -1024.0, None) + 1024.0, ct.spacing, ct.origin, ct.direction)
    node = mrml_io.add_volume_node(scene, shifted, "CT unsigned")
    reads = []
    judged = sr_logic.intensity_problem
    monkeypatch.setattr(sr_logic, "intensity_problem", lambda n, s: reads.append(s.allow_non_ct) or judged(n, s))
    panel, p, ui = _open(panels.sr.SRWidget)
    assert p.inputVolume is node and p.allowNonCT is False
    tip = ui.applyButton.toolTip
    assert not ui.applyButton.enabled and tip.startswith("'CT unsigned' does not look like CT in Hounsfield units"), tip
    assert "if this really is CT in HU, tick 'Allow non-CT intensities' under Advanced" in tip, tip
    assert "--allow-non-ct" not in tip and "(allow_non_ct=True in Python)" not in tip, tip
    p.seed = 3  # another setting: the verdict is kept, the voxels not read again
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == tip and reads == [False]
    p.allowNonCT = True  # the checkbox, through its parameter node binding
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    assert ui.applyButton.toolTip == "Super-resolve the input into a new synthetic volume." and reads == [False, True]
    p.allowNonCT = False
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == tip
    p.allowNonCT = True
    p.adaptToScan = False
    ui.applyButton.emit("clicked(bool)", True)
    assert panel.monitor.running and panels.dialogs.errors == [], panels.dialogs.errors
    assert panel.monitor.job.settings.allow_non_ct and "--allowNonCT" in panel.monitor.job.settings.cli_arguments()
    monkeypatch.setattr(panels.module_widget, "doubleClickSeconds", lambda: 0.0)
    ui.applyButton.emit("clicked(bool)", True)  # cancel: what the job makes of it is the job's own tests' matter
    assert not panel.monitor.running
    # a constant volume stays refused with the box ticked; a real CT is accepted with it unticked
    p.inputVolume = mrml_io.add_volume_node(scene, Volume(np.zeros((6, 32, 32), np.float32), ct.spacing), "blank")
    assert not ui.applyButton.enabled and "'blank' is constant" in ui.applyButton.toolTip
    p.allowNonCT = False
    p.inputVolume = mrml_io.add_volume_node(scene, phantom_ct(), "CT_04")
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    panel.cleanup()
