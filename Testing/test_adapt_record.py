"""What a result records of its adaptation (probe 26): a time budget's result recorded only "5 seconds", which gives
another step count on another machine, and a skipped adaptation was recorded as done. The provenance now holds the
request, the steps run and why it was skipped; ``--skip-existing`` compares the request only, so the same command
keeps what it made."""

from __future__ import annotations

import pytest
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
