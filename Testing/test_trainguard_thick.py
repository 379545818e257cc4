"""`train throughplane` on CTs whose slices are all thicker than 3 mm says, once, what the predictor then learns;
one thin-slice CT among them (the shipped recipe: chest-lidc at 2.5 mm with chest-dx at 5 mm) keeps it quiet."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import ct_phantom_array

from DiffusionCore.cli.main import main
from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig, load_sources
from DiffusionCore.volume import Volume, write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAID = "every training CT has slices thicker than 3 mm"


@pytest.fixture(scope="module")
def cts(tmp_path_factory):
    """Phantom CTs by slice thickness (mm), each 40 slices of 64 x 64 at 0.8 mm."""
    d = tmp_path_factory.mktemp("trainguard_thick")
    out = {}
    for mm in (2.5, 4.0, 5.0):
        out[mm] = d / f"ct_{mm:g}mm.nii.gz"
        write_volume(
            Volume(ct_phantom_array((40, 64, 64), seed=int(mm * 2)), spacing=(0.8, 0.8, mm)), out[mm]
        )
    return out


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_only_thick_slices_are_warned_of_once_naming_each_volume_and_its_spacing(cts, caplog):
    with caplog.at_level(logging.INFO, logger="DiffusionCore"):
        load_sources([cts[4.0], cts[5.0]], ThroughPlaneTrainConfig())
    assert _warnings(caplog) == [
        f"{SAID} (ct_4mm.nii.gz at 4 mm, ct_5mm.nii.gz at 5 mm): its through-plane pairs then teach thick-to-thicker "
        "slices, and the predictor learns thin detail only from the in-plane pairs; add a thin-slice CT (slices of 3 mm "
        "or less) to --data"]  # fmt: skip


@pytest.mark.parametrize("thicknesses", [(2.5, 5.0), (2.5,)])
def test_one_thin_slice_ct_among_them_keeps_it_quiet(thicknesses, cts, caplog):
    with caplog.at_level(logging.INFO, logger="DiffusionCore"):
        load_sources([cts[mm] for mm in thicknesses], ThroughPlaneTrainConfig())
    assert _warnings(caplog) == []


def test_train_throughplane_on_thick_slices_says_it_once(cts, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": {"channels": 8, "blocks": 1, "factors": [2, 4]},
                               "pairs": {"thick_rows": 6, "width": 32}, "batch_size": 4, "val_pairs": 4}))  # fmt: skip
    assert main(["train", "throughplane", "--config", str(cfg), "--data", str(cts[4.0]), "--out-dir",
                 str(tmp_path / "run"), "--max-steps", "2"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert err.count(SAID) == 1 and f"warning: {SAID} (ct_4mm.nii.gz at 4 mm)" in err
