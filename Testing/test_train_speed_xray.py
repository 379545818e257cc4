"""The x-ray family of ``benchmarks/train_speed.py``: its written-out training step computes the training loss."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from DiffusionCore.config import config_to_dict
from DiffusionCore.volume import write_volume
from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
from DiffusionCore.xray.config import tiny_stage_config
from DiffusionCore.xray.train import CascadeObjective

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks" / "train_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("patch", [False, True], ids=["whole-grid", "patch"])
def test_xray_stage_loss_matches_cascade_objective(bench, patch, one_torch_thread):
    """Same random draws, same terms: the timed loss equals ``CascadeObjective``'s for stages 1 and 2."""
    c1 = tiny_stage_config(1, 16)
    c2 = tiny_stage_config(2, 32, refine_channels=4)
    if patch:  # 32^3 grid of 8^3 tokens, windowed: 16^3 patches
        c2 = replace(c2, model=replace(c2.model, train_patch=16))
    torch.manual_seed(0)
    cascade = UnifiedHybridViTCascade([c1, c2])
    vols = {16: torch.rand(2, 1, 16, 16, 16) * 2 - 1, 32: torch.rand(2, 1, 32, 32, 32) * 2 - 1}
    xray = torch.rand(2, 1, 32, 32)
    for s in (1, 2):
        torch.manual_seed(1)
        ref, ref_parts = CascadeObjective(cascade, [s])(vols, xray, 0.1)
        laps: list[str] = []
        torch.manual_seed(1)
        loss, parts = bench.xray_stage_loss(cascade, s, vols, xray, 0.1, laps.append)
        assert laps == ["previous stage"] * (s > 1) + ["conditioning", "denoiser fwd", "drr loss"]
        torch.testing.assert_close(loss, ref)
        expected = {k.split("/", 1)[1]: v for k, v in ref_parts.items() if not k.endswith("/total")}
        assert parts == pytest.approx(expected)
        assert "drr_loss" in parts


def test_xray_family_runs(bench, tmp_path, make_phantom, one_torch_thread):
    """One step of a tiny stage config on a phantom: JSON with the six parts and the rates."""
    write_volume(make_phantom(), tmp_path / "ct.nii.gz")
    cfg = tiny_stage_config(1, 16)
    cfg = replace(cfg, data=replace(cfg.data, fov_mm=40.0))  # 2.5 mm voxels: coarser than the phantom's
    (tmp_path / "stage1.json").write_text(json.dumps(config_to_dict(cfg)))
    out = tmp_path / "ts.json"
    rc = bench.main([str(out), "--family", "xray", "--xray-config", str(tmp_path / "stage1.json"),
                     "--data", str(tmp_path / "ct.nii.gz"), "--steps-xray", "1", "--warmup", "0",
                     "--threads", "1", "--xray-batch", "1"])  # fmt: skip
    assert rc == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["family"] == "xray" and row["stage"] == 1 and row["batch_size"] == 1
    assert list(row["parts_seconds_per_step"]) == [
        "data", "conditioning", "denoiser fwd", "drr loss", "backward", "optimizer"
    ]  # fmt: skip
    assert row["thin_voxels_per_patch"] == 16**3
    assert 0 < row["trainable_parameters"] == row["cascade_parameters"]
    assert row["samples_per_s"] > 0
