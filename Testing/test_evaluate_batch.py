"""``evaluate`` on several references, with the volumes it scored saved, the model methods' record, and threads."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from test_evaluate_cli import assert_one_error_line, run_cli

from DiffusionCore.volume import Volume, read_volume, write_volume


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def two_cts(tmp_path, make_phantom):
    folder = tmp_path / "cts"
    folder.mkdir()
    a = write_volume(make_phantom(shape=(24, 32, 32), spacing=(0.8, 0.8, 1.0), seed=0), folder / "a.nii.gz")
    b = write_volume(make_phantom(shape=(25, 32, 32), spacing=(0.8, 0.8, 1.0), seed=1), folder / "b.nrrd")
    return folder, a, b


def test_a_folder_of_volumes_gives_each_and_the_mean_and_sd(tmp_path, two_cts):
    folder, a, b = two_cts
    before = {p: _sha(p) for p in (a, b)}
    proc = run_cli("evaluate", "--reference", str(folder), "--factor", "2", "--methods", "nearest,cubic",
                   "--json", "r.json", "--progress", "none", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "without a readable DICOM series" not in proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [v["reference"] for v in report["volumes"]] == [str(a), str(b)]
    assert report["factor"] == 2 and report["degradation"] == "slab" and report["hu_range"] == [-1024, 2048]
    agg = report["aggregate"]
    assert agg["n"] == 2
    rows = {r["method"]: r for r in agg["results"]}
    psnr = [next(r["psnr"] for r in v["results"] if r["method"] == "cubic") for v in report["volumes"]]
    assert rows["cubic"]["n"] == 2
    assert rows["cubic"]["psnr_mean"] == pytest.approx(np.mean(psnr))
    assert rows["cubic"]["psnr_sd"] == pytest.approx(np.std(psnr, ddof=1))
    assert rows["nearest"]["consistency_psnr_mean"] is None  # +inf, named:
    assert agg["infinite_scores"] == {"nearest": ["consistency_psnr_mean"]}
    assert report["volumes"][1]["slices_dropped"] == [24]  # 25 slices: one left out, and said
    assert "1 left out to make whole slabs: 24" in proc.stdout and "mean +- SD over 2 volume(s)" in proc.stdout
    assert {p: _sha(p) for p in (a, b)} == before


def test_several_references_and_a_list_file(tmp_path, two_cts):
    _, a, b = two_cts
    listing = tmp_path / "cts.txt"
    listing.write_text(f"{a}\n{b}\n")
    for name, refs in {"many": [str(a), str(b)], "list": [str(listing)]}.items():
        proc = run_cli("evaluate", "--reference", *refs, "--factor", "2", "--methods", "cubic", "--json",
                       f"{name}.json", "--progress", "none", cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert len(report["volumes"]) == 2 and report["aggregate"]["n"] == 2


def test_save_volumes_writes_what_was_scored(tmp_path, two_cts):
    _, a, _ = two_cts
    out = tmp_path / "saved"
    args = ["evaluate", "--reference", str(a), "--factor", "2", "--degradation", "decimate", "--methods", "cubic",
            "--json", "r.json", "--save-volumes", str(out), "--progress", "none"]  # fmt: skip
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ref, thick, cubic = (read_volume(out / f"{n}.nii.gz") for n in ("reference", "thick", "cubic"))
    truth = read_volume(a)
    np.testing.assert_array_equal(ref.array, truth.array)
    assert cubic.grid == ref.grid == truth.grid and cubic.array.dtype == np.float32
    np.testing.assert_array_equal(thick.array, truth.array[0::2])  # decimate x2 keeps slice (2-1)//2 = 0 of each slab
    assert thick.spacing[2] == pytest.approx(2.0) and thick.origin == pytest.approx(truth.origin)
    side = json.loads((out / "cubic.json").read_text())["provenance"]
    assert side["synthetic"] and side["task"] == "evaluate" and side["settings"]["method"] == "cubic"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["saved_volumes"] == [str(out / f"{n}.nii.gz") for n in ("reference", "thick", "cubic")]
    # a second run does not replace them without --overwrite
    stamp = _sha(out / "cubic.nii.gz")
    again = run_cli(*args[:-2], "--progress", "none", cwd=tmp_path)
    assert_one_error_line(again, 4, "already exists")
    assert _sha(out / "cubic.nii.gz") == stamp


def test_save_volumes_never_writes_over_the_reference(tmp_path, make_phantom):
    ref = write_volume(make_phantom(shape=(24, 32, 32), spacing=(0.8, 0.8, 1.0)), tmp_path / "reference.nii.gz")
    before = _sha(ref)
    proc = run_cli("evaluate", "--reference", str(ref), "--factor", "2", "--methods", "cubic", "--save-volumes",
                   str(tmp_path), "--overwrite", "--progress", "none", cwd=tmp_path)  # fmt: skip
    assert_one_error_line(proc, 4, "reference.nii.gz")
    assert _sha(ref) == before


def test_model_methods_record_weights_seed_threads_and_adaptation(tmp_path, make_phantom):
    from DiffusionCore.sr.throughplane import tiny_predictor
    from DiffusionCore.sr.throughplane_train import export_predictor

    weights = tmp_path / "mine.safetensors"
    export_predictor(tiny_predictor(0), weights, {})
    ref = write_volume(make_phantom(shape=(24, 48, 48), spacing=(0.8, 0.8, 1.0)), tmp_path / "ct.nii.gz")
    proc = run_cli("evaluate", "--reference", str(ref), "--factor", "2", "--methods", "cubic,sr,sr+adapt",
                   "--weights", str(weights), "--allow-unregistered-weights", "--device", "cpu", "--adapt-steps", "2",
                   "--seed", "3", "--threads", "1", "--json", "r.json", "--progress", "none", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["weights"] == str(weights) and report["weights_sha256"] == _sha(weights)
    assert report["seed"] == 3 and report["torch_threads"] == 1 and report["threads_requested"] == 1
    assert report["device"] == "cpu"
    assert set(report["method_details"]) == {"sr", "sr+adapt"}
    adaptation = report["adaptation"]
    assert adaptation["requested"]["steps"] == 2 and adaptation["steps"] == 2
    assert {"loss_before", "loss_after", "gain_before_db", "gain_after_db", "seconds"} <= set(adaptation)
    assert report["method_details"]["sr"]["adaptation"] is None


def test_model_methods_are_refused_with_decimate_before_any_work(tmp_path, make_phantom):
    ref = write_volume(make_phantom(shape=(24, 32, 32), spacing=(0.8, 0.8, 1.0)), tmp_path / "ct.nii.gz")
    proc = run_cli("evaluate", "--reference", str(ref), "--factor", "2", "--degradation", "decimate", "--methods",
                   "cubic,cubic+dc", "--json", "r.json", cwd=tmp_path)  # fmt: skip
    assert_one_error_line(proc, 2, "cubic+dc", "--degradation slab")
    assert not (tmp_path / "r.json").exists()


def test_help_says_what_is_cut_kept_assumed_and_seeded():
    import argparse

    from DiffusionCore.cli import evaluate as cli

    parser = argparse.ArgumentParser(prog="x")
    cli.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["evaluate"]
    text = " ".join(sub.format_help().split())
    for phrase in ("whole slabs", "index (k-1)//2", "assume slab averaging", "--threads", "does not use it",
                   "gantry-tilted"):  # fmt: skip
        assert phrase in text, phrase


def test_volume_reversed_in_storage_gives_the_same_figures(tmp_path, make_phantom):
    vol = make_phantom(shape=(26, 32, 32), spacing=(0.8, 0.8, 1.0))
    d = np.eye(3)
    d[2, 2] = -1.0
    rev = Volume(vol.array[::-1].copy(), vol.spacing, (0.0, 0.0, 25.0), d)
    paths = [write_volume(vol, tmp_path / "up.nii.gz"), write_volume(rev, tmp_path / "down.nii.gz")]
    reports = []
    for p in paths:
        proc = run_cli("evaluate", "--reference", str(p), "--factor", "3", "--methods", "cubic", "--json",
                       f"{p.name}.json", "--progress", "none", cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads((tmp_path / f"{p.name}.json").read_text()))
    up, down = reports
    assert up["results"][0]["psnr_body"] == pytest.approx(down["results"][0]["psnr_body"], abs=1e-6)
    assert up["slices_dropped"] == [24, 25] and down["slices_dropped"] == [0, 1]


def test_a_reference_that_cannot_be_scored_is_passed_over_and_listed(tmp_path, two_cts):
    """With several references, one unreadable file (or a --slices range beyond one volume) stopped the whole run and
    threw away the others' figures. It is passed over with a warning, listed in the JSON, and the mean is over the rest;
    only a run in which none can be scored fails."""
    folder, a, b = two_cts
    bad = folder / "c.nii.gz"
    bad.write_bytes(b"not a volume at all")
    proc = run_cli("evaluate", "--reference", str(folder), "--factor", "2", "--methods", "cubic", "--json", "r.json",
                   "--progress", "none", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [v["reference"] for v in report["volumes"]] == [str(a), str(b)]
    assert report["aggregate"]["n"] == 2
    assert [p["volume"] for p in report["passed_over"]] == [str(bad)]
    assert f"passed over {bad}:" in proc.stderr and f"passed over {bad}:" in proc.stdout
    # a slice range inside a (24 slices) but beyond b's end is b's problem only
    short = tmp_path / "short.nii.gz"
    write_volume(Volume(read_volume(a).array[:8], spacing=(0.8, 0.8, 1.0)), short)
    proc = run_cli("evaluate", "--reference", str(a), str(short), "--slices", "4", "20", "--factor", "2", "--methods",
                   "cubic", "--json", "s.json", "--progress", "none", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["aggregate"]["n"] == 1 and [p["volume"] for p in report["passed_over"]] == [str(short)]
    # none scorable: one error naming each
    proc = run_cli("evaluate", "--reference", str(bad), str(short), "--slices", "4", "20", "--factor", "2", "--methods",
                   "cubic", "--progress", "none", cwd=tmp_path)  # fmt: skip
    line = assert_one_error_line(proc, 2, "error: none of the 2 references could be scored: ", str(bad), str(short))
    assert line.startswith("error: none of the 2 references could be scored: ")
