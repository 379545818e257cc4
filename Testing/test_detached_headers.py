"""Detached volume headers (NRRD ``.nhdr`` ``data file:``, MetaImage ``.mhd`` ``ElementDataFile``): their data
files are inputs that no output may overwrite, and a data file outside the header's folder is refused unless
``DIFFUSIONCORE_ALLOW_DATA_OUTSIDE=1`` (then named in a warning; see test_probe41_volume_security.py).

The command-line cases run ``python -m DiffusionCore sr`` in a subprocess on real files in ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array

from DiffusionCore.errors import InputError, OutputError
from DiffusionCore.files import refuse_overwriting_inputs
from DiffusionCore.volume import detached_data_files, read_volume

ROOT = Path(__file__).resolve().parents[1]
SIZES = (32, 32, 8)  # x y z of the phantom, thick along z


def raw_ct(path: Path) -> Path:
    """A small CT phantom (int16 HU, little endian) as headerless raw bytes."""
    arr = ct_phantom_array((SIZES[2], SIZES[1], SIZES[0])).astype("<i2")
    path.write_bytes(arr.tobytes())
    return path


def nhdr(path: Path, data_file: str, extra: str = "") -> Path:
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 32 32 8\nspacings: 1 1 4\nencoding: raw\n"
                    f"endian: little\ndata file: {data_file}\n{extra}")  # fmt: skip
    return path


def mhd(path: Path, data_file: str, extra: str = "") -> Path:
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 32 32 8\nElementSpacing = 1 1 4\n"
                    f"ElementType = MET_SHORT\nElementDataFile = {data_file}\n{extra}")  # fmt: skip
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_sr(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DIFFUSIONCORE_CACHE": str(out.parent / "cache")}
    argv = ["sr", str(src), str(out), "--device", "cpu", "--no-adapt", "--factor", "2", "--progress", "none", *extra]
    return subprocess.run([sys.executable, "-m", "DiffusionCore", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)  # fmt: skip


def test_detached_data_files_lists_single_list_and_pattern_data_files(tmp_path):
    d = tmp_path
    assert detached_data_files(nhdr(d / "a.nhdr", "a.raw")) == [d / "a.raw"]
    assert detached_data_files(nhdr(d / "b.nhdr", "LIST 2", "s0.raw\ns1.raw\n")) == [d / "s0.raw", d / "s1.raw"]
    assert detached_data_files(nhdr(d / "c.nhdr", "s%02d.raw 1 5 2 2")) == [d / "s01.raw", d / "s03.raw", d / "s05.raw"]
    assert detached_data_files(nhdr(d / "e.nrrd", "../up/e.raw")) == [d / "../up/e.raw"]
    assert detached_data_files(mhd(d / "f.mhd", "f.raw")) == [d / "f.raw"]
    assert detached_data_files(mhd(d / "g.mhd", "LIST 2D", "g0.raw\ng1.raw\n")) == [d / "g0.raw", d / "g1.raw"]
    assert detached_data_files(mhd(d / "h.mhd", "LOCAL")) == []
    attached = d / "i.nrrd"  # data after the blank line: no data file, whatever the voxels' bytes say
    attached.write_bytes(b"NRRD0004\ntype: short\ndimension: 1\nsizes: 2\nencoding: raw\n\ndata file: x\n")
    assert detached_data_files(attached) == []
    assert detached_data_files(d / "missing.nhdr") == []
    assert detached_data_files(d) == []


def test_refuse_overwriting_inputs_counts_the_data_files_of_detached_headers(tmp_path):
    header = nhdr(tmp_path / "vol.nhdr", "LIST", "s0.raw\ns1.raw\n")
    for name in ("s0.raw", "s1.raw"):
        (tmp_path / name).write_bytes(b"x")
    refuse_overwriting_inputs([header], [("the output", tmp_path / "new.nrrd")])
    with pytest.raises(OutputError, match=r"is the input .*s1\.raw \(the voxel data that the header .*vol\.nhdr reads\)"):
        refuse_overwriting_inputs([header], [("the output", tmp_path / "s1.raw")])


@pytest.mark.parametrize("header_of", [nhdr, mhd], ids=["nhdr", "mhd"])
def test_sr_refuses_to_overwrite_the_data_file_of_a_detached_header_even_with_overwrite(tmp_path, header_of):
    data = raw_ct(tmp_path / "data.nrrd")  # the data file, named like an allowed output
    header = header_of(tmp_path / f"vol{'.nhdr' if header_of is nhdr else '.mhd'}", "data.nrrd")
    before = digest(data)
    r = run_sr(header, data, "--overwrite")
    assert r.returncode == 4, r.stderr
    assert "is the input" in r.stderr and "voxel data that the header" in r.stderr and "Traceback" not in r.stderr
    assert digest(data) == before


def test_a_data_file_outside_the_header_folder_is_refused_unless_allowed_then_named_in_a_warning(tmp_path, caplog,
                                                                                                  monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "headers").mkdir()
    data = raw_ct(tmp_path / "elsewhere" / "scan.raw")
    inside = raw_ct(tmp_path / "headers" / "scan.raw")
    monkeypatch.delenv("DIFFUSIONCORE_ALLOW_DATA_OUTSIDE", raising=False)
    headers = (nhdr(tmp_path / "headers" / "up.nhdr", "../elsewhere/scan.raw"),
               nhdr(tmp_path / "headers" / "abs.nhdr", str(data)),
               mhd(tmp_path / "headers" / "up.mhd", "../elsewhere/scan.raw"))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="DiffusionCore.volume"):
        read_volume(nhdr(tmp_path / "headers" / "inside.nhdr", "scan.raw"))
        assert "outside the header's folder" not in caplog.text
        for header in headers:
            with pytest.raises(InputError, match=f"reads its voxel data from {data}, outside the header's folder"):
                read_volume(header)
    monkeypatch.setenv("DIFFUSIONCORE_ALLOW_DATA_OUTSIDE", "1")
    with caplog.at_level(logging.WARNING, logger="DiffusionCore.files"):
        for header in headers:
            caplog.clear()
            vol = read_volume(header)
            assert f"reads its voxel data from {data}, outside the header's folder" in caplog.text
            np.testing.assert_array_equal(vol.array, read_volume(tmp_path / "headers" / "inside.nhdr").array)
    assert inside.exists()
    monkeypatch.delenv("DIFFUSIONCORE_ALLOW_DATA_OUTSIDE")
    r = run_sr(tmp_path / "headers" / "up.nhdr", tmp_path / "out.nrrd")
    assert r.returncode == 2, r.stderr
    assert f"reads its voxel data from {data}, outside the header's folder" in r.stderr
    assert not (tmp_path / "out.nrrd").exists()
    r = subprocess.run([sys.executable, "-m", "DiffusionCore", "sr", str(tmp_path / "headers" / "up.nhdr"),
                        str(tmp_path / "out.nrrd"), "--device", "cpu", "--no-adapt", "--factor", "2", "--progress",
                        "none"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                            "DIFFUSIONCORE_CACHE": str(tmp_path / "cache"), "DIFFUSIONCORE_ALLOW_DATA_OUTSIDE": "1"})
    assert r.returncode == 0, r.stderr
    assert f"reads its voxel data from {data}, outside the header's folder" in r.stderr
