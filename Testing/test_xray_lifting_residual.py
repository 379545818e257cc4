"""Stage 1 as a correction on its lifting volume (``model.lifting_residual``): what the lifting resolves from the
radiograph is in the output unless the denoiser changes it, as stages 2-3 keep the previous stage's volume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_tiled_sampling_matches,
    body_phantom_cubes,
    recipe_changes,
    tiny_xray_stage,
    train_tiny_xray,
)

from DiffusionCore.errors import ConfigError
from DiffusionCore.xray.cascade import _crop
from DiffusionCore.xray.config import XrayLossWeights, load_stage_config
from DiffusionCore.xray.losses import stage_loss
from DiffusionCore.xray.train import _tiny_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def _xray(seed: int = 3) -> torch.Tensor:
    return torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _lifting_volume(st, xray: torch.Tensor) -> torch.Tensor:
    """The lifting-only volume of the whole grid, unclamped (what the residual stage adds its correction to)."""
    ctx = st.condition(xray)
    return st._lifted_part(ctx.lifted, ctx.profile, (0, 0, 0), st.cfg.resolution)


def test_config_is_for_stage_one_with_lifting_and_without_the_atlas():
    assert load_stage_config({"model": {"lifting_residual": True}}).model.lifting_residual
    bad = [
        {"stage": 2, "resolution": 128, "model": {"lifting_residual": True}},
        {"model": {"lifting_residual": True, "use_depth_lifting": False}},
        {"model": {"lifting_residual": True, "atlas_prior": True}},
    ]
    for cfg in bad:
        with pytest.raises(ConfigError, match="lifting_residual makes stage 1's output a correction"):
            load_stage_config(cfg)


@pytest.mark.parametrize("profile", [0, 8])
def test_an_untrained_denoiser_returns_the_lifting_volume(profile):
    # fresh output layers are zero: the stage says nothing yet, and its output is the lifting volume
    plain = tiny_xray_stage(1, 16, refine=4, perturb=False, lifting_profile=profile)
    res = tiny_xray_stage(1, 16, refine=4, perturb=False, lifting_profile=profile, lifting_residual=True)
    res.load_state_dict(plain.state_dict())  # the switch adds no tensor
    xray = _xray()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.6])
    with torch.no_grad():
        lifting = _lifting_volume(res, xray)
        assert float(lifting.std()) > 1e-3  # the lifting heads do say something
        torch.testing.assert_close(plain.predict(x, t, plain.condition(xray)), torch.zeros_like(x))
        torch.testing.assert_close(res.predict(x, t, res.condition(xray)), lifting)
        # generation from the noised lifting volume keeps it, whatever the noise
        for seed in (0, 1):
            out = res.sample(
                xray, steps=3, generator=torch.Generator().manual_seed(seed), lifting_start_t=0.6
            )
            torch.testing.assert_close(out, lifting.clamp(-1, 1))


def test_the_output_is_the_lifting_volume_plus_the_same_correction_whole_patch_or_tiled():
    # every weight perturbed; no refinement head, so the correction does not read the base
    kw = dict(refine=0, window_size=2, lifting_profile=8)
    plain = tiny_xray_stage(1, 32, **kw)
    res = tiny_xray_stage(1, 32, lifting_residual=True, **kw)
    res.load_state_dict(plain.state_dict())
    xray = _xray()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.4])
    origin = (16, 0, 16)
    with torch.no_grad():
        lifting = _lifting_volume(res, xray)
        whole, lifted = res(x, t, xray, return_lifted=True)
        torch.testing.assert_close(lifted, lifting)
        torch.testing.assert_close(whole, plain(x, t, xray) + lifting, atol=1e-5, rtol=0)
        part, lifted_part = res(_crop(x, origin, 16), t, xray, return_lifted=True, origin=origin)
        torch.testing.assert_close(part, _crop(whole, origin, 16), atol=1e-5, rtol=0)
        torch.testing.assert_close(lifted_part, _crop(lifting, origin, 16), atol=1e-5, rtol=0)
    # patch-wise generation (windowed attention: exact) matches the whole grid
    full = tiny_xray_stage(1, 32, refine=4, window_size=2, lifting_profile=8, lifting_residual=True)
    assert_tiled_sampling_matches(full, xray, min_std=0.2)


def test_the_diffusion_loss_trains_the_lifting_heads_through_the_base():
    # fresh output layers are zero, so only the base carries the diffusion loss back to the lifting heads
    x0 = body_phantom_cubes(1, 16)
    weights = replace(
        XrayLossWeights(), drr_loss=0.0, depth_prior_loss=0.0, gradient_loss=0.0, perceptual_loss=0.0
    )
    grads = {}
    for residual in (False, True):
        st = tiny_xray_stage(
            1, 16, refine=4, perturb=False, lifting_profile=8, lifting_residual=residual
        ).train()
        loss, _ = stage_loss(st, x0, _xray(), None, weights, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads[residual] = [sum(float(p.grad.abs().sum()) for p in head.parameters() if p.grad is not None)
                           for head in (st.lifting, st.profile)]  # fmt: skip
    assert grads[False] == [0.0, 0.0]
    assert min(grads[True]) > 0


def test_the_recipe_is_the_mean_prior_recipe_with_the_residual(ct_file, tmp_path):
    recipe = json.loads((REPO / "benchmarks/xray_stage1_residual.json").read_text())
    base = json.loads((REPO / "benchmarks/xray_stage1_meanprior.json").read_text())
    assert recipe_changes(recipe, base) == {"model.lifting_residual": (None, True)}
    cfg = _tiny_like(load_stage_config(REPO / "benchmarks/xray_stage1_residual.json"))
    assert cfg.model.lifting_residual
    cascade = train_tiny_xray(cfg, ct_file, tmp_path / "run")  # trains, exports and loads with the switch
    assert cascade.stages[0].lifting_residual


def test_the_nowarp_recipe_is_the_residual_recipe_without_zoom_and_elastic_deformation():
    recipe = json.loads((REPO / "benchmarks/xray_stage1_nowarp.json").read_text())
    base = json.loads((REPO / "benchmarks/xray_stage1_residual.json").read_text())
    assert recipe_changes(recipe, base) == {"data.elastic_mm": (base["data"]["elastic_mm"], 0.0),
                                            "data.zoom_jitter": (base["data"]["zoom_jitter"], 0.0)}
    assert (base["data"]["zoom_jitter"], base["data"]["elastic_mm"]) != (0.0, 0.0)
    cfg = load_stage_config(REPO / "benchmarks/xray_stage1_nowarp.json")
    assert cfg.model.lifting_residual and cfg.data.zoom_jitter == 0.0 and cfg.data.elastic_mm == 0.0
