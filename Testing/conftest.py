"""Shared pytest fixtures: small synthetic CT phantoms, oblique geometry, an isolated cache folder.

Every fixture is tiny (at most 32^3 voxels) so the whole suite stays fast on two CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from DiffusionCore.volume import Volume, write_volume

#: HU values of the phantom's tissues.
AIR_HU, LUNG_HU, SOFT_HU, BONE_HU = -1000.0, -820.0, 40.0, 900.0


# The commands run inside this test process: they must not tune its allocator for the whole session.
os.environ["DIFFUSIONCORE_KEEP_FREED_MEMORY"] = "0"

# Under pytest-xdist (`make test`) the workers share the cores: one torch / OpenMP thread each, here and in the
# commands the tests start. OpenMP threads that outnumber the cores spin against each other: with two 2-thread
# workers on 2 cores a tiny training test took 50 times as long.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def rotation_matrix(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """A 3x3 rotation (proper, orthonormal) about ``axis`` by ``degrees`` (Rodrigues' formula)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def body_phantom_cubes(n: int, r: int, seed: int = 0) -> torch.Tensor:
    """Random ellipsoid 'bodies' with a dense 'spine' behind their centre, model units (n, 1, r, r, r): the
    volumes the X-ray stage tests train and sample on."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, r)] * 3, indexing="ij")
    vols = []
    for _ in range(n):
        a, b = rng.uniform(0.5, 0.8, 2)
        body = (x / a) ** 2 + (y / b) ** 2 < 1
        vols.append(np.where(body, 0.0, -1.0) + np.where((x**2 + (y - 0.4 * b) ** 2) < 0.02, 0.6, 0.0))
    return torch.tensor(np.stack(vols), dtype=torch.float32)[:, None]


def tiny_xray_stage(stage: int, resolution: int, refine: int = 0, perturb: bool = True,
                    loss_weights: dict | None = None, **model):  # fmt: skip
    """A tiny X-ray stage in eval mode (``tiny_stage_config`` with ``model`` settings and ``loss_weights`` changed);
    with ``perturb`` every weight is nudged by a seeded random amount, so that no zero-initialised layer is left and
    every path carries a real signal."""
    from dataclasses import replace

    from DiffusionCore.xray.cascade import StageModel
    from DiffusionCore.xray.config import tiny_stage_config

    cfg = tiny_stage_config(stage, resolution, refine_channels=refine)
    cfg = replace(cfg, model=replace(cfg.model, **model), loss_weights=replace(cfg.loss_weights, **(loss_weights or {})))
    torch.manual_seed(0)
    st = StageModel(cfg).eval()
    if perturb:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in st.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return st


def assert_tiled_sampling_matches(stage, xray, min_std: float) -> None:
    """Generation from 16^3 patches of a 32^3 windowed stage (8 tiles) equals whole-grid generation, and the volume
    is not flat (its std above ``min_std``)."""
    whole = stage.sample(xray, steps=2, generator=torch.Generator().manual_seed(1))
    tiled = stage.sample(xray, steps=2, generator=torch.Generator().manual_seed(1), patch=16)
    assert stage.last_plan is not None and stage.last_plan.n_tiles == 8
    assert float(whole.std()) > min_std
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def assert_optional_loss_term(stage, x0: torch.Tensor, xray: torch.Tensor, term: str, weight: float = 0.5) -> None:
    """An optional loss weight ``term`` of ``stage``'s loss weights (0 in ``stage.cfg``): at 0 ``stage_loss`` leaves the
    term out; at ``weight`` it reports it and the total grows by exactly ``weight`` times it; and with every other
    weight at 0 its gradient alone reaches the network."""
    from dataclasses import fields, replace

    from DiffusionCore.xray.losses import stage_loss

    assert getattr(stage.cfg.loss_weights, term) == 0.0
    with torch.no_grad():
        off, parts_off = stage_loss(stage, x0, xray, None, stage.cfg.loss_weights,
                                    generator=torch.Generator().manual_seed(4))  # fmt: skip
        weights = replace(stage.cfg.loss_weights, **{term: weight})
        on, parts_on = stage_loss(stage, x0, xray, None, weights, generator=torch.Generator().manual_seed(4))
    assert term not in parts_off and parts_on[term] > 0
    assert float(on - off) == pytest.approx(weight * parts_on[term], rel=1e-4)
    alone = replace(weights, **{f.name: 0.0 for f in fields(weights) if f.name != term})
    stage.zero_grad()
    loss, parts = stage_loss(stage, x0, xray, None, alone, generator=torch.Generator().manual_seed(4))
    assert set(parts) == {"v_loss", term}  # the diffusion loss is always reported, weighted 0 here
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in stage.parameters())


#: Config keys read only when generating (the exported weights' default setting), not part of a training recipe:
#: the shipped X-ray preset stores the shipped file's start time, 1.0, where the recipes derived from it say 0.6.
GENERATION_ONLY = frozenset({"diffusion.lifting_start_t"})


def recipe_changes(recipe: dict, parent: dict, prefix: str = "") -> dict[str, tuple]:
    """``{"section.key": (parent's value, recipe's value)}`` for every leaf where a recipe (a config as a nested dict)
    differs from the one it was derived from; a key one of them lacks counts as None there. Generation settings
    (:data:`GENERATION_ONLY`) are not compared."""
    out: dict[str, tuple] = {}
    for key in sorted(set(recipe) | set(parent)):
        a, b = parent.get(key), recipe.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(recipe_changes(b, a, f"{prefix}{key}."))
        elif a != b and f"{prefix}{key}" not in GENERATION_ONLY:
            out[f"{prefix}{key}"] = (a, b)
    return out


def train_tiny_xray(cfg, data, out):
    """``train xray`` for 2 steps of batch 1 on ``data`` with the tiny config ``cfg``, into ``out``; returns the exported
    cascade, loaded from its file."""
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
    from DiffusionCore.xray.train import XrayTrainOptions, train_xray

    cfg.training.max_steps = 2
    cfg.training.batch_size = 1
    summary = train_xray(XrayTrainOptions(configs=[cfg], data=str(data), output_dir=out, device="cpu"))
    assert summary["steps"] == 2
    return UnifiedHybridViTCascade.from_pretrained(out / "xray_cascade.safetensors", allow_unregistered=True)


def fit_tiny_xray_stage(xray_seed: int, steps: int = 30, **model):
    """A tiny 16^3 stage-1 cascade with ``model`` settings, trained ``steps`` Adam steps on two
    :func:`body_phantom_cubes` and random radiographs, the same noise and times each step (so its losses can only
    fall by learning). Returns (cascade, stage, radiographs, the loss parts of each step)."""
    from dataclasses import replace

    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
    from DiffusionCore.xray.config import tiny_stage_config
    from DiffusionCore.xray.losses import stage_loss

    cfg = tiny_stage_config(1, 16)
    cfg = replace(cfg, model=replace(cfg.model, **model))
    torch.manual_seed(0)
    cascade = UnifiedHybridViTCascade([cfg]).train()
    stage = cascade.stages[0]
    x0 = body_phantom_cubes(2, 16)
    xray = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(xray_seed))
    opt = torch.optim.Adam(stage.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        torch.manual_seed(1)
        opt.zero_grad()
        loss, parts = stage_loss(stage, x0, xray, None, cfg.loss_weights)
        loss.backward()
        opt.step()
        history.append({"total": loss.item(), **parts})
    return cascade, stage, xray, history


def ct_phantom_array(shape: tuple[int, int, int] = (24, 32, 32), seed: int = 0) -> np.ndarray:
    """A chest-like float32 HU array ``(z, y, x)``: air around an elliptic body of soft tissue holding two
    lungs (about -820 HU) and a bone disc (900 HU), with smooth variation along z and mild noise."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij"
    )
    arr = np.full(shape, AIR_HU, dtype=np.float64)
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1.0
    arr[body] = SOFT_HU + 15.0 * np.sin(np.pi * z[body])
    for cx in (-0.4, 0.4):
        lung = ((x - cx) / 0.3) ** 2 + ((y + 0.05) / 0.45) ** 2 + (z / 1.3) ** 2 < 1.0
        arr[lung] = LUNG_HU + 60.0 * z[lung]
    bone = (x / 0.15) ** 2 + ((y - 0.5) / 0.12) ** 2 < 1.0
    arr[bone] = BONE_HU - 200.0 * np.abs(z[bone])
    rng = np.random.default_rng(seed)
    arr[body] += rng.normal(0.0, 5.0, size=int(body.sum()))
    return arr.astype(np.float32)


@pytest.fixture
def scene():
    """A fresh MRML scene (slicer-core), set as ``slicer.mrmlScene`` for the helpers that look it up there."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")
    s = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()  # Slicer's colour tables, which display nodes refer to
    color_logic.SetMRMLScene(s)
    slicer.mrmlScene = s
    yield s
    s.Clear(True)
    del color_logic


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 64 KiB disk of its own (a tmpfs mounted at ``tmp_path / "small disk"``), for what a full disk does; the test
    is skipped where mounting needs root and this is not."""
    folder = tmp_path / "small disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture
def phantom() -> Volume:
    """A 24x32x32 chest-like CT phantom, 0.8 x 0.8 x 2.0 mm, axis-aligned, origin at (-12, -12, -20) mm."""
    return Volume(ct_phantom_array(), spacing=(0.8, 0.8, 2.0), origin=(-12.0, -12.0, -20.0))


@pytest.fixture
def oblique_direction() -> np.ndarray:
    """A proper rotation (20 degrees about an oblique axis): no index axis is aligned with L, P or S."""
    return rotation_matrix((0.3, -0.5, 0.8), 20.0)


@pytest.fixture
def oblique_phantom(oblique_direction: np.ndarray) -> Volume:
    """The phantom with an oblique direction, anisotropic spacing and a non-trivial origin."""
    return Volume(
        ct_phantom_array(),
        spacing=(0.7, 0.9, 2.5),
        origin=(-101.5, 32.25, -405.0),
        direction=oblique_direction,
        metadata={"name": "oblique phantom"},
    )


@pytest.fixture
def make_phantom() -> Callable[..., Volume]:
    """Factory: ``make_phantom(shape=(24, 32, 32), spacing=(0.8, 0.8, 2.0), direction=None, seed=0)``."""

    def _make(
        shape: tuple[int, int, int] = (24, 32, 32),
        spacing: tuple[float, float, float] = (0.8, 0.8, 2.0),
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        direction: np.ndarray | None = None,
        seed: int = 0,
    ) -> Volume:
        return Volume(
            ct_phantom_array(shape, seed),
            spacing=spacing,
            origin=origin,
            direction=np.eye(3) if direction is None else direction,
        )

    return _make


@pytest.fixture
def no_bundled_weights(tmp_path, monkeypatch):
    """A bundled weights registry with no entries: what a build without shipped weights (or a user who
    removed them) sees."""
    from DiffusionCore.weights import registry

    empty = tmp_path / "bundled" / "registry.json"
    empty.parent.mkdir()
    empty.write_text('{"weights": {}}')
    monkeypatch.setattr(registry, "BUNDLED_REGISTRY", empty)
    return empty


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """An empty DiffusionCore cache (``$DIFFUSIONCORE_CACHE``) for tests that must not touch the user's."""
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(root))
    return root


def write_dicomdir(folder) -> Path:
    """An empty DICOMDIR (the index a CD export or a PACS download puts beside its series) written into ``folder``."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index = Dataset()
    index.file_meta = meta
    index.DirectoryRecordSequence = []
    path = Path(folder) / "DICOMDIR"
    pydicom.dcmwrite(path, index, enforce_file_format=True)
    return path


def write_dicom_series(
    folder,
    vol: Volume,
    *,
    intercept: float = -1024.0,
    slope: float = 1.0,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    study_uid: str = "1.2.826.0.1.3680043.8.498.2",
    skip: tuple[int, ...] = (),
    prefix: str = "slice",
) -> list:
    """Write ``vol`` as a CT DICOM series (one file per z slice) with SimpleITK.

    The volume's HU values are rounded to integers; SimpleITK's DICOM writer stores
    ``(HU - intercept) / slope`` in the file and records RescaleIntercept/RescaleSlope, so a reader must
    apply the rescale to get HU back. ImagePositionPatient, ImageOrientationPatient and PixelSpacing come
    from the volume's geometry. Slices listed in ``skip`` are not written (a series with missing slices).
    Returns the written paths.
    """
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.round(vol.array).astype(np.int16))
    img.SetSpacing(vol.spacing)
    img.SetOrigin(vol.origin)
    img.SetDirection(tuple(float(v) for v in vol.direction.ravel()))
    d = vol.direction
    iop = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(vol.shape[0]):
        if k in skip:
            continue
        sl = img[:, :, k]
        ipp = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in ipp),
            "0020|0037": iop,
            "0028|0030": f"{vol.spacing[1]:.6f}\\{vol.spacing[0]:.6f}",
            "0018|0050": f"{vol.spacing[2]:.6f}",
            "0028|1052": f"{intercept:g}",
            "0028|1053": f"{slope:g}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        path = folder / f"{prefix}{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths


def write_cr_radiograph(path: Path) -> Path:
    """A small DICOM radiograph at ``path`` (CR, MONOCHROME2, 64x64, 0.5 x 0.4 mm pixels; SimpleITK gives it a
    SOPInstanceUID): a chest-like left/right step and a block."""
    import SimpleITK as sitk

    pixels = np.zeros((64, 64), np.uint16)
    pixels[:, 32:] = 1000
    pixels[20:40, 10:20] = 600
    img = sitk.GetImageFromArray(pixels)
    img.SetMetaData("0008|0060", "CR")
    img.SetMetaData("0028|0030", "0.5\\0.4")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def dicom_series_writer() -> Callable[..., list]:
    """:func:`write_dicom_series` as a fixture (``writer(folder, volume, intercept=..., skip=...)``)."""
    return write_dicom_series


@pytest.fixture
def diffusioncore_log():
    """Records of the ``DiffusionCore`` loggers, captured by a handler on that logger itself (so it works
    even after a CLI call turned propagation off). Yields the list of ``logging.LogRecord``."""
    import logging

    records: list[logging.LogRecord] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("DiffusionCore")
    handler = Handler(level=logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (restored afterwards): tiny models are faster without threading."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def chest_like_ct(rows: int = 24, body_offset: float = 0.0) -> np.ndarray:
    """A (24, rows, 24) chest-like CT in HU (meant for 14 mm voxels) with a body, lungs and a spine; the body's
    centre lies ``body_offset`` of the front-to-back half-extent off the array's centre, as a table height can
    put it (24 rows span the body's depth about as 24 columns span its width)."""
    z, y, x = np.meshgrid(np.linspace(-1, 1, 24), np.linspace(-1, 1, rows), np.linspace(-1, 1, 24), indexing="ij")
    y = (y - body_offset) * rows / 24
    ct = np.where((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1, 40.0, -1000.0)
    ct[((np.abs(x) - 0.4) / 0.25) ** 2 + (y / 0.4) ** 2 < 1] = -800.0
    ct += np.where(x**2 + (y - 0.45) ** 2 < 0.015, 900.0, 0.0)
    return ct.astype(np.float32)


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    """A 24^3 chest-like CT (14 mm voxels: a 336 mm cube) with a body, lungs and a spine."""
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    write_volume(Volume(chest_like_ct(), (14.0, 14.0, 14.0)), path)
    return path


#: A stand-in for the modules' DiffusionTrain CLI that behaves like DiffusionCore's trainers: it records its
#: arguments (argv.json), refuses a folder that holds a run unless told to resume or overwrite, appends
#: ``train/loss`` lines to metrics.jsonl (``$FAKE_TRAINER_STEPS`` of them, 1000 by default, 20 per second) and
#: ends cleanly with a checkpoint folder and weights, early when STOP appears; ``--resume`` without a checkpoint fails.
FAKE_TRAINER = """
import argparse, json, os, pathlib, sys, time
p = argparse.ArgumentParser()
for flag in ("--family", "--config", "--data", "--outputDirectory", "--device", "--extraArguments"):
    p.add_argument(flag, default="")
p.add_argument("--resume", action="store_true")
p.add_argument("--overwrite", action="store_true")
a = p.parse_args()
out = pathlib.Path(a.outputDirectory)
(out / "argv.json").write_text(json.dumps(sys.argv[1:]))
if list(out.glob("*.safetensors")) and not (a.resume or a.overwrite):
    print("error: already holds a training run: pass --resume or --overwrite", file=sys.stderr)
    sys.exit(4)
if a.resume and not list(out.glob("checkpoint-*")):
    print(f"error: --resume: no checkpoint in {out}; check the folder's name, or start without --resume", file=sys.stderr)
    sys.exit(3)
step = 0
with open(out / "metrics.jsonl", "a") as f:
    for step in range(1, int(os.environ.get("FAKE_TRAINER_STEPS", "1000")) + 1):
        f.write(json.dumps({"step": step, "tag": "train/loss", "value": 1.0 / step, "time": 0}) + "\\n")
        f.flush()
        if (out / "STOP").exists():
            break
        time.sleep(0.05)
ckpt = out / f"checkpoint-{step:08d}"
ckpt.mkdir(exist_ok=True)
(ckpt / "state.json").write_text(json.dumps({"step": step, "files": {}}))
(out / "model.safetensors").write_text("new run")
"""


def write_fake_trainer(module_dir: Path) -> Path:
    """:data:`FAKE_TRAINER` as ``module_dir/CLI/DiffusionTrain.py`` (point ``TrainingJob.module_dir`` there)."""
    script = module_dir / "CLI" / "DiffusionTrain.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(FAKE_TRAINER)
    return script


def write_cohort_with_unreadable_series(root: Path) -> list[Path]:
    """A cohort of three DICOM CT series of 12 slices of 16x16 at 2.5 mm, as ``collect_volumes`` lists them: p1
    is readable; reading refuses p2 (a missing slice) and p3 (2.5 mm, then 5 mm apart)."""
    import pydicom

    good = Volume(ct_phantom_array((12, 16, 16)), (0.8, 0.8, 2.5), (0.0, 0.0, 0.0))
    write_dicom_series(root / "p1" / "ct", good, series_uid="1.2.826.0.1.3680043.8.498.11")
    write_dicom_series(root / "p2" / "ct", good, series_uid="1.2.826.0.1.3680043.8.498.12", skip=(5,))
    files = write_dicom_series(root / "p3" / "ct", good, series_uid="1.2.826.0.1.3680043.8.498.13")
    for k, f in enumerate(files[8:], start=8):  # 2.5 mm apart, then 5 mm
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [0.0, 0.0, 20.0 + 5.0 * (k - 8)]
        ds.save_as(f)
    return [root / "p1" / "ct", root / "p2" / "ct", root / "p3" / "ct"]


def passed_over(records) -> list[str]:
    """The warnings of :func:`DiffusionCore.inputs.readable_volumes` about series it passed over."""
    return [r.getMessage() for r in records if r.levelno >= 30 and "passed over" in r.getMessage()]


def save_scene(scene, nodes, path: Path) -> Path:
    """Save ``scene`` as ``path`` (.mrml) with each of ``nodes`` written beside it as ``<node ID>.nrrd``, as
    Slicer's Save does; returns ``path``."""
    for node in nodes:
        node.GetStorageNode() or node.AddDefaultStorageNode()
        node.GetStorageNode().SetFileName(str(path.parent / f"{node.GetID()}.nrrd"))
        assert node.GetStorageNode().WriteData(node)
    scene.SetURL(str(path))
    assert scene.Commit()
    return path


def hold_after_stage_1(job) -> None:
    """Stop (SIGSTOP) an X-ray job's worker as soon as it reports stage 1, so that a test acts during stage 2 however
    fast the tiny model's stage 2 is (half a second): a cancel then takes the runner's grace period, a kill is at
    once."""
    import json
    import signal

    from XrayToCTLib.xray_logic import STAGE_LINE_PREFIX

    handle = job.handle_line

    def hold(line: str) -> None:
        handle(line)
        if line.startswith(STAGE_LINE_PREFIX) and json.loads(line[len(STAGE_LINE_PREFIX):]).get("stage") == 1:
            os.killpg(job.runner.pid, signal.SIGSTOP)

    job.handle_line = hold


def until_stage_1_is_shown(job) -> None:
    """Wait for stage 1's preview of an X-ray job just started, its worker held in stage 2
    (:func:`hold_after_stage_1`)."""
    import time

    from CTDiffusionSRLib.process import JobState

    hold_after_stage_1(job)
    deadline = time.monotonic() + 120
    while job.poll() == JobState.RUNNING and job.preview_node is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.state == JobState.RUNNING and job.stages_shown == [1], "stage 1's preview expected first"


@pytest.fixture
def tokyo(monkeypatch):
    """This computer's clock in Japan's zone (POSIX rule: no time zone database needed)."""
    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def job_tmp(tmp_path, monkeypatch) -> Path:
    """The temp folder jobs make their folders in (``tempfile.gettempdir()``), private to the test."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def ended_pid():
    """The pid of a process that has ended (a job or training run that crashed), for the stale-owner checks."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid
