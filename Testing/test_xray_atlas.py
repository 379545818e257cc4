"""Stage 1's anatomical atlas (``model.atlas_prior``): the mean training CT, blurred, registered to the radiograph
by an affine map, and refined by the network as stages 2-3 refine the previous stage's volume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import body_phantom_cubes, recipe_changes, train_tiny_xray

from DiffusionCore.errors import ConfigError, InputError
from DiffusionCore.intensity import unit_to_hu
from DiffusionCore.volume import Volume
from DiffusionCore.weights import load_safetensors
from DiffusionCore.xray.atlas import normalised_cross_correlation, register_atlas, training_atlas, warp_atlas
from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
from DiffusionCore.xray.config import load_stage_config, tiny_stage_config
from DiffusionCore.xray.data import gaussian_blur, render_training_drr
from DiffusionCore.xray.train import _tiny_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FOV = 350.0


def _drr(unit: torch.Tensor, fov: float, view: str, size: int) -> torch.Tensor:
    return render_training_drr(unit_to_hu(unit), fov, size, view)
REPO = Path(__file__).resolve().parents[1]


def _chest(r: int = 32) -> torch.Tensor:
    """A chest-like cube (1, 1, r, r, r) in model units: an elliptic body, two lungs and a spine behind."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, r)] * 3, indexing="ij")
    vol = np.where(((x / 0.7) ** 2 + (y / 0.5) ** 2 < 1) & (np.abs(z) < 0.85), 0.0, -1.0)
    lungs = ((np.abs(x) - 0.35) / 0.2) ** 2 + (y / 0.3) ** 2 + (z / 0.7) ** 2 < 1
    vol[lungs] = -0.8
    vol[(x**2 + (y - 0.35) ** 2 < 0.01) & (np.abs(z) < 0.9)] = 0.7
    return torch.tensor(vol, dtype=torch.float32)[None, None]


@pytest.mark.parametrize("view", ["pa", "lateral"])
def test_registration_finds_the_size_and_place_of_the_body_on_the_radiograph(view):
    atlas = gaussian_blur(_chest(), 1.0)
    truth = torch.tensor([[0.12, -0.1, 0.15, -0.12]])  # wider, shorter, moved across and down the detector
    xray = _drr(warp_atlas(_chest(), truth, view), FOV, view, 64)
    kept_atlas, kept_xray = atlas.clone(), xray.clone()
    moved, params = register_atlas(atlas, xray, FOV, view)
    assert torch.equal(atlas, kept_atlas) and torch.equal(xray, kept_xray)  # inputs untouched
    assert moved.shape == atlas.shape and params.shape == (1, 4)
    torch.testing.assert_close(params, truth, atol=0.04, rtol=0)
    before = float(normalised_cross_correlation(_drr(atlas, FOV, view, 64), xray))
    after = float(normalised_cross_correlation(_drr(moved, FOV, view, 64), xray))
    assert after > before + 0.02
    again, _ = register_atlas(atlas, xray, FOV, view)
    assert torch.equal(again, moved)  # deterministic


def test_the_training_atlas_is_the_ct_blurred_moved_and_deformed():
    truth = body_phantom_cubes(3, 24)
    torch.manual_seed(0)
    torch.testing.assert_close(training_atlas(truth, 0.0, 0.0, 0.0, 0.0), truth, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    atlas = training_atlas(truth, 1.5, 0.1, 2.0, 1.5)
    assert atlas.shape == truth.shape and float(atlas.min()) >= -1.0 - 1e-5 and float(atlas.max()) <= 1.0 + 1e-5
    for a, t in zip(atlas, truth):  # coarse and wrong, but the same anatomy
        err = float((a - t).abs().mean())
        corr = float(np.corrcoef(a.flatten().numpy(), t.flatten().numpy())[0, 1])
        assert err > 0.02 and corr > 0.6
    torch.manual_seed(1)
    assert not torch.allclose(training_atlas(truth, 1.5, 0.1, 2.0, 1.5), atlas)  # random per draw


def test_the_atlas_recipe_is_the_shipped_recipe_with_the_atlas():
    atlas = json.loads((REPO / "benchmarks/xray_stage1_atlas.json").read_text())
    shipped = json.loads((REPO / "benchmarks/xray_stage1_profile.json").read_text())
    assert recipe_changes(atlas, shipped) == {"model.atlas_prior": (None, True)}
    assert _tiny_like(load_stage_config(REPO / "benchmarks/xray_stage1_atlas.json")).model.atlas_prior


def test_only_stage_one_takes_an_atlas():
    with pytest.raises(ConfigError, match="atlas_prior is for stage 1"):
        load_stage_config({"stage": 2, "resolution": 128, "model": {"atlas_prior": True}})
    with pytest.raises(ConfigError, match="atlas_zoom"):
        load_stage_config({"model": {"atlas_prior": True}, "data": {"atlas_zoom": -0.1}})


def _atlas_cascade() -> UnifiedHybridViTCascade:
    cfg = tiny_stage_config(1, 32, refine_channels=4)
    cfg = replace(cfg, model=replace(cfg.model, atlas_prior=True), data=replace(cfg.data, atlas_blur_voxels=1.0))
    torch.manual_seed(0)
    cascade = UnifiedHybridViTCascade([cfg]).eval()
    cascade.set_mean_ct(_chest())
    torch.testing.assert_close(cascade.stages[0].atlas, gaussian_blur(_chest(), 1.0))
    return cascade


def test_generation_refines_the_atlas_registered_to_the_radiograph(tmp_path):
    cascade = _atlas_cascade()
    stage = cascade.stages[0]
    assert stage.has_prev and stage.n_volumes == 1
    xray = _drr(warp_atlas(_chest(), torch.tensor([[0.1, 0.0, -0.1, 0.1]])), FOV, "pa", 32)
    registered = stage.registered_atlas(xray)
    with torch.no_grad():  # the atlas is the stage's base: its condition holds the registered atlas
        torch.testing.assert_close(stage.condition(xray).prev, registered)
    # an untrained stage (its output layers start at zero) predicts no correction: generation returns the atlas
    # fitted to this radiograph, whatever the noise
    out = cascade.generate(xray, 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, registered.clamp(-1, 1), atol=1e-4, rtol=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained stage corrects it: the output moves away from the atlas
        for p in stage.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    corrected = cascade.generate(xray, 1, generator=torch.Generator().manual_seed(0))
    assert float((corrected - out).abs().mean()) > 0.01
    path = tmp_path / "atlas.safetensors"
    cascade.save_pretrained(path)
    loaded = UnifiedHybridViTCascade.from_pretrained(path)
    assert loaded.stages[0].uses_atlas
    # the atlas is not stored: it is derived from the stored mean CT, so the two cannot disagree
    assert not any("atlas" in key for key in load_safetensors(path)[0])
    torch.testing.assert_close(loaded.stages[0].atlas, stage.atlas)
    plain = UnifiedHybridViTCascade([tiny_stage_config(1, 32)])
    with pytest.raises(InputError, match="no atlas"):
        plain.stages[0].registered_atlas(xray)


def test_trained_weights_derive_the_atlas_from_their_mean_ct(ct_file, tmp_path):
    cfg = tiny_stage_config(1, 16)
    cfg = replace(cfg, model=replace(cfg.model, atlas_prior=True))
    cascade = train_tiny_xray(cfg, ct_file, tmp_path / "run")
    blur = cfg.data.atlas_blur_voxels
    torch.testing.assert_close(cascade.stages[0].atlas, gaussian_blur(cascade.mean_ct, blur))
    assert float(cascade.mean_ct.max()) > -0.5  # the mean CT, not the untrained air


def test_evaluate_xray_scores_the_registered_atlas_stage_one_starts_from():
    from DiffusionCore.xray.evaluate import evaluate_xray
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    cascade = _atlas_cascade()  # untrained: it returns its registered atlas, so the two rows agree
    moved = warp_atlas(_chest(), torch.tensor([[0.1, 0.0, -0.1, 0.1]]))  # another patient than the mean CT
    ref = Volume(unit_to_hu(moved)[0, 0].numpy(), (FOV / 32,) * 3)
    report = evaluate_xray(XrayToCTGenerator(cascade), ref, steps=2, num_samples=1, device="cpu")
    by = {r["method"]: r for r in report["results"]}
    assert set(by) == {"model", "model-raw", "mean-ct", "lifting-only", "lifting+dc", "atlas"}
    assert by["atlas"]["stage"] == 1
    assert abs(by["atlas"]["psnr3d"] - by["model-raw"]["psnr3d"]) < 0.05
    assert by["atlas"]["psnr3d"] > by["mean-ct"]["psnr3d"] + 3  # registered to this patient's radiograph


def test_stage_two_training_over_an_atlas_stage_one_does_not_register_per_step(monkeypatch):
    """Stage 2 learns from stage 1's own estimate; an atlas stage 1 makes it from each sample's training atlas, as
    its own training does, not by registering the mean CT to every DRR (seconds per step)."""
    from DiffusionCore.xray import cascade as cascade_module
    from DiffusionCore.xray.train import earlier_stages_estimate, previous_stage_volume

    s1 = tiny_stage_config(1, 16)
    s1 = replace(s1, model=replace(s1.model, atlas_prior=True))
    s2 = tiny_stage_config(2, 32)
    s2 = replace(s2, data=replace(s2.data, prev_from_model=1.0, prev_noise=0.0))
    torch.manual_seed(0)
    cascade = UnifiedHybridViTCascade([s1, s2])

    def no_registration(*_a, **_k):
        raise AssertionError("registered the atlas in a training step")

    monkeypatch.setattr(cascade_module, "register_atlas", no_registration)
    truth = body_phantom_cubes(2, 32)
    vols = {16: torch.nn.functional.interpolate(truth, size=(16,) * 3, mode="trilinear"), 32: truth}
    xray = _drr(vols[16], FOV, "pa", 32)
    prev = previous_stage_volume(cascade, 2, vols, xray, 0.0)
    assert prev.shape == vols[16].shape and not torch.allclose(prev, vols[16])  # the model's estimate
    with pytest.raises(AssertionError, match="registered"):  # without the training atlas it would register
        earlier_stages_estimate(cascade, 1, xray)
