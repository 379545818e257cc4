"""What a Slicer scene holds around a volume that a file does not, on real MRML from the slicer-core wheel: parent
transforms, an output the user chose (under another transform, from another patient, without a display node), an
image extent that does not start at 0, and an input changed while its job runs.

What a Slicer user relies on: a result lies on its input in the views and keeps lying on it when the registration is
edited; an exported series of it is where the acquired series is, in its frame of reference; a node that receives a
synthetic image says so and no longer carries a real series' identity.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CTDiffusionSR") not in sys.path:
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))

from CTDiffusionSRLib import mrml_io  # noqa: E402
from CTDiffusionSRLib.process import JobState  # noqa: E402
from CTDiffusionSRLib.sr_logic import SRJob, SRSettings  # noqa: E402
from CTDiffusionSRLib.testing import phantom_ct, rotation  # noqa: E402

from DiffusionCore.degrade import thin_grid  # noqa: E402
from DiffusionCore.errors import OutputError  # noqa: E402
from DiffusionCore.volume import Volume, read_volume  # noqa: E402

FAST = {"factor": 2, "device": "cpu", "tiny_test_predictor": True, "adapt_to_scan": False}


def _own_matrix(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return mrml_io.matrix_to_array(m)


def _world_matrix(node) -> np.ndarray:
    """Where Slicer shows the node's voxels: its own matrix with its parent transforms applied."""
    import vtk

    matrix = _own_matrix(node)
    parent = node.GetParentTransformNode()
    if parent is None:
        return matrix
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return mrml_io.matrix_to_array(to_world) @ matrix


def _linear_transform(scene, name: str, matrix: np.ndarray, parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(mrml_io.array_to_matrix(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def _moved(angle: float, shift) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation(0, 0, angle)
    m[:3, 3] = shift
    return m


def _run(scene, node, **kwargs):
    job = SRJob(scene, node, SRSettings(**FAST), **kwargs)
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    return job


def test_a_registered_input_gets_its_result_under_the_same_transform_that_moves_with_it(scene, tmp_path):
    """An input under a registration (a transform hierarchy of a rotation and a shift, not hardened): the result
    was computed in world space and left without a transform, so editing the registration afterwards moved the
    input away from its result, and a DICOM export put the synthetic series 50 mm from the acquired one in the
    same frame of reference. Now the job works in the input's own frame and puts the result under the input's
    transform, as Slicer's Crop Volume does; exports and Slicer's own writer see that frame."""
    vol = phantom_ct(shape=(6, 32, 32), direction=rotation(10, 0, 20))
    node = mrml_io.add_volume_node(scene, vol, "registered CT")
    outer = _linear_transform(scene, "patient to atlas", _moved(0, (0.0, 0.0, 50.0)))
    inner = _linear_transform(scene, "registration", _moved(20, (5.0, -3.0, 10.0)), parent=outer)
    node.SetAndObserveTransformNodeID(inner.GetID())
    before = _own_matrix(node)

    (result,) = _run(scene, node).result_nodes
    assert result.GetTransformNodeID() == inner.GetID()
    expected = thin_grid(vol, 2)  # the input's own grid, made thin: its own frame
    got = mrml_io.volume_from_node(result)
    np.testing.assert_allclose(got.grid.index_to_physical(), expected.index_to_physical(), atol=1e-4)
    # in the views: the result's voxels lie where the input's do (the thin grid's first slice inside the first slab)
    world_input, world_result = _world_matrix(node), _world_matrix(result)
    np.testing.assert_allclose(world_result[:3, :3] @ np.diag([1, 1, 2]), world_input[:3, :3], atol=1e-6)
    # ... and still after the registration is edited
    inner.SetMatrixTransformToParent(mrml_io.array_to_matrix(_moved(-30, (40.0, 7.0, 0.0))))
    centre_in = _world_matrix(node) @ np.array([15.5, 15.5, 2.5, 1.0])
    centre_out = _world_matrix(result) @ np.array([15.5, 15.5, 5.5, 1.0])
    np.testing.assert_allclose(centre_out, centre_in, atol=1e-4)
    np.testing.assert_array_equal(_own_matrix(node), before)
    assert node.GetTransformNodeID() == inner.GetID()

    # exported (file or DICOM), the result is in the frame the input was acquired in, as Slicer's Save writes it
    (path,) = [p for p in mrml_io.export_result(result, str(tmp_path / "result.nrrd")) if str(p).endswith(".nrrd")]
    np.testing.assert_allclose(read_volume(path, check=False).grid.index_to_physical(), expected.index_to_physical(),
                               atol=1e-4)  # fmt: skip
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "slicer_saved.nrrd"))
    assert storage.WriteData(result)
    np.testing.assert_allclose(read_volume(tmp_path / "slicer_saved.nrrd", check=False).grid.index_to_physical(),
                               expected.index_to_physical(), atol=1e-4)  # fmt: skip


def test_an_output_the_user_chose_is_made_a_synthetic_result_on_the_input(scene):
    """An existing volume chosen as the output: one under a transform of its own got the result transformed twice
    (100 mm off); one from another patient kept that patient's DICOM identity and its name, now holding a
    synthetic image; one made by a script without a display node showed the result in a default grey scale. Now
    the output goes under the input's transform, loses the acquired series' identity, says "(synthetic)" in its
    name and is shown like the input."""
    vol = phantom_ct(shape=(6, 32, 32))
    node = mrml_io.add_volume_node(scene, vol, "patient A CT")
    node.GetDisplayNode().SetAutoWindowLevel(False)
    node.GetDisplayNode().SetWindowLevel(1500, -600)
    node.GetDisplayNode().SetInterpolate(0)
    chosen = mrml_io.add_volume_node(scene, vol, "B CT 1mm")
    chosen.SetAttribute(mrml_io.ATTR_DICOM_INSTANCES, "9.9.1 9.9.2")
    sh = mrml_io.subject_hierarchy(scene)
    item = sh.CreateItem(sh.GetSceneItemID(), chosen)
    sh.SetItemUID(item, "DICOM", "9.9.9.9")
    chosen.SetAndObserveTransformNodeID(_linear_transform(scene, "B's move", _moved(0, (0, 0, 100.0))).GetID())

    (result,) = _run(scene, node, output_node=chosen).result_nodes
    assert result is chosen
    assert chosen.GetTransformNodeID() is None  # the input's: none
    np.testing.assert_allclose(mrml_io.volume_from_node(chosen).grid.index_to_physical(),
                               thin_grid(vol, 2).index_to_physical(), atol=1e-4)  # fmt: skip
    assert chosen.GetName() == "B CT 1mm (synthetic)"
    assert chosen.GetAttribute(mrml_io.ATTR_DICOM_INSTANCES) is None and not sh.HasItemUID(item, "DICOM")
    assert mrml_io.provenance_record(chosen).input == "patient A CT"

    bare = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scripted output")
    assert bare.GetDisplayNode() is None
    (result,) = _run(scene, node, output_node=bare).result_nodes
    display = result.GetDisplayNode()
    assert display is not None and (display.GetWindow(), display.GetLevel()) == (1500, -600)
    assert display.GetInterpolate() == 0  # as the input's: a radiologist comparing voxels turned it off
    assert result.GetName() == "scripted output (synthetic)"


def test_a_loaded_scan_chosen_as_the_output_is_not_overwritten_by_save(scene, tmp_path):
    """A volume loaded from a file and chosen as the output (a slip in the output selector) kept its storage node:
    Slicer's Save, which writes every modified node to its storage node's file, wrote the synthetic result over
    the acquired scan. Now the claimed node forgets the file; the scan on disk stays as it was."""
    from DiffusionCore.volume import write_volume

    acquired = tmp_path / "acquired CT 2.nrrd"
    write_volume(phantom_ct(shape=(6, 32, 32), seed=5), acquired)
    before = acquired.read_bytes()
    node = mrml_io.add_volume_node(scene, phantom_ct(shape=(6, 32, 32)), "CT 1")
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT 2")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(acquired))
    assert storage.ReadData(chosen)
    chosen.SetAndObserveStorageNodeID(storage.GetID())

    (result,) = _run(scene, node, output_node=chosen).result_nodes
    assert result is chosen and scene.GetNodeByID(storage.GetID()) is None  # no other node used it
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLStorableNode")):  # what Save does with modified nodes
        other = scene.GetNthNodeByClass(i, "vtkMRMLStorableNode")
        if other.GetStorageNode() is not None and other.GetStorageNode().GetFileName():
            other.GetStorageNode().WriteData(other)
    assert acquired.read_bytes() == before
    assert chosen.GetStorageNode() is None or not chosen.GetStorageNode().GetFileName()


@pytest.mark.parametrize("class_name", ["vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode"])
def test_a_label_map_or_vector_volume_is_refused_as_the_output(scene, class_name):
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT")
    wrong = scene.AddNewNodeByClass(class_name, "segmentation")
    with pytest.raises(OutputError, match=f"the output 'segmentation' is a {class_name}, not a scalar volume"):
        SRJob(scene, node, SRSettings(**FAST), output_node=wrong)


def test_an_image_whose_extent_does_not_start_at_zero_is_read_where_slicer_shows_it(scene, tmp_path):
    """Some filters leave an image whose extent starts at (10, 0, 2): Slicer places voxel (0, 0, 0) of its array
    at IJK (10, 0, 2), and so does its writer; the module read it 8 mm off."""
    node = mrml_io.add_volume_node(scene, phantom_ct(shape=(8, 64, 64), origin=(0, 0, 0), direction=np.eye(3)), "cropped by a filter")
    image = node.GetImageData()
    image.SetExtent(10, 73, 0, 63, 2, 9)
    node.Modified()
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "slicer_written.nrrd"))
    assert storage.WriteData(node)
    on_disk = read_volume(tmp_path / "slicer_written.nrrd", check=False)
    got = mrml_io.volume_from_node(node)
    assert got.shape == on_disk.shape == (8, 64, 64)
    np.testing.assert_allclose(got.origin, on_disk.origin, atol=1e-4)
    np.testing.assert_allclose(got.origin, (8.0, 0.0, 8.0), atol=1e-6)  # LPS: 10 voxels of 0.8 mm along L, 2 of 4 mm


def test_an_input_changed_while_its_job_runs_is_said_to_have_changed(scene):
    """The result comes from the voxels as the job read them; a user who replaces the input meanwhile is told so
    (the comparison views would show the result over the changed volume without a word)."""
    node = mrml_io.add_volume_node(scene, phantom_ct(shape=(6, 32, 32)), "CT")
    job = SRJob(scene, node, SRSettings(**FAST)).start()  # the input is read when the job starts
    changed = mrml_io.volume_from_node(node)
    mrml_io.set_node_from_volume(node, Volume(changed.array[:, ::-1] + 100.0, (0.8, 0.8, 2.0), (0, 0, 0), np.eye(3)))
    assert job.wait(240) == JobState.COMPLETED, job.error
    assert any("'CT' was changed while the job ran" in n for n in job.notices), job.notices
    assert mrml_io.volume_from_node(job.result_nodes[0]).spacing[2] == pytest.approx(2.0)  # 4 mm slices made 2 mm

    quiet = _run(scene, node)
    assert not any("changed" in n for n in quiet.notices)


def test_an_input_deleted_while_its_job_runs_is_still_named_by_its_result(scene):
    """The input deleted mid-run: the result recorded no input at all (no name, no DICOM UID), so the synthetic
    volume could not be traced to the scan it was made from, and nothing was said."""
    from CTDiffusionSRLib.jobs import remove_node_and_helpers

    node = mrml_io.add_volume_node(scene, phantom_ct(shape=(6, 32, 32)), "LIDC-0001 chest")
    node.SetAttribute(mrml_io.ATTR_DICOM_INSTANCES, "1.2.3.4 1.2.3.5")
    sh = mrml_io.subject_hierarchy(scene)
    sh.SetItemUID(sh.CreateItem(sh.GetSceneItemID(), node), "DICOM", "1.2.3")  # its series, as Slicer records it
    job = SRJob(scene, node, SRSettings(**FAST)).start()
    remove_node_and_helpers(scene, node)
    assert job.wait(240) == JobState.COMPLETED, job.error
    assert job.notices == ["'LIDC-0001 chest' was deleted while the job ran; the result was made from it as it was "
                           "when the job started, and records its name."]  # fmt: skip
    record = mrml_io.provenance_record(job.result_nodes[0])
    assert (record.input, record.input_uid) == ("LIDC-0001 chest", "1.2.3")  # the series UID, as sr records it


def test_the_sr_log_and_errors_name_the_volume_not_its_hand_off_file(scene):
    """"warning: /tmp/ctdiffusion-4fqcns1q/input.nrrd does not look like CT": the user chose "CT 2019 unsigned"."""
    vol = phantom_ct(shape=(6, 32, 32))
    unsigned = Volume(vol.array + 1024.0, vol.spacing, vol.origin, vol.direction)  # stored without the HU offset
    node = mrml_io.add_volume_node(scene, unsigned, "CT 2019 unsigned")
    lines = []
    job = SRJob(scene, node, SRSettings(**FAST, allow_non_ct=True), on_line=lines.append)
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    assert [line for line in lines if "the volume 'CT 2019 unsigned'" in line and "look like CT" in line], lines
    assert not [line for line in lines + job.log if "ctdiffusion-" in line or "input.nrrd" in line]
    assert job.named(f"reading {job.tempdir}/output.nrrd needs about 4.7 GiB") == (
        "reading the result of 'CT 2019 unsigned' needs about 4.7 GiB")
