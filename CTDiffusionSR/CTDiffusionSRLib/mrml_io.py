"""MRML volume nodes <-> ``DiffusionCore.Volume``, result nodes, subject hierarchy and provenance.

No Qt here: everything works on a bare ``vtkMRMLScene`` (the slicer-core wheel) as well as in Slicer.

Geometry: Slicer stores a volume as ``vtkImageData`` (x fastest, so the numpy view is ``(k, j, i)`` =
``(z, y, x)``, the same order as ``Volume.array``) plus an IJK-to-RAS 4x4 matrix. DiffusionCore uses the
ITK convention in LPS. The two frames differ by a sign flip of the first two physical axes, so
``IJKToLPS = diag(-1, -1, 1) @ IJKToRAS`` exactly, for any (oblique) direction.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import vtk
from vtk.util import numpy_support

from DiffusionCore.errors import InputError, OutputError
from DiffusionCore.provenance import read_provenance
from DiffusionCore.volume import Grid, Volume

try:
    from slicer.i18n import tr as _
except ImportError:  # outside the Slicer application (tests, plain Python): the English text

    def _(text: str) -> str:
        return text


logger = logging.getLogger(__name__)

#: Sign flip between RAS (Slicer) and LPS (ITK, DICOM, DiffusionCore).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

#: Node attributes recording how a synthetic result was made (prefix keeps them apart from Slicer's).
ATTRIBUTE_PREFIX = "CTDiffusion."
ATTR_SYNTHETIC = ATTRIBUTE_PREFIX + "Synthetic"
ATTR_MODEL = ATTRIBUTE_PREFIX + "Model"
ATTR_WEIGHTS_SHA256 = ATTRIBUTE_PREFIX + "WeightsSHA256"
ATTR_SETTINGS = ATTRIBUTE_PREFIX + "Settings"
ATTR_DATE = ATTRIBUTE_PREFIX + "Date"
ATTR_SOURCE = ATTRIBUTE_PREFIX + "SourceNode"
#: Node reference role from a result to the node it was made from. A reference, unlike the attribute above (the
#: ID as text, for the record), follows the node when a saved scene is imported and its IDs are renumbered, and is
#: cleared when the node is deleted.
SOURCE_REFERENCE_ROLE = "ctdiffusionSource"
ATTR_KIND = ATTRIBUTE_PREFIX + "Kind"
#: The input a result was made from, as recorded in its file, for a result loaded from a file on its own (no
#: source node in the scene to name it); with :data:`ATTR_INPUT_UID`, its DICOM UID.
ATTR_INPUT = ATTRIBUTE_PREFIX + "Input"
ATTR_INPUT_UID = ATTRIBUTE_PREFIX + "InputUID"
#: The input's content digest as the run read it (``Volume.content_sha256``; a radiograph's
#: ``Radiograph.content_sha256``), when the run recorded it.
ATTR_INPUT_SHA256 = ATTRIBUTE_PREFIX + "InputSHA256"
#: The input series' own SliceThickness (mm) and what it meant for the result, as the run's provenance records them.
ATTR_INPUT_SLICE_THICKNESS = ATTRIBUTE_PREFIX + "InputSliceThicknessMM"
ATTR_INPUT_SLICE_NOTE = ATTRIBUTE_PREFIX + "InputSliceNote"
ATTR_TITLE = ATTRIBUTE_PREFIX + "Title"
#: The environment of the run that made the voxels (JSON: :func:`DiffusionCore.provenance.environment` as the job's
#: output file, or a loaded result file, records it); ``{}`` when unknown. An export records it, never the
#: environment of the Slicer exporting it (another commit or torch after an upgrade, another machine, no GPU).
ATTR_ENVIRONMENT = ATTRIBUTE_PREFIX + "Environment"
#: The SOP instance UIDs (space-separated, as :data:`ATTR_DICOM_INSTANCES`) of the DICOM series a result derives
#: from: its input's, or for a result made from a result, those that one recorded. With them a DICOM export finds the
#: patient and study in Slicer's DICOM database once the input node is gone (deleted, or a scene saved without it).
ATTR_INPUT_INSTANCES = ATTRIBUTE_PREFIX + "InputInstanceUIDs"
#: Slicer's DICOM loader records a node's SOP instance UIDs (space-separated) under this attribute.
ATTR_DICOM_INSTANCES = "DICOM.instanceUIDs"
#: The task name of :class:`DiffusionCore.provenance.Provenance` for each kind of result node.
TASK_OF_KIND = {"super-resolution": "sr", "uncertainty": "sr", "xray-to-ct": "xray2ct"}


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 float64 numpy array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def array_to_matrix(arr: np.ndarray) -> vtk.vtkMatrix4x4:
    """A 4x4 numpy array as a ``vtkMatrix4x4``."""
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(arr[r, c]))
    return m


def transform_problem(node, what: str = "The volume") -> str:
    """Why the transform ``node`` sits under cannot be used where the node is taken as Slicer displays it (``""`` when
    it can: none, or a linear one): a non-linear one (a warp), which is not resampled through. ``what`` names the node's
    role, e.g. ``"The radiograph"``."""
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None or parent.IsTransformToWorldLinear():
        return ""
    return (
        f"{what} '{node.GetName()}' is under a non-linear transform ('{parent.GetName()}'): harden the transform "
        "first (Data module: right-click the volume > Harden transform), or take the volume out from under it."
    )


def ijk_to_ras(node, *, world: bool = False, what: str = "The volume") -> np.ndarray:
    """The node's own IJK-to-RAS matrix: the frame its voxels were acquired in, for voxel (0, 0, 0) of the stored
    array (an image whose extent does not start at 0, as some filters leave it, is accounted for). ``world``: with
    its linear parent transforms applied instead, where Slicer displays it (the X-ray module hands a radiograph over
    as displayed and scores against a reference CT where it is shown).

    A linear parent transform (a registration, a manual move) is not applied: jobs work on the voxels in this frame
    and put their results under the same transform (:func:`follow_transform`), as Slicer's Crop Volume does, so a
    result stays on its input when the transform is edited later, and an exported DICOM series keeps the acquired
    series' frame of reference with the acquired geometry. Slicer's CLI modules, which write the node through its
    storage node, see the same frame.

    Raises:
        InputError: the volume sits under a non-linear transform (harden it first); with ``world`` the message names
            it by ``what`` (:func:`transform_problem`).
    """
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = matrix_to_array(m)
    parent = node.GetParentTransformNode()
    if world and transform_problem(node):
        raise InputError(transform_problem(node, what))
    if parent is not None and not parent.IsTransformToWorldLinear():
        raise InputError(
            f"volume '{node.GetName()}' is under a non-linear transform; harden the transform first "
            "(Data module: right-click the volume > Harden transform). A gantry-tilted CT series that Slicer "
            "loaded with its acquisition-geometry regularization is read from its DICOM files instead, but only "
            "while Slicer's DICOM database still holds them and the transform is the one the DICOM module made; "
            "the command python -m DiffusionCore sr SERIES_FOLDER OUTPUT corrects the tilt from the files too."
        )
    image = node.GetImageData()
    if image is not None:
        start = np.array(image.GetExtent()[::2], dtype=np.float64)
        if start.any():  # voxel (0, 0, 0) of the array is IJK index ``start``
            ijk[:3, 3] += ijk[:3, :3] @ start
    if world and parent is not None:
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk = matrix_to_array(to_world) @ ijk
    return ijk


def input_stamp(node) -> tuple:
    """What changes when a node's voxels or geometry are changed (its image's modification time, which VTK's global
    counter makes different for a replaced image too, and its own IJK-to-RAS matrix): taken when a job reads its
    input and compared when the result comes back."""
    image = node.GetImageData()
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    scalars = image.GetPointData().GetScalars() if image is not None and image.GetPointData() is not None else None
    return (image.GetMTime() if image is not None else None, scalars.GetMTime() if scalars is not None else None,
            tuple(matrix_to_array(m).ravel()))  # fmt: skip


def follow_transform(source, result) -> None:
    """Put ``result`` under ``source``'s parent transform (none when it has none or is no longer in the scene): a
    result computed in ``source``'s own frame (:func:`ijk_to_ras`) then lies on it, and moves with it."""
    transform_id = source.GetTransformNodeID() if source is not None and source.GetScene() is not None else None
    if result.GetTransformNodeID() != transform_id:
        result.SetAndObserveTransformNodeID(transform_id)


def geometry_from_ijk_to_ras(ijk_to_ras_matrix: np.ndarray) -> tuple[tuple, tuple, np.ndarray]:
    """Split an IJK-to-RAS matrix into ITK ``(spacing (x,y,z), origin LPS, direction 3x3 LPS)``."""
    lps = LPS_FROM_RAS @ ijk_to_ras_matrix[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise InputError(f"the volume's IJK-to-RAS matrix has a zero or invalid axis (spacing {spacing}).")
    direction = lps / spacing
    origin = LPS_FROM_RAS @ ijk_to_ras_matrix[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(o) for o in origin), direction


def ijk_to_ras_from_volume(vol: Volume) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a Volume's grid (inverse of :func:`geometry_from_ijk_to_ras`)."""
    m = np.eye(4)
    m[:3, :3] = LPS_FROM_RAS @ np.asarray(vol.direction) @ np.diag(vol.spacing)
    m[:3, 3] = LPS_FROM_RAS @ np.asarray(vol.origin)
    return m


def grid_from_node(node, *, world: bool = False) -> Grid:
    """The node's voxel grid (LPS, ITK conventions) without copying its voxels (cheap: for input checks); ``world``:
    with its linear parent transforms applied (:func:`ijk_to_ras`)."""
    image = node.GetImageData()
    if image is None:
        raise InputError(f"volume '{node.GetName()}' has no image data; load or select a volume that holds voxels.")
    nx, ny, nz = image.GetDimensions()
    spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras(node, world=world))
    return Grid((nz, ny, nx), spacing, origin, tuple(float(v) for v in direction.ravel()))


def array_from_node(node) -> np.ndarray:
    """A copy of the node's voxels as a numpy array ``(z, y, x)`` in the stored type.

    Raises:
        InputError: no image data, or more than one component per voxel (RGB / vector volume).
    """
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        name = node.GetName() if node is not None else "(none)"
        raise InputError(f"volume '{name}' has no image data; load or select a volume that holds voxels.")
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise InputError(
            f"volume '{node.GetName()}' has {scalars.GetNumberOfComponents()} components per voxel (colour or "
            "vector image); a greyscale scalar volume is needed."
        )
    nx, ny, nz = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx).copy()


def volume_from_node(node, *, world: bool = False) -> Volume:
    """A DiffusionCore ``Volume`` (float32 HU, LPS geometry) from a scalar volume node; the node is untouched.
    ``world``: with its linear parent transforms applied (:func:`ijk_to_ras`)."""
    arr = array_from_node(node).astype(np.float32)
    spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras(node, world=world))
    return Volume(arr, spacing, origin, direction, {"source": node.GetName()})


def set_node_from_volume(node, vol: Volume, dtype: type | None = None) -> None:
    """Replace the node's voxels and geometry with those of ``vol`` (array ``(z, y, x)``, LPS)."""
    arr = np.ascontiguousarray(vol.array if dtype is None else vol.array.astype(dtype))
    nz, ny, nx = arr.shape
    image = vtk.vtkImageData()
    image.SetDimensions(nx, ny, nz)
    vtk_array = numpy_support.numpy_to_vtk(arr.ravel(), deep=True)
    vtk_array.SetName("ImageScalars")
    image.GetPointData().SetScalars(vtk_array)
    node.SetIJKToRASMatrix(array_to_matrix(ijk_to_ras_from_volume(vol)))
    node.SetAndObserveImageData(image)


def free_name(scene, name: str, node=None) -> str:
    """``name``, or ``name_1``, ``name_2``, ... as Slicer makes names unique, when a node other than ``node`` has it: a
    name is given again once its node is gone (Slicer's ``GenerateUniqueName`` only counts up, so after 15 results
    deleted the next was "..._15"), in both modules alike."""

    def taken(candidate: str) -> bool:
        nodes = scene.GetNodesByName(candidate)
        return any(nodes.GetItemAsObject(i) is not node for i in range(nodes.GetNumberOfItems()))

    candidate, n = name, 0
    while taken(candidate):
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def add_volume_node(scene, vol: Volume, name: str, *, like=None, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in ``scene`` holding ``vol``; display settings copied from ``like`` when given."""
    node = scene.AddNewNodeByClass(class_name, free_name(scene, name))
    set_node_from_volume(node, vol)
    show_like(node, like)
    return node


def show_like(node, like=None) -> None:
    """Give ``node`` a display node (when it has none) and, from ``like`` when given, its window/level, colour table
    and interpolation, so that a result looks like its input side by side."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    like_display = like.GetDisplayNode() if like is not None else None
    if display is not None and like_display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(like_display.GetWindow(), like_display.GetLevel())
        if like_display.GetColorNodeID():
            display.SetAndObserveColorNodeID(like_display.GetColorNodeID())
        display.SetInterpolate(like_display.GetInterpolate())


def subject_hierarchy(scene):
    """The scene's subject hierarchy node (created when missing)."""
    import slicer

    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def _item_of(sh, node, parent_item: int | None = None) -> int:
    item = sh.GetItemByDataNode(node)
    if not item:
        # In the Slicer application the subject hierarchy plugins create items for new nodes; on a bare
        # MRML scene nobody does, so the item is made here.
        item = sh.CreateItem(parent_item if parent_item is not None else sh.GetSceneItemID(), node)
    return item


def in_scene(scene, node) -> bool:
    """Whether ``node`` is (still) in ``scene``: a user may delete a job's input or chosen output while it runs."""
    return node is not None and bool(scene.IsNodePresent(node))


#: Python attribute of a job's input node (VTK's wrapping keeps it while the job holds the node): the subject
#: hierarchy item the node was under when the job read it (:func:`remember_place`).
_PARENT_WHEN_READ = "_ctdiffusion_parent_item"


def remember_place(node) -> None:
    """Note where ``node`` (a job's input, being read) is in the subject hierarchy, so that :func:`place_beside` puts
    the results there should the node be deleted while the job runs. The node itself is not modified."""
    scene = node.GetScene() if node is not None else None
    # found, never made: a bare scene (a script's) has no subject hierarchy, so no place to remember
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") if scene is not None else None
    if sh is None:
        return
    item = sh.GetItemByDataNode(node)
    if item:
        setattr(node, _PARENT_WHEN_READ, sh.GetItemParent(item))


def _remembered_parent(sh, node) -> int:
    """The item ``node`` was under when a job read it, if that item (a study, a patient, a folder) is still in the
    subject hierarchy; else the scene's top level."""
    top = sh.GetSceneItemID()
    parent = getattr(node, _PARENT_WHEN_READ, None) if node is not None else None
    if not parent or parent == top:
        return top
    items = vtk.vtkIdList()
    sh.GetItemChildren(top, items, True)
    return parent if items.IsId(parent) >= 0 else top


def place_beside(scene, source_node, result_node) -> int:
    """Put ``result_node`` under the same subject hierarchy parent (study/patient/folder) as ``source_node``;
    when ``source_node`` is no longer in the scene (deleted while the job ran), under the parent it had when the job
    read it (:func:`remember_place`) while that is still there, else at the top level.

    Returns:
        the result's subject hierarchy item ID.
    """
    sh = subject_hierarchy(scene)
    if in_scene(scene, source_node):
        parent = sh.GetItemParent(_item_of(sh, source_node))
    else:  # the user deleted the input while the job ran: the result goes where the input was
        parent = _remembered_parent(sh, source_node)
    item = _item_of(sh, result_node, parent)
    sh.SetItemParent(item, parent)
    return item


def claim_output(scene, node) -> None:
    """Make an existing node that a job writes its result into (an output the user chose) a result's node: the
    DICOM identity of the image it held goes (Slicer's instance UIDs, its subject hierarchy item's DICOM UID: an
    export or the DICOM browser would otherwise give the synthetic image that acquired series' identity), and its
    name says "(synthetic)" when it did not."""
    node.RemoveAttribute(ATTR_DICOM_INSTANCES)
    sh = subject_hierarchy(scene)
    item = sh.GetItemByDataNode(node)
    if item and sh.HasItemUID(item, "DICOM"):
        sh.RemoveItemUID(item, "DICOM")
    if "synthetic" not in (node.GetName() or "").lower():
        node.SetName(f"{node.GetName()} (synthetic)")
    _forget_files(scene, node)


def _forget_files(scene, node) -> None:
    """A node whose image was replaced no longer holds what its files hold, and Slicer's Save writes a modified node
    to its storage node's file: a volume loaded from a file and chosen as the output would have the synthetic result
    written over that acquired scan. So its storage nodes go (those no other node uses leave the scene), and Save
    names a new file after the node, as for any new result."""
    ids = [node.GetNthStorageNodeID(i) for i in range(node.GetNumberOfStorageNodes())]
    node.RemoveNodeReferenceIDs("storage")
    for storage_id in filter(None, ids):
        storage = scene.GetNodeByID(storage_id)
        if storage is None:
            continue
        users = [
            other
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLStorableNode"))
            for other in [scene.GetNthNodeByClass(i, "vtkMRMLStorableNode")]
            if any(other.GetNthStorageNodeID(j) == storage_id for j in range(other.GetNumberOfStorageNodes()))
        ]
        if not users:
            scene.RemoveNode(storage)


#: The mark a result's name ends with (before a counter that made it unique: ``_1``).
_SYNTHETIC_MARK = re.compile(r" \(synthetic\)(?=(_\d+)?$)")


def synthetic_name(source_name: str, label: str) -> str:
    """Node name that says what it is: ``"CT_01 SR x4 (synthetic)"``; the result of a result says "(synthetic)" once,
    at the end: ``"CT_01 SR x2 SR x2 (synthetic)"`` (was ``"CT_01 SR x2 (synthetic) SR x2 (synthetic)"``)."""
    return f"{_SYNTHETIC_MARK.sub('', source_name)} {label} (synthetic)"


def set_provenance(
    node, *, kind: str, model: str, weights_sha256: str, settings: dict[str, Any], source=None, title: str = "",
    date: str = "", recorded_input: tuple[str, str] = ("", ""), environment: dict[str, str] | None = None,
    input_sha256: str = "",
    input_slices: tuple[float | None, str] = (None, ""),
) -> None:
    """Record how a synthetic node was made, as node attributes (saved with the scene). ``title`` is the label
    that ends an exported series' description, e.g. ``"SR x4 (synthetic)"``; ``date`` (ISO 8601) defaults to now;
    ``recorded_input`` is the input's name and DICOM UID as a result file recorded them, when no source node is
    given. ``environment`` is the run's (:func:`recorded_environment`; a result file's record): ``None`` or ``{}`` when
    unknown, and its exports then record ``{}``. ``input_sha256``: the input's content digest as the run's report
    gives it (``""``: not recorded, and a digest the node held before is removed). ``input_slices``: the input series'
    SliceThickness (mm, None when unknown) and the run's note on it (overlap or gaps), as the provenance records them. A result made from a result has both steps in its title
    (``"SR x2 SR x2 (synthetic)"``): its DICOM export is a series of the scan behind both."""
    title = title or f"{kind} (synthetic)"
    if source is not None and source.GetAttribute(ATTR_SYNTHETIC) == "true" and source.GetAttribute(ATTR_TITLE):
        title = f"{_SYNTHETIC_MARK.sub('', source.GetAttribute(ATTR_TITLE))} {title}"
    node.SetAttribute(ATTR_SYNTHETIC, "true")
    node.SetAttribute(ATTR_KIND, kind)
    node.SetAttribute(ATTR_TITLE, title)
    node.SetAttribute(ATTR_MODEL, model)
    node.SetAttribute(ATTR_WEIGHTS_SHA256, weights_sha256)
    node.SetAttribute(ATTR_SETTINGS, json.dumps(settings, sort_keys=True, default=str))
    node.SetAttribute(ATTR_ENVIRONMENT, json.dumps(environment or {}, sort_keys=True, default=str))
    node.SetAttribute(ATTR_DATE, date or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    for attr, value in zip((ATTR_INPUT, ATTR_INPUT_UID), recorded_input):
        if value:
            node.SetAttribute(attr, value)
    for attr, value in ((ATTR_INPUT_SHA256, input_sha256),
                        (ATTR_INPUT_SLICE_THICKNESS, "" if input_slices[0] is None else f"{input_slices[0]:g}"),
                        (ATTR_INPUT_SLICE_NOTE, input_slices[1] or "")):  # fmt: skip
        if value:
            node.SetAttribute(attr, value)
        else:
            node.RemoveAttribute(attr)  # another run's value must not stay
    node.RemoveAttribute(ATTR_SOURCE)  # an ID as text goes stale when a saved scene is imported: the reference follows
    # the DICOM series behind the input, read from the node object: a node deleted while the job ran keeps its attributes
    instances = " ".join(acquired_instance_uids(source)) if source is not None else ""
    if instances:
        node.SetAttribute(ATTR_INPUT_INSTANCES, instances)
    else:
        node.RemoveAttribute(ATTR_INPUT_INSTANCES)
    if source is not None and source.GetScene() is not None:  # a deleted source's ID may name another node later
        node.SetNodeReferenceID(SOURCE_REFERENCE_ROLE, source.GetID())
        if not recorded_input[0]:
            node.SetAttribute(ATTR_INPUT, source.GetName() or "")  # for the record, in the Data module
    description = (
        f"SYNTHETIC image generated by a model ({model}, weights sha256 {weights_sha256[:12]}). "
        "Not an acquired image: do not use for diagnosis."
    )
    node.SetDescription(description)
    watch_saves(node)


#: Python attribute of a watched storage node (VTK's wrapping keeps it as long as the node lives): the last
#: file it stamped, ``(path, mtime_ns, size)``, or None before its first write.
_STAMPED = "_ctdiffusion_last_stamp"


def watch_saves(node) -> bool:
    """Make Slicer's own Save of a result node carry the provenance too.

    Slicer writes volumes through ITK with no custom header fields, so the node's storage node is observed:
    once it reports a finished write, the file gets the provenance in place
    (:func:`DiffusionCore.results.stamp_provenance`: NRRD / MetaImage header fields, NIfTI ``descrip`` and
    JSON sidecar). Returns False when the node is not in a scene (nothing to observe). Idempotent.
    """
    scene = node.GetScene()
    if scene is None:
        return False
    storage = node.GetStorageNode()
    if storage is None:
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
    if storage is None:
        return False
    if hasattr(storage, _STAMPED):
        return True
    setattr(storage, _STAMPED, None)
    node_id = node.GetID()
    storage.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, _event: _stamp_after_write(caller, node_id))
    return True


#: Python attribute of a scene whose imports are watched (:func:`watch_results_of_loaded_scenes`).
_WATCHING_IMPORTS = "_ctdiffusion_watching_imports"


def watch_results(scene) -> int:
    """:func:`watch_saves` for every result node in ``scene`` (results of an earlier session, loaded with a saved
    scene, carry their provenance attributes but nothing watches their saves), after recognising the results
    loaded from files on their own (:func:`recognise_result_file`). Returns how many are watched."""
    watched = 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLVolumeNode")
        _watch_file(node)
        if node.GetAttribute(ATTR_SYNTHETIC) == "true" and watch_saves(node):
            watched += 1
    return watched


def _kind_of(task: str, title: str) -> str:
    """The node kind (:data:`TASK_OF_KIND`'s keys) of a recorded task and title."""
    if task == "xray2ct":
        return "xray-to-ct"
    if task == "sr":
        return "uncertainty" if "uncertainty" in title.lower() else "super-resolution"
    return task or "synthetic"


#: Python attribute of a volume node: the file :func:`recognise_result_file` last read for it, ``(path, mtime_ns,
#: size)``: Slicer hands a CLI's output to the same node through the same file name at every run.
_EXAMINED_FILE = "_ctdiffusion_examined_file"


def _file_key(node) -> tuple[str, int, int] | None:
    """``(path, mtime_ns, size)`` of the file the node's storage node names, None without one on disk."""
    storage = node.GetStorageNode()
    path = storage.GetFileName() if storage is not None else None
    if not path:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return path, stat.st_mtime_ns, stat.st_size


def _same_result(a, b) -> bool:
    """Whether two provenance records describe the same result (a node's own file saved again, not another run)."""
    return (a.task, a.weights_sha256, a.settings, a.title, a.date) == (b.task, b.weights_sha256, b.settings, b.title, b.date)


def recognise_result_file(node) -> bool:
    """Label a volume node by the provenance its file records.

    A result saved to a file (NRRD, MetaImage, NIfTI with its sidecar, or exported as DICOM) and loaded later on
    its own (Add Data, drag and drop, the DICOM browser), or a file written by ``python -m DiffusionCore sr`` or
    ``xray2ct`` or by the batch CLIs, records its provenance in the file; Slicer's reader keeps none of it. The node
    gets the provenance attributes back (model, weights, settings, date, the input as recorded), the description that
    says it is not an acquired image, "(synthetic)" in its name if the file name lacked it, and its saves are watched.
    It has no source node: its export makes a new study, never one under a guessed patient.

    A node labelled already is labelled again when its file records another result: a CLI's panel keeps its output
    node selected, so running it again (another factor, other weights) reads the new result into the same node, which
    must not keep the first run's settings. A file recording no provenance changes nothing. Returns True when the node
    was labelled; False when its file is the one examined last, or records no result or the node's own.
    """
    if node is None:
        return False
    key = _file_key(node)
    if key is None or getattr(node, _EXAMINED_FILE, None) == key:
        return False  # no file, or this file read already (every import re-examines the scene's volumes)
    setattr(node, _EXAMINED_FILE, key)
    record = read_provenance(key[0])
    if record is None:
        return False
    if provenance(node):
        if _same_result(provenance_record(node), record):
            return False  # its own file (Slicer's Save of it, stamped)
        for attr in (ATTR_SOURCE, ATTR_INPUT, ATTR_INPUT_UID, ATTR_INPUT_SHA256, ATTR_INPUT_SLICE_THICKNESS,
                     ATTR_INPUT_SLICE_NOTE):  # another run's: its input is the file's
            node.RemoveAttribute(attr)
        node.RemoveNodeReferenceIDs(SOURCE_REFERENCE_ROLE)
        logger.info("%s holds another result now (%s): its provenance is that result's", node.GetName(), key[0])
    set_provenance(node, kind=_kind_of(record.task, record.title), model=record.weights,
                   weights_sha256=record.weights_sha256, settings=record.settings, title=record.title,
                   date=record.date or "unrecorded", recorded_input=(record.input, record.input_uid),
                   environment=record.environment, input_sha256=record.input_sha256,
                   input_slices=(record.input_slice_thickness_mm, record.input_slice_note))  # fmt: skip
    if "synthetic" not in (node.GetName() or "").lower():
        node.SetName(f"{node.GetName()} (synthetic)")
    logger.info("%s was loaded from a result file (%s): labelled synthetic", node.GetName(), key[0])
    return True


#: Python attribute of a volume node whose file is watched (:func:`_watch_file`): the observer's tag.
_WATCHING_FILE = "_ctdiffusion_watching_file"


def _watch_file(node) -> None:
    """:func:`recognise_result_file` now and whenever the node is modified: Slicer's volume reader adds a node to
    the scene before it sets the node's storage node, and Slicer reads a CLI's output into the node the CLI's panel
    names, which may be a node loaded from another file or an earlier run's result. Reading a file modifies the node;
    Slicer's Save does not, and the node's file is examined once per version (path, time, size)."""
    recognise_result_file(node)
    if not hasattr(node, _WATCHING_FILE):
        setattr(node, _WATCHING_FILE,
                node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, _event: recognise_result_file(caller)))


def watch_results_of_loaded_scenes(scene) -> None:
    """From now on, the results in every scene loaded or imported into ``scene`` keep their provenance when Slicer
    saves them (:func:`watch_results` after each import), and a result loaded from a file on its own is recognised
    (:func:`recognise_result_file`). Idempotent: the modules call it at Slicer's startup and when a panel opens."""
    if getattr(scene, _WATCHING_IMPORTS, False):
        return

    def node_added(_scene, _event, node=None) -> None:
        if node is not None and node.IsA("vtkMRMLVolumeNode"):
            _watch_file(node)

    node_added.CallDataType = vtk.VTK_OBJECT
    scene.AddObserver(scene.NodeAddedEvent, node_added)
    scene.AddObserver(scene.EndImportEvent, lambda caller, _event: watch_results(caller))
    setattr(scene, _WATCHING_IMPORTS, True)
    watch_results(scene)


def _stamp_after_write(storage, node_id: str) -> None:
    """Observer of a result's storage node: stamp the file it has just written (once per write)."""
    if storage.GetWriteState() != storage.TransferDone or not storage.GetFileName():
        return
    scene = storage.GetScene()
    node = scene.GetNodeByID(node_id) if scene is not None else None
    path = storage.GetFileName()
    if node is None or not provenance(node) or not os.path.isfile(path):
        return
    stat = os.stat(path)
    if getattr(storage, _STAMPED, None) == (path, stat.st_mtime_ns, stat.st_size):
        return  # already stamped: a later ModifiedEvent of the same write
    from DiffusionCore.results import stamp_provenance  # pydicom and the writers: loaded only when saving

    try:
        stamp_provenance(path, provenance_record(node))
    except OutputError as exc:
        logger.warning("%s was saved without its provenance fields: %s", path, exc)
        return
    stat = os.stat(path)
    setattr(storage, _STAMPED, (path, stat.st_mtime_ns, stat.st_size))


def provenance(node) -> dict[str, Any]:
    """The provenance attributes of a node (settings decoded from JSON); empty when none."""
    if node.GetAttribute(ATTR_SYNTHETIC) is None:
        return {}
    return {
        "kind": node.GetAttribute(ATTR_KIND),
        "model": node.GetAttribute(ATTR_MODEL),
        "weights_sha256": node.GetAttribute(ATTR_WEIGHTS_SHA256),
        "settings": json.loads(node.GetAttribute(ATTR_SETTINGS) or "{}"),
        "date": node.GetAttribute(ATTR_DATE),
        "source": node.GetNodeReferenceID(SOURCE_REFERENCE_ROLE),
        "environment": _environment_attribute(node),
    }


def _environment_attribute(node) -> dict[str, str]:
    """The run's environment the node records (:data:`ATTR_ENVIRONMENT`); ``{}`` when it records none (a result of
    a version before it was kept, a scene edited by hand)."""
    try:
        value = json.loads(node.GetAttribute(ATTR_ENVIRONMENT) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def read_job_report(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON report a job's command wrote (``--reportFile``); ``{}`` when it wrote none."""
    from pathlib import Path

    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def recorded_environment(output_file: str | os.PathLike, report: dict[str, Any] | None = None) -> dict[str, str]:
    """The environment of the run that wrote ``output_file`` (:func:`DiffusionCore.provenance.environment`: commit,
    torch, Python, platform, the GPU it ran on), as that file records it, else as its ``report``'s ``provenance``
    object does; ``{}`` when neither says. Never this process's: Slicer's is not the job's (a GPU the panel named
    "auto", another torch)."""
    record = read_provenance(output_file)
    if record is not None and record.environment:
        return dict(record.environment)
    recorded = ((report or {}).get("provenance") or {}).get("environment")
    return {str(k): str(v) for k, v in recorded.items()} if isinstance(recorded, dict) else {}


def source_node(node):
    """The input a result node was made from, while that node is in the scene; else None. Found by its node
    reference, never by the ID recorded in the attribute: after a saved scene is imported beside other volumes,
    that ID can name another patient's scan."""
    return node.GetNodeReference(SOURCE_REFERENCE_ROLE) if node is not None and node.GetScene() is not None else None


def comparison_source(result, current_input) -> tuple[Any, str]:
    """The volume to compare the result node ``result`` with, and what to tell the user first ("" when nothing).

    The volume it was made from while that is in the scene (:func:`source_node`), whatever the input selector holds
    now. A result that records how it was made but no reference to its input (saved by a version before 2026-12-05,
    whose scenes record only the input's node ID, which an imported scene gives to another volume; or its input was
    removed from the scene) has no known input: ``current_input`` is returned with a notice, to compare only when the
    user confirms that it is the scan the result was made from (None and a notice when there is no input). A volume
    that records nothing (not a result of these modules) is compared with ``current_input``, as the user chose.

    Returns:
        ``(volume node or None, notice)``.
    """
    if result is None:
        return None, ""
    source = source_node(result)
    if source is not None or result.GetAttribute(ATTR_SYNTHETIC) != "true":
        return source or current_input, ""
    name, recorded = result.GetName() or "", result.GetAttribute(ATTR_INPUT) or ""
    if result.GetAttribute(ATTR_SOURCE) is not None:  # only versions before the node reference wrote this attribute
        why = _("'{result}' was saved by an older version of this module and does not record which volume it was "
                "made from.").format(result=name)  # fmt: skip
    elif recorded:
        why = _("'{result}' was made from '{input}', which is no longer in the scene.").format(result=name, input=recorded)
    else:
        why = _("'{result}' does not record which volume it was made from.").format(result=name)
    if current_input is None:
        return None, why + " " + _("Select the CT it was made from as the input to compare it with.")
    return current_input, why + " " + _(
        "Compare it with the selected input, '{input}'? Do so only if that is the scan it was made from; otherwise "
        "select that scan as the input first."
    ).format(input=current_input.GetName() or "")


def recorded_input(node, *, series: bool = False) -> tuple[str, str]:
    """What a result records of its input when a job starts (``set_provenance``'s ``recorded_input``): its name and
    its DICOM UID ("" when not loaded from DICOM): with ``series`` (a CT, for super-resolution) its series' UID
    (:func:`dicom_series_uid`), as ``sr`` records it; else its first instance UID (a radiograph's, as ``xray2ct``
    records it). The node may be deleted before the job ends."""
    if series:
        return node.GetName() or "", dicom_series_uid(node)
    return node.GetName() or "", ((node.GetAttribute(ATTR_DICOM_INSTANCES) or "").split() or [""])[0]


def dicom_series_uid(node) -> str:
    """The SeriesInstanceUID of the DICOM series ``node`` was loaded from: the DICOM UID of its subject hierarchy item
    (where Slicer's DICOM module puts it), else the header of its first file in Slicer's DICOM database; ``""`` for a
    node not loaded from DICOM (a result of these modules among them: :func:`claim_output` drops that identity)."""
    if node is None or not node.GetAttribute(ATTR_DICOM_INSTANCES):
        return ""
    scene = node.GetScene()
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") if scene is not None else None
    item = sh.GetItemByDataNode(node) if sh is not None else 0
    if item and sh.HasItemUID(item, "DICOM") and sh.GetItemUID(item, "DICOM"):
        return str(sh.GetItemUID(item, "DICOM"))
    files = dicom_source_files(node)
    if not files:
        return ""
    from DiffusionCore.dicom_in import header_values

    values = header_values(files[0], ["SeriesInstanceUID"]) or {}
    return str(values.get("SeriesInstanceUID", "") or "")


def acquired_instance_uids(node) -> list[str]:
    """The DICOM SOP instance UIDs of the series ``node`` was loaded from or, for a result of these modules, derives
    from: a result of a result is followed back to the scan (by what each result recorded, else by its source node
    while that is in the scene). Empty for a volume not loaded from DICOM. ``node`` may be deleted from its scene."""
    seen: set[int] = set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        uids = (node.GetAttribute(ATTR_DICOM_INSTANCES) or "").split()
        if uids or node.GetAttribute(ATTR_SYNTHETIC) != "true":
            return uids
        uids = (node.GetAttribute(ATTR_INPUT_INSTANCES) or "").split()
        if uids:
            return uids
        node = source_node(node)
    return []


def _database_files(uids: list[str]) -> list[str]:
    """The files Slicer's DICOM database holds for these instance UIDs; a single UID that names no instance is
    tried as a series UID (what a result file written outside Slicer records). Empty outside Slicer."""
    try:
        import slicer

        database = slicer.dicomDatabase
    except (ImportError, AttributeError):
        return []
    if database is None or not uids:
        return []
    files = [f for f in (database.fileForInstance(uid) for uid in uids) if f]
    if not files and len(uids) == 1 and hasattr(database, "filesForSeries"):
        files = [f for f in database.filesForSeries(uids[0]) if f]
    return files


def _database_series_numbers(study_uid: str) -> frozenset[int]:
    """The SeriesNumbers of the study's series in Slicer's DICOM database (ctkDICOMDatabase: ``seriesForStudy``,
    ``filesForSeries``, ``fileValue``); empty outside Slicer."""
    try:
        import slicer

        database = slicer.dicomDatabase
    except (ImportError, AttributeError):
        return frozenset()
    if database is None or not study_uid or not all(
        hasattr(database, name) for name in ("seriesForStudy", "filesForSeries", "fileValue")
    ):
        return frozenset()
    numbers = set()
    for series in database.seriesForStudy(study_uid):
        files = list(database.filesForSeries(series))
        value = database.fileValue(files[0], "0020,0011") if files else ""
        if str(value).strip().lstrip("+-").isdigit():
            numbers.add(int(value))
    return frozenset(numbers)


def result_source_files(node) -> list[str]:
    """The DICOM files of the series a result derives from, for its DICOM export's patient, study and references: those
    of its source node while that is in the scene (for a result of a result, those of the scan behind it), else those
    of the instances it recorded (:data:`ATTR_INPUT_INSTANCES`, :data:`ATTR_INPUT_UID`), from Slicer's DICOM database.

    Raises:
        InputError: the result derives from a DICOM series none of whose files can be found (the input node is gone
            and Slicer's DICOM database does not have them): an export would be a new, nameless patient.
    """
    source = source_node(node)
    if source is not None:
        uids = acquired_instance_uids(source)
    else:
        uids = (node.GetAttribute(ATTR_INPUT_INSTANCES) or "").split()
    recorded = bool(uids)  # the result derives from a series loaded from DICOM
    if not uids and source is None and node.GetAttribute(ATTR_INPUT_UID):
        uids = [node.GetAttribute(ATTR_INPUT_UID)]  # a result file's record: not found, a patient is named
    files = _database_files(uids)
    if files or not recorded:
        return files
    name = (source.GetName() if source is not None else node.GetAttribute(ATTR_INPUT)) or "its input"
    where = "is not in Slicer's DICOM database" if source is not None else \
        "is no longer in the scene, and Slicer's DICOM database does not have its files"
    raise InputError(
        f"'{node.GetName()}' was made from '{name}' (DICOM instance {uids[0]}), which {where}: a DICOM export would "
        "put the result in a new patient and study with no name or ID. Import that series into the DICOM database "
        "again (DICOM module: Import) and load it, then export again; or export as NRRD or NIfTI."
    )


def provenance_record(node):
    """The node's provenance as a :class:`DiffusionCore.provenance.Provenance` (what exported files carry).

    Raises:
        InputError: the node is not a result of these modules (no provenance attributes).
    """
    from DiffusionCore.provenance import Provenance
    from DiffusionCore.results import input_slice_thickness

    info = provenance(node)
    if not info:
        raise InputError(
            f"{node.GetName()} is not a result of CT Diffusion SR or X-ray to CT (it has no provenance): export it "
            "with Slicer's own Save or DICOM export"
        )
    source = source_node(node)
    task = TASK_OF_KIND.get(info["kind"] or "", info["kind"] or "")
    if source is None:
        input_uid = node.GetAttribute(ATTR_INPUT_UID) or ""
    else:  # the input's series (SR) or instance (a radiograph), as the Provenance docstring says
        input_uid = recorded_input(source, series=task == "sr")[1]
    return Provenance(
        task=task,
        title=node.GetAttribute(ATTR_TITLE) or f"{info['kind']} (synthetic)",
        weights=str(info["model"] or ""),
        weights_sha256=str(info["weights_sha256"] or ""),
        settings=info["settings"],
        input=source.GetName() if source is not None else node.GetAttribute(ATTR_INPUT) or "",
        input_uid=input_uid,
        date=str(info["date"] or ""),
        environment=info["environment"],  # the run's; {} when unknown, never this process's
        input_sha256=node.GetAttribute(ATTR_INPUT_SHA256) or "",
        input_slice_thickness_mm=input_slice_thickness({"slice_thickness_mm": node.GetAttribute(ATTR_INPUT_SLICE_THICKNESS)}),
        input_slice_note=node.GetAttribute(ATTR_INPUT_SLICE_NOTE) or "",
    )



def dicom_source_files(node) -> list[str]:
    """The files of the DICOM instances ``node`` was loaded from (through Slicer's DICOM database); empty for a
    node not loaded from DICOM, or outside Slicer."""
    return _database_files((node.GetAttribute(ATTR_DICOM_INSTANCES) or "").split())


@dataclass(frozen=True)
class IrregularSeries:
    """A CT series that Slicer could not load as a regular grid, which the jobs read from its DICOM files instead, so
    that DiffusionCore resamples it exactly as ``sr SERIES_FOLDER`` does and the result is the command's:

    * a gantry-tilted series (its slices drift within their plane from one to the next), which Slicer's reader
      loads as a sheared grid (the slice step not along the slices' normal): on that grid the slab each thick slice
      averages would run along the table rather than across the slice;
    * a series under the acquisition-geometry regularization transform of Slicer's DICOM module (a straight stack
      and a non-linear grid transform that puts each slice where its file says): a tilt read by an older reader, or
      slices unevenly spaced (which the command then refuses, naming the spacings).

    Attributes:
        files: the node's DICOM files, one per slice, in the node's slice order.
        grid: the grid of the stack as stored, with the slice spacing measured along the slices' normal: the axes,
            the slice count and the spacings of the grid the files are read onto, near enough for the checks before
            a job (that grid is wider in-plane by the drift).
    """

    files: list[str]
    grid: Grid


def _series_to_read(node, every_slice: bool) -> IrregularSeries | None:
    """:func:`irregular_dicom_series` (``every_slice`` False: two headers read) or :func:`series_to_read_from_files`
    (``every_slice`` True: a regular grid without a transform is also checked slice by slice against its files)."""
    from DiffusionCore.volume import dicom_image_position

    image = node.GetImageData() if node is not None else None
    if image is None:
        return None
    parent = node.GetParentTransformNode()
    if parent is not None and parent.IsTransformToWorldLinear():
        return None  # a transform of the user's own: reading the files would drop it
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = matrix_to_array(m)
    spacing, origin, direction = geometry_from_ijk_to_ras(ijk)
    regular = parent is None and np.allclose(direction.T @ direction, np.eye(3), atol=1e-4)
    if regular and not every_slice:
        return None
    nx, ny, nz = image.GetDimensions()
    files = dicom_source_files(node)
    if nz < (3 if regular else 2) or len(files) != nz or not all(os.path.isfile(f) for f in files):
        return None
    if regular:  # where Slicer stacked the slices against where their files put them
        read = [dicom_image_position(f) for f in files]
        if any(p is None for p in read):
            return None
        stored = np.array([LPS_FROM_RAS @ (ijk @ (0.0, 0.0, k, 1.0))[:3] for k in range(nz)])
        acquired = np.array(read)
        if np.linalg.norm(stored[0] - acquired[0]) > np.linalg.norm(stored[0] - acquired[-1]):
            acquired = acquired[::-1]  # the files listed from the other end
        if np.linalg.norm(stored[0] - acquired[0]) > 0.25 * min(spacing[:2]):
            return None  # not the first file's slice first: a crop
        if np.max(np.linalg.norm(stored - acquired, axis=1)) <= 0.1 * spacing[2]:
            return None  # where the files say, within rounding
        return IrregularSeries(files, grid_from_node(node))
    first, last = dicom_image_position(files[0]), dicom_image_position(files[-1])
    if first is None or last is None:
        return None
    if parent is None:
        ends = [LPS_FROM_RAS @ (ijk @ (0.0, 0.0, k, 1.0))[:3] for k in (0, nz - 1)]
    else:
        to_world = vtk.vtkGeneralTransform()
        parent.GetTransformToWorld(to_world)
        ends = [LPS_FROM_RAS @ np.array(to_world.TransformPoint(*(ijk @ (0.0, 0.0, k, 1.0))[:3])) for k in (0, nz - 1)]
    miss = min(max(np.linalg.norm(ends[0] - a), np.linalg.norm(ends[1] - b)) for a, b in ((first, last), (last, first)))
    if miss > 0.25 * min(spacing[:2]):
        return None  # a non-linear transform that is not the DICOM module's regularization
    normal = np.cross(direction[:, 0], direction[:, 1])
    step = abs(float((last - first) @ normal)) / (nz - 1)
    if step <= 0:
        return None
    grid = Grid((nz, ny, nx), (spacing[0], spacing[1], step), tuple(float(v) for v in origin),
                tuple(float(v) for v in direction.ravel()))  # fmt: skip
    return IrregularSeries(files, grid)


def irregular_dicom_series(node) -> IrregularSeries | None:
    """The node's DICOM files when it is a series Slicer could not load as a regular grid (see
    :class:`IrregularSeries`), else None: a regular grid, a node not loaded from DICOM, files no longer in the database
    or on disk, a transform of the user's own (linear, or non-linear but not putting the first and last slices
    where their files say: reading the files would drop it). Reads two headers: cheap enough for a tooltip."""
    return _series_to_read(node, every_slice=False)


def series_to_read_from_files(node) -> IrregularSeries | None:
    """The node's DICOM files when a job must read them instead of the node's voxels, else None: an
    :func:`irregular_dicom_series`, or a regular grid without a transform whose slices are not where their files put
    them. Slicer's reader stacks an unevenly spaced series (two slice spacings, say) at its mean spacing; with the DICOM
    module's acquisition-geometry regularization off nothing else marks it, and the node misplaces slices by
    millimetres. Read from its files, the series is refused with the spacings named, as ``sr SERIES_FOLDER`` refuses
    it. Reads every file's header, so it runs when a job starts, not for a tooltip. A node whose first slice is not the
    first file's (a crop) is not this case."""
    return _series_to_read(node, every_slice=True)


def job_grid(node) -> Grid:
    """The grid a job's input will have, for the checks before it starts: :func:`grid_from_node`, or for a series
    Slicer could not load as a regular grid the grid its files are read onto (:class:`IrregularSeries`)."""
    series = irregular_dicom_series(node)
    return series.grid if series is not None else grid_from_node(node)


#: ``write_job_input``'s default ``series``: find out with :func:`series_to_read_from_files` (reads every header).
FIND_SERIES = object()


def write_job_input(node, folder: str | os.PathLike, name: str, *, dtype: str = "float32", compress: bool = False,
                    series: IrregularSeries | None | object = FIND_SERIES, world: bool = False) -> str:
    """The node as a background job's input in ``folder``: ``name.nrrd`` (the node's own frame, :func:`ijk_to_ras`; ``dtype`` and ``compress`` as
    :func:`DiffusionCore.volume.write_volume` takes them: by default float32, uncompressed, for a job that starts at
    once), or for a series Slicer could not load as a regular grid (:func:`series_to_read_from_files`) a folder ``name``
    holding its DICOM files (linked, or copied where links cannot be made), which DiffusionCore reads as
    ``sr SERIES_FOLDER`` does (a tilt resampled onto an orthogonal grid). ``series``: what
    :func:`series_to_read_from_files` returned for the node, when the caller has it already. ``world``: the node's
    voxels with its linear parent transforms applied (:func:`ijk_to_ras`; a series read from its files has none).
    The node is never modified. Returns the path to pass to the job."""
    import shutil
    from pathlib import Path

    from DiffusionCore.volume import write_volume

    remember_place(node)  # where its results go should it be deleted while the job runs
    if series is FIND_SERIES:
        series = series_to_read_from_files(node)
    if series is None:
        path = Path(folder) / f"{name}.nrrd"
        write_volume(volume_from_node(node, world=world), path, overwrite=True, dtype=dtype, compress=compress)
        return str(path)
    target = Path(folder) / name
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("[0-9][0-9][0-9][0-9][0-9]_*"):  # an earlier export's files: never two series mixed
        old.unlink()
    for i, file in enumerate(series.files):
        link = target / f"{i:05d}_{Path(file).name}"
        try:
            os.link(file, link)
        except OSError:
            shutil.copyfile(file, link)
    logger.info("'%s' is not a regular grid as loaded (a gantry tilt, Slicer's regularization transform, or slices "
                "where their files do not put them): the job reads its %d DICOM files, as sr SERIES_FOLDER does",
                node.GetName(), len(series.files))  # fmt: skip
    return str(target)


def export_needs_patient(node) -> bool:
    """Whether a DICOM export of the result ``node`` must be told its patient (``export_result``'s ``patient_id``): no
    DICOM series it derives from is known (its input was loaded from NRRD or NIfTI, or is a PNG radiograph; or a result
    file records a series that Slicer's DICOM database does not hold), so the series would have no patient of its
    own. False for a node that is not a result (its export is refused), for one whose input's series is found, and
    for one whose input series was loaded from DICOM but cannot be found (:func:`result_source_files`: its export is
    refused with what to do; naming a patient would not put it in its study)."""
    if node is None or not provenance(node):
        return False
    try:
        return not result_source_files(node)
    except InputError:
        return False


def _no_patient_problem(node) -> str:
    """Why a DICOM export of ``node``, whose input's DICOM series is not known, is refused without a patient."""
    source = source_node(node)
    result = node.GetName() or ""
    recorded_uid = (node.GetAttribute(ATTR_INPUT_UID) or "") if source is None else ""
    name = source.GetName() if source is not None else node.GetAttribute(ATTR_INPUT) or ""
    if recorded_uid:
        why = _("'{result}' records its input '{input}' (DICOM {uid}), which Slicer's DICOM database does not hold: "
                "without it there is no patient or study").format(result=result, input=name or _("its input"),
                                                                  uid=recorded_uid)  # fmt: skip
        rerun = _("import that series into the DICOM database (DICOM module: Import) and export again so the result "
                  "joins its patient and study")  # fmt: skip
    else:
        if name:
            why = _("'{result}' was made from '{input}', which was not loaded from DICOM: it holds no patient or "
                    "study").format(result=result, input=name)  # fmt: skip
        else:
            why = _("'{result}' does not record a DICOM series it was made from: there is no patient or study to "
                    "put it in").format(result=result)  # fmt: skip
        rerun = _("load the scan from DICOM (DICOM module) and run again so the result joins its patient and study")
    return _("{why}, so a DICOM series would have no patient name or ID and a study of its own, which a PACS files "
             "under an unknown patient. Enter the patient's ID (and name) when the export asks for them, export as "
             "NRRD or NIfTI, or {rerun}.").format(why=why, rerun=rerun)  # fmt: skip


def checked_patient(patient_id: str | None, patient_name: str | None = None) -> tuple[str, str] | None:
    """The patient named for a DICOM export (``(ID, name)``, the name ``""`` when none is given), checked as the
    commands check ``--patient-id`` and ``--patient-name`` (a DICOM PatientID; a PatientName in DICOM's form
    Family^Given); None when no ID is given.

    Raises:
        InputError: a name without an ID, or a value DICOM cannot hold, saying which and what is wrong.
    """
    from DiffusionCore.cli.common import patient_value_problem

    name = patient_name if patient_name is not None and patient_name.strip() else ""
    if patient_id is None:
        if name:
            raise InputError(_("A patient name was given without the patient's ID: a PACS files a series by its "
                               "PatientID, so give the ID too."))  # fmt: skip
        return None
    problem = patient_value_problem(patient_id)
    if problem:
        raise InputError(_("The patient ID {problem}.").format(problem=problem))
    problem = patient_value_problem(name, name=True) if name else ""
    if problem:
        raise InputError(_("The patient name {problem}.").format(problem=problem))
    return patient_id.strip(), name.strip()


def export_result(node, path: str, *, as_dicom: bool = False, source_files: list[str] | None = None,
                  overwrite: bool = False, patient_id: str | None = None,
                  patient_name: str | None = None) -> list:  # fmt: skip
    """Export a result node with its provenance through DiffusionCore's writer: a DICOM series labelled
    synthetic (``as_dicom``; patient and study from the input's DICOM files when known, else the patient named by
    ``patient_id`` in a new study), or NRRD / MHA with the provenance header fields, or NIfTI with its JSON sidecar.
    Slicer's own Save and DICOM export do not carry these fields. Returns the paths written.

    Args:
        node: a result node of these modules.
        path: the series folder (DICOM) or the file.
        as_dicom: write a DICOM series.
        source_files: the input's DICOM files (default: :func:`result_source_files`, from Slicer's DICOM
            database: those of the node's source node, or of the DICOM series the result recorded when that node is
            gone).
        overwrite: replace an earlier export.
        patient_id: the PatientID of a DICOM series whose input's DICOM series is not known
            (:func:`export_needs_patient`: an input loaded from NRRD or NIfTI, a PNG radiograph), as the commands'
            ``--patient-id``; the series forms a new study of that patient. Without it such an export is refused.
        patient_name: that patient's PatientName, in DICOM's form Family^Given (``""`` or None: none); with
            ``patient_id``.

    Raises:
        InputError: a DICOM export of a result whose input series cannot be found (:func:`result_source_files`), or
            whose input holds no patient without ``patient_id``; ``patient_id`` or ``patient_name`` with an input's
            series known (its patient is kept: another one named would mis-file the series), with a file export, or
            not valid in DICOM (:func:`checked_patient`). Nothing is written.
    """
    from DiffusionCore.dicom_out import DicomSource
    from DiffusionCore.results import check_result_output, named_patient_source, write_result

    record = provenance_record(node)
    patient = checked_patient(patient_id, patient_name)
    if patient is not None and not as_dicom:
        raise InputError(_("A patient ID and name are for a DICOM export, and {path} is written as a volume file, "
                           "which holds no patient: leave them out, or export as a DICOM series.").format(path=path))
    check_result_output(path, as_dicom, overwrite=overwrite)
    source = None
    if as_dicom:
        if source_files is None:
            source_files = result_source_files(node)
        source = DicomSource.from_files(source_files) if source_files else None
        if source is not None and patient is not None:
            raise InputError(_(
                "'{result}' derives from a DICOM series, whose patient and study its series joins: another patient "
                "named for it would file it under the wrong one. Export it without a patient ID and name (to change "
                "the patient, correct the input's own DICOM headers)."
            ).format(result=node.GetName()))  # fmt: skip
        if source is not None:  # the numbers of the study's series in Slicer's DICOM database are taken too
            taken = _database_series_numbers(str(source.header.get("StudyInstanceUID", "")))
            source = dataclasses.replace(source, study_series_numbers=source.study_series_numbers | taken)
        elif patient is None:
            raise InputError(_no_patient_problem(node))
        else:  # an input of no patient: the one named, in a new study
            source = named_patient_source(patient[0], patient[1], record.date)
            logger.info("'%s' is exported under patient ID %r%s, in a new study of its own (its input holds no "
                        "patient or study)", node.GetName(), patient[0],
                        f", name {patient[1]!r}" if patient[1] else ", no name")  # fmt: skip
    return write_result(volume_from_node(node), path, record, as_dicom=as_dicom, dicom_source=source,
                        keep_frame_of_reference=record.task == "sr", overwrite=overwrite)  # fmt: skip


#: The export dialog's file types: (filter text, suffix added when missing, DICOM series?).
EXPORT_FILTERS = (
    ("DICOM series, labelled synthetic (a new folder)", "", True),
    ("NRRD with provenance fields (*.nrrd)", ".nrrd", False),
    ("NIfTI with a JSON provenance sidecar (*.nii.gz)", ".nii.gz", False),
)


def export_target(chosen_path: str, chosen_filter: str) -> tuple[str, bool]:
    """(path, as_dicom) for what the export dialog returned: the DICOM filter names a series folder; a file
    filter adds its suffix when the name has none."""
    for text, suffix, dicom in EXPORT_FILTERS:
        if chosen_filter == text:
            if dicom:
                return chosen_path, True
            lower = chosen_path.lower()
            known = any(lower.endswith(x) for x in (".nrrd", ".nii.gz", ".nii", ".mha"))
            return (chosen_path if known else chosen_path + suffix), False
    return chosen_path, False


def export_chosen(node, chosen_path: str, chosen_filter: str, *, patient_id: str | None = None,
                  patient_name: str | None = None) -> list:  # fmt: skip
    """Export ``node`` where the export dialog said (:func:`export_target`). Qt's save dialog has already asked
    the user to confirm replacing the file it returns, so that file is replaced; a name that the filter's suffix
    was added to, or a DICOM series folder, is never replaced without being asked. ``patient_id``, ``patient_name``:
    the patient the user named for a DICOM series whose input holds none (:func:`export_needs_patient`,
    :func:`export_result`). Returns the paths written."""
    from DiffusionCore.errors import OutputExistsError

    path, as_dicom = export_target(chosen_path, chosen_filter)
    try:
        return export_result(node, path, as_dicom=as_dicom, overwrite=not as_dicom and path == chosen_path,
                             patient_id=patient_id, patient_name=patient_name)  # fmt: skip
    except OutputExistsError as exc:  # the engine's advice names its command-line flag; here it is the dialog
        raise exc.advising("choose another name in the export dialog") from None


def write_node_to_file(node, path: str) -> None:
    """Write a volume node (in its own frame, as Slicer's Save writes it) with DiffusionCore's writer (NRRD/NIfTI/MHA)."""
    from DiffusionCore.volume import write_volume

    write_volume(volume_from_node(node), path, overwrite=True, dtype="float32")


def read_volume_file(path: str) -> Volume:
    """Read a result file written by a CLI, without CT plausibility checks (uncertainty maps are not CT)."""
    from DiffusionCore.volume import read_volume

    return read_volume(path, check=False)
