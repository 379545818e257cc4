"""Training records the volumes it read and used, not every one it found in ``--data``.

A cohort folder holds series that training passes over (with a warning each): one that cannot be read (a missing
slice), one too short to train on (a 3-slice scout). They were recorded as training data all the same: in
``train throughplane``'s summary.json and exported weights ("trained ... on" every series found), in the checkpoints
of both families (``extra["data"]``), and so in the count of ``--resume`` on other data. Series are named by as many
of their last path parts as tell them apart (cohort trees repeat series folder names: ``p1/ct``, ``p2/ct``).

Real tiny runs through the command line (in this process: ``main``), on small DICOM phantoms, on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array, write_dicom_series

from DiffusionCore.cli.main import main
from DiffusionCore.train.checkpoint import volume_names
from DiffusionCore.volume import Volume
from DiffusionCore.weights.registry import load_safetensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The closing line of reading the cohort below: two series trained on, two passed over.
USED = "info: training on 2 of the 4 DICOM series or volume file(s) found (passed over: p3/ct, p4/ct)"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """``p1/ct`` and ``p2/ct``: CT series of 60 slices of 64x64; ``p3/ct``: one with a missing slice (unreadable);
    ``p4/ct``: a scout of 3 slices (too short for either family). Beside them, ``tp.json``: a tiny through-plane
    recipe."""
    root = tmp_path_factory.mktemp("training_data_record").resolve()
    data = root / "cohort"
    for n, seed in ((1, 3), (2, 5), (3, 7)):
        ct = Volume(ct_phantom_array((60, 64, 64), seed=seed), spacing=(0.8, 0.8, 1.0))
        write_dicom_series(data / f"p{n}" / "ct", ct, series_uid=f"1.2.826.0.1.3680043.8.498.2{n}",
                           skip=(30,) if n == 3 else ())  # fmt: skip
    scout = Volume(np.full((3, 64, 64), 40.0, np.float32), (0.8, 0.8, 2.5))
    write_dicom_series(data / "p4" / "ct", scout, series_uid="1.2.826.0.1.3680043.8.498.24")
    (root / "tp.json").write_text(json.dumps({
        "model": {"channels": 8, "blocks": 1, "factors": [2, 4]}, "pairs": {"thick_rows": 6, "width": 32},
        "batch_size": 4, "val_every": 2, "checkpoint_every": 2, "val_pairs": 4, "warmup_steps": 0,
    }))  # fmt: skip
    return data


def _state(out: Path) -> dict:
    latest = json.loads((out / "latest.json").read_text())["checkpoint"]
    return json.loads((out / latest / "state.json").read_text())


def test_volume_names_tell_repeated_series_folders_apart():
    paths = ["/c/p1/study/ct", "/c/p2/study/ct", "/c/p2/scout", "/d/a.nii.gz"]
    assert volume_names(paths) == ["p1/study/ct", "p2/study/ct", "scout", "a.nii.gz"]
    assert volume_names(["/c/a.nii.gz", "/d/b.nii.gz"]) == ["a.nii.gz", "b.nii.gz"]
    assert volume_names(["/p/ct", "/x/p/ct"]) == ["/p/ct", "x/p/ct"]  # one path the tail of another


def test_throughplane_records_summary_weights_and_resume_on_the_volumes_it_trained_on(
    cohort, tmp_path, capsys, cache_home
):
    out = tmp_path / "run"
    train = ["train", "throughplane", "--config", str(cohort.parent / "tp.json"), "--out-dir", str(out)]
    p1, p2, p3 = (cohort / f"p{n}" / "ct" for n in (1, 2, 3))
    assert main([*train, "--data", str(cohort), "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == ["p1/ct", "p2/ct"]  # was every series found, each named "ct"
    assert _state(out)["extra"]["data"] == [str(p1), str(p2)]
    _, meta = load_safetensors(out / "throughplane.safetensors")
    # the weights, which a user shares, count the volumes and never name them (names may be patients'); the local
    # summary.json above keeps the names
    assert meta["description"].endswith("trained with train throughplane for 2 steps on 2 CT volumes")
    assert meta["training"]["data"] == [] and meta["training"]["volumes"] == 2
    assert USED in err
    assert main(["weights", "import", str(out / "throughplane.safetensors"), "--name", "cohort-predictor"]) == 0
    capsys.readouterr()
    assert main(["weights", "list"]) == 0
    assert "for 2 steps on 2 CT volumes" in capsys.readouterr().out

    # resumed on p2 and the unreadable p3: it trains on p2 alone, and says that it dropped p1 (not that it adds p3)
    assert main([*train, "--data", str(p2), str(p3), "--max-steps", "4", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"dropped {p1}; from this step on it trains on the 1 volume(s) given" in err
    assert f"added {p3}" not in err
    state = _state(out)["extra"]
    assert state["data"] == [str(p2)] and state["trained_on"] == [str(p1), str(p2)]
    assert json.loads((out / "summary.json").read_text())["data"] == ["p1/ct", "p2/ct"]


def test_xray_records_in_checkpoints_and_weights_the_volumes_it_trained_on(cohort, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "xray", "--config", "stage1", "--tiny-test-model", "--device", "cpu", "--output-dir",
                 str(out), "--data", str(cohort), "--max-steps", "2"]) == 0  # fmt: skip
    assert _state(out)["extra"]["data"] == [str(cohort / "p1" / "ct"), str(cohort / "p2" / "ct")]
    _, meta = load_safetensors(out / "xray_cascade.safetensors")
    assert meta["data"] == [] and meta["volumes"] == 2 and meta["passed_over"] == 2  # counted, not named
    assert USED in capsys.readouterr().err
