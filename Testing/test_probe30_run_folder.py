"""A training run's folder after the run ends: what probe 30 found (items 2, 6, 7, 8).

* A run killed (``kill -9``) before its first checkpoint sent the user in a circle: the lock take-over warning
  promised "its last checkpoint can be continued with --resume", ``--resume`` said "no checkpoint ...: start without
  --resume", and a new run said "pass --resume to continue it". Now all three say the run stopped before its first
  checkpoint and ``--overwrite`` starts it again.
* A run stopped by ``OUT/STOP`` left the file behind: a ``--resume`` started within a second (a wrapper script) took
  it for a Stop pressed during its start-up and ended at once, 0 steps, exit 0. The run that held the folder now
  removes it when it ends (every ``train`` family claims its folder the same way).
* A checkpoint folder given as weights named the checkpoint's files, which are then refused as checkpoint files; it
  now names the run's exported weights (or says none were exported yet).
* README said the best checkpoint is chosen and exported for every family; only ``train sr`` / ``vae`` do that.

Tiny ``train throughplane`` runs on a phantom, on the CPU, in this process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import test_train_probe15
from test_train_probe15 import _train

from DiffusionCore.cli.main import main
from DiffusionCore.errors import OutputError, WeightsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
files = test_train_probe15.files  # the fixture: a tiny phantom cohort ("data") and a tiny config ("tp.json")


def _lines(text: str, kind: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{kind}:")]


def _dead_lock(out: Path) -> int:
    """A ``train.lock`` of a process that no longer runs (a run killed with ``kill -9``); returns its pid."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / "train.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "1"}))
    return gone.pid


# -------------------------------------------------------------------------------- 2: killed before a checkpoint
def test_a_run_killed_before_its_first_checkpoint_is_started_again_with_overwrite_not_resumed(files, tmp_path,
                                                                                                capsys):  # fmt: skip
    out = tmp_path / "k9"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 20, "tag": "loss/train", "value": 0.5, "time": 0}) + "\n")
    (out / "tensorboard").mkdir()
    pid = _dead_lock(out)

    assert main(_train(files, out, "--resume", "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    (warning,) = [w for w in _lines(err, "warning") if "taking over the lock" in w]
    assert f"of process {pid}, which no longer runs" in warning
    assert "stopped before its first checkpoint, so there is nothing to continue" in warning
    assert "--resume" not in warning and "checkpoint can be continued" not in warning
    (line,) = _lines(err, "error")
    assert line == (f"error: --resume: the run in {out} stopped before its first checkpoint (it left only "
                    "metrics.jsonl, tensorboard): nothing to resume; pass --overwrite instead of --resume to start it "
                    "again (or choose another --out-dir)")  # fmt: skip

    assert main(_train(files, out, "--max-steps", "2")) == 4
    (line,) = _lines(capsys.readouterr().err, "error")
    assert line == (f"error: {out} already holds a training run (metrics.jsonl, tensorboard) that stopped before its "
                    "first checkpoint: nothing to resume; pass --overwrite to start it again (or choose another "
                    "--out-dir)")  # fmt: skip
    assert "--resume" not in line

    assert main(_train(files, out, "--max-steps", "2", "--overwrite")) == 0  # the way out it named works
    assert (out / "throughplane.safetensors").is_file()


def test_the_lock_warning_offers_resume_only_when_a_checkpoint_exists(tmp_path, caplog):
    from DiffusionCore.train.outdir import claim_output_dir

    out = tmp_path / "run"
    (out / "checkpoint-00000002").mkdir(parents=True)
    _dead_lock(out)
    with caplog.at_level(logging.WARNING), claim_output_dir(out, resume=True):
        pass
    (said,) = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
    assert said.endswith("its last checkpoint can be continued with --resume")

    caplog.clear()
    empty = tmp_path / "empty"  # killed before it wrote anything
    empty.mkdir()
    _dead_lock(empty)
    with caplog.at_level(logging.WARNING), claim_output_dir(empty):
        pass
    (said,) = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
    assert said.endswith("it stopped before its first checkpoint, so there is nothing to continue")


def test_resume_on_a_folder_without_any_run_keeps_its_message(tmp_path):
    from DiffusionCore.train.checkpoint import nothing_to_resume

    assert str(nothing_to_resume(tmp_path)) == (
        f"--resume: no checkpoint in {tmp_path}; check the folder's name, or start without --resume"
    )


# -------------------------------------------------------------------------------- 6: the STOP a run acted on
def test_a_run_stopped_by_its_stop_file_removes_it_so_an_immediate_resume_trains(files, tmp_path, capsys):
    out = tmp_path / "stopped"
    out.mkdir()
    (out / "STOP").touch()  # newer than this process: a Stop pressed during start-up, honoured before the first step
    assert main(_train(files, out, "--max-steps", "200")) == 0
    assert "is there as this run starts" in capsys.readouterr().err
    assert not (out / "summary.json").exists()  # nothing trained: no untrained weights exported (probe 38)
    assert not (out / "STOP").exists()  # left, a run started within a second stopped at once (0 steps)

    assert main(_train(files, out, "--max-steps", "2")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_the_claim_removes_a_stop_file_when_its_run_ends_but_not_one_of_a_run_it_did_not_hold(tmp_path):
    """Every family (vae, sr, throughplane, xray) runs inside ``claim_output_dir``: the removal is there."""
    from DiffusionCore.train.outdir import claim_output_dir

    out = tmp_path / "run"
    with claim_output_dir(out):
        (out / "STOP").touch()  # the stop the run acts on, or one that came while it exported
    assert not (out / "STOP").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    (busy / "STOP").touch()  # asks the live run that holds the folder to stop
    with pytest.raises(OutputError, match="is in use by another training run"), claim_output_dir(busy):
        pass
    assert (busy / "STOP").exists()


# -------------------------------------------------------------------------------- 8: a checkpoint folder as weights
def _checkpoint_layout(run: Path, exported: bool) -> Path:
    ckpt = run / "checkpoint-00000030"
    ckpt.mkdir(parents=True)
    for name in ("state.json", "ema.safetensors", "predictor.safetensors", "training_state.safetensors"):
        (ckpt / name).write_bytes(b"{}")
    if exported:
        (run / "throughplane.safetensors").write_bytes(b"x")
    return ckpt


def test_a_checkpoint_folder_given_as_weights_names_the_runs_exported_weights(tmp_path):
    from DiffusionCore.weights.header import read_safetensors_header

    ckpt = _checkpoint_layout(tmp_path / "tp1", exported=True)
    with pytest.raises(WeightsError) as info:
        read_safetensors_header(ckpt)
    said = str(info.value)
    assert said == (f"{ckpt} is a training checkpoint, kept for --resume, not weights to run or import: use the "
                    f"run's exported weights instead: {tmp_path / 'tp1' / 'throughplane.safetensors'}")  # fmt: skip
    assert "ema.safetensors" not in said  # refused as a checkpoint file when given

    run = tmp_path / "tp 2"  # a path to paste in a command is quoted
    ckpt = _checkpoint_layout(run, exported=False)
    with pytest.raises(WeightsError) as info:
        read_safetensors_header(ckpt)
    said = str(info.value)
    assert f"use the weights the run exports when it ends ({run} holds none yet)" in said
    assert f"train FAMILY --resume --out-dir {shlex.quote(str(run))} ..." in said and "ema.safetensors" not in said


def test_init_from_a_real_checkpoint_folder_names_the_export_the_run_wrote(files, tmp_path, capsys):
    run = tmp_path / "tp1"
    assert main(_train(files, run, "--max-steps", "2")) == 0
    ckpt = run / "checkpoint-00000002"
    assert ckpt.is_dir()
    capsys.readouterr()
    assert main(_train(files, tmp_path / "next", "--max-steps", "2", "--init-from", str(ckpt))) != 0
    (line,) = _lines(capsys.readouterr().err, "error")
    assert f"use the run's exported weights instead: {run / 'throughplane.safetensors'}" in line
    assert "ema.safetensors" not in line
    assert main(_train(files, tmp_path / "next", "--max-steps", "2", "--init-from",
                       str(run / "throughplane.safetensors"))) == 0  # fmt: skip


# -------------------------------------------------------------------------------- 7: README, best checkpoint
def test_readme_says_which_training_commands_export_the_best_checkpoint():
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "the best checkpoint is chosen by it, and export writes it" not in text
    assert ("`train sr` and `vae` export the checkpoint that scored best in validation (the latest when none was "
            "scored), `train throughplane` and `xray` the average at the last step") in text
    for trainer in ("sr/throughplane_train.py", "xray/train.py"):  # no best-checkpoint selection there
        assert not re.search(r"mark_best|find_best", (ROOT / "DiffusionCore" / trainer).read_text(encoding="utf-8"))
    assert "mark_best" in (ROOT / "DiffusionCore" / "sr" / "training.py").read_text(encoding="utf-8")


def test_the_training_panel_offers_overwrite_not_resume_for_a_run_stopped_before_its_first_checkpoint(tmp_path):
    """The Slicer training panel says what the train command says (the panel's logic needs no Qt)."""
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))
    try:
        from CTDiffusionSRLib.training import output_folder_problem
    finally:
        sys.path.remove(str(ROOT / "CTDiffusionSR"))
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    problem = output_folder_problem(run)
    assert "stopped before its first checkpoint" in problem and "nothing to resume" in problem, problem
    assert "'Overwrite'" in problem and "'Resume' to continue" not in problem, problem
    assert output_folder_problem(run, overwrite=True) == ""
    (run / "model.safetensors").write_text("weights of an earlier run")  # more than logs: resume or overwrite
    assert "Tick 'Resume' to continue it" in output_folder_problem(run)
