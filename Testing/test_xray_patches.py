"""X-ray cascade stages over patches: patch-wise generation and training of grids larger than one pass."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import body_phantom_cubes, tiny_xray_stage

from DiffusionCore.errors import ConfigError, ResourceError
from DiffusionCore.xray.cascade import StageModel, UnifiedHybridViTCascade, _crop, plan_patches
from DiffusionCore.xray.config import load_stage_config, patch_alignment, tiny_stage_config
from DiffusionCore.xray.pipeline import XrayToCTGenerator
from DiffusionCore.xray.train import CascadeObjective, patch_stage_loss, train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stage(stage: int = 2, resolution: int = 32, refine: int = 4, **model) -> StageModel:
    """A tiny stage whose every weight is perturbed (no zero-initialised identity layers left)."""
    return tiny_xray_stage(stage, resolution, refine, **model)


def _inputs(prev_side: int | None = 16, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    xray = torch.rand(1, 1, 32, 32, generator=g)
    prev = None if prev_side is None else torch.rand(1, 1, *(prev_side,) * 3, generator=g) * 2 - 1
    return xray, prev


@pytest.mark.parametrize("refine_xray", [False, True])
def test_patchwise_generation_equals_the_whole_grid_where_attention_is_windowed(refine_xray):
    st = _stage(window_size=2, refine_xray=refine_xray)  # 32^3, 8^3 tokens > max_full_tokens: 2^3-token windows
    assert patch_alignment(st.cfg) == 8  # a 16^3 patch holds 8 windows (few enough tokens to attend globally)
    xray, prev = _inputs()
    whole = st.sample(xray, prev, steps=2, generator=torch.Generator().manual_seed(1))
    assert st.last_plan is None
    tiled = st.sample(xray, prev, steps=2, generator=torch.Generator().manual_seed(1), patch=16)
    plan = st.last_plan
    assert plan is not None and plan.n_tiles == 8 and plan.windowed and plan.overlap == 0
    assert tiled.shape == whole.shape == (1, 1, 32, 32, 32)
    assert float(whole.std()) > 0.2  # a real signal, not the identity network's output
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_a_patch_reads_its_place_in_the_grid():
    st = _stage(refine=0, window_size=2)
    xray, prev = _inputs()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, 32, 32, 32, generator=g)
    t = torch.tensor([0.4])
    with torch.no_grad():
        whole, lifted = st(x, t, xray, prev, return_lifted=True)
        origin = (16, 0, 16)
        part, lifted_part = st(_crop(x, origin, 16), t, xray, prev, return_lifted=True, origin=origin)
        torch.testing.assert_close(part, _crop(whole, origin, 16), atol=1e-5, rtol=0)
        torch.testing.assert_close(lifted_part, _crop(lifted, origin, 16), atol=1e-6, rtol=0)
        wrong = st(_crop(x, origin, 16), t, xray, prev, origin=(0, 0, 0))  # same voxels, wrong place
    assert float((wrong - part).abs().max()) > 1e-2


@pytest.mark.parametrize("view", ["pa", "lateral"])
def test_the_refinement_head_reads_each_voxels_ray_and_depth(view):
    st = _stage(stage=1, resolution=32, refine_xray=True)
    st.cfg = replace(st.cfg, data=replace(st.cfg.data, view=view))
    xray = torch.zeros(1, 1, 32, 32)
    xray[0, 0, 5, 20] = 1.0  # one bright ray: 6th row from the top (superior), 21st column
    zero = torch.zeros(1, 1, 32, 32, 32)
    ctx = st.condition(xray)
    inp = st._refine_input(zero, zero, zero, ctx, (0, 0, 0))
    assert inp.shape == (1, 5, 32, 32, 32)
    rays, depth = inp[0, 3], inp[0, 4]
    z, across = np.unravel_index(int(rays.amax(dim=1 if view == "pa" else 2).argmax()), (32, 32))
    assert (z, across) == (31 - 5, 20)  # z runs superior-increasing: the top row is the last slice
    depth_dim = 1 if view == "pa" else 2
    assert float((rays - rays.mean(dim=depth_dim, keepdim=True)).abs().max()) == 0.0  # constant along the ray
    line = depth.movedim(depth_dim, 0)[:, 0, 0]
    torch.testing.assert_close(line, torch.linspace(-1, 1, 32))  # the voxel's depth, front to back
    assert float((depth - depth.mean(dim=depth_dim, keepdim=True)).abs().max()) > 0.5
    part = st._refine_input(zero[..., :16, :16, :16], zero[..., :16, :16, :16], zero[..., :16, :16, :16], ctx,
                            (16, 0, 16))  # fmt: skip
    torch.testing.assert_close(part, _crop(inp, (16, 0, 16), 16))  # a patch reads its place


def test_global_attention_patches_blend_without_seams():
    st = _stage(max_full_tokens=100_000)  # whole grid attended globally: patches approximate it
    plan = plan_patches(st.cfg, 16, 8)
    assert not plan.windowed and plan.starts == (0, 8, 16) and plan.overlap == 8
    acc = torch.zeros(32, 32, 32)
    for (z, y, x), w in plan.tiles():
        acc[z : z + 16, y : y + 16, x : x + 16] += w
    torch.testing.assert_close(acc, torch.ones_like(acc))  # the weights sum to one at every voxel
    xray, prev = _inputs()
    x = torch.zeros(1, 1, 32, 32, 32)
    t = torch.tensor([0.5])
    with torch.no_grad():
        ctx = st.condition(xray, prev)
        whole = st.predict(x, t, ctx)
        tiled = st.predict_tiled(x, t, st.pad_condition(ctx, plan), plan)
    diff = tiled - whole
    assert float(diff.abs().mean()) < 0.05 * float(whole.std())
    for axis in (2, 3, 4):  # the step across a patch border is no larger than the steps inside patches
        steps = tiled.diff(dim=axis).abs().mean(dim=[d for d in range(5) if d != axis])
        border = steps[[7, 15, 23]]  # planes where one patch's span starts or ends
        inside = steps[[k for k in range(31) if k not in (7, 15, 23)]]
        assert float(border.max()) <= float(inside.max())


def test_a_grid_that_is_not_a_multiple_of_the_patch_is_padded_and_cropped():
    st = _stage(stage=1, resolution=40, refine=4)  # 10^3 tokens: windows of 4 tokens, alignment 16 voxels
    plan = plan_patches(st.cfg, 16)
    assert (plan.padded, plan.starts, plan.n_tiles) == (48, (0, 16, 32), 27)
    xray, _ = _inputs(None)
    vol = st.sample(xray, None, steps=1, generator=torch.Generator().manual_seed(0), patch=16)
    assert vol.shape == (1, 1, 40, 40, 40) and torch.isfinite(vol).all()
    assert float(vol.abs().max()) <= 1.0
    # through the generator: exact geometry of the 40^3 stage, its projection error on the blended volume
    configs = [tiny_stage_config(1, 16), replace(tiny_stage_config(2, 40), model=replace(
        tiny_stage_config(2, 40).model, inference_patch=16))]  # fmt: skip
    gen = XrayToCTGenerator(UnifiedHybridViTCascade(configs))
    out, report = gen.run(np.random.default_rng(0).random((40, 40)).astype(np.float32), num_stages=2, steps=1,
                          device="cpu", fov_mm=300.0)  # fmt: skip
    assert out.shape == (40, 40, 40) and out.spacing == (7.5,) * 3
    assert np.allclose(np.asarray(out.origin) + 39 * 7.5 / 2, 0.0)
    assert gen.cascade.stages[1].last_plan.n_tiles == 27
    assert report["stages"][1]["patches"]["patches"] == 27  # the report says the stage ran in patches
    assert np.isfinite(report["stages"][1]["projection_psnr"])


def test_patches_are_chosen_by_the_memory_estimate_and_refused_below_the_smallest():
    st = _stage(stage=1, resolution=64, refine=4)
    whole, half = st.memory_estimate(1), st.memory_estimate(1, 32)
    assert half < whole
    assert st.sampling_plan(1, memory_limit=whole) is None
    plan = st.sampling_plan(1, memory_limit=(whole + half) // 2)
    assert plan is not None and plan.patch == 32 and plan.n_tiles == 8
    with pytest.raises(ResourceError, match="not enough memory"):
        st.sampling_plan(1, memory_limit=1000)
    asked = st.sampling_plan(1, patch=32, memory_limit=(st.memory_estimate(1, 16) + half) // 2)
    assert asked.patch == 16 and asked.n_tiles == 64  # an asked patch that does not fit is halved
    # the shipped 384^3 stage: trained on 128^3 patches, generated in 8 exact window-aligned 192^3 patches
    big = load_stage_config("stage3_384")
    shipped = plan_patches(big, big.model.inference_patch)
    assert (shipped.n_tiles, shipped.windowed, shipped.overlap, shipped.padded) == (8, True, 0, 384)
    with pytest.raises(ConfigError, match="multiple of 64"):
        replace(big, model=replace(big.model, train_patch=96))
    with pytest.raises(ConfigError, match="exceeds"):
        replace(big, model=replace(big.model, train_patch=448))


def test_patch_training_steps_run_and_the_loss_falls_on_a_tiny_set():
    from DiffusionCore.intensity import unit_to_hu
    from DiffusionCore.xray.data import render_training_drr

    cfgs = [tiny_stage_config(1, 16), tiny_stage_config(2, 32, refine_channels=4)]
    # conditioned on the (downsampled) truth only, as the loss below is measured
    cfgs[1] = replace(cfgs[1], model=replace(cfgs[1].model, train_patch=16),
                      data=replace(cfgs[1].data, prev_from_model=0.0))  # fmt: skip
    torch.manual_seed(0)
    cascade = UnifiedHybridViTCascade(cfgs)
    stage = cascade.stages[1]
    x0 = body_phantom_cubes(2, 32)
    xray = render_training_drr(unit_to_hu(x0), 350.0, 32)
    prev = torch.nn.functional.avg_pool3d(x0, 2)
    w = stage.cfg.loss_weights

    def eval_loss() -> float:
        total = 0.0
        with torch.no_grad():
            for k, origin in enumerate([(0, 0, 0), (16, 16, 16), (0, 16, 0), (16, 0, 16)]):
                g = torch.Generator().manual_seed(k)
                total += float(patch_stage_loss(stage, x0, xray, prev, w, origin=origin, generator=g)[0])
        return total

    before = eval_loss()
    for p in cascade.stages[0].parameters():
        p.requires_grad_(False)
    params = [p for p in stage.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    objective = CascadeObjective(cascade, [2])
    vols = {16: prev, 32: x0}
    for step in range(30):
        _, parts = train_step(objective, opt, params, vols, xray, 0.0, gradient_clip=1.0, step=step)
    expected = {"stage2/v_loss", "stage2/drr_loss", "stage2/depth_prior_loss", "stage2/gradient_loss"}
    assert expected <= set(parts)
    assert eval_loss() < 0.7 * before


def test_the_shipped_patch_config_trains_and_generates_with_tiny_networks(tmp_path, caplog):
    import logging

    from DiffusionCore.volume import Volume, write_volume
    from DiffusionCore.xray.train import XrayTrainOptions, train_xray

    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    ct = np.where((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1, 40.0, -1000.0) + np.where(x**2 + (y - 0.45) ** 2 < 0.015,
                                                                                  900.0, 0.0)  # fmt: skip
    write_volume(Volume(ct.astype(np.float32), (14.0, 14.0, 14.0)), tmp_path / "ct.nii.gz")
    opts = XrayTrainOptions(configs=[load_stage_config("stage3_384")], data=str(tmp_path / "ct.nii.gz"),
                            output_dir=tmp_path / "run", max_steps=2, device="cpu", tiny_test_model=True)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="DiffusionCore.xray.train"):
        summary = train_xray(opts)
    assert "trains on random 32^3 patches of its 64^3 grid" in caplog.text
    assert summary["steps"] == 2 and np.isfinite(summary["losses"]["stage3/drr_loss"])
    gen = XrayToCTGenerator.from_pretrained(summary["weights"], allow_unregistered=True)
    vol, report = gen.run(np.random.default_rng(0).random((32, 32)).astype(np.float32), num_stages=3, steps=1,
                          device="cpu")  # fmt: skip
    assert vol.shape == (64, 64, 64) and [s["resolution"] for s in report["stages"]] == [16, 32, 64]
    assert gen.cascade.stages[2].last_plan.describe()["patches"] == 8


def test_gpu_memory_planned_counts_the_allocators_cache_once(monkeypatch):
    """On a GPU the sampling plan may use the driver's free memory plus what PyTorch's allocator holds cached from an
    earlier stage or radiograph, once (an 8 GiB card, 2 GiB free, 4 GiB cached: 6 GiB, times the safety fraction).
    Counting the cache twice planned for the whole card and ran out of memory where patches would have fitted."""
    from DiffusionCore.tiling import MEMORY_SAFETY_FRACTION
    from DiffusionCore.xray.cascade import _usable_memory

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (2 * gib, 8 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 5 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 1 * gib)
    assert _usable_memory("cuda") == int(6 * gib * MEMORY_SAFETY_FRACTION)
