"""The bad-input matrix: every odd or broken input a user can hand the tools, through three doors.

Each case runs through

* the command line: a real ``python -m DiffusionCore ...`` process; it must end with the case's exit code
  and exactly one ``error: ...`` line naming the problem (or, for inputs that are handled, exit 0 and a
  complete output), never a traceback;
* the Python API: the same problem raises the project's error type with the same message;
* the Slicer Lib logic (CTDiffusionSRLib, XrayToCTLib) on real MRML nodes, where the case can reach it
  (a volume node, the Apply check, weights and training settings): the job refuses before it starts, with
  the message the Apply button shows.

Every door leaves the input unchanged (file hashes; node voxels and geometry) and leaves no partial output:
no output file and no temporary file in the output folder (a refused Lib job adds no node to the scene).

The command-line processes are started together (two at a time) by a module fixture, so the matrix costs
about as much wall time as half of its processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ct_phantom_array, write_dicom_series

from DiffusionCore.config import load_config
from DiffusionCore.errors import (
    ConfigError,
    DiffusionCoreError,
    GeometryError,
    InputError,
    OutputError,
    ResourceError,
    WeightsError,
)
from DiffusionCore.inputs import collect_volumes
from DiffusionCore.sr.config import SRConfig
from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.volume import Volume, read_volume, write_volume
from DiffusionCore.xray.radiograph import read_radiograph

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

#: Slices per thick slice of the standard input (0.8 x 0.8 x 3.2 mm).
FACTOR = 4


# -- inputs --------------------------------------------------------------------------------------------
def ct(shape: tuple[int, int, int] = (4, 32, 32), spacing=(0.8, 0.8, 3.2), seed: int = 0) -> Volume:
    """A small thick-slice chest-like CT (the conftest phantom's tissues), thick along z."""
    return Volume(ct_phantom_array(shape, seed), spacing, (-12.0, -12.0, -20.0))


def radiograph_pixels(size: int = 64) -> np.ndarray:
    """A chest-radiograph-like uint16 image: a bright mediastinum between darker lungs."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    img = (
        0.35
        + 0.3 * np.exp(-((x / 0.12) ** 2))
        - 0.2 * ((((np.abs(x) - 0.2) / 0.15) ** 2 + (y / 0.35) ** 2) < 1)
    )
    return (np.clip(img, 0, 1) * 4000).astype(np.uint16)


def write_png(path: Path, pixels: np.ndarray, rgb: bool = False) -> Path:
    img = sitk.GetImageFromArray(pixels, isVector=rgb)
    sitk.WriteImage(img, str(path))
    return path


def nifti_with_pixdim(path: Path, vol: Volume, pixdim_z: float) -> Path:
    """A NIfTI file without sform whose z voxel size (pixdim[3]) is set to ``pixdim_z``."""
    write_volume(vol, path)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<h", raw, 252, 0)  # qform_code
    struct.pack_into("<h", raw, 254, 0)  # sform_code
    struct.pack_into("<f", raw, 76 + 4 * 3, pixdim_z)
    path.write_bytes(bytes(raw))
    return path


def digest(path: Path) -> str:
    """sha256 of a file, or of every file below a folder (names and contents)."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                h.update(p.read_bytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def listing(folder: Path) -> set[str]:
    """Names in ``folder`` (for /proc, the stand-in unwritable folder under root, without the process ids)."""
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if not (folder == Path("/proc") and p.name.isdigit())}


# -- the matrix ----------------------------------------------------------------------------------------
@dataclass
class Case:
    """One bad input and what every door must say about it.

    Attributes:
        argv: arguments after ``python -m DiffusionCore``.
        code: the command's exit code (0: the input is handled, the output complete).
        message: text of the single ``error:`` line (for code 0: a text that stderr must hold, or "").
        inputs: files or folders that must stay byte-identical.
        output: the output path: absent afterwards (code != 0) or present and complete (code 0).
        api: the same request in Python; must raise ``api_error`` matching ``api_message`` (or return,
            for a handled input, a value that ``api_check`` accepts).
        lib: ``lib(scene) -> (input node or None, thunk)``; the thunk must raise ``lib_error`` matching
            ``lib_message``, or return (for a handled input).
        keep: bytes an existing output file holds and must still hold.
        output_shape: the shape of a handled input's output.
        env: extra environment of the command.
    """

    argv: list[str]
    code: int
    message: str
    inputs: list[Path]
    output: Path | None
    api: Callable[[], Any] | None = None
    api_error: type[DiffusionCoreError] | None = None
    api_message: str = ""
    api_check: Callable[[Any], None] | None = None
    lib: Callable[[Any], tuple[Any, Callable[[], Any]]] | None = None
    lib_error: type[DiffusionCoreError] | None = None
    lib_message: str = ""
    keep: bytes | None = None
    output_shape: tuple[int, int, int] | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Shared:
    """Files several cases use, made once."""

    root: Path
    cache: Path
    sr_weights: Path
    unregistered_sr_weights: Path
    xray_weights: Path
    good_ct: Path
    memory_fallback_limit: int


BUILDERS: dict[str, Callable[[Path, Shared], Case]] = {}


def case(name: str):
    def register(fn: Callable[[Path, Shared], Case]) -> Callable[[Path, Shared], Case]:
        BUILDERS[name] = fn
        return fn

    return register


def sr_argv(src: Path, out: Path, *extra: str) -> list[str]:
    return ["sr", str(src), str(out), "--progress", "none", "--num-steps", "1", *extra]


def tiny_sr_argv(src: Path, out: Path, *extra: str) -> list[str]:
    return sr_argv(src, out, "--tiny-test-model", *extra)


def tiny() -> SuperResolver:
    return SuperResolver.tiny(seed=0)


# Lib helpers (imported lazily: slicer-core is optional for the command-line and API doors)
def _node(scene, vol: Volume, name: str = "CT"):
    from CTDiffusionSRLib import mrml_io

    return mrml_io.add_volume_node(scene, vol, name)


def _image_node(scene, pixels: np.ndarray, name: str, spacing=(0.5, 0.5, 1.0), vector: bool = False):
    """A single-slice (radiograph-like) node; ``vector`` makes a 3-component colour node."""
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    h, w = pixels.shape[:2]
    image.SetDimensions(w, h, 1)
    flat = np.ascontiguousarray(pixels).reshape(h * w, -1) if vector else np.ascontiguousarray(pixels).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(*spacing)
    return node


def sr_lib(vol: Volume | None = None, make_node: Callable | None = None, **settings):
    """``lib`` for the SR module: a node of ``vol`` (or ``make_node(scene)``) and an SRJob with ``settings``."""

    def lib(scene):
        from CTDiffusionSRLib.sr_logic import SRJob, SRSettings, check_sr_input

        node = make_node(scene) if make_node is not None else _node(scene, vol)
        opts = SRSettings(**{"factor": FACTOR, "device": "cpu", "tiny_test_model": True, **settings})

        def thunk():
            reason = check_sr_input(node, opts)  # what the disabled Apply button says
            job = SRJob(scene, node, opts)
            return reason, job

        return node, thunk

    return lib


def xray_lib(make_node: Callable, **settings):
    def lib(scene):
        from XrayToCTLib import XrayJob, XraySettings, check_xray_input

        node = make_node(scene)
        opts = XraySettings(**{"num_stages": 1, "device": "cpu", "tiny_test_model": True, **settings})

        def thunk():
            reason = check_xray_input(node)
            return reason, XrayJob(scene, node, opts)

        return node, thunk

    return lib


# --- images that are not CT volumes
@case("2d-image")
def _(d: Path, s: Shared) -> Case:
    src = d / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(ct().array[0].astype(np.int16)), str(src))
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(src, out), 2, "is a 2D image", [src], out,
                api=lambda: read_volume(src), api_error=InputError, api_message="2D image",
                lib=sr_lib(ct(shape=(1, 32, 32))), lib_error=InputError, lib_message="is 2D")  # fmt: skip


@case("4d-image")
def _(d: Path, s: Shared) -> Case:
    src = d / "phases.nii.gz"
    phases = [sitk.GetImageFromArray(ct(seed=i).array.astype(np.int16)) for i in range(3)]
    sitk.WriteImage(sitk.JoinSeries(phases), str(src))
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(src, out), 2, "has 4 dimensions", [src], out,
                api=lambda: read_volume(src), api_error=InputError, api_message="extract one phase")  # fmt: skip


@case("rgb-volume")
def _(d: Path, s: Shared) -> Case:
    src = d / "colour.nrrd"
    arr = np.clip(ct().array + 1024, 0, 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr // 2, arr // 3], -1), isVector=True), str(src))
    out = d / "out.nii.gz"

    def colour_node(scene):
        import vtk
        from vtk.util import numpy_support

        node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
        image = vtk.vtkImageData()
        image.SetDimensions(32, 32, 4)
        rgb = np.stack([arr, arr // 2, arr // 3], -1).reshape(-1, 3)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(rgb), deep=True))
        node.SetAndObserveImageData(image)
        node.SetSpacing(0.8, 0.8, 3.2)
        return node

    return Case(tiny_sr_argv(src, out), 2, "3 components per voxel (RGB", [src], out,
                api=lambda: read_volume(src), api_error=InputError, api_message="RGB",
                lib=sr_lib(make_node=colour_node), lib_error=InputError, lib_message="colour/vector image")  # fmt: skip


@case("nan-and-inf-voxels")
def _(d: Path, s: Shared) -> Case:
    vol = ct()
    vol.array[1, 5:7, 5] = np.nan
    vol.array[2, 3, 4] = -np.inf
    src = write_volume(vol, d / "nan.nii.gz", dtype="float32")
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(src, out), 2, "3 of 4096 voxels are NaN or infinite", [src], out,
                api=lambda: read_volume(src), api_error=InputError, api_message="NaN or infinite",
                lib=sr_lib(vol), lib_error=InputError, lib_message="3 of 4096 voxels are NaN")  # fmt: skip


@case("constant-volume")
def _(d: Path, s: Shared) -> Case:
    vol = ct().with_array(np.full((4, 32, 32), 40.0, np.float32))
    src = write_volume(vol, d / "constant.nii.gz")
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(src, out), 2, "is constant (40 everywhere)", [src], out,
                api=lambda: tiny().run(read_volume(src), factor=FACTOR), api_error=InputError,
                api_message="constant",
                lib=sr_lib(vol, allow_non_ct=True), lib_error=InputError, lib_message="constant")  # fmt: skip


@case("mr-like-intensities")
def _(d: Path, s: Shared) -> Case:
    vol = ct()
    vol = vol.with_array(np.clip(vol.array + 1000.0, 0, None) * 0.5)  # 0..~950, no air at -1000
    src = write_volume(vol, d / "t1.nii.gz")
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(src, out), 2, "does not look like CT in Hounsfield units", [src], out,
                api=lambda: tiny().run(read_volume(src), factor=FACTOR), api_error=InputError,
                api_message="--allow-non-ct",
                lib=sr_lib(vol), lib_error=InputError, lib_message="does not look like CT")  # fmt: skip


# --- geometry
@case("zero-spacing")
def _(d: Path, s: Shared) -> Case:
    src = nifti_with_pixdim(d / "zero.nii", ct(), 0.0)
    out = d / "out.nii.gz"

    def zero_node(scene):
        node = _node(scene, ct(), "zero spacing")
        node.SetSpacing(0.8, 0.8, 0.0)
        return node

    return Case(tiny_sr_argv(src, out), 2, "zero or undefined spacing", [src], out,
                api=lambda: read_volume(src), api_error=GeometryError, api_message="zero or undefined spacing",
                lib=sr_lib(make_node=zero_node), lib_error=InputError, lib_message="zero or invalid axis")  # fmt: skip


@case("negative-spacing")
def _(d: Path, s: Shared) -> Case:
    """A header with a negative spacing is read as the mirrored direction: the same physical voxels."""
    vol = ct()
    src = d / "negative.mha"
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 32 32 4\nElementSpacing = -0.8 0.8 3.2\nOffset = 0 0 0\n"
              "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")  # fmt: skip
    src.write_bytes(header.encode() + np.round(vol.array).astype("<i2").tobytes())
    out = d / "out.nii.gz"

    def check(read: Volume) -> None:
        assert read.spacing == pytest.approx((0.8, 0.8, 3.2))
        np.testing.assert_allclose(read.index_to_physical()[:3, 0], (-0.8, 0.0, 0.0))  # i runs towards -x
        np.testing.assert_array_equal(read.array, np.round(vol.array))

    return Case(tiny_sr_argv(src, out, "--factor", str(FACTOR)), 0, "", [src], out,
                api=lambda: read_volume(src), api_check=check, output_shape=(16, 32, 32))  # fmt: skip


@case("already-isotropic")
def _(d: Path, s: Shared) -> Case:
    vol = ct(shape=(8, 16, 16), spacing=(1.0, 1.0, 1.0))
    src = write_volume(vol, d / "iso.nii.gz")
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(src, out), 2, "already (nearly) isotropic", [src], out,
                api=lambda: tiny().run(read_volume(src)), api_error=GeometryError, api_message="isotropic",
                lib=sr_lib(vol, factor=0), lib_error=InputError, lib_message="nearly isotropic")  # fmt: skip


@case("factor-1")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(s.good_ct, out, "--factor", "1"), 2, "factor 1 is outside 2..8", [s.good_ct], out,
                api=lambda: tiny().run(read_volume(s.good_ct), factor=1), api_error=GeometryError,
                api_message="outside 2..8",
                lib=sr_lib(ct(), factor=1), lib_error=InputError, lib_message="outside 2..8")  # fmt: skip


@case("factor-16")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(s.good_ct, out, "--factor", "16"), 2, "factor 16 is outside 2..8", [s.good_ct], out,
                api=lambda: tiny().run(read_volume(s.good_ct), factor=16), api_error=GeometryError,
                api_message="outside 2..8",
                lib=sr_lib(ct(), factor=16), lib_error=InputError, lib_message="outside 2..8")  # fmt: skip


@case("smaller-than-one-patch")
def _(d: Path, s: Shared) -> Case:
    """Smaller than the model's smallest patch in every direction: padded, run, cropped back exactly."""
    vol = ct(shape=(2, 6, 6), spacing=(0.8, 0.8, 1.6))
    src = write_volume(vol, d / "tiny.nii.gz")
    out = d / "out.nii.gz"

    def check(result) -> None:
        output, report = result
        assert output.shape == (4, 6, 6) and np.isfinite(output.array).all()
        assert report["tiles"]["count"] == 1

    def lib(scene):
        from CTDiffusionSRLib.sr_logic import SRSettings, check_sr_input

        node = _node(scene, vol)
        return node, lambda: check_sr_input(node, SRSettings(factor=2, tiny_test_model=True)) == "" or 1 / 0

    return Case(tiny_sr_argv(src, out, "--factor", "2"), 0, "", [src], out,
                api=lambda: tiny().run(vol.copy(), factor=2, steps=1), api_check=check, lib=lib,
                output_shape=(4, 6, 6))  # fmt: skip


@case("too-large-for-memory-tiles-shrink")
def _(d: Path, s: Shared) -> Case:
    vol = ct(shape=(4, 64, 64))
    src = write_volume(vol, d / "large.nii.gz")
    out = d / "out.nii.gz"
    limit = s.memory_fallback_limit

    def check(result) -> None:
        output, report = result
        assert output.shape == (16, 64, 64)
        assert report["tiles"]["reduced_from"] and report["tiles"]["count"] > 1
        assert report["memory"]["host_estimate_bytes"] <= limit

    return Case(tiny_sr_argv(src, out, "--factor", str(FACTOR)), 0, "does not fit in memory; using", [src], out,
                api=lambda: tiny().run(vol.copy(), factor=FACTOR, steps=1, memory_limit=limit), api_check=check,
                env={"DIFFUSIONCORE_MEMORY_LIMIT": str(limit)}, output_shape=(16, 64, 64))  # fmt: skip


@case("too-large-for-memory-refused")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(s.good_ct, out, "--memory-limit", "64KiB"), 5,
                "not enough memory for a volume of 16x32x32 voxels: the estimate with the smallest patch",
                [s.good_ct], out,
                api=lambda: tiny().run(read_volume(s.good_ct), factor=FACTOR, memory_limit=64 * 1024),
                api_error=ResourceError, api_message=r"estimate .* is host [0-9.]+ [KM]iB of 64\.0 KiB usable")  # fmt: skip


# --- broken files
@case("corrupt-nifti")
def _(d: Path, s: Shared) -> Case:
    src = d / "corrupt.nii.gz"
    src.write_bytes(os.urandom(3000))
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(src, out), 2, "is not a valid NIfTI image", [src], out,
                api=lambda: read_volume(src), api_error=InputError, api_message="not a valid NIfTI")  # fmt: skip


@case("truncated-nifti")
def _(d: Path, s: Shared) -> Case:
    full = write_volume(ct(), d / "full.nii")
    src = d / "truncated.nii"
    src.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(src, out), 2, "the file is truncated", [src], out,
                api=lambda: read_volume(src), api_error=InputError, api_message="truncated")  # fmt: skip


@case("dicom-series-missing-slice")
def _(d: Path, s: Shared) -> Case:
    folder = d / "series"
    write_dicom_series(folder, ct(shape=(6, 16, 16)), skip=(3,))
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(folder, out), 2, "is missing slices", [folder], out,
                api=lambda: read_volume(folder), api_error=InputError, api_message="missing slices")  # fmt: skip


@case("dicom-series-two-slice-spacings")
def _(d: Path, s: Shared) -> Case:
    import pydicom

    folder = d / "series"
    files = write_dicom_series(folder, ct(shape=(8, 16, 16)))
    for f, z in zip(files, (0.0, 3.2, 6.4, 9.6, 16.0, 22.4, 28.8, 35.2)):  # 3.2 mm, then 6.4 mm from slice 4
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [-12.0, -12.0, -20.0 + z]
        ds.save_as(f)
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(folder, out), 2, "are not evenly spaced", [folder], out,
                api=lambda: read_volume(folder), api_error=InputError, api_message="3.20 mm apart after slice 1 but 6.40 mm")  # fmt: skip


@case("dicom-several-series-same-size")
def _(d: Path, s: Shared) -> Case:
    folder = d / "mixed"
    write_dicom_series(folder, ct(shape=(4, 16, 16)), series_uid="1.2.826.0.1.3680043.8.498.100", prefix="a")
    write_dicom_series(
        folder, ct(shape=(4, 16, 16), seed=1), series_uid="1.2.826.0.1.3680043.8.498.200", prefix="b"
    )
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(folder, out), 2, "holds 2 DICOM series and the largest ones are the same size",
                [folder], out, api=lambda: read_volume(folder), api_error=InputError,
                api_message="its own folder")  # fmt: skip


@case("dicom-several-series-largest-used")
def _(d: Path, s: Shared) -> Case:
    folder = d / "mixed"
    write_dicom_series(
        folder, ct(shape=(4, 16, 16)), series_uid="1.2.826.0.1.3680043.8.498.300", prefix="big"
    )
    write_dicom_series(
        folder, ct(shape=(2, 16, 16)), series_uid="1.2.826.0.1.3680043.8.498.400", prefix="small"
    )
    out = d / "out.nii.gz"

    def check(vol: Volume) -> None:
        assert vol.shape == (4, 16, 16) and vol.metadata["series_uid"].endswith(".300")

    return Case(tiny_sr_argv(folder, out, "--factor", str(FACTOR)), 0, "using the largest", [folder], out,
                api=lambda: read_volume(folder), api_check=check, output_shape=(16, 16, 16))  # fmt: skip


# --- outputs and paths
@case("unwritable-output-folder")
def _(d: Path, s: Shared) -> Case:
    locked = d / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits: use a folder no one can create files in
        locked = Path("/proc")
    out = locked / "out.nii.gz"
    return Case(tiny_sr_argv(s.good_ct, out), 4, "is not writable", [s.good_ct], out,
                api=lambda: write_volume(ct(), out), api_error=OutputError, api_message="not writable")  # fmt: skip


@case("existing-output-without-overwrite")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    out.write_bytes(b"an earlier result")
    return Case(tiny_sr_argv(s.good_ct, out), 4, "already exists; pass --overwrite", [s.good_ct], out,
                api=lambda: write_volume(ct(), out), api_error=OutputError, api_message="already exists",
                keep=b"an earlier result")  # fmt: skip


@case("paths-with-spaces-and-non-ascii")
def _(d: Path, s: Shared) -> Case:
    folder = d / "Patient Müller – 日本 scan"
    folder.mkdir()
    src = write_volume(ct(), folder / "thick CT ñ.nii.gz")
    out_dir = d / "résultats finaux"
    out_dir.mkdir()
    out = out_dir / "super résolu ü.nrrd"

    def check(vol: Volume) -> None:
        assert vol.shape == (4, 32, 32) and vol.metadata["source"] == str(src)

    return Case(tiny_sr_argv(src, out), 0, "", [src], out, api=lambda: read_volume(src), api_check=check,
                output_shape=(16, 32, 32))  # fmt: skip


# --- weights
@case("weights-of-another-architecture")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(sr_argv(s.good_ct, out, "--weights", str(s.xray_weights), "--allow-unregistered-weights"), 3,
                "holds weights of the 'xray' model family, but a 'sr' model was asked for", [s.good_ct, s.xray_weights], out,
                api=lambda: SuperResolver.from_pretrained(s.xray_weights, allow_unregistered=True),
                api_error=WeightsError, api_message="'xray' model family",
                lib=sr_lib(ct(), tiny_test_model=False, weights=str(s.xray_weights), allow_unregistered_weights=True),
                lib_error=WeightsError, lib_message="holds X-ray to CT weights .the X-ray to CT module runs them., not "
                "CT super-resolution weights")  # fmt: skip


@case("weights-wrong-sha256")
def _(d: Path, s: Shared) -> Case:
    registered = s.cache / "weights" / "tiny-sr.safetensors"
    out = d / "out.nii.gz"
    return Case(sr_argv(s.good_ct, out, "--weights", "tiny-sr"), 3, "fail their sha256 check", [s.good_ct, registered],
                out, api=lambda: SuperResolver.from_pretrained("tiny-sr"), api_error=WeightsError,
                api_message="sha256 check",
                lib=sr_lib(ct(), tiny_test_model=False, weights="tiny-sr"), lib_error=WeightsError,
                lib_message="sha256 check")  # fmt: skip


@case("pickle-renamed-safetensors")
def _(d: Path, s: Shared) -> Case:
    evil = d / "weights.safetensors"
    torch.save({"w": torch.zeros(2)}, evil)
    out = d / "out.nii.gz"
    return Case(sr_argv(s.good_ct, out, "--weights", str(evil), "--allow-unregistered-weights"), 3,
                "it is never loaded, because unpickling can run arbitrary code", [s.good_ct, evil], out,
                api=lambda: SuperResolver.from_pretrained(evil, allow_unregistered=True), api_error=WeightsError,
                api_message="zip archive|pickle",
                lib=sr_lib(ct(), tiny_test_model=False, weights=str(evil), allow_unregistered_weights=True),
                lib_error=WeightsError, lib_message="never loaded")  # fmt: skip


@case("unregistered-weights-without-flag")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    weights = s.unregistered_sr_weights
    return Case(sr_argv(s.good_ct, out, "--weights", str(weights)), 3,
                "is not a registered weights file", [s.good_ct, weights], out,
                api=lambda: SuperResolver.from_pretrained(weights), api_error=WeightsError,
                api_message="--allow-unregistered-weights",
                lib=sr_lib(ct(), tiny_test_model=False, weights=str(weights)), lib_error=WeightsError,
                lib_message="not a registered weights file")  # fmt: skip


# --- the wrong tool
@case("ct-given-to-xray2ct")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(["xray2ct", str(s.good_ct), str(out), "--tiny-test-model", "--progress", "none", "--num-stages", "1"],
                2, "is a 3D volume of shape", [s.good_ct], out,
                api=lambda: read_radiograph(s.good_ct), api_error=InputError, api_message="not a radiograph",
                lib=xray_lib(lambda scene: _node(scene, ct())), lib_error=InputError,
                lib_message="is a 3D volume")  # fmt: skip


@case("radiograph-given-to-sr")
def _(d: Path, s: Shared) -> Case:
    src = write_png(d / "chest.png", radiograph_pixels())
    out = d / "out.nii.gz"
    return Case(tiny_sr_argv(src, out), 2, "For a radiograph use the X-ray to CT tool (xray2ct)", [src], out,
                api=lambda: read_volume(src), api_error=InputError, api_message="2D image",
                lib=sr_lib(make_node=lambda scene: _image_node(scene, radiograph_pixels(), "chest PA")),
                lib_error=InputError, lib_message="X-ray to CT module takes radiographs")  # fmt: skip


@case("colour-radiograph")
def _(d: Path, s: Shared) -> Case:
    grey = (radiograph_pixels() // 16).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, 255 - grey], -1)
    src = write_png(d / "photo.png", rgb, rgb=True)
    out = d / "out.nii.gz"
    return Case(["xray2ct", str(src), str(out), "--tiny-test-model", "--progress", "none", "--num-stages", "1"],
                2, "is a colour image (its red, green and blue differ); a radiograph is greyscale", [src], out,
                api=lambda: read_radiograph(src), api_error=InputError, api_message="colour",
                lib=xray_lib(lambda scene: _image_node(scene, rgb, "photo", vector=True)), lib_error=InputError,
                lib_message="is a colour image")  # fmt: skip


@case("nan-radiograph")
def _(d: Path, s: Shared) -> Case:
    pixels = radiograph_pixels().astype(np.float32)
    pixels[5, 7] = np.nan
    pixels[40, 3] = np.inf
    src = d / "chest.mha"  # a float image (PNG cannot hold NaN)
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(src))
    out = d / "out.nii.gz"
    return Case(["xray2ct", str(src), str(out), "--tiny-test-model", "--progress", "none", "--num-stages", "1"],
                2, "contains NaN or infinite values", [src], out,
                api=lambda: read_radiograph(src), api_error=InputError, api_message="NaN or infinite",
                lib=xray_lib(lambda scene: _image_node(scene, pixels, "chest")), lib_error=InputError,
                lib_message="'chest' contains NaN or infinite values")  # fmt: skip


@case("xray-weights-of-another-architecture")
def _(d: Path, s: Shared) -> Case:
    src = write_png(d / "chest.png", radiograph_pixels())
    out = d / "out.nii.gz"
    return Case(["xray2ct", str(src), str(out), "--weights", str(s.sr_weights), "--allow-unregistered-weights",
                 "--progress", "none"], 3, "holds weights of the 'sr' model family, but a 'xray' model",
                [src, s.sr_weights], out,
                api=lambda: __import__("DiffusionCore.xray.pipeline", fromlist=["x"]).XrayToCTGenerator.from_pretrained(
                    str(s.sr_weights), allow_unregistered=True),
                api_error=WeightsError, api_message="'sr' model family",
                lib=xray_lib(lambda scene: _image_node(scene, radiograph_pixels().astype(np.float32), "chest"),
                             tiny_test_model=False, weights=str(s.sr_weights), allow_unregistered_weights=True),
                lib_error=WeightsError, lib_message="holds CT super-resolution weights .the CT Diffusion SR module runs them., not X-ray "
                "to CT weights")  # fmt: skip


# --- training
def training_lib(family: str, config: Path, data: Path, out: Path, error: str | None = None):
    """``lib`` for the training panel: a TrainingJob; refused at construction, or run to its error line."""

    def lib(scene):
        from CTDiffusionSRLib.process import JobState
        from CTDiffusionSRLib.training import TrainingJob

        def thunk():
            job = TrainingJob(scene, family=family, config_path=config, data=data,
                              output_dir=out, device="cpu", extra_arguments="--max-steps 1")  # fmt: skip
            if error is None:
                return job
            state = job.run(timeout=120)
            assert state == JobState.FAILED
            raise InputError(job.error)  # the message the training panel shows

        return None, thunk

    return lib


@case("empty-training-folder")
def _(d: Path, s: Shared) -> Case:
    empty = d / "empty"
    empty.mkdir()
    (d / "config.json").write_text("{}")
    out = d / "run"
    return Case(["train", "vae", "--data", str(empty), "--out-dir", str(out), "--max-steps", "1", "--device", "cpu"],
                2, "no CT volumes", [empty], out,
                api=lambda: collect_volumes(empty), api_error=InputError, api_message="no CT volumes",
                lib=training_lib("vae", d / "config.json", empty, d / "lib-run", error="no CT volumes"), lib_error=InputError,
                lib_message="no CT volumes")  # fmt: skip


@case("config-unknown-key")
def _(d: Path, s: Shared) -> Case:
    cfg = d / "config.json"
    cfg.write_text(json.dumps({"train": {"batch_sise": 2}}))
    out = d / "run"
    return Case(["train", "vae", "--config", str(cfg), "--data", str(s.good_ct), "--out-dir", str(out),
                 "--max-steps", "1"], 2, "unknown config key 'train.batch_sise'", [cfg, s.good_ct], out,
                api=lambda: load_config(cfg, SRConfig), api_error=ConfigError, api_message="did you mean 'batch_size'",
                lib=training_lib("vae", cfg, s.good_ct, d / "lib-run"), lib_error=ConfigError,
                lib_message="unknown config key 'train.batch_sise'")  # fmt: skip


@case("config-wrong-type")
def _(d: Path, s: Shared) -> Case:
    cfg = d / "config.yaml"
    cfg.write_text("train:\n  batch_size: two\n")
    out = d / "run"
    return Case(["train", "sr", "--config", str(cfg), "--data", str(s.good_ct), "--out-dir", str(out),
                 "--max-steps", "1"], 2, "config key 'train.batch_size'", [cfg, s.good_ct], out,
                api=lambda: load_config(cfg, SRConfig), api_error=ConfigError, api_message="expected int, got str",
                lib=training_lib("sr", cfg, s.good_ct, d / "lib-run"), lib_error=ConfigError,
                lib_message="expected int")  # fmt: skip


# -- running the command-line door for every case at once ---------------------------------------------------
@dataclass
class Ran:
    case: Case
    folder: Path
    proc: subprocess.CompletedProcess
    digests: dict[Path, str]
    out_listing: set[str]
    out_listing_after: set[str]


def _out_folder(c: Case) -> Path | None:
    return c.output.parent if c.output is not None else None


def _shared(root: Path) -> Shared:
    from DiffusionCore.sr.model import SRModel
    from DiffusionCore.weights import import_weights
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

    cache = root / "cache"
    cache.mkdir()
    sr_weights = root / "tiny_sr.safetensors"
    SRModel.tiny(seed=0).save(sr_weights)
    unregistered = root / "tiny_sr_unregistered.safetensors"
    SRModel.tiny(seed=1).save(unregistered)
    xray_weights = root / "tiny_xray.safetensors"
    UnifiedHybridViTCascade.tiny(0).save_pretrained(xray_weights)
    old = os.environ.get("DIFFUSIONCORE_CACHE")
    os.environ["DIFFUSIONCORE_CACHE"] = str(cache)
    try:
        registered = import_weights(sr_weights, "tiny-sr").path
    finally:
        if old is None:
            del os.environ["DIFFUSIONCORE_CACHE"]
        else:
            os.environ["DIFFUSIONCORE_CACHE"] = old
    raw = bytearray(registered.read_bytes())
    raw[-3] ^= 0xFF  # one tensor byte changed after registration: the file no longer matches its sha256
    registered.write_bytes(bytes(raw))
    good = write_volume(ct(), root / "good.nii.gz")
    # the memory estimate of the full patch for the 16x64x64 case, less one byte: smaller tiles must be used
    _, report = tiny().run(ct(shape=(4, 64, 64)), factor=FACTOR, steps=1)
    return Shared(
        root, cache, sr_weights, unregistered, xray_weights, good, report["memory"]["host_estimate_bytes"] - 1
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    torch.set_num_threads(1)
    return _shared(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def built(shared, tmp_path_factory) -> dict[str, tuple[Case, Path]]:
    out = {}
    for name, build in BUILDERS.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = (build(folder, shared), folder)
    return out


@pytest.fixture(scope="module")
def ran(built, shared) -> dict[str, Ran]:
    """Every case's command, two processes at a time."""
    env = {
        **os.environ,
        "DIFFUSIONCORE_CACHE": str(shared.cache),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }

    def run_one(name: str) -> Ran:
        c, folder = built[name]
        digests = {p: digest(p) for p in c.inputs}
        before = listing(_out_folder(c)) if c.output is not None else set()
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "DiffusionCore", *c.argv], capture_output=True, text=True,
                              encoding="utf-8", errors="replace", cwd=ROOT, env={**env, **c.env}, timeout=240)  # fmt: skip
        seconds[name] = time.perf_counter() - t0
        after = listing(_out_folder(c)) if c.output is not None else set()
        return Ran(c, folder, proc, digests, before, after)

    seconds: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run_one, BUILDERS))
    print("command seconds:", {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])})
    return dict(zip(BUILDERS, results))


def test_matrix_has_at_least_25_cases():
    assert len(BUILDERS) >= 25


@pytest.mark.parametrize("name", list(BUILDERS))
def test_command_line(name, ran):
    r = ran[name]
    c, proc = r.case, r.proc
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == c.code, proc.stderr
    for path, before in r.digests.items():
        assert digest(path) == before, f"{path} was changed"
    if c.code != 0:
        assert len(errors) == 1, proc.stderr
        assert c.message in errors[0], errors[0]
        if c.keep is not None:
            assert c.output.read_bytes() == c.keep
            assert r.out_listing_after == r.out_listing
        else:
            assert not c.output.exists()
            assert r.out_listing_after == r.out_listing, "a partial or temporary file was left behind"
    else:
        assert errors == [], proc.stderr
        assert c.message in proc.stderr
        from DiffusionCore.results import planned_files

        new = {f.name for f in planned_files(c.output, as_dicom=False)}  # a NIfTI output brings its sidecar
        assert r.out_listing_after == r.out_listing | new, "only the output may be new"
        result = read_volume(c.output)
        assert result.shape == c.output_shape and np.isfinite(result.array).all()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_python_api(name, built, shared, monkeypatch):
    c, _folder = built[name]
    if c.api is None:
        pytest.skip("no Python API call for this case")
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(shared.cache))
    out_folder = _out_folder(c)
    before_listing = listing(out_folder) if out_folder is not None else set()
    digests = {p: digest(p) for p in c.inputs}
    if c.api_error is not None:
        with pytest.raises(c.api_error, match=c.api_message):
            c.api()
    else:
        c.api_check(c.api())
    for path, before in digests.items():
        assert digest(path) == before, f"{path} was changed"
    if out_folder is not None:
        assert listing(out_folder) == before_listing, "the API left a file in the output folder"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_slicer_lib(name, built, shared, monkeypatch, tmp_path):
    c, _folder = built[name]
    if c.lib is None:
        pytest.skip("this input cannot reach the Slicer modules (Slicer loads files itself)")
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Lib door")
    import tempfile

    from CTDiffusionSRLib import mrml_io

    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(shared.cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the jobs' private folders land here
    scene = slicer.vtkMRMLScene()
    try:
        node, thunk = c.lib(scene)
        if (
            node is not None
            and node.IsA("vtkMRMLScalarVolumeNode")
            and not node.IsA("vtkMRMLVectorVolumeNode")
        ):
            voxels = mrml_io.array_from_node(node).copy()
        else:
            voxels = None
        matrix = mrml_io.ijk_to_ras(node) if node is not None else None
        n_nodes = scene.GetNumberOfNodes()
        if c.lib_error is not None:
            with pytest.raises(c.lib_error, match=c.lib_message):
                thunk()
        else:
            thunk()
        assert scene.GetNumberOfNodes() == n_nodes, "a refused job must not add nodes"
        if voxels is not None:
            np.testing.assert_array_equal(mrml_io.array_from_node(node), voxels)
        if matrix is not None:
            np.testing.assert_array_equal(mrml_io.ijk_to_ras(node), matrix)
        assert not list(tmp_path.glob("ctdiffusion-*")), "a job's private temporary folder was left behind"
    finally:
        scene.Clear(True)
