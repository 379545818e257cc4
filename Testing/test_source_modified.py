"""A result made by code edited since its commit says so: the provenance's ``modified`` and the evaluation JSON's
``source_modified`` name the code files that differ from the recorded commit, so that a researcher does not try to
rebuild the result from a commit that did not make it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from DiffusionCore import provenance
from DiffusionCore.provenance import Provenance, read_provenance
from DiffusionCore.results import write_result
from DiffusionCore.version import modified_code_files
from DiffusionCore.volume import Volume

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git program")


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root), *args], check=True,
                   capture_output=True)  # fmt: skip


def _checkout(root: Path) -> Path:
    (root / "DiffusionCore" / "sr").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "DiffusionCore" / "sr" / "adapt.py").write_text("STEPS = 400\n")
    (root / "DiffusionCore" / "sr" / "planes.py").write_text("WIDTH = 96\n")
    (root / "docs" / "notes.md").write_text("notes\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "first")
    return root


@needs_git
def test_edited_code_files_are_named_and_other_changes_are_not(tmp_path):
    root = _checkout(tmp_path)
    assert modified_code_files(root) == []  # a clean checkout
    (root / "docs" / "notes.md").write_text("edited notes\n")  # not code: does not change a result
    (root / "DiffusionCore" / "new.py").write_text("X = 1\n")  # untracked: nothing imports it yet
    assert modified_code_files(root) == []
    (root / "DiffusionCore" / "sr" / "adapt.py").write_text("STEPS = 800\n")
    assert modified_code_files(root) == ["DiffusionCore/sr/adapt.py"]
    _git(root, "mv", "DiffusionCore/sr/planes.py", "DiffusionCore/sr/pairs.py")  # a staged rename: its new name
    assert modified_code_files(root) == ["DiffusionCore/sr/adapt.py", "DiffusionCore/sr/pairs.py"]
    assert modified_code_files(tmp_path / "docs") is None  # not the top of a checkout: cannot be told


def test_a_result_of_edited_code_records_it_and_a_clean_one_does_not(tmp_path, monkeypatch):
    vol = Volume(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 2.0))

    def written(name: str) -> dict[str, str]:
        prov = Provenance(task="sr", title="SR x2 (synthetic)", weights="sr-default", weights_sha256="ab" * 32,
                          settings={"factor": 2, "device": "cpu"}, input="/data/thick.nii.gz")  # fmt: skip
        out = tmp_path / name
        write_result(vol, out, prov, as_dicom=name.startswith("series"))
        return read_provenance(next(iter(sorted(out.iterdir()))) if out.is_dir() else out).environment

    edited = "2 files: DiffusionCore/sr/adapt.py, DiffusionCore/sr/planes.py"
    for state in ("", edited):
        monkeypatch.setattr(provenance, "source_modified", lambda state=state: state)
        provenance._process_environment.cache_clear()
        try:
            for name in (f"ct{len(state)}.nii.gz", f"ct{len(state)}.nrrd", f"series{len(state)}"):
                env = written(name)
                assert env.get("modified", "") == state, (name, env)
        finally:
            provenance._process_environment.cache_clear()
