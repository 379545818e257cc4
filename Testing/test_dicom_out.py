"""DICOM in, DICOM out, labelled synthetic; provenance in NRRD, NIfTI (+ JSON sidecar) and the report.

Through the real ``sr`` command (subprocesses, the tiny test predictor) on a DICOM series written by
SimpleITK; the output is read back by pydicom, by SimpleITK (through the project's reader) and checked by
``dciodvfy`` (dicom3tools) when it is installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import rotation_matrix, write_dicom_series

from DiffusionCore.dicom_out import write_dicom_series as write_series
from DiffusionCore.errors import OutputError
from DiffusionCore.provenance import Provenance
from DiffusionCore.volume import Volume, read_volume

ROOT = Path(__file__).resolve().parents[1]


def _sr(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "sr", *map(str, argv), "--tiny-test-model",
                           "--device", "cpu"], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
                          cwd=ROOT, timeout=300)  # fmt: skip


@pytest.fixture
def thick_series(tmp_path, make_phantom) -> tuple[Path, Volume]:
    vol = make_phantom(shape=(8, 32, 32), spacing=(0.9, 0.9, 4.0), origin=(-14.0, -20.0, 100.0),
                       direction=rotation_matrix((0.2, 1.0, 0.1), 12.0))  # fmt: skip
    folder = tmp_path / "thick"
    write_dicom_series(folder, vol)
    for f in sorted(folder.iterdir()):  # what a scanner adds: patient, study and window
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.StudyDescription = "Doe^Jane", "P-0042", "CHEST"
        ds.SeriesDescription, ds.SeriesNumber = "Thorax 4mm", 3
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.77"
        ds.save_as(f)
    return folder, vol


def _dicom_files(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted(folder.iterdir())]


def test_a_thick_dicom_series_becomes_a_thin_synthetic_series(tmp_path, thick_series):
    source, thick = thick_series
    before = {f.name: f.read_bytes() for f in source.iterdir()}
    out = tmp_path / "thin"
    done = _sr(source, out, "--factor", "2", "--report", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    assert {f.name: f.read_bytes() for f in source.iterdir()} == before  # the input is untouched

    files = _dicom_files(out)
    assert len(files) == 16
    src = pydicom.dcmread(sorted(source.iterdir())[0])
    series = {ds.SeriesInstanceUID for ds in files}
    assert len(series) == 1 and series != {src.SeriesInstanceUID}
    assert len({ds.SOPInstanceUID for ds in files}) == 16
    src_instances = {pydicom.dcmread(f).SOPInstanceUID for f in source.iterdir()}
    for ds in files:
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.PatientName == "Doe^Jane" and ds.PatientID == "P-0042"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert ds.SeriesDescription == "SR x2 2mm from Thorax 4mm (synthetic)"
        assert "SYNTHETIC" in ds.ImageComments and "not acquired" in ds.ImageComments
        assert "tiny-test" in ds.DerivationDescription and '"factor":2' in ds.DerivationDescription
        assert ds.Manufacturer == "CTDiffusion" and ds.SoftwareVersions
        assert ds.SOPInstanceUID.startswith(pydicom.uid.PYDICOM_ROOT_UID)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in src_instances
        assert (ds.WindowCenter, ds.WindowWidth) == (-600, 1500)
        assert float(ds.SliceThickness) == pytest.approx(2.0) and float(ds.SpacingBetweenSlices) == pytest.approx(2.0)
        assert ds.pixel_array.dtype == np.int16 and float(ds.RescaleSlope) == 1.0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["provenance"]["synthetic"] is True and report["provenance"]["title"] == "SR x2 (synthetic)"
    assert report["provenance"]["input_uid"] == src.SeriesInstanceUID

    # the same result written as NIfTI: geometry equal within 0.01 mm, voxels within 1 HU
    nii = tmp_path / "thin.nii.gz"
    assert _sr(source, nii, "--factor", "2").returncode == 0
    a, b = read_volume(out), read_volume(nii)
    assert a.shape == b.shape
    assert np.abs(np.subtract(a.origin, b.origin)).max() < 0.01
    assert np.abs(np.subtract(a.spacing, b.spacing)).max() < 0.01
    assert np.abs(a.direction - b.direction).max() < 1e-4
    assert np.abs(a.array - b.array).max() <= 1.0
    # SimpleITK's own series reader agrees
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(out)))
    img = reader.Execute()
    assert np.abs(np.subtract(img.GetOrigin(), b.origin)).max() < 0.01
    assert thick.shape[0] * 2 == img.GetSize()[2]


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed: apt-get install dicom3tools")
def test_dciodvfy_finds_no_error(tmp_path, thick_series):
    source, _ = thick_series
    out = tmp_path / "thin"
    assert _sr(source, out, "--factor", "2").returncode == 0
    for f in sorted(out.iterdir())[:3]:
        check = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors


def test_output_format_choices_and_refusals(tmp_path, thick_series, make_phantom):
    source, _ = thick_series
    as_file = tmp_path / "res"
    as_file.mkdir()
    done = _sr(source, as_file, "--factor", "2", "--output-format", "file")
    assert done.returncode == 0, done.stderr
    assert [p.name for p in as_file.iterdir()] == ["thick.nii.gz", "thick.json"] or \
        sorted(p.name for p in as_file.iterdir()) == ["thick.json", "thick.nii.gz"]

    nifti = tmp_path / "ct.nii.gz"
    from DiffusionCore.volume import write_volume

    write_volume(make_phantom(shape=(8, 32, 32), spacing=(0.9, 0.9, 4.0)), nifti)
    series = tmp_path / "from-nifti"
    refused = _sr(nifti, series, "--factor", "2", "--output-format", "dicom")  # no patient: refused (probe 39)
    assert refused.returncode == 2 and "--patient-id ID --patient-name NAME" in refused.stderr, refused.stderr
    assert not series.exists()
    done = _sr(nifti, series, "--factor", "2", "--output-format", "dicom", "--patient-id", "RES-1")
    assert done.returncode == 0, done.stderr
    first = _dicom_files(series)[0]
    assert first.PatientID == "RES-1" and first.SeriesDescription == "SR x2 2mm (synthetic)"

    again = _sr(source, series, "--factor", "2")
    assert again.returncode == 4 and "already holds a DICOM series" in again.stderr and "--overwrite" in again.stderr
    old = {p.name for p in series.iterdir()}
    replaced = _sr(source, series, "--factor", "2", "--overwrite")
    assert replaced.returncode == 0 and {p.name for p in series.iterdir()} == old
    assert _dicom_files(series)[0].PatientID == "P-0042"

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    refused = _sr(source, busy, "--factor", "2", "--output-format", "dicom", "--overwrite")
    assert refused.returncode == 4 and "holds other files" in refused.stderr
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    inside = _sr(source, source / "thin", "--factor", "2")
    assert inside.returncode == 4 and not (source / "thin").exists()


def test_a_batch_of_series_becomes_one_synthetic_series_folder_per_input(tmp_path, thick_series, make_phantom):
    source, thick = thick_series
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copytree(source, batch / "chest")
    write_dicom_series(batch / "second", make_phantom(shape=(6, 24, 24), spacing=(0.8, 0.8, 3.0)))
    out = tmp_path / "thin"
    done = _sr(batch, out, "--factor", "2", "--output-format", "dicom")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["chest", "second"]
    chest, second = _dicom_files(out / "chest"), _dicom_files(out / "second")
    assert len(chest) == 2 * thick.shape[0] and len(second) == 12
    assert {ds.PatientID for ds in chest} == {"P-0042"}  # each series keeps its own input's patient and study
    assert {ds.SeriesDescription for ds in chest} == {"SR x2 2mm from Thorax 4mm (synthetic)"}
    assert {ds.SeriesDescription for ds in second} == {"SR x2 1.5mm (synthetic)"}
    assert {ds.SeriesInstanceUID for ds in chest}.isdisjoint({ds.SeriesInstanceUID for ds in second})
    assert read_volume(out / "second").shape == (12, 24, 24)


def test_a_failed_write_leaves_no_partial_series(tmp_path, make_phantom, monkeypatch):
    vol = make_phantom(shape=(6, 16, 16), spacing=(1.0, 1.0, 2.0))
    prov = Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {"factor": 2})
    calls = []
    real_save = pydicom.Dataset.save_as

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing)
    with pytest.raises(OutputError, match=r"the disk holding \S+ is full \(.* free; .*\): free some space there or "
                       "write to another folder"):  # as for volume files
        write_series(vol, tmp_path / "series", prov)
    assert list(tmp_path.iterdir()) == []

    shear = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sheared = Volume(vol.array, direction=shear / np.linalg.norm(shear, axis=0))  # unit columns, not at 90 degrees
    monkeypatch.setattr(pydicom.Dataset, "save_as", real_save)
    with pytest.raises(OutputError, match="sheared.*NRRD"):
        write_series(sheared, tmp_path / "series", prov)


def test_provenance_in_nrrd_and_nifti(tmp_path, make_phantom):
    from DiffusionCore.volume import write_volume

    nifti = tmp_path / "ct.nii.gz"
    write_volume(make_phantom(shape=(8, 32, 32), spacing=(0.9, 0.9, 4.0)), nifti)
    nrrd = tmp_path / "thin.nrrd"
    assert _sr(nifti, nrrd, "--factor", "2").returncode == 0
    header = nrrd.read_bytes().split(b"\n\n", 1)[0].decode()
    assert "ctdiffusion_synthetic:=true" in header and "ctdiffusion_title:=SR x2 (synthetic)" in header
    assert "ctdiffusion_weights_sha256:=" in header and "ctdiffusion_input:=" in header
    img = sitk.ImageFileReader()
    img.SetFileName(str(nrrd))
    img.ReadImageInformation()
    assert img.GetMetaData("ctdiffusion_task") == "sr"

    out = tmp_path / "thin.nii.gz"
    assert _sr(nifti, out, "--factor", "2").returncode == 0
    assert nib.load(out).header["descrip"].tobytes().startswith(b"SYNTHETIC SR x2 CTDiffusion sha256:")
    side = json.loads((tmp_path / "thin.json").read_text())["provenance"]
    assert side["synthetic"] is True and side["input"].endswith("ct.nii.gz") and side["settings"]["factor"] == 2


def test_slicer_reads_the_written_series_as_one_volume(tmp_path, thick_series):
    """Slicer's DICOM plugin loads a scalar volume through the archetype reader (GDCM) used here; slicer-core
    has no DICOM database, so the import into one is not exercised."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed")
    source, _ = thick_series
    out = tmp_path / "thin"
    assert _sr(source, out, "--factor", "2").returncode == 0
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(sorted(out.iterdir())[0]))
    assert storage.ReadData(node)
    dims = node.GetImageData().GetDimensions()
    assert dims == (32, 32, 16)
    ours = read_volume(out)
    spacing = node.GetSpacing()
    assert np.allclose(spacing, ours.spacing, atol=0.01)
    ras_origin = np.array(node.GetOrigin())
    lps = np.array([-1.0, -1.0, 1.0]) * ras_origin
    assert np.abs(lps - np.array(ours.origin)).max() < 0.01


def _dicom_radiograph(path: Path) -> Path:
    """A small DX radiograph (MONOCHROME2) with patient and study, written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    yy, xx = np.mgrid[0:96, 0:96]
    image = (1000 + 2000 * np.exp(-(((xx - 48) / 30.0) ** 2 + ((yy - 48) / 38.0) ** 2))).astype(np.uint16)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID, ds.SeriesDescription = "DX", "Roe^Ann", "P-9", "Chest PA"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [3.6, 3.6]
    ds.PixelData = image.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _xray2ct(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "xray2ct", *map(str, argv), "--tiny-test-model",
                           "--device", "cpu"], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env=env, cwd=ROOT, timeout=300)  # fmt: skip


def test_xray2ct_writes_a_synthetic_ct_series_in_the_radiographs_study(tmp_path):
    radiograph = _dicom_radiograph(tmp_path / "pa.dcm")
    before = radiograph.read_bytes()
    out = tmp_path / "ct"
    done = _xray2ct(radiograph, out, "--report", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    assert radiograph.read_bytes() == before
    src = pydicom.dcmread(radiograph)
    files = _dicom_files(out)
    assert len(files) == read_volume(out).shape[0] >= 16
    for ds in files:
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == "P-9"
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.Modality == "CT"
        assert ds.FrameOfReferenceUID != src.FrameOfReferenceUID  # a generated CT is not in the radiograph's space
        assert ds.SeriesDescription == "CT from radiograph Chest PA (synthetic)"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert "SYNTHETIC" in ds.ImageComments and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["provenance"]["task"] == "xray2ct" and report["provenance"]["input_uid"] == src.SOPInstanceUID
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(sorted(out.iterdir())[0])], capture_output=True, text=True)
        assert [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")] == []

    nifti = tmp_path / "ct.nii.gz"
    assert _xray2ct(radiograph, nifti).returncode == 0
    assert json.loads((tmp_path / "ct.json").read_text())["provenance"]["title"] == "CT from radiograph (synthetic)"
    png_like = _xray2ct(radiograph, tmp_path / "again", "--output-format", "file")
    assert png_like.returncode == 4 and "again" in png_like.stderr  # a file output needs a volume suffix


def test_stamping_a_file_written_elsewhere(tmp_path, make_phantom):
    """What Slicer's Save hands over: the provenance is added in place, voxels untouched; files that are not
    what their suffix says are refused with the file's name, and formats without header fields are left as
    they are."""
    from DiffusionCore.results import stamp_provenance

    prov = Provenance("sr", "SR x2 (synthetic)", "sr-default", "cd" * 32, {"factor": 2})
    vol = make_phantom(shape=(4, 16, 16), spacing=(1.0, 1.0, 2.0))
    mha = tmp_path / "saved.mha"
    sitk.WriteImage(sitk.GetImageFromArray(vol.array.astype(np.int16)), str(mha))
    assert stamp_provenance(mha, prov) and stamp_provenance(mha, prov)
    header = mha.read_bytes()[:3000].decode("latin-1")
    assert header.count("ctdiffusion_synthetic = true") == 1 and header.index("ctdiffusion") < header.index("ElementDataFile")
    assert np.array_equal(read_volume(mha).array, vol.array.astype(np.int16))

    fake = tmp_path / "broken.nii"
    fake.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(OutputError, match="broken.nii"):
        stamp_provenance(fake, prov)
    with pytest.raises(OutputError, match="no such file"):
        stamp_provenance(tmp_path / "missing.nrrd", prov)
    other = tmp_path / "saved.vtk"
    other.write_bytes(b"# vtk DataFile")
    assert stamp_provenance(other, prov) is False and other.read_bytes() == b"# vtk DataFile"


@pytest.mark.parametrize("name", ["out.nrrd", "out.mha", "out.nii.gz", "dicom"])
def test_the_provenance_is_read_back_from_every_format_written(tmp_path, make_phantom, thick_series, name):
    """How a result loaded from a file later (3D Slicer's Add Data, another session) is recognised as synthetic:
    what each writer recorded comes back, and a file that records nothing, or cannot be read, is not a result."""
    from DiffusionCore.provenance import read_provenance
    from DiffusionCore.results import dicom_source_for, write_result
    from DiffusionCore.volume import write_volume

    series, _ = thick_series

    prov = Provenance("sr", "SR x2 (synthetic)", "sr-default", "cd" * 32, {"factor": 2, "adapt": {"steps": 400}},
                      input="thick.nrrd", input_uid="1.2.3", date="2026-12-05T10:00:00+00:00")
    if name == "dicom":  # a title holding " from " itself, as the X-ray to CT one does
        prov = dataclasses.replace(prov, task="xray2ct", title="CT from radiograph (synthetic)")
        written = write_result(read_volume(series), tmp_path / "series", prov, as_dicom=True,
                               dicom_source=dicom_source_for(series))
        path = sorted(Path(written[0]).iterdir())[0]
    else:
        path = write_result(make_phantom(shape=(4, 16, 16), spacing=(1.0, 1.0, 2.0)), tmp_path / name, prov)[0]
    back = read_provenance(path)
    assert back is not None
    assert (back.title, back.weights, back.weights_sha256, back.task) == (prov.title, "sr-default", "cd" * 32, prov.task)
    assert back.settings == prov.settings and back.input == "thick.nrrd" and back.date == prov.date
    assert back.input_uid == "1.2.3"  # the input's series (SR) or radiograph (X-ray to CT), DICOM results too

    if name.endswith(".nii.gz"):  # without its sidecar the 80-byte descrip still says what it is
        (tmp_path / "out.json").unlink()
        bare = read_provenance(path)
        assert bare.title == "SR x2 (synthetic)" and "cd" * 6 == bare.weights_sha256
        (tmp_path / "out.json").write_text("{not json")
        assert read_provenance(path).title == "SR x2 (synthetic)"

    plain = tmp_path / ("plain" + (name if name != "dicom" else ".dcm"))
    if name == "dicom":
        shutil.copy(sorted(series.iterdir())[0], plain)  # an acquired CT slice
    else:
        write_result(make_phantom(shape=(4, 16, 16)), plain, prov)
        write_volume(read_volume(plain), plain, overwrite=True)  # rewritten by a writer that records nothing
        for side in tmp_path.glob("plain*.json"):
            side.unlink()
    assert read_provenance(plain) is None
    broken = tmp_path / ("broken" + (name if name != "dicom" else ".dcm"))
    broken.write_bytes(b"\x00" * 40)
    assert read_provenance(broken) is None and read_provenance(tmp_path / "missing.nrrd") is None
    assert read_provenance(None) is None
