"""The noise-level skip on a stage's output (``model.skip_sigma_data``): where little noise is left the denoiser
returns x_t itself, so the anatomy x_t holds is kept by construction; from pure noise it is the base plus a
scaled correction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_tiled_sampling_matches, recipe_changes, tiny_xray_stage, train_tiny_xray

from DiffusionCore.errors import ConfigError
from DiffusionCore.xray.cascade import _crop
from DiffusionCore.xray.config import load_stage_config
from DiffusionCore.xray.train import _tiny_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SD = 0.1
KW = dict(window_size=2, lifting_profile=8, lifting_residual=True)


def _xray(seed: int = 3) -> torch.Tensor:
    return torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _pair(refine: int = 4):
    """The same perturbed weights without and with the skip (the switch adds no tensor)."""
    plain = tiny_xray_stage(1, 32, refine=refine, **KW)
    skip = tiny_xray_stage(1, 32, refine=refine, skip_sigma_data=SD, **KW)
    skip.load_state_dict(plain.state_dict())
    return plain, skip


@pytest.mark.parametrize("bad", [-0.1, 3.0, float("nan")])
def test_config_names_a_bad_spread(bad):
    assert load_stage_config({"model": {"skip_sigma_data": 0.1}}).model.skip_sigma_data == 0.1
    with pytest.raises(ConfigError, match="model.skip_sigma_data"):
        load_stage_config({"model": {"skip_sigma_data": bad}})


def test_where_no_noise_is_left_the_output_is_x_t_whatever_the_weights():
    plain, skip = _pair()
    xray = _xray()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    t = torch.tensor([1e-4])
    with torch.no_grad():
        kept = skip.predict(x, t, skip.condition(xray))
        redrawn = plain.predict(x, t, plain.condition(xray))
    torch.testing.assert_close(kept, x, atol=2e-3, rtol=0)
    assert float((redrawn - x).abs().mean()) > 0.1  # without the skip the heads redraw the volume


def test_a_later_stage_keeps_x_t_too_and_corrects_the_previous_volume_from_noise():
    # stages 2-3: the base is the upsampled previous-stage volume
    plain = tiny_xray_stage(2, 32, refine=4)
    skip = tiny_xray_stage(2, 32, refine=4, skip_sigma_data=SD)
    skip.load_state_dict(plain.state_dict())
    xray = _xray()
    prev = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        ctx = skip.condition(xray, prev)
        kept = skip.predict(x, torch.tensor([1e-4]), ctx)
        one = torch.tensor([1.0])
        correction = plain.predict(x, one, plain.condition(xray, prev)) - ctx.prev
        from_noise = skip.predict(x, one, ctx)
    torch.testing.assert_close(kept, x, atol=2e-3, rtol=0)
    torch.testing.assert_close(from_noise, ctx.prev + SD * correction, atol=1e-5, rtol=0)


@pytest.mark.parametrize("refine", [0, 4])
def test_the_output_is_the_skip_formula_on_the_same_correction_whole_patch_or_tiled(refine):
    # a patch equals the whole grid's crop without the refinement head (with it, only tiled sampling does)
    plain, skip = _pair(refine)
    xray = _xray()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    origin = (16, 0, 16)
    for tv in (0.15, 0.6, 1.0):
        t = torch.tensor([tv])
        a, s = math.cos(0.5 * math.pi * tv), math.sin(0.5 * math.pi * tv)
        d = (a * SD) ** 2 + s**2
        with torch.no_grad():
            ctx = skip.condition(xray)
            base = ctx.base
            correction = plain.predict(x, t, plain.condition(xray)) - base
            whole = skip.predict(x, t, ctx)
            expected = base + a * SD**2 / d * (x - a * base) + s * SD / math.sqrt(d) * correction
            torch.testing.assert_close(whole, expected, atol=1e-5, rtol=0)
            if not refine:
                part = skip.predict(_crop(x, origin, 16), t, ctx, origin=origin)
                torch.testing.assert_close(part, _crop(whole, origin, 16), atol=1e-5, rtol=0)
    # from pure noise the output is the base plus the correction scaled by the spread
    torch.testing.assert_close(whole, base + SD * correction, atol=1e-5, rtol=0)
    # patch-wise generation (windowed attention: exact) matches the whole grid
    assert_tiled_sampling_matches(skip, xray, min_std=0.1)


def test_the_recipe_is_the_residual_recipe_with_the_skip(ct_file, tmp_path):
    recipe = json.loads((REPO / "benchmarks/xray_stage1_skip.json").read_text())
    base = json.loads((REPO / "benchmarks/xray_stage1_residual.json").read_text())
    assert recipe_changes(recipe, base) == {"model.skip_sigma_data": (None, SD)}
    cfg = _tiny_like(load_stage_config(REPO / "benchmarks/xray_stage1_skip.json"))
    assert cfg.model.skip_sigma_data == SD
    cascade = train_tiny_xray(cfg, ct_file, tmp_path / "run")  # trains, exports and loads with the switch
    assert cascade.stages[0].cfg.model.skip_sigma_data == SD
