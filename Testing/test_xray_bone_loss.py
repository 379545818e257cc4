"""The bone loss: an L1 loss over the voxels the training CT holds as bone, so that a stage that smooths the spine
away pays for it, however few voxels the spine is."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_optional_loss_term, recipe_changes, tiny_xray_stage

from DiffusionCore.intensity import hu_to_unit, unit_to_hu
from DiffusionCore.xray.config import load_stage_config
from DiffusionCore.xray.data import render_training_drr
from DiffusionCore.xray.losses import BONE_HU, bone_l1, gradient_l1
from DiffusionCore.xray.train import patch_stage_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


def _chest(r: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, r, r, r) model units: a soft-tissue body (40 HU) in air with a bone rod (900 HU) behind its centre, and
    the rod's voxels."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, r)] * 3, indexing="ij")
    hu = np.where((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1, 40.0, -1000.0)
    rod = x**2 + (y - 0.35) ** 2 < 0.03
    hu[rod] = 900.0
    return hu_to_unit(torch.tensor(hu, dtype=torch.float32))[None, None], torch.from_numpy(rod)[None, None]


def test_the_bone_loss_counts_the_bone_alone_whatever_its_share_of_the_cube():
    truth, rod = _chest()
    assert 0 < float(rod.float().mean()) < 0.05  # the rod is a few percent of the cube
    soft = torch.full_like(truth, float(hu_to_unit(40.0)))
    smoothed = torch.where(rod, soft, truth)  # the bone drawn as soft tissue, everything else right
    off_elsewhere = truth.clone()
    body = (truth > float(hu_to_unit(-500.0))) & ~rod
    off_elsewhere[body] += float((smoothed - truth).abs().sum()) / int(body.sum())  # the same total L1, off the bone
    assert float(bone_l1(smoothed, truth)) == pytest.approx(float(hu_to_unit(900.0)) - float(hu_to_unit(40.0)), rel=1e-5)
    assert float(bone_l1(off_elsewhere, truth)) == 0.0
    # a loss averaged over every voxel scores the two the same (to within the rod's share)
    assert float((smoothed - truth).abs().mean()) == pytest.approx(float((off_elsewhere - truth).abs().mean()))
    assert float(bone_l1(truth, truth)) == 0.0
    no_bone = torch.full_like(truth, float(hu_to_unit(BONE_HU - 1.0)))
    assert float(bone_l1(no_bone + 0.3, no_bone)) == 0.0  # a cube or patch without bone adds nothing
    assert float(gradient_l1(smoothed, truth)) > 0  # (the gradient loss does see edges, but over every voxel)


def test_stage_loss_adds_the_bone_term_with_its_weight_and_only_when_asked():
    x0 = torch.cat([_chest()[0], _chest()[0].flip(-1)])
    assert_optional_loss_term(tiny_xray_stage(1, 16, 4), x0, render_training_drr(unit_to_hu(x0), 350.0, 32), "bone_loss")


def test_a_patch_step_scores_the_bone_inside_the_patch():
    stage = tiny_xray_stage(2, 32, 4, loss_weights={"bone_loss": 0.5}, train_patch=16)
    x0 = _chest(32)[0]
    xray = render_training_drr(unit_to_hu(x0), 350.0, 32)
    prev = torch.nn.functional.avg_pool3d(x0, 2)
    with torch.no_grad():
        # the rod lies behind the centre (y > 0): the patch at y 16-31 holds it, the one at y 0-15 does not
        _, with_rod = patch_stage_loss(stage, x0, xray, prev, stage.cfg.loss_weights, origin=(0, 16, 8),
                                       generator=torch.Generator().manual_seed(2))  # fmt: skip
        _, without = patch_stage_loss(stage, x0, xray, prev, stage.cfg.loss_weights, origin=(0, 0, 8),
                                      generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert with_rod["bone_loss"] > 0 and without["bone_loss"] == 0.0


def test_the_bone_recipe_is_the_shipped_recipe_plus_the_one_loss():
    shipped = asdict(load_stage_config("stage1_default"))
    tried = asdict(load_stage_config(str(ROOT / "benchmarks" / "xray_stage1_bone.json")))
    assert recipe_changes(tried, shipped) == {"loss_weights.bone_loss": (0.0, 0.5)}
