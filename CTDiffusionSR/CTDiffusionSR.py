"""CT Diffusion SR: thick-to-thin slice super-resolution of CT volumes with a latent diffusion model.

A thin module shell in the SlicerNNUnet layout: the module description and its Sample Data hooks, a widget
that builds the panel of CTDiffusionSRLib.sr_widget (where the parameter node and the scripting logic live
too; the lifecycle shared with the X-ray to CT module is in CTDiffusionSRLib.module_widget), and the
self-test. The work is done by the Qt-free CTDiffusionSRLib, which runs the CTDiffusionSRBatch command-line
module in a background process.
"""

from __future__ import annotations

import logging
import os

import slicer
from CTDiffusionSRLib.module_widget import reloadModules
from CTDiffusionSRLib.sr_widget import CTDiffusionSRLogic, CTDiffusionSRParameterNode, SRWidget
from CTDiffusionSRLib.widgets import applyCacheFolderSetting, watchResultSaves
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

#: The names scripts and the self-test use; the logic and the parameter node are CTDiffusionSRLib.sr_widget's.
__all__ = ["CTDiffusionSR", "CTDiffusionSRLogic", "CTDiffusionSRParameterNode", "CTDiffusionSRTest",
           "CTDiffusionSRWidget", "loadSampleData", "registerSampleData"]  # fmt: skip


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
Thick-to-thin slice super-resolution of CT. The shipped weights (sr-default) are a through-plane predictor network
trained on two chest CTs; weights with a latent diffusion stage (ResShift + IRControlNet), trained in the Training
section or imported, refine its estimate. Pick a thick-slice CT, keep the suggested factor, press Apply. The result is a NEW volume named
"... SR xN (synthetic)": a plausible thin-slice image, not a measurement. Do not use it for diagnosis.
"Adapt to this scan" (on by default) first fine-tunes a copy of the model on the input's own in-plane
detail for 400 steps (about 40 seconds on 2 idle CPU cores); untick it for the model as installed. "Evaluate on this volume" simulates thick slices from a thin CT and scores the model, as Apply runs it, against cubic
interpolation with and without data consistency. The Training section trains or fine-tunes models on your own data.
See the <a href="https://github.com/SlicerCTDiffusion/SlicerCTDiffusion">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Built on DiffusionCore (PyTorch). Method ideas from ResShift (Yue et al.) and ControlNet (Zhang et al.).
The shipped weights were trained on LIDC-IDRI-0001 (Armato et al., Med Phys 2011; TCIA; CC BY 3.0) and
Lung-PET-CT-Dx A0001 (Li et al., TCIA 2020; CC BY 4.0): see the model cards in docs/model_cards.
""")
        from CTDiffusionSRLib.slicer_version import check_slicer_version

        check_slicer_version(self.parent.title)
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", watchResultSaves)  # results loaded with a scene keep their label


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
    with slicer.util.tryWithErrorDisplay(
        _("Could not load the sample '{title}'.").format(title=source.title), waitCursor=True
    ):
        slicer.util.showStatusMessage(
            _("Loading {title} (downloaded once, then from the cache)...").format(title=source.title)
        )
        node = slicer.util.loadVolume(str(fetch_sample_file(source)), source.properties())
        logging.info(attribution(source))
        return node


#
# CTDiffusionSRWidget
#
class CTDiffusionSRWidget(ScriptedLoadableModuleWidget):
    """The module's panel: builds CTDiffusionSRLib.sr_widget.SRWidget and forwards its lifecycle."""

    def __init__(self, parent=None) -> None:
        self.logic = None
        self.widget = None
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.widget = SRWidget(self.parent)
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
        reloadModules(
            "CTDiffusionSRLib.widgets", "CTDiffusionSRLib.module_widget", "CTDiffusionSRLib.sr_widget"
        )
        ScriptedLoadableModuleWidget.onReload(self)


#
# CTDiffusionSRTest
#
class CTDiffusionSRTest(ScriptedLoadableModuleTest):
    """Self-test: super-resolve a small synthetic oblique CT with the tiny random-weight model on CPU.

    Run it from the module's "Reload and Test" button (developer mode) or from Slicer's Python console with
    ``slicer.selfTests["CTDiffusionSR"]()``, the entry ScriptedLoadableModule registers for every module.
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
