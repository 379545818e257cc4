"""``evaluate-xray`` on several reference CTs (a folder, a list file or several paths): each CT scored as alone, then
the mean and standard deviation per method and stage, a CT that cannot be scored passed over and named, as
``evaluate`` does for super-resolution. The tiny random network stands in for the weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import chest_like_ct

from DiffusionCore.cli.main import main
from DiffusionCore.volume import Volume, write_volume

TINY = ["--tiny-test-model", "--progress", "none", "--methods", "model,mean-ct,lifting-only"]


def _ct(path, offset: float = 0.0):
    return write_volume(Volume(chest_like_ct(body_offset=offset), (14.0, 14.0, 14.0)), path)


@pytest.fixture
def cohort(tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    _ct(folder / "p1.nii.gz", 0.0)
    _ct(folder / "p2.nrrd", 0.2)
    write_volume(Volume(np.full((4, 4, 4), 40.0, np.float32), (1.0, 1.0, 1.0)), folder / "tiny.nii.gz")
    (folder / "notes.txt").write_text("not a CT\n", encoding="utf-8")
    return folder


def test_a_folder_of_cts_is_scored_one_by_one_then_averaged_and_a_bad_one_passed_over(cohort, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert main(["evaluate-xray", "--reference", str(cohort), "--json", str(out), *TINY]) == 0
    printed = capsys.readouterr()
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [r["reference"] for r in report["references"]] == [str(cohort / "p1.nii.gz"), str(cohort / "p2.nrrd")]
    assert [p["reference"] for p in report["passed_over"]] == [str(cohort / "tiny.nii.gz")]
    assert "is blank: too little tissue" in report["passed_over"][0]["why"]  # a 4 mm cube of tissue: nothing to see
    agg = report["aggregate"]
    assert agg["n"] == 2
    # each row is one method at one stage over both CTs, its mean the mean of the two CTs' own scores
    rows = {(r["method"], r["stage"]): r for r in agg["results"]}
    assert set(rows) == {(m, s) for m in ("model", "mean-ct", "lifting-only") for s in (1, 2)}
    for (method, stage), row in rows.items():
        own = [next(x for x in r["results"] if (x["method"], x["stage"]) == (method, stage))
               for r in report["references"]]  # fmt: skip
        assert row["n"] == 2
        assert row["psnr3d_mean"] == pytest.approx(np.mean([x["psnr3d"] for x in own]))
        assert row["ssim3d_sd"] == pytest.approx(np.std([x["ssim3d"] for x in own], ddof=1))
    # the two CTs differ (the body sits elsewhere), so their scores do too: a real spread, not one CT twice
    assert rows[("model", 1)]["psnr3d_sd"] > 0
    assert "mean +- SD over 2 reference CT(s)" in printed.out and f"passed over {cohort / 'tiny.nii.gz'}" in printed.out
    assert f"passed over {cohort / 'tiny.nii.gz'}" in printed.err  # said as it happens too


def test_several_paths_and_one_reference_keep_their_forms(cohort, tmp_path):
    out = tmp_path / "two.json"
    assert main(["evaluate-xray", "--reference", str(cohort / "p1.nii.gz"), str(cohort / "p2.nrrd"), "--json",
                 str(out), *TINY]) == 0  # fmt: skip
    assert json.loads(out.read_text(encoding="utf-8"))["aggregate"]["n"] == 2
    one = tmp_path / "one.json"
    assert main(["evaluate-xray", "--reference", str(cohort / "p1.nii.gz"), "--json", str(one), *TINY]) == 0
    single = json.loads(one.read_text(encoding="utf-8"))
    assert "aggregate" not in single and single["reference"] == str(cohort / "p1.nii.gz") and single["results"]


def test_a_cohort_where_no_ct_can_be_scored_names_each(tmp_path, capsys):
    folder = tmp_path / "small"
    folder.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        write_volume(Volume(np.full((4, 4, 4), 40.0, np.float32), (1.0, 1.0, 1.0)), folder / name)
    assert main(["evaluate-xray", "--reference", str(folder), *TINY]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 references could be scored" in err and "a.nii.gz" in err and "b.nii.gz" in err


def test_a_reference_the_weights_were_trained_on_is_said_to_be_one(tmp_path, monkeypatch):
    """Probe 24: `evaluate-xray --reference chest-dx` printed the model below its lifting-only volume with no word that
    chest-dx is one of the two CTs the shipped weights were trained on (the demo says so of chest-lidc)."""
    from DiffusionCore import sampledata
    from DiffusionCore.cli.xray import training_ct_note
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    trained = XrayToCTGenerator.default().cascade.training_data
    assert trained == ["chest-lidc", "chest-dx"]  # what the shipped weights record
    assert "one of the CTs these weights were trained on" in training_ct_note("chest-dx", trained)
    monkeypatch.setattr(sampledata, "sample_dir", lambda name: tmp_path / "samples" / name)
    cached = tmp_path / "samples" / "chest-lidc" / "cxr.nii.gz"
    cached.parent.mkdir(parents=True)
    _ct(cached)
    assert "the sample CT chest-lidc" in training_ct_note(str(cached), trained)
    own = _ct(tmp_path / "mine.nii.gz")
    assert training_ct_note(str(own), trained) == "" and training_ct_note("chest-dx", []) == ""
