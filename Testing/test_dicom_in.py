"""Reading DICOM more fully: compressed classic series (RLE, JPEG 2000, JPEG lossless) through the project's reader, and
enhanced multi-frame CT files (geometry from their functional groups), with clear errors for what is not a
volume."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import rotation_matrix, write_dicom_series
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, RLELossless, generate_uid

from DiffusionCore.dicom_in import is_enhanced_ct, read_enhanced_ct
from DiffusionCore.errors import InputError
from DiffusionCore.volume import Volume, read_volume


def _compressed_copy(src, dst, syntax, **kwargs):
    dst.mkdir()
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        ds.compress(syntax, **kwargs)
        ds.save_as(dst / f.name)


def _jpeg_lossless_copy(src, dst):
    """Each slice's pixels encoded as JPEG lossless (process 14, selection value 1) by GDCM, the encoder at
    hand (pydicom has none for this syntax), and grafted into the original file so every other tag stays."""
    import SimpleITK as sitk

    dst.mkdir()
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        scratch = dst / f"{f.name}.gdcm"
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.SetFileName(str(scratch))
        writer.Execute(sitk.GetImageFromArray(ds.pixel_array))
        encoded = pydicom.dcmread(scratch)
        scratch.unlink()
        assert encoded.file_meta.TransferSyntaxUID == JPEGLosslessSV1
        ds.PixelData = encoded.PixelData
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.save_as(dst / f.name, enforce_file_format=True)


@pytest.mark.parametrize("syntax", ["rle", "j2k", "jpeg-lossless"])
def test_compressed_series_read_like_the_uncompressed_one(tmp_path, make_phantom, syntax):
    vol = make_phantom(shape=(5, 64, 64), spacing=(0.7, 0.7, 2.5))
    plain = tmp_path / "plain"
    write_dicom_series(plain, vol)
    packed = tmp_path / syntax
    if syntax == "rle":
        _compressed_copy(plain, packed, RLELossless)  # pydicom's own encoder
    elif syntax == "j2k":
        pytest.importorskip("openjpeg", reason="the JPEG 2000 encoder (pylibjpeg-openjpeg) makes the test file")
        _compressed_copy(plain, packed, JPEG2000Lossless, encoding_plugin="pylibjpeg")
    else:
        _jpeg_lossless_copy(plain, packed)
    first = pydicom.dcmread(sorted(packed.iterdir())[0])
    expected = {"rle": RLELossless, "j2k": JPEG2000Lossless, "jpeg-lossless": JPEGLosslessSV1}[syntax]
    assert first.file_meta.TransferSyntaxUID == expected
    a, b = read_volume(plain), read_volume(packed)
    assert b.shape == a.shape and np.array_equal(a.array, b.array)
    assert np.allclose(a.origin, b.origin) and np.allclose(a.spacing, b.spacing)


def _enhanced_ct(path, vol: Volume, *, order=None, drop_position=None, intercept=-1024.0):
    """Write ``vol`` as an Enhanced CT Image Storage file (one frame per z slice, in ``order``)."""
    n = vol.shape[0]
    order = list(range(n)) if order is None else order
    d = vol.direction
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = vol.shape[1], vol.shape[2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    measures, orientation, transform = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = [vol.spacing[1], vol.spacing[0]]
    measures.SliceThickness = vol.spacing[2]
    orientation.ImageOrientationPatient = [float(v) for v in (*d[:, 0], *d[:, 1])]
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, intercept, "HU"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        item = Dataset()
        if k != drop_position:
            position = Dataset()
            position.ImagePositionPatient = [float(v) for v in np.asarray(vol.origin) + k * vol.spacing[2] * d[:, 2]]
            item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    stored = np.rint(vol.array[order] - intercept).astype("<u2")
    ds.PixelData = stored.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_an_enhanced_ct_is_read_with_the_geometry_of_its_functional_groups(tmp_path, make_phantom):
    vol = make_phantom(shape=(6, 20, 24), spacing=(0.75, 0.8, 2.0), origin=(-12.0, 30.0, 55.0),
                       direction=rotation_matrix((1.0, 0.3, 0.2), 15.0))  # fmt: skip
    folder = tmp_path / "series"
    folder.mkdir()
    path = _enhanced_ct(folder / "enhanced.dcm", vol, order=[3, 0, 5, 1, 4, 2])  # frames stored out of order
    assert is_enhanced_ct(path) and not is_enhanced_ct(folder)
    for given in (path, folder):  # the file, or the folder that holds it, as a user gives either
        back = read_volume(given)
        assert back.shape == vol.shape and back.metadata["enhanced_ct"]
        assert np.allclose(back.spacing, vol.spacing) and np.allclose(back.origin, vol.origin, atol=1e-4)
        assert np.allclose(back.direction, vol.direction, atol=1e-6)
        assert np.abs(back.array - np.rint(vol.array)).max() == 0


def test_an_enhanced_ct_without_positions_or_with_a_missing_frame_is_refused(tmp_path, make_phantom):
    vol = make_phantom(shape=(6, 16, 16), spacing=(1.0, 1.0, 2.0))
    no_position = _enhanced_ct(tmp_path / "a.dcm", vol, drop_position=2)
    with pytest.raises(InputError, match="without frame positions"):
        read_enhanced_ct(no_position)
    gap = _enhanced_ct(tmp_path / "b.dcm", vol, order=[0, 1, 2, 4, 5, 3])
    ds = pydicom.dcmread(gap)
    del ds.PerFrameFunctionalGroupsSequence[5]  # frame 3 gone: a 4 mm gap
    ds.NumberOfFrames = 5
    ds.PixelData = ds.PixelData[: 5 * 16 * 16 * 2]
    ds.save_as(gap)
    with pytest.raises(InputError, match="not evenly spaced"):
        read_enhanced_ct(gap)


def test_sr_takes_an_enhanced_ct_and_writes_a_classic_synthetic_series(tmp_path, make_phantom):
    import os
    import subprocess
    import sys
    from pathlib import Path

    vol = make_phantom(shape=(6, 32, 32), spacing=(0.8, 0.8, 4.0))
    folder = tmp_path / "enhanced"
    folder.mkdir()
    _enhanced_ct(folder / "ct.dcm", vol)
    out = tmp_path / "thin"
    done = subprocess.run([sys.executable, "-m", "DiffusionCore", "sr", str(folder), str(out), "--factor", "2",
                           "--tiny-test-model", "--device", "cpu"], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=Path(__file__).resolve().parents[1], timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(list(out.iterdir())) == 12 and read_volume(out).shape == (12, 32, 32)
