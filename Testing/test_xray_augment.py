"""X-ray training data: the body-habitus zoom and the elastic deformation keep the CT and its DRR together; the
clinical look of processed radiographs changes a DRR's detail, not its values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import recipe_changes

from DiffusionCore.errors import ConfigError
from DiffusionCore.volume import AIR_HU
from DiffusionCore.xray.config import XrayDataConfig
from DiffusionCore.xray.data import (
    CLINICAL_LOOK,
    ELASTIC_CONTROL,
    XrayCubeDataset,
    clinical_look,
    gaussian_blur,
    render_training_drr,
    warp_cube,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _chest(r: int) -> np.ndarray:
    """An elliptic body (40 HU) with two lungs and a posterior spine, air outside, on an r^3 cube."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, r)] * 3, indexing="ij")
    ct = np.where((x / 0.7) ** 2 + (y / 0.5) ** 2 < 1, 40.0, AIR_HU)
    ct[((np.abs(x) - 0.35) / 0.2) ** 2 + (y / 0.3) ** 2 < 1] = -800.0
    ct[x**2 + (y - 0.35) ** 2 < 0.01] = 900.0
    ct[np.abs(z) > 0.8] = AIR_HU  # the scanned range ends before the cube does
    return ct.astype(np.float32)


def test_identity_warp_keeps_the_cube():
    cube = _chest(32)
    out = warp_cube(cube, np.zeros(3), (1.0, 1.0, 1.0))
    assert np.allclose(out, cube, atol=1e-2)  # HU, float32 sampling positions


def test_zoom_scales_each_axis_of_the_anatomy_on_its_own():
    cube = _chest(48)
    depth, width = (cube[24, :, 24] > -500).sum(), (cube[24, 24, :] > -500).sum()
    wide = warp_cube(cube, np.zeros(3), (1.0, 1.0, 1.2))  # x only: a wider chest, as deep as before
    assert (wide[24, 24, :] > -500).sum() == pytest.approx(1.2 * width, abs=2)
    assert (wide[24, :, 24] > -500).sum() == pytest.approx(depth, abs=1)
    deep = warp_cube(cube, np.zeros(3), (1.0, 0.85, 1.0))  # y only: a shallower chest
    assert (deep[24, :, 24] > -500).sum() == pytest.approx(0.85 * depth, abs=2)
    assert (deep[24, 24, :] > -500).sum() == pytest.approx(width, abs=1)
    assert deep.min() >= AIR_HU - 1e-3  # what comes from outside the cube is air


def test_elastic_field_is_smooth_bounded_and_the_same_at_every_resolution():
    rng = np.random.default_rng(3)
    control = rng.standard_normal((3, *ELASTIC_CONTROL))
    warped = {r: warp_cube(_chest(r), np.zeros(3), (1, 1, 1), control, 6.0 / (350.0 / r)) for r in (32, 64)}
    for r, w in warped.items():
        changed = np.abs(w - _chest(r)) > 1
        assert 0.01 < changed.mean() < 0.5, r  # deformed, but the body is still where it was
    # the same deformation at both resolutions: the 64^3 warp, averaged down, is closer to the 32^3 warp with
    # the same control points than to one with other control points
    other = warp_cube(_chest(32), np.zeros(3), (1, 1, 1), rng.standard_normal(control.shape), 6.0 / (350.0 / 32))
    down = warped[64].reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    assert np.abs(down - warped[32]).mean() < 0.7 * np.abs(down - other).mean()
    none = warp_cube(_chest(32), np.zeros(3), (1, 1, 1), control, 0.0)
    assert np.allclose(none, _chest(32), atol=1e-2)


def test_augmented_drr_is_the_projection_of_the_augmented_cube():
    cubes = [{32: _chest(32)}]
    aug = XrayDataConfig(zoom_jitter=0.12, elastic_mm=6.0, intensity_jitter=0.0, noise_std=0.0, blur_sigma_px=0.0,
                         pose_jitter_deg=0.0, hu_jitter=0.0)  # fmt: skip
    ds = XrayCubeDataset(cubes, aug, 350.0)
    vols, drr = ds.sample(np.random.default_rng(0), 3, [32], 32)
    from DiffusionCore.intensity import unit_to_hu

    again = render_training_drr(unit_to_hu(vols[32]), 350.0, 32, "pa")
    assert torch.allclose(drr, again, atol=1e-5)
    plain, _ = XrayCubeDataset(cubes, XrayDataConfig(max_rotation_deg=0.0, flip=False), 350.0).sample(
        np.random.default_rng(0), 3, [32], 32, augment=False
    )
    widths = [int((vols[32][i, 0, 16, 16, :] > -0.5).sum()) for i in range(3)]
    assert len(set(widths)) > 1 or widths[0] != int((plain[32][0, 0, 16, 16, :] > -0.5).sum())


def test_the_model_cards_experiment_config_is_the_cpu_recipe_plus_the_new_keys():
    from dataclasses import asdict
    from pathlib import Path

    from DiffusionCore.xray.config import load_stage_config

    root = Path(__file__).resolve().parents[1]
    tried = load_stage_config(str(root / "benchmarks" / "xray_stage1_rays.json"))
    cpu = load_stage_config("stage1_cpu")
    assert (tried.data.zoom_jitter, tried.data.elastic_mm, tried.model.refine_xray) == (0.12, 6.0, True)
    a, b = asdict(tried), asdict(cpu)
    for section, key in (("data", "zoom_jitter"), ("data", "elastic_mm"), ("model", "refine_xray")):
        a[section].pop(key), b[section].pop(key)
    assert a == b


def _detail(img: torch.Tensor) -> float:
    """Mean absolute difference from a 2-pixel blur: how much fine detail (edges) an image shows."""
    return float((img - gaussian_blur(img, 2.0)).abs().mean())


def test_clinical_look_sharpens_the_drr_and_keeps_its_values():
    drr = render_training_drr(torch.from_numpy(_chest(64))[None, None], 350.0, 64, "pa")
    looked = clinical_look(drr, *CLINICAL_LOOK)
    # the same values (a real radiograph is put on a DRR's histogram before the model sees it) ...
    assert torch.equal(looked.flatten().sort().values, drr.flatten().sort().values)
    # ... in another arrangement: edges enhanced, as in a processed radiograph
    assert _detail(looked) > 1.3 * _detail(drr)
    assert torch.equal(clinical_look(drr, 0.0, 3.0, 0.0), drr)  # no processing: the DRR itself


def test_gaussian_blur_keeps_flat_images_and_accepts_kernels_wider_than_the_image():
    flat = torch.full((2, 1, 12, 12), 0.3)
    assert torch.allclose(gaussian_blur(flat, 16.0), flat)  # a 97-pixel kernel on a 12-pixel image
    step = torch.zeros(1, 1, 12, 12)
    step[..., 6:] = 1.0
    blurred = gaussian_blur(step, 1.0)
    assert 0.0 < float(blurred[0, 0, 0, 5]) < 0.5 < float(blurred[0, 0, 0, 6]) < 1.0


def test_processing_augmentation_gives_some_drrs_the_clinical_look():
    hu = torch.from_numpy(np.stack([_chest(32)] * 8))[:, None]
    plain = render_training_drr(hu, 350.0, 32, rng=np.random.default_rng(5), aug=XrayDataConfig())
    looked = render_training_drr(hu, 350.0, 32, rng=np.random.default_rng(5), aug=XrayDataConfig(processing=0.5))
    changed = [not torch.equal(a, b) for a, b in zip(plain, looked)]
    assert 0 < sum(changed) < 8  # about half of them
    for a, b in zip(plain, looked):  # each keeps its own values
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
    from DiffusionCore.xray.config import load_stage_config

    with pytest.raises(ConfigError, match="data.processing"):
        load_stage_config({"stage": 1, "resolution": 64, "data": {"processing": 1.5}})


def test_processing_flatten_sets_how_much_of_the_broad_contrast_the_look_may_remove():
    from DiffusionCore.xray.config import load_stage_config

    hu = torch.from_numpy(np.stack([_chest(64)] * 8))[:, None]

    def midline_contrast(flatten_max: float) -> np.ndarray:
        """Per DRR: the broad brightness of the midline (mediastinum and spine) over the lungs beside it."""
        aug = XrayDataConfig(processing=1.0, processing_flatten=flatten_max)
        broad = gaussian_blur(render_training_drr(hu, 350.0, 64, rng=np.random.default_rng(2), aug=aug), 4.0)
        row = broad[:, 0, 32]
        return (row[:, 30:34].mean(1) - 0.5 * (row[:, 12:20].mean(1) + row[:, 44:52].mean(1))).numpy()

    default, strong, none = midline_contrast(0.7), midline_contrast(1.3), midline_contrast(0.0)
    # the same draws, each flattened further: the midline stands out less in every DRR, much less in some
    assert (strong <= default + 1e-4).all() and (default <= none + 1e-4).all()
    assert (default - strong).max() > 0.1
    assert XrayDataConfig().processing_flatten == 0.7  # the range the processed look had until now
    for bad in (-0.1, 2.5):
        with pytest.raises(ConfigError, match="data.processing_flatten"):
            load_stage_config({"stage": 1, "resolution": 64, "data": {"processing_flatten": bad}})


def test_the_equalised_look_experiment_is_the_shipped_recipe_plus_a_stronger_processed_look():
    from dataclasses import asdict
    from pathlib import Path

    from DiffusionCore.xray.config import load_stage_config

    root = Path(__file__).resolve().parents[1]
    tried = asdict(load_stage_config("stage1_default"))
    shipped = asdict(load_stage_config(str(root / "benchmarks" / "xray_stage1_residual.json")))
    assert recipe_changes(tried, shipped) == {"data.processing": (0.0, 0.5), "data.processing_flatten": (0.7, 1.3)}


def test_evaluation_can_give_the_reference_drr_the_clinical_look():
    from DiffusionCore.volume import Volume
    from DiffusionCore.xray.evaluate import evaluate_xray
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    ref = Volume(_chest(40), spacing=(350.0 / 40,) * 3)
    gen = XrayToCTGenerator.tiny(0)
    kw = dict(num_stages=1, methods=("lifting-only",), device="cpu")
    plain = evaluate_xray(gen, ref, **kw)
    looked = evaluate_xray(gen, ref, look=CLINICAL_LOOK, **kw)
    assert "clinical look" in looked["settings"]["input"] and "clinical look" not in plain["settings"]["input"]
    # the lifting estimate reads the input: another input, another volume
    assert looked["results"][0]["psnr3d"] != plain["results"][0]["psnr3d"]


def test_the_clinical_look_experiment_is_the_ray_config_plus_the_processing_share():
    from dataclasses import asdict
    from pathlib import Path

    from DiffusionCore.xray.config import load_stage_config

    root = Path(__file__).resolve().parents[1]
    tried = asdict(load_stage_config(str(root / "benchmarks" / "xray_stage1_processing.json")))
    rays = asdict(load_stage_config(str(root / "benchmarks" / "xray_stage1_rays.json")))
    assert recipe_changes(tried, rays) == {"data.processing": (0.0, 0.5)}
