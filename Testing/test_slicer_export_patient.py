"""Export result... of a result whose input holds no patient (real MRML nodes from slicer-core, real files).

A result made from a CT loaded from NRRD or NIfTI, or from a PNG radiograph, has no DICOM series to take a patient
and study from. Its DICOM export was written with an empty PatientID and PatientName in a new study, without a word
(a PACS files such a series under an unknown patient). As the ``sr`` and ``xray2ct`` commands refuse it without
``--patient-id``, the export is refused unless the patient is named; the export dialog asks for the ID and the name.
A result of a DICOM series keeps that series' patient and study: naming another patient for it is refused.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pydicom
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CTDiffusionSR") not in sys.path:
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))

from conftest import write_dicom_series  # noqa: E402
from CTDiffusionSRLib import mrml_io  # noqa: E402
from CTDiffusionSRLib.jobs import remove_node_and_helpers  # noqa: E402
from CTDiffusionSRLib.testing import DicomDatabaseStandIn, load_dicom_node  # noqa: E402
from test_slicer_widgets import SaveDialog, widgets  # noqa: E402, F401 (the widgets fixture, used by name)

from DiffusionCore.errors import InputError  # noqa: E402

DICOM, NRRD, _NIFTI = (text for text, _suffix, _dicom in mrml_io.EXPORT_FILTERS)


def _result_of(scene, source, *, kind: str = "super-resolution", label: str = "SR x2"):
    """A result node made from ``source`` as the jobs make it (what matters here is the provenance)."""
    vol = mrml_io.volume_from_node(source)
    result = mrml_io.add_volume_node(scene, vol, mrml_io.synthetic_name(source.GetName(), label), like=source)
    mrml_io.set_provenance(result, kind=kind, model="sr-default", weights_sha256="ab" * 32, settings={"factor": 2},
                           source=source, title=f"{label} (synthetic)",
                           recorded_input=mrml_io.recorded_input(source))  # fmt: skip
    return result


@pytest.fixture
def nrrd_result(scene, make_phantom):
    """A result of a CT that was loaded from a file (no DICOM: no patient, no study)."""
    ct = mrml_io.add_volume_node(scene, make_phantom(shape=(6, 24, 24), spacing=(0.8, 0.8, 4.0)), "CT")
    return _result_of(scene, ct)


@pytest.fixture
def dicom_result(scene, tmp_path, make_phantom, monkeypatch):
    """A result of a CT loaded from a DICOM series of patient PX-42 through (a stand-in of) Slicer's DICOM database."""
    database = DicomDatabaseStandIn()
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    folder = tmp_path / "thick"
    write_dicom_series(folder, make_phantom(shape=(6, 24, 24), spacing=(0.8, 0.8, 4.0)))
    files = sorted(str(f) for f in folder.iterdir())
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.PatientName, ds.SeriesDescription = "PX-42", "Doe^Jane", "Chest 4mm"
        ds.save_as(f)
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    node = load_dicom_node(scene, files, "CT chest", database, uids=uids)
    return _result_of(scene, node), node, files, database


@pytest.mark.parametrize("kind", ["super-resolution", "xray-to-ct"])
def test_a_dicom_export_of_a_result_whose_input_holds_no_patient_is_refused(scene, tmp_path, make_phantom, kind):
    """It was written with an empty PatientID and PatientName in a study of its own, without a word."""
    source = mrml_io.add_volume_node(scene, make_phantom(shape=(6, 24, 24)), "chest" if kind == "xray-to-ct" else "CT")
    result = _result_of(scene, source, kind=kind, label="CT" if kind == "xray-to-ct" else "SR x2")
    out = tmp_path / "export"
    with pytest.raises(InputError) as refused:
        mrml_io.export_result(result, str(out), as_dicom=True)
    message = str(refused.value)
    assert message.startswith(f"'{result.GetName()}' was made from '{source.GetName()}', which was not loaded from "
                              "DICOM: it holds no patient or study, so a DICOM series would have no patient name or ID")
    assert "Enter the patient's ID (and name) when the export asks for them, export as NRRD or NIfTI" in message
    assert "load the scan from DICOM (DICOM module) and run again" in message
    with pytest.raises(InputError, match="which was not loaded from DICOM"):
        mrml_io.export_chosen(result, str(out), DICOM)  # the dialog's path
    assert not out.exists()
    assert mrml_io.export_needs_patient(result)
    mrml_io.export_chosen(result, str(tmp_path / "r.nrrd"), NRRD)  # a file holds no patient: none is needed


def test_a_result_file_whose_recorded_series_is_not_in_the_database_needs_a_patient(scene, tmp_path, nrrd_result):
    """A result loaded from its file records its input's DICOM series; Slicer's DICOM database not holding it, the
    series had been written as a nameless new study."""
    result = nrrd_result
    remove_node_and_helpers(scene, mrml_io.source_node(result))
    result.SetAttribute(mrml_io.ATTR_INPUT_UID, "1.2.826.0.1.3680043.8.498.77")
    assert mrml_io.export_needs_patient(result)
    with pytest.raises(InputError, match=r"records its input 'CT' \(DICOM 1\.2\.826\.0\.1\.3680043\.8\.498\.77\), "
                                         r"which Slicer's DICOM database does not hold.*no patient name or ID.*"
                                         r"Enter the patient's ID.*import that series into the DICOM database"):
        mrml_io.export_result(result, str(tmp_path / "export"), as_dicom=True)
    assert not (tmp_path / "export").exists()


def test_the_patient_named_is_the_series_patient_in_a_new_study(tmp_path, nrrd_result):
    out = tmp_path / "export"
    assert mrml_io.export_result(nrrd_result, str(out), as_dicom=True, patient_id=" PX-9 ", patient_name="Roe^Ann")
    files = [pydicom.dcmread(f) for f in sorted(out.iterdir())]
    assert len(files) == 6
    assert {(ds.PatientID, str(ds.PatientName)) for ds in files} == {("PX-9", "Roe^Ann")}
    studies = {ds.StudyInstanceUID for ds in files}
    assert len(studies) == 1 and pydicom.uid.UID(studies.pop()).is_valid
    for ds in files:  # the provenance is still there
        assert "SYNTHETIC" in ds.ImageComments and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "sr-default" in ds.DerivationDescription and "ab" * 32 in ds.DerivationDescription
    again = tmp_path / "again"  # each export is a study of its own; the dialog's path passes the patient on
    mrml_io.export_chosen(nrrd_result, str(again), DICOM, patient_id="PX-9")
    other = pydicom.dcmread(sorted(again.iterdir())[0])
    assert other.PatientID == "PX-9" and str(other.PatientName) == "" and other.StudyInstanceUID != files[0].StudyInstanceUID


def test_a_patient_named_wrongly_is_refused_before_anything_is_written(tmp_path, nrrd_result):
    out = tmp_path / "export"
    cases = [
        (dict(patient_name="Roe^Ann"), "A patient name was given without the patient's ID"),
        (dict(patient_id="PX\\9"), "The patient ID holds a backslash"),
        (dict(patient_id="   "), "The patient ID is empty"),
        (dict(patient_id="x" * 65), "The patient ID has 65 characters, and DICOM holds at most 64"),
        (dict(patient_id="PX-9", patient_name="A^B^C^D^E^F"), "The patient name has 6 parts separated by \\^"),
    ]
    for options, said in cases:
        with pytest.raises(InputError, match=said):
            mrml_io.export_result(nrrd_result, str(out), as_dicom=True, **options)
    with pytest.raises(InputError, match=r"for a DICOM export, and .*r\.nrrd is written as a volume file"):
        mrml_io.export_result(nrrd_result, str(tmp_path / "r.nrrd"), patient_id="PX-9")
    assert not out.exists() and not (tmp_path / "r.nrrd").exists()


def test_a_result_of_a_dicom_series_keeps_its_patient_and_another_named_is_refused(tmp_path, dicom_result):
    """The series joins its input's patient and study; a patient named for it would file it under the wrong one (as
    ``sr`` refuses ``--patient-id`` with a DICOM input)."""
    result, _, files, _ = dicom_result
    assert not mrml_io.export_needs_patient(result)
    out = tmp_path / "export"
    with pytest.raises(InputError, match=re.escape(result.GetName()) + "' derives from a DICOM series.*wrong one"):
        mrml_io.export_result(result, str(out), as_dicom=True, patient_id="PX-9", patient_name="Roe^Ann")
    assert not out.exists()
    mrml_io.export_result(result, str(out), as_dicom=True)
    first = pydicom.dcmread(sorted(out.iterdir())[0])
    assert (first.PatientID, str(first.PatientName)) == ("PX-42", "Doe^Jane")
    assert first.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID


def test_no_patient_is_asked_for_where_naming_one_would_not_help(scene, dicom_result):
    """Not a result (refused anyway), and a result of a DICOM series whose files are gone (refused with what to do:
    re-import the series)."""
    result, node, _, database = dicom_result
    assert not mrml_io.export_needs_patient(node)
    remove_node_and_helpers(scene, node)
    database.files.clear()
    assert not mrml_io.export_needs_patient(result)


# -- the Export result... dialog ------------------------------------------------------------------------------------
class TextDialog:
    """qt.QInputDialog.getText, answered in turn from ``answers`` (PythonQt returns "" for Cancel); the labels asked."""

    def __init__(self, *answers: str):
        self.answers, self.asked = list(answers), []

    def getText(self, parent, title, label, mode, text):  # noqa: N802 (Qt's name)
        self.asked.append(label)
        return self.answers.pop(0)


def _dialogs(widgets, answer: tuple[str, str], *texts: str) -> TextDialog:  # noqa: F811 (the stand-in fixture)
    qt = sys.modules["qt"]
    asked = TextDialog(*texts)
    qt.QFileDialog, qt.QInputDialog, qt.QLineEdit = SaveDialog, asked, types.SimpleNamespace(Normal=0)
    SaveDialog.answer = answer
    return asked


def test_the_export_dialog_asks_for_the_patient_only_of_a_dicom_series_whose_input_holds_none(
    widgets, tmp_path, nrrd_result, dicom_result  # noqa: F811 (the stand-in fixture)
):
    """Asked: the ID (Cancel writes nothing: the next test) and the name. Not asked: for a file, and for a result of a
    DICOM series (its own patient is kept)."""
    out = tmp_path / "series"
    asked = _dialogs(widgets, (str(out), DICOM), "PX-9", "Roe^Ann")
    widgets.exportResultWithDialog(nrrd_result)
    assert widgets.dialogs.errors == [] and len(asked.asked) == 2, widgets.dialogs.errors
    assert "was not loaded from DICOM" in asked.asked[0] and "Patient ID" in asked.asked[0]
    assert "Family^Given" in asked.asked[1]
    files = [pydicom.dcmread(f) for f in sorted(out.iterdir())]
    assert len(files) == 6 and {(ds.PatientID, str(ds.PatientName)) for ds in files} == {("PX-9", "Roe^Ann")}
    assert len(widgets.dialogs.infos) == 1
    assert widgets.dialogs.infos[0].startswith(f"Exported {nrrd_result.GetName()} to {out}")
    asked = _dialogs(widgets, (str(tmp_path / "r.nrrd"), NRRD))
    widgets.exportResultWithDialog(nrrd_result)
    assert (tmp_path / "r.nrrd").is_file() and asked.asked == []
    result = dicom_result[0]
    asked = _dialogs(widgets, (str(tmp_path / "dicom series"), DICOM))
    widgets.exportResultWithDialog(result)
    assert asked.asked == [] and widgets.dialogs.errors == [], widgets.dialogs.errors
    assert pydicom.dcmread(sorted((tmp_path / "dicom series").iterdir())[0]).PatientID == "PX-42"


def test_cancel_at_the_patient_id_writes_nothing(widgets, tmp_path, nrrd_result):  # noqa: F811
    out = tmp_path / "series"
    asked = _dialogs(widgets, (str(out), DICOM), "")
    widgets.exportResultWithDialog(nrrd_result)
    assert len(asked.asked) == 1 and not out.exists()
    assert widgets.dialogs.errors == [] and widgets.dialogs.infos == []
    asked = _dialogs(widgets, (str(out), DICOM), "PX\\9", "")  # an ID DICOM cannot hold: said, nothing written
    widgets.exportResultWithDialog(nrrd_result)
    assert not out.exists() and len(widgets.dialogs.errors) == 1
    assert widgets.dialogs.errors[0].startswith("Export failed: The patient ID holds a backslash")
