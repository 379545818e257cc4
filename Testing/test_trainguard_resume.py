"""`--resume` on a run whose latest checkpoint is damaged, or with other training data than the run recorded.

* A damaged latest checkpoint (a truncated or altered file, an unreadable state.json) is passed over for the newest
  intact one, with a warning that names the damaged file and the checkpoint used; every family resumes through
  DiffusionCore.train.checkpoint.resumable_checkpoint. With no intact checkpoint the run stops in one line.
* Other ``--data`` than the run recorded is warned of, naming the volumes added and dropped; ``train throughplane``'s
  summary.json lists every volume the run has trained on, over all its stretches.

Real tiny runs through the command line (in this process: ``main``), on small phantoms, on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import ct_phantom_array
from torch import nn

from DiffusionCore.cli.main import main
from DiffusionCore.errors import WeightsError
from DiffusionCore.train.checkpoint import resumable_checkpoint, save_training_state
from DiffusionCore.volume import Volume, write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("trainguard_resume")
    for name, seed in (("a.nii.gz", 3), ("b.nii.gz", 5)):
        write_volume(Volume(ct_phantom_array((60, 64, 64), seed=seed), spacing=(0.8, 0.8, 1.0)), d / name)
    (d / "tp.json").write_text(json.dumps({
        "model": {"channels": 8, "blocks": 1, "factors": [2, 4]}, "pairs": {"thick_rows": 6, "width": 32},
        "batch_size": 4, "val_every": 2, "checkpoint_every": 2, "val_pairs": 4, "warmup_steps": 0,
    }))  # fmt: skip
    (d / "sr.json").write_text(json.dumps({
        "vae": {"channels": [8, 8, 16]}, "train": {"val_patches": 1, "val_fraction": 0.3, "val_every": 0,
                                                  "checkpoint_every": 2, "log_every": 1},
    }))  # fmt: skip
    return {"a": (d / "a.nii.gz").resolve(), "b": (d / "b.nii.gz").resolve(), "tp.json": d / "tp.json",
            "sr.json": d / "sr.json"}  # fmt: skip


def _train(family: str, files: dict, out: Path, steps: int, *data: str, resume: bool = False) -> list[str]:
    volumes = [str(files[v]) for v in data or ("a",)]
    if family == "throughplane":
        args = ["--config", str(files["tp.json"]), "--out-dir", str(out)]
    elif family == "vae":
        args = ["--config", str(files["sr.json"]), "--patch-size", "8", "32", "32", "--batch-size", "1",
                "--device", "cpu", "--out-dir", str(out)]  # fmt: skip
    else:
        args = ["--config", "stage1", "--tiny-test-model", "--device", "cpu", "--output-dir", str(out)]
    return [
        "train",
        family,
        *args,
        "--data",
        *volumes,
        "--max-steps",
        str(steps),
        *(["--resume"] if resume else []),
    ]


def _latest_step(out: Path) -> int:
    return json.loads((out / json.loads((out / "latest.json").read_text())["checkpoint"] / "state.json").read_text())[
        "step"]  # fmt: skip


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


# ------------------------------------------------------------------------------------- a damaged checkpoint
def _three_checkpoints(out: Path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        save_training_state(
            out, step=step, epoch=0, models={"net": model}, optimizers={"opt": opt}, config={"a": 1}
        )


@pytest.mark.parametrize(("damage", "said"), [
    (lambda c: _truncate(c / "net.safetensors"), "net.safetensors is truncated"),
    (lambda c: (c / "state.json").write_text('{"step": 3, "fi'), "state.json is unreadable"),
    (lambda c: (c / "training_state.safetensors").open("ab").write(b"\0\0"), "training_state.safetensors fails its "
                                                                             "sha256 check"),
    (lambda c: (c / "net.safetensors").unlink(), "net.safetensors is missing"),
], ids=["truncated", "state.json", "altered", "missing"])  # fmt: skip
def test_a_damaged_latest_checkpoint_is_passed_over_for_the_newest_intact_one(damage, said, tmp_path, caplog):
    _three_checkpoints(tmp_path)
    damage(tmp_path / "checkpoint-00000003")
    with caplog.at_level(logging.WARNING, logger="DiffusionCore"):
        assert resumable_checkpoint(tmp_path) == tmp_path / "checkpoint-00000002"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0]
    assert message.startswith(
        f"--resume: the latest checkpoint is damaged ({tmp_path / 'checkpoint-00000003'}/{said}"
    )
    assert message.endswith(f"resuming from {tmp_path / 'checkpoint-00000002'} (step 2) instead: the steps after it "
                            "are trained again")  # fmt: skip


def test_no_intact_checkpoint_stops_naming_each_damaged_one(tmp_path):
    _three_checkpoints(tmp_path)
    for step in (1, 2, 3):
        _truncate(tmp_path / f"checkpoint-0000000{step}" / "net.safetensors")
    with pytest.raises(
        WeightsError,
        match=r"--resume: no intact checkpoint in .*checkpoint-00000003/net.safetensors is "
        r"truncated .*checkpoint-00000001/net.safetensors is truncated.*--overwrite",
    ):
        resumable_checkpoint(tmp_path)
    # no checkpoint at all: the caller's "nothing to resume"
    assert resumable_checkpoint(tmp_path / "empty") is None


@pytest.mark.parametrize(("family", "damaged"), [
    ("throughplane", "predictor.safetensors"),  # was: "... is truncated", the run stopped
    ("throughplane", "state.json"),  # was: passed over without a word
    ("vae", "vae.safetensors"),
    ("xray", "cascade.safetensors"),
])  # fmt: skip
def test_every_family_resumes_from_the_last_intact_checkpoint_and_says_so(
    family, damaged, files, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(_train(family, files, out, 4)) == 0, capsys.readouterr().err
    latest = out / "checkpoint-00000004"
    if damaged == "state.json":
        (latest / damaged).write_text("{")
    else:
        _truncate(latest / damaged)
    capsys.readouterr()
    assert main(_train(family, files, out, 6, resume=True)) == 0
    err = capsys.readouterr().err
    said = "is unreadable" if damaged == "state.json" else "is truncated"
    assert f"warning: --resume: the latest checkpoint is damaged ({latest / damaged} {said}" in err
    assert f"resuming from {out / 'checkpoint-00000002'} (step 2) instead" in err
    assert err.count("the latest checkpoint is damaged") == 1
    assert _latest_step(out) == 6


def test_a_run_with_no_intact_checkpoint_is_not_resumed(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train("throughplane", files, out, 4)) == 0
    for step in (2, 4):
        _truncate(out / f"checkpoint-0000000{step}" / "predictor.safetensors")
    capsys.readouterr()
    assert main(_train("throughplane", files, out, 6, resume=True)) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --resume: no intact checkpoint in {out} (")


# ------------------------------------------------------------------------------------------ other data
def test_throughplane_resumed_on_other_data_names_them_and_its_summary_lists_every_volume(
    files, tmp_path, capsys
):
    out = tmp_path / "run"
    a, b = files["a"], files["b"]
    assert main(_train("throughplane", files, out, 2, "a")) == 0
    capsys.readouterr()
    assert main(_train("throughplane", files, out, 4, "b", resume=True)) == 0
    err = capsys.readouterr().err
    assert (f"warning: resuming with other training data than the run recorded ({out / 'checkpoint-00000002'}): "
            f"added {b}; dropped {a}; from this step on it trains on the 1 volume(s) given") in err  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == ["a.nii.gz", "b.nii.gz"]  # not only this stretch's b
    assert main(_train("throughplane", files, out, 6, "a", "b", resume=True)) == 0
    err = capsys.readouterr().err
    assert (
        f"other training data than the run recorded ({out / 'checkpoint-00000004'}): added {a}; from" in err
    )
    assert json.loads((out / "summary.json").read_text())["data"] == ["a.nii.gz", "b.nii.gz"]
    assert main(_train("throughplane", files, out, 8, "a", "b", resume=True)) == 0
    assert "other training data" not in capsys.readouterr().err  # the same data: nothing to say


@pytest.mark.parametrize("family", ["vae", "xray"])
def test_vae_and_xray_resumed_on_other_data_name_the_volumes_added_and_dropped(
    family, files, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(_train(family, files, out, 2, "a")) == 0
    capsys.readouterr()
    assert main(_train(family, files, out, 4, "a", "b", resume=True)) == 0
    err = capsys.readouterr().err
    assert (f"warning: resuming with other training data than the run recorded ({out / 'checkpoint-00000002'}): "
            f"added {files['b']}; from this step on it trains on the 2 volume(s) given") in err  # fmt: skip
    assert "train.data" not in err  # said once, volume by volume, not again as a changed setting
    capsys.readouterr()
    assert main(_train(family, files, out, 6, "b", resume=True)) == 0
    assert (
        f"added {files['b']}" not in (err := capsys.readouterr().err) and f"dropped {files['a']}; from" in err
    )
