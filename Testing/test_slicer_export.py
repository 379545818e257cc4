"""Exporting a module's result from the scene with its provenance (real MRML nodes from slicer-core).

Slicer's DICOM export does not carry the synthetic label, so the modules export through DiffusionCore's
writer: a DICOM series labelled synthetic with the input's patient and study, or NRRD/NIfTI with the
provenance fields. Slicer's own Save of a result node keeps them too: the file is stamped after the write.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CTDiffusionSR") not in sys.path:
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))

from conftest import save_scene, write_dicom_series  # noqa: E402
from CTDiffusionSRLib import mrml_io  # noqa: E402

from DiffusionCore.errors import InputError  # noqa: E402
from DiffusionCore.volume import read_volume  # noqa: E402


@pytest.fixture
def scene_with_result(tmp_path, make_phantom):
    thick = make_phantom(shape=(6, 24, 24), spacing=(0.8, 0.8, 4.0), origin=(5.0, -3.0, 40.0))
    series = tmp_path / "thick"
    write_dicom_series(series, thick)
    for f in series.iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.SeriesDescription = "P-7", "Chest 4mm"
        ds.save_as(f)
    scene = slicer.vtkMRMLScene()
    input_node = mrml_io.add_volume_node(scene, thick, "CT")
    thin = thick.with_array(thick.array)  # stands in for the SR result: the geometry is what matters here
    result = mrml_io.add_volume_node(scene, thin, mrml_io.synthetic_name("CT", "SR x2"), like=input_node)
    mrml_io.set_provenance(result, kind="super-resolution", model="sr-default", weights_sha256="ab" * 32,
                           settings={"factor": 2}, source=input_node, title="SR x2 (synthetic)")  # fmt: skip
    return scene, input_node, result, sorted(str(f) for f in series.iterdir()), thick


def test_export_as_dicom_keeps_the_label_and_the_input_identity(tmp_path, scene_with_result):
    scene, input_node, result, files, thick = scene_with_result
    out = tmp_path / "export"
    mrml_io.export_result(result, str(out), as_dicom=True, source_files=files)
    written = [pydicom.dcmread(f) for f in sorted(out.iterdir())]
    assert len(written) == 6
    first = written[0]
    assert first.SeriesDescription == "SR x2 4mm from Chest 4mm (synthetic)" and first.PatientID == "P-7"
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "SYNTHETIC" in first.ImageComments
    assert "sr-default" in first.DerivationDescription and "ab" * 32 in first.DerivationDescription
    assert first.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    back = read_volume(out)
    assert np.abs(np.subtract(back.origin, thick.origin)).max() < 0.01
    assert np.abs(back.array - np.rint(thick.array)).max() <= 1.0


def test_export_to_nrrd_and_nifti_carries_the_provenance(tmp_path, scene_with_result):
    scene, _, result, _, _ = scene_with_result
    nrrd = tmp_path / "result.nrrd"
    mrml_io.export_result(result, str(nrrd))
    header = nrrd.read_bytes().split(b"\n\n", 1)[0].decode()
    assert "ctdiffusion_synthetic:=true" in header and "ctdiffusion_weights:=sr-default" in header
    assert "ctdiffusion_input:=CT" in header
    nifti = tmp_path / "result.nii.gz"
    mrml_io.export_result(result, str(nifti))
    side = json.loads((tmp_path / "result.json").read_text())["provenance"]
    assert side["title"] == "SR x2 (synthetic)" and side["task"] == "sr"



@pytest.mark.parametrize("name", ["saved.nrrd", "saved.nhdr", "saved.mha", "saved.nii.gz"])
def test_slicers_own_save_of_a_result_keeps_the_provenance(tmp_path, scene_with_result, name):
    """Slicer's writer keeps no custom header fields; the result's storage node is watched and the file it
    has just written gets them (NRRD/MetaImage header fields; NIfTI descrip and JSON sidecar)."""
    scene, input_node, result, _, thick = scene_with_result
    storage = result.GetStorageNode()
    assert storage is not None
    path = tmp_path / name
    storage.SetFileName(str(path))
    assert storage.WriteData(result)
    back = read_volume(path)
    assert np.array_equal(back.array, thick.array.astype(back.array.dtype))  # the voxels are untouched
    assert np.abs(np.subtract(back.origin, thick.origin)).max() < 1e-4
    if name.endswith(".nii.gz"):
        import nibabel as nib

        assert bytes(nib.load(str(path)).header["descrip"]).startswith(b"SYNTHETIC SR x2 CTDiffusion sha256:")
        side = json.loads((tmp_path / "saved.json").read_text())["provenance"]
        assert side["synthetic"] is True and side["weights_sha256"] == "ab" * 32
    else:
        header = path.read_bytes()[:4000].decode("latin-1")
        sep = ":=" if ".n" in name else " = "
        assert f"ctdiffusion_synthetic{sep}true" in header and f"ctdiffusion_weights{sep}sr-default" in header
    # a second save (the user edits and saves again) is stamped again, once
    assert storage.WriteData(result)
    text = path.read_bytes()[:4000] if not name.endswith(".gz") else b""
    assert text.count(b"ctdiffusion_synthetic") == (0 if name.endswith(".gz") else 1)
    assert read_volume(path).shape == thick.shape

    # the input is not a result: Slicer's save of it stays as Slicer wrote it
    input_node.AddDefaultStorageNode()
    plain = tmp_path / "input.nrrd"
    input_node.GetStorageNode().SetFileName(str(plain))
    assert input_node.GetStorageNode().WriteData(input_node)
    assert b"ctdiffusion" not in plain.read_bytes()[:4000]


def test_only_results_are_exported_and_nothing_is_replaced_silently(tmp_path, scene_with_result):
    scene, input_node, result, _, _ = scene_with_result
    with pytest.raises(InputError, match="no provenance"):
        mrml_io.export_result(input_node, str(tmp_path / "ct.nrrd"))
    out = tmp_path / "export"
    with pytest.raises(InputError, match="'CT', which was not loaded from DICOM: it holds no patient or study"):
        mrml_io.export_result(result, str(out), as_dicom=True)  # no DICOM source known: a nameless new patient
    assert not out.exists()
    mrml_io.export_result(result, str(out), as_dicom=True, patient_id="P-8")  # the patient named: a new study
    from DiffusionCore.errors import OutputError

    with pytest.raises(OutputError, match="--overwrite"):
        mrml_io.export_result(result, str(out), as_dicom=True, patient_id="P-8")
    mrml_io.export_result(result, str(out), as_dicom=True, overwrite=True, patient_id="P-8")
    assert len(list(out.iterdir())) == 6


def test_export_replaces_only_what_the_save_dialog_confirmed(tmp_path, scene_with_result):
    """The Export result button: Qt's save dialog asks before it returns an existing file, so that file is
    replaced (exporting twice to result.nrrd failed with "already exists; pass --overwrite", a command-line flag,
    after the user had said Yes). A name that the filter's suffix was added to, and a DICOM folder, are not
    replaced: the message says to choose another name, not a flag."""
    from DiffusionCore.errors import OutputError

    _, _, result, _, _ = scene_with_result
    dicom, nrrd, nifti = (text for text, _suffix, _dicom in mrml_io.EXPORT_FILTERS)
    for name, chosen_filter in (("result.nrrd", nrrd), ("result.nii.gz", nifti)):
        first = mrml_io.export_chosen(result, str(tmp_path / name), chosen_filter)
        assert mrml_io.export_chosen(result, str(tmp_path / name), chosen_filter) == first
    assert read_volume(tmp_path / "result.nrrd").shape == mrml_io.volume_from_node(result).shape
    with pytest.raises(OutputError, match=r"result.nrrd already exists; choose another name in the export dialog\.$"):
        mrml_io.export_chosen(result, str(tmp_path / "result"), nrrd)  # the dialog was asked about "result"
    mrml_io.export_chosen(result, str(tmp_path / "series"), dicom, patient_id="P-8")  # its input holds no patient
    with pytest.raises(OutputError, match=r"already holds a DICOM series; choose another name in the export dialog\.$"):
        mrml_io.export_chosen(result, str(tmp_path / "series"), dicom, patient_id="P-8")


def test_a_result_finds_its_source_after_its_scene_is_imported_beside_other_volumes(tmp_path, scene_with_result):
    """The DICOM export takes the patient and study from the result's source scan, and the SR panel compares the
    result with it. The source was looked up by the node ID recorded in an attribute; importing the saved scene
    into a scene that already holds volumes renumbers the IDs, and that ID then named another scan (its patient's
    identity would have gone into the exported series). A node reference follows the renumbering."""
    scene, input_node, result, _, _ = scene_with_result
    assert mrml_io.source_node(result) is input_node
    save_scene(scene, (input_node, result), tmp_path / "study.mrml")
    other = slicer.vtkMRMLScene()
    for name in ("another patient", "and another"):
        mrml_io.add_volume_node(other, mrml_io.volume_from_node(input_node), name)
    other.SetURL(str(tmp_path / "study.mrml"))
    other.Import()
    imported = other.GetFirstNodeByName(result.GetName())
    # no node ID as text is kept, which an import renumbers (it named "another patient" here): the Data module
    # shows the input's name
    assert imported.GetAttribute(mrml_io.ATTR_SOURCE) is None
    assert imported.GetAttribute(mrml_io.ATTR_INPUT) == "CT"
    assert mrml_io.source_node(imported).GetName() == "CT"
    assert mrml_io.provenance_record(imported).input == "CT"  # what the exported files name as the input
    other.RemoveNode(mrml_io.source_node(imported))
    assert mrml_io.source_node(imported) is None


def test_a_result_loaded_with_a_saved_scene_keeps_its_provenance_when_saved_again(tmp_path, scene_with_result):
    """A result saved with the scene and loaded in a later session has its provenance attributes, but nothing
    watched its saves: saving it again (e.g. after an edit) wrote the image without the synthetic label. The
    modules now watch every scene loaded into Slicer's (at startup and when a panel opens)."""
    scene, input_node, result, _, _ = scene_with_result
    save_scene(scene, (input_node, result), tmp_path / "study.mrml")

    def load_and_save_again(watched: bool) -> str:
        later = slicer.vtkMRMLScene()  # Slicer's scene in the next session
        if watched:
            mrml_io.watch_results_of_loaded_scenes(later)
            mrml_io.watch_results_of_loaded_scenes(later)  # both modules call it: one watcher
        later.SetURL(str(tmp_path / "study.mrml"))
        later.Import()
        loaded = later.GetFirstNodeByName(result.GetName())
        assert mrml_io.provenance(loaded)["kind"] == "super-resolution"
        again = tmp_path / f"saved again {watched}.nrrd"
        loaded.GetStorageNode().SetFileName(str(again))
        assert loaded.GetStorageNode().WriteData(loaded)
        return again.read_bytes()[:4000].decode("latin-1")

    assert "ctdiffusion_synthetic:=true" not in load_and_save_again(watched=False)  # what happened before
    header = load_and_save_again(watched=True)
    assert header.count("ctdiffusion_synthetic:=true") == 1 and "ctdiffusion_input:=CT" in header


def test_the_export_dialog_choice_names_the_format():
    dicom, nrrd, nifti = (text for text, _suffix, _dicom in mrml_io.EXPORT_FILTERS)
    assert mrml_io.export_target("/data/thin", dicom) == ("/data/thin", True)
    assert mrml_io.export_target("/data/thin", nrrd) == ("/data/thin.nrrd", False)
    assert mrml_io.export_target("/data/thin.nrrd", nrrd) == ("/data/thin.nrrd", False)
    assert mrml_io.export_target("/data/thin", nifti) == ("/data/thin.nii.gz", False)
    assert mrml_io.export_target("/data/thin.mha", nifti) == ("/data/thin.mha", False)


def _load_file(scene, path: Path):
    """What Slicer's Add Data (and the DICOM browser's scalar volume plugin) does with a volume file."""
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    node = logic.AddArchetypeVolume(str(path), path.name.split(".")[0])
    assert node is not None and node.GetImageData() is not None
    return node


@pytest.mark.parametrize("name", ["thin.nrrd", "thin.nii.gz", "dicom"])
def test_a_result_loaded_from_its_file_is_labelled_synthetic(tmp_path, scene_with_result, make_phantom, name):
    """A result saved to a file (or written by ``python -m DiffusionCore sr``) and loaded in a later session on its
    own: Slicer's reader keeps none of the file's provenance, so the node was an unlabelled volume, its next save
    dropped the label from the file, and export refused it. Recognised from the file, it is labelled again."""
    scene, _, result, _, _ = scene_with_result
    if name == "dicom":
        mrml_io.export_result(result, str(tmp_path / "series"), as_dicom=True, patient_id="P-8")
        path = sorted((tmp_path / "series").iterdir())[0]
    else:
        path = tmp_path / name
        mrml_io.export_result(result, str(path))
    acquired = tmp_path / "acquired.nrrd"
    from DiffusionCore.volume import write_volume

    write_volume(make_phantom(shape=(6, 24, 24)), acquired)

    unwatched = slicer.vtkMRMLScene()  # what happened before
    assert mrml_io.provenance(_load_file(unwatched, path)) == {}

    later = slicer.vtkMRMLScene()
    mrml_io.watch_results_of_loaded_scenes(later)
    plain = _load_file(later, acquired)
    loaded = _load_file(later, path)
    assert mrml_io.provenance(plain) == {} and plain.GetName() == "acquired"
    info = mrml_io.provenance(loaded)
    assert (info["kind"], info["model"], info["weights_sha256"]) == ("super-resolution", "sr-default", "ab" * 32)
    assert info["settings"] == {"factor": 2}
    assert "synthetic" in loaded.GetName().lower() and loaded.GetDescription().startswith("SYNTHETIC")
    record = mrml_io.provenance_record(loaded)
    assert record.title == "SR x2 (synthetic)" and record.input == "CT"  # the input as the file recorded it
    assert mrml_io.source_node(loaded) is None  # no scan in the scene is taken for its source

    again = tmp_path / "saved again.nrrd"  # Slicer's own Save keeps the label now
    loaded.GetStorageNode().SetFileName(str(again))
    assert loaded.GetStorageNode().WriteData(loaded)
    header = again.read_bytes()[:4000].decode("latin-1")
    assert header.count("ctdiffusion_synthetic:=true") == 1 and "ctdiffusion_input:=CT" in header
    out = tmp_path / "exported"  # and export makes a new study of the patient named, labelled
    assert mrml_io.export_needs_patient(loaded)  # its input was not DICOM
    mrml_io.export_result(loaded, str(out), as_dicom=True, patient_id="P-9")
    first = pydicom.dcmread(sorted(out.iterdir())[0])
    assert first.SeriesDescription.startswith("SR x2 ") and first.SeriesDescription.endswith(" (synthetic)")
    assert first.PatientID == "P-9"


def test_results_loaded_before_the_modules_watched_are_recognised_when_a_panel_opens(tmp_path, scene_with_result):
    """Files loaded before Slicer's startup completed (e.g. given on its command line) are recognised when the
    watching starts, and an X-ray to CT result keeps its kind."""
    scene, _, result, _, _ = scene_with_result
    result.SetAttribute(mrml_io.ATTR_KIND, "xray-to-ct")
    result.SetAttribute(mrml_io.ATTR_TITLE, "CT from radiograph (synthetic)")
    path = tmp_path / "ct from radiograph (synthetic).nrrd"
    mrml_io.export_result(result, str(path))
    later = slicer.vtkMRMLScene()
    loaded = _load_file(later, path)
    assert mrml_io.provenance(loaded) == {}
    mrml_io.watch_results_of_loaded_scenes(later)
    assert mrml_io.provenance(loaded)["kind"] == "xray-to-ct"
    assert loaded.GetName() == "ct from radiograph (synthetic)"  # already says it: not renamed
