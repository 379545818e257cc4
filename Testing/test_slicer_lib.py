"""The modules' Qt-free logic (CTDiffusionSRLib, XrayToCTLib) on real MRML from the slicer-core wheel.

What a Slicer user relies on: the geometry of an oblique volume survives the trip into DiffusionCore and
back exactly; results land in NEW nodes beside the input, labelled synthetic, with provenance; the input is
never touched; a cancel kills the whole process tree and leaves nothing behind; the training curve follows
metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

from conftest import write_fake_trainer  # noqa: E402
from CTDiffusionSRLib import mrml_io, views  # noqa: E402
from CTDiffusionSRLib.dependencies import pip_install_arguments  # noqa: E402
from CTDiffusionSRLib.jobs import read_return_parameters  # noqa: E402
from CTDiffusionSRLib.process import JobState, ProcessRunner, parse_progress_line  # noqa: E402
from CTDiffusionSRLib.sr_logic import (  # noqa: E402
    EvaluationJob,
    SRJob,
    SRSettings,
    check_sr_input,
    check_weights,
    table_from_evaluation,
)
from CTDiffusionSRLib.testing import (  # noqa: E402
    DicomDatabaseStandIn,
    load_dicom_node,
    phantom_ct,
    phantom_radiograph,
    rotation,
)
from CTDiffusionSRLib.training import LossCurve, MetricsFollower, TrainingJob, write_config_text  # noqa: E402

from DiffusionCore.degrade import thin_grid  # noqa: E402
from DiffusionCore.errors import ConfigError, InputError, OutputError  # noqa: E402
from DiffusionCore.volume import Volume, read_volume  # noqa: E402


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(s)
    slicer.mrmlScene = s  # slicer.util helpers look for it
    yield s  # color_logic stays alive meanwhile: its lookup tables feed the slice views
    s.Clear(True)
    del color_logic


def _matrix(node) -> np.ndarray:
    return mrml_io.ijk_to_ras(node)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): fall back to a signal probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _volume_nodes(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]


# -- MRML <-> Volume ------------------------------------------------------------------------------------
def test_oblique_volume_round_trip_matches_slicers_own_writer(scene, tmp_path):
    vol = phantom_ct()
    node = mrml_io.add_volume_node(scene, vol, "CT_01")
    back = mrml_io.volume_from_node(node)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-12)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-12)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-12)
    # Independent oracle: Slicer's storage node writes the node; DiffusionCore (ITK, LPS) reads the file.
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "slicer_written.nrrd"))
    assert storage.WriteData(node)
    on_disk = read_volume(tmp_path / "slicer_written.nrrd", check=False)
    np.testing.assert_allclose(on_disk.direction, vol.direction, atol=1e-6)
    np.testing.assert_allclose(on_disk.origin, vol.origin, atol=1e-6)
    np.testing.assert_allclose(on_disk.spacing, vol.spacing, atol=1e-6)
    np.testing.assert_allclose(on_disk.array, vol.array, atol=1e-3)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_volume_loaded_by_slicer_converts_to_the_same_lps_geometry(scene, tmp_path, suffix):
    from DiffusionCore.volume import write_volume

    # the .nii.gz is larger than one block of the parallel gzip writer: Slicer reads the joined stream
    shape = (40, 128, 128) if suffix == ".nii.gz" else (24, 32, 32)
    vol = phantom_ct(shape=shape, direction=rotation(-15, 5, 60))
    path = write_volume(vol, tmp_path / f"ct{suffix}", dtype="float32")
    node = slicer.util.loadVolume(str(path)) if hasattr(slicer, "app") else None
    if node is None:  # slicer-core has no application: read with Slicer's storage node instead
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(node)
    got = mrml_io.volume_from_node(node)
    np.testing.assert_allclose(got.direction, vol.direction, atol=1e-6)
    np.testing.assert_allclose(got.origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(got.array, vol.array, atol=1e-3)


def test_volume_in_its_own_frame_under_a_linear_transform_and_nonlinear_refused(scene):
    """A linear parent transform is left out (the job's result goes under the same transform:
    Testing/test_slicer_transforms.py); a non-linear one is refused."""
    vol = Volume(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 3.0), (0, 0, 0), np.eye(3))
    node = mrml_io.add_volume_node(scene, vol, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = np.eye(4)
    m[:3, 3] = (10.0, 20.0, 30.0)  # RAS shift
    transform.SetMatrixTransformToParent(mrml_io.array_to_matrix(m))
    node.SetAndObserveTransformNodeID(transform.GetID())
    got = mrml_io.volume_from_node(node)
    np.testing.assert_allclose(got.origin, (0.0, 0.0, 0.0))  # its own frame, as Slicer's writer saves it
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear transform; harden the transform first.*gantry-tilted CT series"):
        mrml_io.volume_from_node(node)


def _own_matrix(node) -> np.ndarray:
    """The node's own IJK-to-RAS matrix (its parent transform left out)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return mrml_io.matrix_to_array(m)


def _tilted_dicom_series(folder, degrees: float = 20.0, steps=None, slices: int = 10):
    """A gantry-tilted CT series of ``slices`` slices (4 mm along the table, the image plane turned about L-R) of a
    body with a dense ball, written as DICOM; ``steps`` (mm along the table) make it unevenly spaced instead."""
    from conftest import write_dicom_series

    t = np.deg2rad(degrees)
    direction = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), 0.0], [0.0, np.sin(t), 1.0]])
    vol = phantom_ct(shape=(slices, 32, 32), spacing=(0.8, 0.8, 4.0), direction=direction, origin=(-12.0, -14.0, -20.0))
    files = write_dicom_series(folder, vol)
    if steps is not None:
        import pydicom

        for f, z in zip(files, np.concatenate([[0.0], np.cumsum(steps)])):
            ds = pydicom.dcmread(f)
            ds.ImagePositionPatient = [float(v) for v in np.asarray(vol.origin) + z * direction[:, 2]]
            ds.save_as(f)
    return files


def test_series_under_slicers_regularization_transform_is_read_from_its_dicom_files(scene, tmp_path, monkeypatch):
    """Slicer's DICOM module loads a series it cannot stack regularly (a gantry tilt, with the ITK of Slicer before
    5.x) as a straight stack under a non-linear "acquisition transform". Apply then ran on nothing but a refusal
    ("harden the transform"); now the job reads the node's DICOM files, where the tilt is resampled exactly as
    ``sr SERIES_FOLDER`` does, and the result is the engine's on the folder, placed in world space without a
    transform. The input node and its transform are untouched."""
    from CTDiffusionSRLib.testing import regularize_like_slicer

    from DiffusionCore.sr.pipeline import SuperResolver

    files = _tilted_dicom_series(tmp_path / "series", slices=12)  # 12: enough to score for Evaluate below
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    node = load_dicom_node(scene, files, "tilted head", database, uids=[f"tilted.{i}" for i in range(len(files))])
    transform = regularize_like_slicer(scene, node, files)
    before_matrix, before_array = _own_matrix(node), mrml_io.array_from_node(node)
    with pytest.raises(InputError, match="non-linear transform"):
        mrml_io.grid_from_node(node)  # the node's own geometry is still refused
    series = mrml_io.irregular_dicom_series(node)
    assert series is not None and series.files == [str(f) for f in files]
    assert series.grid.spacing[2] == pytest.approx(4.0 * np.cos(np.deg2rad(20.0)), rel=1e-6)  # along the normal
    settings = SRSettings(factor=2, device="cpu", tiny_test_predictor=True, adapt_to_scan=False)
    assert check_sr_input(node, settings) == ""

    job = SRJob(scene, node, settings)
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    (result,) = job.result_nodes
    assert result.GetParentTransformNode() is None
    expected, _ = SuperResolver.tiny_predictor(seed=0).run(read_volume(tmp_path / "series"), settings.run_settings())
    got = mrml_io.volume_from_node(result)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.grid.index_to_physical(), expected.grid.index_to_physical(), atol=1e-4)
    np.testing.assert_allclose(got.array, expected.array, atol=0.5)
    assert result.GetName() == "tilted head SR x2 (synthetic)"
    np.testing.assert_array_equal(_own_matrix(node), before_matrix)
    np.testing.assert_array_equal(mrml_io.array_from_node(node), before_array)
    assert node.GetParentTransformNode() is transform

    # "Evaluate on this volume" and the training export take the files too
    (tmp_path / "eval").mkdir()
    args = EvaluationJob(scene, node, factor=2, methods=("cubic",)).prepare(tmp_path / "eval")
    reference = Path(args[args.index("--reference") + 1])
    assert reference.is_dir() and len(list(reference.iterdir())) == len(files)
    from CTDiffusionSRLib.training import export_training_volumes

    listing = export_training_volumes([node], tmp_path / "training")
    (entry,) = listing.read_text().split()
    assert (listing.parent / entry).is_dir() and len(list((listing.parent / entry).iterdir())) == len(files)
    (listing.parent / entry / "00099_other_series.dcm").write_bytes(b"an earlier export's file")
    export_training_volumes([node], tmp_path / "training")  # exported again: the same files, nothing else
    assert sorted(p.name for p in (listing.parent / entry).iterdir()) == [
        f"{i:05d}_{Path(f).name}" for i, f in enumerate(files)]  # fmt: skip


def test_tilted_series_that_slicer_reads_as_a_sheared_grid_gives_the_commands_result(scene, tmp_path, monkeypatch):
    """Slicer's own reader (ITK that keeps the slice positions) reads a tilted series as a sheared grid, with no
    transform. Super-resolved on that grid, each thick slice's slab would run along the table instead of across the
    slice; the job reads the node's DICOM files instead, so Apply gives what ``sr SERIES_FOLDER`` gives (the tilt
    resampled onto an orthogonal grid), in world space where the input is. A sheared node the user moved (a linear
    transform) is super-resolved as it is."""
    from DiffusionCore.sr.pipeline import SuperResolver

    files = _tilted_dicom_series(tmp_path / "series")
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    node = load_dicom_node(scene, files, "sheared", database)
    assert node.GetParentTransformNode() is None
    vol = mrml_io.volume_from_node(node)
    assert abs(vol.direction[:, 1] @ vol.direction[:, 2]) > 0.3  # sheared: the table step is not the normal
    series = mrml_io.irregular_dicom_series(node)
    assert series is not None and series.grid.spacing[2] == pytest.approx(4.0 * np.cos(np.deg2rad(20.0)), rel=1e-6)
    settings = SRSettings(factor=2, device="cpu", tiny_test_predictor=True, adapt_to_scan=False)
    job = SRJob(scene, node, settings)
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    got = mrml_io.volume_from_node(job.result_nodes[0])
    expected, _ = SuperResolver.tiny_predictor(seed=0).run(read_volume(tmp_path / "series"), settings.run_settings())
    np.testing.assert_allclose(got.grid.index_to_physical(), expected.grid.index_to_physical(), atol=1e-4)
    np.testing.assert_allclose(got.array, expected.array, atol=0.5)

    moved = load_dicom_node(scene, files, "moved", database)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, 0.0, 0.0)
    transform.SetMatrixTransformToParent(mrml_io.array_to_matrix(shift))
    moved.SetAndObserveTransformNodeID(transform.GetID())
    assert mrml_io.irregular_dicom_series(moved) is None  # the files would drop the user's move
    (tmp_path / "moved").mkdir()
    assert mrml_io.write_job_input(moved, tmp_path / "moved", "input").endswith("input.nrrd")


def test_series_under_regularization_with_uneven_spacing_gets_the_engines_message(scene, tmp_path, monkeypatch):
    """Slicer regularizes an unevenly spaced series too; read from its files, the job stops with the engine's
    message naming the two spacings (instead of "harden the transform")."""
    from CTDiffusionSRLib.testing import regularize_like_slicer

    files = _tilted_dicom_series(tmp_path / "series", degrees=0.0, steps=(4, 4, 4, 4, 8, 8, 8, 8, 8))
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    node = load_dicom_node(scene, files, "two-spacings", database)
    regularize_like_slicer(scene, node, files)
    with pytest.raises(InputError, match="'two-spacings' are not evenly spaced: 4.00 mm apart after slice 1 but "
                                         "8.00 mm after slice 5"):
        SRJob(scene, node, SRSettings(factor=2, device="cpu", tiny_test_predictor=True, adapt_to_scan=False))


def test_an_unevenly_spaced_series_loaded_without_regularization_is_not_super_resolved_misplaced(
    scene, tmp_path, monkeypatch
):
    """With the DICOM module's acquisition-geometry regularization off, Slicer's reader stacks an unevenly spaced
    series at its mean spacing and nothing marks it: the job ran on slices millimetres from where they were acquired.
    When Apply (or Evaluate) is pressed, the node's slices are compared with their files, and the run is refused with
    the command's message naming the two spacings. A regular DICOM node still goes as its voxels."""
    files = _tilted_dicom_series(tmp_path / "series", degrees=0.0, steps=(4, 4, 4, 4, 8, 8, 8, 8, 8))
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    node = load_dicom_node(scene, files, "uneven", database)
    assert node.GetParentTransformNode() is None
    assert mrml_io.grid_from_node(node).spacing[2] == pytest.approx(56.0 / 9)  # stacked at the mean spacing
    settings = SRSettings(factor=2, device="cpu", tiny_test_predictor=True, adapt_to_scan=False)
    assert check_sr_input(node, settings) == ""  # nothing to see before the job reads the headers
    assert mrml_io.irregular_dicom_series(node) is None  # two headers cannot tell (the tooltip's check)
    assert mrml_io.series_to_read_from_files(node) is not None  # every slice against its file (the job's check)
    uneven = "are not evenly spaced: 4.00 mm apart after slice 1 but 8.00 mm after slice 5"
    with pytest.raises(InputError, match=uneven):  # refused when Apply is pressed, not by a job in the background
        SRJob(scene, node, settings)
    with pytest.raises(InputError, match=uneven):  # and "Evaluate on this volume" the same
        EvaluationJob(scene, node, factor=2)

    even = load_dicom_node(scene, _tilted_dicom_series(tmp_path / "even", degrees=0.0), "even", database)
    assert mrml_io.series_to_read_from_files(even) is None
    (tmp_path / "job").mkdir()
    assert mrml_io.write_job_input(even, tmp_path / "job", "input").endswith("input.nrrd")


def test_a_non_linear_transform_that_is_not_slicers_regularization_is_still_refused(scene, tmp_path, monkeypatch):
    """A deformation of the user's own on a DICOM node (or the regularization once its files are gone) cannot be
    replaced by reading the files: Apply stays disabled with the message that says to harden it."""
    from CTDiffusionSRLib.testing import regularize_like_slicer
    from vtk.util import numpy_support

    files = _tilted_dicom_series(tmp_path / "series")
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    node = load_dicom_node(scene, files, "warped", database)
    transform = regularize_like_slicer(scene, node, files)
    grid = transform.GetTransformToParent().GetDisplacementGrid()
    numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())[:] += 3.0  # 3 mm more: not where the files say
    grid.Modified()
    transform.GetTransformToParent().Modified()
    settings = SRSettings(factor=2, device="cpu", tiny_test_predictor=True, adapt_to_scan=False)
    assert mrml_io.irregular_dicom_series(node) is None
    assert "non-linear transform; harden the transform first" in check_sr_input(node, settings)

    node2 = load_dicom_node(scene, files, "files gone", database, uids=[f"gone.{i}" for i in range(len(files))])
    regularize_like_slicer(scene, node2, files)
    assert mrml_io.irregular_dicom_series(node2) is not None
    for f in files:
        Path(f).unlink()
    assert mrml_io.irregular_dicom_series(node2) is None
    assert "non-linear transform; harden the transform first" in check_sr_input(node2, settings)


def test_sr_input_checks_say_why_apply_is_disabled(scene):
    assert check_sr_input(None) == "Select an input CT volume."
    iso = mrml_io.add_volume_node(scene, Volume(np.zeros((8, 8, 8), np.float32)), "iso")
    assert "isotropic" in check_sr_input(iso)
    # a target spacing does not say along which axis ("Pass --axis" came only from the job)
    assert "isotropic" in check_sr_input(iso, SRSettings(target_spacing=0.5))
    assert check_sr_input(iso, SRSettings(target_spacing=0.5, axis="z")) == ""
    flat = mrml_io.add_volume_node(scene, Volume(np.zeros((1, 16, 16), np.float32)), "flat")
    assert "2D" in check_sr_input(flat)
    side = mrml_io.add_volume_node(scene, Volume(np.zeros((6, 32, 1), np.float32)), "side")  # one voxel wide in x
    assert "'side' is 2D (1x32x6 voxels along x, y, z: one voxel thick)" in check_sr_input(side)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    assert "no voxels" in check_sr_input(empty)
    good = mrml_io.add_volume_node(scene, phantom_ct(), "thick")
    assert check_sr_input(good) == ""


def test_the_module_shows_the_factor_the_pipeline_will_use(scene):
    """One decision of the thin grid (DiffusionCore.degrade.plan_thin_grid) for the pipeline and the module:
    12 mm slices over 0.8 mm pixels suggest x15, clamped to the supported x8 in both."""
    from CTDiffusionSRLib.sr_logic import effective_factor

    from DiffusionCore.degrade import MAX_FACTOR
    from DiffusionCore.sr.pipeline import SuperResolver

    very_thick = phantom_ct(spacing=(0.8, 0.8, 12.0))
    node = mrml_io.add_volume_node(scene, very_thick, "very thick")
    resolver = SuperResolver.tiny_predictor()
    assert effective_factor(node, SRSettings()) == resolver.target_grid(very_thick)[2] == MAX_FACTOR
    assert effective_factor(node, SRSettings(factor=3)) == 3
    assert effective_factor(node, SRSettings(target_spacing=3.0)) == 4


def test_sr_settings_pass_adaptation_to_the_batch_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sr_batch", ROOT / "CTDiffusionSR" / "CLI" / "CTDiffusionSRBatch.py")
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)

    def adapt(settings: SRSettings):
        args = batch.build_parser().parse_args([*settings.cli_arguments(), "in.nrrd", "out.nrrd"])
        return batch.settings_from_args(args)["adapt"]

    from DiffusionCore.sr.adapt import DEFAULT_ADAPT_STEPS

    # on by default, with the engine's default step count; optional: weights without a predictor go on
    assert adapt(SRSettings()) == {"seconds": 0.0, "steps": DEFAULT_ADAPT_STEPS, "optional": True}
    assert adapt(SRSettings(adapt_to_scan=False)) is None
    assert adapt(SRSettings(adapt_seconds=120.0)) == {"seconds": 120.0, "steps": None, "optional": True}
    assert adapt(SRSettings(adapt_steps=3)) == {"seconds": 0.0, "steps": 3, "optional": True}
    args = SRSettings(tiny_test_predictor=True).cli_arguments()
    assert "--tinyTestPredictor" in args and "--tinyTestModel" not in args


def test_xray_settings_pass_consistency_and_samples_to_the_generate_cli():
    import importlib.util

    from XrayToCTLib import XraySettings

    spec = importlib.util.spec_from_file_location("xray_cli", ROOT / "XrayToCT" / "CLI" / "XrayToCTGenerate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    def parsed(settings: XraySettings):
        return cli.build_parser().parse_args([*settings.cli_arguments(), "in.png", "out.nrrd"])

    assert parsed(XraySettings()).noConsistency is False  # on by default
    assert parsed(XraySettings(consistency=False)).noConsistency is True
    assert parsed(XraySettings()).numSamples == 0 and parsed(XraySettings(num_samples=3)).numSamples == 3


# -- background processes ---------------------------------------------------------------------------------
def test_progress_lines_are_parsed():
    assert parse_progress_line("<filter-progress>0.25</filter-progress>") == (0.25, None)
    assert parse_progress_line("<filter-comment>tile 2/4</filter-comment>") == (None, "tile 2/4")
    assert parse_progress_line("<filter-progress>1.7</filter-progress>")[0] == 1.0
    assert parse_progress_line("info: loading") == (None, None)


def test_process_runner_reports_progress_and_error_line(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            for i in range(4):
                print(f"<filter-progress>{i / 4}</filter-progress>", flush=True)
            print("<filter-comment>almost</filter-comment>", flush=True)
            print("error: the input has NaN voxels; re-export it.", file=sys.stderr, flush=True)
            sys.exit(2)
            """
        )
    )
    seen = []
    runner = ProcessRunner([sys.executable, str(script)], on_progress=lambda f, m: seen.append(f)).start()
    result = runner.wait(timeout=60)
    assert result.state == JobState.FAILED and result.returncode == 2
    assert result.error == "the input has NaN voxels; re-export it."
    assert seen[:4] == [0.0, 0.25, 0.5, 0.75] and "almost" in result.log


def test_cancel_kills_the_whole_process_tree(tmp_path):
    script = tmp_path / "tree.py"
    script.write_text(
        textwrap.dedent(
            """
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            print(f"child {child.pid}", flush=True)
            print("<filter-progress>0.1</filter-progress>", flush=True)
            time.sleep(120)
            """
        )
    )
    runner = ProcessRunner([sys.executable, str(script)]).start()
    deadline = time.monotonic() + 30
    while not any(line.startswith("child ") for line in runner.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int(next(line for line in runner.log if line.startswith("child ")).split()[1])
    t0 = time.monotonic()
    runner.cancel()
    assert time.monotonic() - t0 < 10
    assert runner.poll() == JobState.CANCELLED
    deadline = time.monotonic() + 5
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid), "the job's own child process must be killed too"


def test_return_parameter_file_is_read(tmp_path):
    (tmp_path / "r.txt").write_text("weightsSha256 = abc\nelapsedSeconds = 1.5\n")
    assert read_return_parameters(tmp_path / "r.txt") == {"weightsSha256": "abc", "elapsedSeconds": "1.5"}


# -- the SR job end to end (tiny random model, CPU) -------------------------------------------------------
def test_sr_job_makes_a_synthetic_node_on_the_thin_grid_beside_the_input(scene, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # to see that the private temp folder is removed
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    vol = phantom_ct()
    node = mrml_io.add_volume_node(scene, vol, "CT_01")
    sh = mrml_io.subject_hierarchy(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.CreateItem(study, node)
    before_matrix, before_array, before_mtime = _matrix(node), mrml_io.array_from_node(node), node.GetImageData().GetMTime()

    settings = SRSettings(factor=4, steps=2, device="cpu", seed=3, num_samples=2, tiny_test_model=True)
    progress = []
    job = SRJob(scene, node, settings, on_progress=lambda f, m: progress.append(f))
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    result, unc = job.result_nodes
    assert result.GetName() == "CT_01 SR x4 (synthetic)"
    assert unc.GetName() == "CT_01 SR x4 uncertainty (synthetic)"
    expected = thin_grid(vol, 4, axis=0)
    got = mrml_io.volume_from_node(result)
    assert got.shape == expected.shape == (24, 32, 32)
    np.testing.assert_allclose(got.spacing, expected.spacing, atol=1e-6)
    np.testing.assert_allclose(got.origin, expected.origin, atol=1e-5)
    np.testing.assert_allclose(got.direction, vol.direction, atol=1e-6)
    assert np.isfinite(got.array).all() and np.all(mrml_io.volume_from_node(unc).array >= 0)
    # input untouched
    np.testing.assert_array_equal(_matrix(node), before_matrix)
    np.testing.assert_array_equal(mrml_io.array_from_node(node), before_array)
    assert node.GetImageData().GetMTime() == before_mtime
    # provenance and placement
    prov = mrml_io.provenance(result)
    assert prov["kind"] == "super-resolution" and len(prov["weights_sha256"]) == 64
    assert prov["model"].startswith("tiny-test-model")
    assert prov["settings"]["factor_used"] == 4 and prov["settings"]["steps"] == 2
    assert prov["date"] and prov["source"] == node.GetID()
    assert "SYNTHETIC" in result.GetDescription()
    assert sh.GetItemParent(sh.GetItemByDataNode(result)) == study
    assert sh.GetItemParent(sh.GetItemByDataNode(unc)) == study
    # progress and clean-up
    assert progress and progress[-1] == pytest.approx(1.0) and min(progress) < 0.5
    assert not list(tmp_path.glob("ctdiffusion-*")), "the private temporary folder must be removed"
    assert job.notices == []  # an acquired input: nothing to say

    # the result taken as the input of another run (or of an evaluation): the panel says what it rests on
    for again in (SRJob(scene, result, SRSettings(factor=2, axis="z", device="cpu", tiny_test_predictor=True)),
                  EvaluationJob(scene, result, factor=2)):
        assert again.notices == ["'CT_01 SR x4 (synthetic)' is itself a synthetic image (SR x4 (synthetic)), not an "
                                 "acquired scan: this result rests on that model's estimate. Use the acquired scan "
                                 "where you have it."]


def test_sr_job_cancel_leaves_no_nodes_and_no_files(scene, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_02")
    n_before = scene.GetNumberOfNodes()
    job = SRJob(scene, node, SRSettings(factor=4, steps=200, device="cpu", tiny_test_model=True)).start()
    deadline = time.monotonic() + 120
    while job.progress <= 0.0 and time.monotonic() < deadline and job.poll() == JobState.RUNNING:
        time.sleep(0.1)
    assert job.poll() == JobState.RUNNING, job.error
    job.cancel()
    assert job.state == JobState.CANCELLED
    assert scene.GetNumberOfNodes() == n_before
    assert not list(tmp_path.glob("ctdiffusion-*"))
    assert not _alive(job.runner.pid)


def _stale_hierarchy_items(scene) -> list[str]:
    """Subject hierarchy items whose data node is not in the scene (what the Data module would list as ghosts)."""
    import vtk

    sh = mrml_io.subject_hierarchy(scene)
    items = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), items, True)
    stale = []
    for i in range(items.GetNumberOfIds()):
        data = sh.GetItemDataNode(items.GetId(i))
        if data is not None and not scene.IsNodePresent(data):
            stale.append(data.GetName())
    return stale


def test_sr_job_whose_chosen_output_or_input_is_deleted_while_it_runs_still_delivers_the_result(scene):
    """A user may delete nodes while a job runs in the background. The result was written into a chosen output
    node that was no longer in the scene (lost, while the job reported success), and a deleted input got a
    subject hierarchy item for a node outside the scene. Now the result lands in a new node in the scene, the
    job says why, and no ghost item or stale source ID is left."""
    from CTDiffusionSRLib.jobs import remove_node_and_helpers

    settings = SRSettings(factor=4, steps=2, device="cpu", seed=3, tiny_test_model=True)
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my output")
    job = SRJob(scene, node, settings, output_node=chosen).start()
    scene.RemoveNode(chosen)
    assert job.wait(240) == JobState.COMPLETED, job.error
    result = job.result_nodes[0]
    assert scene.IsNodePresent(result) and result is not chosen
    assert result.GetName() == "CT_01 SR x4 (synthetic)"
    assert mrml_io.volume_from_node(result).shape == (24, 32, 32)
    assert job.notices and "'my output' was deleted" in job.notices[0]
    assert chosen.GetImageData() is None  # nothing was written into the deleted node
    assert mrml_io.provenance(result)["source"] == node.GetID()

    sh = mrml_io.subject_hierarchy(scene)
    study = sh.CreateStudyItem(sh.GetSceneItemID(), "Study")
    sh.CreateItem(study, node)
    job = SRJob(scene, node, settings).start()
    remove_node_and_helpers(scene, node)
    assert job.wait(240) == JobState.COMPLETED, job.error
    result = job.result_nodes[0]
    assert scene.IsNodePresent(result) and result.GetName().startswith("CT_01 SR x4 (synthetic)")
    assert sh.GetItemParent(sh.GetItemByDataNode(result)) == study  # where the input was: the study is still there
    assert _stale_hierarchy_items(scene) == []
    assert mrml_io.provenance(result)["source"] is None and mrml_io.provenance_record(result).input == "CT_01"
    assert job.notices == ["'CT_01' was deleted while the job ran; the result was made from it as it was when the job "
                           "started, and records its name."]  # fmt: skip


def test_sr_job_refuses_writing_into_the_input(scene):
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_03")
    with pytest.raises(OutputError, match="never modified"):
        SRJob(scene, node, SRSettings(tiny_test_model=True), output_node=node)


def test_sr_job_names_the_target_spacings_the_predictor_can_make(scene, tmp_path):
    """4 mm slices to 3 mm is too close for the shipped weights' predictor (smallest factor 2): Apply says so at
    once, with the spacings that work, instead of a background job failing; weights without a predictor (a
    cubic start) take it, and so do the shipped ones at a spacing they can make."""
    from DiffusionCore.errors import GeometryError
    from DiffusionCore.sr.model import SRModel

    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_05")  # 4 mm slices
    n_before = scene.GetNumberOfNodes()
    for weights in ("", "sr-default"):  # the default (preselected) and the same named
        with pytest.raises(GeometryError, match=r"only 1\.33 times finer than the input's 4 mm.*at most 2\.67 mm"):
            SRJob(scene, node, SRSettings(target_spacing=3.0, weights=weights, device="cpu"))
    assert scene.GetNumberOfNodes() == n_before
    SRJob(scene, node, SRSettings(target_spacing=2.5, device="cpu"))  # ratio 1.6: made from the x2 grid
    job = SRJob(scene, node, SRSettings(target_spacing=1.5, adapt_to_scan=False, device="cpu", tiny_test_predictor=True))
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    assert job.result_nodes[0].GetName() == "CT_05 SR 1.5 mm (synthetic)"  # 4 mm / 1.5 mm is no integer factor
    latent_only = tmp_path / "latent.safetensors"
    SRModel.tiny(seed=0).save(latent_only)
    SRJob(scene, node, SRSettings(target_spacing=3.0, weights=str(latent_only), allow_unregistered_weights=True,
                                  device="cpu"))


def test_sr_job_refuses_steps_and_samples_that_predictor_weights_cannot_give(scene, tmp_path):
    """The panel offers Steps and Samples (posterior samples from a diffusion stage); the shipped weights hold a
    through-plane predictor alone. Apply says so at once instead of a background job failing; weights with a
    diffusion stage take them."""
    from DiffusionCore.sr.model import SRModel

    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_06")
    for settings, named in ((SRSettings(steps=15, device="cpu"), "Steps 15"),
                            (SRSettings(num_samples=4, device="cpu"), "Samples 4"),
                            (SRSettings(steps=5, num_samples=2, weights="sr-default", device="cpu"), "Steps 5 and Samples 2")):  # fmt: skip
        with pytest.raises(InputError, match=rf"sr-default are a through-plane predictor without a diffusion stage.*"
                                             rf"so {named} cannot be used\. Set Steps to 0 and Samples to 1"):  # fmt: skip
            SRJob(scene, node, settings)
    SRJob(scene, node, SRSettings(device="cpu"))  # the defaults: the predictor's one estimate
    with pytest.raises(InputError, match=r"so Steps 15 cannot be used"):  # "Evaluate on this volume" alike
        EvaluationJob(scene, node, factor=2, methods=("cubic", "sr"), steps=15)
    larger = mrml_io.add_volume_node(scene, phantom_ct(shape=(12, 32, 32)), "CT_07")  # large enough to score
    EvaluationJob(scene, larger, factor=2, methods=("cubic",), steps=15)  # no model method: the steps are unused
    diffusion = tmp_path / "latent.safetensors"
    SRModel.tiny(seed=0).save(diffusion)
    SRJob(scene, node, SRSettings(steps=15, num_samples=4, weights=str(diffusion), allow_unregistered_weights=True,
                                  device="cpu"))  # fmt: skip


def test_sr_job_says_that_diffusion_options_do_nothing_with_the_shipped_weights(scene):
    """Guidance scale, Patch size and Overlap act on a diffusion stage, and the shipped sr-default (the preselected
    weights) has none: set away from their defaults, the panel says after the job, in one notice, that they had no
    effect; the job still makes its result. At their defaults it says nothing."""
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_09")
    settings = SRSettings(factor=2, guidance=3.0, patch_size=(8, 32, 32), overlap=(2, 8, 8), adapt_to_scan=False,
                          device="cpu")  # fmt: skip
    job = SRJob(scene, node, settings)
    assert job.notices == ["Guidance scale, Patch size and Overlap have no effect with the weights sr-default: they "
                           "act on the latent diffusion stage alone, and these weights are a through-plane predictor "
                           "without one."]  # fmt: skip
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    assert job.result_nodes[0].GetName() == "CT_09 SR x2 (synthetic)"
    assert SRJob(scene, node, SRSettings(factor=2, guidance=3.0, weights="sr-default", device="cpu")).notices == [
        "Guidance scale has no effect with the weights sr-default: it acts on the latent diffusion stage alone, and "
        "these weights are a through-plane predictor without one."]  # fmt: skip
    assert SRJob(scene, node, SRSettings(factor=2, device="cpu")).notices == []


def test_sr_job_passes_the_dicom_series_slice_thickness_and_the_log_names_an_overlapping_one(
    scene, tmp_path, monkeypatch
):
    """A node loaded from Slicer's DICOM database keeps the slices' spacing but not their thickness; the job reads it
    from the series' files, so an overlapping reconstruction gets the same note as on the command line."""
    import pydicom
    from conftest import write_dicom_series

    vol = phantom_ct()
    files = write_dicom_series(tmp_path / "series", vol)
    spacing = float(vol.spacing_zyx[0])
    uids = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SliceThickness = f"{2.5 * spacing:g}"
        ds.save_as(f)
        uids.append(str(ds.SOPInstanceUID))
    node = mrml_io.add_volume_node(scene, read_volume(tmp_path / "series"), "CT overlapping")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    database = DicomDatabaseStandIn()
    database.files = {uid: str(f) for uid, f in zip(uids, files)}
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    lines = []
    settings = SRSettings(factor=2, device="cpu", tiny_test_predictor=True, adapt_to_scan=False)
    job = SRJob(scene, node, settings, on_line=lines.append)
    args = job.prepare(tmp_path)
    assert float(args[args.index("--sliceThickness") + 1]) == pytest.approx(2.5 * spacing)
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    said = f"the series' slices are {2.5 * spacing:g} mm thick but {spacing:g} mm apart (an overlapping reconstruction)"
    assert any(said in line for line in lines), lines
    # a node not loaded from DICOM has no thickness to pass
    plain = mrml_io.add_volume_node(scene, vol, "CT plain")
    (tmp_path / "plain").mkdir()
    assert "--sliceThickness" not in SRJob(scene, plain, settings).prepare(tmp_path / "plain")


def test_sr_job_passes_the_stored_maximum_of_a_12_bit_series_and_the_result_stays_below_it(
    scene, tmp_path, monkeypatch
):
    """A node keeps the HU but not what its DICOM files could store; the job reads that from the series' files, so a
    thin voxel is no brighter than the scanner could have stored, as on the command line (test_stored_cap.py)."""
    import pydicom
    from conftest import write_dicom_series
    from test_stored_cap import dense_plate_thick, twelve_bit

    files = write_dicom_series(tmp_path / "series", dense_plate_thick(), intercept=-2500.0)
    twelve_bit(files, -2500.0)  # stores at most 1595 HU; the slabs reach about 1,525 HU
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    node = mrml_io.add_volume_node(scene, read_volume(tmp_path / "series"), "CT 12 bit")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    database = DicomDatabaseStandIn()
    database.files = {uid: str(f) for uid, f in zip(uids, files)}
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    settings = SRSettings(factor=4, device="cpu", tiny_test_predictor=True, adapt_to_scan=False)
    job = SRJob(scene, node, settings)
    (tmp_path / "job").mkdir()
    args = job.prepare(tmp_path / "job")
    assert float(args[args.index("--storedMaximum") + 1]) == 1595.0
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    result = mrml_io.volume_from_node(job.result_nodes[0]).array
    assert 1500.0 < float(result.max()) <= 1595.0 + 0.5  # bright, and no brighter than the files could store
    # a node not loaded from DICOM has no storage range to pass
    plain = mrml_io.add_volume_node(scene, dense_plate_thick(), "CT plain")
    (tmp_path / "plain").mkdir()
    assert "--storedMaximum" not in SRJob(scene, plain, settings).prepare(tmp_path / "plain")


def test_sr_job_surfaces_the_cli_error_line(scene):
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_04")
    job = SRJob(scene, node, SRSettings(factor=4, weights="/nonexistent/weights.safetensors", device="cpu"))
    assert job.run(timeout=120) == JobState.FAILED
    assert "weights" in job.error.lower() and not job.error.startswith("error:")
    assert len(_volume_nodes(scene)) == 1
    # the logics' blocking form (scripts, self-tests) raises that line
    again = SRJob(scene, node, SRSettings(factor=4, weights="/nonexistent/weights.safetensors", device="cpu"))
    with pytest.raises(RuntimeError, match="weights"):
        again.run_for_result(timeout=120, what="super-resolution")


# -- evaluation table -----------------------------------------------------------------------------------
def test_evaluation_job_reports_metrics_in_a_table(scene):
    thin = phantom_ct(shape=(16, 24, 24), spacing=(1.0, 1.0, 1.0))
    node = mrml_io.add_volume_node(scene, thin, "thin CT")
    lines = []
    job = EvaluationJob(scene, node, factor=4, axis="z", methods=("nearest", "cubic"), device="cpu",
                        on_line=lines.append)  # fmt: skip
    assert job.run(timeout=120) == JobState.COMPLETED, job.error
    said = [line for line in lines if "reference" in line]  # the log names the volume, not its hand-off file
    assert said and not [line for line in said if "reference.nrrd" in line or "ctdiffusion-" in line], said
    assert [line for line in said if "the volume 'thin CT'" in line], said
    table = job.table_node.GetTable()
    assert table.GetNumberOfRows() == 2
    assert [table.GetValue(r, 0).ToString() for r in range(2)] == ["nearest", "cubic"]
    from DiffusionCore.evaluate import evaluate

    expected = evaluate(thin, 4, axis="z", methods=("nearest", "cubic"))  # the same numbers, in-process
    for r, row in enumerate(expected["results"]):
        assert table.GetColumnByName("PSNR (dB)").GetValue(r) == pytest.approx(row["psnr"], rel=1e-4)
        assert table.GetColumnByName("SSIM").GetValue(r) == pytest.approx(row["ssim"], rel=1e-4)

    # a volume too small to score: refused when Evaluate is pressed, with the command's message (it failed in the
    # background with an internal error before)
    small = mrml_io.add_volume_node(scene, phantom_ct(shape=(12, 24, 24), spacing=(1.0, 1.0, 1.0)), "small")
    with pytest.raises(InputError, match="'small': a volume of 8x24x24 voxels .cropped to whole slabs of 8. is too "
                                         "small to score: the 3D SSIM window is 11 voxels"):
        EvaluationJob(scene, small, factor=8, axis="z")
    EvaluationJob(scene, small, factor=4, axis="z")  # 12 slices in three slabs of 4: enough


def test_evaluation_scores_what_apply_gives_and_the_networks_share(scene, tmp_path):
    """"Evaluate on this volume" scores super-resolution as Apply runs it (adapted to the scan, with the panel's
    steps, when "Adapt to this scan" is on) beside cubic and cubic + data consistency; it scored the weights
    without adaptation, which is not what Apply gives."""
    from CTDiffusionSRLib.sr_logic import evaluation_methods

    assert evaluation_methods(SRSettings()) == ("cubic", "cubic+dc", "sr+adapt")
    assert evaluation_methods(SRSettings(adapt_to_scan=False)) == ("cubic", "cubic+dc", "sr")
    thin = phantom_ct(shape=(32, 64, 64), spacing=(1.0, 1.0, 1.0))
    node = mrml_io.add_volume_node(scene, thin, "thin CT")
    settings = SRSettings(adapt_steps=3, device="cpu")
    lines = []
    job = EvaluationJob(scene, node, factor=2, methods=evaluation_methods(settings), adapt_steps=settings.adapt_steps,
                        device="cpu", on_line=lines.append)  # fmt: skip
    assert job.run(timeout=300) == JobState.COMPLETED, job.error
    table = job.table_node.GetTable()
    assert [table.GetValue(r, 0).ToString() for r in range(table.GetNumberOfRows())] == ["cubic", "cubic+dc", "sr+adapt"]
    assert [line for line in lines if "adapted to the scan" in line and "(3 steps)" in line], lines
    timed = EvaluationJob(scene, node, factor=2, methods=evaluation_methods(settings), adapt_seconds=30.0)
    args = timed.prepare(tmp_path)
    assert args[args.index("--adapt") + 1] == "30.0" and "--adapt-steps" not in args
    plain = EvaluationJob(scene, node, factor=2, methods=evaluation_methods(SRSettings(adapt_to_scan=False)))
    args = plain.prepare(tmp_path)
    assert "--adapt" not in args and "--adapt-steps" not in args


def test_evaluation_table_from_report_keeps_missing_values_as_nan(scene):
    report = {"factor": 2, "results": [{"method": "sr", "psnr": 30.0, "ssim": None, "seconds": 1.0}]}
    node = table_from_evaluation(scene, report, "eval")
    assert np.isnan(node.GetTable().GetColumnByName("SSIM").GetValue(0))
    assert json.loads(node.GetAttribute("CTDiffusion.Evaluation"))["factor"] == 2


def test_evaluation_runs_with_the_panels_seed_and_its_tables_say_what_they_hold(scene, tmp_path):
    """"Evaluate on this volume" ran its command without the panel's seed (so with 0, where Apply passes the
    panel's: sr+adapt's figures move a little with it), and its table named little beyond the factor: a second
    run was "... x2 slab_1", not saying whether the model was adapted, nor with which weights. Now the seed is
    passed and recorded, and each table's name says how the model ran (a counter only for a repeat)."""
    from CTDiffusionSRLib.sr_logic import evaluation_methods

    from DiffusionCore.weights.registry import first_available

    attribute = "CTDiffusion.Evaluation"

    node = mrml_io.add_volume_node(scene, phantom_ct(shape=(24, 48, 48), spacing=(1.0, 1.0, 1.0)), "thin CT")
    adapted = EvaluationJob.for_settings(scene, node, 2, SRSettings(seed=7, adapt_steps=3, device="cpu"), axis="z")
    args = adapted.prepare(tmp_path)
    assert args[args.index("--seed") + 1] == "7"
    assert adapted.run(timeout=300) == JobState.COMPLETED, adapted.error
    plain = EvaluationJob.for_settings(scene, node, 2, SRSettings(seed=7, adapt_to_scan=False, device="cpu"), axis="z")
    assert plain.run(timeout=300) == JobState.COMPLETED, plain.error
    names = [job.table_node.GetName() for job in (adapted, plain)]
    assert names == ["thin CT evaluation x2 slab, adapted 3 steps, seed 7", "thin CT evaluation x2 slab, not adapted"]
    sha = check_weights(first_available("sr"), "sr", False).sha256
    for job in (adapted, plain):
        table = job.table_node
        assert table.GetAttribute(f"{attribute}.seed") == "7"
        assert json.loads(table.GetAttribute(f"{attribute}.requested"))["seed"] == 7
        assert table.GetAttribute(f"{attribute}.factor") == "2"
        text = table.GetDescription()
        for line in ("Reference: thin CT", "Degradation: slab", "Factor: 2", "HU range: -1024, 2048", "Seed: 7",
                     "Device: cpu", f"Weights sha256: {sha}"):  # fmt: skip
            assert line in text.splitlines(), (line, text)
        assert "Body mask: " in text and "Weights: " in text and "Adaptation: " in text
    assert "Adaptation: 3 steps in " in adapted.table_node.GetDescription()
    assert plain.table_node.GetAttribute(f"{attribute}.adaptation") == "off"
    # the same run again: the scene adds a counter to the name in use
    again = EvaluationJob.for_settings(scene, node, 2, SRSettings(seed=7, adapt_to_scan=False, device="cpu"))
    repeat = table_from_evaluation(scene, {"results": []}, again.table_name())
    assert repeat.GetName() == "thin CT evaluation x2 slab, not adapted_1"
    assert EvaluationJob(scene, node, factor=2, methods=("cubic",)).table_name() == "thin CT evaluation x2 slab"
    assert evaluation_methods(SRSettings(adapt_to_scan=False)) == ("cubic", "cubic+dc", "sr")


def test_evaluation_table_records_whatever_the_report_says(scene):
    """The table keeps the report's facts as attributes of their own and in its description, read from whichever
    keys the report has (a report of today, one with nested details, one with keys unknown here); what the
    report does not say is taken from what the job asked for."""
    attribute = "CTDiffusion.Evaluation"
    rows = [{"method": "cubic", "psnr": 30.0, "seconds": 0.1}, {"method": "sr+adapt", "psnr": 33.0, "seconds": 9.0}]
    full = {
        "reference": "CT", "factor": 4, "axis": "z", "degradation": "slab", "hu_range": [-1024, 2048],
        "results": rows, "slices_requested": [20, 44], "slices_scored": [20, 44], "slices_dropped": [],
        "body_mask": {"definition": "HU > -500, ...", "voxels": 1234},
        "method_details": {"sr+adapt": {"weights": "sr-default", "weights_sha256": "ab" * 32, "seed": 3,
                                        "device": "cpu", "torch_threads": 2, "adaptation": {"steps": 60}}},
        "diffusioncore_version": "0.9.0", "torch_version": "2.5.0", "date": "2026-12-06T10:00:00Z",
        "warnings": ["its slices are 5 mm apart"], "new_key": {"a": 1},
    }  # fmt: skip
    node = table_from_evaluation(scene, full, "eval")
    attr = {k: node.GetAttribute(f"{attribute}.{k}") for k in
            ("weights", "weights_sha256", "seed", "device", "torch_threads", "adaptation", "new_key", "reference")}
    assert attr == {"weights": "sr-default", "weights_sha256": "ab" * 32, "seed": "3", "device": "cpu",
                    "torch_threads": "2", "adaptation": '{"steps": 60}', "new_key": '{"a": 1}', "reference": "CT"}
    assert node.GetAttribute(f"{attribute}.results") is None  # the rows are the table
    lines = node.GetDescription().splitlines()
    assert lines == [
        "Reference: CT", "Degradation: slab", "Factor: 4", "Axis: z", "HU range: -1024, 2048",
        "Slices asked for: 20..43 (24 slices)", "Slices scored: 20..43 (24 slices)", "Slices left out: none",
        "Weights: sr-default", f"Weights sha256: {'ab' * 32}", "Adaptation: 60 steps", "Seed: 3", "Device: cpu",
        "Threads: 2", "Body mask: HU > -500, ...; 1234 voxels",
        "DiffusionCore version: 0.9.0", "torch version: 2.5.0", "Date: 2026-12-06T10:00:00Z",
        "Warnings: its slices are 5 mm apart",
    ]  # fmt: skip
    assert json.loads(node.GetAttribute(attribute))["new_key"] == {"a": 1}
    # a report of the first layout: the job's request fills in
    old = {"reference": "CT", "factor": 2, "axis": "z", "degradation": "slab", "hu_range": [-1024, 2048],
           "results": rows}  # fmt: skip
    requested = {"seed": 5, "weights": "", "device": "cpu", "adaptation": {"steps": 400}}
    node = table_from_evaluation(scene, old, "eval", requested=requested)
    assert node.GetAttribute(f"{attribute}.seed") == "5" and node.GetAttribute(f"{attribute}.weights") is None
    assert node.GetDescription().splitlines()[-3:] == ["Adaptation: 400 steps", "Seed: 5", "Device: cpu"]
    assert json.loads(node.GetAttribute(f"{attribute}.requested")) == requested
    assert table_from_evaluation(scene, {}, "empty").GetDescription() == ""
    from CTDiffusionSRLib.sr_logic import evaluation_facts

    assert list(evaluation_facts({"factor": 2, "seed": None})) == ["factor"]


# -- views -------------------------------------------------------------------------------------------------
def test_compare_side_by_side_and_fade_set_linked_views(scene):
    a = mrml_io.add_volume_node(scene, phantom_ct(), "input")
    b = mrml_io.add_volume_node(scene, phantom_ct(seed=1), "result")
    views.show_side_by_side(scene, a, b)
    assert views.layout_node(scene).GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    red, yellow = views.composite_node(scene, "Red"), views.composite_node(scene, "Yellow")
    assert (red.GetBackgroundVolumeID(), yellow.GetBackgroundVolumeID()) == (a.GetID(), b.GetID())
    assert red.GetLinkedControl() and yellow.GetLinkedControl()
    views.show_fade(scene, a, b, 0.3)
    for view in ("Red", "Yellow", "Green"):
        comp = views.composite_node(scene, view)
        assert comp.GetForegroundVolumeID() == b.GetID() and comp.GetForegroundOpacity() == pytest.approx(0.3)
    views.set_fade(scene, 1.0)
    assert views.composite_node(scene, "Green").GetForegroundOpacity() == 1.0


def test_uncertainty_overlay_uses_a_colour_table(scene):
    base = mrml_io.add_volume_node(scene, phantom_ct(), "input")
    unc = mrml_io.add_volume_node(scene, phantom_ct().with_array(np.abs(phantom_ct().array) / 100), "unc")
    views.show_overlay(scene, base, unc, 0.4)
    assert unc.GetDisplayNode().GetColorNodeID() in views.OVERLAY_COLOR_IDS
    assert views.composite_node(scene, "Red").GetForegroundOpacity() == pytest.approx(0.4)
    rgba = views.render_view(scene, "Red", (48, 48))
    assert rgba.shape == (48, 48, 4)
    colourful = np.abs(rgba[..., 0].astype(int) - rgba[..., 2].astype(int)) > 20
    assert colourful.mean() > 0.05  # the overlay is in colour, not grey


# -- training panel ------------------------------------------------------------------------------------
def test_metrics_follower_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert follower.read_new() == []
    with open(path, "w") as f:
        f.write('{"step": 1, "tag": "train/loss", "value": 0.9, "time": 0}\n{"step": 2, "tag": "train/lo')
    assert [r["step"] for r in follower.read_new()] == [1]
    with open(path, "a") as f:
        f.write('ss", "value": 0.7, "time": 1}\n')
    assert [(r["step"], r["value"]) for r in follower.read_new()] == [(2, 0.7)]


def test_loss_curve_becomes_a_plot_chart_with_table(scene):
    curve = LossCurve(scene, "SR run")
    curve.add([{"step": s, "tag": "train/loss", "value": 1.0 / s} for s in (1, 2, 3)])
    curve.add([{"step": 3, "tag": "val/psnr", "value": 25.0}])
    assert curve.values("train/loss") == [(1.0, 1.0), (2.0, 0.5), (3.0, 1 / 3)]
    assert curve.chart.GetNumberOfPlotSeriesNodes() == 1  # only loss tags are drawn; psnr is tabulated
    series = curve.chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNode() is curve.tables["train/loss"] and series.GetYColumnName() == "train/loss"


def test_config_text_is_validated_before_training(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        write_config_text("{bad", tmp_path)
    with pytest.raises(ConfigError, match="JSON object"):
        write_config_text("[1, 2]", tmp_path)
    path = write_config_text('{"epochs": 1}', tmp_path / "run")
    assert json.loads(path.read_text()) == {"epochs": 1}


def test_training_job_plots_metrics_and_stop_requests_a_clean_end(scene, tmp_path, monkeypatch):
    write_fake_trainer(tmp_path)  # metrics.jsonl lines, a clean end on STOP
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(TrainingJob, "module_dir", lambda self: tmp_path)
    job = TrainingJob(
        scene, family="sr", config_path=tmp_path / "c.json", data=data, output_dir=tmp_path / "run", curve_name="t"
    ).start()
    deadline = time.monotonic() + 30
    while (job.curve is None or len(job.curve.values("train/loss")) < 3) and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.curve is not None and job.curve.values("train/loss")[0] == (1.0, 1.0)
    job.request_stop()
    while job.poll() == JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == JobState.COMPLETED
    steps = [s for s, _ in job.curve.values("train/loss")]
    assert (tmp_path / "run" / f"checkpoint-{int(steps[-1]):08d}" / "state.json").exists()  # the clean end's checkpoint
    assert steps == list(range(1, len(steps) + 1))  # every line plotted once, in order
    assert job.tensorboard_dir == tmp_path / "run"


def test_a_training_curve_comes_back_after_the_scene_is_closed(scene, tmp_path, monkeypatch):
    """Closing the scene does not stop a training run (it is not the scene's), but its curve went on filling tables
    that were no longer in any scene: the plot was gone for the rest of the run. It is now drawn again, whole."""
    write_fake_trainer(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(TrainingJob, "module_dir", lambda self: tmp_path)
    job = TrainingJob(scene, family="sr", config_path=tmp_path / "c.json", data=tmp_path / "data",
                      output_dir=tmp_path / "run", curve_name="t").start()  # fmt: skip
    deadline = time.monotonic() + 30
    while (job.curve is None or len(job.curve.values("train/loss")) < 3) and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    before = len(job.curve.values("train/loss"))
    scene.Clear(0)
    while (scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 0 or len(job.curve.values("train/loss")) <= before
           ) and time.monotonic() < deadline:  # fmt: skip
        job.poll()
        time.sleep(0.05)
    assert scene.IsNodePresent(job.curve.chart)
    steps = [s for s, _ in job.curve.values("train/loss")]
    assert len(steps) > before and steps == list(range(1, len(steps) + 1))  # the whole run, from its first step
    job.cancel()


def test_training_job_refuses_missing_data(scene, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        TrainingJob(scene, family="sr", config_path="c.json", data=tmp_path / "nope", output_dir=tmp_path)


def test_the_training_panel_takes_ct_sample_names_as_the_train_command_does(scene, tmp_path):
    """`train throughplane --data chest-lidc chest-dx` trains on the two sample CTs; the panel refused the same names
    as "does not exist". Typed into its data field they start a real run that trains on both (DiffusionTrain hands
    them to the train command as two --data values); a mistyped name and a radiograph sample are refused at once, in
    the command's words."""
    from CTDiffusionSRLib.training import run_config

    from DiffusionCore.sampledata import cache_state

    if any(cache_state(name) != "cached" for name in ("chest-lidc", "chest-dx")):
        pytest.skip("the chest-lidc and chest-dx samples are not cached here (python -m DiffusionCore sample-data)")
    for data, said in (("chest-lidc chest-foo", r"chest-foo does not exist and is not a sample name \(did you mean "
                                                r"chest-dx\?\).*CT sample names: chest-lidc, chest-dx"),
                       ("cxr-pa", "cxr-pa is a radiograph sample, and a CT volume is needed here")):  # fmt: skip
        with pytest.raises(InputError, match=f"training data: {said}"):
            TrainingJob(scene, family="throughplane", config_path=None, data=data, output_dir=tmp_path / "x", resume=True)
    out = tmp_path / "run"
    config, _ = run_config("{}", out, resume=False)
    lines: list[str] = []
    job = TrainingJob(scene, family="throughplane", config_path=config, data=Path("chest-lidc chest-dx"), output_dir=out,
                      device="cpu", extra_arguments="--max-steps 1 --batch-size 2", on_line=lines.append)  # fmt: skip
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    assert any("found 2 CT volume(s)" in line for line in lines), lines
    assert any(line.startswith("info: chest-dx.nii.gz: train slices") for line in lines), lines
    assert (out / "throughplane.safetensors").is_file()


def test_dependency_installs_never_touch_slicers_numpy_or_simpleitk(tmp_path):
    # dependencies are installed (no --no-deps), under a constraints file that pins Slicer's packages
    args = pip_install_arguments(["einops>=0.7,<1"], tmp_path / "constraints.txt")
    assert args == ["--constraint", str(tmp_path / "constraints.txt"), "einops>=0.7,<1"] and "--no-deps" not in args
    for protected in ("numpy>=2", "SimpleITK==2.4", "torch"):
        with pytest.raises(ValueError):
            pip_install_arguments([protected], tmp_path / "constraints.txt")


# -- X-ray to CT ---------------------------------------------------------------------------------------
def _radiograph_node(scene, pixels, spacing=(0.5, 0.5)):
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chest PA")
    image = slicer.vtkImageData() if hasattr(slicer, "vtkImageData") else None
    import vtk

    image = vtk.vtkImageData()
    h, w = pixels.shape
    image.SetDimensions(w, h, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(pixels).ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)  # as Slicer loads a 2D image file: shown as stored
    node.SetSpacing(spacing[1], spacing[0], 1.0)
    return node


def test_radiograph_node_checks_and_export(scene, tmp_path):
    import SimpleITK as sitk
    from XrayToCTLib import check_xray_input, write_radiograph

    pixels = (phantom_radiograph(64) * 4000).astype(np.float32)
    node = _radiograph_node(scene, pixels, spacing=(0.4, 0.3))
    assert check_xray_input(node) == ""
    path = write_radiograph(node, tmp_path / "r.mha")
    img = sitk.ReadImage(str(path))
    assert img.GetDimension() == 2 and img.GetSpacing() == pytest.approx((0.3, 0.4))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), pixels)
    assert "3D volume" in check_xray_input(mrml_io.add_volume_node(scene, phantom_ct(), "ct"))
    assert "pixels" in check_xray_input(_radiograph_node(scene, np.ones((10, 10), np.float32)))
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lungs")  # a 2D label map: not a radiograph
    labels.SetAndObserveImageData(node.GetImageData())
    assert check_xray_input(labels) == "'lungs' is a label map, not a radiograph: choose the image itself."


def test_a_greyscale_radiograph_loaded_as_colour_gives_the_greyscale_pixels(scene):
    import vtk
    from vtk.util import numpy_support
    from XrayToCTLib import check_xray_input
    from XrayToCTLib.xray_logic import radiograph_from_node

    pixels = (phantom_radiograph(64) * 250).astype(np.uint8)
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "chest PA (RGB)")  # how Slicer loads an RGB PNG
    image = vtk.vtkImageData()
    image.SetDimensions(64, 64, 1)
    rgb = np.repeat(pixels.reshape(-1, 1), 3, axis=1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(rgb), deep=True))
    node.SetAndObserveImageData(image)
    assert check_xray_input(node) == ""
    np.testing.assert_array_equal(radiograph_from_node(node)[0], pixels.astype(np.float32))


def test_xray_job_shows_stage_previews_then_the_final_volume(scene, tmp_path, monkeypatch):
    import tempfile

    from XrayToCTLib import XrayJob, XraySettings

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    node = _radiograph_node(scene, (phantom_radiograph(64) * 3000).astype(np.float32), spacing=(5.0, 5.0))
    sh = mrml_io.subject_hierarchy(scene)
    study = sh.CreateStudyItem(sh.GetSceneItemID(), "Study")
    sh.CreateItem(study, node)
    before = mrml_io.array_from_node(node)
    job = XrayJob(scene, node, XraySettings(num_stages=2, steps=2, device="cpu", tiny_test_model=True)).start()
    names = []
    deadline = time.monotonic() + 180
    while job.poll() == JobState.RUNNING and time.monotonic() < deadline:
        if job.preview_node is not None:
            names.append(job.preview_node.GetName())
        time.sleep(0.02)
    assert job.state == JobState.COMPLETED, job.error
    result = job.result_nodes[0]
    assert result is job.preview_node and result.GetName() == "chest PA CT (synthetic)"  # the last stage: the result
    assert job.stages_shown[:2] == [1, 2]  # stage 1 was shown before stage 2 replaced it
    assert set(names) <= {"chest PA CT stage 1 (synthetic)", "chest PA CT (synthetic)"}
    assert sorted(job.stage_errors) == [1, 2] and all("projection_psnr" in v for v in job.stage_errors.values())
    vol = mrml_io.volume_from_node(result)
    assert vol.shape == (32, 32, 32) and np.isfinite(vol.array).all()
    assert mrml_io.provenance(result)["kind"] == "xray-to-ct"
    assert json.loads(result.GetAttribute("CTDiffusion.ProjectionErrors")).keys() == {"1", "2"}
    assert sh.GetItemParent(sh.GetItemByDataNode(result)) == study
    np.testing.assert_array_equal(mrml_io.array_from_node(node), before)
    assert not list(tmp_path.glob("ctdiffusion-*"))


def test_xray_job_scores_against_a_reference_ct_also_from_a_tilted_series(scene, tmp_path, monkeypatch):
    """The module's optional reference CT gives PSNR and SSIM in the report; a tilted reference series (which
    Slicer reads as a sheared grid) is read from its DICOM files, as the SR module reads one."""
    from CTDiffusionSRLib.testing import regularize_like_slicer
    from XrayToCTLib import XrayJob, XraySettings

    node = _radiograph_node(scene, (phantom_radiograph(64) * 3000).astype(np.float32), spacing=(5.0, 5.0))
    plain = mrml_io.add_volume_node(scene, phantom_ct(shape=(12, 32, 32), spacing=(8.0, 8.0, 8.0)), "reference CT")
    files = _tilted_dicom_series(tmp_path / "series")
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    tilted = load_dicom_node(scene, files, "tilted", database)
    stack = load_dicom_node(scene, files, "stack", database, uids=[f"stack.{i}" for i in range(len(files))])
    regularize_like_slicer(scene, stack, files)
    settings = XraySettings(num_stages=1, steps=1, device="cpu", tiny_test_model=True)
    from DiffusionCore.xray.evaluate import reference_scores

    for reference, as_folder in ((plain, False), (tilted, True), (stack, True)):
        job = XrayJob(scene, node, settings, reference_node=reference)
        (tmp_path / reference.GetName()).mkdir()
        given = Path((args := job.prepare(tmp_path / reference.GetName()))[args.index("--referenceVolume") + 1])
        assert given.is_dir() == as_folder
        assert job.run(timeout=180) == JobState.COMPLETED, job.error
        truth = read_volume(given) if as_folder else mrml_io.volume_from_node(reference)
        expected = reference_scores(mrml_io.volume_from_node(job.result_nodes[0]), truth)
        assert job.reference_metrics == pytest.approx(expected, rel=1e-4)


def test_xray_job_runs_every_stage_the_weights_have_by_default_without_a_warning(scene):
    """The module's Stages box starts at "all the weights have" (0): the shipped weights have one stage, and asking
    for 3 by default warned "3 stages were asked for, but the weights have 1" on every run."""
    from XrayToCTLib import XrayJob, XraySettings

    assert XraySettings().num_stages == 0
    node = _radiograph_node(scene, (phantom_radiograph(64) * 3000).astype(np.float32), spacing=(5.0, 5.0))
    lines = []
    job = XrayJob(scene, node, XraySettings(steps=1, device="cpu", tiny_test_model=True), on_line=lines.append)
    assert job.run(timeout=180) == JobState.COMPLETED, job.error
    assert job.result_nodes[0].GetName() == "chest PA CT (synthetic)"
    assert job.stages_shown[-1] == 2  # the tiny model's two stages
    assert not [line for line in lines if "were asked for" in line], lines
    asked = []
    again = XrayJob(scene, node, XraySettings(num_stages=3, steps=1, device="cpu", tiny_test_model=True),
                    on_line=asked.append)  # fmt: skip
    assert again.run(timeout=180) == JobState.COMPLETED, again.error
    assert [line for line in asked if "3 stages were asked for, but the weights have 2; ran 2" in line]


def test_xray_job_cancel_keeps_the_shown_stage_and_adds_nothing_else(scene):
    """A cancel after stage 1 keeps its preview (Testing/test_xray_slicer_scene.py says why); nothing else the job
    made stays."""
    from XrayToCTLib import XrayJob, XraySettings

    node = _radiograph_node(scene, (phantom_radiograph(64) * 3000).astype(np.float32), spacing=(5.0, 5.0))
    mrml_io.subject_hierarchy(scene)  # Slicer always has one; here it would otherwise appear with the preview
    ids_before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    job = XrayJob(scene, node, XraySettings(num_stages=2, steps=25, device="cpu", tiny_test_model=True)).start()
    deadline = time.monotonic() + 120
    while job.poll() == JobState.RUNNING and job.preview_node is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == JobState.RUNNING and job.preview_node is not None, "stage 1 preview expected first"
    job.cancel()
    assert job.state == JobState.CANCELLED
    ids_after = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    preview = job.preview_node
    assert ids_after - ids_before == {preview.GetID(), preview.GetDisplayNodeID(), preview.GetStorageNodeID()}


def test_xray_job_whose_preview_is_deleted_while_it_runs_puts_the_next_stage_in_a_new_node(scene):
    """Deleting the stage-1 preview while stage 2 runs lost the final volume: it was written into the deleted
    node and the job reported success."""
    from CTDiffusionSRLib.jobs import remove_node_and_helpers
    from XrayToCTLib import XrayJob, XraySettings

    node = _radiograph_node(scene, (phantom_radiograph(64) * 3000).astype(np.float32), spacing=(5.0, 5.0))
    job = XrayJob(scene, node, XraySettings(num_stages=2, steps=25, device="cpu", tiny_test_model=True)).start()
    deadline = time.monotonic() + 120
    while job.poll() == JobState.RUNNING and job.preview_node is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == JobState.RUNNING and job.preview_node is not None, "stage 1 preview expected first"
    deleted = job.preview_node
    remove_node_and_helpers(scene, deleted)
    assert job.wait(180) == JobState.COMPLETED, job.error
    result = job.result_nodes[0]
    assert result is not deleted and scene.IsNodePresent(result)
    assert result.GetName() == "chest PA CT (synthetic)"
    assert mrml_io.volume_from_node(result).shape == (32, 32, 32)
    assert job.notices and "was deleted while the job ran; stage 2 is in a new volume" in job.notices[0]
    assert _stale_hierarchy_items(scene) == []


def test_training_presets_are_configs_the_trainers_accept(tmp_path):
    from CTDiffusionSRLib.training import FAMILIES, check_training_config, default_preset, list_presets

    from DiffusionCore.config import load_config
    from DiffusionCore.sr.config import SRConfig
    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig
    from DiffusionCore.xray.config import load_stage_config

    # the SR panel's first family is the design of the shipped weights, with its preset
    assert FAMILIES[0] == "throughplane" and list(list_presets("throughplane")) == ["default"]
    assert list_presets("sr") and list_presets("xray")
    # the panel starts from the recipe of the family's shipped weights (the X-ray one lived under benchmarks/, which
    # an installed extension lacks), the one the command line trains without --config
    from DiffusionCore.xray.config import DEFAULT_CONFIG

    assert default_preset("throughplane") == "default" and default_preset("xray") == DEFAULT_CONFIG == "stage1_default"
    assert default_preset("sr") == default_preset("vae") == ""  # no shipped weights: the config class's defaults
    for family, loader in (("sr", lambda p: load_config(p, SRConfig)), ("vae", lambda p: load_config(p, SRConfig)),
                           ("xray", load_stage_config),
                           ("throughplane", lambda p: load_config(p, ThroughPlaneTrainConfig))):  # fmt: skip
        for name, path in list_presets(family).items():
            loader(path)  # raises ConfigError on an unknown key or a wrong type
            # what the panel shows and saves is accepted the same way
            loader(write_config_text(path.read_text(), tmp_path / family / name))
    # a config of another design is refused before a run starts, naming the key
    sr_preset = next(iter(list_presets("sr").values()))
    with pytest.raises(ConfigError):
        check_training_config("throughplane", sr_preset)
    check_training_config("throughplane", list_presets("throughplane")["default"])


def _dicom_radiograph(path, stored: np.ndarray, photometric: str, **tags: str) -> Path:
    """A one-frame CR DICOM file with these stored pixels and Photometric Interpretation (``tags``: more header
    fields by sitk key, e.g. ``{"0018|5101": "LL"}``)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(stored.astype(np.uint16))
    img.SetMetaData("0008|0060", "CR")
    img.SetMetaData("0028|0030", "0.5\\0.5")
    for key, value in tags.items():
        img.SetMetaData(key, value)
    sitk.WriteImage(img, str(path))
    raw = path.read_bytes()
    assert b"MONOCHROME2" in raw
    path.write_bytes(raw.replace(b"MONOCHROME2", photometric.encode()))  # same length: still valid DICOM
    return path


def test_monochrome1_radiograph_is_not_inverted_a_second_time(scene, tmp_path):
    """Slicer's DICOM reader (vtkITK's archetype reader with ITK's GDCMImageIO, here in slicer-core) already
    returns MONOCHROME1 pixels inverted, bone bright; the module must then use them as they are."""
    import importlib.util

    from XrayToCTLib import XraySettings, photometric_note, write_radiograph

    spec = importlib.util.spec_from_file_location("xray_cli", ROOT / "XrayToCT" / "CLI" / "XrayToCTGenerate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    shown = (phantom_radiograph(64) * 4000).astype(np.uint16)  # what the radiograph shows: mediastinum bright
    files = {
        "MONOCHROME2": _dicom_radiograph(tmp_path / "m2.dcm", shown, "MONOCHROME2"),
        # MONOCHROME1 stores the negative: high values display dark
        "MONOCHROME1": _dicom_radiograph(tmp_path / "m1.dcm", 65535 - shown.astype(np.int64), "MONOCHROME1"),
    }
    seen = {}
    for photometric, path in files.items():
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", photometric)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        storage.SetSingleFile(1)
        assert storage.ReadData(node), f"Slicer could not read {path}"
        settings = XraySettings()  # what Apply uses: the module no longer inverts on its own
        assert "--invertIntensities" not in settings.cli_arguments()
        exported = write_radiograph(node, tmp_path / f"{photometric}.mha")  # what the job hands the CLI
        seen[photometric] = cli.load_radiograph(str(exported), settings.invert).array
        centre, lung = seen[photometric][:, 30:34].mean(), seen[photometric][:, 17:21].mean()
        assert centre > lung + 0.1, f"{photometric}: the mediastinum must be brighter than the lungs"
        # the former automatic inversion of MONOCHROME1 would have turned bone dark
        inverted = cli.load_radiograph(str(exported), True).array
        assert inverted[:, 30:34].mean() < inverted[:, 17:21].mean()
    np.testing.assert_allclose(seen["MONOCHROME1"], seen["MONOCHROME2"], atol=1e-4)
    assert "already shows it with bone bright" in photometric_note("MONOCHROME1")
    assert photometric_note("MONOCHROME2") == "" and photometric_note("") == ""


def _load_dicom_node(scene, path: Path, name: str, uid: str, monkeypatch, database: DicomDatabaseStandIn):
    """``path`` read into a node by Slicer's own reader and marked as loaded from the DICOM database
    (:func:`CTDiffusionSRLib.testing.load_dicom_node`); ``database`` stands in for ``slicer.dicomDatabase``."""
    node = load_dicom_node(scene, [path], name, database, uids=[uid])
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    return node


def _xray_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("xray_cli", ROOT / "XrayToCT" / "CLI" / "XrayToCTGenerate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_a_radiograph_from_slicers_dicom_database_is_turned_as_its_header_says(scene, tmp_path, monkeypatch):
    """A radiograph stored mirrored and upside down (PatientOrientation R\\H) reaches the model the way the engine
    turns the DICOM file itself: the module hands the command the file the node was loaded from."""
    from XrayToCTLib import XrayJob, XraySettings, check_xray_input, write_radiograph

    from DiffusionCore.xray.radiograph import read_radiograph

    cli = _xray_cli()
    shown = (phantom_radiograph(64) * 4000).astype(np.float32)
    shown[:8, :20] = 4000.0  # a bright corner, so that each flip moves it
    stored = shown[::-1, ::-1]  # how a radiograph read R\\H keeps its pixels
    path = _dicom_radiograph(tmp_path / "rh.dcm", stored, "MONOCHROME2", **{"0020|0020": "R\\H"})
    database = DicomDatabaseStandIn()
    node = _load_dicom_node(scene, path, "chest PA", "1.2.3.1", monkeypatch, database)
    assert check_xray_input(node) == ""
    lines = []
    job = XrayJob(scene, node, XraySettings(num_stages=1, steps=1, tiny_test_model=True, device="cpu"),
                  on_line=lines.append)  # fmt: skip
    args = job.prepare(tmp_path)
    assert args[args.index("--dicomHeader") + 1] == str(path) and args[args.index("--view") + 1] == "auto"
    assert job.run(timeout=120) == JobState.COMPLETED, job.error  # the module's log says what the header decided
    assert [line for line in lines if "view frontal (pa: PA and AP alike), as its DICOM header says (image directions "
            "R\\H)" in line], lines
    exported = write_radiograph(node, tmp_path / "r.mha")
    as_slicer_hands_it = cli.load_radiograph(str(exported), False, str(path))
    engine = read_radiograph(path)  # the engine's own reading of the DICOM file
    np.testing.assert_allclose(as_slicer_hands_it.array, engine.array, atol=1e-6)
    assert engine.array[:8, :20].mean() > 0.9  # the bright corner is back at the top left
    assert "flipped left-right and flipped upside down" in as_slicer_hands_it.metadata["oriented"]
    # without the header, the node's pixels would reach the model mirrored
    assert not np.allclose(cli.load_radiograph(str(exported), False).array, engine.array, atol=1e-3)
    # a DICOM input given its own file as the header too is turned once, not twice
    np.testing.assert_allclose(cli.load_radiograph(str(path), False, str(path)).array, engine.array, atol=1e-6)
    # a real 1 x 1 mm pixel spacing (a CT topogram's) looks in the node like an image without one (PNG, JPEG), which
    # the command takes as unknown; the header says it is real, so the field of view is the engine's
    scout = _dicom_radiograph(tmp_path / "scout.dcm", shown, "MONOCHROME2", **{"0028|0030": "1\\1"})
    scout_node = _load_dicom_node(scene, scout, "scout", "1.2.3.9", monkeypatch, database)
    handed = write_radiograph(scout_node, tmp_path / "scout.mha")
    assert cli.load_radiograph(str(handed), False).pixel_spacing is None
    assert cli.load_radiograph(str(handed), False, str(scout)).pixel_spacing == read_radiograph(scout).pixel_spacing == (1.0, 1.0)
    # a node not loaded from DICOM hands no header
    plain = _radiograph_node(scene, shown)
    (tmp_path / "plain").mkdir()
    assert "--dicomHeader" not in XrayJob(scene, plain, XraySettings(tiny_test_model=True)).prepare(tmp_path / "plain")


def test_a_lateral_or_ct_image_from_slicers_dicom_database_is_refused_by_its_header(scene, tmp_path, monkeypatch):
    from XrayToCTLib import XrayJob, XraySettings, check_xray_input

    pixels = (phantom_radiograph(64) * 4000).astype(np.float32)
    database = DicomDatabaseStandIn()
    lateral = _load_dicom_node(
        scene, _dicom_radiograph(tmp_path / "ll.dcm", pixels, "MONOCHROME2", **{"0018|5101": "LL"}), "chest LL",
        "1.2.3.2", monkeypatch, database,
    )
    assert check_xray_input(lateral) == ""  # a radiograph; whether the weights take its view is the model's call
    job = XrayJob(scene, lateral, XraySettings(num_stages=1, steps=1, device="cpu", tiny_test_model=True))
    assert job.run(timeout=120) == JobState.FAILED
    assert "trained on pa radiographs, the input is marked lateral (its DICOM header: ViewPosition LL)" in job.error
    # the view chosen in the module wins over the header
    chosen = XrayJob(scene, lateral, XraySettings(view="pa", num_stages=1, steps=1, device="cpu", tiny_test_model=True))
    assert chosen.run(timeout=120) == JobState.COMPLETED, chosen.error
    # with the shipped (frontal) weights the module refuses it when Apply is pressed, in its own words
    with pytest.raises(InputError, match=r"'chest LL' is marked lateral \(its DICOM header: ViewPosition LL\), and the "
                                         r"weights xray-default were trained on pa radiographs: use a frontal \(PA or AP\) "
                                         r"radiograph, or choose View: pa if the header is wrong\."):  # fmt: skip
        XrayJob(scene, lateral, XraySettings())
    XrayJob(scene, lateral, XraySettings(view="pa"))  # the header overruled
    plain = _radiograph_node(scene, pixels)
    XrayJob(scene, plain, XraySettings())  # no header: taken as frontal
    with pytest.raises(InputError, match=r"is marked lateral \(View is set to lateral\).*radiograph\.$"):
        XrayJob(scene, plain, XraySettings(view="lateral"))
    # a CT slice loaded from DICOM is refused when it is picked, before Apply
    ct_slice = _load_dicom_node(
        scene, _dicom_radiograph(tmp_path / "ct.dcm", pixels, "MONOCHROME2", **{"0008|0060": "CT"}), "CT slice",
        "1.2.3.3", monkeypatch, database,
    )
    problem = check_xray_input(ct_slice)
    assert "'CT slice' is a CT slice (DICOM Modality CT), not a radiograph" in problem
    with pytest.raises(InputError, match="not a radiograph"):
        XrayJob(scene, ct_slice, XraySettings(tiny_test_model=True))


def test_photometric_interpretation_is_read_from_the_nodes_dicom_file(scene, tmp_path, monkeypatch):
    from XrayToCTLib.xray_logic import photometric_interpretation

    pixels = (phantom_radiograph(64) * 4000).astype(np.float32)
    node = _load_dicom_node(scene, _dicom_radiograph(tmp_path / "m1.dcm", 65535 - pixels, "MONOCHROME1"), "m1",
                            "1.2.3.4", monkeypatch, DicomDatabaseStandIn())  # fmt: skip
    assert photometric_interpretation(node) == "MONOCHROME1"
    assert photometric_interpretation(_radiograph_node(scene, pixels)) == ""
    (tmp_path / "m1.dcm").unlink()  # the database's file is gone: used as a plain image, with a warning
    assert photometric_interpretation(node) == ""


def test_training_overwrite_is_passed_and_a_previous_run_is_explained_first(scene, tmp_path, monkeypatch):
    from CTDiffusionSRLib.training import output_folder_problem

    write_fake_trainer(tmp_path)
    monkeypatch.setenv("FAKE_TRAINER_STEPS", "1")
    monkeypatch.setattr(TrainingJob, "module_dir", lambda self: tmp_path)
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    assert output_folder_problem(run) == ""  # a new folder
    run.mkdir()
    (run / "model.safetensors").write_text("previous run")
    problem = output_folder_problem(run)
    assert "already holds a training run (model.safetensors)" in problem and "'Overwrite'" in problem and "'Resume'" in problem
    assert output_folder_problem(run, overwrite=True) == ""
    # Resume on a folder with weights or logs but no checkpoint is refused before config.json is written there
    problem = output_folder_problem(run, resume=True)
    assert problem.startswith(f"The output folder {run} holds no checkpoint to resume from, only model.safetensors")
    assert "'Overwrite' instead of 'Resume'" in problem
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        TrainingJob(scene, family="sr", config_path=None, config_text="{}", data=data, output_dir=run, resume=True)
    assert sorted(p.name for p in run.iterdir()) == ["model.safetensors"]  # no config.json written for the refusal
    (run / "checkpoint-00000010").mkdir()  # a checkpoint (even a damaged one, which the train command names)
    assert output_folder_problem(run, resume=True) == ""
    (run / "checkpoint-00000010").rmdir()
    # Resume on a folder that holds no run (a new or mistyped one) is explained before config.json is written there
    assert output_folder_problem(tmp_path / "run2", resume=True) == (
        f"The output folder {tmp_path / 'run2'} holds no training run to resume. Untick 'Resume' to start a new run "
        "there, or choose the folder of the run to continue.")
    assert not (tmp_path / "run2").exists()
    assert "only one" in output_folder_problem(run, resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="only one"):
        TrainingJob(scene, family="sr", config_path=tmp_path / "c.json", data=data, output_dir=run, resume=True, overwrite=True)

    def train(**flags):
        job = TrainingJob(scene, family="sr", config_path=tmp_path / "c.json", data=data, output_dir=run, **flags)
        assert job.run(timeout=60) in (JobState.COMPLETED, JobState.FAILED)
        return job, json.loads((run / "argv.json").read_text())

    job, argv = train()
    assert job.state == JobState.FAILED and "--overwrite" not in argv  # what the panel now says beforehand
    job, argv = train(overwrite=True)
    assert job.state == JobState.COMPLETED and "--overwrite" in argv and "--resume" not in argv
    assert (run / "model.safetensors").read_text() == "new run"


def test_the_training_panel_resumes_a_run_started_on_the_command_line_with_its_recorded_settings(scene, tmp_path):
    """Resume in the panel on a run made by `train throughplane --config ...` (no config.json in its folder) wrote
    the panel's text as the run's config.json and failed on the checkpoint; every later Resume reused that file. Now
    the run is resumed without --config, so the train command continues with what its checkpoint recorded."""
    from conftest import ct_phantom_array
    from CTDiffusionSRLib.training import run_config

    from DiffusionCore.cli.main import main
    from DiffusionCore.volume import write_volume

    data = tmp_path / "data"
    data.mkdir()
    write_volume(Volume(ct_phantom_array((60, 64, 64), seed=3), spacing=(0.8, 0.8, 1.0)), data / "thin.nii.gz")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model": {"channels": 8, "blocks": 1, "factors": [2, 4]},
                               "pairs": {"thick_rows": 6, "width": 32}, "batch_size": 4, "val_every": 2,
                               "checkpoint_every": 2, "val_pairs": 4}))  # fmt: skip
    run = tmp_path / "run"
    assert main(["train", "throughplane", "--config", str(cfg), "--data", str(data), "--out-dir", str(run),
                 "--max-steps", "2"]) == 0  # fmt: skip
    assert run_config('{"model": {"channels": 32}}', run, resume=True) == (None, True)
    assert not (run / "config.json").exists()  # the panel's text is not written into the run
    job = TrainingJob(scene, family="throughplane", config_path=None, data=data, output_dir=run, resume=True,
                      extra_arguments="--max-steps 4")  # fmt: skip
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    with pytest.raises(ConfigError, match="only Resume"):
        TrainingJob(scene, family="throughplane", config_path=None, data=data, output_dir=tmp_path / "new")
    # a new run, and a run the panel started, keep using the text and the run's own config.json
    assert run_config('{"batch_size": 4}', tmp_path / "new", resume=False) == (tmp_path / "new" / "config.json", False)
    assert run_config("{}", tmp_path / "new", resume=True) == (tmp_path / "new" / "config.json", True)


def _two_head_weights(tmp_path) -> Path:
    """An unregistered weights file of a tiny through-plane predictor with heads for x2 and x4 only."""
    from DiffusionCore.config import config_to_dict
    from DiffusionCore.sr.throughplane import (
        ThroughPlaneConfig,
        ThroughPlaneNet,
        random_weights,
        state_dict_for_file,
    )
    from DiffusionCore.weights.registry import save_safetensors

    net = random_weights(ThroughPlaneNet(ThroughPlaneConfig(channels=4, blocks=1, factors=[2, 4])), seed=2)
    path = tmp_path / "two-heads.safetensors"
    save_safetensors(path, state_dict_for_file(net), {"family": "sr", "component": "throughplane",
                                                      "config": {"throughplane": config_to_dict(net.config)}})
    return path


def test_evaluation_takes_the_allow_unregistered_weights_setting_that_apply_takes(scene, tmp_path):
    """With SRSettings(weights=<a file of one's own>, allow_unregistered_weights=True) Apply ran, and "Evaluate on this
    volume" with the same settings failed in the background with a message about command-line flags: the evaluation
    job had no such setting. Now it passes it on; without it the file is refused when the job is made, as Apply's."""
    from CTDiffusionSRLib.sr_logic import evaluation_methods

    from DiffusionCore.errors import WeightsError

    weights = str(_two_head_weights(tmp_path))
    node = mrml_io.add_volume_node(scene, phantom_ct(shape=(16, 24, 24), spacing=(1.0, 1.0, 1.0)), "thin CT")
    settings = SRSettings(weights=weights, allow_unregistered_weights=True, adapt_to_scan=False, device="cpu")
    with pytest.raises(WeightsError, match="is not a registered weights file"):
        EvaluationJob(scene, node, factor=2, methods=evaluation_methods(settings), weights=weights)
    job = EvaluationJob.for_settings(scene, node, 2, settings, axis="z")
    assert "--allow-unregistered-weights" in job.prepare(tmp_path)
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    table = job.table_node.GetTable()
    assert [table.GetValue(r, 0).ToString() for r in range(table.GetNumberOfRows())] == ["cubic", "cubic+dc", "sr"]
    assert np.isfinite(table.GetColumnByName("PSNR (dB)").GetValue(2))
    direct = EvaluationJob(scene, node, factor=2, methods=("cubic", "sr"), weights=weights, allow_unregistered_weights=True)
    assert "--allow-unregistered-weights" in direct.prepare(tmp_path)


def test_sr_job_says_when_the_weights_have_no_head_for_the_factor(scene, tmp_path):
    """Weights of one's own with heads x2 and x4: x3 is the x2 head's result resampled. The panel says so after the
    job, as the command's warning (in the job's log) does; a factor with a head, and the shipped weights, say nothing."""
    weights = str(_two_head_weights(tmp_path))
    node = mrml_io.add_volume_node(scene, phantom_ct(shape=(6, 32, 32)), "CT_08")  # 4 mm slices, 0.8 mm in-plane
    lines = []
    job = SRJob(scene, node, SRSettings(factor=3, weights=weights, allow_unregistered_weights=True, adapt_to_scan=False,
                                        device="cpu"), on_line=lines.append)  # fmt: skip
    notice = (f"The weights {weights} have through-plane predictor heads for x2, x4 only: x3 was made with the x2 head "
              "and resampled onto the x3 grid; for a direct result choose factor 2 or 4, or train weights with factor 3 "
              "(model.factors).")  # fmt: skip
    assert job.notices == [notice]
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    assert job.result_nodes[0].GetName() == "CT_08 SR x3 (synthetic)"
    assert [line for line in lines if "heads for x2, x4 only: x3 was made with the x2 head" in line], lines
    suggested = SRJob(scene, node, SRSettings(weights=weights, allow_unregistered_weights=True, device="cpu"))
    assert [n for n in suggested.notices if "x5 was made with the x4 head" in n]  # 4 / 0.8 mm: x5 suggested
    for quiet in (SRSettings(factor=4, weights=weights, allow_unregistered_weights=True, device="cpu"),
                  SRSettings(factor=3, device="cpu"), SRSettings(device="cpu")):  # the shipped weights: heads 2..8
        assert not [n for n in SRJob(scene, node, quiet).notices if "head" in n], quiet
