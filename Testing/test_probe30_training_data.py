"""Probe 30: what training takes as ground-truth CT, and what its exported weights say.

* the product's own synthetic results (``sr`` / ``xray2ct`` outputs, marked in their headers) and the cubes
  ``prepare-xray-data`` wrote are passed over with one line each, not trained on;
* a volume whose values are not CT in HU (MR-like 0..1200) is passed over with a warning, as ``sr`` refuses it;
* a volume too small for any training plane is passed over, naming the size it needs, and not counted;
* ``--resume`` with ``--init-from`` is refused before any work; the starting weights are kept across resumes;
* the exported weights name how many volumes they were trained on, never the user's file names.

Tiny real runs through the command line (in this process: ``main``), on the CPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array

from DiffusionCore.cli.main import main
from DiffusionCore.errors import InputError
from DiffusionCore.inputs import readable_volumes
from DiffusionCore.provenance import Provenance, provenance_header
from DiffusionCore.volume import Volume, write_volume
from DiffusionCore.weights.registry import load_safetensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYNTHETIC = "a synthetic image made by CTDiffusion (SR x8, weights mine), not an acquired CT"


def _ct(seed: int = 3, shape: tuple[int, int, int] = (60, 64, 64)) -> Volume:
    return Volume(ct_phantom_array(shape, seed=seed), spacing=(0.8, 0.8, 1.0))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``data/Doe_John_MRN123.nii.gz``: a CT; ``data/sr_mine.nrrd``: an SR result (synthetic header);
    ``data/prep/``: a ``prepare-xray-data`` folder (manifest.json, ``0000_x/cube_64.nii.gz``); ``odd/mr.nii.gz``:
    MR-like values 0..1200; ``odd/tiny.nii.gz``: 40 slices of 20x20; ``tp.json``: a tiny recipe."""
    root = tmp_path_factory.mktemp("probe30").resolve()
    data, odd = root / "data", root / "odd"
    data.mkdir()
    odd.mkdir()
    write_volume(_ct(3), data / "Doe_John_MRN123.nii.gz")
    prov = Provenance("sr", "SR x8 (synthetic)", "mine", "ab" * 32, {"factor": 8})
    write_volume(_ct(5), data / "sr_mine.nrrd", header=provenance_header(prov))
    (data / "prep" / "0000_x").mkdir(parents=True)
    (data / "prep" / "manifest.json").write_text(json.dumps({"fov_mm": 350.0, "cases": []}))
    write_volume(_ct(7), data / "prep" / "0000_x" / "cube_64.nii.gz")
    mr = np.clip(ct_phantom_array((60, 64, 64), seed=9) + 1000.0, 0, 1200).astype(np.float32)
    write_volume(Volume(mr, spacing=(0.8, 0.8, 1.0)), odd / "mr.nii.gz")
    write_volume(_ct(11, (40, 20, 20)), odd / "tiny.nii.gz")
    (root / "tp.json").write_text(json.dumps({
        "model": {"channels": 8, "blocks": 1, "factors": [2, 4]}, "pairs": {"thick_rows": 6, "width": 32},
        "batch_size": 4, "val_every": 2, "checkpoint_every": 2, "val_pairs": 4, "warmup_steps": 0,
    }))  # fmt: skip
    return root


def _train(root: Path, out: Path, *args: str) -> list[str]:
    return ["train", "throughplane", "--threads", "1", "--config", str(root / "tp.json"), "--out-dir", str(out),
            *args]  # fmt: skip


def test_training_passes_over_synthetic_results_and_prepared_cubes(root, tmp_path, capsys, cache_home):
    out = tmp_path / "run"
    assert main([*_train(root, out, "--data", str(root / "data"), "--max-steps", "2")]) == 0
    err = capsys.readouterr().err
    assert f"warning: passed over {root / 'data' / 'sr_mine.nrrd'}: {SYNTHETIC}" in err
    assert f"info: passed over {root / 'data' / 'prep' / '0000_x' / 'cube_64.nii.gz'}: a resampled copy" in err
    assert "info: found 1 CT volume(s); passed over 2 of the 3 found" in err
    assert json.loads((out / "summary.json").read_text())["data"] == ["Doe_John_MRN123.nii.gz"]

    # nothing but a synthetic image: the run stops before any work, naming it
    assert main([*_train(root, tmp_path / "none", "--data", str(root / "data" / "sr_mine.nrrd"),
                         "--max-steps", "2")]) != 0  # fmt: skip
    err = capsys.readouterr().err
    assert "error: no CT volume is left to train on" in err and SYNTHETIC in err
    assert "Traceback" not in err and not (tmp_path / "none" / "throughplane.safetensors").exists()


def test_readable_volumes_passes_over_synthetic_and_non_ct_for_every_trainer(root, diffusioncore_log):
    """``train xray``, ``train sr`` and ``prepare-latents`` read their CTs through the same function."""
    paths = [root / "data" / "sr_mine.nrrd", root / "odd" / "mr.nii.gz", root / "data" / "Doe_John_MRN123.nii.gz"]
    got = [p for p, _ in readable_volumes(paths)]
    assert got == [paths[2]]
    said = [r.getMessage() for r in diffusioncore_log if r.levelno >= logging.WARNING]
    assert sum(str(paths[1]) in line for line in said) == 1  # one line, not the doubt and then the pass-over
    with pytest.raises(InputError, match="no CT volume is left to train on"):
        list(readable_volumes(paths[:2]))


def test_non_ct_and_too_small_volumes_are_passed_over_and_not_counted(root, tmp_path, capsys, cache_home):
    out = tmp_path / "run"
    data = ["--data", str(root / "odd"), str(root / "data" / "Doe_John_MRN123.nii.gz")]
    assert main([*_train(root, out, *data, "--max-steps", "2")]) == 0
    err = capsys.readouterr().err
    mr, tiny = root / "odd" / "mr.nii.gz", root / "odd" / "tiny.nii.gz"
    assert f"warning: passed over {mr}: its values run from 0 to 1200, not CT in Hounsfield units" in err
    assert err.count(str(mr)) == 1
    assert (f"warning: passed over {tiny}: 20x20 voxels in-plane (40 slices), smaller than the 12x32-voxel "
            "training planes") in err  # fmt: skip
    assert "info: found 1 CT volume(s); passed over 2 of the 3 found" in err
    assert json.loads((out / "summary.json").read_text())["data"] == ["Doe_John_MRN123.nii.gz"]


def test_init_from_is_kept_across_resume_and_refused_with_it(root, tmp_path, capsys, cache_home):
    ct = ["--data", str(root / "data" / "Doe_John_MRN123.nii.gz")]
    first = tmp_path / "first"
    assert main([*_train(root, first, *ct, "--max-steps", "2")]) == 0
    start = str(first / "throughplane.safetensors")
    out = tmp_path / "run"
    assert main([*_train(root, out, *ct, "--max-steps", "2", "--init-from", start)]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in out.iterdir())
    assert main([*_train(root, out, *ct, "--max-steps", "4", "--resume", "--init-from", start)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"error: --init-from starts a new run; drop it to continue the run in {out} with --resume")
    assert sorted(p.name for p in out.iterdir()) == before  # refused before any work
    assert main([*_train(root, out, *ct, "--max-steps", "4", "--resume")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["init_from"] == start
    _, meta = load_safetensors(out / "throughplane.safetensors")
    assert meta["training"]["init_from"] == start


def test_exported_weights_count_the_volumes_and_never_name_the_users_files(root, tmp_path, capsys, cache_home):
    out = tmp_path / "run"
    data = ["--data", str(root / "data" / "Doe_John_MRN123.nii.gz"), "chest-lidc"]
    if main([*_train(root, out, *data, "--max-steps", "2")]) != 0:  # the sample cannot be fetched here
        data = data[:2]
        assert main([*_train(root, tmp_path / "alone", *data, "--max-steps", "2")]) == 0
        out = tmp_path / "alone"
    capsys.readouterr()
    _, meta = load_safetensors(out / "throughplane.safetensors")
    assert "Doe_John" not in json.dumps(meta) and "MRN123" not in json.dumps(meta)
    n = len(data) - 1
    assert f"trained with train throughplane for 2 steps on {n} CT volume" in meta["description"]
    assert meta["training"]["volumes"] == n
    assert meta["training"]["data"] == (["chest-lidc"] if n == 2 else [])
    assert "Doe_John_MRN123.nii.gz" in json.loads((out / "summary.json").read_text())["data"]  # the local record
    assert main(["weights", "import", str(out / "throughplane.safetensors"), "--name", "probe30-predictor"]) == 0
    assert main(["weights", "list"]) == 0
    assert "MRN123" not in capsys.readouterr().out
