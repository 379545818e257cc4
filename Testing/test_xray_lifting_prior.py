"""Stage 1's lifting on the mean CT (``model.lifting_mean_prior``): the full-resolution lifting volume is the mean
training CT plus the lifting heads' correction, so the anatomy every chest shares is in it before the radiograph
moves it. The mean CT is the one the weights store; the prior is derived from it, never stored twice."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import body_phantom_cubes, recipe_changes, train_tiny_xray

from DiffusionCore.errors import ConfigError
from DiffusionCore.intensity import unit_to_hu
from DiffusionCore.weights import load_safetensors
from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
from DiffusionCore.xray.config import load_stage_config, tiny_stage_config
from DiffusionCore.xray.data import render_training_drr
from DiffusionCore.xray.train import _tiny_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def _config(prior: bool):
    cfg = tiny_stage_config(1, 16, refine_channels=4)
    return replace(cfg, model=replace(cfg.model, lifting_profile=8, lifting_mean_prior=prior))


def _pair() -> tuple[UnifiedHybridViTCascade, UnifiedHybridViTCascade, torch.Tensor]:
    """The same tiny stage-1 network without and with the prior, both storing a phantom chest as their mean CT."""
    torch.manual_seed(0)
    plain = UnifiedHybridViTCascade([_config(False)]).eval()
    prior = UnifiedHybridViTCascade([_config(True)]).eval()
    prior.load_state_dict(plain.state_dict())  # the prior adds no tensor: the same weights fit both
    mean = body_phantom_cubes(1, 16)
    for c in (plain, prior):
        c.set_mean_ct(mean)
    return plain, prior, mean


def test_config_needs_stage_one_and_the_full_resolution_lifting():
    assert load_stage_config({"model": {"lifting_profile": 8, "lifting_mean_prior": True}}).model.lifting_mean_prior
    with pytest.raises(ConfigError, match="lifting_mean_prior is for stage 1"):
        load_stage_config({"stage": 2, "resolution": 128, "model": {"lifting_profile": 8, "lifting_mean_prior": True}})
    with pytest.raises(ConfigError, match="needs model.lifting_profile"):
        load_stage_config({"model": {"lifting_profile": 0, "lifting_mean_prior": True}})


def test_the_lifting_volume_is_the_mean_ct_plus_the_heads_correction():
    plain, prior, mean = _pair()
    xray = render_training_drr(unit_to_hu(mean), 350.0, 32, "pa")
    with torch.no_grad():
        for c in (plain, prior):  # heads that say nothing: the lifting-only volume is the prior alone
            c.stages[0].lifting.head.weight.zero_()
            c.stages[0].lifting.head.bias.zero_()
        torch.testing.assert_close(plain.stages[0].lifted_only(xray), torch.zeros_like(mean))
        torch.testing.assert_close(prior.stages[0].lifted_only(xray), mean.clamp(-1, 1))
        for c in (plain, prior):  # trained heads: the same correction, on the mean CT
            g = torch.Generator().manual_seed(1)
            for p in c.stages[0].profile.parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        ctx_plain, ctx_prior = plain.stages[0].condition(xray), prior.stages[0].condition(xray)
        assert float(ctx_plain.profile.abs().mean()) > 1e-3
        # what the denoiser reads (its token embedding and refinement head) and where sampling starts
        torch.testing.assert_close(ctx_prior.profile, ctx_plain.profile + mean)
        for c in (plain, prior):  # a trained denoiser (its output layers start at zero) reads the prior too
            g = torch.Generator().manual_seed(2)
            for p in c.stages[0].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        a = plain.generate(xray, 1, generator=torch.Generator().manual_seed(0))
        b = prior.generate(xray, 1, generator=torch.Generator().manual_seed(0))
        assert float((a - b).abs().mean()) > 0.01


def test_weights_store_the_mean_ct_once_and_derive_the_prior(tmp_path):
    _, prior, mean = _pair()
    path = tmp_path / "prior.safetensors"
    prior.save_pretrained(path)
    assert "mean_ct" in load_safetensors(path)[0]
    assert not any("mean_prior" in key for key in load_safetensors(path)[0])
    loaded = UnifiedHybridViTCascade.from_pretrained(path, allow_unregistered=True)
    assert loaded.stages[0].uses_mean_prior
    torch.testing.assert_close(loaded.stages[0].mean_prior, mean)
    loaded.set_mean_ct(torch.zeros_like(mean))  # a new mean CT moves the prior with it
    torch.testing.assert_close(loaded.stages[0].mean_prior, torch.zeros_like(mean))


def test_the_recipe_is_the_shipped_recipe_with_the_prior():
    recipe = json.loads((REPO / "benchmarks/xray_stage1_meanprior.json").read_text())
    shipped = json.loads((REPO / "benchmarks/xray_stage1_profile.json").read_text())
    assert recipe_changes(recipe, shipped) == {"model.lifting_mean_prior": (None, True)}


def test_training_derives_the_prior_from_the_training_mean_ct(ct_file, tmp_path):
    cfg = _tiny_like(load_stage_config(REPO / "benchmarks/xray_stage1_meanprior.json"))
    assert cfg.model.lifting_mean_prior and cfg.model.lifting_profile
    cascade = train_tiny_xray(cfg, ct_file, tmp_path / "run")
    assert float(cascade.mean_ct.max()) > -0.5  # the training CT, not the untrained air
    torch.testing.assert_close(cascade.stages[0].mean_prior, cascade.mean_ct)
