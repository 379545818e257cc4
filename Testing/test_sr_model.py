"""SRModel: shapes, the residual formulation, guidance, cancel, weights files."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from DiffusionCore.errors import Cancelled, ConfigError, InputError, WeightsError
from DiffusionCore.intensity import HU_WINDOW, hu_to_unit, unit_to_hu
from DiffusionCore.sr.config import tiny_config
from DiffusionCore.sr.controlnet import IRControlNet
from DiffusionCore.sr.model import SRModel
from DiffusionCore.sr.unet import LatentUNet
from DiffusionCore.sr.vae import CTAutoencoderKL


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return SRModel.tiny(seed=0)


def _cond(seed=0, shape=(1, 1, 16, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


def test_intensity_roundtrip_and_clipping():
    hu = np.array([-3000.0, -1024.0, 0.0, 2048.0, 5000.0], dtype=np.float32)
    u = hu_to_unit(hu)
    assert u.dtype == np.float32
    np.testing.assert_allclose(u, [-1, -1, -1 + 1024 / 1536, 1, 1], atol=1e-6)
    np.testing.assert_allclose(unit_to_hu(u), np.clip(hu, *HU_WINDOW), atol=1e-3)
    t = torch.tensor([0.0, 100.0])
    assert torch.allclose(unit_to_hu(hu_to_unit(t)), t, atol=1e-3)
    # numpy inputs of any layout and type give a new float32 array; the caller's array stays as it was
    vol = np.arange(-1500, 2500, 10, dtype=np.int16).reshape(20, 20)[:, ::2].T
    before = vol.copy()
    u = hu_to_unit(vol)
    assert u.dtype == np.float32 and u.shape == vol.shape and not np.shares_memory(u, vol)
    np.testing.assert_array_equal(vol, before)
    np.testing.assert_allclose(u, (np.clip(vol, *HU_WINDOW) + 1024) / 1536 - 1, atol=1e-6)
    assert float(hu_to_unit(-1024.0)) == -1.0 and float(unit_to_hu(1.0)) == 2048.0


def test_vae_compresses_in_plane_only_by_default():
    vae = CTAutoencoderKL(tiny_config().vae)
    x = torch.zeros(2, 1, 8, 32, 16)
    mean, logvar = vae.encode(x)
    assert mean.shape == (2, 4, 8, 8, 4) and logvar.shape == mean.shape
    assert vae.decode(mean).shape == x.shape
    with pytest.raises(ValueError):
        vae.encode(torch.zeros(1, 1, 8, 30, 16))


def test_unet_and_controlnet_shapes_and_zero_init():
    cfg = tiny_config().unet
    unet = LatentUNet(cfg, 4, 4)
    x = torch.randn(2, 4, 8, 8, 8)
    t = torch.tensor([10.0, 500.0])
    out = unet(x, t)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output: a fresh UNet predicts "no change"
    ctrl = IRControlNet(cfg, 4)
    ctrl.copy_from_unet(unet)
    res = ctrl(x, torch.randn_like(x), t)
    assert len(res) == len(unet.encoder.skip_channels) + 1
    assert all(torch.count_nonzero(r) == 0 for r in res)  # zero convs: a fresh ControlNet changes nothing
    for k, v in unet.encoder.state_dict().items():
        if k != "conv_in.weight":
            assert torch.equal(ctrl.encoder.state_dict()[k], v)


def test_fresh_model_returns_the_cubic_input_exactly():
    torch.manual_seed(0)
    model = SRModel(tiny_config()).eval()
    cond = _cond()
    out = model.super_resolve_patch(cond, steps=2, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == cond.shape
    assert torch.allclose(out, cond, atol=1e-6)


def test_tiny_model_is_deterministic_given_the_generator(tiny):
    cond = _cond(1, (2, 1, 8, 32, 32))
    a = tiny.super_resolve_patch(cond, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(5))
    b = tiny.super_resolve_patch(cond, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(5))
    c = tiny.super_resolve_patch(cond, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(6))
    assert a.shape == cond.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert tiny.latent_downsample == (4, 16, 16) and len(tiny.weights_sha256) == 64


def test_the_default_estimate_is_the_one_step_mean_and_ddim_weights_sample(tiny):
    cond = _cond(1, (1, 1, 8, 32, 32))
    assert tiny.default_estimate == "mean"
    seen = []
    a = tiny.super_resolve_patch(cond, generator=torch.Generator().manual_seed(5), step_callback=lambda i, n: seen.append(n))
    b = tiny.super_resolve_patch(cond, generator=torch.Generator().manual_seed(6), estimate="mean")
    assert seen == [1] and torch.equal(a, b)  # one evaluation, no noise: the seed does not matter
    y = tiny.encode(cond)
    t_last = torch.full((1,), tiny.diffusion.num_steps - 1)
    expected = cond + tiny.decode(tiny.predict(y, t_last, y)) - tiny.decode(y)
    assert torch.allclose(a, expected, atol=1e-5)
    sample = tiny.super_resolve_patch(cond, steps=2, generator=torch.Generator().manual_seed(5))  # steps: a sample
    assert not torch.allclose(sample, a, atol=1e-4)
    with pytest.raises(ConfigError, match="estimate 'sample'"):
        tiny.super_resolve_patch(cond, steps=3, estimate="mean")
    with pytest.raises(ConfigError, match="one of"):
        tiny.super_resolve_patch(cond, estimate="median")

    cfg = tiny_config()
    cfg.diffusion.predict_residual = False
    cfg.diffusion.num_train_timesteps = 10
    ddim = SRModel(cfg).eval()
    assert ddim.default_estimate == "sample"
    assert ddim.super_resolve_patch(cond, steps=2, generator=torch.Generator().manual_seed(0)).shape == cond.shape
    with pytest.raises(ConfigError, match="DDIM"):
        ddim.super_resolve_patch(cond, estimate="mean")


def test_guidance_one_is_exactly_the_conditional_path(tiny):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, 4, 8, 8, 8, generator=g)
    x_t = torch.randn(1, 4, 8, 8, 8, generator=g)
    t = torch.tensor([2])
    with torch.no_grad():
        guided = tiny.predict(x_t, t, y, guidance=1.0)
        proc = tiny.diffusion
        direct = y + tiny.denoiser(proc.scale_input(x_t, t), proc.timestep_value(t), y)
        x_in, tv = proc.scale_input(x_t, t), proc.timestep_value(t)
        uncond = y + tiny.denoiser(x_in, tv, y, torch.zeros(1), use_control=False)
        base = y + tiny.denoiser(x_in, tv, y, use_control=False)
        strong = tiny.predict(x_t, t, y, guidance=2.0)
        zero = tiny.predict(x_t, t, y, guidance=0.0)
        no_control = tiny.predict(x_t, t, y, control=False)
    assert torch.equal(guided, direct)
    assert torch.equal(zero, uncond)
    assert torch.equal(no_control, base)
    # the condition reaches the UNet through its input as well as through the ControlNet
    assert tiny.denoiser.concat_condition and not torch.allclose(base, uncond)
    assert not torch.allclose(direct, base)
    assert torch.allclose(strong, uncond + 2.0 * (direct - uncond), atol=1e-6)
    assert not torch.allclose(strong, guided)


def test_cancel_stops_within_one_step(tiny):
    cancel = threading.Event()
    seen = []

    def on_step(done, total):
        seen.append(done)
        if done == 1:
            cancel.set()

    with pytest.raises(Cancelled):
        tiny.super_resolve_patch(
            _cond(),
            steps=4,
            guidance=1.0,
            generator=torch.Generator().manual_seed(0),
            cancel=cancel,
            step_callback=on_step,
        )
    assert seen == [1]


def test_bad_patch_shapes_are_refused(tiny):
    with pytest.raises(InputError, match="multiple"):
        tiny.super_resolve_patch(torch.zeros(1, 1, 16, 30, 32), steps=1)
    with pytest.raises(InputError):
        tiny.super_resolve_patch(torch.zeros(1, 2, 16, 32, 32), steps=1)


def test_weights_files_roundtrip(tiny, tmp_path):
    combined = tmp_path / "sr.safetensors"
    sha = tiny.save(combined)
    loaded = SRModel.from_pretrained(combined, allow_unregistered=True)
    assert loaded.weights_sha256 == sha
    vae_file, diff_file = tmp_path / "vae.safetensors", tmp_path / "diffusion.safetensors"
    tiny.save(vae_file, component="vae")
    tiny.save(diff_file, component="diffusion")
    with pytest.raises(WeightsError, match="not a registered"):
        SRModel.from_files(vae_file, diff_file)  # a checkpoint pair is checked like any weights file
    pair = SRModel.from_files(vae_file, diff_file, allow_unregistered=True)
    cond = _cond(2)
    ref = tiny.super_resolve_patch(cond, steps=2, generator=torch.Generator().manual_seed(0))
    for m in (loaded, pair):
        out = m.super_resolve_patch(cond, steps=2, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, ref)
    with pytest.raises(WeightsError, match="not a registered"):
        SRModel.from_pretrained(combined)
    with pytest.raises(WeightsError, match="vae"):
        SRModel.from_pretrained(vae_file, allow_unregistered=True)


def test_memory_estimate_grows_with_patch(tiny):
    small = tiny.estimate_patch_memory((16, 32, 32))
    big = tiny.estimate_patch_memory((32, 128, 128))
    assert 0 < small < big
    assert big >= 32 * 128 * 128 * 4  # at least the patch itself in float32


def test_windowed_attention_matches_attention_inside_each_window():
    """Tiles larger than the training patch attend inside windows: checked against a per-window loop,
    with uneven edge windows (padding masked), and a window covering the map is global attention."""
    import itertools

    import torch.nn.functional as F

    from DiffusionCore.nn.blocks import SelfAttention3d

    torch.manual_seed(0)
    win = SelfAttention3d(16, 4, (2, 3, 4))
    torch.nn.init.normal_(win.proj.weight)  # the fresh block is the identity
    x = torch.randn(2, 16, 5, 7, 9)
    got = win(x)
    qkv = win.qkv(win.norm(x))
    ref = torch.zeros_like(x)
    for z0, y0, x0 in itertools.product(range(0, 5, 2), range(0, 7, 3), range(0, 9, 4)):
        blk = qkv[:, :, z0 : z0 + 2, y0 : y0 + 3, x0 : x0 + 4]
        d, h, w = blk.shape[2:]
        q, k, v = (blk.reshape(2, 3, 4, 4, -1)[:, i].transpose(-1, -2) for i in range(3))
        o = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(2, 16, d, h, w)
        ref[:, :, z0 : z0 + d, y0 : y0 + h, x0 : x0 + w] = o
    torch.testing.assert_close(got, x + win.proj(ref), atol=1e-5, rtol=1e-5)

    glob = SelfAttention3d(16, 4, None)
    glob.load_state_dict(win.state_dict())
    whole = SelfAttention3d(16, 4, (5, 7, 9))
    whole.load_state_dict(win.state_dict())
    assert torch.equal(whole(x), glob(x))
    assert (glob(x) - got).abs().max() > 1e-3  # windows really limit the context
    with pytest.raises(ValueError, match="3 positive sizes"):
        SelfAttention3d(16, 4, (0, 2, 2))


def test_vae_shortcut_starts_as_an_exact_fold_or_block_means():
    """Residual autoencoding: a fresh VAE with one latent channel per voxel of a latent cell reconstructs
    exactly; with fewer channels it returns group means; without the shortcut it is a plain network."""
    from DiffusionCore.sr.config import VAEConfig
    from DiffusionCore.sr.vae import channels_to_space, space_to_channels

    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 1, 8, 32, 32), generator=g) * 2 - 1
    assert torch.equal(channels_to_space(space_to_channels(x, (2, 4, 4)), (2, 4, 4)), x)
    with torch.no_grad():
        exact = CTAutoencoderKL(VAEConfig(channels=(8, 8, 16), latent_channels=16)).eval()
        mean, logvar = exact.encode(x)
        assert mean.shape == (2, 16, 8, 8, 8) and torch.equal(exact.decode(mean), x)
        assert float(logvar.max()) < -7  # a narrow posterior: training noise does not swamp the fold
        means = CTAutoencoderKL(VAEConfig(channels=(8, 8, 16), latent_channels=4)).eval()
        rec = means.decode(means.encode(x)[0])
        rows = x.reshape(2, 1, 8, 32, 8, 4).mean(-1, keepdim=True).expand(-1, -1, -1, -1, -1, 4)
        torch.testing.assert_close(rec, rows.reshape(x.shape))
        plain = CTAutoencoderKL(VAEConfig(channels=(8, 8, 16), latent_channels=16, shortcut=False)).eval()
        assert (plain.decode(plain.encode(x)[0]) - x).abs().mean() > 0.1
    with pytest.raises(ValueError, match="divide one another"):
        CTAutoencoderKL(VAEConfig(channels=(8, 8, 16), latent_channels=3))
