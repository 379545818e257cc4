"""X-ray to CT: a synthetic CT volume from one radiograph with a cascaded diffusion model.

Module, widget, logic and self-test in the layout of Slicer's scripted-module template. The work is done by
XrayToCTLib (no Qt) which runs the XrayToCTGenerate command-line module in a background process; each
finished stage updates the result node, so the 64^3 stage-1 preview appears first. Shares the job monitor,
dependency handling and training panel with the CT Diffusion SR module (declared as a dependency).
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Annotated

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


#
# XrayToCT
#
class XrayToCT(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("X-ray to CT")
        self.parent.categories = ["Image Synthesis"]
        self.parent.dependencies = ["CTDiffusionSR"]
        self.parent.contributors = ["SlicerCTDiffusion contributors"]
        self.parent.helpText = _("""
Generates a SYNTHETIC CT volume from a single radiograph (PA or lateral) with a cascaded diffusion model:
stage 1 (64^3) appears first as a preview, then stages 2 and 3 refine it. The projection error of each
stage (how well the generated CT re-projects onto the radiograph) is shown. The result is a plausible
anatomy consistent with the projection, not a measurement: never use it for diagnosis.
See the <a href="https://github.com/SlicerCTDiffusion/SlicerCTDiffusion">documentation</a>.
""")
        self.parent.acknowledgementText = _("Built on DiffusionCore (PyTorch).")
        from CTDiffusionSRLib.slicer_version import check_slicer_version

        check_slicer_version(self.parent.title)


#
# Parameter node
#
@parameterNodeWrapper
class XrayToCTParameterNode:
    """The module's settings, saved with the scene (0 = the model's default / automatic)."""

    inputRadiograph: vtkMRMLScalarVolumeNode | vtkMRMLVectorVolumeNode
    referenceVolume: vtkMRMLScalarVolumeNode
    resultVolume: vtkMRMLScalarVolumeNode
    view: Annotated[str, Choice(["pa", "lateral"])] = "pa"
    invertIntensities: bool = False
    numStages: Annotated[int, WithinRange(1, 3)] = 3
    fieldOfView: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    weights: str = ""
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    trainingFamily: Annotated[str, Choice(["xray", "sr", "vae"])] = "xray"
    trainingDataFolder: pathlib.Path = pathlib.Path()
    trainingUseSceneVolumes: bool = False
    trainingOutputFolder: pathlib.Path = pathlib.Path()
    trainingDevice: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    trainingResume: bool = False
    trainingOverwrite: bool = False
    trainingExtraArguments: str = ""


#
# XrayToCTWidget
#
class XrayToCTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        from CTDiffusionSRLib.widgets import JobMonitor, TrainingPanel, applyCacheFolderSetting

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/XrayToCT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = XrayToCTLogic()
        applyCacheFolderSetting()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.monitor = JobMonitor(self.ui.progressBar, self.ui.statusLabel, self.ui.logTextEdit, self.onJobFinished)
        self.monitor.timer.connect("timeout()", self.onStagePoll)
        self.ui.progressBar.visible = False
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.weightsComboBox.connect("currentTextChanged(QString)", self.onWeightsChanged)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.exportResultButton.connect("clicked(bool)", self.onExportResult)
        self.training = TrainingPanel(self.ui, lambda: self._parameterNode, "xray")
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
            input_problem=self.logic.inputProblem(p.inputRadiograph) if p else _("No parameter node."),
            weights_problem=weights_problem("xray", p.weights) if p else "",
            action=_("Generate a synthetic CT from the radiograph."),
            cancel=_("Stop the generation; the partial result is removed."),
        )
        self.ui.applyButton.text = state.text
        self.ui.applyButton.enabled = state.enabled
        self.ui.applyButton.toolTip = state.tooltip
        self.ui.exportResultButton.enabled = bool(p and p.resultVolume) and not self.monitor.running

    def fillWeights(self) -> None:
        from CTDiffusionSRLib.widgets import fillWeightsComboBox

        fillWeightsComboBox(self.ui.weightsComboBox, "xray", self._parameterNode.weights if self._parameterNode else "")

    def onWeightsChanged(self, text: str) -> None:
        if self._parameterNode:
            self._parameterNode.weights = text

    def onImportWeights(self) -> None:
        from CTDiffusionSRLib.widgets import importWeights

        name = importWeights("xray", self.ui.statusLabel)
        if name:
            self.fillWeights()
            self.ui.weightsComboBox.setCurrentText(name)

    def onApplyButton(self) -> None:
        from CTDiffusionSRLib.widgets import ensureDependencies

        if self.monitor.running:
            self.monitor.cancel()
            return
        if not ensureDependencies():
            return
        from XrayToCTLib import photometric_note

        p = self._parameterNode
        self.ui.projectionErrorLabel.text = "-"
        # Slicer's DICOM reader already inverts MONOCHROME1 pixels (bone bright): never invert them again
        note = photometric_note(self.logic.photometricInterpretation(p.inputRadiograph))
        if note:
            self.ui.logTextEdit.appendPlainText(note)
        with slicer.util.tryWithErrorDisplay(_("Could not start the generation."), waitCursor=True):
            job = self.logic.createJob(p.inputRadiograph, self.logic.settingsFrom(p), p.referenceVolume, self.monitor.queueLine)
            self.monitor.start(job, _("X-ray to CT from {name}").format(name=p.inputRadiograph.GetName()))
        self._shownStages = 0
        self._checkCanApply()

    def onStagePoll(self) -> None:
        """After each stage: show the preview node in the slice views and the projection errors."""
        job = self.monitor.job
        if job is None or not job.stage_errors:
            return
        self.ui.projectionErrorLabel.text = self.logic.formatProjectionErrors(job.stage_errors)
        if job.preview_node is not None and len(job.stages_shown) != self._shownStages:
            self._shownStages = len(job.stages_shown)
            slicer.util.setSliceViewerLayers(background=job.preview_node, fit=True)

    def onExportResult(self) -> None:
        from CTDiffusionSRLib.widgets import exportResultWithDialog

        exportResultWithDialog(self._parameterNode.resultVolume)

    def onJobFinished(self, job, state) -> None:
        from CTDiffusionSRLib.process import JobState

        self._checkCanApply()
        if state == JobState.FAILED:
            slicer.util.errorDisplay(_("The generation failed: {error}").format(error=job.error))
            return
        if state != JobState.COMPLETED:
            return
        result = job.result_nodes[0]
        self._parameterNode.resultVolume = result
        self.ui.projectionErrorLabel.text = self.logic.formatProjectionErrors(job.stage_errors)
        if job.reference_metrics:
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in job.reference_metrics.items())
            self.ui.statusLabel.text += " " + _("Against the reference CT: {metrics}.").format(metrics=metrics)
        slicer.util.setSliceViewerLayers(background=result, fit=True)


#
# XrayToCTLogic
#
class XrayToCTLogic(ScriptedLoadableModuleLogic):
    """Scripting API on ``slicer.mrmlScene``; the work itself is in XrayToCTLib (Qt-free).

    Example::

        logic = slicer.util.getModuleLogic("XrayToCT")
        ct = logic.process(slicer.util.getNode("chest PA"), num_stages=3)
    """

    def getParameterNode(self):
        return XrayToCTParameterNode(super().getParameterNode())

    @staticmethod
    def settingsFrom(p):
        from XrayToCTLib import XraySettings

        return XraySettings(
            num_stages=p.numStages,
            view=p.view,
            field_of_view=p.fieldOfView,
            invert=p.invertIntensities,
            weights=p.weights,
            steps=p.steps,
            seed=p.seed,
            device=p.device,
        )

    @staticmethod
    def inputProblem(node) -> str:
        if node is None:
            return _("Select a radiograph (load a DICOM CR/DX, PNG or JPEG image).")
        try:
            from XrayToCTLib import check_xray_input
        except ImportError:  # packages not installed yet: Apply installs them first
            return ""
        return check_xray_input(node)

    @staticmethod
    def photometricInterpretation(node) -> str:
        """The DICOM Photometric Interpretation of the file the node was loaded from ("" when not DICOM)."""
        uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split() if node is not None else []
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return ""
        path = database.fileForInstance(uids[0])
        return database.fileValue(path, "0028,0004").strip() if path else ""

    @staticmethod
    def formatProjectionErrors(stageErrors: dict) -> str:
        """One line per stage: re-projection PSNR (dB) and NCC against the input radiograph."""
        lines = []
        for stage in sorted(stageErrors):
            figures = stageErrors[stage] or {}
            psnr, ncc = figures.get("projection_psnr"), figures.get("projection_ncc")
            text = ", ".join(
                part for part in (
                    f"PSNR {psnr:.1f} dB" if psnr is not None else "",
                    f"NCC {ncc:.3f}" if ncc is not None else "",
                ) if part
            )
            lines.append(_("stage {stage}: {figures}").format(stage=stage, figures=text or _("n/a")))
        return "\n".join(lines) or "-"

    def createJob(self, inputNode, settings, referenceNode=None, onLine=None):
        from XrayToCTLib import XrayJob

        return XrayJob(slicer.mrmlScene, inputNode, settings, reference_node=referenceNode, on_line=onLine)

    def process(self, inputNode, referenceNode=None, timeout: float | None = None, **settings):
        """Generate and wait (scripts, self-test). Returns the result node.

        Raises:
            RuntimeError: the job failed (its error line is the message).
        """
        from CTDiffusionSRLib.process import JobState
        from XrayToCTLib import XraySettings

        job = self.createJob(inputNode, XraySettings(**settings), referenceNode)
        start = time.time()
        state = job.run(timeout)
        logging.info("x-ray to CT %s in %.1f s", state.value, time.time() - start)
        if state != JobState.COMPLETED:
            raise RuntimeError(job.error)
        return job.result_nodes[0]


#
# XrayToCTTest
#
class XrayToCTTest(ScriptedLoadableModuleTest):
    """Self-test: a synthetic radiograph through the tiny random-weight cascade (one stage, CPU)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GenerationOnSyntheticRadiograph()

    def test_GenerationOnSyntheticRadiograph(self):
        from CTDiffusionSRLib.dependencies import self_test_skip_reason

        reason = self_test_skip_reason()
        if reason:  # e.g. the extension build machines, which have no torch: pass with the reason shown
            logging.warning(reason)
            self.delayDisplay(reason)
            return

        import numpy as np
        from CTDiffusionSRLib import mrml_io
        from CTDiffusionSRLib.testing import phantom_radiograph
        from vtk.util import numpy_support

        self.delayDisplay(_("Creating a synthetic radiograph"))
        pixels = phantom_radiograph(64)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Phantom PA")
        image = vtk.vtkImageData()
        image.SetDimensions(64, 64, 1)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(pixels.ravel(), deep=True))
        node.SetAndObserveImageData(image)
        node.SetSpacing(5.0, 5.0, 1.0)

        self.delayDisplay(_("Generating with the tiny test model"))
        result = XrayToCTLogic().process(node, num_stages=1, steps=2, device="cpu", tiny_test_model=True, timeout=300)
        volume = mrml_io.volume_from_node(result)
        self.assertEqual(len(volume.shape), 3)
        self.assertTrue(np.isfinite(volume.array).all())
        self.assertEqual(result.GetName(), "Phantom PA CT stage 1 (synthetic)")
        self.assertEqual(result.GetAttribute("CTDiffusion.Synthetic"), "true")
        self.delayDisplay(_("Test passed"))
