"""The X-ray to CT panel, its parameter node and its scripting logic (Slicer and Qt glue).

The module file (XrayToCT.py) only builds :class:`XrayWidget` and forwards its lifecycle. The lifecycle,
the job monitor, the dependency handling and the training panel are shared with the CT Diffusion SR module
through CTDiffusionSRLib (``module_widget``, ``widgets``), never through its module file. The work is done by
the Qt-free xray_logic, which runs the XrayToCTGenerate command-line module in a background process; each
finished stage updates the result node, so the 64^3 stage-1 preview appears first; a cancel or a failure during a
later stage keeps the last stage shown, and the panel says so.
"""

from __future__ import annotations

import pathlib
from typing import Annotated

import slicer
from CTDiffusionSRLib.module_widget import ModuleWidget
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic


#
# Parameter node
#
@parameterNodeWrapper
class XrayToCTParameterNode:
    """The module's settings, saved with the scene (0 = the model's default / automatic)."""

    inputRadiograph: vtkMRMLScalarVolumeNode | vtkMRMLVectorVolumeNode
    referenceVolume: vtkMRMLScalarVolumeNode
    resultVolume: vtkMRMLScalarVolumeNode
    view: Annotated[str, Choice(["auto", "pa", "lateral"])] = "auto"
    invertIntensities: bool = False
    numStages: Annotated[int, WithinRange(0, 3)] = 0
    fieldOfView: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    weights: str = ""
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    threads: Annotated[int, WithinRange(0, 1024)] = 0
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    trainingFamily: Annotated[str, Choice(["xray", "throughplane", "sr", "vae"])] = "xray"
    trainingDataFolder: pathlib.Path = pathlib.Path()
    trainingUseSceneVolumes: bool = False
    trainingOutputFolder: pathlib.Path = pathlib.Path()
    trainingDevice: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    trainingResume: bool = False
    trainingOverwrite: bool = False
    trainingFromShippedWeights: bool = False
    trainingExtraArguments: str = ""


#
# XrayToCTLogic
#
class XrayToCTLogic(ScriptedLoadableModuleLogic):
    """Scripting API on ``slicer.mrmlScene``; the work itself is in XrayToCTLib (Qt-free).

    Example::

        logic = slicer.util.getModuleLogic("XrayToCT")
        ct = logic.process(slicer.util.getNode("chest PA"))
    """

    def getParameterNode(self):
        return XrayToCTParameterNode(super().getParameterNode())

    @staticmethod
    def settingsFrom(p):
        from .xray_logic import XraySettings

        return XraySettings(
            num_stages=p.numStages,
            view=p.view,
            field_of_view=p.fieldOfView,
            invert=p.invertIntensities,
            weights=p.weights,
            steps=p.steps,
            seed=p.seed,
            threads=p.threads,
            device=p.device,
        )

    @staticmethod
    def inputProblem(node) -> str:
        if node is None:
            return _("Select a radiograph (load a DICOM CR/DX, PNG or JPEG image).")
        try:
            from .xray_logic import check_xray_input
        except ImportError:  # packages not installed yet: Apply installs them first
            return ""
        return check_xray_input(node)

    @staticmethod
    def referenceProblem(node) -> str:
        """Why the chosen reference CT cannot score the result ("" for none, or a usable one): said on the disabled
        Apply button, before the generation, not after it."""
        if node is None:
            return ""
        try:
            from .xray_logic import check_reference_input
        except ImportError:  # packages not installed yet: Apply installs them first, and the job checks it
            return ""
        return check_reference_input(node)

    @staticmethod
    def photometricInterpretation(node) -> str:
        """The DICOM Photometric Interpretation of the file the node was loaded from ("" when not DICOM)."""
        from .xray_logic import photometric_interpretation

        return photometric_interpretation(node)

    @staticmethod
    def formatProjectionErrors(stageErrors: dict) -> str:
        """One line per stage: re-projection PSNR (dB) and NCC against the input radiograph."""
        lines = []
        for stage in sorted(stageErrors):
            figures = stageErrors[stage] or {}
            psnr, ncc = figures.get("projection_psnr"), figures.get("projection_ncc")
            text = ", ".join(
                part
                for part in (
                    f"PSNR {psnr:.1f} dB" if psnr is not None else "",
                    f"NCC {ncc:.3f}" if ncc is not None else "",
                )
                if part
            )
            lines.append(_("stage {stage}: {figures}").format(stage=stage, figures=text or _("n/a")))
        return "\n".join(lines) or "-"

    def createJob(self, inputNode, settings, referenceNode=None, onLine=None):
        from .xray_logic import XrayJob

        return XrayJob(slicer.mrmlScene, inputNode, settings, reference_node=referenceNode, on_line=onLine)

    def process(self, inputNode, referenceNode=None, timeout: float | None = None, **settings):
        """Generate and wait (scripts, self-test). Returns the result node.

        Raises:
            RuntimeError: the job failed (its error line is the message).
        """
        from .xray_logic import XraySettings

        job = self.createJob(inputNode, XraySettings(**settings), referenceNode)
        return job.run_for_result(timeout, "x-ray to CT")


#
# XrayWidget
#
class XrayWidget(ModuleWidget):
    """The X-ray to CT panel: generation with a per-stage preview and projection errors, training."""

    family = "xray"
    uiPath = pathlib.Path(__file__).parent.parent / "Resources" / "UI" / "XrayToCT.ui"
    logicClass = XrayToCTLogic

    def setupModuleWidgets(self) -> None:
        self._shownStages = 0
        self.monitor.timer.connect("timeout()", self.onStagePoll)

    def inputProblem(self, p) -> str:
        return self.logic.inputProblem(p.inputRadiograph) or self.logic.referenceProblem(p.referenceVolume)

    def applyTexts(self) -> tuple[str, str]:
        return (
            _("Generate a synthetic CT from the radiograph."),
            _("Stop the generation; a stage already shown is kept as a lower-resolution result."),
        )

    def updateResultButtons(self, p) -> None:
        self.ui.exportResultButton.enabled = bool(p and p.resultVolume) and not self.monitor.running

    def startJob(self, p) -> None:
        from .xray_logic import photometric_note

        self.ui.projectionErrorLabel.text = "-"
        # Slicer's DICOM reader already inverts MONOCHROME1 pixels (bone bright): never invert them again
        note = photometric_note(self.logic.photometricInterpretation(p.inputRadiograph))
        if note:
            self.ui.logTextEdit.appendPlainText(note)
        with slicer.util.tryWithErrorDisplay(_("Could not start the generation."), waitCursor=True):
            job = self.logic.createJob(
                p.inputRadiograph, self.logic.settingsFrom(p), p.referenceVolume, self.monitor.queueLine
            )
            self.monitor.start(job, _("X-ray to CT from {name}").format(name=p.inputRadiograph.GetName()))
        self._shownStages = 0

    def onStagePoll(self) -> None:
        """After each stage: show the preview node in the slice views and the projection errors."""
        job = self.monitor.job
        if job is None or not job.stage_errors:
            return
        self.ui.projectionErrorLabel.text = self.logic.formatProjectionErrors(job.stage_errors)
        if job.preview_node is not None and len(job.stages_shown) != self._shownStages:
            self._shownStages = len(job.stages_shown)
            slicer.util.setSliceViewerLayers(background=job.preview_node, fit=True)

    def failureText(self, error: str) -> str:
        return _("The generation failed: {error}").format(error=error)

    def showResult(self, job) -> None:
        """The final volume becomes the result, with its projection errors and reference metrics."""
        result = job.result_nodes[0]
        self._parameterNode.resultVolume = result
        self.ui.projectionErrorLabel.text = self.logic.formatProjectionErrors(job.stage_errors)
        if job.reference_metrics:
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in job.reference_metrics.items())
            self.ui.statusLabel.text += " " + _("Against the reference CT: {metrics}.").format(
                metrics=metrics
            )
        slicer.util.setSliceViewerLayers(background=result, fit=True)
