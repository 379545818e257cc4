"""The cross-view DRR loss: a training loss in the view at right angles to the input's, which scores where a
generated volume puts things in depth (the spine behind the heart) that the input view cannot see."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from conftest import assert_optional_loss_term, body_phantom_cubes, recipe_changes, tiny_xray_stage

from DiffusionCore.errors import ConfigError
from DiffusionCore.intensity import unit_to_hu
from DiffusionCore.xray.config import load_stage_config, tiny_stage_config
from DiffusionCore.xray.data import render_training_drr
from DiffusionCore.xray.drr import cross_view
from DiffusionCore.xray.losses import drr_l1, stage_loss
from DiffusionCore.xray.train import patch_stage_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


def _spine_moved_to_the_front(r: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(truth, wrong): one body, its dense 'spine' behind the centre in ``truth`` and mirrored to the front of the
    body in ``wrong``; a PA ray (along y) crosses the same voxels' values in both."""
    truth = body_phantom_cubes(1, r)
    return truth, torch.flip(truth, dims=[3])


def test_the_cross_view_loss_sees_a_spine_put_at_the_wrong_depth_where_the_input_view_cannot():
    truth, wrong = _spine_moved_to_the_front()
    spacing = 350.0 / truth.shape[-1]
    assert cross_view("pa") == "lateral" and cross_view("lateral") == "pa"
    # the PA re-projection loss cannot tell the two apart: every PA ray sums the same values
    assert float(drr_l1(wrong, truth, spacing, "pa")) < 1e-6
    # the lateral one can, and more so the further the spine is from where it belongs
    assert float(drr_l1(wrong, truth, spacing, cross_view("pa"))) > 0.01
    assert float(drr_l1(truth, truth, spacing, "lateral")) < 1e-6

    class Fixed:  # a "stage" whose prediction is the wrong-depth volume, whatever it is given
        cfg = replace(tiny_stage_config(1, 16), loss_weights=replace(tiny_stage_config(1, 16).loss_weights,
                                                                     cross_view_drr_loss=0.5))  # fmt: skip

        def __call__(self, x_t, t, xray, prev, return_lifted=False):
            return wrong.expand_as(x_t), None

    _, parts = stage_loss(Fixed(), truth, torch.zeros(1, 1, 32, 32), None, Fixed.cfg.loss_weights,  # type: ignore[arg-type]
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert parts["drr_loss"] < 1e-6 and parts["cross_view_drr_loss"] > 0.01


def test_stage_loss_adds_the_cross_view_term_with_its_weight_and_only_when_asked():
    x0 = body_phantom_cubes(2, 16)
    xray = render_training_drr(unit_to_hu(x0), 350.0, 32)
    assert_optional_loss_term(tiny_xray_stage(1, 16, 4), x0, xray, "cross_view_drr_loss")


def test_a_patch_step_scores_the_patch_in_the_cross_view_as_in_the_input_view():
    stage = tiny_xray_stage(2, 32, 4, loss_weights={"cross_view_drr_loss": 0.5}, train_patch=16)
    x0 = body_phantom_cubes(1, 32)
    xray = render_training_drr(unit_to_hu(x0), 350.0, 32)
    prev = torch.nn.functional.avg_pool3d(x0, 2)
    with torch.no_grad():
        total, parts = patch_stage_loss(stage, x0, xray, prev, stage.cfg.loss_weights, origin=(16, 16, 0),
                                        generator=torch.Generator().manual_seed(2))  # fmt: skip
        w0 = replace(stage.cfg.loss_weights, cross_view_drr_loss=0.0)
        total0, parts0 = patch_stage_loss(stage, x0, xray, prev, w0, origin=(16, 16, 0),
                                          generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert parts["cross_view_drr_loss"] > 0 and "cross_view_drr_loss" not in parts0
    assert parts["drr_loss"] == pytest.approx(parts0["drr_loss"])
    assert parts["cross_view_drr_loss"] != pytest.approx(parts["drr_loss"], rel=1e-3)  # another view, another sum
    assert float(total - total0) == pytest.approx(0.5 * parts["cross_view_drr_loss"], rel=1e-4)


def test_a_negative_loss_weight_is_refused_naming_the_key():
    cfg = tiny_stage_config(1, 16)
    with pytest.raises(ConfigError, match="loss_weights.cross_view_drr_loss must be >= 0"):
        replace(cfg, loss_weights=replace(cfg.loss_weights, cross_view_drr_loss=-0.1))
    with pytest.raises(ConfigError, match="loss_weights.drr_loss must be >= 0"):
        replace(cfg, loss_weights=replace(cfg.loss_weights, drr_loss=float("nan")))


def test_the_cross_view_recipe_is_the_shipped_recipe_plus_the_one_loss():
    shipped = asdict(load_stage_config("stage1_default"))
    tried = asdict(load_stage_config(str(ROOT / "benchmarks" / "xray_stage1_crossview.json")))
    assert recipe_changes(tried, shipped) == {"loss_weights.cross_view_drr_loss": (0.0, 0.5)}


def test_evaluate_xrays_cross_view_psnr_marks_a_spine_at_the_wrong_depth():
    from DiffusionCore.xray.evaluate import cross_view_psnr

    truth, wrong = (unit_to_hu(v) for v in _spine_moved_to_the_front(32))
    right = cross_view_psnr(truth, truth, 350.0, "pa")
    moved = cross_view_psnr(wrong, truth, 350.0, "pa")
    blurred = cross_view_psnr(unit_to_hu(torch.nn.functional.avg_pool3d(
        torch.nn.functional.pad(body_phantom_cubes(1, 32), (1,) * 6, mode="replicate"), 3, stride=1)), truth, 350.0, "pa")
    assert right > 100 and moved < blurred < right
