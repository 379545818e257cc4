"""X-ray to CT: a synthetic CT volume from one radiograph with a cascaded diffusion model.

A thin module shell in the SlicerNNUnet layout: the module description, a widget that builds the panel of
XrayToCTLib.xray_widget (where the parameter node and the scripting logic live too), and the self-test.
The panel shares its lifecycle, job monitor, dependency handling and training panel with the CT Diffusion SR
module through CTDiffusionSRLib (declared as a dependency), never through that module's file. The work is
done by the Qt-free XrayToCTLib, which runs the XrayToCTGenerate command-line module in a background process.
"""

from __future__ import annotations

import logging

import slicer
import vtk
from CTDiffusionSRLib.module_widget import reloadModules
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from XrayToCTLib.xray_widget import XrayToCTLogic, XrayToCTParameterNode, XrayWidget

#: The names scripts and the self-test use; the logic and the parameter node are XrayToCTLib.xray_widget's.
__all__ = ["XrayToCT", "XrayToCTLogic", "XrayToCTParameterNode", "XrayToCTTest", "XrayToCTWidget"]


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
Generates a SYNTHETIC CT volume from a single radiograph with a cascaded diffusion model. The shipped weights
(xray-default) have its first stage only (64^3, frontal PA/AP views, trained on two chest CTs); with weights of more
stages, each stage is shown as a preview while the next refines it (128^3, then 256^3). The projection error of each
stage (how well the generated CT re-projects onto the radiograph) is shown. The result is a plausible
anatomy consistent with the projection, not a measurement: never use it for diagnosis.
See the <a href="https://github.com/SlicerCTDiffusion/SlicerCTDiffusion">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Built on DiffusionCore (PyTorch).
The shipped weights were trained on LIDC-IDRI-0001 (Armato et al., Med Phys 2011; TCIA; CC BY 3.0) and
Lung-PET-CT-Dx A0001 (Li et al., TCIA 2020; CC BY 4.0): see the model cards in docs/model_cards.
""")
        from CTDiffusionSRLib.slicer_version import check_slicer_version

        check_slicer_version(self.parent.title)


#
# XrayToCTWidget
#
class XrayToCTWidget(ScriptedLoadableModuleWidget):
    """The module's panel: builds XrayToCTLib.xray_widget.XrayWidget and forwards its lifecycle."""

    def __init__(self, parent=None) -> None:
        self.logic = None
        self.widget = None
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.widget = XrayWidget(self.parent)
        self.logic = self.widget.logic
        self.layout.addWidget(self.widget.uiWidget)

    def cleanup(self) -> None:
        if self.widget:
            self.widget.cleanup()

    def enter(self) -> None:
        self.widget.enter()

    def exit(self) -> None:
        self.widget.exit()

    def onReload(self) -> None:
        """Re-read the panel's Lib files too: Slicer's Reload re-reads only this file."""
        reloadModules("CTDiffusionSRLib.widgets", "CTDiffusionSRLib.module_widget", "XrayToCTLib.xray_widget")
        ScriptedLoadableModuleWidget.onReload(self)


#
# XrayToCTTest
#
class XrayToCTTest(ScriptedLoadableModuleTest):
    """Self-test: a synthetic radiograph through the tiny random-weight cascade (one stage, CPU).

    Run it from the module's "Reload and Test" button (developer mode) or from Slicer's Python console with
    ``slicer.selfTests["XrayToCT"]()``.
    """

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
        result = XrayToCTLogic().process(
            node, num_stages=1, steps=2, device="cpu", tiny_test_model=True, timeout=300
        )
        volume = mrml_io.volume_from_node(result)
        self.assertEqual(len(volume.shape), 3)
        self.assertTrue(np.isfinite(volume.array).all())
        self.assertEqual(result.GetName(), "Phantom PA CT (synthetic)")
        self.assertEqual(result.GetAttribute("CTDiffusion.Synthetic"), "true")
        self.delayDisplay(_("Test passed"))
