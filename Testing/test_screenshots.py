"""Screenshots of the Red/Yellow/Green slice views, rendered by slicer-core's slice logic without a window.

``vtkMRMLSliceLogic`` reslices each layer through the slice node's XY-to-RAS transform, maps it through the
display node's window/level and colour table and blends the layers: the same pipeline that fills Slicer's
slice views (the application then only draws that image). The tests pin that the rendered pixels sit where
the slice geometry says, and produce the README's comparison of an input with its super-resolved result.

Regenerate the README images (uses the cached ``chest-dx`` sample when there is one, else a phantom; the
tiny random-weight model unless ``--weights`` names trained weights):

    python Testing/test_screenshots.py --out docs/screenshots [--weights NAME_OR_FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CTDiffusionSR") not in sys.path:
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))

from CTDiffusionSRLib import mrml_io, views  # noqa: E402
from CTDiffusionSRLib.process import JobState  # noqa: E402
from CTDiffusionSRLib.sr_logic import SRJob, SRSettings  # noqa: E402
from CTDiffusionSRLib.testing import phantom_ct  # noqa: E402

from DiffusionCore.volume import Volume  # noqa: E402

VIEWS = ("Red", "Yellow", "Green")


_COLOR_LOGICS = []  # a colour logic must outlive its scene's use: its lookup tables feed the slice views


def new_scene():
    scene = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    _COLOR_LOGICS[:] = [color_logic]
    slicer.mrmlScene = scene
    return scene


def set_window(node, window: float = 1500.0, level: float = -300.0) -> None:
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(window, level)


def render_pair(scene, input_node, result_node, size=(256, 256)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per view: what it shows with the input as background, then with the result, at the same slice."""
    pairs = {}
    for view in VIEWS:
        comp = views.composite_node(scene, view)
        comp.SetForegroundVolumeID(None)
        comp.SetBackgroundVolumeID(input_node.GetID())
        before = views.render_view(scene, view, size)
        comp.SetBackgroundVolumeID(result_node.GetID())
        after = views.render_view(scene, view, size, fit=False)  # same slice position and zoom
        pairs[view] = (before, after)
    return pairs


def on_black(rgba: np.ndarray) -> np.ndarray:
    """Composite a slice view over black, as Slicer draws it (outside the volume the blend is transparent)."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgba.copy()
    out[..., :3] = np.round(rgba[..., :3] * alpha).astype(np.uint8)
    out[..., 3] = 255
    return out


def montage(pairs: dict[str, tuple[np.ndarray, np.ndarray]], gap: int = 4) -> np.ndarray:
    """Rows Red/Yellow/Green, columns input | result, on a dark background."""
    rows = []
    for view in VIEWS:
        a, b = (on_black(x) for x in pairs[view])
        sep = np.full((a.shape[0], gap, 4), (40, 40, 40, 255), np.uint8)
        rows.append(np.concatenate([a, sep, b], axis=1))
        rows.append(np.full((gap, rows[-1].shape[1], 4), (40, 40, 40, 255), np.uint8))
    return np.concatenate(rows[:-1], axis=0)


def read_png(path: Path) -> np.ndarray:
    import vtk
    from vtk.util import numpy_support

    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    w, h, _ = image.GetDimensions()
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
    return arr[::-1]


def sr_result(scene, input_node, settings: SRSettings):
    job = SRJob(scene, input_node, settings)
    assert job.run(timeout=600) == JobState.COMPLETED, job.error
    return job.result_nodes[0]


# -- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("view", VIEWS)
def test_rendered_pixels_sit_where_the_slice_geometry_says(view):
    scene = new_scene()
    shape = (40, 48, 56)
    arr = np.full(shape, -1000.0, np.float32)
    centre_ijk = np.array([30.0, 20.0, 25.0])  # (i, j, k) of a bright ball
    k, j, i = np.indices(shape)
    arr[(i - centre_ijk[0]) ** 2 + (j - centre_ijk[1]) ** 2 + ((k - centre_ijk[2]) * 1.5) ** 2 < 36] = 1000.0
    vol = Volume(arr, (1.0, 1.0, 1.5), (-20.0, 35.0, 10.0), np.eye(3))
    node = mrml_io.add_volume_node(scene, vol, "ball")
    set_window(node, 400, 0)
    centre_ras = (mrml_io.ijk_to_ras(node) @ np.append(centre_ijk, 1.0))[:3]
    views.composite_node(scene, view).SetBackgroundVolumeID(node.GetID())
    rgba = views.render_view(scene, view, (128, 128), through_ras=centre_ras)  # fitted, through the ball
    node_of_view = views.slice_node(scene, view)
    bright = rgba[..., 0] > 200
    assert bright.sum() > 10
    rows, cols = np.nonzero(bright)
    xy = np.array([cols.mean(), (rgba.shape[0] - 1) - rows.mean(), 0.0, 1.0])  # VTK's y axis points up
    xy_to_ras = mrml_io.matrix_to_array(node_of_view.GetXYToRAS())
    ras = (xy_to_ras @ xy)[:3]
    np.testing.assert_allclose(ras, centre_ras, atol=2.0)


def test_screenshots_of_input_and_super_resolved_result(tmp_path):
    scene = new_scene()
    volume = phantom_ct(shape=(8, 48, 48), spacing=(0.8, 0.8, 4.0))
    input_node = mrml_io.add_volume_node(scene, volume, "CT_01")
    set_window(input_node)
    result = sr_result(scene, input_node, SRSettings(factor=4, steps=2, device="cpu", tiny_test_model=True))
    views.show_fade(scene, input_node, result, 0.0)
    pairs = render_pair(scene, input_node, result, (96, 96))
    for view, (before, after) in pairs.items():
        assert before.shape == after.shape == (96, 96, 4)
        assert before[..., :3].std() > 10 and after[..., :3].std() > 10, f"{view} view is blank"
        assert np.any(before != after), f"{view}: the result looks exactly like the input"
    image = montage(pairs)
    path = views.save_png(image, tmp_path / "compare_views.png")
    np.testing.assert_array_equal(read_png(path), image)


# -- README images ------------------------------------------------------------------------------------------
def readme_volume() -> tuple[Volume, str]:
    """A crop of the real chest-dx CT (5 mm slices) when cached, else the phantom."""
    try:
        from DiffusionCore.sampledata import fetch
        from DiffusionCore.volume import read_volume

        ct = read_volume(fetch("chest-dx", offline=True))
        z0 = ct.shape[0] // 2 - 8
        crop = ct.array[z0 : z0 + 16, 96:416:2, 96:416:2]
        origin = ct.index_to_physical() @ np.array([96, 96, z0, 1.0])
        spacing = (ct.spacing[0] * 2, ct.spacing[1] * 2, ct.spacing[2])
        return Volume(crop, spacing, tuple(origin[:3]), ct.direction), "chest-dx (TCIA Lung-PET-CT-Dx A0001, CC BY 4.0)"
    except Exception as exc:  # no cached sample: the phantom still shows the views
        print(f"chest-dx sample unavailable ({exc}); using the phantom")
        return phantom_ct(shape=(12, 96, 96), spacing=(0.8, 0.8, 4.0)), "synthetic phantom"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the README's slice-view screenshots.")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    parser.add_argument("--weights", default="", help="SR weights (default: the tiny random-weight test model)")
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scene = new_scene()
    volume, source = readme_volume()
    input_node = mrml_io.add_volume_node(scene, volume, "CT")
    set_window(input_node)
    settings = SRSettings(device="cpu", weights=args.weights, tiny_test_model=not args.weights)
    result = sr_result(scene, input_node, settings)
    views.show_fade(scene, input_node, result, 0.0)
    pairs = render_pair(scene, input_node, result, (args.size, args.size))
    views.save_png(montage(pairs), out / "compare_views.png")
    for view, (before, after) in pairs.items():
        views.save_png(on_black(before), out / f"{view.lower()}_input.png")
        views.save_png(on_black(after), out / f"{view.lower()}_result.png")
    model = args.weights or "tiny random-weight test model (output is NOT a meaningful super-resolution)"
    (out / "README.txt").write_text(
        f"Rendered by Testing/test_screenshots.py with slicer-core's vtkMRMLSliceLogic (no window).\n"
        f"Input: {source}, {volume.shape} voxels at {tuple(round(s, 2) for s in volume.spacing)} mm (x, y, z).\n"
        f"Result: {result.GetName()}, model: {model}.\n"
        "Rows: Red (axial), Yellow (sagittal), Green (coronal). Columns: input | result.\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
