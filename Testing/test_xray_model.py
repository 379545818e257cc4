"""X-ray to CT model: AdaLN-Zero, v-parameterisation, DDIM, lifting, losses, cascade chaining, weights."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import body_phantom_cubes

from DiffusionCore.errors import Cancelled, ConfigError, InputError, WeightsError
from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
from DiffusionCore.xray.config import load_stage_config, tiny_stage_config
from DiffusionCore.xray.lifting import DepthLifting
from DiffusionCore.xray.losses import stage_loss
from DiffusionCore.xray.pipeline import XrayToCTGenerator
from DiffusionCore.xray.vdiffusion import (
    ddim_sample,
    eps_from_v,
    q_sample,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from DiffusionCore.xray.vit import HybridViTBlock, _from_windows, _to_windows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_adaln_zero_block_is_identity_at_init_and_learns_away_from_it():
    torch.manual_seed(0)
    blk = HybridViTBlock(16, 2, window=2, max_full_tokens=8)  # 64 tokens -> windowed attention
    x, cond, ctx = torch.randn(2, 64, 16), torch.randn(2, 16), torch.randn(2, 5, 16)
    assert torch.equal(blk(x, cond, ctx, 4), x)
    torch.nn.init.normal_(blk.adaln[-1].weight, std=0.1)
    assert not torch.allclose(blk(x, cond, ctx, 4), x)
    plain = HybridViTBlock(16, 2, use_adaln=False)
    assert not torch.allclose(plain(x, cond, ctx, 4), x)


def test_window_partition_round_trip_and_windowed_attention_is_local():
    x = torch.randn(2, 8**3, 4)
    torch.testing.assert_close(_from_windows(_to_windows(x, 8, 4), 2, 8, 4), x)
    torch.manual_seed(0)
    blk = HybridViTBlock(8, 2, use_adaln=False, cross_attention=False, window=4, max_full_tokens=64)
    x = torch.randn(1, 8**3, 8)
    y = blk(x, torch.zeros(1, 8), None, 8)
    x2 = x.clone()
    x2[0, -1] += 10.0  # the last token lies in the last window only
    y2 = blk(x2, torch.zeros(1, 8), None, 8)
    assert torch.equal(y[0, 0], y2[0, 0])  # a token of the first window does not see it


def test_v_eps_x0_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 3, 3, 3, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.01, 0.3, 0.7, 0.99])
    xt = q_sample(x0, t, eps)
    v = v_from_x0_eps(x0, eps, t)
    torch.testing.assert_close(x0_from_v(xt, v, t), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_from_v(xt, v, t), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_from_eps(xt, eps, t[:3].tolist() and t), x0, atol=2e-3, rtol=1e-3)


def test_diffusion_loss_is_the_v_error_implied_by_the_x0_head():
    from DiffusionCore.xray.losses import diffusion_loss
    from DiffusionCore.xray.vdiffusion import predict_x0_eps

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.4, 0.6, 0.9])  # sigma above the floor
    xt = q_sample(x0, t, eps)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g)
    _, eps_hat = predict_x0_eps(x0_hat, xt, t, "x0", clip=False)
    from DiffusionCore.xray.vdiffusion import alpha_sigma

    a, s = alpha_sigma(t.view(-1, 1, 1, 1, 1))
    v_hat = a * eps_hat - s * x0_hat
    expected = ((v_hat - v_from_x0_eps(x0, eps, t)) ** 2).mean()
    torch.testing.assert_close(diffusion_loss(x0_hat, x0, t, True), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        diffusion_loss(x0_hat, x0, t, False), ((eps_hat - eps) ** 2).mean(), rtol=1e-4, atol=1e-6
    )


def test_ddim_with_an_oracle_recovers_the_data_point():
    """For data concentrated at one point the optimal v is known; DDIM must land on that point."""
    target = torch.linspace(-0.9, 0.9, 27).view(1, 1, 3, 3, 3)

    def oracle_v(x, t):
        from DiffusionCore.xray.vdiffusion import alpha_sigma

        a, s = alpha_sigma(t.view(-1, 1, 1, 1, 1))
        eps = (x - a * target) / s.clamp_min(1e-6)
        return a * eps - s * target

    out = ddim_sample(oracle_v, torch.randn(1, 1, 3, 3, 3), steps=3)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        ddim_sample(oracle_v, torch.randn(1, 1, 3, 3, 3), steps=3, cancel=ev)


def test_depth_prior_bands_and_pa_lifting_spreads_along_y():
    lift = DepthLifting([4], 4, bands=3)
    assert torch.allclose(lift.prior.centres, torch.tensor([0.25, 0.5, 0.75]))
    w = lift.prior(8)
    assert w.shape == (4, 8) and torch.allclose(w.mean(dim=1), torch.ones(4), atol=0.05)
    feats = [torch.zeros(1, 4, 8, 8)]
    feats[0][0, :, 0, 3] = 1.0  # top row (superior), column 3
    with torch.no_grad():
        lift.proj.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        lift.proj.bias.zero_()
        vol = lift(feats, 8, "pa")
    nz = (vol - lift(torch.zeros_like(feats[0])[None].unbind(0), 8, "pa")).abs().sum(dim=(0, 1)) > 1e-6
    zs, ys, xs = torch.nonzero(nz, as_tuple=True)
    assert set(zs.tolist()) == {7} and set(xs.tolist()) == {3} and len(set(ys.tolist())) == 8


def test_tiny_stage_loss_falls_on_a_tiny_set():
    from DiffusionCore.intensity import unit_to_hu
    from DiffusionCore.xray.data import render_training_drr

    torch.manual_seed(0)
    cascade = UnifiedHybridViTCascade.tiny(0, resolutions=(16,))
    stage = cascade.stages[0]
    x0 = body_phantom_cubes(2, 16)
    xray = render_training_drr(unit_to_hu(x0), 350.0, 32)
    weights = stage.cfg.loss_weights

    def eval_loss() -> float:
        with torch.no_grad():
            return float(
                stage_loss(stage, x0, xray, None, weights, generator=torch.Generator().manual_seed(1))[0]
            )

    before = eval_loss()
    opt = torch.optim.AdamW(stage.parameters(), lr=3e-3)
    for i in range(40):
        loss, parts = stage_loss(
            stage, x0, xray, None, weights, generator=torch.Generator().manual_seed(100 + i)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(parts) == {"v_loss", "drr_loss", "depth_prior_loss", "gradient_loss"}
    assert eval_loss() < 0.7 * before


def test_stage_chaining_shapes_geometry_previews_and_determinism():
    gen = XrayToCTGenerator.tiny(0)
    img = np.random.default_rng(0).random((48, 40)).astype(np.float32)
    seen, prog = [], []
    vol, report = gen.run(img, num_stages=2, steps=2, seed=3, device="cpu", fov_mm=320.0,
                          on_stage=lambda s, v, info: seen.append((s, v.shape, v.spacing, info)),
                          progress=lambda d, t, m: prog.append((d, t)))  # fmt: skip
    assert [s[0] for s in seen] == [1, 2]
    assert seen[0][1] == (16, 16, 16) and seen[1][1] == (32, 32, 32) == vol.shape
    assert seen[0][2] == (20.0,) * 3 and vol.spacing == (10.0,) * 3
    assert np.allclose(np.asarray(vol.origin) + 31 * 10.0 / 2, 0.0)  # centred cube, 320 mm side
    assert vol.array.min() >= -1024 and vol.array.max() <= 2048
    assert [st["stage"] for st in report["stages"]] == [1, 2]
    assert all(np.isfinite(st["projection_psnr"]) for st in report["stages"])
    # in steps of stage 1 (16^3; a 32^3 step weighs 8): preparing 1, stage 1's 2 steps and its consistency step 1,
    # stage 2's 2 steps 16 and its consistency step 8
    assert prog[-1] == (28, 28) and all(a[0] <= b[0] for a, b in zip(prog, prog[1:]))
    again, _ = gen.run(img, num_stages=2, steps=2, seed=3, device="cpu", fov_mm=320.0)
    assert np.array_equal(again.array, vol.array)
    capped, rep = gen.run(img, num_stages=3, steps=1, device="cpu")
    assert capped.shape == (32, 32, 32) and rep["notes"]
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        gen.run(img, num_stages=1, cancel=ev, device="cpu")
    with pytest.raises(InputError):
        gen.run(img, view="lateral", device="cpu")


def test_seed_api_save_and_from_pretrained(tmp_path):
    m = UnifiedHybridViTCascade.tiny(1)
    path = tmp_path / "cascade.safetensors"
    m.save_pretrained(path)
    loaded = UnifiedHybridViTCascade.from_pretrained(path)
    xray = torch.rand(1, 1, 32, 32)
    a = m.eval().generate(xray, num_stages=2, steps=1, generator=torch.Generator().manual_seed(0))
    b = loaded.generate(xray, num_stages=2, steps=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    s1 = loaded.generate_stage1(xray, steps=1)
    assert s1.shape == (1, 1, 16, 16, 16)
    assert loaded.generate_stage2(xray, s1, steps=1).shape == (1, 1, 32, 32, 32)
    with pytest.raises(WeightsError):
        XrayToCTGenerator.from_pretrained(str(path))  # not registered: refused by default
    assert XrayToCTGenerator.from_pretrained(str(path), allow_unregistered=True).num_stages == 2


def test_seed_api_runs_a_three_stage_cascade():
    m = UnifiedHybridViTCascade.tiny(2, resolutions=(8, 16, 32)).eval()
    xray = torch.rand(32, 32)  # (H, W) as in the seed
    full = m.generate(xray, num_stages=3, steps=1, generator=torch.Generator().manual_seed(0))
    assert full.shape == (1, 1, 32, 32, 32) and torch.isfinite(full).all()
    s1 = m.generate_stage1(xray, steps=1)
    s2 = m.generate_stage2(xray, s1, steps=1)
    s3 = m.generate_stage3(xray, s2, steps=1)
    assert (s1.shape[-1], s2.shape[-1], s3.shape[-1]) == (8, 16, 32)
    assert m.generate_stage3(xray, steps=1).shape == (1, 1, 32, 32, 32)  # earlier stages run when not given
    torch.manual_seed(0)
    a = m.generate(xray, num_stages=3, steps=1)
    torch.manual_seed(0)
    b = m.generate_stage3(xray, m.generate_stage2(xray, m.generate_stage1(xray, steps=1), steps=1), steps=1)
    torch.testing.assert_close(a, b)  # generate is the three stages chained
    with pytest.raises(InputError):
        m.generate_stages(xray, num_stages=4)


def test_stage_configs_accept_the_seed_keys_and_reject_bad_ones():
    cfgs = [load_stage_config(f"stage{i}") for i in (1, 2, 3)]
    assert [(c.resolution, c.loss_weights.drr_loss) for c in cfgs] == [(64, 0.2), (128, 0.3), (256, 0.5)]
    seed = {
        "stage": 2, "resolution": 128, "xray_resolution": 256,
        "model": {"voxel_channels": 64, "vit_depth": 2, "vit_heads": 4, "use_depth_lifting": True,
                  "use_adaln": True, "v_parameterization": False, "use_memory_efficient": True, "patch_size": 8},
        "training": {"batch_size": 1, "learning_rate": 1e-4, "epochs": 3, "gradient_clip": 1.0,
                     "gradient_checkpointing": True},
        "loss_weights": {"v_loss": 1.0, "drr_loss": 0.3, "depth_prior_loss": 0.1, "perceptual_loss": 0.1,
                         "gradient_loss": 0.1},
    }  # fmt: skip
    cfg = load_stage_config(seed)
    assert cfg.model.patch_size == 8 and cfg.training.gradient_checkpointing
    with pytest.raises(ConfigError, match="vit_dept"):
        load_stage_config({"model": {"vit_dept": 3}})
    with pytest.raises(ConfigError, match="multiple of model.patch_size"):
        load_stage_config({"resolution": 62})
    with pytest.raises(ConfigError, match="refine_channels"):
        load_stage_config({"model": {"refine_xray": True, "refine_channels": 0}})


def test_gradient_checkpointing_and_eps_parameterisation_train():
    cfg = tiny_stage_config(1, 16)
    cfg.training.gradient_checkpointing = True
    cfg.model.v_parameterization = False
    cfg.loss_weights.perceptual_loss = 0.5
    cfg.model.refine_channels = 4
    torch.manual_seed(0)
    cascade = UnifiedHybridViTCascade([cfg]).train()
    x0 = body_phantom_cubes(1, 16)
    stage = cascade.stages[0]
    opt = torch.optim.SGD(stage.parameters(), lr=0.1)
    for _ in range(2):  # the zero-initialised output layer learns first, then gradients reach the blocks
        opt.zero_grad()
        loss, parts = stage_loss(stage, x0, torch.rand(1, 1, 32, 32), None, cfg.loss_weights)
        loss.backward()
        opt.step()
    assert "perceptual_loss" in parts and torch.isfinite(loss)
    assert stage.blocks[0].adaln[-1].weight.grad.abs().sum() > 0
    assert stage.lifting.prior.mix.grad.abs().sum() > 0
    assert stage.refine[0].weight.grad.abs().sum() > 0  # the refinement head trains too


def test_real_radiographs_are_matched_to_the_mean_ct_drr_style():
    from DiffusionCore.xray.radiograph import Radiograph

    gen = XrayToCTGenerator.tiny(0)
    assert gen.reference_drr(32) is None  # an all-air mean CT carries no style
    gen.cascade.set_mean_ct(body_phantom_cubes(1, 16))
    ref = gen.reference_drr(32)
    skewed = np.repeat(np.linspace(0, 1, 64, dtype=np.float32)[None] ** 3, 64, axis=0)
    x, fov, source = gen.prepare_input(Radiograph(skewed, None, {"source": "chest.png"}), None)
    assert x.shape == (1, 1, 32, 32) and source == "training field of view" and fov == 350.0
    for q in (0.25, 0.5, 0.75):
        assert abs(np.quantile(x.numpy(), q) - np.quantile(ref, q)) < 0.05
    plain, fov, source = gen.prepare_input(skewed, 300.0)  # arrays (e.g. DRRs) are only windowed
    assert source == "user" and np.quantile(plain.numpy(), 0.5) < 0.2
