"""The X-ray to CT module with big and awkward radiographs (probe 12): the input check read once per change of the
node and in little memory; the same "nothing to show" test in the panel and in the job's command; float64, colour
and integer radiographs; the temp disk checked before any work; a failure after the last stage that made the whole
result; the progress bar through every phase; more stages than the weights have; PyTorch's cache folder.

Real MRML nodes (slicer-core), real files, the tiny test model and real worker processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

import XrayToCTLib.xray_logic as xray_logic  # noqa: E402
from CTDiffusionSRLib.process import JobState  # noqa: E402
from CTDiffusionSRLib.testing import phantom_radiograph  # noqa: E402
from test_slicer_widgets import _open, panels, widgets  # noqa: E402, F401  (the Qt stand-in's fixtures)
from XrayToCTLib import XrayJob, XraySettings, check_xray_input, write_radiograph  # noqa: E402

from DiffusionCore.errors import InputError, OutputError  # noqa: E402
from DiffusionCore.xray.radiograph import read_radiograph  # noqa: E402

ONE_STAGE = XraySettings(num_stages=1, steps=1, device="cpu", tiny_test_model=True)
CLI = ROOT / "XrayToCT" / "CLI" / "XrayToCTGenerate.py"


def _node(scene, pixels: np.ndarray, name: str = "chest PA", spacing=(0.4, 0.4, 1.0)):
    """A volume node holding ``pixels`` ((H, W) scalar, or (H, W, C) as a vector node), as Slicer loads an image."""
    import vtk
    from vtk.util import numpy_support

    vector = pixels.ndim == 3
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(pixels.shape[1], pixels.shape[0], 1)
    flat = np.ascontiguousarray(pixels).reshape(pixels.shape[0] * pixels.shape[1], -1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat if vector else flat.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)  # LPS identity: shown as stored
    node.SetSpacing(*spacing)
    node.CreateDefaultDisplayNodes()
    return node


def _chest(size: int = 64, dtype=np.uint16) -> np.ndarray:
    return (phantom_radiograph(size) * 3000).astype(dtype)


def _node_pixels(node) -> np.ndarray:
    from vtk.util import numpy_support

    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())


# -- 1. the input check: once per change of the node, in little memory ---------------------------------------------
def test_the_input_check_reads_the_pixels_once_per_change_of_the_node(scene, panels, monkeypatch):  # noqa: F811
    """Every change of a setting (seed, steps, stages) and Apply converted the whole radiograph again, in the GUI
    thread: 2.7-3 s and 1.6 GB for a 6000x7000 screenshot, twice per change in the panel."""
    reads = []
    convert = xray_logic.radiograph_pixels
    monkeypatch.setattr(xray_logic, "radiograph_pixels", lambda *a, **k: reads.append(1) or convert(*a, **k))
    panel, p, ui = _open(panels.xray.XrayWidget)
    node = _node(scene, _chest())
    p.inputRadiograph = node
    read_at_selection = len(reads)
    assert read_at_selection >= 1 and ui.applyButton.enabled
    p.seed, p.steps, p.numStages, p.view = 7, 3, 1, "pa"  # settings that do not touch the radiograph
    assert check_xray_input(node) == "" and len(reads) == read_at_selection
    XrayJob(scene, node, ONE_STAGE)  # Apply's own check: the same verdict
    assert len(reads) == read_at_selection
    panel.cleanup()

    # an edit of the pixels, a rename, a transform: checked again, and the verdict follows
    _node_pixels(node)[:] = 1234
    node.GetImageData().Modified()
    assert check_xray_input(node).startswith("'chest PA' is blank") and len(reads) == read_at_selection + 1
    node.SetName("flat field")
    assert check_xray_input(node).startswith("'flat field' is blank")
    _node_pixels(node)[:] = _chest().ravel()
    node.GetImageData().Modified()
    assert check_xray_input(node) == ""
    import vtk

    warp = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    grid = vtk.vtkImageData()
    grid.SetDimensions(2, 2, 2)
    grid.SetSpacing(400, 400, 400)
    grid.SetOrigin(-200, -200, -200)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    warp.SetAndObserveTransformToParent(transform)
    node.SetAndObserveTransformNodeID(warp.GetID())
    assert "non-linear transform ('warp')" in check_xray_input(node)


def test_a_colour_radiograph_is_checked_in_about_one_float32_image_of_memory(scene):
    """The check made a float32 (H, W, 4) copy of an RGBA screenshot and (H, W, 3) differences: about 40 bytes per
    pixel (1.6 GB for 6000x7000). Now the channels are compared in row blocks: one float32 (H, W) image."""
    grey = np.tile(_chest(300, np.uint8), (4, 4))  # 1200x1200
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)  # a screenshot of a radiograph
    node = _node(scene, rgba, "screenshot")
    one_image = grey.size * 4
    tracemalloc.start()
    try:
        assert check_xray_input(node) == ""
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * one_image, f"{peak / one_image:.1f} float32 images"
    assert (_node_pixels(node)[:, 0] == grey.ravel()).all()  # the node is untouched


# -- 4. one "nothing to show" test, in the panel and in the job's command --------------------------------------------
def test_a_nearly_uniform_radiograph_is_refused_by_the_panel_as_the_command_refuses_it(scene, tmp_path):
    """A constant image with one other pixel passed the panel and failed in the worker: "the radiograph is blank (all
    pixels have the same value); check the file" (false, and the user chose a node)."""
    pixels = np.full((300, 200), 1234, np.uint16)
    pixels[10, 10] = 4000
    node = _node(scene, pixels, "nearly flat")
    said = check_xray_input(node)
    assert said.startswith("'nearly flat' is nearly uniform: all but 1 of its 60000 pixels have the same value (1234)")
    assert "check the file" not in said and "is blank" not in said
    with pytest.raises(InputError) as refused:  # the command's own reading of what the job would hand it
        read_radiograph(write_radiograph(node, tmp_path / "r.mha"))
    assert str(refused.value) == said.replace("'nearly flat'", "r.mha")
    pixels[:30] = 3000  # 10% of the image differs: fine for both
    assert check_xray_input(_node(scene, pixels, "with a band")) == ""


# -- 5. float64 pixels: checked before float32 -----------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e300, 1e-300])
def test_float64_radiographs_beyond_float32s_range_are_rescaled_not_refused(scene, tmp_path, scale):
    """1e300 was refused as "NaN or infinite" (with numpy's overflow warning on the console), 1e-300 as "blank": the
    cast to float32 came before the checks."""
    shown = _chest().astype(np.float64) + 100.0
    node = _node(scene, shown * scale, "float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "overflow encountered in cast" (numpy's RuntimeWarning)
        assert check_xray_input(node) == ""
        handed = read_radiograph(write_radiograph(node, tmp_path / "r.mha"))
    expected = read_radiograph(write_radiograph(_node(scene, shown.astype(np.float32), "float32"), tmp_path / "f.mha"))
    np.testing.assert_allclose(handed.array, expected.array, atol=1e-5)  # the scale does not matter: windowed
    nan = shown.copy()
    nan[3, 3] = np.nan
    assert check_xray_input(_node(scene, nan, "with NaN")) == "'with NaN' contains NaN or infinite values; re-export the image."


# -- 9. a small coloured annotation ------------------------------------------------------------------------------------
def test_a_grey_screenshot_with_a_coloured_label_is_refused_saying_how_much_is_coloured(scene):
    grey = _chest(200, np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[5:15, 5:17, 0] = 255  # a red label: 120 of 40000 pixels
    rgb[5:15, 5:17, 1:] = 0
    said = check_xray_input(_node(scene, rgb, "screenshot"))
    assert said.startswith("'screenshot' is a colour image (its red, green and blue differ); a radiograph is greyscale. "
                           "0.3% of its pixels are coloured (so few are usually an annotation")  # fmt: skip


# -- 8. an integer radiograph is handed over in its own type ---------------------------------------------------------
def test_an_integer_radiograph_is_handed_over_in_its_own_type(scene, tmp_path):
    """The hand-off was always float32: 170 MB for a 6000x7000 uint16 radiograph (80 MB in the node)."""
    import SimpleITK as sitk

    for dtype, pixel_id in ((np.uint16, sitk.sitkUInt16), (np.int16, sitk.sitkInt16), (np.uint8, sitk.sitkUInt8)):
        pixels = _chest(64, dtype)
        image = sitk.ReadImage(str(write_radiograph(_node(scene, pixels, str(np.dtype(dtype))), tmp_path / "r.mha")))
        assert image.GetPixelID() == pixel_id
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), pixels)


def test_the_command_reads_a_radiograph_in_about_two_float32_images_of_memory(tmp_path):
    """Reading a uint16 radiograph held a native copy, a float32 copy and float64 windowing temporaries at once (the
    worker's peak was 1.3 GB for a 6000x7000 image); now the float32 pixels and the percentiles' scratch copy."""
    import SimpleITK as sitk

    pixels = np.tile(_chest(200), (4, 3))  # 800x600
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(tmp_path / "r.mha"))
    tracemalloc.start()
    try:
        read_radiograph(tmp_path / "r.mha")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2.3 * pixels.size * 4, f"{peak / (pixels.size * 4):.1f} float32 images"


# -- 2. the temp disk, checked before any work -----------------------------------------------------------------------
def test_a_job_whose_files_will_not_fit_in_the_temp_folder_is_refused_before_any_work(scene, small_disk, monkeypatch):
    """A full temp disk was found when a stage or the output was written (after the whole generation), with a message
    naming a private temp file and no TMPDIR advice."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    node = _node(scene, _chest(128))  # 32 KiB handed over: it fits; the previews and the result do not
    with pytest.raises(OutputError) as refused:
        XrayJob(scene, node, XraySettings(device="cpu", tiny_test_model=True)).start()
    said = str(refused.value)
    assert said.startswith(f"the temp folder {small_disk} has ")
    assert ("there for the radiograph 'chest PA', the stage previews and the result. Free space there, or use "
            "another folder: set the TMPDIR environment variable") in said  # fmt: skip
    assert "ctdiffusion-" not in said and os.listdir(small_disk) == []


# -- 3. a failure after the last stage: the result is complete -------------------------------------------------------
def test_a_job_that_fails_after_its_last_stage_completes_with_that_stage_as_its_result(scene):
    """The output file could not be written after the last stage (a full disk): the job failed with "only stage 1's
    result was kept", although the node held the whole result, and Export stayed disabled."""

    node = _node(scene, _chest(), spacing=(5.0, 5.0, 1.0))
    job = XrayJob(scene, node, ONE_STAGE)

    def block_the_output(fraction: float, message: str) -> None:  # the worker's up-front checks are past (its progress
        output = Path(job.tempdir) / "output.nrrd"  # has begun): a folder takes the output's place, so writing it after
        if not output.exists():  # the last stage fails (blocking it at the stage line lost the race under load)
            output.mkdir()
            (output / "in the way").write_text("")

    job.on_progress = block_the_output
    assert job.run(timeout=120) == JobState.COMPLETED, job.error
    assert job.error == "" and job.result_nodes == [job.preview_node] and job.stages_shown == [1]
    assert job.preview_node.GetName() == "chest PA CT (synthetic)"
    (notice,) = job.notices
    assert notice.startswith("The generation finished, but what followed its last stage failed: ")
    assert notice.endswith(f"'chest PA CT (synthetic)' holds the full result (stage 1 of 1, {job._grid}).")
    assert "the result of 'chest PA'" in notice and "ctdiffusion-" not in notice and "only stage" not in notice


# -- 7. more stages than the weights have -----------------------------------------------------------------------------
def test_more_stages_than_the_weights_have_run_every_stage_they_have_with_a_notice(scene):
    """Stages 3 on weights of fewer stages silently gave fewer (only a log line); the tooltip promised 256^3."""
    lines = []
    job = XrayJob(scene, _node(scene, _chest(), spacing=(5.0, 5.0, 1.0)),
                  XraySettings(num_stages=3, steps=1, device="cpu", tiny_test_model=True), on_line=lines.append)  # fmt: skip
    assert job.run(timeout=180) == JobState.COMPLETED, job.error
    assert job.stages_shown[-1] == 2
    notice = ("Stages is set to 3, but the tiny test model has 2 stages: the generation runs every one. Set Stages to "
              "'all the weights have' to run every stage without this notice.")  # fmt: skip
    assert job.notices == [notice] and f"warning: {notice}" in lines
    ui = (ROOT / "XrayToCT" / "Resources" / "UI" / "XrayToCT.ui").read_text()
    assert "the full 256^3 cascade" not in ui and "More stages than the weights have runs every stage" in ui


# -- 6 and 10. the command's progress through every phase; no folder left in the temp folder --------------------------
def test_the_commands_progress_moves_through_every_phase_and_weighs_the_stages(tmp_path):
    """The bar sat at 0% while the radiograph was read and the weights loaded, at 100% while the result was written,
    moved as fast through a 32^3 stage's steps as through a 16^3 one's, and said "step 1/4" for 2 steps x 2 samples;
    and every run left an empty torchinductor_<user> folder in the temp folder."""
    import SimpleITK as sitk

    radiograph = tmp_path / "chest.mha"
    sitk.WriteImage(sitk.GetImageFromArray(_chest()), str(radiograph))
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(TMPDIR=str(temp), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(CLI), "--numStages", "2", "--numSteps", "2", "--numSamples", "2",
                           "--device", "cpu", "--tinyTestModel", str(radiograph), str(tmp_path / "ct.nrrd")],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(temp) == []  # PyTorch's cache folder was the run's own, and is gone
    bar, said = [], []  # (fraction, the comment before it)
    for line in proc.stdout.splitlines():
        if line.startswith("<filter-comment>"):
            said.append(line[len("<filter-comment>") : -len("</filter-comment>")])
        elif line.startswith("<filter-progress>"):
            bar.append((float(line[len("<filter-progress>") : -len("</filter-progress>")]), said[-1] if said else ""))
    fractions = [f for f, _ in bar]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    at = {text: f for f, text in reversed(bar)}  # where each message first appeared
    assert said[0] == "reading the radiograph" and bar[0] == (at["loading the weights"], "loading the weights")
    phases = ["loading the weights", "preparing the radiograph (crop, resize, grey levels)",
              "stage 1/2 (16^3): step 1/2, sample 1/2", "stage 1/2: consistency step (re-projection onto the radiograph)",
              "stage 2/2 (32^3): step 2/2, sample 2/2", "writing the result", "done"]  # fmt: skip
    assert [at[p] for p in phases] == sorted(at[p] for p in phases), at
    assert 0.0 < at["loading the weights"] < at["writing the result"] < 1.0  # reading: the bar at 0 (a comment alone)
    stage_1 = at["stage 1/2 (16^3): step 2/2, sample 1/2"] - at["stage 1/2 (16^3): step 1/2, sample 1/2"]
    stage_2 = at["stage 2/2 (32^3): step 2/2, sample 1/2"] - at["stage 2/2 (32^3): step 1/2, sample 1/2"]
    assert 6 < stage_2 / stage_1 < 10  # a 32^3 step is 8 times a 16^3 one
    assert not [text for text in said if "/4" in text]  # the steps the user chose, not steps x samples


def test_the_progress_reaches_the_job_with_its_phases(scene):
    """The module's job sees the same phases (the panel's status line shows the runner's comment)."""
    job = XrayJob(scene, _node(scene, _chest(), spacing=(5.0, 5.0, 1.0)), ONE_STAGE)
    seen = []
    job.on_progress = lambda fraction, comment: seen.append((fraction, comment))
    job.start()
    deadline = time.monotonic() + 120
    while job.poll() == JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.state == JobState.COMPLETED, job.error
    comments = [c for _, c in seen if c]
    assert "loading the weights" in comments and "writing the result" in comments
    assert json.loads(job.preview_node.GetAttribute("CTDiffusion.ProjectionErrors"))
