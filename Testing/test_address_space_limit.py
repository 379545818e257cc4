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
    # what `sr` maps before its memory check (PyTorch, ITK, the volume read: about 1.2 GiB here, more with another
    # build of PyTorch), plus 250 MiB: far less than the 384 MiB a x8 result needs
    probe = ("import torch, SimpleITK, DiffusionCore.cli.main, DiffusionCore.cli.sr, DiffusionCore.sr.pipeline; "
             "from DiffusionCore.volume import read_volume; read_volume('thick.nii.gz'); "
             "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])")  # fmt: skip
    mapped = int(subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                                check=True, timeout=120).stdout.strip()) * 1024  # fmt: skip
    proc = _run_limited(mapped + (250 << 20), "sr", "thick.nii.gz", "thin.nii.gz", "--factor", "8", "--no-adapt",
                        "--progress", "none", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    line = _one_error(proc.stderr)
    assert "address-space limit (ulimit -v) leaves" in line and "384x256x256" in line, line
    assert "raise that limit" in line, line
    assert not (tmp_path / "thin.nii.gz").exists()


#: Runs ``python -m DiffusionCore --help`` with ``import torch`` failing as MESSAGE (the dynamic loader's words).
TORCH_FAILS = """
import runpy, sys
MESSAGE = sys.argv[1]
class Fail:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise ImportError(MESSAGE)
sys.meta_path.insert(0, Fail())
sys.argv = ["DiffusionCore", "--help"]
runpy.run_module("DiffusionCore", run_name="__main__", alter_sys=True)
"""


def test_pytorch_that_cannot_be_mapped_is_said_as_memory_and_a_broken_install_keeps_its_traceback(tmp_path):
    """Another build of PyTorch may not fit above the threshold either (Python 3.12's needs more than 1.6 GiB):
    the dynamic loader's "failed to map segment" is said as too little memory; other import errors are not."""
    script = tmp_path / "torch_fails.py"
    script.write_text(TORCH_FAILS, encoding="utf-8")

    def run(message: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), message], cwd=tmp_path, capture_output=True,
                              encoding="utf-8", timeout=120)  # fmt: skip

    proc = run("libtorch_cpu.so: failed to map segment from shared object")
    assert proc.returncode == 5, proc.stderr
    line = _one_error(proc.stderr)
    assert "not enough memory to start" in line and "loading PyTorch failed (ImportError)" in line, line
    proc = run("No module named 'torch'")  # a broken install is no memory problem: its own traceback
    assert proc.returncode == 1 and "No module named 'torch'" in proc.stderr and "not enough memory" not in proc.stderr
