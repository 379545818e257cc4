"""Training that diverges says so, and training runs are protected and stop honestly (docs/reliability.md).

Every family (``train vae``, ``sr``, ``throughplane``, ``xray``) through the real command line, in a
subprocess, with tiny networks on a small phantom: the exit code, the one ``error:`` line, and what is left
in the output folder (no non-finite weights, the checkpoint and export after a signal, the lock).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ct_phantom_array
from safetensors.torch import load_file

from DiffusionCore.cli.main import main
from DiffusionCore.config import config_to_dict
from DiffusionCore.errors import ConfigError, NumericalError, OutputError
from DiffusionCore.sr.config import tiny_config
from DiffusionCore.volume import Volume, write_volume
from DiffusionCore.xray.config import tiny_stage_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
FAMILIES = ("vae", "sr", "throughplane", "xray")
EXPORTS = {"vae": "vae.safetensors", "sr": "sr_model.safetensors", "throughplane": "throughplane.safetensors",
           "xray": "xray_cascade.safetensors"}  # fmt: skip


# ---------------------------------------------------------------------------------------------- setup
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A thin-slice phantom and tiny configs for every family; a trained tiny VAE for ``train sr``."""
    d = tmp_path_factory.mktemp("reliability_training")
    ct = d / "thin.nii.gz"
    write_volume(Volume(ct_phantom_array((60, 64, 64), seed=3), spacing=(0.8, 0.8, 1.0)), ct)
    tiny = tiny_config()
    (d / "sr.json").write_text(json.dumps({
        "vae": {"channels": list(tiny.vae.channels)}, "unet": {"num_heads": 2},
        "diffusion": {"num_train_timesteps": 4, "num_inference_steps": 4},
        "train": {"val_patches": 1, "val_fraction": 0.3, "factors": [4], "val_every": 0, "checkpoint_every": 2,
                  "log_every": 1},
    }))  # fmt: skip
    (d / "throughplane.json").write_text(json.dumps({
        "model": {"channels": 8, "blocks": 1, "factors": [2, 4]}, "pairs": {"thick_rows": 6, "width": 32},
        "batch_size": 4, "val_every": 2, "checkpoint_every": 2, "val_pairs": 4, "warmup_steps": 0,
    }))  # fmt: skip
    diverging = config_to_dict(
        tiny_stage_config(1, 16)
    )  # a tiny network, without --tiny-test-model's settings
    diverging["training"]["learning_rate"] = 1e12
    (d / "xray_diverging.json").write_text(json.dumps(diverging))
    vae = d / "vae"
    proc = _cli(["train", "vae", *_family_args("vae", {"data": ct, "sr.json": d / "sr.json"}), "--max-steps", "1",
                 "--out-dir", str(vae)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"data": ct, "sr.json": d / "sr.json", "throughplane.json": d / "throughplane.json",
            "xray_diverging.json": d / "xray_diverging.json", "vae": vae}  # fmt: skip


def _family_args(family: str, files: dict[str, Path]) -> list[str]:
    """The options that make ``train FAMILY`` a tiny run on the phantom (without --out-dir / --max-steps)."""
    data = ["--data", str(files["data"])]
    if family in ("vae", "sr"):
        common = ["--config", str(files["sr.json"]), *data, "--patch-size", "8", "32", "32", "--batch-size", "1",
                  "--device", "cpu"]  # fmt: skip
        if family == "sr":
            common += [
                "--vae",
                str(files["vae"]),
                "--model-channels",
                "16",
                "--num-train-timesteps",
                "4",
                "--no-cfg",
            ]
        return common
    if family == "throughplane":
        return ["--config", str(files["throughplane.json"]), *data]
    return ["--config", "stage1", *data, "--tiny-test-model", "--device", "cpu"]


def _cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "DiffusionCore", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)  # fmt: skip


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _start_until_training(args: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """Start ``python -m DiffusionCore ARGS`` and return once its training loop has logged a step."""
    proc = subprocess.Popen([sys.executable, "-m", "DiffusionCore", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("info: step") or line.startswith("info: saved checkpoint"):
            return proc, seen
    proc.wait(timeout=30)
    raise AssertionError(f"training never started (exit {proc.returncode}):\n{''.join(seen)[-3000:]}")


def _finish(proc: subprocess.Popen, seen: list[str]) -> tuple[int, str]:
    try:
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, "".join(seen) + rest


def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point())


def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("checkpoint-*") if p.is_dir())


# ---------------------------------------------------------------------------------------------- options
def test_every_numeric_option_of_every_train_family_is_checked_when_parsed():
    """No ``train`` option is a plain int/float: NaN, infinities and out-of-range values never get past argparse."""
    import argparse

    from DiffusionCore.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    train = parser._subparsers._group_actions[0].choices["train"]
    families = train._subparsers._group_actions[0].choices
    assert set(FAMILIES) <= set(families)
    for name, fam in families.items():
        plain = [a.option_strings[0] for a in fam._actions if a.type in (int, float)]
        assert not plain, f"train {name}: {plain} are not checked; add them to NUMERIC_OPTIONS"
        if name in FAMILIES:
            assert any("--overwrite" in a.option_strings for a in fam._actions), name


@pytest.mark.parametrize(
    ("family", "option", "message"),
    [
        ("vae", ["--learning-rate", "nan"], "argument --learning-rate: must be a finite number > 0; got nan"),
        ("vae", ["--ema-decay", "2"], "argument --ema-decay: must be a finite number from 0 to 1; got 2"),
        ("vae", ["--checkpoint-every", "0"], "argument --checkpoint-every: must be an integer >= 1; got 0"),
        ("vae", ["--max-steps", "0"], "argument --max-steps: must be an integer >= 1; got 0"),
        ("sr", ["--max-steps", "-1"], "argument --max-steps: must be an integer >= 1; got -1"),
        ("sr", ["--learning-rate", "inf"], "argument --learning-rate: must be a finite number > 0; got inf"),
        (
            "throughplane",
            ["--learning-rate", "nan"],
            "argument --learning-rate: must be a finite number > 0; got nan",
        ),
        (
            "throughplane",
            ["--max-minutes", "inf"],
            "argument --max-minutes: must be a finite number >= 0; got inf",
        ),
        ("xray", ["--max-steps", "0"], "argument --max-steps: must be an integer >= 1; got 0"),
        ("xray", ["--max-minutes", "nan"], "argument --max-minutes: must be a finite number >= 0; got nan"),
    ],
)
def test_bad_numeric_options_exit_2_before_any_work(family, option, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", family, "--data", "nowhere", "--out-dir", str(out), *option]) == 2
    assert _errors(capsys.readouterr().err) == [f"error: {message}; see python -m DiffusionCore train {family} --help"]
    assert not out.exists()


def test_bad_numbers_in_a_config_file_exit_2_naming_the_key(files, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"ema_decay": 1.0}}))
    proc = _cli(
        ["train", "vae", "--config", str(bad), "--data", str(files["data"]), "--out-dir", str(tmp_path / "r")]
    )
    assert proc.returncode == 2
    assert _errors(proc.stderr) == ["error: train.ema_decay must be a finite number >= 0 and < 1; got 1.0"]


def test_training_numbers_are_checked_for_every_config():
    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig
    from DiffusionCore.train.numerics import check_training_numbers

    cfg = tiny_config()
    cfg.train.learning_rate = float("nan")
    with pytest.raises(ConfigError, match=r"train.learning_rate must be a finite number > 0; got nan"):
        check_training_numbers(cfg.train, "train.")
    xray = tiny_stage_config(1, 16)
    xray.training.checkpoint_every = 0
    with pytest.raises(ConfigError, match=r"training.checkpoint_every must be an integer >= 1; got 0"):
        check_training_numbers(xray.training, "training.")
    xray.training.checkpoint_every, xray.training.max_steps = 2, 0  # 0: epochs x steps_per_epoch
    check_training_numbers(xray.training, "training.")
    with pytest.raises(ConfigError, match="ema_decay"):
        ThroughPlaneTrainConfig(ema_decay=float("nan"))


# ---------------------------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("family", FAMILIES)
def test_a_diverging_run_exits_1_and_exports_no_weights(family, files, tmp_path):
    out = tmp_path / "run"
    if family == "xray":  # --tiny-test-model brings its own learning rate: a tiny config file instead
        args = [
            "--config",
            str(files["xray_diverging.json"]),
            "--data",
            str(files["data"]),
            "--device",
            "cpu",
        ]
    else:
        args = [*_family_args(family, files), "--learning-rate", "1e12"]
    proc = _cli(["train", family, *args, "--max-steps", "6", "--out-dir", str(out)])
    assert proc.returncode == 1, proc.stderr[-3000:]
    [error] = _errors(proc.stderr)
    assert error.startswith("error: training diverged at step") and "Nothing was exported" in error
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("*.safetensors"))  # no exported weights
    for ckpt in _checkpoints(out):  # the checkpoints written before the divergence are finite
        assert all(_all_finite(f) for f in ckpt.glob("*.safetensors")), ckpt
    assert not (out / "train.lock").exists()


def test_the_loss_watch_stops_nan_inf_and_a_millionfold_growth():
    from DiffusionCore.train.numerics import LossWatch

    watch = LossWatch(learning_rate=1e12)
    for step, loss in enumerate([0.3, 0.01, 2.0, 1e-4, 0.5]):  # a working run's spread: no stop
        watch(torch.tensor(loss), step)
    with pytest.raises(
        NumericalError, match=r"at step 5: the loss grew to 4e\+20, 2.0e\+20 times its level .* \(2\)"
    ):
        watch(4e20, 5)
    with pytest.raises(
        NumericalError, match=r"at step 0: the loss is nan\. Nothing was exported.*rate \(1e\+12\)"
    ):
        LossWatch(1e12)(torch.tensor(float("nan")), 0)
    with pytest.raises(NumericalError, match="the loss is inf"):
        LossWatch()(float("inf"), 3)


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path):
    from DiffusionCore.train.checkpoint import save_training_state

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_training_state(tmp_path, step=1, epoch=0, models={"m": model}, optimizers={"o": opt})
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(
        NumericalError, match=r"diverged by step 2: 1 tensor\(s\) hold NaN.*checkpoint-00000001"
    ):
        save_training_state(tmp_path, step=2, epoch=0, models={"m": model}, optimizers={"o": opt})
    assert [p.name for p in _checkpoints(tmp_path)] == ["checkpoint-00000001"]
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 1


# ---------------------------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("family", ["vae", "throughplane", "xray"])
def test_sigterm_checkpoints_exports_and_exits_130(family, files, tmp_path):
    """A killed background stretch is not lost: SIGTERM ends the run as a STOP file does, then exits 130."""
    out = tmp_path / "run"
    proc, seen = _start_until_training(["train", family, *_family_args(family, files), "--max-steps", "100000",
                                        "--out-dir", str(out)])  # fmt: skip
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc, seen)
    assert code == 130, err[-3000:]
    assert _errors(err) == [f"error: training was stopped by SIGTERM: the checkpoint and the exported weights in "
                            f"{out} were written first; continue with --resume"]  # fmt: skip
    assert _checkpoints(out) and _all_finite(out / EXPORTS[family])
    assert not (out / "train.lock").exists()


def test_ctrl_c_also_checkpoints_exports_and_exits_130(files, tmp_path):
    out = tmp_path / "run"
    proc, seen = _start_until_training(["train", "vae", *_family_args("vae", files), "--max-steps", "100000",
                                        "--out-dir", str(out)])  # fmt: skip
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc, seen)
    assert code == 130 and "stopped by SIGINT" in _errors(err)[0], err[-3000:]
    assert _checkpoints(out) and (out / "vae.safetensors").is_file()


def test_a_stop_file_is_a_requested_stop_exit_0_with_the_export(files, tmp_path):
    out = tmp_path / "run"
    proc, seen = _start_until_training(["train", "vae", *_family_args("vae", files), "--max-steps", "100000",
                                        "--out-dir", str(out)])  # fmt: skip
    (out / "STOP").touch()
    code, err = _finish(proc, seen)
    assert code == 0 and not _errors(err), err[-3000:]
    assert _checkpoints(out) and _all_finite(out / "vae.safetensors")


def test_max_minutes_is_a_clean_stop_exit_0_with_the_export(files, tmp_path):
    out = tmp_path / "run"
    proc = _cli(
        ["train", "xray", *_family_args("xray", files), "--max-minutes", "0.001", "--out-dir", str(out)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "time limit" in proc.stderr and (out / "xray_cascade.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- the folder
def test_a_second_run_on_a_folder_in_use_refuses_with_exit_4(files, tmp_path):
    out = tmp_path / "run"
    args = ["train", "throughplane", *_family_args("throughplane", files), "--out-dir", str(out)]
    first, seen = _start_until_training([*args, "--max-steps", "100000"])
    try:
        lock = json.loads((out / "train.lock").read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
        second = _cli([*args, "--max-steps", "2", "--resume"])
        assert second.returncode == 4
        assert _errors(second.stderr) == [
            f"error: {out} is in use by another training run (process {first.pid}, lock file {out / 'train.lock'}): "
            f"wait for it to end, stop it (create {out / 'STOP'}), or choose another --out-dir"
        ]
        assert json.loads((out / "train.lock").read_text()) == lock  # the first run's lock is untouched
    finally:
        (out / "STOP").touch()
    code, err = _finish(first, seen)
    assert code == 0, err[-3000:]
    assert not (out / "train.lock").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / "train.lock").write_text(
        json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "1"})
    )
    proc = _cli(["train", "throughplane", *_family_args("throughplane", files), "--max-steps", "2", "--out-dir",
                 str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"taking over the lock {out / 'train.lock'} of process {gone.pid}, which no longer runs"
        in proc.stderr
    )
    assert not (out / "train.lock").exists() and (out / "throughplane.safetensors").is_file()


def test_a_finished_run_is_refused_without_overwrite_and_init_from_starts_a_new_folder(
    files, tmp_path, capsys
):
    out = tmp_path / "run"
    args = ["train", "throughplane", *_family_args("throughplane", files)]
    assert _cli([*args, "--max-steps", "4", "--out-dir", str(out)]).returncode == 0
    weights = out / "throughplane.safetensors"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = _cli([*args, "--max-steps", "2", "--out-dir", str(out)])
    assert again.returncode == 4
    assert _errors(again.stderr) == [
        f"error: {out} already holds a training run (checkpoint-00000002, checkpoint-00000004, latest.json, ...): "
        "pass --resume to continue it, --overwrite to replace it with a new run, or choose another --out-dir "
        "(--init-from WEIGHTS starts a new run from a previous run's weights in a new folder)"
    ]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing changed

    new = tmp_path / "continued"  # --init-from reads the finished run; the new run has its own folder
    started = _cli([*args, "--max-steps", "2", "--init-from", str(weights), "--out-dir", str(new)])
    assert started.returncode == 0, started.stderr[-3000:]
    assert "initialised" in started.stderr and (new / "throughplane.safetensors").is_file()

    assert main([*args, "--max-steps", "2", "--resume", "--overwrite", "--out-dir", str(out)]) == 2
    assert _errors(capsys.readouterr().err) == [
        "error: --resume continues the run in the folder and --overwrite replaces it: give one of them"
    ]

    replaced = _cli([*args, "--max-steps", "2", "--overwrite", "--out-dir", str(out)])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert [p.name for p in _checkpoints(out)] == ["checkpoint-00000002"]  # old and new checkpoints never mix
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the set-aside checkpoints are gone


def test_claim_output_dir_in_process(tmp_path):
    from DiffusionCore.train.outdir import claim_output_dir

    out = tmp_path / "run"
    with claim_output_dir(out):
        assert (out / "train.lock").is_file()
        with pytest.raises(OutputError, match=f"in use by another training run \\(process {os.getpid()}"):
            with claim_output_dir(out, resume=True):
                pass
        assert (out / "train.lock").is_file()  # the refused claim left the holder's lock alone
    assert not out.exists()  # created for the claim, left empty: removed
    out.mkdir()
    (out / "STOP").touch()
    os.utime(out / "STOP", (1_000_000_000, 1_000_000_000))  # an earlier run's: older than this process
    with claim_output_dir(out, is_main=True):
        assert not (out / "STOP").exists()  # an earlier run's STOP would end this one at once
    (out / "checkpoint-00000002").mkdir()
    with pytest.raises(OutputError, match="--overwrite sets aside the checkpoints in .* would start from"):
        with claim_output_dir(out, overwrite=True, reads=[out / "checkpoint-00000002"]):
            pass
    assert (out / "checkpoint-00000002").is_dir()  # refused before anything was moved
    other_host = {"pid": 1, "host": "elsewhere.example", "started": None}
    (out / "train.lock").write_text(json.dumps(other_host))
    with pytest.raises(OutputError, match="on elsewhere.example.*delete the lock file"):
        with claim_output_dir(out):
            pass
    # the foreign lock stays: only its host can tell whether that run ended
    assert json.loads((out / "train.lock").read_text()) == other_host


def _without_config(args: list[str]) -> list[str]:
    i = args.index("--config")
    return args[:i] + args[i + 2 :]


@pytest.mark.parametrize("family", ["throughplane", "vae", "xray"])
def test_resume_without_a_config_continues_with_the_settings_the_run_recorded(family, files, tmp_path, capsys):
    """`--resume` without `--config` built the family's default network and stopped ("checkpoint ... does not fit
    model ..."), exit 3, for every family: a run started with a config file could be continued only by naming that
    file again. The checkpoint records the settings; they are what resume continues with."""
    out = tmp_path / "run"
    out_flag = "--output-dir" if family == "xray" else "--out-dir"
    args = _family_args(family, files)
    assert main(["train", family, *args, out_flag, str(out), "--max-steps", "2"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["train", family, *_without_config(args), out_flag, str(out), "--max-steps", "4", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "continuing with the settings the run recorded" in err and "does not fit" not in err
    state = json.loads((out / json.loads((out / "latest.json").read_text())["checkpoint"] / "state.json").read_text())
    assert state["step"] == 4


@pytest.mark.parametrize("family", ["throughplane", "vae", "xray"])
def test_resume_on_a_folder_without_a_run_is_refused(family, files, tmp_path, capsys):
    """`train throughplane --resume` into a folder without a checkpoint (a mistyped name) started a new run without a
    word, and `train xray` said so in a warning: as if the earlier training had gone on. Every family refuses it."""
    (tmp_path / "empty").mkdir()
    out_flag = "--output-dir" if family == "xray" else "--out-dir"
    rc = main(["train", family, *_family_args(family, files), out_flag, str(tmp_path / "empty"), "--resume"])
    assert rc == 2
    assert _errors(capsys.readouterr().err) == [
        f"error: --resume: no checkpoint in {tmp_path / 'empty'}; check the folder's name, or start without --resume"]
    assert os.listdir(tmp_path / "empty") == []


def _cohort_folder(folder: Path, files: dict[str, Path]) -> Path:
    """A folder holding the phantom (hard-linked): a cohort a run reads."""
    folder.mkdir()
    os.link(files["data"], folder / "thin.nii.gz")
    return folder


def _refused_inside(capsys, cohort: Path, option: str, out: Path) -> None:
    """The one error line of an output folder inside the cohort, and the cohort left as it was."""
    assert _errors(capsys.readouterr().err) == [
        f"error: {option} {out} lies inside the input folder {cohort}: writing there would change what is read from "
        "that folder (a series, a cohort), so it is refused even with --overwrite. Choose a path outside it."]
    assert sorted(os.listdir(cohort)) == ["thin.nii.gz"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_run_folder_inside_the_training_data_is_refused_before_any_work(family, files, tmp_path, capsys):
    """A run folder inside the cohort folder put its checkpoints, logs and weights among the scans, where the next scan
    of the folder reads them (and --overwrite sets files aside there). Every family refuses it, whatever --overwrite
    says, before anything is read or written; so is the cohort folder itself."""
    cohort = _cohort_folder(tmp_path / "my scans", files)
    args = [a if a != str(files["data"]) else str(cohort) for a in _family_args(family, files)]
    out_flag = "--output-dir" if family == "xray" else "--out-dir"
    for out in (cohort / "run", cohort):
        assert main(["train", family, *args, out_flag, str(out), "--overwrite"]) == 4
        _refused_inside(capsys, cohort, out_flag, out)


def test_prepare_xray_data_into_its_ct_folder_is_refused(files, tmp_path, capsys):
    """prepare-xray-data wrote its cubes into the CT folder it read, where the next prepare-xray-data or train xray on
    that folder took each cube in as one more CT."""
    cohort = _cohort_folder(tmp_path / "cts", files)
    assert main(["prepare-xray-data", "--data", str(cohort), "--output-dir", str(cohort / "cubes")]) == 4
    _refused_inside(capsys, cohort, "--output-dir", cohort / "cubes")


def test_resume_of_a_vae_run_at_its_last_step_trains_nothing_and_changes_nothing(files, tmp_path, capsys):
    """`train vae --resume` on a run at its last step rewrote its checkpoint and exported its weights again (a new
    sha256), as train throughplane and train xray did."""
    import shutil

    run = tmp_path / "vae"
    shutil.copytree(files["vae"], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc = main(["train", "vae", *_family_args("vae", files), "--max-steps", "1", "--out-dir", str(run), "--resume"])
    assert rc == 2
    (line,) = _errors(capsys.readouterr().err)
    assert line.startswith(f"error: nothing to train: the run in {run} is at step 1, at or past its last step 1 ")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
