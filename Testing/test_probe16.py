"""The defects probe 16 found in a long Slicer session and the DICOM export round trip, each pinned by a test.

A cancelled command's compile cache folder; a derived series' patient and study when the input node is gone; DICOM
dates and times in local time; character sets; series numbers; the subject-hierarchy place of a result whose input
was deleted; what a generated CT copies from a topogram; which series a study folder is read as; the X-ray job's
notice about deleted inputs; SR result names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
for module in ("CTDiffusionSR", "XrayToCT"):
    if str(ROOT / module) not in sys.path:
        sys.path.insert(0, str(ROOT / module))

from CTDiffusionSRLib import jobs  # noqa: E402

from DiffusionCore.cli.missing import OWNER_FILE, TORCH_CACHE_PREFIX  # noqa: E402

SR_SCRIPT = ROOT / "CTDiffusionSR" / "CLI" / "CTDiffusionSRBatch.py"


# -- defect 2: a command cancelled while it starts leaves no compile cache folder --------------------------------
def _cache_folders(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{TORCH_CACHE_PREFIX}*"))


def test_sigterm_while_the_command_starts_removes_its_compile_cache_folder(tmp_path):
    """Slicer's Cancel pressed right after Apply: SIGTERM arrives while the SR command imports torch, after it made
    its compile cache folder. The folder must go with the process (it stayed in the temp folder for good)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.Popen([sys.executable, str(SR_SCRIPT), "--tinyTestPredictor", "in.nrrd", "out.nrrd"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _cache_folders(tmp) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert _cache_folders(tmp), "the command must make its compile cache folder in the temp folder"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "SIGTERM" in err
    assert list(tmp.iterdir()) == [], "a cancelled command must leave nothing in the temp folder"


def test_own_torch_cache_marks_its_folder_with_its_process(tmp_path, monkeypatch):
    from DiffusionCore.cli.missing import own_torch_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with own_torch_cache() as folder:
        owner = (Path(folder) / OWNER_FILE).read_text(encoding="utf-8").split()
        assert owner == [str(os.getpid()), os.uname().nodename]
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    assert not Path(folder).exists()


def test_the_next_job_removes_a_killed_commands_compile_cache_folder(tmp_path):
    """A command killed outright (SIGKILL after the grace period) leaves its folder: the next job removes it, but
    never the folder of a command that runs, nor one without the marker."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        host = os.uname().nodename
        stale, alive, unmarked = (tmp_path / f"{TORCH_CACHE_PREFIX}{n}" for n in ("stale", "alive", "unmarked"))
        for folder in (stale, alive, unmarked):
            folder.mkdir()
        (stale / OWNER_FILE).write_text(f"{dead.pid} {host}\n")
        (alive / OWNER_FILE).write_text(f"{sleeper.pid} {host}\n")
        removed = jobs.remove_stale_job_folders(tmp_path)
        assert removed == [str(stale)] and not stale.exists()
        assert alive.is_dir() and unmarked.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


# -- defect 1: a result whose input node is gone keeps its patient and study in a DICOM export ---------------------
import pydicom  # noqa: E402
from CTDiffusionSRLib import mrml_io  # noqa: E402
from CTDiffusionSRLib.jobs import remove_node_and_helpers  # noqa: E402
from CTDiffusionSRLib.testing import DicomDatabaseStandIn, load_dicom_node  # noqa: E402

from DiffusionCore.errors import InputError  # noqa: E402


def _patient_series(folder: Path, make_phantom, **extra) -> list[str]:
    """A thick CT series of patient PX-42 (Doe^Jane), one file per slice; ``extra``: more attributes."""
    from conftest import write_dicom_series

    thick = make_phantom(shape=(6, 24, 24), spacing=(0.8, 0.8, 4.0), origin=(5.0, -3.0, 40.0))
    write_dicom_series(folder, thick)
    files = sorted(str(f) for f in folder.iterdir())
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.PatientName, ds.SeriesDescription, ds.SeriesNumber = "PX-42", "Doe^Jane", "Chest 4mm", 3
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
        for key, value in extra.items():
            setattr(ds, key, value)
        ds.save_as(f)
    return files


@pytest.fixture
def dicom_ct(scene, tmp_path, make_phantom, monkeypatch):
    """A CT node loaded from a DICOM series of patient PX-42 through (a stand-in of) Slicer's DICOM database."""
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    files = _patient_series(tmp_path / "thick", make_phantom)
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    node = load_dicom_node(scene, files, "CT chest", database, uids=uids)
    return node, files, database


def _result_of(scene, source, label: str = "SR x2"):
    """A result node made from ``source`` as the SR job makes it (what matters here is the provenance)."""
    vol = mrml_io.volume_from_node(source)
    result = mrml_io.add_volume_node(scene, vol, mrml_io.synthetic_name(source.GetName(), label), like=source)
    mrml_io.set_provenance(result, kind="super-resolution", model="sr-default", weights_sha256="ab" * 32,
                           settings={"factor": 2}, source=source, title=f"{label} (synthetic)",
                           recorded_input=mrml_io.recorded_input(source))  # fmt: skip
    return result


def _exported(node, folder: Path) -> pydicom.Dataset:
    mrml_io.export_result(node, str(folder), as_dicom=True)
    return pydicom.dcmread(sorted(folder.iterdir())[0])


def test_a_result_exported_after_its_input_was_removed_keeps_the_patient_and_study(scene, tmp_path, dicom_ct):
    """Probe 16: the series was written with an empty PatientID and PatientName in a new study, though the result
    recorded its input and the input's files were still in Slicer's DICOM database."""
    node, files, _ = dicom_ct
    source = pydicom.dcmread(files[0])
    result = _result_of(scene, node)
    remove_node_and_helpers(scene, node)
    assert mrml_io.source_node(result) is None
    written = _exported(result, tmp_path / "export")
    assert (written.PatientID, str(written.PatientName)) == ("PX-42", "Doe^Jane")
    assert written.StudyInstanceUID == source.StudyInstanceUID
    assert written.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert written.SeriesDescription == "SR x2 4mm from Chest 4mm (synthetic)"
    referenced = {item.ReferencedSOPInstanceUID for item in written.SourceImageSequence}
    assert referenced <= {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}


def test_the_sr_of_an_sr_result_is_exported_in_the_scans_patient_and_study(scene, tmp_path, dicom_ct):
    """The direct source of an SR of an SR result is a synthetic node without DICOM instances: the chain back to the
    DICOM CT must be followed, with the CT in the scene and after both are removed."""
    node, files, _ = dicom_ct
    first = _result_of(scene, node)
    second = _result_of(scene, first)
    written = _exported(second, tmp_path / "with_chain")
    assert written.PatientID == "PX-42" and written.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    # both steps, from the scan's series
    assert written.SeriesDescription == "SR x2 SR x2 4mm from Chest 4mm (synthetic)"
    remove_node_and_helpers(scene, first)
    remove_node_and_helpers(scene, node)
    written = _exported(second, tmp_path / "chain_removed")
    assert written.PatientID == "PX-42" and written.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID


def test_an_export_whose_input_series_cannot_be_found_says_so(scene, tmp_path, dicom_ct):
    """Nothing to find (the DICOM database no longer has the input's files): refused with what to do, not written as
    an anonymous new patient."""
    node, _, database = dicom_ct
    result = _result_of(scene, node)
    remove_node_and_helpers(scene, node)
    database.files.clear()
    with pytest.raises(InputError, match=r"'CT chest' .* no longer in the scene.*new patient.*NRRD or NIfTI"):
        mrml_io.export_result(result, str(tmp_path / "export"), as_dicom=True)
    assert not (tmp_path / "export").exists()
    mrml_io.export_result(result, str(tmp_path / "r.nrrd"))  # a file export needs no patient


def test_the_ct_made_from_a_dicom_radiograph_records_it_and_keeps_its_patient_once_it_is_removed(
    scene, tmp_path, monkeypatch
):
    from test_xray_slicer_scene import ONE_STAGE, _dicom_file, _shown
    from XrayToCTLib import XrayJob

    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    path = _dicom_file(tmp_path / "cr.dcm", _shown(), "CR", "PX-42")
    node = load_dicom_node(scene, [path], "chest PA", database, uids=["1.2.826.0.1.3680043.8.498.77"])
    job = XrayJob(scene, node, ONE_STAGE)
    assert job.run(timeout=300).value == "completed", job.error
    result = job.result_nodes[0]
    assert result.GetAttribute(mrml_io.ATTR_INPUT_UID) == "1.2.826.0.1.3680043.8.498.77"
    remove_node_and_helpers(scene, node)
    written = _exported(result, tmp_path / "export")
    assert written.PatientID == "PX-42"
    assert written.StudyInstanceUID == pydicom.dcmread(path).StudyInstanceUID


# -- defect 3: the series' dates and times are local, with their offset from UTC ------------------------------------
from DiffusionCore.dicom_out import DicomSource  # noqa: E402
from DiffusionCore.dicom_out import write_dicom_series as write_series  # noqa: E402
from DiffusionCore.provenance import Provenance  # noqa: E402


def _written(folder: Path, vol, prov: Provenance, source: DicomSource | None = None) -> list[pydicom.Dataset]:
    write_series(vol, folder, prov, source=source)
    return [pydicom.dcmread(f) for f in sorted(folder.iterdir())]


def test_dicom_dates_and_times_are_local_with_their_offset_from_utc(tmp_path, make_phantom, tokyo):
    """Probe 16: made at 01:38 on 7 December in Tokyo (16:38 UTC on the 6th), the series said 20261206 163811 with no
    offset: DICOM reads DA/TM as local time, so it appeared made the day before."""
    prov = Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {"factor": 2}, date="2026-12-06T16:38:11+00:00")
    first = _written(tmp_path / "out", make_phantom(shape=(4, 16, 16)), prov)[0]
    for kind in ("Series", "Content", "InstanceCreation"):
        assert (first.data_element(f"{kind}Date").value, first.data_element(f"{kind}Time").value) == (
            "20261207", "013811")
    assert first.TimezoneOffsetFromUTC == "+0900"
    # an input that gives its own offset: one offset holds for the whole instance (the study's times are copied)
    from conftest import write_dicom_series

    thick = make_phantom(shape=(4, 16, 16))
    files = write_dicom_series(tmp_path / "ny", thick)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.TimezoneOffsetFromUTC = "-0500"
        ds.save_as(f)
    first = _written(tmp_path / "out_ny", thick, prov, DicomSource.from_files(files))[0]
    assert (first.SeriesDate, first.SeriesTime, first.TimezoneOffsetFromUTC) == ("20261206", "113811", "-0500")


# -- defect 5: names in any script are kept, whatever the input's character set ---------------------------------
def test_text_outside_the_inputs_character_set_is_kept(tmp_path, make_phantom, recwarn):
    """Probe 16: a Latin-1 (ISO_IR 100) input series and a node named "Thorax Müller 胸部": pydicom warned 24 times and
    wrote "??" for the Chinese characters. The series is written in UTF-8, the input's names decoded and re-encoded."""
    from conftest import write_dicom_series

    thick = make_phantom(shape=(4, 16, 16), spacing=(0.8, 0.8, 4.0))
    files = write_dicom_series(tmp_path / "latin1", thick)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.StudyDescription = "Müller^Jürgen", "Thorax für Ärzte"
        ds.save_as(f)
    prov = Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {"factor": 2}, input="Thorax Müller 胸部")
    written = _written(tmp_path / "out", thick, prov, DicomSource.from_files(files))
    assert not [w for w in recwarn if "Failed to encode" in str(w.message)]
    again = pydicom.dcmread(sorted((tmp_path / "out").iterdir())[0])  # read back from the bytes
    for ds in (written[0], again):
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert "from Thorax Müller 胸部 by" in ds.ImageComments
        assert str(ds.PatientName) == "Müller^Jürgen" and ds.StudyDescription == "Thorax für Ärzte"


# -- defect 4: every derived series of a study has a number of its own -------------------------------------------
def _numbered_series(folder: Path, make_phantom, study_uid: str, series_uid: str, number: int) -> list[str]:
    from conftest import write_dicom_series

    files = write_dicom_series(folder, make_phantom(shape=(4, 16, 16), spacing=(0.8, 0.8, 4.0)), study_uid=study_uid,
                               series_uid=series_uid)  # fmt: skip
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesNumber = number
        ds.save_as(f)
    return [str(f) for f in files]


def test_derived_series_of_one_study_get_distinct_series_numbers(tmp_path, make_phantom):
    """Probe 16: an SR series and its uncertainty map, and the same result exported twice, were all series 1003."""
    study = "1.2.826.0.1.3680043.8.498.160"
    files = _numbered_series(tmp_path / "src", make_phantom, study, f"{study}.1", 3)
    source = DicomSource.from_files(files)
    vol = make_phantom(shape=(4, 16, 16))
    prov = Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {"factor": 2})
    numbers = [_written(tmp_path / f"out{i}", vol, prov, source)[0].SeriesNumber for i in range(3)]
    assert numbers == [1003, 1004, 1005]
    # the study's series in the folder read are taken too (an earlier session's export, retrieved with the study)
    other = "1.2.826.0.1.3680043.8.498.161"
    files = _numbered_series(tmp_path / "study" / "src", make_phantom, other, f"{other}.1", 3)
    _numbered_series(tmp_path / "study" / "sr", make_phantom, other, f"{other}.2", 1003)
    source = DicomSource.from_path(tmp_path / "study", series_uid=f"{other}.1")
    assert _written(tmp_path / "out_study", vol, prov, source)[0].SeriesNumber == 1004


class _StudyDatabase(DicomDatabaseStandIn):
    """The DICOM database with the calls that list a study's series (ctkDICOMDatabase's names)."""

    def seriesForStudy(self, study_uid):  # noqa: N802
        return sorted({str(pydicom.dcmread(f).SeriesInstanceUID) for f in self.files.values()
                       if str(pydicom.dcmread(f).StudyInstanceUID) == study_uid})  # fmt: skip

    def filesForSeries(self, series_uid):  # noqa: N802
        return [f for f in self.files.values() if str(pydicom.dcmread(f).SeriesInstanceUID) == series_uid]

    def fileValue(self, file, tag):  # noqa: N802
        group, element = (int(part, 16) for part in tag.split(","))
        return str(pydicom.dcmread(file).get((group, element)).value)


def test_an_export_in_slicer_takes_a_series_number_no_series_of_the_study_in_the_database_has(
    scene, tmp_path, make_phantom, monkeypatch
):
    database = _StudyDatabase()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    study = "1.2.826.0.1.3680043.8.498.162"
    files = _numbered_series(tmp_path / "src", make_phantom, study, f"{study}.1", 3)
    earlier = _numbered_series(tmp_path / "sr", make_phantom, study, f"{study}.2", 1003)  # an earlier session's
    database.files.update({str(pydicom.dcmread(f).SOPInstanceUID): f for f in earlier})
    node = load_dicom_node(scene, files, "CT", database, uids=[str(pydicom.dcmread(f).SOPInstanceUID) for f in files])
    assert _exported(_result_of(scene, node), tmp_path / "export").SeriesNumber == 1004


# -- defect 7: a result whose input was deleted while the job ran goes where the input was -----------------------
def _study_with(scene, node):
    sh = mrml_io.subject_hierarchy(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Doe^Jane"), "CT THORAX 2026-12-01")
    sh.CreateItem(study, node)
    return sh, study


def test_a_result_whose_input_was_deleted_while_the_job_ran_stays_in_the_inputs_study(scene, tmp_path, monkeypatch):
    """Probe 16: the result landed at the scene's top level, out of the patient's study, which was still there."""
    from CTDiffusionSRLib.sr_logic import SRJob, SRSettings
    from CTDiffusionSRLib.testing import phantom_ct
    from test_xray_slicer_scene import ONE_STAGE, _radiograph_node, _shown
    from XrayToCTLib import XrayJob

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ct = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    sh, study = _study_with(scene, ct)
    job = SRJob(scene, ct, SRSettings(factor=4, axis="z", device="cpu", tiny_test_predictor=True,
                                      adapt_to_scan=False)).start()  # fmt: skip
    remove_node_and_helpers(scene, ct)
    assert job.wait(timeout=240).value == "completed", job.error
    assert sh.GetItemParent(sh.GetItemByDataNode(job.result_nodes[0])) == study
    radiograph = _radiograph_node(scene, _shown())
    sh, study = _study_with(scene, radiograph)
    job = XrayJob(scene, radiograph, ONE_STAGE).start()
    remove_node_and_helpers(scene, radiograph)
    assert job.wait(timeout=300).value == "completed", job.error
    assert sh.GetItemParent(sh.GetItemByDataNode(job.result_nodes[0])) == study
    # the study deleted as well: the scene's top level
    ct = mrml_io.add_volume_node(scene, phantom_ct(), "CT_02")
    sh, study = _study_with(scene, ct)
    job = SRJob(scene, ct, SRSettings(factor=4, axis="z", device="cpu", tiny_test_predictor=True,
                                      adapt_to_scan=False)).start()  # fmt: skip
    remove_node_and_helpers(scene, ct)
    sh.RemoveItem(study)
    assert job.wait(timeout=240).value == "completed", job.error
    assert sh.GetItemParent(sh.GetItemByDataNode(job.result_nodes[0])) == sh.GetSceneItemID()


# -- defect 6: a CT generated from a CT topogram does not take the scout's acquisition attributes -----------------
def test_a_ct_generated_from_a_topogram_does_not_copy_its_kvp_kernel_or_position(tmp_path, make_phantom):
    """Probe 16: the synthetic CT of the ct-topogram sample carried KVP 120, ConvolutionKernel T20s, BodyPartExamined
    CHEST and PatientPosition FFS of the scout; an SR series still takes them from its CT."""
    from conftest import write_dicom_series

    acquisition = {"KVP": "120", "ConvolutionKernel": "T20s", "BodyPartExamined": "CHEST", "PatientPosition": "FFS"}
    files = write_dicom_series(tmp_path / "scout", make_phantom(shape=(1, 16, 16)))
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        for key, value in acquisition.items():
            setattr(ds, key, value)
        ds.save_as(f)
    source = DicomSource.from_files(files)
    vol = make_phantom(shape=(4, 16, 16))
    xray = Provenance("xray2ct", "CT from radiograph (synthetic)", "w", "0" * 64, {})
    made = _written(tmp_path / "xray", vol, xray, source)[0]
    assert made.PatientID == source.header.PatientID  # the patient is still the scout's
    assert [made.get(key) or "" for key in acquisition] == ["", "", "", ""]  # type 2 ones present, empty
    sr = Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {"factor": 2})
    thin = _written(tmp_path / "sr", vol, sr, source)[0]
    assert {key: str(thin.get(key)) for key in acquisition} == acquisition


# -- defect 9: the X-ray job says that its radiograph or reference CT was deleted while it ran --------------------
def test_the_xray_job_says_that_its_radiograph_or_reference_was_deleted_while_it_ran(scene, tmp_path, monkeypatch):
    """Probe 16: "completed '' []", no notice, and scores against a reference no longer in the scene; the SR job says
    "'CT big' was deleted while the job ran; ...". The X-ray job says the same."""
    from test_xray_slicer_scene import ONE_STAGE, _radiograph_node, _reference_ct, _shown
    from XrayToCTLib import XrayJob

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    radiograph = _radiograph_node(scene, _shown(), "chest PA")
    reference = _reference_ct(scene, "LIDC ref")
    job = XrayJob(scene, radiograph, ONE_STAGE, reference_node=reference).start()
    remove_node_and_helpers(scene, radiograph)
    remove_node_and_helpers(scene, reference)
    assert job.wait(timeout=300).value == "completed", job.error
    assert job.notices == [
        "'chest PA' was deleted while the job ran; the result was made from it as it was when the job started, and "
        "records its name.",
        "The reference CT 'LIDC ref' was deleted while the job ran; the scores compare the result with it as it was "
        "when the job started.",
    ]
    assert job.reference_metrics  # scored against the reference as it was handed over


# -- defect 8: result names are given again once free, and say "(synthetic)" once --------------------------------
def test_a_result_name_is_given_again_once_free_and_a_result_of_a_result_says_synthetic_once(scene):
    """Probe 16: after 15 results were deleted the next was "CT chest SR x2 (synthetic)_15" (Slicer's counter only
    grows; the X-ray module reused free names), and the SR of that result was named "CT chest SR x2 (synthetic)_15 SR
    x2 (synthetic)"."""
    from CTDiffusionSRLib.testing import phantom_ct

    vol = phantom_ct(shape=(4, 16, 16))
    name = mrml_io.synthetic_name("CT chest", "SR x2")
    nodes = [mrml_io.add_volume_node(scene, vol, name) for _ in range(3)]
    assert [n.GetName() for n in nodes] == [name, f"{name}_1", f"{name}_2"]
    remove_node_and_helpers(scene, nodes[0])
    assert mrml_io.add_volume_node(scene, vol, name).GetName() == name
    for node in nodes[1:]:
        remove_node_and_helpers(scene, node)
    assert mrml_io.add_volume_node(scene, vol, name).GetName() == f"{name}_1"
    assert mrml_io.synthetic_name(name, "SR x2") == "CT chest SR x2 SR x2 (synthetic)"
    assert mrml_io.synthetic_name(f"{name}_15", "SR x2") == "CT chest SR x2_15 SR x2 (synthetic)"
