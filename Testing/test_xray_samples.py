"""X-ray to CT: several samples averaged per stage (the estimate of the most likely CT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ct_phantom_array

from DiffusionCore.errors import InputError
from DiffusionCore.xray.data import render_training_drr
from DiffusionCore.xray.pipeline import XrayToCTGenerator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _drr() -> np.ndarray:
    truth = ct_phantom_array((32, 32, 32), seed=5).astype(np.float32)
    return render_training_drr(torch.from_numpy(truth)[None, None], 350.0, 64, "pa")[0, 0].numpy()


def _tiny() -> XrayToCTGenerator:
    """The tiny test generator with its zero-initialised output layers perturbed, so samples differ."""
    gen = XrayToCTGenerator.tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.cascade.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return gen


def test_the_mean_of_samples_is_what_is_returned_and_reported():
    gen = _tiny()
    x = torch.from_numpy(_drr())[None, None]
    stages = gen.cascade.generate_stages(x, 1, steps=2, generator=torch.Generator().manual_seed(7), num_samples=3)
    g = torch.Generator().manual_seed(7)
    draws = [gen.cascade.stages[0].sample(x, None, steps=2, generator=g) for _ in range(3)]
    torch.testing.assert_close(stages[0], sum(draws) / 3)
    assert not torch.allclose(draws[0], draws[1])  # three different samples were averaged

    seen = []
    vol, report = gen.run(_drr(), device="cpu", steps=2, num_samples=3, consistency=False,
                          progress=lambda done, total, msg: seen.append((done, total)))  # fmt: skip
    assert report["settings"]["num_samples"] == [3, 3]
    assert [s["num_samples"] for s in report["stages"]] == [3, 3]
    assert seen[-1] == (55, 55)  # preparing 1, then 3 samples x 2 steps of stage 1 (1 each) and stage 2 (8 each)
    single, _ = gen.run(_drr(), device="cpu", steps=2, num_samples=1, consistency=False)
    assert not np.array_equal(vol.array, single.array)
    again, _ = gen.run(_drr(), device="cpu", steps=2, num_samples=3, consistency=False)
    np.testing.assert_array_equal(vol.array, again.array)  # same seed, same result


def test_the_default_comes_from_the_weights_config_and_zero_is_refused():
    gen = _tiny()
    _, report = gen.run(_drr(), device="cpu", steps=1)
    assert report["settings"]["num_samples"] == [c.diffusion.num_samples for c in gen.cascade.configs]
    with pytest.raises(InputError, match="num_samples"):
        gen.run(_drr(), device="cpu", steps=1, num_samples=0)


def test_stage_one_can_start_from_its_lifting_only_volume():
    """``diffusion.lifting_start_t`` < 1: DDIM starts at that t from the lifting-only volume plus noise (the
    diffusion refines the deterministic estimate) instead of from pure noise at t = 1."""
    from DiffusionCore.xray.vdiffusion import alpha_sigma, ddim_sample

    gen = _tiny()
    stage = gen.cascade.stages[0]
    x = torch.from_numpy(_drr())[None, None]
    from_noise = stage.sample(x, None, steps=3, generator=torch.Generator().manual_seed(3))
    stage.cfg.diffusion.lifting_start_t = 0.4
    refined = stage.sample(x, None, steps=3, generator=torch.Generator().manual_seed(3))
    r = stage.cfg.resolution
    noise = torch.randn(1, 1, r, r, r, generator=torch.Generator().manual_seed(3))
    a, s = alpha_sigma(torch.tensor(0.4))
    ctx = stage.condition(x, None)
    expected = ddim_sample(lambda v, t: stage.predict(v, t, ctx), a * stage.lifted_only(x) + s * noise, steps=3,
                           prediction="x0", t_start=0.4)  # fmt: skip
    torch.testing.assert_close(refined, expected)
    assert not torch.allclose(refined, from_noise)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, float("nan")])
def test_a_lifting_start_outside_zero_one_is_refused(value):
    from DiffusionCore.errors import ConfigError
    from DiffusionCore.xray.config import XrayDiffusionConfig, XrayStageConfig

    with pytest.raises(ConfigError, match="lifting_start_t"):
        XrayStageConfig(diffusion=XrayDiffusionConfig(lifting_start_t=value))


def test_a_run_chooses_its_lifting_start_and_reports_it():
    gen = _tiny()
    x = _drr()
    weights_own, report = gen.run(x, seed=1, device="cpu", steps=2, consistency=False)
    assert report["settings"]["lifting_start_t"] == 1.0  # the tiny weights start from noise
    same, _ = gen.run(x, seed=1, device="cpu", steps=2, consistency=False, lifting_start_t=1.0)
    refined, report = gen.run(x, seed=1, device="cpu", steps=2, consistency=False, lifting_start_t=0.5)
    assert np.array_equal(same.array, weights_own.array) and not np.array_equal(refined.array, same.array)
    assert report["settings"]["lifting_start_t"] == 0.5
    with pytest.raises(InputError, match="lifting start time"):
        gen.run(x, seed=1, device="cpu", steps=2, lifting_start_t=0.0)
