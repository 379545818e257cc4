"""Synthetic data for the modules' self-tests (and the pytest suite): small CT phantoms, a radiograph.

The tiny models used with these have random weights: results are meaningless images of the right shape and
geometry, which is what the self-tests check.
"""

from __future__ import annotations

import numpy as np

from DiffusionCore.volume import Volume


def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """A 3x3 rotation matrix from angles in degrees about x, y, z (applied in that order)."""
    a, b, c = np.radians([rx, ry, rz])
    x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    z = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return z @ y @ x


def phantom_ct(
    shape: tuple[int, int, int] = (6, 32, 32),
    spacing: tuple[float, float, float] = (0.8, 0.8, 4.0),
    direction: np.ndarray | None = None,
    origin: tuple[float, float, float] = (12.5, -30.0, 41.0),
    seed: int = 0,
) -> Volume:
    """A thick-slice CT phantom in HU: air, an elliptic soft-tissue body, a bright bone; oblique by default.

    Args:
        shape: array shape (z, y, x).
        spacing: mm, ITK order (x, y, z); the default has 4 mm slices (thick along array axis z).
        direction: 3x3 direction cosines; default a rotation of (10, -20, 30) degrees.
        origin: LPS mm of voxel (0, 0, 0).
        seed: noise seed.
    """
    rng = np.random.default_rng(seed)
    _z, y, x = np.indices(shape)
    cy, cx = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    arr = np.full(shape, -1000.0, np.float32)
    body = ((y - cy) / (0.4 * shape[1])) ** 2 + ((x - cx) / (0.45 * shape[2])) ** 2 < 1
    arr[body] = 40.0
    bone = ((y - cy) / (0.12 * shape[1])) ** 2 + ((x - cx - 3) / (0.1 * shape[2])) ** 2 < 1
    arr[bone] = 700.0
    arr += rng.normal(0, 10, shape).astype(np.float32)
    return Volume(arr, spacing, origin, rotation(10, -20, 30) if direction is None else direction)


def phantom_radiograph(size: int = 64, seed: int = 0) -> np.ndarray:
    """A chest-radiograph-like image (H, W) in [0, 1]: bright mediastinum and ribs, dark lungs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    img = 0.35 + 0.3 * np.exp(-(x / 0.12) ** 2)
    lungs = ((np.abs(x) - 0.2) / 0.15) ** 2 + (y / 0.35) ** 2 < 1
    img[lungs] -= 0.2
    img += 0.08 * (np.sin(y * 40) > 0.7)
    img += rng.normal(0, 0.01, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


class DicomDatabaseStandIn:
    """Stands in for ``slicer.dicomDatabase`` (ctkDICOMDatabase, which only the Slicer application has) where the
    modules use it: ``fileForInstance(uid)``, the file a DICOM instance was loaded from."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}

    def fileForInstance(self, uid: str) -> str:  # noqa: N802 (ctkDICOMDatabase's name)
        return self.files.get(uid, "")


def load_dicom_node(scene, files, name: str, database: DicomDatabaseStandIn, uids=None):
    """``files`` (one image, or a series) read by Slicer's own reader (the archetype storage node) into a new scalar
    volume node, marked as loaded from the DICOM database the way Slicer's DICOM module marks it: the
    ``DICOM.instanceUIDs`` attribute, whose UIDs ``database`` maps to the files (``uids``: default ``name.0``, ...)."""
    files = [str(f) for f in files]
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(files[0])
    storage.SetSingleFile(1 if len(files) == 1 else 0)
    if not storage.ReadData(node):
        raise RuntimeError(f"Slicer's reader could not read {files[0]}")
    uids = list(uids) if uids is not None else [f"{name}.{i}" for i in range(len(files))]
    database.files.update(zip(uids, files))
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    return node


def regularize_like_slicer(scene, node, files):
    """Put ``node`` under the acquisition-geometry regularization of Slicer's DICOM module, as Slicer does for a
    series its reader cannot place on a regular grid ("apply regularization transform"): the node becomes a
    straight stack along the slices' normal at their mean spacing (how ITK before 5.x stacked a gantry-tilted
    series; an unevenly spaced one still is), and a grid transform moves each slice to where its file's
    ImagePositionPatient puts it (one displacement per slice, at the four corners of its plane). ``files`` in slice
    order. Returns the transform node."""
    import SimpleITK as sitk
    import slicer
    import vtk
    from vtk.util import numpy_support

    ras_of = np.diag([-1.0, -1.0, 1.0])
    positions, orientation = [], None
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        reader.ReadImageInformation()
        positions.append(ras_of @ [float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        orientation = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
    positions = np.asarray(positions)
    row, col = ras_of @ orientation[:3], ras_of @ orientation[3:]
    normal = np.cross(row, col)
    along = (positions[-1] - positions[0]) @ normal / (len(files) - 1)
    nx, ny, nz = node.GetImageData().GetDimensions()
    sx, sy, _ = node.GetSpacing()
    straight = np.eye(4)
    straight[:3, :3] = np.c_[row * sx, col * sy, normal * along]
    straight[:3, 3] = positions[0]
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, straight[r, c])
    node.SetIJKToRASMatrix(matrix)
    grid = vtk.vtkImageData()
    grid.SetOrigin(*node.GetOrigin())
    grid.SetDimensions(2, 2, nz)
    grid.SetSpacing(sx * nx, sy * ny, abs(along))
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    shifts = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).reshape(nz, 2, 2, 3)
    for k in range(nz):
        shifts[k] = positions[k] - (straight @ (0.0, 0.0, k, 1.0))[:3]
    direction = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(direction)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetGridDirectionMatrix(direction)
    transform.SetDisplacementGridData(grid)
    transform.SetInterpolationModeToLinear()
    transform_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", node.GetName() + " acquisition transform")
    transform_node.SetAndObserveTransformToParent(transform)
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    return transform_node
