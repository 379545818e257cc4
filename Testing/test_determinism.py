"""Same seed, same device, same weights, same thread count: the same output, bit for bit.

Checked on the CPU for super-resolution and X-ray to CT, twice in one process and in two separate
``python -m DiffusionCore`` processes (whose outputs must also equal the in-process result). Another seed
must give another output, so the checks cannot pass by ignoring the seed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ct_phantom_array

from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.volume import Volume, read_volume, write_volume
from DiffusionCore.xray.pipeline import XrayToCTGenerator

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the command-line processes below run with OMP_NUM_THREADS=1 too
    yield
    torch.set_num_threads(before)


def run_twice_in_parallel(argvs: list[list[str]]) -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "DiffusionCore", *a], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for a in argvs]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]


def test_sr_same_seed_same_output_in_one_process_and_across_processes(tmp_path, one_thread):
    thick = Volume(ct_phantom_array((4, 32, 32)), (0.8, 0.8, 3.2), (-12.0, -12.0, -20.0))
    src = write_volume(thick, tmp_path / "thick.nii.gz", dtype="float32")
    opts = {
        "factor": 4,
        "steps": 2,
        "seed": 5,
        "device": "cpu",
        "patch_size": (8, 32, 32),
        "overlap": (4, 0, 0),
    }
    a, _ = SuperResolver.tiny(seed=0).run(read_volume(src), **opts)
    b, _ = SuperResolver.tiny(seed=0).run(read_volume(src), **opts)
    c, _ = SuperResolver.tiny(seed=0).run(read_volume(src), **{**opts, "seed": 6})
    np.testing.assert_array_equal(a.array, b.array)
    assert np.abs(a.array - c.array).max() > 1.0, "another seed must give another sample"

    outs = [tmp_path / f"run{i}.nii.gz" for i in (1, 2)]
    run_twice_in_parallel([["sr", str(src), str(o), "--tiny-test-model", "--factor", "4", "--num-steps", "2",
                            "--seed", "5", "--device", "cpu", "--use-patches", "--patch-size", "8", "32", "32",
                            "--overlap", "4", "0", "0", "--progress", "none"] for o in outs])  # fmt: skip
    first, second = (read_volume(o).array for o in outs)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, a.array)


@pytest.fixture
def xray_weights(tmp_path) -> Path:
    """The tiny random cascade with its zero-initialised output layers filled (fixed generator), so that its
    volumes depend on the noise; saved like trained weights (used with --allow-unregistered-weights)."""
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

    cascade = UnifiedHybridViTCascade.tiny(0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cascade.parameters():
            if p.numel() and float(p.abs().max()) == 0.0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    path = tmp_path / "xray.safetensors"
    cascade.save_pretrained(path)
    return path


def test_xray_same_seed_same_output_in_one_process_and_across_processes(tmp_path, one_thread, xray_weights):
    y, x = np.mgrid[0:64, 0:64] / 63.0 - 0.5
    pixels = (
        2000 + 1500 * np.exp(-((x / 0.12) ** 2)) - 800 * ((np.abs(x) - 0.2) ** 2 / 0.02 + y**2 / 0.12 < 1)
    )
    src = tmp_path / "chest.png"
    sitk.WriteImage(sitk.GetImageFromArray(pixels.astype(np.uint16)), str(src))
    opts = {"num_stages": 2, "steps": 2, "device": "cpu"}

    def generate(seed: int) -> np.ndarray:
        generator = XrayToCTGenerator.from_pretrained(str(xray_weights), allow_unregistered=True)
        return generator.run(str(src), seed=seed, **opts)[0].array

    a, b, c = generate(3), generate(3), generate(4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1.0, "another seed must give another volume"

    outs = [tmp_path / f"ct{i}.nii.gz" for i in (1, 2)]
    run_twice_in_parallel([["xray2ct", str(src), str(o), "--weights", str(xray_weights), "--allow-unregistered-weights",
                            "--num-stages", "2", "--steps", "2", "--seed", "3", "--device", "cpu", "--progress", "none"]
                           for o in outs])  # fmt: skip
    first, second = (read_volume(o, check=False).array for o in outs)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, a)
