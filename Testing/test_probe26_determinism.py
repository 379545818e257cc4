"""Reproducibility audit (probe 26): what a run's output depends on is pinned and recorded.

- ``sr`` and ``xray2ct`` take ``--threads N`` (their output depends on torch's thread count), apply it, and record it
  in the provenance (``torch_threads``); xray2ct records the thread count too.
- ``--seed`` outside 0..2**32-1 is refused when the command line is parsed (such seeds repeated smaller ones:
  ``--seed 4294967296`` gave ``--seed 0``'s output); the Python API refuses it with a ConfigError.
- the Python API's adaptation leaves the caller's global torch random stream as it was, and its result for a seed
  does not depend on that stream.
- a CT made from a DICOM radiograph records the radiograph's SOPInstanceUID whatever the output format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ct_phantom_array, write_cr_radiograph

from DiffusionCore.errors import ConfigError
from DiffusionCore.provenance import read_provenance
from DiffusionCore.seeds import MAX_SEED
from DiffusionCore.sr.adapt import AdaptSettings
from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.volume import Volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
#: one thread unless a test's --threads says otherwise, so that --threads 2 is seen to change it
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def command(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "DiffusionCore", *argv, "--progress", "none"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def thick_ct(tmp_path_factory) -> Path:
    """A small thick-slice CT phantom (4 slices of 32x32 at 3.2 mm)."""
    d = tmp_path_factory.mktemp("ct")
    return write_volume(Volume(ct_phantom_array((4, 32, 32)), (0.8, 0.8, 3.2), (-12.0, -12.0, -20.0)),
                        d / "thick.nii.gz", dtype="float32")  # fmt: skip


@pytest.fixture(scope="module")
def dicom_radiograph(tmp_path_factory) -> Path:
    """A small DICOM radiograph (CR, MONOCHROME2, 0.5 x 0.4 mm pixels) with its SOPInstanceUID."""
    return write_cr_radiograph(tmp_path_factory.mktemp("xr") / "chest.dcm")


def settings_of(output: Path) -> dict:
    prov = read_provenance(output)
    assert prov is not None, f"{output} has no provenance"
    return prov.settings


# -- D1 / D7: --threads is applied and recorded ------------------------------------------------------------------


def test_sr_threads_is_applied_and_recorded_in_the_provenance(thick_ct, tmp_path):
    pinned, default = tmp_path / "t2.nii.gz", tmp_path / "t0.nii.gz"
    common = ["--tiny-test-model", "--factor", "2", "--num-steps", "1", "--device", "cpu", "--no-adapt"]
    done = command("sr", str(thick_ct), str(pinned), *common, "--threads", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    done = command("sr", str(thick_ct), str(default), *common)
    assert done.returncode == 0, done.stderr[-2000:]
    assert settings_of(pinned)["torch_threads"] == 2  # OMP_NUM_THREADS=1 in the environment: --threads wins
    assert settings_of(default)["torch_threads"] == 1  # without it: torch's default, from OMP_NUM_THREADS
    sidecar = json.loads(pinned.with_name("t2.json").read_text())
    assert sidecar["provenance"]["settings"]["torch_threads"] == 2


def test_sr_and_xray2ct_help_name_the_thread_count_beside_the_seed():
    for cmd in ("sr", "xray2ct"):
        done = subprocess.run([sys.executable, "-m", "DiffusionCore", cmd, "--help"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        text = " ".join(done.stdout.split())
        assert done.returncode == 0 and "--threads N" in text
        assert "the same seed, device and thread count give the same" in text
        assert "same seed, same device: same output" not in text


def test_xray2ct_threads_is_applied_and_recorded_and_the_largest_seed_runs(dicom_radiograph, tmp_path):
    out, report = tmp_path / "ct.nii.gz", tmp_path / "r.json"
    done = command("xray2ct", str(dicom_radiograph), str(out), "--tiny-test-model", "--num-stages", "1", "--steps",
                   "1", "--device", "cpu", "--threads", "2", "--seed", str(MAX_SEED), "--report", str(report))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    settings = settings_of(out)
    assert settings["torch_threads"] == 2 and settings["seed"] == MAX_SEED
    assert json.loads(report.read_text())["settings"]["torch_threads"] == 2


# -- D8: seeds outside 0..2**32-1 are refused --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [str(2**32), "-1", "1e3"])
@pytest.mark.parametrize("cmd", ["sr", "xray2ct"])
def test_a_seed_outside_32_bits_is_refused_when_parsed(cmd, seed, thick_ct, dicom_radiograph, tmp_path):
    source = thick_ct if cmd == "sr" else dicom_radiograph
    out = tmp_path / "out.nii.gz"
    done = command(cmd, str(source), str(out), "--tiny-test-model", f"--seed={seed}")
    assert done.returncode == 2
    assert f"argument --seed: must be a whole number from 0 to {2**32 - 1}" in done.stderr
    assert f"got '{seed}'" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def tiny_scan() -> Volume:
    """A thick scan that the tiny predictor adapts to (in-plane slices large enough for x2 pairs)."""
    return Volume(ct_phantom_array((6, 64, 64), seed=1), (0.8, 0.8, 3.2), (-25.0, -25.0, -10.0))


def test_the_python_api_refuses_a_seed_outside_32_bits():
    resolver = SuperResolver.tiny_predictor(seed=0)
    for seed in (2**32, -1):
        with pytest.raises(ConfigError, match=r"seed must be from 0 to 4294967295"):
            resolver.run(tiny_scan(), factor=2, seed=seed, device="cpu", adapt=AdaptSettings(steps=2))


# -- D9: the caller's global random stream is left alone ---------------------------------------------------------


def test_adaptation_leaves_the_callers_random_stream_and_its_result_follows_the_seed_alone():
    resolver = SuperResolver.tiny_predictor(seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, report = resolver.run(tiny_scan(), factor=2, seed=5, device="cpu", adapt=AdaptSettings(steps=3))
    assert report["predictor"]["adaptation"]["steps"] == 3  # the adaptation ran
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream goes on from its own seed

    torch.manual_seed(999)  # another caller state: the same seed gives the same volume
    again, _ = resolver.run(tiny_scan(), factor=2, seed=5, device="cpu", adapt=AdaptSettings(steps=3))
    other, _ = resolver.run(tiny_scan(), factor=2, seed=6, device="cpu", adapt=AdaptSettings(steps=3))
    np.testing.assert_array_equal(first.array, again.array)
    assert not np.array_equal(first.array, other.array), "another seed must adapt on other pairs"


# -- D12: the radiograph's UID in every output format -----------------------------------------------------------


def test_xray2ct_records_a_dicom_radiographs_uid_in_nifti_and_nrrd_outputs(dicom_radiograph, tmp_path):
    import pydicom

    uid = str(pydicom.dcmread(dicom_radiograph, stop_before_pixels=True).SOPInstanceUID)
    assert uid
    for name in ("ct.nii.gz", "ct.nrrd"):
        out = tmp_path / name
        done = command("xray2ct", str(dicom_radiograph), str(out), "--tiny-test-model", "--num-stages", "1",
                       "--steps", "1", "--device", "cpu")  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        prov = read_provenance(out)
        assert prov is not None and prov.input_uid == uid, name
    assert json.loads((tmp_path / "ct.json").read_text())["provenance"]["input_uid"] == uid

