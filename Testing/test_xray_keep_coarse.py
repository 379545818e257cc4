"""``model.keep_coarse``: a later stage adds detail only, so every 2x2x2 block of its output averages to that block of
the upsampled previous-stage volume it refines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import recipe_changes, tiny_xray_stage

from DiffusionCore.errors import ConfigError, InputError
from DiffusionCore.xray.cascade import _crop, detail_only
from DiffusionCore.xray.config import load_stage_config
from DiffusionCore.xray.train import _tiny_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool3d(x, 2)


def test_detail_only_removes_the_block_means_and_keeps_the_rest():
    x = torch.randn(2, 1, 8, 6, 4, generator=torch.Generator().manual_seed(0))
    d = detail_only(x)
    torch.testing.assert_close(_blocks(d), torch.zeros_like(_blocks(x)), atol=1e-6, rtol=0)
    torch.testing.assert_close(d + F.interpolate(_blocks(x), scale_factor=2, mode="nearest"), x)
    with pytest.raises(InputError, match="even sides"):
        detail_only(torch.zeros(1, 1, 8, 8, 5))


def test_only_later_stages_take_it():
    assert load_stage_config({"stage": 2, "model": {"keep_coarse": True}}).model.keep_coarse
    with pytest.raises(ConfigError, match="model.keep_coarse"):
        load_stage_config({"stage": 1, "model": {"keep_coarse": True}})


def test_the_output_keeps_the_previous_volumes_block_means_whole_grid_patch_and_sampling():
    plain = tiny_xray_stage(2, 32, refine=4)
    keep = tiny_xray_stage(2, 32, refine=4, keep_coarse=True)
    keep.load_state_dict(plain.state_dict())  # the switch adds no tensor
    xray = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    prev = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    for tv in (0.1, 0.5, 1.0):
        t = torch.tensor([tv])
        with torch.no_grad():
            ctx = keep.condition(xray, prev)
            kept = keep.predict(x, t, ctx)
            redrawn = plain.predict(x, t, plain.condition(xray, prev))
        # the same correction, less its block means: the coarse volume is the previous stage's
        torch.testing.assert_close(kept, ctx.prev + detail_only(redrawn - ctx.prev), atol=1e-5, rtol=0)
        torch.testing.assert_close(_blocks(kept), _blocks(ctx.prev), atol=1e-5, rtol=0)
        assert float((_blocks(redrawn) - _blocks(ctx.prev)).abs().mean()) > 0.05  # without it the coarse moves
        assert float(detail_only(kept).abs().mean()) > 0.01  # and it does add detail
    # a training patch (its origin a multiple of the token size) is block-aligned: the same holds there
    origin = (16, 0, 16)
    with torch.no_grad():
        part = keep.predict(_crop(x, origin, 16), t, ctx, origin=origin)
    torch.testing.assert_close(_blocks(part), _blocks(_crop(ctx.prev, origin, 16)), atol=1e-5, rtol=0)
    # generation from 16^3 patches equals whole-grid generation, and keeps the coarse volume too (where the last
    # estimate is not clipped to the model's range)
    whole = keep.sample(xray, prev, steps=2, generator=torch.Generator().manual_seed(1))
    tiled = keep.sample(xray, prev, steps=2, generator=torch.Generator().manual_seed(1), patch=16)
    assert keep.last_plan is not None and keep.last_plan.n_tiles == 8
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    inside = _blocks((whole.abs() < 1).float()) == 1
    torch.testing.assert_close(_blocks(whole)[inside], _blocks(ctx.prev)[inside], atol=1e-5, rtol=0)
    assert float(inside.float().mean()) > 0.5


def test_with_the_noise_level_skip_the_coarse_volume_is_kept_too():
    # the skip passes x_t through, whose block means are not the base's: the whole change to the base loses them
    stage = tiny_xray_stage(2, 32, refine=4, keep_coarse=True, skip_sigma_data=0.1)
    xray = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    prev = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        ctx = stage.condition(xray, prev)
        for tv in (0.05, 0.4):
            x0 = stage.predict(x, torch.tensor([tv]), ctx)
            torch.testing.assert_close(_blocks(x0), _blocks(ctx.prev), atol=1e-5, rtol=0)


def test_the_recipe_is_the_shipped_stage_2_config_with_the_switch():
    recipe = json.loads((REPO / "benchmarks/xray_stage2_detail.json").read_text())
    base = json.loads((REPO / "DiffusionCore/xray/configs/stage2_cpu.json").read_text())
    assert recipe_changes(recipe, base) == {"model.keep_coarse": (None, True)}
    assert _tiny_like(load_stage_config(REPO / "benchmarks/xray_stage2_detail.json")).model.keep_coarse
