"""CT Diffusion SR: thick-to-thin slice super-resolution of CT volumes with a latent diffusion model.

Module, widget, logic and self-test in the layout of Slicer's scripted-module template. The widget stays
thin: the work is done by CTDiffusionSRLib (no Qt, tested on real MRML) which runs the CTDiffusionSRBatch
command-line module in a background process; this file only binds widgets to the parameter node, polls the
job from a timer in the GUI thread, and shows results.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Annotated

import qt
import slicer
import vtk
from CTDiffusionSRLib.widgets import (
    CACHE_SETTINGS_KEY,
    JobMonitor,
    TrainingPanel,
    applyCacheFolderSetting,
    ensureDependencies,
    exportResultWithDialog,
    fillWeightsComboBox,
    importWeights,
)
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: QSettings key of the weights cache folder (exported to jobs as DIFFUSIONCORE_CACHE).


#
# CTDiffusionSR
#
class CTDiffusionSR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT Diffusion SR")
        self.parent.categories = ["Image Synthesis"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerCTDiffusion contributors"]
        self.parent.helpText = _("""
Thick-to-thin slice super-resolution of CT with a latent diffusion model (ResShift + IRControlNet).
Pick a thick-slice CT, keep the suggested factor, press Apply. The result is a NEW volume named
"... SR xN (synthetic)": a plausible thin-slice image, not a measurement. Do not use it for diagnosis.
"Adapt to this scan" first fine-tunes a copy of the model on the input's own in-plane detail (slower,
often sharper). "Evaluate on this volume" simulates thick slices from a thin CT and scores the model against cubic
interpolation. The Training section trains or fine-tunes models on your own data.
See the <a href="https://github.com/SlicerCTDiffusion/SlicerCTDiffusion">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Built on DiffusionCore (PyTorch). Method ideas from ResShift (Yue et al.) and ControlNet (Zhang et al.).
""")
        from CTDiffusionSRLib.slicer_version import check_slicer_version

        check_slicer_version(self.parent.title)
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Parameter node
#
@parameterNodeWrapper
class CTDiffusionSRParameterNode:
    """The module's settings, saved with the scene.

    factor 0 = suggested from the slice spacing; steps 0 = the posterior-mean estimate (N > 0: a posterior
    sample in N steps); guidance 0 = the model's default; patch and overlap 0 = automatic; outputVolume
    None = a new node; adaptToScan: first fine-tune a copy of the model for adaptSeconds on the input's own
    in-plane detail.
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
    adaptToScan: bool = False
    adaptSeconds: Annotated[float, WithinRange(0.0, 3600.0)] = 120.0
    patchDepth: Annotated[int, WithinRange(0, 512)] = 0
    patchHeight: Annotated[int, WithinRange(0, 1024)] = 0
    patchWidth: Annotated[int, WithinRange(0, 1024)] = 0
    overlapDepth: Annotated[int, WithinRange(0, 256)] = 0
    overlapHeight: Annotated[int, WithinRange(0, 512)] = 0
    overlapWidth: Annotated[int, WithinRange(0, 512)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    numSamples: Annotated[int, WithinRange(1, 16)] = 1
    dataConsistency: bool = True
    showUncertainty: bool = True
    fadeOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    evaluationFactor: Annotated[int, WithinRange(2, 8)] = 4
    trainingFamily: Annotated[str, Choice(["sr", "vae", "xray"])] = "sr"
    trainingDataFolder: pathlib.Path = pathlib.Path()
    trainingUseSceneVolumes: bool = False
    trainingOutputFolder: pathlib.Path = pathlib.Path()
    trainingDevice: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    trainingResume: bool = False
    trainingOverwrite: bool = False
    trainingExtraArguments: str = ""


#
# Sample Data module: the thick-slice chest CT and the PA radiograph (CTDiffusionSRLib.sample_data)
#
def registerSampleData() -> None:
    """Add one button per sample to the Sample Data module; each fetches through DiffusionCore's cache."""
    import SampleData
    from CTDiffusionSRLib.sample_data import SAMPLE_DATA_CATEGORY, SAMPLE_SOURCES, registration_arguments

    applyCacheFolderSetting()
    logic = SampleData.SampleDataLogic
    registered = {s.sampleName for s in logic.sampleDataSourcesByCategory(SAMPLE_DATA_CATEGORY)}
    moduleFolder = os.path.dirname(__file__)
    for source in SAMPLE_SOURCES:
        if source.title not in registered:  # a module reload must not add the buttons twice
            logic.registerCustomSampleDataSource(
                **registration_arguments(source, moduleFolder), customDownloader=loadSampleData
            )


def loadSampleData(dataSource):
    """Fetch one sample (sha256-checked, cached) and load it as a volume node; returns the node.

    ``dataSource`` is what the Sample Data button passes, or a name for scripts: ``loadSampleData("cxr-pa")``.
    A failure (offline and not cached, checksum mismatch) is shown in a dialog, then raised.
    """
    from CTDiffusionSRLib.sample_data import attribution, fetch_sample_file, source_for

    source = source_for(dataSource if isinstance(dataSource, str) else dataSource.sampleName)
    applyCacheFolderSetting()
    with slicer.util.tryWithErrorDisplay(_("Could not load the sample '{title}'.").format(title=source.title), waitCursor=True):
        slicer.util.showStatusMessage(_("Loading {title} (downloaded once, then from the cache)...").format(title=source.title))
        node = slicer.util.loadVolume(str(fetch_sample_file(source)), source.properties())
        logging.info(attribution(source))
        return node


#
# CTDiffusionSRWidget
#
class CTDiffusionSRWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTDiffusionSR.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTDiffusionSRLogic()
        applyCacheFolderSetting()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.monitor = JobMonitor(self.ui.progressBar, self.ui.statusLabel, self.ui.logTextEdit, self.onJobFinished)
        self.ui.progressBar.visible = False
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareSideBySideButton.connect("clicked(bool)", self.onCompareSideBySide)
        self.ui.compareFadeButton.connect("clicked(bool)", self.onCompareFade)
        self.ui.exportResultButton.connect("clicked(bool)", self.onExportResult)
        self.ui.fadeSlider.connect("valueChanged(double)", self.onFadeChanged)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluateButton)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.weightsComboBox.connect("currentTextChanged(QString)", self.onWeightsChanged)
        self.ui.cacheFolderPathLineEdit.currentPath = applyCacheFolderSetting()
        self.ui.cacheFolderPathLineEdit.connect("currentPathChanged(QString)", self.onCacheFolderChanged)
        self.training = TrainingPanel(self.ui, lambda: self._parameterNode, "sr")
        self.training.fillPresets()
        self.fillWeights()
        self.initializeParameterNode()

    def cleanup(self) -> None:
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
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

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
        from CTDiffusionSRLib.weights_choice import apply_state, weights_problem

        p = self._parameterNode
        state = apply_state(
            running=self.monitor.running,
            input_problem=self.logic.inputProblem(p.inputVolume, self.logic.settingsFrom(p)) if p else _("No parameter node."),
            weights_problem=weights_problem("sr", p.weights) if p else "",
            action=_("Super-resolve the input into a new synthetic volume."),
            cancel=_("Stop the running job; nothing is added to the scene."),
        )
        self.ui.applyButton.text = state.text
        self.ui.applyButton.enabled = state.enabled
        self.ui.applyButton.toolTip = state.tooltip
        if self.monitor.running:
            return
        haveResult = bool(p and p.inputVolume and p.resultVolume)
        self.ui.compareSideBySideButton.enabled = haveResult
        self.ui.compareFadeButton.enabled = haveResult
        self.ui.exportResultButton.enabled = haveResult
        self.ui.evaluateButton.enabled = bool(p and p.inputVolume) and not self.monitor.running

    # -- weights ----------------------------------------------------------------------------------------
    def fillWeights(self) -> None:
        fillWeightsComboBox(self.ui.weightsComboBox, "sr", self._parameterNode.weights if self._parameterNode else "")

    def onWeightsChanged(self, text: str) -> None:
        if self._parameterNode:
            self._parameterNode.weights = text

    def onImportWeights(self) -> None:
        name = importWeights("sr", self.ui.statusLabel)
        if name:
            self.fillWeights()
            self.ui.weightsComboBox.setCurrentText(name)

    def onCacheFolderChanged(self, path: str) -> None:
        qt.QSettings().setValue(CACHE_SETTINGS_KEY, path)
        applyCacheFolderSetting()

    # -- running ----------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self.monitor.running:
            self.monitor.cancel()
            return
        if not ensureDependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not start the super-resolution."), waitCursor=True):
            job = self.logic.createJob(p.inputVolume, self.logic.settingsFrom(p), p.outputVolume, self.monitor.queueLine)
            self.monitor.start(job, _("Super-resolution of {name}").format(name=p.inputVolume.GetName()))
        self._checkCanApply()

    def onEvaluateButton(self) -> None:
        if self.monitor.running or not ensureDependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not start the evaluation."), waitCursor=True):
            job = self.logic.createEvaluationJob(p.inputVolume, p.evaluationFactor, self.logic.settingsFrom(p), self.monitor.queueLine)
            self.monitor.start(job, _("Evaluation on {name}").format(name=p.inputVolume.GetName()))
        self._checkCanApply()

    def onJobFinished(self, job, state) -> None:
        from CTDiffusionSRLib.process import JobState

        self._checkCanApply()
        if state == JobState.FAILED:
            slicer.util.errorDisplay(_("The job failed: {error}").format(error=job.error))
            return
        if state != JobState.COMPLETED:
            return
        p = self._parameterNode
        if getattr(job, "table_node", None) is not None:
            self.logic.showTable(job.table_node)
            return
        result = job.result_nodes[0]
        p.resultVolume = result
        p.uncertaintyVolume = getattr(job, "uncertainty_node", None)
        if p.uncertaintyVolume and p.showUncertainty:
            self.logic.showUncertainty(p.inputVolume, p.uncertaintyVolume)
        else:
            self.logic.compareFade(p.inputVolume, result, p.fadeOpacity)
        self._checkCanApply()

    # -- compare ----------------------------------------------------------------------------------------
    def onCompareSideBySide(self) -> None:
        p = self._parameterNode
        self.logic.compareSideBySide(p.inputVolume, p.resultVolume)

    def onCompareFade(self) -> None:
        p = self._parameterNode
        self.logic.compareFade(p.inputVolume, p.resultVolume, p.fadeOpacity)

    def onFadeChanged(self, value: float) -> None:
        self.logic.setFade(value)

    def onExportResult(self) -> None:
        exportResultWithDialog(self._parameterNode.resultVolume)


#
# CTDiffusionSRLogic
#
class CTDiffusionSRLogic(ScriptedLoadableModuleLogic):
    """Scripting API on ``slicer.mrmlScene``; the work itself is in CTDiffusionSRLib (Qt-free).

    Example (Slicer's Python console)::

        logic = slicer.util.getModuleLogic("CTDiffusionSR")
        result = logic.process(slicer.util.getNode("CT_01"), factor=4, steps=15)
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
            num_samples=p.numSamples,
            data_consistency=p.dataConsistency,
            adapt_seconds=p.adaptSeconds if p.adaptToScan else 0.0,
        )

    @staticmethod
    def inputProblem(node, settings) -> str:
        """Why Apply is disabled ("" when it is not)."""
        if node is None:
            return _("Select an input CT volume.")
        if settings is None:  # packages not installed yet: Apply installs them first
            return ""
        from CTDiffusionSRLib.sr_logic import check_sr_input

        return check_sr_input(node, settings)

    def createJob(self, inputNode, settings, outputNode=None, onLine=None):
        from CTDiffusionSRLib.sr_logic import SRJob

        return SRJob(slicer.mrmlScene, inputNode, settings, output_node=outputNode, on_line=onLine)

    def createEvaluationJob(self, inputNode, factor: int, settings, onLine=None):
        from CTDiffusionSRLib.sr_logic import EvaluationJob

        methods = ("cubic", "sr")
        return EvaluationJob(
            slicer.mrmlScene, inputNode, factor=factor, methods=methods, weights=settings.weights,
            steps=settings.steps, device=settings.device, on_line=onLine,
        )

    def process(self, inputNode, outputNode=None, timeout: float | None = None, **settings):
        """Run the super-resolution and wait (scripts, self-test). Returns the result node.

        Raises:
            RuntimeError: the job failed (its error line is the message).
        """
        from CTDiffusionSRLib.process import JobState
        from CTDiffusionSRLib.sr_logic import SRSettings

        job = self.createJob(inputNode, SRSettings(**settings), outputNode)
        start = time.time()
        state = job.run(timeout)
        logging.info("super-resolution %s in %.1f s", state.value, time.time() - start)
        if state != JobState.COMPLETED:
            raise RuntimeError(job.error)
        return job.result_nodes[0]

    def processWithCLIModule(self, inputNode, outputNode, wait: bool = True, **parameters):
        """Run the CTDiffusionSRBatch CLI module through Slicer's CLI machinery (``slicer.cli.run``).

        The same command-line module the widget's background job runs, here driven by Slicer (its
        temporary files, its progress and cancel in the CLI node). Parameter names are those of
        CTDiffusionSRBatch.xml, e.g. ``factor=4, numSteps=15, device="cuda"``. The output node is not
        renamed or annotated: use :meth:`process` for a labelled result beside the input.
        """
        cliParameters = {"inputVolume": inputNode.GetID(), "outputVolume": outputNode.GetID(), **parameters}
        return slicer.cli.run(slicer.modules.ctdiffusionsrbatch, None, cliParameters, wait_for_completion=wait)

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
# CTDiffusionSRTest
#
class CTDiffusionSRTest(ScriptedLoadableModuleTest):
    """Self-test: super-resolve a small synthetic oblique CT with the tiny random-weight model on CPU.

    Run it from the module's "Reload and Test" button (developer mode) or
    ``slicer.util.getModuleTest("CTDiffusionSR").runTest()``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SuperResolutionOnSyntheticVolume()

    def test_SuperResolutionOnSyntheticVolume(self):
        from CTDiffusionSRLib.dependencies import self_test_skip_reason

        reason = self_test_skip_reason()
        if reason:  # e.g. the extension build machines, which have no torch: pass with the reason shown
            logging.warning(reason)
            self.delayDisplay(reason)
            return

        import numpy as np
        from CTDiffusionSRLib import mrml_io
        from CTDiffusionSRLib.testing import phantom_ct

        from DiffusionCore.degrade import thin_grid

        self.delayDisplay(_("Creating a synthetic thick-slice CT"))
        volume = phantom_ct()
        inputNode = mrml_io.add_volume_node(slicer.mrmlScene, volume, "Phantom CT")
        before = mrml_io.array_from_node(inputNode)

        self.delayDisplay(_("Super-resolving with the tiny test model"))
        logic = CTDiffusionSRLogic()
        result = logic.process(inputNode, factor=4, steps=2, device="cpu", tiny_test_model=True, timeout=300)

        expected = thin_grid(volume, 4, axis=0)
        got = mrml_io.volume_from_node(result)
        self.assertEqual(got.shape, tuple(expected.shape))
        self.assertTrue(np.allclose(got.origin, expected.origin, atol=1e-4))
        self.assertTrue(np.allclose(got.spacing, expected.spacing, atol=1e-6))
        self.assertEqual(result.GetName(), "Phantom CT SR x4 (synthetic)")
        self.assertEqual(result.GetAttribute("CTDiffusion.Synthetic"), "true")
        self.assertTrue(np.array_equal(mrml_io.array_from_node(inputNode), before))
        logic.compareFade(inputNode, result, 0.5)
        self.delayDisplay(_("Test passed"))
