"""The X-ray to CT module's logic in a Slicer scene, on real MRML from the slicer-core wheel: a radiograph or a
reference CT under a parent transform, a 2D image stored as a coronal plane, inputs changed while the job runs, a
reference CT of another patient, the result's name over repeated runs and a user's rename, and the log lines.

What a Slicer user relies on: the radiograph is used as Slicer displays it and the reference CT where Slicer shows
it; what the module says names the volumes the user chose, never a temporary file; a result never takes another
result's name.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

from conftest import hold_after_stage_1, until_stage_1_is_shown  # noqa: E402
from CTDiffusionSRLib import mrml_io  # noqa: E402
from CTDiffusionSRLib.process import JobState  # noqa: E402
from CTDiffusionSRLib.testing import DicomDatabaseStandIn, load_dicom_node, phantom_ct, phantom_radiograph  # noqa: E402
from test_slicer_widgets import _open, _run_timer, panels, widgets  # noqa: E402, F401  (the Qt stand-in's fixtures)
from XrayToCTLib import XrayJob, XraySettings, check_xray_input, write_radiograph  # noqa: E402
from XrayToCTLib.xray_logic import check_reference_input  # noqa: E402

from DiffusionCore.errors import InputError  # noqa: E402
from DiffusionCore.volume import read_volume  # noqa: E402

ONE_STAGE = XraySettings(num_stages=1, steps=1, device="cpu", tiny_test_model=True)
#: two stages, slow enough for something to happen between them
TWO_SLOW_STAGES = XraySettings(num_stages=2, steps=25, device="cpu", tiny_test_model=True)


def _shown() -> np.ndarray:
    """A radiograph as it should look, with a bright marker at its top left."""
    pixels = (phantom_radiograph(64) * 3000).astype(np.float32)
    pixels[:8, :20] = 5000.0
    return pixels


def _radiograph_node(scene, stored: np.ndarray, name: str = "chest PA", dims=None, spacing=(0.4, 0.4, 1.0)):
    """A scalar volume node holding ``stored`` (rows, columns), as Slicer loads a 2D image file (shown as stored);
    ``dims``: the image's (x, y, z) dimensions when it is not one slice along z."""
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*(dims or (stored.shape[1], stored.shape[0], 1)))
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(stored).ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    node.SetSpacing(*spacing)
    node.CreateDefaultDisplayNodes()
    return node


def _linear_transform(scene, rotation_ras: np.ndarray, translation=(0.0, 0.0, 0.0)):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(rotation_ras[r, c]))
        matrix.SetElement(r, 3, float(translation[r]))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(matrix)
    return transform


def _warp(scene):
    """A non-linear (grid) transform: a constant 1 mm displacement."""
    import vtk
    from vtk.util import numpy_support

    grid = vtk.vtkImageData()
    grid.SetDimensions(2, 2, 2)
    grid.SetSpacing(400, 400, 400)
    grid.SetOrigin(-200, -200, -200)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())[:] = 1.0
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformToParent(transform)
    return node


def _handed_over(scene, node, tmp_path, reference=None) -> tuple[list[str], XrayJob]:
    job = XrayJob(scene, node, ONE_STAGE, reference_node=reference)
    folder = tmp_path / f"handoff-{node.GetID()}"
    folder.mkdir()
    return job.prepare(folder), job


def _reference_ct(scene, name: str = "reference CT"):
    return mrml_io.add_volume_node(scene, phantom_ct(shape=(12, 32, 32), spacing=(8.0, 8.0, 8.0)), name)


def _dicom_file(path: Path, pixels: np.ndarray, modality: str, patient_id: str) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(pixels.astype(np.int16 if modality == "CT" else np.uint16))
    image.SetMetaData("0008|0060", modality)
    image.SetMetaData("0010|0020", patient_id)
    image.SetMetaData("0028|0030", "0.5\\0.5")
    sitk.WriteImage(image, str(path))
    return path


# -- the radiograph as Slicer displays it -------------------------------------------------------------------------
def test_a_radiograph_under_a_linear_transform_is_handed_over_as_displayed(scene, tmp_path):
    """An image stored upside down and shown upright by a 180-degree rotation was handed over upside down: the
    transform was ignored."""
    import SimpleITK as sitk

    shown = _shown()
    node = _radiograph_node(scene, shown[::-1, ::-1].copy(), "stored upside down")
    node.SetAndObserveTransformNodeID(_linear_transform(scene, np.diag([-1.0, -1.0, 1.0]), (5.0, 0.0, 0.0)).GetID())
    assert check_xray_input(node) == ""
    args, _ = _handed_over(scene, node, tmp_path)
    handed = sitk.ReadImage(args[-2])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(handed), shown)
    assert handed.GetSpacing() == pytest.approx((0.4, 0.4))


def test_a_2d_image_stored_as_a_coronal_plane_is_a_radiograph_handed_over_as_displayed(scene, tmp_path):
    """A W x 1 x H image (a projection computed in Slicer along A-P) was refused as "a 3D volume"."""
    import SimpleITK as sitk

    shown = _shown()
    # one voxel along y (A-P); k runs to the patient's head, so the first stored row is the bottom one shown
    node = _radiograph_node(scene, shown[::-1].copy(), "coronal DRR", dims=(64, 1, 64), spacing=(2.0, 2.0, 3.0))
    assert check_xray_input(node) == ""
    handed = sitk.ReadImage(str(write_radiograph(node, tmp_path / "r.mha")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(handed), shown)
    assert handed.GetSpacing() == pytest.approx((2.0, 3.0))  # (column, row) mm: x, then z
    volume = _radiograph_node(scene, np.zeros((4 * 64, 64), np.float32), "volume", dims=(64, 64, 4))
    assert "3D volume" in check_xray_input(volume)


def test_non_linear_transforms_are_refused_naming_the_radiograph_or_the_reference_ct(scene):
    """They got the SR module's words (gantry tilt, ``sr SERIES_FOLDER``); a warped reference CT passed the Apply
    check and was refused when the job started."""
    warp = _warp(scene)
    radiograph = _radiograph_node(scene, _shown(), "warped PA")
    radiograph.SetAndObserveTransformNodeID(warp.GetID())
    said = check_xray_input(radiograph)
    assert said.startswith("The radiograph 'warped PA' is under a non-linear transform ('warp')"), said
    assert "harden the transform first" in said and "SERIES_FOLDER" not in said and "tilt" not in said
    with pytest.raises(InputError, match="The radiograph 'warped PA'"):
        XrayJob(scene, radiograph, ONE_STAGE)
    plain = _radiograph_node(scene, _shown())
    reference = _reference_ct(scene, "warped CT")
    reference.SetAndObserveTransformNodeID(warp.GetID())
    said = check_reference_input(reference)
    assert said.startswith("The reference CT 'warped CT' is under a non-linear transform ('warp')"), said
    assert "harden the transform first" in said and "SERIES_FOLDER" not in said
    with pytest.raises(InputError, match="The reference CT 'warped CT'"):
        XrayJob(scene, plain, ONE_STAGE, reference_node=reference)


def test_a_dicom_radiograph_under_a_turning_transform_is_said_to_follow_its_header(scene, tmp_path, monkeypatch):
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    path = _dicom_file(tmp_path / "cr.dcm", _shown(), "CR", "P1")
    node = load_dicom_node(scene, [path], "CR", database)
    assert XrayJob(scene, node, ONE_STAGE).notices == []
    node.SetAndObserveTransformNodeID(_linear_transform(scene, np.diag([-1.0, -1.0, 1.0])).GetID())
    notices = XrayJob(scene, node, ONE_STAGE).notices
    assert notices and "used as its DICOM header orients it" in notices[0]


# -- the reference CT ----------------------------------------------------------------------------------------------
def test_a_reference_ct_under_a_linear_transform_is_scored_where_slicer_shows_it(scene, tmp_path):
    """A 90-degree rotation of the reference gave the same scores as none: its transform was ignored."""
    from DiffusionCore.xray.evaluate import reference_scores

    radiograph = _radiograph_node(scene, _shown(), spacing=(5.0, 5.0, 1.0))
    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 90 degrees about S
    moved = _reference_ct(scene, "moved CT")
    moved.SetAndObserveTransformNodeID(_linear_transform(scene, turn, (40.0, 0.0, 0.0)).GetID())
    hardened = _reference_ct(scene, "hardened CT")
    hardened.SetAndObserveTransformNodeID(moved.GetTransformNodeID())
    hardened.HardenTransform()
    args, job = _handed_over(scene, radiograph, tmp_path, moved)
    given = read_volume(args[args.index("--referenceVolume") + 1])
    shown = mrml_io.volume_from_node(hardened)
    np.testing.assert_allclose(given.direction, shown.direction, atol=1e-6)
    np.testing.assert_allclose(given.origin, shown.origin, atol=1e-4)
    assert job.run(timeout=180) == JobState.COMPLETED, job.error
    result = mrml_io.volume_from_node(job.result_nodes[0])
    assert job.reference_metrics == pytest.approx(reference_scores(result, shown), rel=1e-4)
    untransformed = reference_scores(result, mrml_io.volume_from_node(_reference_ct(scene)))
    assert job.reference_metrics != pytest.approx(untransformed, rel=1e-4)


def test_a_reference_ct_of_another_patient_is_said_to_give_meaningless_scores(scene, tmp_path, monkeypatch):
    """Scored without a word, though both DICOM headers gave the patient."""
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    cr_file = _dicom_file(tmp_path / "cr.dcm", _shown(), "CR", "P1")
    radiograph = load_dicom_node(scene, [cr_file], "CR P1", database, uids=["cr.P1"])
    reference = {}
    for patient in ("P1", "P2"):  # a CT node marked as loaded from a DICOM file of this patient
        reference[patient] = _reference_ct(scene, f"CT {patient}")
        ct_file = _dicom_file(tmp_path / f"ct-{patient}.dcm", np.full((32, 32), -1000), "CT", patient)
        database.files[f"ct.{patient}"] = str(ct_file)
        reference[patient].SetAttribute("DICOM.instanceUIDs", f"ct.{patient}")
    notices = XrayJob(scene, radiograph, ONE_STAGE, reference_node=reference["P2"]).notices
    assert notices == [
        "The radiograph 'CR P1' (PatientID P1) and the reference CT 'CT P2' (PatientID P2) are of different patients: "
        "the reference scores compare two different patients and mean little."
    ]
    assert XrayJob(scene, radiograph, ONE_STAGE, reference_node=reference["P1"]).notices == []
    assert XrayJob(scene, radiograph, ONE_STAGE, reference_node=_reference_ct(scene)).notices == []  # not DICOM


# -- while the job runs ---------------------------------------------------------------------------------------------
def test_a_radiograph_or_reference_changed_while_the_job_runs_is_noticed(scene):
    """The result of the radiograph as it was when the job started came back as if nothing had happened."""
    from vtk.util import numpy_support

    radiograph = _radiograph_node(scene, _shown(), spacing=(5.0, 5.0, 1.0))
    reference = _reference_ct(scene)
    job = XrayJob(scene, radiograph, ONE_STAGE, reference_node=reference)
    assert job.run(timeout=180) == JobState.COMPLETED, job.error
    assert job.notices == []
    job = XrayJob(scene, radiograph, ONE_STAGE, reference_node=reference).start()  # the files are written
    scalars = radiograph.GetImageData().GetPointData().GetScalars()
    numpy_support.vtk_to_numpy(scalars)[:] *= 0.5  # edited in place, as a filter would
    scalars.Modified()
    reference.SetSpacing(4.0, 4.0, 4.0)
    assert job.wait(180) == JobState.COMPLETED, job.error
    assert job.notices == [
        "'chest PA' was changed while the job ran; the result was made from it as it was when the job started. "
        "Apply again for a result of the radiograph as it is now.",
        "The reference CT 'reference CT' was changed while the job ran; the scores compare the result with it as it "
        "was when the job started.",
    ]


def test_repeated_runs_give_results_their_own_names_without_the_last_stage_number(scene):
    """Run 2's result took run 1's name; a one-stage result was called "... CT stage 1 (synthetic)", like a
    preview."""
    radiograph = _radiograph_node(scene, _shown(), spacing=(5.0, 5.0, 1.0))
    names = []
    for _ in range(2):
        job = XrayJob(scene, radiograph, ONE_STAGE)
        shown_while_running = set()
        job.start()
        while job.poll() == JobState.RUNNING:
            if job.preview_node is not None:
                shown_while_running.add(job.preview_node.GetName())
            time.sleep(0.02)
        assert job.state == JobState.COMPLETED, job.error
        names.append(job.result_nodes[0].GetName())
        assert shown_while_running <= {names[-1]}  # the one stage is the result, never called "stage 1"
    assert names == ["chest PA CT (synthetic)", "chest PA CT (synthetic)_1"]
    display = job.result_nodes[0].GetDisplayNode()  # shown in the first window its DICOM series carries
    assert (display.GetWindow(), display.GetLevel()) == (1500.0, -300.0)


def test_a_preview_renamed_by_the_user_keeps_its_name(scene):
    radiograph = _radiograph_node(scene, _shown(), spacing=(5.0, 5.0, 1.0))
    job = XrayJob(scene, radiograph, TWO_SLOW_STAGES).start()
    deadline = time.monotonic() + 120
    while job.poll() == JobState.RUNNING and job.preview_node is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.state == JobState.RUNNING and job.stages_shown == [1], "stage 1's preview expected first"
    assert job.preview_node.GetName() == "chest PA CT stage 1 (synthetic)"
    job.preview_node.SetName("my lungs")
    assert job.wait(180) == JobState.COMPLETED, job.error
    assert job.result_nodes[0].GetName() == "my lungs" and job.stages_shown[-1] == 2


def test_the_log_and_the_error_name_the_volumes_not_the_hand_off_files(scene):
    """"reference scores against /tmp/ctdiffusion-.../reference.nrrd": the user chose "reference CT"."""
    radiograph = _radiograph_node(scene, _shown(), spacing=(5.0, 5.0, 1.0))
    lines = []
    job = XrayJob(scene, radiograph, ONE_STAGE, reference_node=_reference_ct(scene), on_line=lines.append)
    assert job.run(timeout=180) == JobState.COMPLETED, job.error
    assert [line for line in lines if line.startswith("reference scores against the reference CT 'reference CT' (")]
    assert [line for line in lines if line.startswith("warning: the reference CT 'reference CT': its body fills")]
    said = [line for line in lines + job.log if not line.startswith("stage-ready ")]  # the preview files' protocol
    assert not [line for line in said if "ctdiffusion-" in line or "reference.nrrd" in line]
    assert job.named(f"cannot read {job.tempdir}/radiograph.mha") == "cannot read the radiograph 'chest PA'"


# -- a job that does not complete keeps the stages it showed ------------------------------------------------------
def _assert_records_stage_1_of_2(node, radiograph) -> str:
    """The node says it is stage 1 of 2, on its grid, made from ``radiograph``; returns its grid ("64^3")."""
    import json

    from XrayToCTLib.xray_logic import grid_text

    grid = grid_text(mrml_io.array_from_node(node).shape)
    settings = json.loads(node.GetAttribute(mrml_io.ATTR_SETTINGS))
    assert (settings["stage"], settings["stages_planned"], settings["grid"]) == (1, 2, grid)
    assert node.GetAttribute(mrml_io.ATTR_SYNTHETIC) == "true"
    assert node.GetAttribute(mrml_io.ATTR_TITLE) == f"CT from radiograph, stage 1 of 2, {grid} (synthetic)"
    assert node.GetAttribute(mrml_io.ATTR_INPUT) == radiograph.GetName()
    assert node.GetDisplayNode() is not None and scene_item(node)
    return grid


def scene_item(node) -> int:
    """The node's subject hierarchy item (0: none)."""
    return node.GetScene().GetSubjectHierarchyNode().GetItemByDataNode(node)


def test_a_cancel_during_stage_2_keeps_stage_1s_result_under_the_users_name(scene):
    """Stage 1's preview, renamed by the user, was deleted by Cancel: on a CPU minutes of work thrown away."""
    radiograph = _radiograph_node(scene, _shown(), spacing=(5.0, 5.0, 1.0))
    job = XrayJob(scene, radiograph, TWO_SLOW_STAGES).start()
    until_stage_1_is_shown(job)
    preview = job.preview_node
    preview.SetName("my lungs, stage 1")
    job.cancel()
    assert job.state == JobState.CANCELLED and job.result_nodes == []
    assert scene.IsNodePresent(preview) and preview.GetName() == "my lungs, stage 1"
    grid = _assert_records_stage_1_of_2(preview, radiograph)
    assert job.notices == [
        f"Cancelled during stage 2 of 2; stage 1's result ({grid}) was kept as 'my lungs, stage 1'. It is a "
        "lower-resolution synthetic CT; Apply again for the full result."
    ]
    assert job.kept_notice() == job.notices[0] and not Path(job.tempdir).exists()
    assert job.poll() == JobState.CANCELLED and len(job.notices) == 1  # said once


def test_a_worker_killed_during_stage_2_keeps_stage_1s_result(scene):
    """The worker killed (as by the system when memory runs out) during stage 2: stage 1 was removed, and the
    message said "nothing was imported"."""
    import os
    import signal

    radiograph = _radiograph_node(scene, _shown(), spacing=(5.0, 5.0, 1.0))
    job = XrayJob(scene, radiograph, TWO_SLOW_STAGES).start()
    until_stage_1_is_shown(job)
    os.kill(job.runner.pid, signal.SIGKILL)
    assert job.wait(30) == JobState.FAILED
    preview = job.preview_node
    assert scene.IsNodePresent(preview) and preview.GetName() == "chest PA CT stage 1 (synthetic)"
    grid = _assert_records_stage_1_of_2(preview, radiograph)
    assert job.error.startswith("the job's process was killed (SIGKILL)") and "nothing was imported" not in job.error
    assert "only stage 1's result was kept" in job.error
    assert job.notices == [
        f"The generation stopped during stage 2 of 2; stage 1's result ({grid}) was kept as 'chest PA CT stage 1 "
        "(synthetic)'. It is a lower-resolution synthetic CT; Apply again for the full result."
    ]


def test_a_cancel_before_any_stage_is_shown_leaves_nothing(scene):
    radiograph = _radiograph_node(scene, _shown(), spacing=(5.0, 5.0, 1.0))
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    job = XrayJob(scene, radiograph, TWO_SLOW_STAGES).start()
    job.cancel()
    assert job.state == JobState.CANCELLED and job.preview_node is None and job.notices == []
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes


@pytest.mark.parametrize("trouble", ["memory", "damaged file"])
def test_a_stage_preview_that_cannot_be_read_is_said_and_the_job_goes_on(scene, monkeypatch, trouble):
    """Reading stage 1's preview ran out of memory (or met a damaged file): a traceback came out of poll() and
    nothing said why no preview appeared."""
    import XrayToCTLib.xray_logic as xray_logic

    read = xray_logic.read_volume_file
    calls = []

    def read_first_badly(path):
        calls.append(path)
        if len(calls) == 1 and trouble == "memory":
            raise MemoryError("Unable to allocate 512 MiB for an array")
        if len(calls) == 1:
            Path(path).write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 64 64\n")  # cut short
        return read(path)

    monkeypatch.setattr(xray_logic, "read_volume_file", read_first_badly)
    radiograph = _radiograph_node(scene, _shown(), spacing=(5.0, 5.0, 1.0))
    lines = []
    job = XrayJob(scene, radiograph, XraySettings(num_stages=2, steps=2, device="cpu", tiny_test_model=True),
                  on_line=lines.append).start()  # fmt: skip
    deadline = time.monotonic() + 180
    while job.poll() == JobState.RUNNING and time.monotonic() < deadline:  # raised the MemoryError
        time.sleep(0.02)
    assert job.state == JobState.COMPLETED and job.error == ""
    assert job.result_nodes[0].GetName() == "chest PA CT (synthetic)" and 1 not in job.stages_shown
    notice = job.notices[0]
    assert len(job.notices) == 1
    assert notice.endswith(". The generation goes on; its result is added when it finishes.")
    why = "there was not enough memory to read it" if trouble == "memory" else "its file could not be read (damaged"
    assert notice.startswith(f"Stage 1's preview could not be shown: {why}")
    said = [line for line in lines if line.startswith("warning: " + notice + " (")]  # with the reader's message
    assert len(said) == 1 and ("Unable to allocate 512 MiB" in said[0]) == (trouble == "memory")
    assert not [text for text in [notice, *said] if "\n" in text or "ctdiffusion-" in text or "Traceback" in text]


def test_the_xray_panel_says_what_a_cancel_or_a_failure_kept(request, scene, monkeypatch):
    """The panel said "Cancelled; nothing was added to the scene." and showed no notice after a cancel or a failure
    (the shared job monitor shows notices only when a job completes). The panel runs on test_slicer_widgets.py's
    stand-in for Qt."""
    import os
    import signal

    stand_in = request.getfixturevalue("panels")
    panel, p, ui = _open(stand_in.xray.XrayWidget)
    monkeypatch.setattr(panel.logic, "settingsFrom", lambda _p: TWO_SLOW_STAGES)  # the shipped weights have 1 stage
    p.inputRadiograph = _radiograph_node(scene, _shown(), spacing=(5.0, 5.0, 1.0))
    for ending in ("cancel", "kill"):
        ui.applyButton.emit("clicked(bool)", True)
        job = panel.monitor.job
        hold_after_stage_1(job)
        assert ui.applyButton.toolTip == "Stop the generation; a stage already shown is kept as a lower-resolution result."
        _run_timer(panel.monitor.timer, lambda job=job: bool(job.stages_shown), 120)
        assert job.stages_shown == [1] and panel.monitor.running
        if ending == "cancel":
            ui.applyButton.emit("clicked(bool)", True)  # the button is Cancel while the job runs
        else:
            os.kill(job.runner.pid, signal.SIGKILL)
            _run_timer(panel.monitor.timer, lambda: not panel.monitor.running, 30)
        kept = job.kept_notice()
        assert kept and scene.IsNodePresent(job.preview_node) and kept in ui.logTextEdit.lines
        if ending == "cancel":
            assert job.state == JobState.CANCELLED and ui.statusLabel.text == "Cancelled. " + kept
            assert stand_in.dialogs.errors == []
        else:
            assert job.state == JobState.FAILED and ui.statusLabel.text == f"Failed: {job.error} {kept}"
            assert stand_in.dialogs.errors == [f"The generation failed: {job.error}\n\n{kept}"]
    panel.cleanup()
