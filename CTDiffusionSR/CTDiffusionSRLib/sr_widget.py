"""The CT Diffusion SR panel, its parameter node and its scripting logic (Slicer and Qt glue).

The module file (CTDiffusionSR.py) only builds :class:`SRWidget` and forwards its lifecycle; the lifecycle
shared with the X-ray to CT module is in :mod:`CTDiffusionSRLib.module_widget`. The work is done by the
Qt-free modules beside this one (sr_logic, views, process), which run the CTDiffusionSRBatch command-line
module in a background process; this file binds widgets to the parameter node, starts jobs and shows results.
"""

from __future__ import annotations

import pathlib
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .module_widget import ModuleWidget
from .widgets import CACHE_SETTINGS_KEY, applyCacheFolderSetting, ensureDependencies


#
# Parameter node
#
@parameterNodeWrapper
class CTDiffusionSRParameterNode:
    """The module's settings, saved with the scene.

    factor 0 = suggested from the slice spacing; steps 0 = the posterior-mean estimate (N > 0: a posterior
    sample in N steps); guidance 0 = the model's default; patch and overlap 0 = automatic; outputVolume
    None = a new node; adaptToScan (on by default): first fine-tune a copy of the model for adaptSteps steps
    on the input's own in-plane detail (400 take about 40 seconds on 2 idle CPU cores). allowInterspaced and
    allowNonCT (off): run on an interspaced DICOM series, or on intensities that do not look like CT in HU, which
    are refused otherwise.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    resultVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    factor: Annotated[int, WithinRange(0, 8)] = 0
    targetSpacing: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    axis: Annotated[str, Choice(["auto", "z", "y", "x"])] = "auto"
    weights: str = ""
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    guidance: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    adaptToScan: bool = True
    adaptSteps: Annotated[int, WithinRange(1, 100000)] = 400  # DiffusionCore.sr.adapt.DEFAULT_ADAPT_STEPS
    patchDepth: Annotated[int, WithinRange(0, 512)] = 0
    patchHeight: Annotated[int, WithinRange(0, 1024)] = 0
    patchWidth: Annotated[int, WithinRange(0, 1024)] = 0
    overlapDepth: Annotated[int, WithinRange(0, 256)] = 0
    overlapHeight: Annotated[int, WithinRange(0, 512)] = 0
    overlapWidth: Annotated[int, WithinRange(0, 512)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    threads: Annotated[int, WithinRange(0, 1024)] = 0
    numSamples: Annotated[int, WithinRange(1, 16)] = 1
    dataConsistency: bool = True
    allowInterspaced: bool = False
    allowNonCT: bool = False
    showUncertainty: bool = True
    fadeOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    evaluationFactor: Annotated[int, WithinRange(2, 8)] = 4
    trainingFamily: Annotated[str, Choice(["throughplane", "sr", "vae", "xray"])] = "throughplane"
    trainingDataFolder: pathlib.Path = pathlib.Path()
    trainingUseSceneVolumes: bool = False
    trainingOutputFolder: pathlib.Path = pathlib.Path()
    trainingDevice: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    trainingResume: bool = False
    trainingOverwrite: bool = False
    trainingFromShippedWeights: bool = False
    trainingExtraArguments: str = ""


#
# CTDiffusionSRLogic
#
class CTDiffusionSRLogic(ScriptedLoadableModuleLogic):
    """Scripting API on ``slicer.mrmlScene``; the work itself is in CTDiffusionSRLib (Qt-free).

    Example (Slicer's Python console)::

        logic = slicer.util.getModuleLogic("CTDiffusionSR")
        result = logic.process(slicer.util.getNode("CT_01"), factor=4)
    """

    def getParameterNode(self):
        return CTDiffusionSRParameterNode(super().getParameterNode())

    @staticmethod
    def settingsFrom(p):
        """SRSettings from the parameter node (None when DiffusionCore cannot be imported yet)."""
        try:
            from CTDiffusionSRLib.sr_logic import SRSettings
        except ImportError:
            return None
        return SRSettings(
            factor=p.factor,
            target_spacing=p.targetSpacing,
            axis=p.axis,
            weights=p.weights,
            steps=p.steps,
            guidance=p.guidance,
            device=p.device,
            patch_size=(p.patchDepth, p.patchHeight, p.patchWidth),
            overlap=(p.overlapDepth, p.overlapHeight, p.overlapWidth),
            seed=p.seed,
            threads=p.threads,
            num_samples=p.numSamples,
            data_consistency=p.dataConsistency,
            allow_interspaced=p.allowInterspaced,
            allow_non_ct=p.allowNonCT,
            adapt_to_scan=p.adaptToScan,
            adapt_steps=p.adaptSteps,
        )

    @staticmethod
    def inputProblem(node, settings) -> str:
        """Why Apply is disabled ("" when it is not): the input's checks, then its intensities (NaN/Inf, constant,
        not CT in HU unless "Allow non-CT intensities" is ticked), read once per change of the node or that box."""
        if node is None:
            return _("Select an input CT volume.")
        if settings is None:  # packages not installed yet: Apply installs them first
            return ""
        from CTDiffusionSRLib.sr_logic import check_sr_input, remembered_intensity_problem

        return check_sr_input(node, settings) or remembered_intensity_problem(node, settings)

    def createJob(self, inputNode, settings, outputNode=None, onLine=None):
        from CTDiffusionSRLib.sr_logic import SRJob

        return SRJob(slicer.mrmlScene, inputNode, settings, output_node=outputNode, on_line=onLine)

    def createEvaluationJob(self, inputNode, factor: int, settings, onLine=None):
        from CTDiffusionSRLib.sr_logic import EvaluationJob

        return EvaluationJob.for_settings(slicer.mrmlScene, inputNode, factor, settings, on_line=onLine)

    def process(self, inputNode, outputNode=None, timeout: float | None = None, **settings):
        """Run the super-resolution and wait (scripts, self-test). Returns the result node.

        Raises:
            RuntimeError: the job failed (its error line is the message).
        """
        from CTDiffusionSRLib.sr_logic import SRSettings

        job = self.createJob(inputNode, SRSettings(**settings), outputNode)
        return job.run_for_result(timeout, "super-resolution")

    def processWithCLIModule(self, inputNode, outputNode, wait: bool = True, **parameters):
        """Run the CTDiffusionSRBatch CLI module through Slicer's CLI machinery (``slicer.cli.run``).

        The same command-line module the widget's background job runs, here driven by Slicer (its
        temporary files, its progress and cancel in the CLI node). Parameter names are those of
        CTDiffusionSRBatch.xml, e.g. ``factor=4, adaptSteps=400, device="cuda"``. The output file carries the
        provenance, so the output node is labelled synthetic when Slicer reads it back
        (:func:`CTDiffusionSRLib.mrml_io.recognise_result_file`), but it is not placed beside the input and has no
        link to it: use :meth:`process` for a result beside the input that export ties to its patient. Slicer hands
        the CLI the input in its own frame (its storage node leaves a parent transform out), so the result is in
        that frame too: with ``wait`` it is put under the input's transform, as :meth:`process` puts its result;
        without, do that yourself when the CLI node completes (``outputNode.SetAndObserveTransformNodeID(
        inputNode.GetTransformNodeID())``).
        """
        cliParameters = {"inputVolume": inputNode.GetID(), "outputVolume": outputNode.GetID(), **parameters}
        cliNode = slicer.cli.run(
            slicer.modules.ctdiffusionsrbatch, None, cliParameters, wait_for_completion=wait
        )
        if wait and cliNode.GetStatus() == cliNode.Completed:
            from CTDiffusionSRLib.mrml_io import follow_transform

            follow_transform(inputNode, outputNode)
        return cliNode

    # -- views ----------------------------------------------------------------------------------------
    def compareSideBySide(self, inputNode, resultNode) -> None:
        from CTDiffusionSRLib import views

        views.show_side_by_side(slicer.mrmlScene, inputNode, resultNode)
        slicer.util.resetSliceViews()

    def compareFade(self, inputNode, resultNode, opacity: float) -> None:
        from CTDiffusionSRLib import views

        views.show_fade(slicer.mrmlScene, inputNode, resultNode, opacity)
        slicer.util.resetSliceViews()

    def setFade(self, opacity: float) -> None:
        from CTDiffusionSRLib import views

        views.set_fade(slicer.mrmlScene, opacity)

    def showUncertainty(self, baseNode, uncertaintyNode) -> None:
        from CTDiffusionSRLib import views

        views.show_overlay(slicer.mrmlScene, baseNode, uncertaintyNode, 0.5)

    def showTable(self, tableNode) -> None:
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()


#
# SRWidget
#
class SRWidget(ModuleWidget):
    """The CT Diffusion SR panel: super-resolution, comparison views, evaluation, cache folder, training."""

    family = "sr"
    uiPath = pathlib.Path(__file__).parent.parent / "Resources" / "UI" / "CTDiffusionSR.ui"
    logicClass = CTDiffusionSRLogic

    def setupModuleWidgets(self) -> None:
        self.ui.compareSideBySideButton.connect("clicked(bool)", self.onCompareSideBySide)
        self.ui.compareFadeButton.connect("clicked(bool)", self.onCompareFade)
        self.ui.fadeSlider.connect("valueChanged(double)", self.onFadeChanged)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluateButton)
        self.ui.cacheFolderPathLineEdit.currentPath = applyCacheFolderSetting()
        self.ui.cacheFolderPathLineEdit.connect("currentPathChanged(QString)", self.onCacheFolderChanged)

    def initializeParameterNode(self) -> None:
        """The module's parameter node; an empty input becomes the scene's first scalar volume."""
        super().initializeParameterNode()
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def inputProblem(self, p) -> str:
        return self.logic.inputProblem(p.inputVolume, self.logic.settingsFrom(p))

    def applyTexts(self) -> tuple[str, str]:
        return (
            _("Super-resolve the input into a new synthetic volume."),
            _("Stop the running job; nothing is added to the scene."),
        )

    def updateResultButtons(self, p) -> None:
        self.ui.evaluateButton.enabled = bool(p and p.inputVolume) and not self.monitor.running  # one job at a time
        if self.monitor.running:
            return
        haveResult = bool(p and p.inputVolume and p.resultVolume)
        self.ui.compareSideBySideButton.enabled = haveResult
        self.ui.compareFadeButton.enabled = haveResult
        self.ui.exportResultButton.enabled = haveResult

    def onCacheFolderChanged(self, path: str) -> None:
        """Weights imported there are listed at once (and Apply judged on them), not after the module is re-entered."""
        qt.QSettings().setValue(CACHE_SETTINGS_KEY, path)
        applyCacheFolderSetting()
        self.fillWeights()
        self._checkCanApply()

    # -- running ----------------------------------------------------------------------------------------
    def startJob(self, p) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start the super-resolution."), waitCursor=True):
            job = self.logic.createJob(
                p.inputVolume, self.logic.settingsFrom(p), p.outputVolume, self.monitor.queueLine
            )
            self.monitor.start(job, _("Super-resolution of {name}").format(name=p.inputVolume.GetName()))

    def onEvaluateButton(self) -> None:
        if self.monitor.running or not ensureDependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not start the evaluation."), waitCursor=True):
            job = self.logic.createEvaluationJob(
                p.inputVolume, p.evaluationFactor, self.logic.settingsFrom(p), self.monitor.queueLine
            )
            self.monitor.start(job, _("Evaluation on {name}").format(name=p.inputVolume.GetName()))
        self._checkCanApply()

    def failureText(self, error: str) -> str:
        return _("The job failed: {error}").format(error=error)

    def showResult(self, job) -> None:
        """An evaluation shows its table; a super-resolution becomes the result, faded over the input (or
        its uncertainty map shown)."""
        p = self._parameterNode
        if getattr(job, "table_node", None) is not None:
            self.logic.showTable(job.table_node)
            return
        result = job.result_nodes[0]
        p.resultVolume = result
        p.uncertaintyVolume = getattr(job, "uncertainty_node", None)
        source = self.sourceOf(result)
        if source is None:  # its input was removed while the job ran, and the user did not choose another
            slicer.util.setSliceViewerLayers(background=result, foreground=None, fit=True)
        elif p.uncertaintyVolume and p.showUncertainty:
            self.logic.showUncertainty(source, p.uncertaintyVolume)
        else:
            self.logic.compareFade(source, result, p.fadeOpacity)
        self._checkCanApply()

    # -- compare ----------------------------------------------------------------------------------------
    def sourceOf(self, result):
        """The volume ``result`` was made from (the input may have been changed since). For a result that does not
        record it (saved by an older version, or its input removed from the scene), the current input once the user
        confirms that it is that scan; else None, and the status line says why nothing is compared
        (:func:`CTDiffusionSRLib.mrml_io.comparison_source`)."""
        from CTDiffusionSRLib.mrml_io import comparison_source

        source, notice = comparison_source(result, self._parameterNode.inputVolume)
        if not notice:
            return source
        self.ui.statusLabel.text = notice
        if source is None or not slicer.util.confirmOkCancelDisplay(notice, _("Compare with the input")):
            return None
        return source

    def onCompareSideBySide(self) -> None:
        p = self._parameterNode
        source = self.sourceOf(p.resultVolume)
        if source is not None:
            self.logic.compareSideBySide(source, p.resultVolume)

    def onCompareFade(self) -> None:
        p = self._parameterNode
        source = self.sourceOf(p.resultVolume)
        if source is not None:
            self.logic.compareFade(source, p.resultVolume, p.fadeOpacity)

    def onFadeChanged(self, value: float) -> None:
        self.logic.setFade(value)
