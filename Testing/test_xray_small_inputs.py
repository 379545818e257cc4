"""CT volumes too small for the X-ray to CT cube, and ones whose body fills little of it.

A CT with fewer than 4 voxels along an axis cannot be resampled onto the cube (its anti-aliasing filter needs 4):
given by name (a file, ``--reference``) it is refused with exit 2; found in a cohort folder it is passed over with a
warning and the run goes on with the rest. A CT whose body fills little of the cube (a small crop) is scored or
trained on, with a warning that the cube is then mostly air.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import chest_like_ct

from DiffusionCore.cli.main import main
from DiffusionCore.volume import Volume, write_volume
from DiffusionCore.xray.data import MIN_BODY_FRACTION, body_fraction, ct_to_cube

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--tiny-test-model", "--device", "cpu", "--config", "stage1", "--max-steps", "1"]
PREPARE = ["--resolutions", "16", "--xray-resolutions", "16", "--augmented-copies", "0", "--progress", "none"]


def _whole(path: Path) -> Path:
    """A 24^3 chest-like CT of 14 mm voxels (336 mm: the whole cube)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(Volume(chest_like_ct(), (14.0, 14.0, 14.0)), path)
    return path


def _short(path: Path, shape=(3, 24, 24)) -> Path:
    """A chest-like CT of ``shape`` (z, y, x), 14 mm voxels: 3 slices by default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ct = chest_like_ct()
    nz, ny, nx = shape
    write_volume(Volume(np.ascontiguousarray(ct[10 : 10 + nz, :ny, :nx]), (14.0, 14.0, 14.0)), path)
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err) and "internal error" not in err[-1]
    return err[-1]


def _crop(path: Path) -> Path:
    """The chest-like CT over 72 mm (3 mm voxels): a small crop, whose body fills little of the cube."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(Volume(chest_like_ct(), (3.0, 3.0, 3.0)), path)
    return path


def _warnings(capsys) -> tuple[list[str], list[str]]:
    """(the warnings of CTs passed over, those of CTs whose body fills little of the cube) on stderr."""
    lines = capsys.readouterr().err.splitlines()
    return ([line for line in lines if line.startswith("warning: passed over")],
            [line for line in lines if line.startswith("warning: ") and "body fills only" in line])  # fmt: skip


def test_train_xray_passes_over_a_too_short_ct_of_a_cohort_and_trains_on_the_rest(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    _whole(cohort / "p1" / "ct.nii.gz")
    short = _short(cohort / "p2" / "dx3.nii.gz")
    crop = _crop(cohort / "p3" / "crop.nii.gz")
    before = short.read_bytes()
    run = tmp_path / "run"
    assert main(["train", "xray", "--data", str(cohort), "--output-dir", str(run), *TINY]) == 0
    assert (run / "xray_cascade.safetensors").is_file()
    said, little = _warnings(capsys)
    assert len(said) == 1 and str(short) in said[0] and "3 slices along z" in said[0] and "at least 4" in said[0]
    assert len(little) == 1 and str(crop) in little[0] and "learns mostly air" in little[0]  # trained on, with a word
    assert short.read_bytes() == before


def test_train_xray_refuses_a_too_short_ct_named_on_the_command_line(tmp_path, capsys):
    short = _short(tmp_path / "dx3.nii.gz")
    before = short.read_bytes()
    run = tmp_path / "run"
    assert main(["train", "xray", "--data", str(short), "--output-dir", str(run), *TINY]) == 2
    err = _error(capsys)
    assert err.startswith(f"error: {short} has 3 slices along z: X-ray to CT needs a CT volume of at least 4 voxels "
                          "along each axis")  # fmt: skip
    assert "whole chest" in err
    assert not run.exists() and short.read_bytes() == before


def test_a_cohort_of_only_too_small_cts_is_refused_listing_each(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    _short(cohort / "a.nii.gz")
    _short(cohort / "b.nii.gz", shape=(24, 24, 2))
    run = tmp_path / "run"
    assert main(["train", "xray", "--data", str(cohort), "--output-dir", str(run), *TINY]) == 2
    err = _error(capsys)
    assert err.startswith("error: none of the CT volumes is large enough for X-ray to CT (at least 4 voxels")
    assert "a.nii.gz: 3 slices along z" in err and "b.nii.gz: 2 voxels along x" in err
    assert not run.exists()


def test_prepare_xray_data_refuses_a_named_tiny_ct_and_leaves_nothing(tmp_path, capsys):
    tiny = _short(tmp_path / "tiny.nii.gz", shape=(3, 8, 8))
    before = tiny.read_bytes()
    out = tmp_path / "prep"
    assert main(["prepare-xray-data", "--data", str(tiny), "--output-dir", str(out), *PREPARE]) == 2
    assert _error(capsys).startswith(f"error: {tiny} has 3 slices along z: X-ray to CT needs")
    assert not out.exists() and tiny.read_bytes() == before
    # an existing output folder keeps what it held, and gets no case folder of the refused CT
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    good = _whole(tmp_path / "good.nii.gz")
    assert main(["prepare-xray-data", "--data", str(good), str(tiny), "--output-dir", str(out), *PREPARE]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_prepare_xray_data_passes_over_a_too_short_ct_of_a_cohort(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    good = _whole(cohort / "p1" / "ct.nii.gz")
    short = _short(cohort / "p2" / "dx3.nii.gz")
    crop = _crop(cohort / "p3" / "crop.nii.gz")
    out = tmp_path / "prep"
    assert main(["prepare-xray-data", "--data", str(cohort), "--output-dir", str(out), *PREPARE]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [case["source"] for case in manifest["cases"]] == [str(good), str(crop)]
    assert sorted(p.name for p in out.iterdir()) == ["0000_ct", "0001_crop", "manifest.json"]  # none for the short one
    said, little = _warnings(capsys)
    assert len(said) == 1 and str(short) in said[0]
    assert len(little) == 1 and str(crop) in little[0] and "learns mostly air" in little[0]


def test_evaluate_xray_refuses_a_too_short_reference(tmp_path, capsys):
    short = _short(tmp_path / "dx3.nii.gz")
    scores = tmp_path / "scores.json"
    code = main(["evaluate-xray", "--reference", str(short), "--tiny-test-model", "--methods", "mean-ct",
                 "--json", str(scores), "--progress", "none"])  # fmt: skip
    assert code == 2
    assert _error(capsys).startswith(f"error: {short} has 3 slices along z: X-ray to CT needs a CT volume of at least 4")
    assert not scores.exists()


def test_body_fraction_tells_a_small_crop_from_a_whole_chest():
    whole = Volume(chest_like_ct(), (14.0, 14.0, 14.0))
    crop = Volume(chest_like_ct(), (3.0, 3.0, 3.0))  # the same array over 72 mm: a small crop
    assert body_fraction(ct_to_cube(whole, 32, 350.0)) > 1.5 * MIN_BODY_FRACTION
    assert body_fraction(ct_to_cube(crop, 32, 350.0)) < MIN_BODY_FRACTION / 10


@pytest.mark.parametrize("spacing, warned", [(14.0, False), (3.0, True)])
def test_evaluate_xray_warns_when_the_reference_body_fills_little_of_the_cube(tmp_path, capsys, spacing, warned):
    ref = tmp_path / "ref.nii.gz"
    write_volume(Volume(chest_like_ct(), (spacing,) * 3), ref)
    code = main(["evaluate-xray", "--reference", str(ref), "--tiny-test-model", "--methods", "mean-ct",
                 "--progress", "none"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    warning = [line for line in err.splitlines() if "fills only" in line]
    assert bool(warning) is warned
    if warned:
        assert warning[0].startswith(f"warning: {ref}: its body fills only ")
        assert "the scores then measure mostly air" in warning[0] and "whole chest" in warning[0]


def test_the_x_ray_modules_reference_scores_warn_of_a_small_crop(caplog):
    """The X-ray to CT module's reference (XrayToCTGenerate --referenceVolume) is scored by reference_scores, which
    warned of nothing on a crop whose cube is mostly air, as evaluate-xray does now."""
    import logging

    from DiffusionCore.xray.evaluate import reference_scores

    for spacing, warned in ((14.0, False), (3.0, True)):
        reference = Volume(chest_like_ct(), (spacing,) * 3, metadata={"source": "ref.nii.gz"})
        cube = ct_to_cube(reference, 32, 350.0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="DiffusionCore"):
            scores = reference_scores(Volume(cube.array, cube.spacing, (-(32 - 1) / 2 * cube.spacing[0],) * 3), reference)
        assert scores["psnr"] > 40.0
        said = [r.getMessage() for r in caplog.records if "fills only" in r.getMessage()]
        assert bool(said) is warned and (not warned or said[0].startswith("ref.nii.gz: its body fills only"))
