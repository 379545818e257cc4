"""Slice views for comparing an input with a synthetic result, and rendering them to images.

Only MRML nodes (layout, slice and slice-composite nodes) are touched, so this runs on a bare scene as well
as in Slicer (where the layout manager shows what the nodes say). Rendering uses ``vtkMRMLSliceLogic``'s
own reslice-and-blend pipeline, the same that produces Slicer's slice views, without a window.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

logger = logging.getLogger(__name__)

#: Slicer's standard slice views and their orientations.
VIEW_ORIENTATIONS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
#: Colour tables to try, first found wins, for overlays (uncertainty).
OVERLAY_COLOR_IDS = ("vtkMRMLColorTableNodeFileColdToHotRainbow.txt", "vtkMRMLColorTableNodeRainbow")


def _slicer():
    import slicer

    return slicer


def _find_by_layout_name(scene, class_name: str, name: str):
    for i in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(i, class_name)
        if node.GetLayoutName() == name:
            return node
    return None


def layout_node(scene):
    """The scene's layout node.

    Slicer's layout manager makes it; on a bare scene ``vtkMRMLLayoutLogic`` makes it with the standard
    layouts and the Red/Yellow/Green slice nodes (after the default orientation presets, as Slicer does).
    """
    node = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if node is None:
        slicer = _slicer()
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
        layout_logic = slicer.vtkMRMLLayoutLogic()
        layout_logic.SetMRMLScene(scene)
        node = layout_logic.GetLayoutNode()
    return node


@contextlib.contextmanager
def slice_logic(scene, view: str, orientation: str | None = None):
    """A ``vtkMRMLSliceLogic`` bound to view ``view`` (``"Red"``...) for the duration of a ``with`` block.

    The logic is detached from the scene afterwards: in Slicer the application owns one logic per view, and
    extra logics left observing the same slice node would each keep a pipeline of their own.
    """
    layout_node(scene)  # the standard views exist from here on
    logic = _slicer().vtkMRMLSliceLogic()
    logic.SetMRMLScene(scene)
    node = _find_by_layout_name(scene, "vtkMRMLSliceNode", view)
    if node is None:
        node = logic.AddSliceNode(view)
    else:
        logic.SetSliceNode(node)
    if orientation is not None:
        node.SetOrientation(orientation)
    try:
        yield logic
    finally:
        logic.SetMRMLScene(None)


def slice_node(scene, view: str):
    """The slice node of ``view`` (orientation, offset, field of view, XY-to-RAS), created when missing."""
    layout_node(scene)
    node = _find_by_layout_name(scene, "vtkMRMLSliceNode", view)
    if node is None:
        with slice_logic(scene, view) as logic:
            node = logic.GetSliceNode()
    return node


def composite_node(scene, view: str):
    """The slice-composite node of ``view`` (layers shown in it), created with the view when missing."""
    layout_node(scene)
    node = _find_by_layout_name(scene, "vtkMRMLSliceCompositeNode", view)
    if node is None:
        with slice_logic(scene, view) as logic:
            node = logic.GetSliceCompositeNode()
    return node


def _set_layers(scene, view: str, background, foreground=None, opacity: float = 0.0, linked: bool = True) -> None:
    comp = composite_node(scene, view)
    comp.SetBackgroundVolumeID(background.GetID() if background is not None else None)
    comp.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    comp.SetForegroundOpacity(float(opacity))
    comp.SetLinkedControl(bool(linked))
    comp.SetHotLinkedControl(bool(linked))


def show_side_by_side(scene, input_node, result_node) -> None:
    """Input left (Red), result right (Yellow), both axial with linked navigation."""
    layout_node(scene).SetViewArrangement(_slicer().vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    for view, volume in (("Red", input_node), ("Yellow", result_node)):
        slice_node(scene, view).SetOrientation("Axial")
        _set_layers(scene, view, volume, None, 0.0, linked=True)


def show_fade(scene, input_node, result_node, opacity: float = 0.5) -> None:
    """Result over input in the three standard views; ``opacity`` 0 shows the input, 1 the result."""
    layout_node(scene).SetViewArrangement(_slicer().vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    for view, orientation in VIEW_ORIENTATIONS.items():
        slice_node(scene, view).SetOrientation(orientation)
        _set_layers(scene, view, input_node, result_node, opacity, linked=True)


def set_fade(scene, opacity: float) -> None:
    """Move the foreground fade of all standard views (the Compare slider)."""
    for view in VIEW_ORIENTATIONS:
        composite_node(scene, view).SetForegroundOpacity(float(np.clip(opacity, 0.0, 1.0)))


def show_overlay(scene, base_node, overlay_node, opacity: float = 0.5) -> None:
    """``overlay_node`` (e.g. uncertainty) as a colour map over ``base_node`` in the three views."""
    display = overlay_node.GetDisplayNode()
    if display is None:
        overlay_node.CreateDefaultDisplayNodes()
        display = overlay_node.GetDisplayNode()
    for color_id in OVERLAY_COLOR_IDS:
        if scene.GetNodeByID(color_id) is not None:
            display.SetAndObserveColorNodeID(color_id)
            break
    image = overlay_node.GetImageData()
    if image is not None and image.GetPointData().GetScalars() is not None:
        values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        lo, hi = (float(v) for v in np.percentile(values, (1, 99)))
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(lo, hi if hi > lo else lo + 1.0)
    layout_node(scene).SetViewArrangement(_slicer().vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    for view, orientation in VIEW_ORIENTATIONS.items():
        slice_node(scene, view).SetOrientation(orientation)
        _set_layers(scene, view, base_node, overlay_node, opacity, linked=True)


def render_view(
    scene, view: str, size: tuple[int, int] = (256, 256), fit: bool = True, through_ras: tuple | None = None
) -> np.ndarray:
    """What slice view ``view`` shows, as an RGBA uint8 array ``(H, W, 4)`` (row 0 = top).

    Uses the slice logic's reslice and blend pipeline (the image Slicer draws in the view); no window or
    OpenGL context is needed. ``fit`` first fits the view to the volumes (as Slicer's "reset view");
    ``through_ras`` then moves the slice plane through that RAS point (mm).
    """
    with slice_logic(scene, view) as logic:
        logic.UpdatePipeline()  # layers from the composite node as it is now
        node = logic.GetSliceNode()
        node.SetDimensions(int(size[0]), int(size[1]), 1)
        if fit:
            logic.FitSliceToAll()
            logic.SnapSliceOffsetToIJK()
        if through_ras is not None:
            node.JumpSliceByOffsetting(*(float(v) for v in through_ras))
        producer = logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        w, h, _ = image.GetDimensions()
        rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
        return np.array(rgba[::-1])  # a copy; VTK's row 0 is the bottom


def save_png(rgba: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W, 3|4)`` uint8 array as PNG (VTK's writer)."""
    arr = np.ascontiguousarray(np.asarray(rgba, dtype=np.uint8)[::-1])
    h, w, c = arr.shape
    image = vtk.vtkImageData()
    image.SetDimensions(w, h, 1)
    scalars = numpy_support.numpy_to_vtk(arr.reshape(-1, c), deep=True)
    image.GetPointData().SetScalars(scalars)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    return Path(path)
