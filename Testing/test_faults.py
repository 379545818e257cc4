"""Faults a user meets: a training process killed with ``kill -9`` and resumed, an inference process killed
mid-run, a Slicer background job whose worker dies, and memory that runs out. (A Cancel in Slicer is
covered in test_slicer_lib.py: the SR and X-ray jobs leave no node, no process and no temporary folder.)

What must hold: a resumed run takes exactly the step an uninterrupted run takes next; a killed inference
leaves no output and no temporary file; a dead or cancelled Slicer job leaves no node, no temporary folder
and says what happened; running out of memory either shrinks the tiles or stops with a ResourceError that
says what to change (exit code 5 on the command line).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ct_phantom_array, until_stage_1_is_shown
from safetensors.torch import load_file

from DiffusionCore.cli.common import run_guarded
from DiffusionCore.errors import ResourceError
from DiffusionCore.sr.config import tiny_config
from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.train.checkpoint import find_latest, read_checkpoint_info
from DiffusionCore.volume import Volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "DiffusionCore", *args]


def leftovers(folder: Path) -> list[str]:
    """Hidden or temporary entries a write may leave behind (``.name.*.partial``, ``.tmp-...``)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "partial" in p.name)


# -- training: kill -9, then --resume ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    data.mkdir()
    write_volume(Volume(ct_phantom_array((40, 40, 40)), (0.7, 0.7, 1.0)), data / "a.nii.gz")
    cfg = tiny_config()
    config = root / "tiny.json"
    config.write_text(json.dumps({"vae": {"channels": list(cfg.vae.channels)},
                                  "train": {"val_patches": 1, "val_fraction": 0.3, "val_every": 0}}))  # fmt: skip
    return data, config


def train_vae_command(data: Path, config: Path, out: Path, max_steps: int, *extra: str) -> list[str]:
    return command("train", "vae", "--config", str(config), "--data", str(data), "--out-dir", str(out),
                   "--patch-size", "8", "32", "32", "--batch-size", "1", "--device", "cpu", "--checkpoint-every", "1",
                   "--max-steps", str(max_steps), "--seed", "7", *extra)  # fmt: skip


def test_kill_9_during_training_then_resume_takes_the_uninterrupted_next_step(train_setup, tmp_path):
    data, config = train_setup
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_vae_command(data, config, killed, 10_000), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            latest = find_latest(killed) if killed.is_dir() else None
            if latest is not None and read_checkpoint_info(latest)["step"] >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was being written stays half-written
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    latest = find_latest(killed)
    assert latest is not None, "a complete checkpoint must survive the kill"
    step = int(read_checkpoint_info(latest)["step"])
    nxt = step + 1

    resumed = subprocess.run(train_vae_command(data, config, killed, nxt, "--resume"), cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = subprocess.run(train_vae_command(data, config, tmp_path / "straight", nxt), cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=240)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-2000:]

    name = f"checkpoint-{nxt:08d}"
    a = load_file(killed / name / "vae.safetensors")
    b = load_file(tmp_path / "straight" / name / "vae.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed step differs from the uninterrupted one"
    before = load_file(latest / "vae.safetensors")
    assert any(not torch.equal(a[k], before[k]) for k in a), "the resumed run must really take a step"
    assert not [p.name for p in killed.iterdir() if p.name.startswith((".tmp-", ".trash-"))], (
        "the half-written checkpoint of the killed run must be cleaned up on resume"
    )


# -- inference: kill -9 leaves nothing ---------------------------------------------------------------------
def test_kill_9_during_sr_leaves_no_output_and_no_temporary_file(tmp_path):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = write_volume(Volume(ct_phantom_array((8, 64, 64)), (0.8, 0.8, 3.2)), src_dir / "thick.nii.gz")
    before = src.read_bytes()
    out = out_dir / "thin.nii.gz"
    proc = subprocess.Popen(command("sr", str(src), str(out), "--tiny-test-model", "--factor", "4", "--use-patches",
                                    "--patch-size", "8", "32", "32", "--progress", "slicer"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    fraction = 0.0
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:  # wait until sampling is under way, then kill without warning
            if line.startswith("<filter-progress>"):
                fraction = float(line[len("<filter-progress>") : -len("</filter-progress>") - 1])
                if fraction > 0:
                    break
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL and 0 < fraction < 1
    assert not out.exists()
    assert list(out_dir.iterdir()) == [], "a killed run must leave nothing in the output folder"
    assert src.read_bytes() == before


# -- Slicer jobs: a worker that dies, a cancel -------------------------------------------------------------------
def _radiograph_node(scene):
    import vtk
    from CTDiffusionSRLib.testing import phantom_radiograph
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chest PA")
    image = vtk.vtkImageData()
    image.SetDimensions(64, 64, 1)
    pixels = (phantom_radiograph(64) * 3000).astype(np.float32)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(pixels.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(5.0, 5.0, 1.0)
    return node


def test_worker_killed_after_a_preview_keeps_that_stage_and_says_so(scene, tmp_path, monkeypatch):
    """The system's out-of-memory killer (or anyone) ends the worker with SIGKILL after stage 1 was shown:
    the job fails with a message that names the kill and says that stage 1's result was kept; the temporary folder
    goes."""
    import tempfile

    from CTDiffusionSRLib import mrml_io
    from CTDiffusionSRLib.process import JobState
    from XrayToCTLib import XrayJob, XraySettings

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    node = _radiograph_node(scene)
    mrml_io.subject_hierarchy(scene)  # Slicer always has one; here it would otherwise appear with the preview
    ids_before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    job = XrayJob(
        scene, node, XraySettings(num_stages=2, steps=25, device="cpu", tiny_test_model=True)
    ).start()
    until_stage_1_is_shown(job)  # the worker held in stage 2: the tiny model's stage 2 could end before the kill
    os.kill(job.runner.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert job.state == JobState.FAILED
    assert "killed (SIGKILL)" in job.error and "only stage 1's result was kept" in job.error
    ids_after = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    preview = job.preview_node  # a finished stage is a result: kept (Testing/test_xray_slicer_scene.py says why)
    assert ids_after - ids_before == {preview.GetID(), preview.GetDisplayNodeID(), preview.GetStorageNodeID()}
    assert not list(tmp_path.glob("ctdiffusion-*"))


# -- out of memory ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> SuperResolver:
    torch.set_num_threads(1)
    return SuperResolver.tiny(seed=0)


def _thick(shape=(4, 32, 32)) -> Volume:
    return Volume(ct_phantom_array(shape), (0.8, 0.8, 3.2), (0.0, 0.0, 0.0))


def test_memory_cap_shrinks_tiles_and_states_the_budget(tiny, monkeypatch):
    vol = _thick((4, 64, 64))
    _, free = tiny.run(vol, factor=4, steps=1)
    full = free["memory"]["host_estimate_bytes"]
    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", str(full - 1))  # the cap the command line also reads
    out, capped = tiny.run(vol, factor=4, steps=1)
    assert out.shape == (16, 64, 64) and np.isfinite(out.array).all()
    assert capped["tiles"]["reduced_from"] == [free["settings"]["patch_size"]]
    assert np.prod(capped["settings"]["patch_size"]) < np.prod(free["settings"]["patch_size"])
    assert capped["memory"]["host_limit_bytes"] == full - 1 >= capped["memory"]["host_estimate_bytes"]
    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", "lots")
    from DiffusionCore.errors import ConfigError

    with pytest.raises(ConfigError, match="DIFFUSIONCORE_MEMORY_LIMIT.*512MiB"):
        tiny.run(vol, factor=4, steps=1)


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"
        ),  # fmt: skip
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        MemoryError(),
    ],
    ids=["cpu-allocator", "cuda", "python"],
)
def test_allocation_failure_during_sampling_is_a_resource_error(tiny, monkeypatch, failure):
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise failure

    monkeypatch.setattr(tiny.model, "super_resolve_patch", fail)
    with pytest.raises(
        ResourceError, match=r"out of memory on cpu .* patch\(es\) of \d+x\d+x\d+ voxels.*--patch-size"
    ):
        tiny.run(_thick(), factor=4, steps=1)
    assert calls == [1]


def test_a_bug_is_not_mistaken_for_out_of_memory(tiny, monkeypatch):
    monkeypatch.setattr(tiny.model, "super_resolve_patch", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        tiny.run(_thick(), factor=4, steps=1)


def test_command_line_turns_allocation_failures_into_exit_code_5(capsys):
    def body():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert run_guarded(body, memory_hint="use smaller patches (--patch-size)") == 5
    err = capsys.readouterr().err.splitlines()
    assert err == [  # a GPU's: the CPU is offered too
        "error: out of memory on the GPU: use smaller patches (--patch-size), run on the CPU (--device cpu: slower, "
        "with the machine's memory), or use a GPU with more memory."
    ]
    assert run_guarded(lambda: (_ for _ in ()).throw(RuntimeError("a bug"))) == 1


def test_x_ray_commands_out_of_memory_advise_fewer_stages_not_patches(monkeypatch, capsys):
    """xray2ct and evaluate-xray have no --patch-size, which the out-of-memory error advised them."""
    from DiffusionCore.cli import main as cli_main
    from DiffusionCore.cli import xray as cli_xray

    def out_of_memory(args):
        raise MemoryError()

    monkeypatch.setattr(cli_xray, "run_xray2ct", out_of_memory)
    monkeypatch.setattr(cli_xray, "run_evaluate", out_of_memory)
    for argv in (["xray2ct", "chest.png", "ct.nrrd"], ["evaluate-xray", "--reference", "ct.nrrd"]):
        assert cli_main.main(argv) == 5
        err = capsys.readouterr().err
        assert "out of memory: run fewer stages or samples (--num-stages, --num-samples)" in err, err
        assert "--patch-size" not in err


def test_a_memory_refusal_under_the_users_cap_says_it_is_the_cap(monkeypatch):
    # "... but 2.0 GiB is available" read as the machine's free memory when it was the variable's cap
    from DiffusionCore.files import check_memory_for

    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", "1MiB")
    with pytest.raises(ResourceError) as caught:
        check_memory_for(8 << 20, "super-resolving onto 16x512x512 voxels", "use a smaller factor")
    message = str(caught.value)
    assert "needs about 8.0 MiB, but DIFFUSIONCORE_MEMORY_LIMIT allows 1.0 MiB" in message
    assert "Use a smaller factor, or raise DIFFUSIONCORE_MEMORY_LIMIT." in message and "is available" not in message
