"""Probe 41 (security review): what a crafted radiograph, a training run and a result memory kept from the scene
could do.

1. A PNG decompression bomb given to ``xray2ct``: an 875 KB PNG of 30000x30000 pixels took the process to 7.4 GB
   before it was refused as blank (the memory check compares only with the free memory). A side over
   ``MAX_RADIOGRAPH_SIDE`` is now refused from the header, before any pixel is decoded.
2. ``train xray`` wrote the training files' names (``DOE_JOHN_MRN12345.nii.gz``) into the exported weights, which a
   user shares: they now count the volumes (and those passed over) and name only the project's samples, as ``train
   throughplane``'s do; the run folder's checkpoints keep the paths.
3. In the Slicer module, a finished result that memory kept from the scene was moved into the shared temp folder as
   ``"<node name> <stamp>.nrrd"``, mode 0644: it now goes to a private folder (mode 0700), the file mode 0600.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array

from DiffusionCore.cli.main import main
from DiffusionCore.errors import InputError
from DiffusionCore.volume import Volume, write_volume
from DiffusionCore.xray import radiograph
from DiffusionCore.xray.radiograph import read_radiograph

ROOT = Path(__file__).resolve().parents[1]


# -- 1. decompression bombs ---------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A well-formed 8-bit greyscale PNG of ``width`` x ``height`` black pixels: zeros compress about 1000 to 1, so
    20000x20000 pixels (400 MB decoded, and the float32 copies reading makes) are a 390 KB file. Compressed a row at a
    time (no whole image in memory here)."""
    packer, row = zlib.compressobj(9), b"\0" * (width + 1)  # each row: filter type 0, then its pixels
    data = b"".join([*(packer.compress(row) for _ in range(height)), packer.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))  # fmt: skip
    return path


def test_a_png_bomb_is_refused_from_its_header_quickly_and_in_little_memory(tmp_path):
    pytest.importorskip("resource")  # ru_maxrss: not on Windows
    bomb = _bomb_png(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 500_000
    script = textwrap.dedent("""
        import resource, sys, time
        from DiffusionCore.xray.radiograph import read_radiograph
        before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
        try:
            read_radiograph(sys.argv[1])
            print("read")
        except Exception as exc:
            print(type(exc).__name__, exc)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(f"GROWN {grown} SECONDS {time.monotonic() - t0:.2f}")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFUSIONCORE_MEMORY_LIMIT", None)
    done = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)  # fmt: skip
    lines = done.stdout.strip().splitlines()
    assert lines and lines[0].startswith("InputError bomb.png is 20000x20000 pixels by its header, more than the "
                                         "16384 pixels a side"), done.stdout + done.stderr
    assert "Export the radiograph at its acquired resolution" in lines[0]
    grown_kb, seconds = int(lines[-1].split()[1]), float(lines[-1].split()[3])
    scale = 1 if sys.platform != "darwin" else 1024  # ru_maxrss: KB on Linux, bytes on macOS
    assert grown_kb / scale < 300 * 1024, f"{grown_kb / scale / 1024:.0f} MB more memory to refuse it"
    assert seconds < 10


def test_the_side_cap_lets_a_long_narrow_image_at_the_cap_through_and_refuses_one_pixel_more(tmp_path):
    import SimpleITK as sitk

    side = radiograph.MAX_RADIOGRAPH_SIDE
    assert 6000 < side <= 16384  # room for a mammogram (about 6,000 pixels a side), not for a bomb
    strip = (np.random.default_rng(0).random((40, side)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(strip), str(tmp_path / "at_cap.png"))
    assert read_radiograph(tmp_path / "at_cap.png").array.shape == (40, side)
    wider = np.concatenate([strip, strip[:, :1]], axis=1)
    sitk.WriteImage(sitk.GetImageFromArray(wider), str(tmp_path / "over.png"))
    with pytest.raises(InputError, match=rf"over\.png is {side + 1}x40 pixels by its header, more than the {side}"):
        read_radiograph(tmp_path / "over.png")


def test_the_shipped_sample_radiograph_is_under_the_cap():
    from DiffusionCore.sampledata import sample_dir

    shoulder = sample_dir("shoulder-ap") / "monochrome2.dcm"
    if not shoulder.is_file():
        pytest.skip("the shoulder-ap sample is not in the cache here")
    assert read_radiograph(shoulder).array.shape == (3480, 4240)


# -- 2. train xray's exported weights name no user's file -----------------------------------------------------------
@pytest.mark.usefixtures("one_torch_thread")
def test_train_xray_weights_count_the_volumes_and_name_only_samples(tmp_path, monkeypatch, capsys):
    from DiffusionCore import sampledata
    from DiffusionCore.weights.registry import load_safetensors

    data = tmp_path / "Doe^Jane"
    data.mkdir()
    write_volume(Volume(ct_phantom_array((60, 64, 64), seed=3), (0.8, 0.8, 1.0)), data / "DOE_JOHN_MRN12345.nii.gz")
    write_volume(Volume(np.full((3, 64, 64), 40.0, np.float32), (0.8, 0.8, 2.5)), data / "SMITH_ANN_MRN777.nii.gz")
    samples = tmp_path / "samples"  # a project sample, as its fetched file (the real one is large)
    monkeypatch.setattr(sampledata, "sample_dir", lambda name: samples / name)
    sample = samples / "chest-lidc" / "cxr.nii.gz"
    sample.parent.mkdir(parents=True)
    write_volume(Volume(ct_phantom_array((60, 64, 64), seed=5), (0.8, 0.8, 1.0)), sample)
    out = tmp_path / "Doe^Jane runs" / "run"
    assert main(["train", "xray", "--config", "stage1", "--tiny-test-model", "--device", "cpu", "--output-dir",
                 str(out), "--data", str(data), str(sample), "--max-steps", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    weights = out / "xray_cascade.safetensors"
    raw = weights.read_bytes()
    for name in (b"DOE_JOHN", b"MRN12345", b"SMITH_ANN", b"MRN777", b"Doe^Jane", b"Jane", str(tmp_path).encode()):
        assert name not in raw, name
    _, meta = load_safetensors(weights)
    assert meta["data"] == ["chest-lidc"]
    assert int(meta["volumes"]) == 2 and int(meta["passed_over"]) == 1
    assert "for 2 steps on 2 CT volumes (chest-lidc, ...)" in meta["description"]
    # the run folder's checkpoint keeps the paths (local, like throughplane's summary.json)
    latest = json.loads((out / "latest.json").read_text())["checkpoint"]
    state = json.loads((out / latest / "state.json").read_text())
    assert str(data / "DOE_JOHN_MRN12345.nii.gz") in state["extra"]["data"]

    # a run started from these weights names them by their file name, not by the folders they are in
    again = tmp_path / "again"
    assert main(["train", "xray", "--config", "stage1", "--tiny-test-model", "--device", "cpu", "--output-dir",
                 str(again), "--data", str(sample), "--init-from", str(weights), "--max-steps", "1",
                 ]) == 0  # fmt: skip
    raw = (again / "xray_cascade.safetensors").read_bytes()
    assert b"Doe^Jane" not in raw and str(tmp_path).encode() not in raw
    _, meta = load_safetensors(again / "xray_cascade.safetensors")
    assert meta["stage_lineage"]["1"].startswith("trained with train xray, starting from xray_cascade.safetensors (sha256 ")


# -- 3. a result memory kept from the Slicer scene -------------------------------------------------------------------
def test_a_result_memory_keeps_from_the_scene_goes_to_a_private_folder(scene, job_tmp, monkeypatch):
    pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")
    if str(ROOT / "CTDiffusionSR") not in sys.path:
        sys.path.insert(0, str(ROOT / "CTDiffusionSR"))
    from CTDiffusionSRLib import jobs, mrml_io, sr_logic
    from CTDiffusionSRLib.process import JobState
    from CTDiffusionSRLib.sr_logic import SRJob, SRSettings
    from CTDiffusionSRLib.testing import phantom_ct

    from DiffusionCore.errors import ResourceError
    from DiffusionCore.volume import read_volume

    mrml_io.subject_hierarchy(scene)
    node = mrml_io.add_volume_node(scene, phantom_ct(), "DOE^JOHN CT")

    def no_memory(path):
        raise ResourceError(f"not enough memory: reading {path} (24x32x32 voxels) needs about 4.7 GiB")

    monkeypatch.setattr(sr_logic, "read_volume_file", no_memory)
    old_umask = os.umask(0o022)  # what a shared machine's users have: files 0644 unless made private
    try:
        job = SRJob(scene, node, SRSettings(factor=4, axis="z", device="cpu", tiny_test_predictor=True,
                                            adapt_to_scan=False))  # fmt: skip
        assert job.run(timeout=240) == JobState.FAILED
    finally:
        os.umask(old_umask)
    assert not list(job_tmp.glob("DOE*")), "nothing named after the node in the shared temp folder"
    kept = sorted(job_tmp.glob(f"{jobs.KEPT_RESULT_PREFIX}*/DOE^JOHN CT SR x4 (synthetic) *.nrrd"))
    assert len(kept) == 1 and read_volume(kept[0], check=False).shape == (24, 32, 32)
    folder = kept[0].parent
    assert folder.parent == job_tmp and not folder.name.startswith(jobs.JOB_FOLDER_PREFIX)
    if os.name == "posix":
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(kept[0].stat().st_mode) == 0o600
    assert job.error.endswith(f"The result was kept in {kept[0]}: load it (File > Add Data) when memory allows, "
                              "or delete it.")  # fmt: skip
    # a later job's clean-up of stale job folders leaves it alone
    jobs.remove_stale_job_folders(job_tmp)
    assert kept[0].is_file()


def test_a_radiograph_header_that_reads_a_file_outside_its_folder_is_refused(tmp_path):
    """A 2D MetaImage radiograph is read by its own reader (not read_volume): its data file must lie beside it too,
    else a received header could put any file's bytes into the generated CT."""
    from DiffusionCore.errors import InputError
    from DiffusionCore.xray.radiograph import read_radiograph

    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(256)) * 32)  # 64 x 64 uint16
    folder = tmp_path / "received"
    folder.mkdir()
    header = folder / "chest.mhd"
    header.write_text("ObjectType = Image\nNDims = 2\nDimSize = 64 64\nElementType = MET_USHORT\n"
                      "ElementSpacing = 0.2 0.2\nElementDataFile = ../secret.raw\n")  # fmt: skip
    with pytest.raises(InputError, match=r"outside the header's folder .* set DIFFUSIONCORE_ALLOW_DATA_OUTSIDE=1"):
        read_radiograph(header)
    (folder / "secret.raw").write_bytes(secret.read_bytes())
    header.write_text(header.read_text().replace("../secret.raw", "secret.raw"))
    assert read_radiograph(header).array.shape == (64, 64)  # beside its header: read
