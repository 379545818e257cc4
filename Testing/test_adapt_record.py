"""What a result records of its adaptation (probe 26): a time budget's result recorded only "5 seconds", which gives
another step count on another machine, and a skipped adaptation was recorded as done. The provenance now holds the
request, the steps run and why it was skipped; ``--skip-existing`` compares the request only, so the same command
keeps what it made."""

from __future__ import annotations

import pytest
import torch
from test_sr_pipeline import thick_ct

from DiffusionCore.cli.main import main
from DiffusionCore.provenance import read_provenance
from DiffusionCore.volume import write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def weights(tmp_path) -> list[str]:
    from DiffusionCore.sr.throughplane import tiny_predictor
    from DiffusionCore.sr.throughplane_train import export_predictor

    path = tmp_path / "w.safetensors"
    export_predictor(tiny_predictor(0), path, {})
    return ["--weights", str(path), "--allow-unregistered-weights", "--progress", "none", "--factor", "2"]


def test_a_time_budget_records_the_steps_it_ran_and_a_rerun_keeps_its_output(tmp_path, weights, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        write_volume(thick_ct(shape=(4, 40, 40)), src / f"{name}.nii.gz")
    out = tmp_path / "out"
    assert main(["sr", str(src), str(out), *weights, "--adapt", "0.5"]) == 0
    adapt = read_provenance(out / "a.nii.gz").settings["adapt"]
    assert adapt["seconds"] == 0.5 and adapt["steps"] is None and adapt["steps_run"] >= 1 and "skipped" not in adapt
    capsys.readouterr()
    assert main(["sr", str(src), str(out), *weights, "--adapt", "0.5", "--skip-existing"]) == 0
    assert "2 skipped (2 done before)" in capsys.readouterr().err


def test_a_skipped_adaptation_is_recorded_as_skipped(tmp_path, weights):
    src = write_volume(thick_ct(shape=(3, 12, 12)), tmp_path / "tiny.nii.gz")  # too small for adaptation's planes
    out = tmp_path / "out.nii.gz"
    assert main(["sr", str(src), str(out), *weights, "--adapt-steps", "5"]) == 0
    adapt = read_provenance(out).settings["adapt"]
    assert adapt["steps"] == 5 and adapt["steps_run"] == 0 and "too small" in adapt["skipped"]


def test_weights_with_a_diffusion_stage_record_the_adaptation_asked_and_why_it_was_skipped(tmp_path):
    """Probe 27: the diffusion path's provenance held no "adapt" at all, so neither the request nor the reason."""
    from DiffusionCore.sr.adapt import AdaptSettings
    from DiffusionCore.sr.pipeline import SuperResolver

    _, report = SuperResolver.tiny(seed=0).run(thick_ct(shape=(4, 24, 24)), factor=2, steps=1,
                                               adapt=AdaptSettings(steps=3, optional=True))  # fmt: skip
    adapt = report["settings"]["adapt"]
    assert adapt["steps"] == 3 and adapt["steps_run"] == 0 and "no through-plane predictor" in adapt["skipped"]


@pytest.mark.parametrize("seed", [2**32, -1, 1.5, True])
def test_every_front_end_takes_the_same_seeds(tmp_path, seed, capsys):
    """Probe 27: the Python API (without adaptation), X-ray to CT and evaluate took any seed; 2**32 gave 0's output."""
    from DiffusionCore.errors import ConfigError
    from DiffusionCore.sr.settings import SRRunSettings
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    with pytest.raises(ConfigError, match="the seed must be"):
        SRRunSettings(seed=seed)
    with pytest.raises(ConfigError, match="the seed must be"):
        XrayToCTGenerator.tiny().run(torch.rand(64, 64), seed=seed)
    if isinstance(seed, int) and not isinstance(seed, bool):
        assert main(["evaluate", "--reference", "ref.nii.gz", "--factor", "2", "--seed", str(seed)]) == 2
        assert "argument --seed: must be a whole number from 0 to 4294967295" in capsys.readouterr().err
