"""Stages 2-3 trained on a previous stage as wrong as on a CT it never saw (``data.prev_from_atlas``): the training CT
at the previous resolution made into another patient's, then made to re-project onto the DRR."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ct_phantom_array, recipe_changes

from DiffusionCore.errors import ConfigError
from DiffusionCore.intensity import hu_to_unit
from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
from DiffusionCore.xray.config import load_stage_config, tiny_stage_config
from DiffusionCore.xray.data import render_training_drr
from DiffusionCore.xray.pipeline import projection_error
from DiffusionCore.xray.train import previous_stage_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


def _cascade(**data) -> UnifiedHybridViTCascade:
    torch.manual_seed(0)
    s2 = tiny_stage_config(2, 32)
    s2 = replace(s2, data=replace(s2.data, prev_noise=0.0, **data))
    return UnifiedHybridViTCascade([tiny_stage_config(1, 16), s2])


def _phantom_batch(n: int = 3) -> tuple[dict[int, torch.Tensor], torch.Tensor, float]:
    """Cubes of n phantom CTs at 16^3 and 32^3 (model units) and the 32^3 cubes' DRRs."""
    hu = np.stack([ct_phantom_array((32, 32, 32), seed=s) for s in range(n)]).astype(np.float32)[:, None]
    fine = torch.from_numpy(hu)
    fov = tiny_stage_config(2, 32).data.fov_mm
    xray = render_training_drr(fine, fov, 32, "pa")
    fine_unit = hu_to_unit(fine)
    return {32: fine_unit, 16: torch.nn.functional.avg_pool3d(fine_unit, 2)}, xray, fov


def test_the_misregistered_previous_stage_is_another_anatomy_that_still_reprojects_onto_the_drr():
    vols, xray, fov = _phantom_batch()
    cascade = _cascade(prev_from_model=0.0, prev_from_atlas=1.0, atlas_blur_voxels=1.0, atlas_zoom=0.1,
                       atlas_shift_voxels=2.0, atlas_deform_voxels=1.5)  # fmt: skip
    torch.manual_seed(5)
    prev = previous_stage_volume(cascade, 2, vols, xray, 0.0)
    torch.manual_seed(5)
    again = previous_stage_volume(cascade, 2, vols, xray, 0.0)
    assert torch.equal(prev, again)  # drawn from the torch generator: the same seed, the same volumes
    assert prev.shape == vols[16].shape and torch.isfinite(prev).all()
    for i in range(prev.shape[0]):
        # not the truth: moved, zoomed, deformed and blurred, by a different draw for each sample
        assert float((prev[i] - vols[16][i]).abs().mean()) > 0.01
        # and yet its DRR agrees with the sample's own about as well as the truth's at this grid does (the moved
        # copy alone: 12-18 dB): what generation hands a later stage after the consistency step
        ceiling = projection_error(vols[16][i : i + 1], xray[i : i + 1], fov, "pa")["projection_psnr"]
        assert projection_error(prev[i : i + 1], xray[i : i + 1], fov, "pa")["projection_psnr"] > ceiling - 5
    assert not torch.allclose(prev[0] - vols[16][0], prev[1] - vols[16][1])


def test_the_shares_of_truth_model_and_misregistered_volumes():
    vols, xray, _ = _phantom_batch(8)
    truth_only = previous_stage_volume(_cascade(prev_from_model=0.0, prev_from_atlas=0.0), 2, vols, xray, 0.0)
    assert torch.equal(truth_only, vols[16])
    torch.manual_seed(3)
    mixed = previous_stage_volume(_cascade(prev_from_model=0.0, prev_from_atlas=0.5), 2, vols, xray, 0.0)
    from_truth = sum(torch.equal(m, v) for m, v in zip(mixed, vols[16]))
    assert 0 < from_truth < 8  # some samples keep the truth, the others are misregistered


def test_the_share_is_checked():
    s2 = tiny_stage_config(2, 32)
    with pytest.raises(ConfigError, match="prev_from_atlas"):
        replace(s2, data=replace(s2.data, prev_from_model=0.5, prev_from_atlas=0.75))
    s1 = tiny_stage_config(1, 16)
    with pytest.raises(ConfigError, match="stages 2-3"):
        replace(s1, data=replace(s1.data, prev_from_atlas=0.5))


def test_the_misregistered_recipe_is_the_stage_two_recipe_plus_its_data_keys():
    base = asdict(load_stage_config("stage2_cpu"))
    tried = asdict(load_stage_config(str(ROOT / "benchmarks" / "xray_stage2_misregistered.json")))
    assert recipe_changes(tried, base) == {
        "data.prev_from_model": (0.5, 0.25),
        "data.prev_from_atlas": (0.0, 0.75),
        "data.atlas_blur_voxels": (2.0, 2.5),
        "data.atlas_zoom": (0.08, 0.15),
        "data.atlas_shift_voxels": (2.0, 5.0),
        "data.atlas_deform_voxels": (1.5, 4.0),
    }
