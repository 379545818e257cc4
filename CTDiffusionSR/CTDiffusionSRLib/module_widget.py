"""The panel lifecycle the CT Diffusion SR and X-ray to CT widgets share (Qt glue, SlicerNNUnet layout).

Each module file is a thin shell: its ``ScriptedLoadableModuleWidget`` builds the module's panel
(``CTDiffusionSRLib.sr_widget.SRWidget``, ``XrayToCTLib.xray_widget.XrayWidget``), adds its .ui to the
module's layout and forwards enter, exit, cleanup and reload. What both panels do the same way is here once:
the .ui and the logic, the parameter node bound to the .ui and followed, the scene-close observers, the
weights selector with "Import weights...", Apply and its job monitor (dependencies installed first, a second
press cancels), the training panel, the result export, and the cleanup of observers and running jobs. A
panel names its family, .ui and logic and fills in the hooks (the abstract methods).
"""

from __future__ import annotations

import abc
import importlib
import pathlib
import sys
import time

import slicer
import vtk
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from .widgets import (
    JobMonitor,
    TrainingPanel,
    applyCacheFolderSetting,
    doubleClickSeconds,
    ensureDependencies,
    exportResultWithDialog,
    fillWeightsComboBox,
    importWeights,
    watchResultSaves,
)


def reloadModules(*names: str) -> None:
    """Re-read the named modules that are already imported, in order: Slicer's Reload re-reads only the
    module file, so a shell reloads its Lib panel this way first (developer mode's "Reload")."""
    for name in names:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


class ModuleWidget(VTKObservationMixin, abc.ABC):
    """One module's panel, built from its .ui; ``uiWidget`` is what the module shell adds to its layout.

    Subclasses set ``family``, ``uiPath`` and ``logicClass`` and implement the hooks: ``inputProblem``,
    ``applyTexts``, ``updateResultButtons``, ``startJob``, ``failureText``, ``showResult`` (and, for their
    own buttons, ``setupModuleWidgets``).
    """

    #: weights family of the selector and the training panel's default ("sr", "xray")
    family: str = ""
    #: the module's .ui file
    uiPath: pathlib.Path
    #: the module's ScriptedLoadableModuleLogic class (its name gives the parameter node's module name)
    logicClass: type

    def __init__(self, parent) -> None:
        """``parent`` is the module's widget representation (its ``isEntered`` says whether it is shown)."""
        VTKObservationMixin.__init__(self)
        self.parent = parent
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._appliedAt = 0.0  # when Apply last started a job (a double click's second click does not cancel it)
        self.uiWidget = slicer.util.loadUI(str(self.uiPath))
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.logicClass()
        applyCacheFolderSetting()
        watchResultSaves()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.monitor = JobMonitor(
            self.ui.progressBar, self.ui.statusLabel, self.ui.logTextEdit, self.onJobFinished
        )
        self.ui.progressBar.visible = False
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.weightsComboBox.connect("currentTextChanged(QString)", self.onWeightsChanged)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.exportResultButton.connect("clicked(bool)", self.onExportResult)
        self.setupModuleWidgets()
        self.training = TrainingPanel(self.ui, lambda: self._parameterNode, self.family)
        self.training.fillPresets()
        self.fillWeights()
        self.initializeParameterNode()

    def setupModuleWidgets(self) -> None:
        """Connect the module's own widgets (called once the job monitor exists)."""

    # -- lifecycle ------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """The module is unloaded or reloaded: stop the running job and training, drop every observer."""
        self.monitor.cancel()
        self.training.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.monitor.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.fillWeights()  # the scene's choice, or the default weights preselected
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Apply's text, state and tooltip from the input, the weights and the job; then the result buttons."""
        from CTDiffusionSRLib.weights_choice import apply_state, weights_problem

        p = self._parameterNode
        action, cancel = self.applyTexts()
        state = apply_state(
            running=self.monitor.running,
            input_problem=self.inputProblem(p) if p else _("No parameter node."),
            weights_problem=weights_problem(self.family, p.weights) if p else "",
            action=action,
            cancel=cancel,
        )
        self.ui.applyButton.text = state.text
        self.ui.applyButton.enabled = state.enabled
        self.ui.applyButton.toolTip = state.tooltip
        self.updateResultButtons(p)

    @abc.abstractmethod
    def inputProblem(self, p) -> str:
        """Why Apply is disabled for the parameter node ``p``'s input ("" when it is not)."""

    @abc.abstractmethod
    def applyTexts(self) -> tuple[str, str]:
        """Apply's tooltips: what it does, and what pressing it during the job does."""

    @abc.abstractmethod
    def updateResultButtons(self, p) -> None:
        """Enable the buttons that act on the result (``p`` may be None)."""

    # -- weights --------------------------------------------------------------------------------------
    def fillWeights(self) -> None:
        current = self._parameterNode.weights if self._parameterNode else ""
        fillWeightsComboBox(self.ui.weightsComboBox, self.family, current)
        from CTDiffusionSRLib.weights_choice import hidden_weights_status

        notice = hidden_weights_status(self.family)  # own weights under a name that now ships: said where they look
        if notice:
            self.ui.statusLabel.text = notice

    def onWeightsChanged(self, text: str) -> None:
        if self._parameterNode:
            self._parameterNode.weights = text

    def onImportWeights(self) -> None:
        name = importWeights(self.family, self.ui.statusLabel)
        if name:
            self.fillWeights()
            self.ui.weightsComboBox.setCurrentText(name)

    # -- running --------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        """Start the module's job, installing what is missing first; while a job runs, cancel it (but not on the
        second click of a double click that started it)."""
        if self.monitor.running:
            # Qt delivers a double click's second click once this handler has returned from starting the job
            if time.monotonic() - self._appliedAt >= doubleClickSeconds():
                self.monitor.cancel()
            return
        if not ensureDependencies():
            return
        self.startJob(self._parameterNode)
        self._checkCanApply()
        self._appliedAt = time.monotonic()

    @abc.abstractmethod
    def startJob(self, p) -> None:
        """Create the job for the parameter node ``p`` and hand it to ``self.monitor``."""

    def onJobFinished(self, job, state) -> None:
        from CTDiffusionSRLib.process import JobState

        self._checkCanApply()
        if state == JobState.FAILED:
            slicer.util.errorDisplay("\n\n".join([self.failureText(job.error), *job.notices]))
            return
        if state == JobState.COMPLETED:
            self.showResult(job)

    @abc.abstractmethod
    def failureText(self, error: str) -> str:
        """The dialog text for a failed job."""

    @abc.abstractmethod
    def showResult(self, job) -> None:
        """Record and show the result of a completed job."""

    def onExportResult(self) -> None:
        exportResultWithDialog(self._parameterNode.resultVolume)
