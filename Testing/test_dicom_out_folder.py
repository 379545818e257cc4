"""The DICOM series folder as a file system object: the permissions it is published with, and the hidden
folders (``.NAME.PID.XXXXXXXX.partial``) that a run killed outright leaves and the next write removes.

Real folders under ``tmp_path``, written by :func:`DiffusionCore.dicom_out.write_dicom_series`; the killed
run is a child process that ``SIGKILL``s itself half-way through the series.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pydicom
import pytest

from DiffusionCore.dicom_out import write_dicom_series
from DiffusionCore.provenance import Provenance

ROOT = Path(__file__).resolve().parents[1]
#: A process id no process has (above Linux's largest, 2**22): its partial files are stale.
DEAD_PID = 999999999


def _provenance() -> Provenance:
    return Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {"factor": 2})


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def sleeper():
    """A child process that sleeps: a live process id, as another run writing the same output has."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_a_written_series_has_the_permissions_of_the_umask(tmp_path, make_phantom, umask, folder_mode, file_mode):
    vol = make_phantom(shape=(4, 16, 16))
    old = os.umask(umask)
    try:
        first = write_dicom_series(vol, tmp_path / "thin", _provenance())
        replaced = write_dicom_series(vol, tmp_path / "again", _provenance())
        write_dicom_series(vol, replaced, _provenance(), overwrite=True)
    finally:
        os.umask(old)
    for series in (first, replaced):
        assert stat.S_IMODE(series.stat().st_mode) == folder_mode, series  # mkdtemp made it 0700
        for f in series.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == file_mode, f
    assert _hidden(tmp_path) == []


def test_stale_partial_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path, make_phantom, sleeper):
    out = tmp_path / "thin"
    stale = [f".thin.{DEAD_PID}.abcd1234.partial", f".thin.{DEAD_PID}.efgh5678.partial.old",
             ".thin.k2j3h4ab.partial"]  # fmt: skip  # the last named before the process id was added
    live = [f".thin.{sleeper.pid}.wxyz0000.partial", f".thin.{sleeper.pid}.wxyz1111.partial.old",
            f".thin.json.{sleeper.pid}.wxyz2222.partial"]  # fmt: skip  # the last: another output, thin.json
    for name in (*stale, *live):
        (tmp_path / name / "series").mkdir(parents=True)
        (tmp_path / name / "series" / "00001.dcm").write_bytes(b"half a slice")

    write_dicom_series(make_phantom(shape=(4, 16, 16)), out, _provenance())

    assert len(list(out.iterdir())) == 4
    assert _hidden(tmp_path) == sorted(live)


def test_the_folder_of_a_killed_write_is_removed_by_the_next_write(tmp_path, make_phantom):
    out = tmp_path / "thin"
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        import pydicom
        from DiffusionCore.dicom_out import write_dicom_series
        from DiffusionCore.provenance import Provenance
        from DiffusionCore.volume import Volume

        save = pydicom.Dataset.save_as
        def save_then_die(self, *args, **kwargs):
            save(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 after the first slice: nothing can clean up
        pydicom.Dataset.save_as = save_then_die
        write_dicom_series(Volume(np.zeros((6, 16, 16), np.float32), (1.0, 1.0, 2.0)), {str(out)!r},
                           Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {{"factor": 2}}))
        """)  # fmt: skip
    killed = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, err
    left = _hidden(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".thin.{killed.pid}.") and left[0].endswith(".partial"), left
    assert not out.exists() and [f.name for f in (tmp_path / left[0]).iterdir()] == ["00001.dcm"]

    write_dicom_series(make_phantom(shape=(4, 16, 16)), out, _provenance())

    assert _hidden(tmp_path) == []
    assert [pydicom.dcmread(f).InstanceNumber for f in sorted(out.iterdir())] == [1, 2, 3, 4]
