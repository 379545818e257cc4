"""`--init-from` (and `train sr --vae`, `train xray --stageN-checkpoint`) given weights of another model stops at once
with one line naming what the weights hold and what the command needs (exit code 3, as for any weights of another
model), before any data is read. What weights hold is what their own metadata records (DiffusionCore.train.
starting_weights reads it as every loader does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ct_phantom_array

from DiffusionCore.cli.main import main
from DiffusionCore.errors import WeightsError
from DiffusionCore.train import starting_weights as sw
from DiffusionCore.volume import Volume, write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THROUGHPLANE_NEEDS = "through-plane predictor weights (e.g. sr-default)"
XRAY_NEEDS = "X-ray to CT weights (e.g. xray-default)"
SR_NEEDS = "SR latent diffusion weights (a `train sr` output folder or its sr_model.safetensors)"
VAE_NEEDS = "SR VAE weights (a `train vae` output folder or its vae.safetensors)"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A thin-slice phantom, and weights of every kind written by the real exporters of tiny models."""
    from DiffusionCore.sr.model import SRModel
    from DiffusionCore.sr.throughplane import ThroughPlaneConfig, ThroughPlaneNet
    from DiffusionCore.sr.throughplane_train import export_predictor
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
    from DiffusionCore.xray.config import tiny_stage_config

    d = tmp_path_factory.mktemp("trainguard_weights")
    write_volume(Volume(ct_phantom_array((60, 64, 64), seed=3), spacing=(0.8, 0.8, 1.0)), d / "thin.nii.gz")
    (d / "tp.json").write_text('{"model": {"channels": 8, "blocks": 1, "factors": [2, 4]}}')
    export_predictor(ThroughPlaneNet(ThroughPlaneConfig(channels=8, blocks=1, factors=[2, 4])),
                     d / "tp_run" / "throughplane.safetensors", {})  # fmt: skip
    UnifiedHybridViTCascade([tiny_stage_config(1, 16)]).save_pretrained(d / "x" / "xray_cascade.safetensors")
    model = SRModel.tiny()
    model.save(d / "vae.safetensors", component="vae")
    model.save(d / "sr_model.safetensors", component="sr")
    return {"dir": d, "data": d / "thin.nii.gz", "tp.json": d / "tp.json", "tp_run": d / "tp_run",
            "throughplane": d / "tp_run" / "throughplane.safetensors", "xray": d / "x" / "xray_cascade.safetensors",
            "vae": d / "vae.safetensors", "sr": d / "sr_model.safetensors"}  # fmt: skip


def _command(family: str, files: dict[str, Path], out: Path, *starts: str) -> list[str]:
    data = ["--data", str(files["data"])]
    if family == "throughplane":
        return [
            "train",
            "throughplane",
            "--config",
            str(files["tp.json"]),
            *data,
            "--out-dir",
            str(out),
            *starts,
        ]
    if family == "sr":
        return ["train", "sr", *data, "--out-dir", str(out), "--device", "cpu", *starts]
    return ["train", "xray", "--config", "stage1", *data, "--tiny-test-model", "--device", "cpu", "--output-dir",
            str(out), *starts]  # fmt: skip


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_train_throughplane_init_from_an_xray_file_says_what_it_holds_and_what_is_needed(files, tmp_path):
    """The user's case, as the user runs it: one line, exit 3, no traceback, no data read, no run folder left."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "DiffusionCore",
                           *_command("throughplane", files, out, "--init-from", str(files["xray"]))],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 3
    assert _errors(proc.stderr) == [
        f"error: {files['xray']} holds X-ray to CT weights; train throughplane --init-from needs {THROUGHPLANE_NEEDS}"
    ]
    # refused before the data is read
    assert "Traceback" not in proc.stderr and "CT volume" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(("family", "option", "given", "holds", "needs"), [
    ("throughplane", "--init-from", "xray-default", "X-ray to CT weights", THROUGHPLANE_NEEDS),
    ("throughplane", "--init-from", "vae", "SR VAE weights", THROUGHPLANE_NEEDS),
    ("throughplane", "--init-from", "sr", "SR latent diffusion weights (VAE + denoiser)", THROUGHPLANE_NEEDS),
    ("xray", "--init-from", "sr-default", "through-plane predictor weights", XRAY_NEEDS),
    ("xray", "--init-from", "throughplane", "through-plane predictor weights", XRAY_NEEDS),
    ("xray", "--load-all-stages", "tp_run", "through-plane predictor weights", XRAY_NEEDS),
    ("sr", "--init-from", "xray-default", "X-ray to CT weights", SR_NEEDS),
    ("sr", "--init-from", "throughplane", "through-plane predictor weights", SR_NEEDS),
    ("sr", "--vae", "xray", "X-ray to CT weights", VAE_NEEDS),
    ("sr", "--vae", "sr-default", "through-plane predictor weights", VAE_NEEDS),
])  # fmt: skip
def test_every_family_refuses_weights_of_another_model_in_one_line(family, option, given, holds, needs, files,
                                                                   tmp_path, capsys):  # fmt: skip
    source = str(files[given]) if given in files else given  # a file or run folder, or a registered name
    starts = (
        [option, source]
        if option == "--vae" or family != "sr"
        else ["--vae", str(files["vae"]), option, source]
    )
    out = tmp_path / "run"
    assert main(_command(family, files, out, *starts)) == 3
    shown = "--init-from" if option == "--load-all-stages" else option  # the same option under its two names
    assert _errors(capsys.readouterr().err) == [
        f"error: {source} holds {holds}; train {family} {shown} needs {needs}"
    ]
    assert not out.exists()


def test_a_stage_checkpoint_of_another_model_is_refused_too(files, tmp_path, capsys):
    out = tmp_path / "run"
    args = _command("xray", files, out, "--stage1-checkpoint", str(files["throughplane"]))
    args[args.index("stage1")] = "stage2"
    assert main(args) == 3
    assert _errors(capsys.readouterr().err) == [
        f"error: {files['throughplane']} holds through-plane predictor weights; train xray --stage1-checkpoint needs "
        f"{XRAY_NEEDS}"]  # fmt: skip


def test_weights_of_the_right_kind_pass_by_file_name_and_run_folder(files):
    sw.check_starting_weights("sr-default", option="o", accepts=sw.THROUGHPLANE, needs="n")
    sw.check_starting_weights(files["tp_run"], option="o", accepts=sw.THROUGHPLANE, needs="n")
    sw.check_starting_weights("xray-default", option="o", accepts=sw.XRAY, needs="n")
    sw.check_starting_weights(files["xray"].parent, option="o", accepts=sw.XRAY, needs="n")
    sw.check_starting_weights(files["sr"], option="o", accepts=sw.SR_DENOISER, needs="n")
    for source in (files["vae"], files["sr"]):  # train sr reads the VAE out of either
        sw.check_starting_weights(source, option="o", accepts=sw.SR_VAE, needs="n")
    with pytest.raises(WeightsError, match="holds SR VAE weights; o needs n"):
        sw.check_starting_weights(files["vae"], option="o", accepts=sw.SR_DENOISER, needs="n")
    # what records no family, or does not exist, is left to the loader's own message
    assert sw.weights_holding(files["dir"] / "missing.safetensors") is None
    sw.check_starting_weights(files["data"], option="o", accepts=sw.XRAY, needs="n")


def test_the_kinds_are_named_by_what_the_exporters_record():
    from DiffusionCore.sr.model import FAMILY as SR_FAMILY
    from DiffusionCore.sr.throughplane import COMPONENT
    from DiffusionCore.sr.throughplane_train import MODEL_NAME
    from DiffusionCore.xray.cascade import FAMILY as XRAY_FAMILY

    assert sw.describe((SR_FAMILY, COMPONENT)) == "through-plane predictor weights"
    assert sw.describe((XRAY_FAMILY, "")) == "X-ray to CT weights"
    assert sw.describe((SR_FAMILY, "vae")) == "SR VAE weights"
    assert sw.CHECKPOINT_MODELS[MODEL_NAME] == (SR_FAMILY, COMPONENT)
    assert sw.weights_holding("sr-default") == (SR_FAMILY, COMPONENT)
    assert sw.weights_holding("xray-default")[0] == XRAY_FAMILY
