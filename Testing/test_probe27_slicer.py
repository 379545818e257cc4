"""Probe 27 (items 1, 4, 10): what a result saved or exported from Slicer records, on real MRML (slicer-core wheel).

- The environment (commit, torch, Python, platform, GPU) is the run's: the job's output file's record, or a loaded
  result file's; ``{}`` when unknown. It was the environment of the Slicer exporting it.
- The X-ray to CT module's result records the engine's settings as run (``report_settings``: device, steps,
  samples, view, field of view, thread count), as the SR module does; it recorded only the panel's ("auto", 0).
- An SR result's ``input_uid`` is its input's SeriesInstanceUID, as ``sr`` records it (a radiograph's stays its
  SOPInstanceUID); it was the first slice's SOPInstanceUID.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

from conftest import write_dicom_series  # noqa: E402
from CTDiffusionSRLib import mrml_io  # noqa: E402
from CTDiffusionSRLib.process import JobState  # noqa: E402
from CTDiffusionSRLib.sr_logic import SRJob, SRSettings  # noqa: E402
from CTDiffusionSRLib.testing import DicomDatabaseStandIn, load_dicom_node, phantom_ct  # noqa: E402

import DiffusionCore.provenance as provenance_module  # noqa: E402
from DiffusionCore.provenance import Provenance, read_provenance  # noqa: E402
from DiffusionCore.results import write_result  # noqa: E402

#: A run made on another machine, as its result file records it.
ELSEWHERE = {"commit": "1" * 40, "torch": "2.1.0+cu121", "python": "3.9.10", "platform": "Windows-10",
             "gpu": "NVIDIA A100"}  # fmt: skip
#: What the exporting process would record of itself: never what an export should carry.
EXPORTING_SLICER = {"platform": "the Slicer that exports", "torch": "9.9.9"}
SERIES_UID = "1.2.826.0.1.3680043.8.498.2701"


@pytest.fixture
def exporting_slicer(monkeypatch):
    """This process's environment, as ``Provenance`` fills it in when none is given, made recognisable."""
    monkeypatch.setattr(provenance_module, "environment", lambda device=None: dict(EXPORTING_SLICER))


def _loaded(scene, path: Path, name: str = "loaded"):
    """``path`` loaded into the scene as Slicer loads a file (a storage node naming it), and recognised."""
    node = mrml_io.add_volume_node(scene, mrml_io.read_volume_file(str(path)), name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert mrml_io.recognise_result_file(node)
    return node


# -- 1. the run's environment, never the exporting Slicer's ---------------------------------------------------------
def test_a_loaded_result_file_is_exported_with_the_environment_it_records(scene, tmp_path, exporting_slicer):
    record = Provenance(task="sr", title="SR x2 (synthetic)", weights="sr-default", weights_sha256="ab" * 32,
                        settings={"factor": 2, "device": "auto"}, input="thick.nrrd", environment=dict(ELSEWHERE))  # fmt: skip
    write_result(phantom_ct(), tmp_path / "made_elsewhere.nrrd", record, dtype="float32")
    node = _loaded(scene, tmp_path / "made_elsewhere.nrrd")
    assert mrml_io.provenance(node)["environment"] == ELSEWHERE
    assert mrml_io.provenance_record(node).environment == ELSEWHERE
    mrml_io.export_result(node, str(tmp_path / "exported.nrrd"))
    assert read_provenance(tmp_path / "exported.nrrd").environment == ELSEWHERE
    mrml_io.export_result(node, str(tmp_path / "exported.nii.gz"))  # the sidecar too
    assert read_provenance(tmp_path / "exported.nii.gz").environment == ELSEWHERE


def test_a_result_whose_environment_is_unknown_records_none_rather_than_the_exporting_slicers(
    scene, tmp_path, exporting_slicer
):
    """A result of a scene saved before the environment was kept, or one made by a script without it."""
    result = mrml_io.add_volume_node(scene, phantom_ct(), "CT SR x2 (synthetic)")
    mrml_io.set_provenance(result, kind="super-resolution", model="sr-default", weights_sha256="ab" * 32,
                           settings={"factor": 2, "device": "auto"}, title="SR x2 (synthetic)")  # fmt: skip
    result.RemoveAttribute(mrml_io.ATTR_ENVIRONMENT)  # as an older version saved it
    assert mrml_io.provenance_record(result).environment == {}
    mrml_io.export_result(result, str(tmp_path / "r.nrrd"))
    assert read_provenance(tmp_path / "r.nrrd").environment == {}


def _dicom_ct(scene, tmp_path, monkeypatch):
    """A thick CT node loaded from a DICOM series (SeriesInstanceUID :data:`SERIES_UID`) through a stand-in of
    Slicer's DICOM database, as the DICOM module loads it (without the subject hierarchy's series UID)."""
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    files = write_dicom_series(tmp_path / "thick", phantom_ct(), series_uid=SERIES_UID)
    uids = [f"{SERIES_UID}.{i + 1}" for i in range(len(files))]  # the slices' SOPInstanceUIDs
    return load_dicom_node(scene, files, "CT chest", database, uids=uids)


def test_the_sr_modules_result_records_the_jobs_environment_and_its_series_uid(
    scene, tmp_path, monkeypatch, exporting_slicer
):
    node = _dicom_ct(scene, tmp_path, monkeypatch)
    job = SRJob(scene, node, SRSettings(factor=2, device="cpu", tiny_test_predictor=True, adapt_to_scan=False))
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    (result,) = job.result_nodes
    recorded = mrml_io.provenance(result)["environment"]
    assert recorded.get("torch") and recorded.get("python") and recorded != EXPORTING_SLICER  # the job's own
    assert mrml_io.provenance(result)["settings"]["report_settings"]["torch_threads"] >= 1
    assert result.GetAttribute(mrml_io.ATTR_INPUT_UID) == SERIES_UID  # item 10: as sr records it
    assert mrml_io.provenance_record(result).input_uid == SERIES_UID
    digest = result.GetAttribute(mrml_io.ATTR_INPUT_SHA256)  # the scan's content as the job read it
    assert len(digest) == 64 and int(digest, 16) >= 0
    mrml_io.export_result(result, str(tmp_path / "sr.nrrd"))
    written = read_provenance(tmp_path / "sr.nrrd")
    assert written.environment == recorded and written.input_uid == SERIES_UID and written.input_sha256 == digest
    scene.RemoveNode(node)  # the input gone: what the result recorded of it
    assert mrml_io.provenance_record(result).input_uid == SERIES_UID


# -- 10. input_uid: the series for SR, the instance for a radiograph ------------------------------------------------
def test_an_sr_result_records_its_inputs_series_uid_and_a_radiographs_result_its_instance_uid(
    scene, tmp_path, monkeypatch
):
    node = _dicom_ct(scene, tmp_path, monkeypatch)
    assert mrml_io.dicom_series_uid(node) == SERIES_UID  # from the first file's header
    sh = mrml_io.subject_hierarchy(scene)
    item = sh.CreateItem(sh.GetSceneItemID(), node)
    sh.SetItemUID(item, "DICOM", "1.2.826.0.1.3680043.8.498.2702")  # where Slicer's DICOM module records the series
    assert mrml_io.dicom_series_uid(node) == "1.2.826.0.1.3680043.8.498.2702"
    sh.RemoveItemUID(item, "DICOM")
    for kind, expected in (("super-resolution", SERIES_UID), ("uncertainty", SERIES_UID),
                           ("xray-to-ct", f"{SERIES_UID}.1")):  # fmt: skip
        result = mrml_io.add_volume_node(scene, phantom_ct(), f"CT {kind} (synthetic)")
        mrml_io.set_provenance(result, kind=kind, model="m", weights_sha256="ab" * 32, settings={}, source=node,
                               recorded_input=mrml_io.recorded_input(node, series=kind != "xray-to-ct"))  # fmt: skip
        assert mrml_io.provenance_record(result).input_uid == expected, kind
        assert result.GetAttribute(mrml_io.ATTR_INPUT_UID) == expected, kind
    plain = mrml_io.add_volume_node(scene, phantom_ct(), "not DICOM")
    assert mrml_io.dicom_series_uid(plain) == "" and mrml_io.recorded_input(plain, series=True) == ("not DICOM", "")


# -- 4. the X-ray to CT module's result records the settings as run, and the run's environment ----------------------
def test_the_xray_modules_result_records_the_engines_settings_and_the_runs_environment(
    scene, tmp_path, monkeypatch, exporting_slicer
):
    from test_xray_slicer_scene import ONE_STAGE, _dicom_file, _shown
    from XrayToCTLib import XrayJob

    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    path = _dicom_file(tmp_path / "cr.dcm", _shown(), "CR", "PX-27")
    radiograph = load_dicom_node(scene, [path], "chest PA", database, uids=["1.2.826.0.1.3680043.8.498.2703"])
    settings = ONE_STAGE  # the panel: view "auto", field of view 0 (automatic), no thread count
    job = XrayJob(scene, radiograph, settings)
    assert job.run(timeout=300) == JobState.COMPLETED, job.error
    result = job.result_nodes[0]
    recorded = mrml_io.provenance(result)
    run = recorded["settings"]["report_settings"]
    assert run["device"] == "cpu" and run["torch_threads"] >= 1 and run["view"] in ("pa", "lateral")
    assert run["fov_mm"] > 0 and run["steps"] and run["num_samples"] and "lifting_start_t" in run
    assert {"seed", "invert", "consistency"} <= set(run)
    assert recorded["settings"]["view"] == "auto"  # the panel's choice is kept beside it
    assert recorded["environment"].get("torch") and recorded["environment"] != EXPORTING_SLICER
    assert mrml_io.provenance_record(result).input_uid == "1.2.826.0.1.3680043.8.498.2703"  # the instance
    mrml_io.export_result(result, str(tmp_path / "xct.nrrd"))
    written = read_provenance(tmp_path / "xct.nrrd")
    assert written.environment == recorded["environment"]
    assert written.settings["report_settings"]["torch_threads"] == run["torch_threads"]


def test_the_runs_environment_is_read_from_its_output_file_else_from_its_reports_provenance(tmp_path):
    """:func:`mrml_io.recorded_environment`: the output file's record first, the report's ``provenance`` object (``sr
    --report`` has one) when the file has none, ``{}`` when neither says."""
    record = Provenance(task="sr", title="SR x2 (synthetic)", weights="w", weights_sha256="ab" * 32,
                        environment=dict(ELSEWHERE))  # fmt: skip
    write_result(phantom_ct(), tmp_path / "out.nrrd", record, dtype="float32")
    report = {"provenance": {"environment": {"torch": "from the report"}}}
    assert mrml_io.recorded_environment(tmp_path / "out.nrrd", report) == ELSEWHERE
    assert mrml_io.recorded_environment(tmp_path / "none.nrrd", report) == {"torch": "from the report"}
    assert mrml_io.recorded_environment(tmp_path / "none.nrrd", {}) == {}
    assert mrml_io.read_job_report(tmp_path / "none.json") == {}


def test_the_sr_modules_result_records_the_input_series_slice_thickness_and_exports_it(scene, tmp_path, monkeypatch):
    """Probe 33 F5 in Slicer: a result of an overlapping series (slices twice as thick as their spacing) keeps what
    the run recorded of that, on the node (saved with the scene) and in its exports, as `sr` writes it."""
    import pydicom

    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    ct = phantom_ct()
    files = write_dicom_series(tmp_path / "thick", ct, series_uid=SERIES_UID)
    thickness = 2 * ct.spacing[2]
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SliceThickness = f"{thickness:g}"
        ds.save_as(f)
    node = load_dicom_node(scene, files, "CT chest", database, uids=[f"{SERIES_UID}.{i + 1}" for i in range(len(files))])
    job = SRJob(scene, node, SRSettings(factor=2, device="cpu", tiny_test_predictor=True, adapt_to_scan=False))
    assert job.run(timeout=240) == JobState.COMPLETED, job.error
    (result,) = job.result_nodes
    record = mrml_io.provenance_record(result)
    assert record.input_slice_thickness_mm == pytest.approx(thickness)
    assert "an overlapping reconstruction" in record.input_slice_note
    mrml_io.export_result(result, str(tmp_path / "sr.nrrd"))
    written = read_provenance(tmp_path / "sr.nrrd")
    assert written.input_slice_thickness_mm == pytest.approx(thickness)
    assert written.input_slice_note == record.input_slice_note
    # another run's result loaded into the node later must not keep this run's thickness
    mrml_io.set_provenance(result, kind="super-resolution", model="m", weights_sha256="ab" * 32, settings={})
    assert mrml_io.provenance_record(result).input_slice_thickness_mm is None
    assert not result.GetAttribute(mrml_io.ATTR_INPUT_SLICE_NOTE)
