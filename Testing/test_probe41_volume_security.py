"""Probe 41: what a crafted input can make the volume reader read.

* A detached header (MetaImage ``.mhd`` ``ElementDataFile``, NRRD ``.nhdr`` ``data file:``) whose data file lies
  outside the header's folder (``../``, an absolute path, a ``LIST`` naming one, a link out of the folder) is refused
  before any voxel is read, unless ``DIFFUSIONCORE_ALLOW_DATA_OUTSIDE=1``; one whose data file is no regular file
  (``/dev/zero``, a FIFO) is always refused.
* A FIFO never hangs a run: given as the input, inside a folder searched for volumes, inside a DICOM folder.
* A folder search follows links to folders, but not one to ``/``, to the folder searched or one holding it, or
  into ``/proc``.
* An enhanced CT, and a Deflated DICOM file, is checked against ``DIFFUSIONCORE_MEMORY_LIMIT`` from its header
  before its pixels are decoded (or its data inflated).

The cases that would hang with the old code run in a subprocess with a timeout, so that they fail instead.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array

from DiffusionCore.errors import InputError, ResourceError
from DiffusionCore.volume import read_volume

ROOT = Path(__file__).resolve().parents[1]
SIZES = (32, 32, 8)  # x y z of the phantom
SUBPROCESS_TIMEOUT = 60


def raw_ct(path: Path) -> Path:
    """A small CT phantom (int16 HU, little endian) as headerless raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ct_phantom_array((SIZES[2], SIZES[1], SIZES[0])).astype("<i2").tobytes())
    return path


def nhdr(path: Path, data_file: str, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 32 32 8\nspacings: 1 1 4\nencoding: raw\n"
                    f"endian: little\ndata file: {data_file}\n{extra}")  # fmt: skip
    return path


def mhd(path: Path, data_file: str, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 32 32 8\nElementSpacing = 1 1 4\n"
                    f"ElementType = MET_SHORT\nElementByteOrderMSB = False\nElementDataFile = {data_file}\n{extra}")
    return path


def in_subprocess(code: str, env: dict | None = None) -> dict:
    """Run ``code`` (which prints one JSON line last) in a fresh interpreter; a hang fails the test."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=full_env,
                           timeout=SUBPROCESS_TIMEOUT)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {SUBPROCESS_TIMEOUT} s (a FIFO opened, or a search of the whole disk)")
    assert r.returncode == 0, r.stderr
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "stderr": r.stderr}


READ = """
import json, sys
from DiffusionCore.volume import read_volume
try:
    vol = read_volume(sys.argv[1] if len(sys.argv) > 1 else {path!r})
    print(json.dumps({{"error": None, "shape": list(vol.shape)}}))
except Exception as exc:
    print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
"""


# -- finding 1: data files outside the header's folder, or no regular file ---------------------------------------
def _no_voxels_read(monkeypatch):
    """Make any read of the voxels (the header's size check, ITK's read) fail the test."""
    import DiffusionCore.volume as volume

    def read(*args, **kwargs):
        raise AssertionError("the voxels were read")

    monkeypatch.setattr(volume, "_check_read_size", read)


@pytest.mark.parametrize("case", ["nhdr-up", "nhdr-absolute", "mhd-up", "mhd-list", "nhdr-list", "mhd-link"])
def test_a_header_whose_data_file_lies_outside_its_folder_is_refused_before_any_voxel_is_read(tmp_path, monkeypatch,
                                                                                               case):
    secret = raw_ct(tmp_path / "elsewhere" / "secret.raw")  # any file the user can read: /etc/shadow, a key
    beside = raw_ct(tmp_path / "headers" / "scan.raw")
    folder = tmp_path / "headers"
    if case == "nhdr-up":
        header = nhdr(folder / "h.nhdr", "../elsewhere/secret.raw")
    elif case == "nhdr-absolute":
        header = nhdr(folder / "h.nhdr", str(secret))
    elif case == "mhd-up":
        header = mhd(folder / "h.mhd", "../elsewhere/secret.raw")
    elif case == "mhd-list":  # slices from a list: the header's own slice, then the secret
        header = mhd(folder / "h.mhd", "LIST", f"{beside.name}\n{secret}\n")
    elif case == "nhdr-list":
        header = nhdr(folder / "h.nhdr", "LIST", f"{beside.name}\n../elsewhere/secret.raw\n")
    else:  # a link beside the header that leads out of its folder
        (folder / "link.raw").symlink_to(secret)
        header = mhd(folder / "h.mhd", "link.raw")
    monkeypatch.delenv("DIFFUSIONCORE_ALLOW_DATA_OUTSIDE", raising=False)
    _no_voxels_read(monkeypatch)
    with pytest.raises(InputError) as info:
        read_volume(header)
    message = str(info.value)
    assert str(header) in message and str(secret) in message and "outside the header's folder" in message
    assert "can make the tool read any file on this computer into a result" in message
    assert "Put the data file beside its header" in message and "DIFFUSIONCORE_ALLOW_DATA_OUTSIDE=1" in message


def test_a_numbered_pattern_out_of_the_folder_and_a_list_too_long_to_check_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSIONCORE_ALLOW_DATA_OUTSIDE", raising=False)
    _no_voxels_read(monkeypatch)
    for k in range(1, 9):
        (tmp_path / f"x{k:03d}.raw").write_bytes(bytes(2 * 32 * 32))
    for data_file in ("../x%03d.raw 1 8 1 2", "../x%03d.raw 1 900000 1 2"):  # listed, and too many to list
        with pytest.raises(InputError, match=r"x(001|%03d)\.raw, outside the header's folder"):
            read_volume(nhdr(tmp_path / "h" / "pattern.nhdr", data_file))
    names = "scan.raw\n" * 100_000 + "/etc/hostname\n"  # the names past those checked would be read unchecked
    with pytest.raises(InputError, match="its header lists more data files than can be checked"):
        read_volume(mhd(tmp_path / "h" / "long.mhd", "LIST", names))


def test_data_beside_the_header_or_below_its_folder_is_read_and_the_opt_in_reads_outside_with_a_warning(
        tmp_path, monkeypatch, diffusioncore_log):
    monkeypatch.delenv("DIFFUSIONCORE_ALLOW_DATA_OUTSIDE", raising=False)
    raw_ct(tmp_path / "h" / "scan.raw")
    raw_ct(tmp_path / "h" / "raw" / "scan.raw")
    secret = raw_ct(tmp_path / "elsewhere" / "secret.raw")
    expected = read_volume(nhdr(tmp_path / "h" / "a.nhdr", "scan.raw")).array
    np.testing.assert_array_equal(read_volume(mhd(tmp_path / "h" / "b.mhd", "raw/scan.raw")).array, expected)
    np.testing.assert_array_equal(read_volume(mhd(tmp_path / "h" / "c.mhd", "./raw/../scan.raw")).array, expected)
    assert not any("outside the header's folder" in r.getMessage() for r in diffusioncore_log)
    outside = nhdr(tmp_path / "h" / "up.nhdr", "../elsewhere/secret.raw")
    monkeypatch.setenv("DIFFUSIONCORE_ALLOW_DATA_OUTSIDE", "1")
    np.testing.assert_array_equal(read_volume(outside).array, expected)
    assert any(f"reads its voxel data from {secret}, outside the header's folder (allowed by "
               "DIFFUSIONCORE_ALLOW_DATA_OUTSIDE=1)" in r.getMessage() for r in diffusioncore_log)  # fmt: skip


@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_a_header_whose_data_file_is_no_regular_file_is_refused_even_with_the_opt_in(tmp_path, kind):
    folder = tmp_path / "h"
    folder.mkdir()
    if kind == "device":
        header, said = mhd(folder / "zero.mhd", "/dev/zero"), "a device"
    elif kind == "fifo":
        os.mkfifo(folder / "scan.raw")
        header, said = nhdr(folder / "fifo.nhdr", "scan.raw"), "a named pipe (FIFO)"
    else:
        (folder / "scan.raw").mkdir()
        header, said = mhd(folder / "dir.mhd", "scan.raw"), "a folder"
    got = in_subprocess(READ.format(path=str(header)), env={"DIFFUSIONCORE_ALLOW_DATA_OUTSIDE": "1"})
    assert got["error"] == "InputError", got
    assert f"could not read {header}" in got["message"] and f"which is {said}, not a regular file" in got["message"]


def test_sr_refuses_a_header_that_reads_a_file_outside_its_folder_and_writes_nothing(tmp_path):
    secret = raw_ct(tmp_path / "private" / "secret.raw")
    header = mhd(tmp_path / "received" / "scan.mhd", "LIST", f"{secret}\n")
    out = tmp_path / "out" / "sr.nii.gz"
    out.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "DIFFUSIONCORE_ALLOW_DATA_OUTSIDE"}
    r = subprocess.run(
        [sys.executable, "-m", "DiffusionCore", "sr", str(header), str(out), "--tiny-test-model", "--device", "cpu",
         "--factor", "2", "--progress", "none"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DIFFUSIONCORE_CACHE": str(tmp_path / "c")},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"its header reads its voxel data from {secret}, outside the header's folder" in r.stderr
    assert "Traceback" not in r.stderr
    assert list(out.parent.iterdir()) == []


# -- finding 2: FIFOs never hang a run --------------------------------------------------------------------------
COLLECT = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
from DiffusionCore.inputs import collect_volumes
try:
    print(json.dumps({{"error": None, "found": [str(p) for p in collect_volumes({path!r})]}}))
except Exception as exc:
    print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
"""


def test_a_fifo_given_as_the_input_is_refused_without_being_opened(tmp_path):
    for name in ("IM0001", "ct.nii.gz", "cases.txt"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        got = in_subprocess(READ.format(path=str(fifo)))
        assert got["error"] == "InputError" and f"could not read {fifo}: it is a named pipe (FIFO)" in got["message"]
        got = in_subprocess(COLLECT.format(path=str(fifo)))
        assert got["error"] == "InputError", got
        assert f"{fifo} is a named pipe (FIFO), not a regular file" in got["message"]


def test_a_fifo_inside_a_searched_folder_is_skipped_and_one_in_a_dicom_folder_is_named(tmp_path, dicom_series_writer,
                                                                                       make_phantom):
    from DiffusionCore.volume import write_volume

    batch = tmp_path / "batch"
    batch.mkdir()
    volume = make_phantom(shape=(8, 32, 32))
    write_volume(volume, batch / "a.nii.gz")
    os.mkfifo(batch / "IM0001")  # an extension-less name, as DICOM files are named: sniffed for the DICM marker
    series = tmp_path / "cohort" / "series"
    dicom_series_writer(series, volume)
    os.mkfifo(series / "IM0009")
    got = in_subprocess(COLLECT.format(path=str(batch)))
    assert got["error"] is None and got["found"] == [str(batch / "a.nii.gz")], got
    assert f"skipped {batch / 'IM0001'}: it is a named pipe (FIFO), not a regular file" in got["stderr"]
    got = in_subprocess(COLLECT.format(path=str(tmp_path / "cohort")))
    assert got["error"] is None and got["found"] == [str(series)], got
    got = in_subprocess(READ.format(path=str(series)))
    assert got["error"] == "InputError", got
    assert f"{series / 'IM0009'} is a named pipe (FIFO), not a regular file" in got["message"]


# -- finding 3: links that would make a folder search cover the whole disk ---------------------------------------
def test_a_folder_search_does_not_follow_links_to_the_root_an_ancestor_itself_or_proc(tmp_path):
    cohort = tmp_path / "cohort"
    elsewhere = tmp_path / "studies" / "p1"
    elsewhere.mkdir(parents=True)
    raw_ct(elsewhere / "scan.raw")
    mhd(elsewhere / "ct.mhd", "scan.raw")
    (cohort / "own").mkdir(parents=True)
    raw_ct(cohort / "own" / "scan.raw")
    mhd(cohort / "own" / "ct.mhd", "scan.raw")
    (cohort / "p1").symlink_to(elsewhere)  # a cohort of links to studies elsewhere: followed
    links = {"root": Path("/"), "parent": tmp_path, "grandparent": tmp_path.parent, "again": cohort,
             "proc": Path("/proc")}  # fmt: skip
    for name, target in links.items():
        (cohort / name).symlink_to(target)
    got = in_subprocess(COLLECT.format(path=str(cohort)))
    assert got["error"] is None, got
    assert got["found"] == [str(cohort / "own" / "ct.mhd"), str(cohort / "p1" / "ct.mhd")], got
    for name in links:
        assert got["stderr"].count(f"did not follow the symbolic link {cohort / name}:") == 1, got["stderr"]
    assert "it links to the file system's root (/)" in got["stderr"]
    assert f"it links to {tmp_path}, which holds the folder searched ({cohort})" in got["stderr"]
    assert f"it links back to the folder searched ({cohort})" in got["stderr"]
    assert "it links into /proc, a virtual file system" in got["stderr"]


# -- finding 4: enhanced and Deflated DICOM files against the memory limit ---------------------------------------
def deflated_enhanced_ct(path: Path, rows: int, cols: int, frames: int) -> Path:
    """An enhanced CT of zero pixels in the Deflated Explicit VR Little Endian transfer syntax, written a chunk at a
    time (as /tmp/probe41/dbomb/mkdbomb.py makes one, without holding its pixels): a few kB on disk."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.sequence import Sequence
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared, orientation, measures, transform = Dataset(), Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 5
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(frames):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, 5.0 * k]
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    head, body = DicomBytesIO(), DicomBytesIO()
    for fp in (head, body):
        fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(head, meta)
    write_dataset(body, ds)
    n = rows * cols * frames * 2
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + head.getvalue())
        f.write(deflate.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n)))
        for start in range(0, n, len(zeros)):
            f.write(deflate.compress(zeros[: min(len(zeros), n - start)]))
        f.write(deflate.flush())
    return path


def test_an_enhanced_ct_too_large_for_the_memory_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    import pydicom

    path = deflated_enhanced_ct(tmp_path / "ct.dcm", 256, 256, 16)  # 1M voxels: 2 MB inflated, ~20 MB to decode
    reads = []
    real_dcmread = pydicom.dcmread

    def dcmread(*args, **kwargs):
        reads.append(kwargs.get("stop_before_pixels", False))
        return real_dcmread(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", "12M")
    with pytest.raises(ResourceError) as info:
        read_volume(path)
    assert f"reading the enhanced CT {path} (16 frames of 256x256 pixels) needs about" in str(info.value)
    assert "DIFFUSIONCORE_MEMORY_LIMIT allows" in str(info.value)
    assert reads and all(reads), "the pixels were read before the memory check"
    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", "1G")
    assert read_volume(path).shape == (16, 256, 256)  # within the limit it is read


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc")
def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path):
    path = deflated_enhanced_ct(tmp_path / "bomb.dcm", 2048, 2048, 48)  # 384 MiB of pixels in about 400 kB
    assert path.stat().st_size < 1_000_000
    code = f"""
import json
from DiffusionCore.volume import read_volume
try:
    read_volume({str(path)!r})
    error, message = None, ""
except Exception as exc:
    error, message = type(exc).__name__, str(exc)
# this process's peak (VmHWM): ru_maxrss would count the forked copy of the test process
rss_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"error": error, "message": message, "rss_kb": rss_kb}}))
"""
    got = in_subprocess(code, env={"DIFFUSIONCORE_MEMORY_LIMIT": "200M"})
    assert got["error"] == "ResourceError", got
    assert f"reading {path} (a Deflated DICOM file whose data inflate to more than" in got["message"]
    assert "Export it with an uncompressed or JPEG transfer syntax instead of Deflated" in got["message"]
    assert got["rss_kb"] < 350_000, got  # the interpreter and its imports; inflating it took over 800 MB
