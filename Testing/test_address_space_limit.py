"""A session with an address-space limit (``ulimit -v``; batch schedulers set one): the commands say so before they
try, instead of a raw traceback from loading PyTorch, a loop that never ends just under 1 GiB, or an out-of-memory
failure a minute into a run that could never fit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ct_phantom_array

from DiffusionCore.volume import Volume, write_volume

resource = pytest.importorskip("resource", reason="POSIX only (ulimit -v)")
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")


def _run_limited(limit_bytes: int, *args: str, cwd) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "DiffusionCore", *args], cwd=cwd, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, encoding="utf-8",
                          timeout=120)  # fmt: skip


def _one_error(stderr: str) -> str:
    assert "Traceback" not in stderr and "MemoryError" not in stderr, stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("error:")]
    return line


def test_a_limit_too_small_to_load_pytorch_is_named_before_loading_it(tmp_path):
    proc = _run_limited(800 << 20, "--help", cwd=tmp_path)
    assert proc.returncode == 5, proc.stderr
    line = _one_error(proc.stderr)
    assert "ulimit -v" in line and "800 MiB" in line and "raise the limit" in line, line


def test_a_run_that_cannot_fit_under_the_limit_is_refused_before_the_work_naming_the_limit(tmp_path):
    array = np.full((48, 256, 256), -1000.0, np.float32)
    array[:, 48:208, 48:208] = ct_phantom_array((48, 160, 160))
    write_volume(Volume(array, spacing=(0.8, 0.8, 5.0)), tmp_path / "thick.nii.gz")
    # about 1.2 GiB is mapped once PyTorch is loaded, so 1.4 GiB leaves far less than the 384 MiB a x8 result needs
    proc = _run_limited(1400 << 20, "sr", "thick.nii.gz", "thin.nii.gz", "--factor", "8", "--no-adapt",
                        "--progress", "none", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    line = _one_error(proc.stderr)
    assert "address-space limit (ulimit -v) leaves" in line and "384x256x256" in line, line
    assert "raise that limit" in line, line
    assert not (tmp_path / "thin.nii.gz").exists()
