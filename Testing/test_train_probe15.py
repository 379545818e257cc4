"""Training your own SR weights, then using them: what probe 15 found on the DiffusionCore / command-line side.

* ``train throughplane`` without ``--config`` trains the shipped recipe (``sr/configs/throughplane/default.json``),
  so the documented ``--init-from sr-default`` works with no config (it stopped: "its predictor (32 channels,
  6 blocks) differs from the configured one (32, 5)").
* A ``STOP`` file created after the training process started (the Slicer panel's Stop pressed during start-up) ends
  the run at its first step; only a stale one, older than the process, is removed (the claim deleted it, the run went
  on for 120 s and was killed).
* A folder holding only an earlier run's logs (``metrics.jsonl``, ``tensorboard/``) holds a run: refused without
  ``--resume`` / ``--overwrite``; ``--overwrite`` sets the logs aside, so the new curve starts clean.
* A cohort with no validation slices says so once, in words (it logged "validation 4-3" and nothing more).
* ``--resume`` on a run at its ``max_steps`` trains nothing and changes nothing, and says so (it re-exported
  the weights with a new sha256 and an empty ``validation``).
* A training checkpoint's file given as weights names the run's exported weights; ``train export-sr`` on a
  through-plane run names its export (they pointed to exports that do not exist).
* Pasteable commands in messages quote their paths (a path with spaces could not be pasted).
* Short runs log their last step's loss to ``metrics.jsonl`` and TensorBoard (a 10-step run logged nothing).

Real tiny runs through the command line (``main`` in this process, or a subprocess where the process's start
time matters), on small phantoms, on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ct_phantom_array

from DiffusionCore.cli.main import main
from DiffusionCore.errors import InputError, WeightsError
from DiffusionCore.train.logger import read_metrics
from DiffusionCore.volume import Volume, write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = {"model": {"channels": 8, "blocks": 1, "factors": [2, 4]}, "pairs": {"thick_rows": 6, "width": 32},
        "batch_size": 4, "val_every": 2, "checkpoint_every": 2, "val_pairs": 4, "warmup_steps": 0}  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("probe15 é")
    cohort = d / "my scans é"
    cohort.mkdir()
    write_volume(Volume(ct_phantom_array((60, 64, 64), seed=3), spacing=(0.8, 0.8, 1.0)), cohort / "pat01 thin.nii.gz")
    short = d / "short é"
    short.mkdir()
    write_volume(Volume(ct_phantom_array((6, 64, 64), seed=4), spacing=(0.8, 0.8, 1.0)), short / "short 6.nii.gz")
    large = d / "large é"  # planes of the shipped recipe (16 x 96 voxels) fit
    large.mkdir()
    write_volume(Volume(ct_phantom_array((70, 100, 100), seed=5), spacing=(0.8, 0.8, 1.0)), large / "pat02.nrrd")
    (d / "tp.json").write_text(json.dumps(TINY))
    return {"data": cohort, "short": short, "large": large, "tp.json": d / "tp.json", "root": d}


@pytest.fixture(scope="module")
def finished_run(files) -> Path:
    """A tiny through-plane run that ended at its --max-steps 2 (a checkpoint at step 2 and its export)."""
    out = files["root"] / "run é 2"
    assert main(_train(files, out, "--max-steps", "2")) == 0
    return out


def _train(files: dict, out: Path, *more: str, config: bool = True, data: str = "data") -> list[str]:
    args = ["train", "throughplane", "--data", str(files[data]), "--out-dir", str(out), "--threads", "1", *more]
    return args + (["--config", str(files["tp.json"])] if config else [])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# -------------------------------------------------------------------------------- 1: no --config, --init-from
def test_train_throughplane_without_a_config_trains_the_shipped_recipe_so_init_from_sr_default_fits(
    files, tmp_path, capsys
):
    """It built the config class's defaults (5 blocks) and refused sr-default (6 blocks), exit 2."""
    import DiffusionCore
    from DiffusionCore.train.checkpoint import find_latest, read_checkpoint_info

    shipped_recipe = Path(DiffusionCore.__file__).resolve().parent / "sr" / "configs" / "throughplane" / "default.json"

    out = tmp_path / "init from é"
    args = _train(files, out, "--init-from", "sr-default", "--max-steps", "1", "--batch-size", "2", config=False,
                  data="large")  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert f"no --config: training with {shipped_recipe}, the recipe of the shipped sr-default weights" in err
    recorded = read_checkpoint_info(find_latest(out))["config"]
    shipped = json.loads(shipped_recipe.read_text())
    assert {k: recorded["model"][k] for k in shipped["model"]} == shipped["model"]  # 6 blocks, not 5
    assert recorded["val_every"] == shipped["val_every"] and recorded["pairs"]["width"] == shipped["pairs"]["width"]
    assert recorded["batch_size"] == 2  # options still override the recipe
    assert (out / "throughplane.safetensors").is_file()


def test_init_from_weights_of_another_size_names_the_config_to_give(files, tmp_path, capsys):
    out = tmp_path / "other size"
    assert main(_train(files, out, "--init-from", "sr-default", "--max-steps", "1")) == 2  # the tiny config
    (line,) = _errors(capsys.readouterr().err)
    assert "differs from the configured one (8, 1): give a --config whose model has 32 channels and 6 blocks" in line
    assert "throughplane/default.json" in line


# -------------------------------------------------------------------------------- 2: Stop during start-up
def test_a_stop_file_created_after_the_process_started_ends_the_run_at_its_first_step(files, tmp_path):
    """The claim deleted any STOP: a Stop pressed while the trainer imported torch was lost (the run went on). It ends
    the run before its first step, and (probe 38) no untrained weights are exported as if trained."""
    out = tmp_path / "early stop é"
    script = (
        "import sys; from pathlib import Path\n"
        "out = Path(sys.argv[1]); out.mkdir(); (out / 'STOP').touch()  # the panel's Stop, during start-up\n"
        "from DiffusionCore.cli.main import main\n"
        "sys.exit(main(sys.argv[2:]))\n"
    )
    argv = _train(files, out, "--max-steps", "200")
    proc = subprocess.run([sys.executable, "-c", script, str(out), *argv], capture_output=True, text=True, encoding="utf-8", env=ENV,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and not _errors(proc.stderr), proc.stderr[-3000:]
    assert "is there as this run starts" in proc.stderr and "nothing was trained" in proc.stderr
    assert not (out / "summary.json").exists() and not (out / "throughplane.safetensors").exists()
    assert not (out / "latest.json").exists() and not (out / "STOP").exists()


def test_only_a_stop_file_older_than_the_process_is_removed_when_a_run_claims_its_folder(tmp_path):
    from DiffusionCore.train.outdir import claim_output_dir

    out = tmp_path / "run"
    out.mkdir()
    stale = 1_000_000_000  # 2001: older than this process
    (out / "STOP").touch()
    os.utime(out / "STOP", (stale, stale))  # left by an earlier run
    with claim_output_dir(out):
        assert not (out / "STOP").exists()
    (out / "STOP").touch()  # created after this process started, and after its last run on the folder ended
    with claim_output_dir(out):
        assert (out / "STOP").exists()


def test_process_start_time_is_when_this_process_started():
    from DiffusionCore.train.outdir import process_start_time

    proc = subprocess.run([sys.executable, "-c", "import time; t = time.time(); from DiffusionCore.train.outdir import "
                           "process_start_time as s; print(t - s())"], capture_output=True, text=True, encoding="utf-8", env=ENV,
                          timeout=120)  # fmt: skip
    assert 0.0 <= float(proc.stdout) + 1.0 < 30.0, proc.stderr  # /proc's boot time has whole seconds
    assert process_start_time() <= time.time()


def test_train_vae_keeps_a_stop_file_created_after_the_process_started(tmp_path, monkeypatch):
    """train sr / vae removed the STOP file again when their run was set up (sr/training._Run)."""
    from DiffusionCore.sr import training

    out = tmp_path / "vae"
    out.mkdir()
    (out / "STOP").touch()
    cfg = training.load_config({"vae": {"channels": [8, 8, 16]}, "train": {"device": "cpu"}}, training.SRConfig)
    run = training._Run(cfg, out, None)
    assert (out / "STOP").exists() and run.stop.requested


# -------------------------------------------------------------------------------- 8: a folder holding only logs
def test_a_folder_holding_an_earlier_runs_logs_is_a_run_and_overwrite_starts_clean_logs(files, tmp_path, capsys):
    """Logs without a checkpoint (a run killed before its first checkpoint) counted as an empty folder: the new run's
    records were appended to the old ones, two runs in one curve."""
    out = tmp_path / "half run é"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tag": "loss/train", "value": 0.5, "time": 0})
                                               + "\n" for s in (20, 300)))  # fmt: skip
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.old").write_bytes(b"old")
    assert main(_train(files, out, "--max-steps", "2")) == 4
    (line,) = _errors(capsys.readouterr().err)
    assert f"{out} already holds a training run (metrics.jsonl, tensorboard)" in line and "--overwrite" in line
    assert len(read_metrics(out)) == 2  # refused: nothing changed
    assert main(_train(files, out, "--max-steps", "2", "--overwrite")) == 0
    steps = {r["step"] for r in read_metrics(out)}
    assert steps and max(steps) <= 2  # the new run's records only
    assert not (out / "tensorboard" / "events.out.tfevents.1.old").exists()


# -------------------------------------------------------------------------------- 9: no validation slices
def test_a_cohort_without_validation_slices_says_validation_is_off_once_in_words(files, tmp_path, capsys):
    out = tmp_path / "short run"
    assert main(_train(files, out, "--max-steps", "2", data="short")) == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert "validation 4-3" not in err and "short 6.nii.gz: train slices 0-3, no validation slices, test 4-5" in err
    warnings = [line for line in err.splitlines() if "validation is off" in line]
    assert len(warnings) == 1 and "exported weights are unscored" in warnings[0], err[-3000:]
    assert json.loads((out / "summary.json").read_text())["validation"] == {}


# -------------------------------------------------------------------------------- 10: resume at max_steps
def test_resume_of_a_run_at_its_max_steps_trains_nothing_changes_nothing_and_says_so(finished_run, tmp_path, capsys):
    """It rewrote the last checkpoint and re-exported the weights (a new sha256, an empty validation) in silence."""
    out = tmp_path / "done é"
    shutil.copytree(finished_run, out)
    before = {p.relative_to(out): (_sha(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "throughplane", "--data", str(finished_run.parent / "my scans é"), "--out-dir", str(out),
                 "--resume"]) == 2  # fmt: skip
    (line,) = _errors(capsys.readouterr().err)
    assert f"nothing to train: the run in {out} is at step 2, at or past max_steps 2; give a larger --max-steps" in line
    after = {p.relative_to(out): (_sha(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before
    # a higher --max-steps continues it
    assert main(["train", "throughplane", "--data", str(finished_run.parent / "my scans é"), "--out-dir", str(out),
                 "--resume", "--max-steps", "3"]) == 0  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


# -------------------------------------------------------------------------------- 11: checkpoint files as weights
def test_a_training_checkpoints_file_given_as_weights_names_the_runs_exported_weights(finished_run, cache_home):
    from DiffusionCore.weights.registry import import_weights, resolve_weights

    exported = finished_run / "throughplane.safetensors"
    for name in ("ema.safetensors", "predictor.safetensors"):
        ckpt_file = finished_run / "checkpoint-00000002" / name
        with pytest.raises(WeightsError, match="is a file of a training checkpoint") as exc:
            resolve_weights(ckpt_file, family="sr", allow_unregistered=True)
        assert f"use the run's exported weights instead: {exported}" in str(exc.value)
        with pytest.raises(WeightsError, match=f"use the run's exported weights instead: {exported}"):
            import_weights(ckpt_file, "ck-pred", family="sr")
    assert not (cache_home / "weights").exists() or not list((cache_home / "weights").iterdir())


def test_export_sr_on_a_throughplane_run_names_its_exported_weights(finished_run, tmp_path, capsys):
    from DiffusionCore.sr.training import export_sr

    exported = finished_run / "throughplane.safetensors"
    for source in (finished_run, finished_run / "checkpoint-00000002"):
        with pytest.raises(InputError, match="holds a train throughplane run") as exc:
            export_sr(source, tmp_path / "exp.safetensors")
        assert f"whose weights are already exported at {exported}" in str(exc.value)
    assert main(["train", "export-sr", str(finished_run), str(tmp_path / "exp.safetensors")]) == 2
    assert "holds a train throughplane run" in _errors(capsys.readouterr().err)[0]
    assert not (tmp_path / "exp.safetensors").exists()


def test_without_an_export_the_messages_say_how_to_get_it_with_a_pasteable_command(finished_run, tmp_path, cache_home):
    """A run killed before it exported: the checkpoint's file and export-sr say how to get the weights."""
    from DiffusionCore.sr.training import export_sr
    from DiffusionCore.weights.registry import resolve_weights

    run = tmp_path / "killed run é"
    shutil.copytree(finished_run, run)
    (run / "throughplane.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"holds none yet\): continue it with") as exc:
        resolve_weights(run / "checkpoint-00000002" / "ema.safetensors", family="sr", allow_unregistered=True)
    assert f"--out-dir {shlex.quote(str(run))} ..." in str(exc.value)
    with pytest.raises(InputError, match="that file is missing") as exc:
        export_sr(run, tmp_path / "exp.safetensors")
    assert f"train throughplane --resume --out-dir {shlex.quote(str(run))} --data ..." in str(exc.value)


# -------------------------------------------------------------------------------- 12: pasteable commands
def test_the_register_it_once_command_quotes_a_path_with_spaces(finished_run, tmp_path, cache_home):
    from DiffusionCore.weights.registry import resolve_weights

    weights = tmp_path / "run é 2" / "throughplane.safetensors"
    weights.parent.mkdir()
    shutil.copy(finished_run / "throughplane.safetensors", weights)
    with pytest.raises(WeightsError, match="not a registered weights file") as exc:
        resolve_weights(weights, family="sr")
    command = str(exc.value).split("`")[1]
    assert command == f"python -m DiffusionCore weights import {shlex.quote(str(weights))} --name NAME"
    assert shlex.split(command)[5] == str(weights)  # pasted into a shell, the path is one word


# -------------------------------------------------------------------------------- 14: short runs are logged
def test_a_short_run_logs_its_last_step_to_metrics_and_tensorboard(files, tmp_path):
    out = tmp_path / "ten steps"
    assert main(_train(files, out, "--max-steps", "3")) == 0
    losses = [r["step"] for r in read_metrics(out) if r["tag"] == "loss/train"]
    assert losses == [3]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_log_every_sets_the_loss_interval_and_the_last_step_is_logged(files, tmp_path):
    config = tmp_path / "log2.json"
    config.write_text(json.dumps({**TINY, "log_every": 2}))
    out = tmp_path / "log every"
    args = ["train", "throughplane", "--config", str(config), "--data", str(files["data"]), "--out-dir", str(out),
            "--max-steps", "5", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    assert [r["step"] for r in read_metrics(out) if r["tag"] == "loss/train"] == [2, 4, 5]
