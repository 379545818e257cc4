"""Batches of `sr FOLDER OUT` over a cohort, as probe 32 ran them: two batches into one output folder (the second is
refused while the first runs, and a batch that fails to publish removes only what it wrote itself), an output that
does not fit the disk (that volume's failure while smaller ones still fit), a resumed batch with another thread count
or voxel type, or over an output damaged since it was written, inputs that are not for the tool (passed over, not
failed), and a patient folder of two series (the one not used is listed as passed over)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_sr_pipeline import thick_ct

from DiffusionCore.cli.batch import BATCH_LOCK_FILE, all_or_none
from DiffusionCore.cli.main import main
from DiffusionCore.errors import OutputExistsError
from DiffusionCore.files import partial_file, publish
from DiffusionCore.volume import Volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--tiny-test-model", "--no-adapt", "--progress", "none", "--factor", "2")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lines(err: str, start: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(start)]


def folder_of(tmp_path: Path, volumes: dict[str, Volume | None], name: str = "in") -> Path:
    src = tmp_path / name
    src.mkdir()
    for file, vol in volumes.items():
        if vol is None:
            (src / file).write_bytes(b"")  # an empty file: unreadable, a real failure
        else:
            write_volume(vol, src / file)
    return src


def noise(shape: tuple[int, int, int], seed: int = 0) -> Volume:
    """Voxels that do not compress: an output's size is its voxels' (with --allow-non-ct)."""
    return Volume(np.random.default_rng(seed).normal(0, 300, shape).astype(np.float32), (0.8, 0.8, 4.0))


HOLD = """
import sys, time
from pathlib import Path
from DiffusionCore.cli.batch import claim_batch_folder
claim_batch_folder(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_batch_into_a_running_batchs_folder_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys):
    """D1: two identical batches into one folder both ran; the one that failed to publish an output deleted the
    other's finished output and its sidecar. Now a batch claims its output folder: a second one is refused at once,
    naming the process that holds it, and writes nothing; a lock left by a batch killed outright is taken over."""
    src = folder_of(tmp_path, {"a.nii.gz": thick_ct((2, 12, 12)), "b.nii.gz": thick_ct((2, 12, 12), seed=1)})
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(["sr", str(src), str(out), *FAST, "--skip-existing"])
        err = capsys.readouterr().err
        assert rc == 4, err
        [error] = lines(err, "error:")
        assert f"{out} is the output folder of another batch that is running (process {holder.pid}" in error
        assert "--skip-existing" in error and "another output folder" in error
        assert sorted(os.listdir(out)) == [BATCH_LOCK_FILE]  # nothing written, the holder's lock kept
    finally:
        holder.send_signal(signal.SIGKILL)  # killed outright: its lock stays behind
        holder.wait(30)
    assert (out / BATCH_LOCK_FILE).exists()
    rc = main(["sr", str(src), str(out), *FAST, "--skip-existing"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"taking over the lock {out / BATCH_LOCK_FILE} of process {holder.pid}, which no longer runs" in err
    assert sorted(os.listdir(out)) == ["a.json", "a.nii.gz", "b.json", "b.nii.gz"]  # and the lock released


def test_a_batch_that_fails_to_publish_removes_only_the_files_it_wrote(tmp_path):
    """D1: all_or_none removed every file whose identity changed during its block, also the output and sidecar that
    another process published meanwhile (the reason this block failed). Only what the block itself published goes."""
    out = tmp_path / "out"
    out.mkdir()
    theirs, their_sidecar, mine = out / "case.nii.gz", out / "case.json", out / "mine.json"
    with pytest.raises(OutputExistsError):
        with all_or_none([mine, theirs, their_sidecar]):
            tmp = partial_file(mine)
            Path(tmp).write_text("{}", encoding="utf-8")
            publish(tmp, mine, overwrite=False)  # this block's own file: removed again
            theirs.write_bytes(b"their output")  # another process finished the same output meanwhile
            their_sidecar.write_text("{}", encoding="utf-8")
            tmp = partial_file(theirs)
            Path(tmp).write_bytes(b"our output")
            try:
                publish(tmp, theirs, overwrite=False)
            finally:
                os.unlink(tmp)
    assert theirs.read_bytes() == b"their output" and their_sidecar.exists()
    assert not mine.exists()


def test_an_output_that_does_not_fit_fails_alone_while_smaller_ones_still_fit(tmp_path, small_disk, capsys):
    """M1: one large output that did not fit the disk stopped the batch ("the disk is full") with smaller outputs
    still fitting. It is now that volume's failure, and the batch goes on while the space left holds an output of the
    smallest this batch made (a full disk still stops it: test_batch_probe19)."""
    src = folder_of(tmp_path, {"a.nii.gz": noise((3, 24, 24)), "b_big.nii.gz": noise((3, 48, 48), 1),
                               "c.nii.gz": noise((3, 24, 24), 2)})  # fmt: skip
    out, report = small_disk / "out", tmp_path / "report.json"
    rc = main(["sr", str(src), str(out), *FAST, "--allow-non-ct", "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 7, err
    assert sorted(os.listdir(out)) == ["a.json", "a.nii.gz", "c.json", "c.nii.gz"]
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["stopped"] is None and data["not_tried"] == []
    assert [f["volume"] for f in data["failed"]] == [str(src / "b_big.nii.gz")] and "is full" in data["failed"][0]["why"]
    assert "so the batch goes on" in err


@pytest.mark.parametrize("option, recorded", [(("--threads", "2"), "--threads: 1 (this run: 2)"),
                                              (("--output-dtype", "int16"), "--output-dtype: float32 (this run: int16)")])
def test_a_resumed_batch_compares_the_thread_count_and_the_voxel_type(tmp_path, capsys, option, recorded):
    """M2: --skip-existing compared the seed and factor with the outputs' provenance but not --threads (the adapted
    output depends on it) or --output-dtype: a resumed batch mixed them without a word. Refused as another seed is."""
    src = folder_of(tmp_path, {"a.nii.gz": thick_ct((2, 12, 12)), "b.nii.gz": thick_ct((2, 12, 12), seed=1)})
    out = tmp_path / "out"
    assert main(["sr", str(src), str(out), *FAST, "--threads", "1"]) == 0
    (out / "b.nii.gz").unlink()
    (out / "b.json").unlink()
    capsys.readouterr()
    rc = main(["sr", str(src), str(out), *FAST, "--threads", "1", "--skip-existing", *option])
    err = capsys.readouterr().err
    assert rc == 4, err
    [error] = lines(err, "error:")
    assert f"{out / 'a.nii.gz'} exists but was made with other settings than this run's" in error
    assert recorded in error
    assert sorted(os.listdir(out)) == ["a.json", "a.nii.gz"]
    assert main(["sr", str(src), str(out), *FAST, "--threads", "1", "--skip-existing"]) == 0  # the same settings go on


@pytest.mark.parametrize("name", ["a.nii.gz", "b.nrrd", "c.nii"])
def test_a_resumed_batch_refuses_an_output_cut_short_since_it_was_written(tmp_path, capsys, name):
    """M3: --skip-existing kept any output with a sidecar, also one cut short by a copy (`truncate -s`): the batch
    said it was done. Its header and size (a .nii.gz's gzip trailer) now tell a whole file from a cut one."""
    src = folder_of(tmp_path, {"a.nii.gz": thick_ct((2, 12, 12)), "b.nrrd": thick_ct((2, 12, 12), seed=1),
                               "c.nii": thick_ct((2, 12, 12), seed=2)})  # fmt: skip
    out = tmp_path / "out"
    assert main(["sr", str(src), str(out), *FAST]) == 0
    assert main(["sr", str(src), str(out), *FAST, "--skip-existing"]) == 0  # whole files are kept
    damaged = out / name
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size * 2 // 3)
    capsys.readouterr()
    rc = main(["sr", str(src), str(out), *FAST, "--skip-existing"])
    err = capsys.readouterr().err
    assert rc == 4, err
    [error] = lines(err, "error:")
    assert error.startswith(f"error: {damaged} exists but is not whole: it is shorter than its header says"), error
    sidecar = out / (name.split(".")[0] + ".json")  # a NIfTI's provenance; a NRRD holds it in its header
    assert (f"delete it and {sidecar} so that" if name.startswith(("a", "c")) else "delete it so that") in error


def test_inputs_that_are_not_for_the_tool_are_passed_over_not_failed(tmp_path, capsys):
    """M8: an isotropic volume, a single slice and a non-CT volume counted as failed, so every resumed batch exited 7
    ("fix those inputs"). They are passed over: each on its own line, counted apart and in the report; exit 7 only for
    a real failure, and 2 when every input was passed over."""
    iso = thick_ct((8, 12, 12))
    iso.spacing = (1.0, 1.0, 1.0)
    flat = Volume(thick_ct((2, 12, 12)).array[:1], (0.8, 0.8, 4.0))
    mr = Volume(np.abs(thick_ct((2, 12, 12)).array) / 2, (0.8, 0.8, 4.0))
    src = folder_of(tmp_path, {"a.nii.gz": thick_ct((2, 12, 12)), "iso.nii.gz": iso, "flat.nii.gz": flat,
                               "mr.nii.gz": mr})  # fmt: skip
    out, report = tmp_path / "out", tmp_path / "report.json"
    rc = main(["sr", str(src), str(out), *FAST, "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1 of 4 volume(s) written" in err and "3 passed over, listed below" in err
    assert "failed" not in err
    passed = lines(err, "info: passed over: ")
    assert len(passed) == 3 and all(line.startswith(f"info: passed over: {src / n}") for line, n in
                                    zip(passed, ("flat.nii.gz", "iso.nii.gz", "mr.nii.gz")))  # fmt: skip
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["failed"] == [] and data["summary"]["passed_over"] == 3 and data["summary"]["failed"] == 0
    assert [p["volume"] for p in data["passed_over"]] == [str(src / n) for n in ("flat.nii.gz", "iso.nii.gz",
                                                                                  "mr.nii.gz")]  # fmt: skip
    assert "isotropic" in data["passed_over"][1]["why"] and "does not look like CT" in data["passed_over"][2]["why"]
    # resumed: still 0, the passed-over ones are not "to fix"
    assert main(["sr", str(src), str(out), *FAST, "--skip-existing"]) == 0
    capsys.readouterr()
    # a real failure beside them is still exit 7
    (src / "broken.nii.gz").write_bytes(b"")
    assert main(["sr", str(src), str(out), *FAST, "--skip-existing"]) == 7
    assert "1 failed, listed below" in capsys.readouterr().err
    # nothing for the tool at all: 2, saying so
    only = folder_of(tmp_path, {"iso.nii.gz": iso, "mr.nii.gz": mr}, name="only")
    rc = main(["sr", str(only), str(tmp_path / "out2"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2, err
    [error] = lines(err, "error:")
    assert error.startswith("error: none of the 2 volumes is for this command: each was passed over")
    assert not (tmp_path / "out2").exists()


def test_the_series_a_patient_folder_does_not_use_is_listed_as_passed_over(tmp_path, capsys, dicom_series_writer):
    """M9: of a folder holding two series only the larger is used, with one warning line; the other was in neither
    the report nor the closing count. It is now passed over there, named with its series."""
    src = folder_of(tmp_path, {"a.nii.gz": thick_ct((2, 12, 12))})
    dicom_series_writer(src / "pt", thick_ct((3, 12, 12), seed=1), series_uid="1.2.826.0.1.3680043.8.498.11",
                        prefix="thick")  # fmt: skip
    dicom_series_writer(src / "pt", thick_ct((5, 12, 12), seed=2), series_uid="1.2.826.0.1.3680043.8.498.12",
                        prefix="thin")  # fmt: skip
    out, report = tmp_path / "out", tmp_path / "report.json"
    rc = main(["sr", str(src), str(out), *FAST, "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "2 of 2 volume(s) written" in err and "1 passed over, listed below" in err
    data = json.loads(report.read_text(encoding="utf-8"))
    [series] = data["passed_over"]
    assert series["volume"] == str(src / "pt") and series["series_uid"] == "1.2.826.0.1.3680043.8.498.11"
    assert "3 files)" in series["why"] and "put it in a folder of its own" in series["why"]
    assert data["summary"]["passed_over"] == 1


def test_an_added_input_does_not_rename_the_output_of_an_input_done_before(tmp_path, capsys):
    """M4: adding coll/case_nii.nii.gz to a batch of case.nii + case.nii.gz gave case.nii the `~hash` name of a clash:
    --skip-existing redid it under that name and left its old output beside it. An input with an output keeps its
    name; the new input takes the hash."""
    src = folder_of(tmp_path, {"case.nii": thick_ct((2, 12, 12)), "case.nii.gz": thick_ct((2, 12, 12), seed=1)})
    out = tmp_path / "out"
    assert main(["sr", str(src), str(out), *FAST]) == 0
    first = sorted(os.listdir(out))
    assert first == ["case_nii.json", "case_nii.nii", "case_nii_gz.json", "case_nii_gz.nii.gz"]
    (src / "coll").mkdir()
    write_volume(thick_ct((2, 12, 12), seed=2), src / "coll" / "case_nii.nii.gz")
    capsys.readouterr()
    rc = main(["sr", str(src), str(out), *FAST, "--skip-existing"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1 of 3 volume(s) written" in err and "2 skipped (2 done before)" in err
    added = sorted(set(os.listdir(out)) - set(first))
    assert len(added) == 2 and all(n.startswith("case_nii~") for n in added), added  # the new input's, with its json
    assert any(n.endswith(".nii.gz") for n in added)


def test_the_batch_stops_only_when_the_space_left_is_less_than_its_smallest_output_needs(tmp_path, monkeypatch):
    """M1 without a small disk (no root): after an output that did not fit, the batch goes on while the free space
    holds what writing its smallest output took, and stops (the disk is full) once it does not."""
    from DiffusionCore.cli import batch
    from DiffusionCore.devices import process_info
    from DiffusionCore.errors import OutputError

    out = tmp_path / "out"
    out.mkdir()
    jobs = [batch.Job(tmp_path / f"{n}.nii.gz", out / f"{n}.nii", None) for n in "abcd"]
    free = {"b": 5000, "c": 500}
    now: dict[str, int] = {}
    tried: list[str] = []

    def make_one(progress, cancel):
        def one(job):
            name = job.source.name[0]
            tried.append(name)
            if name in free:
                now["free"] = free[name]
                raise OutputError(f"could not write {job.output}: the disk holding {out} is full (0 B free; the file "
                                  "needs up to 9.0 KiB): free some space there or write to another folder")  # fmt: skip
            job.output.write_bytes(b"x" * 1000)
            return {"input": str(job.source), "output": str(job.output)}

        return one

    monkeypatch.setattr(batch, "free_bytes", lambda folder: now["free"])
    plan = batch.Plan(True, jobs, [], out)
    info = process_info("cpu")
    with pytest.raises(OutputError, match="the disk is full: 500 B free on the disk of .*, less than writing the "
                                          "smallest output this batch made needs"):  # fmt: skip
        batch.run_batch("sr", make_one, plan, None, info, batch.ProcessGroup(info), progress_style="none")
    assert tried == ["a", "b", "c"] and sorted(os.listdir(out)) == ["a.nii"]  # b's failure did not stop it; c's did
