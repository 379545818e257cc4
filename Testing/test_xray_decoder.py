"""The X-ray stage's convolutional decoder (``model.decoder_channels``): tokens to voxels by transposed and plain
convolutions that also read the volume, in place of the linear head per token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fit_tiny_xray_stage, recipe_changes, tiny_xray_stage

from DiffusionCore.errors import ConfigError
from DiffusionCore.xray.cascade import StageModel, UnifiedHybridViTCascade, plan_patches
from DiffusionCore.xray.config import load_stage_config
from DiffusionCore.xray.train import _tiny_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def _stage(stage: int = 1, resolution: int = 32, decoder=(8, 4), perturb: bool = True, **model) -> StageModel:
    return tiny_xray_stage(stage, resolution, perturb=perturb, decoder_channels=list(decoder), **model)


def test_the_decoder_needs_one_width_per_doubling_and_carries_the_rays():
    with pytest.raises(ConfigError, match="decoder_channels.*log2"):
        load_stage_config({"model": {"patch_size": 8, "decoder_channels": [16, 8]}})
    with pytest.raises(ConfigError, match="decoder_channels"):
        load_stage_config({"model": {"patch_size": 4, "decoder_channels": [8, 0]}})
    cfg = load_stage_config({"model": {"patch_size": 4, "decoder_channels": [8, 4], "refine_xray": True}})
    assert cfg.model.refine_channels == 0 and cfg.model.refine_xray  # the decoder reads the rays on its own
    with pytest.raises(ConfigError, match="refine_channels above 0 or model.decoder_channels"):
        load_stage_config({"model": {"refine_xray": True}})
    # the experiment's config: the ray recipe with the decoder in place of the linear head and refinement head
    rays = json.loads((REPO / "benchmarks/xray_stage1_rays.json").read_text())
    tried = json.loads((REPO / "benchmarks/xray_stage1_decoder.json").read_text())
    assert recipe_changes(tried, rays) == {"model.decoder_channels": (None, [64, 16, 4]),
                                           "model.refine_channels": (rays["model"]["refine_channels"], 0)}
    # the tiny network of the training self-test keeps the decoder and the rays
    tiny = _tiny_like(load_stage_config(REPO / "benchmarks/xray_stage1_decoder.json"))
    assert tiny.model.decoder_channels == [8, 4] and tiny.model.refine_xray and tiny.model.refine_channels == 0


@pytest.mark.parametrize("stage", [1, 2])
def test_an_untrained_decoder_returns_the_base_and_has_no_linear_head(stage):
    st = _stage(stage=stage, resolution=16 * stage, perturb=False)
    assert st.final is None and st.decoder is not None
    g = torch.Generator().manual_seed(1)
    prev = torch.rand(1, 1, 16, 16, 16, generator=g) * 2 - 1 if stage == 2 else None
    x = torch.randn(1, 1, *(16 * stage,) * 3, generator=g)
    with torch.no_grad():
        out = st(x, torch.tensor([0.5]), torch.rand(1, 1, 32, 32, generator=g), prev)
    base = st.prepare_prev(prev) if stage == 2 else torch.zeros_like(out)
    torch.testing.assert_close(out, base)  # zero correction, like the zero-initialised linear head


def test_the_decoder_places_detail_by_the_volume_at_full_resolution():
    st = _stage(refine_xray=True)
    xray = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.2])
    x = torch.zeros(1, 1, 32, 32, 32)
    bumped = x.clone()
    bumped[0, 0, 17, 9, 22] = 1.0  # one voxel of x_t
    with torch.no_grad():
        change = (st(bumped, t, xray) - st(x, t, xray)).abs()[0, 0]
    # the decoder's full-resolution convolutions read x_t: the voxel and its neighbours change most, more than
    # the rest of its token's 4^3 voxels (which is all a token-level input could tell apart)
    peak = np.unravel_index(int(change.argmax()), change.shape)
    assert max(abs(a - b) for a, b in zip(peak, (17, 9, 22))) <= 1
    near = change[16:19, 8:11, 21:24]
    block = change[16:20, 8:12, 20:24]
    assert float(near.mean()) > 2 * float((block.sum() - near.sum()) / (block.numel() - near.numel()))


def test_decoder_patches_overlap_and_blend_where_attention_is_windowed():
    st = _stage(resolution=32, window_size=2, refine_xray=True)  # 8^3 tokens in 2^3-token windows
    plan = plan_patches(st.cfg, 16, 8)
    assert plan.windowed and plan.overlap == 8  # a decoder reads across patch borders: not exact, so blended
    xray = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(4)) * 0.3
    t = torch.tensor([0.5])
    with torch.no_grad():
        ctx = st.condition(xray)
        whole = st.predict(x, t, ctx)
        tiled = st.predict_tiled(x, t, st.pad_condition(ctx, plan), plan)
    assert float(whole.std()) > 0.05
    assert float((tiled - whole).abs().mean()) < 0.05 * float(whole.std())


def test_a_padded_grid_with_rays_and_a_decoder_generates_patch_by_patch():
    st = _stage(resolution=40, refine_xray=True)  # 10^3 tokens in windows of 4^3: padded to 48 voxels
    plan = plan_patches(st.cfg, 16)
    assert plan.padded == 48
    xray = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    ctx = st.condition(xray)
    padded = st.pad_condition(ctx, plan)
    assert ctx.rays.shape == (1, 1, 40, 1, 40) and padded.rays.shape == (1, 1, 48, 1, 48)  # one value per ray
    # the last patch reaches past the grid: inside it, its rays and depths are the whole grid's
    whole_rays, whole_depth = st._ray_parts(ctx, (0, 0, 0), torch.zeros(1, 1, 40, 40, 40))
    rays, depth = st._ray_parts(padded, (32, 32, 32), torch.zeros(1, 1, 16, 16, 16))
    torch.testing.assert_close(rays[..., :8, :8, :8], whole_rays[..., 32:, 32:, 32:])
    torch.testing.assert_close(depth[..., :8, :8, :8], whole_depth[..., 32:, 32:, 32:])
    step = 2 / 39
    torch.testing.assert_close(depth[0, 0, 0, 8:, 0], 1 + step * torch.arange(1.0, 9.0))  # running on past 1
    vol = st.sample(xray, None, steps=1, generator=torch.Generator().manual_seed(0), patch=32)
    assert st.last_plan is not None and st.last_plan.starts == (0, 16) and st.last_plan.overlap == 16
    assert vol.shape == (1, 1, 40, 40, 40) and torch.isfinite(vol).all() and float(vol.std()) > 0.05


def test_a_decoder_stage_learns_and_its_weights_round_trip(tmp_path):
    cascade, stage, _, history = fit_tiny_xray_stage(6, decoder_channels=[8, 4], refine_xray=True)
    assert stage.decoder.out.weight.grad.abs().sum() > 0 and stage.decoder.ups[0].weight.grad.abs().sum() > 0
    assert history[-1]["total"] < 0.7 * history[0]["total"]
    path = tmp_path / "decoder.safetensors"
    cascade.save_pretrained(path)
    loaded = UnifiedHybridViTCascade.from_pretrained(path)
    assert loaded.stages[0].cfg.model.decoder_channels == [8, 4] and loaded.stages[0].final is None
    xr = torch.rand(1, 1, 32, 32)
    a = cascade.eval().generate(xr, num_stages=1, steps=2, generator=torch.Generator().manual_seed(0))
    b = loaded.generate(xr, num_stages=1, steps=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert float(a.std()) > 0.01  # a trained decoder, not the zero output
