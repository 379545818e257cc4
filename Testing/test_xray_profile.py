"""The X-ray stage's full-resolution lifting (``model.lifting_profile``): a 2D network whose output channels are
the voxels along each pixel's ray, added to the token-grid lifting estimate and read by the denoiser."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import fit_tiny_xray_stage, recipe_changes, tiny_xray_stage

from DiffusionCore.errors import ConfigError
from DiffusionCore.xray.cascade import StageModel, UnifiedHybridViTCascade, _crop, plan_patches
from DiffusionCore.xray.config import load_stage_config
from DiffusionCore.xray.lifting import RayProfileHead
from DiffusionCore.xray.train import _tiny_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def _stage(stage: int = 1, resolution: int = 32, **model) -> StageModel:
    return tiny_xray_stage(stage, resolution, 4, lifting_profile=8, **model)


def test_the_full_resolution_lifting_is_configured_with_depth_lifting():
    with pytest.raises(ConfigError, match="lifting_profile.*use_depth_lifting"):
        load_stage_config({"model": {"lifting_profile": 8, "use_depth_lifting": False}})
    rays = json.loads((REPO / "benchmarks/xray_stage1_rays.json").read_text())
    tried = json.loads((REPO / "benchmarks/xray_stage1_profile.json").read_text())
    assert recipe_changes(tried, rays) == {"model.lifting_profile": (None, 64)}  # the ray recipe plus this head
    tiny = _tiny_like(load_stage_config(REPO / "benchmarks/xray_stage1_profile.json"))
    assert tiny.model.lifting_profile == 8 and tiny.model.refine_xray


@pytest.mark.parametrize("view", ["pa", "lateral"])
def test_each_pixels_channels_are_the_voxels_along_its_ray(view):
    head = RayProfileHead([4, 8], width=2, resolution=16, blocks=1)
    with torch.no_grad():  # wire the radiograph's value straight through to every depth
        for p in head.parameters():
            p.zero_()
        head.inp.weight[0, 4 + 8, 0, 0] = 1.0  # the radiograph channel (after the two feature maps)
        head.out.weight[:, 0, 0, 0] = 1.0
    xray = torch.zeros(1, 1, 16, 16)
    xray[0, 0, 3, 11] = 1.0  # one bright pixel: 4th row from the top (superior), 12th column
    feats = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 4, 4)]
    with torch.no_grad():
        vol = head(feats, xray, view)[0, 0]
    assert vol.shape == (16, 16, 16)
    depth_dim = 1 if view == "pa" else 2
    ray = vol.amax(dim=depth_dim)
    assert divmod(int(ray.argmax()), 16) == (15 - 3, 11)  # z runs superior-increasing; across the detector
    assert float((vol - vol.mean(dim=depth_dim, keepdim=True)).abs().max()) < 1e-6  # one value along the ray
    with torch.no_grad():  # a depth-dependent bias: the channel index is the depth along the ray
        head.out.bias.copy_(torch.arange(16.0))
        vol = head(feats, torch.zeros(1, 1, 16, 16), view)[0, 0]
    line = vol.movedim(depth_dim, 0)[:, 5, 5]
    assert float((line - line[0] - torch.arange(16.0)).abs().max()) < 1e-5


def test_the_lifting_estimate_adds_the_full_resolution_volume_and_a_patch_reads_its_place():
    st = _stage(window_size=2)
    xray = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    ctx = st.condition(xray)
    assert ctx.profile is not None and ctx.profile.shape == (1, 1, 32, 32, 32)
    with torch.no_grad():
        coarse = st.lifting.lifted_volume(ctx.lifted, 32)
        torch.testing.assert_close(st.lifted_only(xray), (coarse + ctx.profile).clamp(-1, 1))
        x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
        t = torch.tensor([0.4])
        whole, lifted = st(x, t, xray, return_lifted=True)
        origin = (16, 0, 16)
        part, lifted_part = st(_crop(x, origin, 16), t, xray, return_lifted=True, origin=origin)
        torch.testing.assert_close(lifted_part, _crop(lifted, origin, 16), atol=1e-6, rtol=0)
        inner = (..., slice(3, -3), slice(3, -3), slice(3, -3))  # the refinement head's halo reads past the patch
        torch.testing.assert_close(part[inner], _crop(whole, origin, 16)[inner], atol=1e-5, rtol=0)
        # the denoiser reads the volume: another radiograph's profile changes the output for the same x_t
        other = replace(ctx, profile=torch.zeros_like(ctx.profile))
        assert float((st.predict(x, t, other) - st.predict(x, t, ctx)).abs().max()) > 1e-3
    big = StageModel(replace(st.cfg, resolution=40, model=replace(st.cfg.model, window_size=4))).eval()
    # 10^3 tokens in windows of 4^3: the grid is padded to 48 voxels for patches of 16
    padded = big.pad_condition(big.condition(xray), plan_patches(big.cfg, 16))
    assert padded.profile.shape == (1, 1, 48, 48, 48)
    vol = big.sample(xray, None, steps=1, generator=torch.Generator().manual_seed(0), patch=16)
    assert big.last_plan is not None and vol.shape == (1, 1, 40, 40, 40) and torch.isfinite(vol).all()


def test_the_full_resolution_lifting_learns_from_the_depth_prior_loss(tmp_path):
    cascade, stage, xray, history = fit_tiny_xray_stage(3, lifting_profile=8)
    assert stage.profile.out.weight.grad.abs().sum() > 0
    assert history[-1]["depth_prior_loss"] < 0.7 * history[0]["depth_prior_loss"]
    path = tmp_path / "profile.safetensors"
    cascade.save_pretrained(path)
    loaded = UnifiedHybridViTCascade.from_pretrained(path).stages[0]
    assert loaded.profile is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded.lifted_only(xray), stage.eval().lifted_only(xray))
