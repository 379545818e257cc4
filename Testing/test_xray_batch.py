"""``xray2ct`` over a folder or list of radiographs: one synthetic CT per radiograph, named after it, a radiograph that
fails named while the batch goes on (exit 7), a report written whatever happens, ``--skip-existing`` to continue, and
files that are no radiograph (CT slices, notes) passed over. The tiny random network stands in for the weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series, write_dicomdir
from PIL import Image

from DiffusionCore.cli.main import main
from DiffusionCore.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tiny-test-model", "--progress", "none"]


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((72, 64)) * 255).astype(np.uint8)).save(path)
    return path


def _dx_dicom(path: Path, seed: int = 0) -> Path:
    """A DX DICOM radiograph (MONOCHROME2), written without a suffix as a PACS export names its files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray((np.random.default_rng(seed).random((64, 64)) * 4000).astype(np.uint16))
    img.SetMetaData("0008|0060", "DX")
    img.SetMetaData("0028|0030", "0.5\\0.5")
    sitk.WriteImage(img, str(path.with_suffix(".dcm")))
    path.with_suffix(".dcm").rename(path)
    return path


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "xray2ct", *args, *TINY], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)  # fmt: skip


@pytest.fixture
def radiographs(tmp_path) -> Path:
    """A folder as a researcher's export holds it: radiographs in subfolders (two of one name), a PACS export's
    DICOM radiograph without suffix, a corrupt PNG, a CT series' slices and a text file."""
    folder = tmp_path / "radiographs"
    _png(folder / "a.png", 0)
    _png(folder / "sub" / "a.png", 1)
    _png(folder / "b.jpg", 2)
    _dx_dicom(folder / "pacs" / "IM0001", 3)
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("radiographs of the study\n", encoding="utf-8")
    ct = Volume(np.full((3, 16, 16), -1000.0, np.float32), (1.0, 1.0, 5.0))
    write_dicom_series(folder / "ct series", ct)
    return folder


def test_a_folder_gives_one_ct_per_radiograph_and_goes_on_past_a_broken_one(radiographs, tmp_path):
    before = _digests(radiographs)
    out = tmp_path / "cts"
    proc = _cli([str(radiographs), str(out), "--report", str(tmp_path / "report.json")], tmp_path)
    assert proc.returncode == 7, proc.stderr
    assert "Traceback" not in proc.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == ["IM0001.json", "IM0001.nii.gz", "a.json", "a.nii.gz", "b.json", "b.nii.gz", "sub_a.json",
                       "sub_a.nii.gz"]  # fmt: skip
    for name in ("a", "sub_a", "b", "IM0001"):
        ct = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert ct.GetSize() == (32, 32, 32)  # the tiny network's last stage
    # the CT's provenance names its own radiograph by its name and content (no folder: a result travels)
    provenance = json.loads((out / "sub_a.json").read_text(encoding="utf-8"))["provenance"]
    assert provenance["input"] == "a.png" and provenance["synthetic"] is True
    other = json.loads((out / "a.json").read_text(encoding="utf-8"))["provenance"]
    assert len(provenance["input_sha256"]) == 64 and other["input_sha256"] != provenance["input_sha256"]
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["summary"] == {**report["summary"], "radiographs": 5, "written": 4, "failed": 1, "skipped": 0}
    assert [f["radiograph"] for f in report["failed"]] == [str(radiographs / "broken.png")]
    assert "cannot read" in report["failed"][0]["why"]
    assert {Path(r["input"]).name for r in report["radiographs"]} == {"a.png", "b.jpg", "IM0001"}
    assert all(r["stages"] and r["output"].startswith(str(out)) for r in report["radiographs"])
    # the CT slices and the text file are passed over, counted and named in one line, not tried
    passed = [line for line in proc.stderr.splitlines() if "passed over" in line]
    assert len(passed) == 1 and "passed over 4 file(s)" in passed[0] and "notes.txt" not in proc.stdout
    assert "1 of 5 radiographs failed" in proc.stderr and "--skip-existing" in proc.stderr
    assert _digests(radiographs) == before  # no input touched

    # the broken file replaced: the same command with --skip-existing does only it
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _png(radiographs / "broken.png", 4)
    again = _cli([str(radiographs), str(out), "--report", str(tmp_path / "report.json"), "--skip-existing"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in kept} == kept
    assert (out / "broken.nii.gz").is_file()
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["summary"]["written"] == 1 and report["summary"]["skipped"] == 4
    assert all(s["why"].endswith("(--skip-existing)") for s in report["skipped"])


def test_without_skip_existing_an_existing_ct_refuses_the_batch_before_any_work(radiographs, tmp_path):
    out = tmp_path / "cts"
    out.mkdir()
    (out / "b.nii.gz").write_bytes(b"an earlier result")
    assert main(["xray2ct", str(radiographs), str(out), *TINY]) == 4
    assert sorted(p.name for p in out.iterdir()) == ["b.nii.gz"]  # nothing written, the file kept


def test_a_list_file_names_radiographs_and_a_missing_one_is_failed_not_fatal(tmp_path, capsys):
    _png(tmp_path / "x" / "first.png", 0)
    _dx_dicom(tmp_path / "y" / "second", 1)
    listing = tmp_path / "list.csv"
    listing.write_text('path\nx/first.png\n"y/second"\nx/gone.png\n', encoding="utf-8")
    out = tmp_path / "out"
    assert main(["xray2ct", str(listing), str(out), *TINY]) == 7
    err = capsys.readouterr().err
    assert "line 4: " in err and "gone.png does not exist" in err and "the other radiographs go on" in err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["first.nii.gz", "second.nii.gz"]


def test_a_folder_holding_one_radiograph_and_a_file_as_output_is_one_run(tmp_path, capsys):
    _png(tmp_path / "study" / "chest.png")
    (tmp_path / "study" / "report.txt").write_text("findings\n", encoding="utf-8")
    assert main(["xray2ct", str(tmp_path / "study"), str(tmp_path / "ct.nrrd"), *TINY]) == 0
    assert (tmp_path / "ct.nrrd").is_file()
    assert "wrote " in capsys.readouterr().out


def test_a_batch_with_a_volume_file_as_output_is_refused_and_creates_nothing(radiographs, tmp_path, capsys):
    assert main(["xray2ct", str(radiographs), str(tmp_path / "ct.nii.gz"), *TINY]) == 4
    assert "a folder or list of radiographs: 5 found" in capsys.readouterr().err
    assert not (tmp_path / "ct.nii.gz").exists()


def test_a_folder_without_radiographs_says_what_it_holds(tmp_path, capsys):
    folder = tmp_path / "only ct"
    write_dicom_series(folder, Volume(np.full((3, 16, 16), -1000.0, np.float32), (1.0, 1.0, 5.0)))
    assert main(["xray2ct", str(folder), str(tmp_path / "out"), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"no radiographs found in {folder} (3 other file(s) passed over, e.g. slice000.dcm: DICOM files of " \
           "Modality CT)" in err
    assert not (tmp_path / "out").exists()


def test_several_inputs_are_refused_with_the_batch_forms(tmp_path, capsys):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    assert main(["xray2ct", str(a), str(b), str(tmp_path / "out"), *TINY]) == 2
    assert "give a folder of them, or a list file" in capsys.readouterr().err


def test_a_batch_saves_each_radiographs_stages_and_dicom_series_folders(tmp_path):
    folder = tmp_path / "in"
    _png(folder / "a.png", 0)
    _png(folder / "b.png", 1)
    out = tmp_path / "out"
    assert main(["xray2ct", str(folder), str(out), "--save-stages", *TINY]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "a_stage1.nii.gz", "b.nii.gz",
                                                            "b_stage1.nii.gz"]  # fmt: skip
    assert sitk.ReadImage(str(out / "a_stage1.nii.gz")).GetSize() == (16, 16, 16)
    series = tmp_path / "series"
    assert main(["xray2ct", str(folder), str(series), "--output-format", "dicom", "--patient-id", "RES-1", *TINY]) == 0
    assert sorted(p.name for p in series.iterdir()) == ["a", "b"]
    assert len(list((series / "a").glob("*.dcm"))) == 32


# -- probe 23 ------------------------------------------------------------------------------------------------------
def test_skip_existing_refuses_outputs_made_from_another_radiograph(tmp_path, capsys):
    """A second chest.png added beside the first renamed the first's CT (sub/chest.png -> sub_chest): --skip-existing
    then kept sub/chest.png's CT as the new chest.png's and left the new one without its own."""
    folder = tmp_path / "in"
    _png(folder / "sub" / "chest.png", 0)
    out = tmp_path / "out"
    assert main(["xray2ct", str(folder), str(out), *TINY]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["chest.nii.gz"]
    _png(folder / "chest.png", 1)  # a new export of the same name
    # probe 32 (M4): sub/chest.png keeps the name of the CT it has; the new chest.png takes the hash of a clash
    stamp = (out / "chest.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["xray2ct", str(folder), str(out), "--skip-existing", *TINY]) == 0
    made = sorted(p.name for p in out.glob("*.nii.gz"))
    assert len(made) == 2 and made[0] == "chest.nii.gz" and made[1].startswith("chest~"), made
    assert (out / "chest.nii.gz").stat().st_mtime_ns == stamp  # kept, not redone under another name


def _with_view(path: Path, view: str) -> Path:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.ViewPosition = view
    ds.save_as(path)
    return path


def test_a_lateral_in_a_batch_is_passed_over_and_an_overriding_view_is_noted(tmp_path, capsys):
    """A PA and lateral study: the lateral failed with "fix those inputs" (exit 7) in every ordinary export, and
    --view pa made a CT of it without a word."""
    folder = tmp_path / "study"
    _with_view(_dx_dicom(folder / "pa", 0), "PA")
    _with_view(_dx_dicom(folder / "lat", 1), "LL")
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert main(["xray2ct", str(folder), str(out), "--report", str(report), *TINY]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["pa.nii.gz"]
    data = json.loads(report.read_text(encoding="utf-8"))
    [skipped] = data["skipped"]
    assert skipped["radiograph"] == str(folder / "lat") and "marks a lateral view (ViewPosition LL)" in skipped["why"]
    assert "1 skipped (1 passed over)" in capsys.readouterr().err
    report = tmp_path / "both.json"
    assert main(["xray2ct", str(folder), str(tmp_path / "both"), "--view", "pa", "--report", str(report), *TINY]) == 0
    data = json.loads(report.read_text(encoding="utf-8"))
    [lateral] = [r for r in data["radiographs"] if r["input"] == str(folder / "lat")]
    assert any("marks a lateral view (ViewPosition LL); taken as pa, as --view says" in n for n in lateral["notes"])
    assert "taken as pa, as --view says" in capsys.readouterr().err


def test_a_continued_batch_keeps_the_first_runs_entries_and_the_report_lists_what_was_passed_over(radiographs, tmp_path):
    out, report = tmp_path / "cts", tmp_path / "r.json"
    assert main(["xray2ct", str(radiographs), str(out), "--report", str(report), *TINY]) == 7
    first = json.loads(report.read_text(encoding="utf-8"))
    kinds = {(Path(p["folder"]).name, p["why"].split(":")[0], p["files"]) for p in first["passed_over"]}
    assert kinds == {("radiographs", "files that are no radiograph (not an image, or a 3D volume)", 1),
                     ("ct series", "DICOM files of Modality CT", 3)}  # fmt: skip
    _png(radiographs / "broken.png", 4)
    assert main(["xray2ct", str(radiographs), str(out), "--report", str(report), "--skip-existing", *TINY]) == 0
    data = json.loads(report.read_text(encoding="utf-8"))
    assert len(data["radiographs"]) == 5 and sum(bool(r.get("from_earlier_run")) for r in data["radiographs"]) == 4
    earlier = {r["output"]: r["stages"] for r in first["radiographs"]}
    assert all(r["stages"] == earlier[r["output"]] for r in data["radiographs"] if r.get("from_earlier_run"))


def test_a_report_that_cannot_be_written_is_no_success(tmp_path, monkeypatch, capsys):
    import errno

    import DiffusionCore.cli.batch as batch

    folder = tmp_path / "in"
    _png(folder / "a.png")
    _png(folder / "b.png", 1)

    def full(data, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(batch, "write_json_atomic", full)
    assert main(["xray2ct", str(folder), str(tmp_path / "out"), "--report", str(tmp_path / "r.json"), *TINY]) == 4
    err = capsys.readouterr().err
    assert "could not write the report" in err and "2 written to" in err and "but its report" in err


def test_a_dicomdir_given_as_input_stands_for_its_folder(tmp_path):
    export = tmp_path / "export"
    _dx_dicom(export / "IMG" / "IM0001", 0)
    write_dicomdir(export)
    out = tmp_path / "out"
    assert main(["xray2ct", str(export / "DICOMDIR"), str(out), *TINY]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["IM0001.nii.gz"]


def test_the_bar_in_a_log_file_is_drawn_every_few_seconds_not_at_every_step(capsys):
    """A batch of 400 radiographs wrote 1.4 MB of progress to a log file: every step drew the bar again."""
    from DiffusionCore.cli.common import Progress

    progress = Progress("bar", desc="xray2ct")
    for i in range(500):
        progress(i, 500, f"step {i}")
    progress(500, 500, "written")
    progress.close()
    err = capsys.readouterr().err
    assert err.count("step ") <= 2 and "written" in err  # the first drawing and the last


def test_a_header_value_the_standard_does_not_allow_prints_no_library_warning(tmp_path):
    """Probe 23: pydicom's "UserWarning: Invalid value for VR AS: '59Y'", with its source path, came twice in a run
    that wrote a DICOM series from a radiograph whose header held such a PatientAge."""
    import pydicom

    path = _dx_dicom(tmp_path / "in" / "cr", 0)
    ds = pydicom.dcmread(path)
    ds.PatientAge = "59Y"
    ds.save_as(path)
    proc = _cli([str(path), str(tmp_path / "series"), "--output-format", "dicom"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "UserWarning" not in proc.stderr and "valuerep" not in proc.stderr
    # written in DICOM's form (probe 31 M12: a validator reported the value copied as it was)
    assert str(pydicom.dcmread(next((tmp_path / "series").glob("*.dcm"))).PatientAge) == "059Y"


def test_skip_existing_refuses_ct_made_with_other_settings(tmp_path, capsys):
    """A batch of radiographs continued with --skip-existing kept CTs made with another seed, --invert or number of
    steps; now each difference is named before any work, and the same options keep them."""
    src = tmp_path / "in"
    for name in ("a", "b"):
        _png(src / f"{name}.png", seed=len(name))
    out = tmp_path / "out"
    assert main(["xray2ct", str(src), str(out), *TINY, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["xray2ct", str(src), str(out), *TINY, "--steps", "2", "--skip-existing"]) == 0
    assert "2 skipped (2 done before)" in capsys.readouterr().err
    code = main(["xray2ct", str(src), str(out), *TINY, "--steps", "3", "--seed", "1", "--invert", "--skip-existing"])
    err = capsys.readouterr().err
    assert code == 4 and f"{out / 'a.nii.gz'} exists but was made with other settings than this run's" in err
    assert "--seed: 0 (this run: 1)" in err and "--invert: off (this run: on)" in err
    assert "--steps: 2/2 (this run: 3)" in err  # one value per stage of the (two-stage) tiny network


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux; other systems store Unicode")
def test_a_radiograph_whose_name_is_not_utf8_fails_alone_instead_of_aborting_the_process(tmp_path):
    """A Latin-1 file name (a Windows share, an old USB stick) reached SimpleITK as is, which aborted the whole
    process in C++ (exit 134): the batch, its report and the radiographs after it were lost. Now that radiograph
    fails with a message that says to rename it, and the others are done (exit 7)."""
    from DiffusionCore.errors import InputError
    from DiffusionCore.xray.radiograph import read_radiograph

    src = tmp_path / "in"
    good = _png(src / "good.png")
    latin1 = os.path.join(os.fsencode(src), b"r\xf6ntgen.dcm")  # "röntgen" in Latin-1: not UTF-8
    _dx_dicom(tmp_path / "dx")
    with open(latin1, "wb") as f:
        f.write((tmp_path / "dx").read_bytes())
    bad = os.fsdecode(latin1)
    with pytest.raises(InputError, match=r"r\udcf6ntgen.dcm to ITK: it is not UTF-8 text. Rename the file"):
        read_radiograph(bad)
    out, report = tmp_path / "out", tmp_path / "r.json"
    r = _cli([str(src), str(out), "--report", str(report)], tmp_path)
    assert r.returncode == 7, r.stderr[-2000:]
    assert "not UTF-8 text" in r.stderr and "Rename the file" in r.stderr
    assert (out / f"{good.stem}.nii.gz").is_file()
    data = json.loads(report.read_text(encoding="utf-8"))
    assert len(data["failed"]) == 1 and len(data["radiographs"]) == 1
