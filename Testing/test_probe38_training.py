"""Probe 38: fine-tuning the through-plane predictor headless (``train throughplane``).

* a run scores its weights at the step it ends (max steps, time limit, STOP, a signal), once, unless it validated
  there already: in summary.json, the export's metadata and on the console beside the starting score;
* files of a data folder or list that cannot be used (not a volume, NaN voxels, too short) are passed over with a
  warning and recorded in summary.json; a file named by itself still stops the run;
* the thread count is said at the start, with where it came from; the help says the defaults;
* a STOP file there as the run starts ends it before anything is trained or exported;
* a progress line between validations; a fine-tune's description says what it was fine-tuned from;
* ``--init-from`` with a misspelt name suggests the name, a missing path says the file does not exist.

Tiny runs (the TINY config of test_train_probe15) on phantoms, in this process; one real subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array
from test_train_probe15 import TINY

from DiffusionCore.cli.main import main
from DiffusionCore.train.logger import read_metrics
from DiffusionCore.volume import Volume, write_volume
from DiffusionCore.weights.header import read_safetensors_header

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _ct(path: Path, seed: int = 3, slices: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(Volume(ct_phantom_array((slices, 64, 64), seed=seed), spacing=(0.8, 0.8, 1.0)), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("probe38")
    good = d / "good"
    _ct(good / "a.nii.gz", 3)
    _ct(good / "b.nii.gz", 4)
    mixed = d / "mixed"
    _ct(mixed / "a.nii.gz", 3)
    _ct(mixed / "b.nii.gz", 4)
    (mixed / "broken.nii.gz").write_text("this is a text file, not a volume\n")
    nan = ct_phantom_array((60, 64, 64), seed=5)
    nan[10:20, 20:30, 20:30] = np.nan
    write_volume(Volume(nan, spacing=(0.8, 0.8, 1.0)), mixed / "nan.nii.gz")
    _ct(mixed / "short.nii.gz", 6, slices=3)  # too short to hold out test and validation slices
    bad = d / "bad"
    bad.mkdir()
    (bad / "broken.nii.gz").write_text("not a volume")
    write_volume(Volume(nan, spacing=(0.8, 0.8, 1.0)), bad / "nan.nii.gz")
    (d / "tiny.json").write_text(json.dumps({**TINY, "val_every": 4, "checkpoint_every": 100}))
    return {"good": good, "mixed": mixed, "bad": bad, "cfg": d / "tiny.json", "root": d}


def _train(data: dict, out: Path, *more: str, on: str = "good") -> list[str]:
    return ["train", "throughplane", "--data", str(data[on]), "--out-dir", str(out), "--threads", "1",
            "--config", str(data["cfg"]), *more]  # fmt: skip


def _val_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if r["tag"] == "val/gain"]


def _meta(out: Path) -> dict:
    return read_safetensors_header(out / "throughplane.safetensors")[1]


# ----------------------------------------------------------------------------- 1: the score at the last step
def test_a_run_that_ends_between_validations_is_validated_once_at_its_last_step(data, tmp_path, capsys):
    out = tmp_path / "five"
    assert main(_train(data, out, "--max-steps", "5")) == 0  # validates at 4, ends at 5
    err = capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert _val_steps(out) == [4, 5]
    assert summary["validation_step"] == 5 and set(summary["validation"]) >= {"val/gain", "val/psnr_x2"}
    last_logged = [r["value"] for r in read_metrics(out) if r["tag"] == "val/gain"][-1]
    assert summary["validation"]["val/gain"] == pytest.approx(last_logged)
    assert _meta(out)["training"]["validation"] == summary["validation"]  # the exported weights say it too
    assert "validation at the last step, 5: val/gain=" in err

    # ending at a validation step: not validated twice
    out4 = tmp_path / "four"
    assert main(_train(data, out4, "--max-steps", "4")) == 0
    capsys.readouterr()
    assert _val_steps(out4) == [4]
    assert json.loads((out4 / "summary.json").read_text())["validation_step"] == 4


def test_a_fine_tune_stopped_by_its_time_limit_shows_the_change_from_its_starting_score(data, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(_train(data, first, "--max-steps", "2")) == 0
    weights = first / "throughplane.safetensors"
    capsys.readouterr()
    out = tmp_path / "ft"
    assert main(_train(data, out, "--max-steps", "100000", "--max-minutes", "0.0001", "--init-from", str(weights))) == 0
    captured = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert 1 <= steps < 100000 and "time limit" in captured.err
    assert summary["validation"] and summary["validation_step"] == steps  # it was {} before
    at_start, last = summary["validation_at_start"]["val/gain"], summary["validation"]["val/gain"]
    assert f"validation at the last step, {steps}: val/gain={last:.3f} (at the start {at_start:.3f}: " \
           f"{last - at_start:+.3f} dB)" in captured.err
    printed = json.loads(captured.out)
    assert printed["validation"] == summary["validation"] and printed["validation_at_start"]
    meta = _meta(out)
    assert meta["training"]["validation"] == summary["validation"]
    # 7: a fine-tune says so in its description (and so in `weights list`)
    assert f"fine-tuned from throughplane.safetensors for {steps} steps on 2 CT volumes" in meta["description"]
    assert "trained with train throughplane" not in meta["description"]
    assert "trained with train throughplane for 2 steps on 2 CT volumes" in _meta(first)["description"]


def test_a_stop_file_during_training_exports_the_last_score_exit_0(data, tmp_path):
    """A real process stopped with its STOP file (as the probe did): the summary has the last step's score."""
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "DiffusionCore", *_train(data, out, "--max-steps", "100000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    try:
        deadline = 240
        t0 = time.time()
        while not any(r["tag"] == "loss/train" for r in read_metrics(out)) and time.time() - t0 < deadline:
            time.sleep(0.2)  # the first logged loss: it trains
        (out / "STOP").touch()
        stdout, stderr = proc.communicate(timeout=deadline)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation"] and summary["validation_step"] == summary["steps"] > 0
    assert json.loads(stdout)["validation"] == summary["validation"]
    assert f"validation at the last step, {summary['steps']}: val/gain=" in stderr


# ----------------------------------------------------------------------------- 2: bad files in a data folder
def test_bad_files_in_a_data_folder_are_passed_over_and_recorded(data, tmp_path, capsys):
    out = tmp_path / "mixed"
    assert main(_train(data, out, "--max-steps", "2", on="mixed")) == 0
    err = capsys.readouterr().err
    mixed = data["mixed"]
    for name, why in (("broken.nii.gz", "could not read it: "), ("nan.nii.gz", "are NaN or infinite"),
                      ("short.nii.gz", "3 slices is too short")):  # fmt: skip
        (line,) = [ln for ln in err.splitlines() if ln.startswith("warning: passed over") and name in ln]
        assert str(mixed / name) in line and why in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == ["a.nii.gz", "b.nii.gz"]
    passed = {Path(p["volume"]).name: p["why"] for p in summary["passed_over"]}
    assert set(passed) == {"broken.nii.gz", "nan.nii.gz", "short.nii.gz"} and "NaN" in passed["nan.nii.gz"]
    assert _meta(out)["training"]["passed_over"] == 3  # the weights count them; the names stay in the run folder

    # a list file naming a bad file and a missing one: passed over the same way
    listed = tmp_path / "list.txt"
    listed.write_text(f"{mixed / 'a.nii.gz'}\n{mixed / 'broken.nii.gz'}\n{tmp_path / 'gone.nii.gz'}\n")
    out2 = tmp_path / "listed"
    assert main(["train", "throughplane", "--data", str(listed), "--out-dir", str(out2), "--threads", "1",
                 "--config", str(data["cfg"]), "--max-steps", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["data"] == ["a.nii.gz"]
    assert {Path(p["volume"]).name for p in summary["passed_over"]} == {"broken.nii.gz", "gone.nii.gz"}


def test_nothing_usable_is_an_error_naming_each_and_a_file_named_by_itself_stops_the_run(data, tmp_path, capsys):
    assert main(_train(data, tmp_path / "bad", "--max-steps", "2", on="bad")) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert "none of the CT volumes could be read" in line
    assert "broken.nii.gz" in line and "nan.nii.gz" in line

    for name, why in (("broken.nii.gz", "not a valid NIfTI"), ("nan.nii.gz", "NaN or infinite")):
        args = ["train", "throughplane", "--data", str(data["good"]), str(data["mixed"] / name), "--out-dir",
                str(tmp_path / name), "--threads", "1", "--config", str(data["cfg"]), "--max-steps", "2"]  # fmt: skip
        assert main(args) == 2
        (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert name in line and why in line


# ----------------------------------------------------------------------------- 3, 4: threads, limits
def test_the_run_says_its_thread_count_and_where_it_came_from_and_the_help_says_the_defaults(data, tmp_path, capsys):
    assert main(_train(data, tmp_path / "t", "--max-steps", "1")) == 0
    assert "training with 1 torch thread(s): threads 1 from --threads" in capsys.readouterr().err
    cfg = tmp_path / "threads.json"
    cfg.write_text(json.dumps({**TINY, "threads": 1}))
    assert main(["train", "throughplane", "--data", str(data["good"]), "--out-dir", str(tmp_path / "c"),
                 "--config", str(cfg), "--max-steps", "1"]) == 0  # fmt: skip
    assert f"training with 1 torch thread(s): threads 1 from {cfg}" in capsys.readouterr().err

    assert main(["train", "throughplane", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "torch threads (default: the config's threads, 2 in the shipped recipe; 0: torch's default" in text
    assert "0: no time limit, the run goes on to max_steps" in text
    assert "100000 in the shipped recipe" in text


# ----------------------------------------------------------------------------- 5: a STOP file at the start
def test_a_stop_file_there_at_the_start_trains_and_exports_nothing(data, tmp_path, capsys):
    out = tmp_path / "st"
    out.mkdir()
    (out / "STOP").touch()  # newer than this process: kept by the claim, so it reaches the run
    assert main(_train(data, out, "--max-steps", "3")) == 0
    err = capsys.readouterr().err
    assert f"{out / 'STOP'} is there as this run starts" in err
    assert "nothing was trained and no weights were exported" in err
    assert "was created after this run started" not in err
    assert not (out / "throughplane.safetensors").exists() and not (out / "summary.json").exists()
    assert not (out / "STOP").exists()  # removed when the run ends: the next run trains
    assert main(_train(data, out, "--max-steps", "2")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_a_stop_file_from_an_earlier_run_is_removed_with_a_warning(tmp_path, capsys):
    from DiffusionCore.train.outdir import claim_output_dir

    out = tmp_path / "old"
    out.mkdir()
    (out / "STOP").touch()
    os.utime(out / "STOP", (1_000_000_000, 1_000_000_000))
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.WARNING)
    logging.getLogger("DiffusionCore").addHandler(handler)
    try:
        with claim_output_dir(out):
            assert not (out / "STOP").exists()
    finally:
        logging.getLogger("DiffusionCore").removeHandler(handler)
    assert any("left from before this run" in r.getMessage() for r in records)


# ----------------------------------------------------------------------------- 6: progress between validations
def test_progress_lines_between_validations(data, tmp_path, capsys, monkeypatch):
    from DiffusionCore.sr import throughplane_train

    monkeypatch.setattr(throughplane_train, "PROGRESS_SECONDS", 0.0)
    assert main(_train(data, tmp_path / "p", "--max-steps", "3")) == 0
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if " planes/s " in ln]
    assert [ln.split()[2] for ln in lines] == ["1", "2", "3"]
    assert lines[0].startswith("info: step 1 of 3  loss ") and "(mean of the last 1)" in lines[0]
    assert lines[-1].endswith(" 0 s left")
    assert " planes/s" not in captured.out  # stdout keeps the summary alone
    json.loads(captured.out)


# ----------------------------------------------------------------------------- 8: --init-from messages
def test_init_from_a_misspelt_name_or_a_missing_file(data, tmp_path, capsys):
    assert main(_train(data, tmp_path / "m1", "--max-steps", "1", "--init-from", "sr-defualt")) != 0
    err = capsys.readouterr().err
    assert "no weights named 'sr-defualt' (did you mean 'sr-default'?)" in err
    missing = tmp_path / "runs" / "tp1" / "throughplane.safetensors"
    assert main(_train(data, tmp_path / "m2", "--max-steps", "1", "--init-from", str(missing))) != 0
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "no weights named" not in err


def test_a_volume_stored_with_its_slices_along_another_axis_is_warned_of(data, tmp_path, capsys):
    """Probe 38, 6: a CT stored sagittally (2.5 mm along array axis 1) was trained on without a word, its 0.8 mm
    planes taken as slices and its "test region" one side of the patient."""
    upright = ct_phantom_array((60, 64, 64), seed=3)
    folder = tmp_path / "sagittal"
    folder.mkdir()
    write_volume(Volume(np.ascontiguousarray(upright.transpose(1, 0, 2)), spacing=(0.8, 2.5, 0.8)),
                 folder / "sag.nii.gz")  # fmt: skip
    assert main(["train", "throughplane", "--data", str(folder), "--out-dir", str(tmp_path / "run"), "--threads", "1",
                 "--config", str(data["cfg"]), "--max-steps", "1"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "not z, which training takes as the slice axis" in ln]
    assert line.startswith("warning: sag.nii.gz: its voxels are 0.8 x 2.5 x 0.8 mm") and "along array axis y" in line
    # a volume stored with its slices along z says nothing of the kind
    assert main(_train(data, tmp_path / "good", "--max-steps", "1")) == 0
    assert "which training takes as the slice axis" not in capsys.readouterr().err
