"""Probe 28's X-ray to CT findings from Python: the README's example passes the Radiograph (its array skipped the crop
and the grey-level matching a file gets, and nothing said so), a uniform grey image in [0, 1] is refused as blank,
``steps`` is checked like ``num_samples``, a caller's ``torch.set_default_dtype(torch.float64)`` changes nothing,
``view="ap"`` / ``"PA"`` mean the frontal view the docstring promises, a read-only array draws no torch warning and
``XrayToCTGenerator.tiny()`` leaves the caller's torch generator alone."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cr_radiograph

from DiffusionCore.errors import InputError
from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
from DiffusionCore.xray.config import tiny_stage_config
from DiffusionCore.xray.pipeline import ARRAY_INPUT_NOTE, XrayToCTGenerator
from DiffusionCore.xray.radiograph import Radiograph, read_radiograph, window_bounds

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def _image(seed: int = 0, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# -- 5. an array is taken as it is: the README passes the Radiograph, and the report says so for an array ------------
def test_the_readme_x_ray_example_passes_the_radiograph_not_its_array():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "XrayToCTGenerator" in b)
    assert ".array" not in block and "read_radiograph(fetch(" in block


def test_an_array_input_is_noted_and_a_file_radiograph_is_not(tmp_path):
    path = write_cr_radiograph(tmp_path / "cr.dcm")
    gen = XrayToCTGenerator.tiny()
    rad = read_radiograph(path)
    by_path, path_report = gen.run(str(path), device="cpu", steps=1)
    by_rad, rad_report = gen.run(rad, device="cpu", steps=1)
    _, array_report = gen.run(rad.array, device="cpu", steps=1)
    assert np.array_equal(by_path.array, by_rad.array)
    assert ARRAY_INPUT_NOTE not in path_report["notes"] and ARRAY_INPUT_NOTE not in rad_report["notes"]
    assert ARRAY_INPUT_NOTE in array_report["notes"]
    assert "not matched to the DRR style" in ARRAY_INPUT_NOTE and "read_radiograph(path)" in ARRAY_INPUT_NOTE
    doc = " ".join(XrayToCTGenerator.run.__doc__.split())
    assert "no crop to the exposed region and no style matching" in doc and "Pass an array only for a DRR" in doc


# -- 6. a uniform image, and steps -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, 0.25, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("shape", [(512, 512), (300, 200)])
def test_a_uniform_grey_image_in_0_1_is_refused_as_blank(value, shape):
    gen = XrayToCTGenerator.tiny()
    for image in (np.full(shape, value, np.float32), Radiograph(np.full(shape, value, np.float32), (0.5, 0.4))):
        with pytest.raises(InputError, match="the radiograph is blank: all its pixels have the same value"):
            gen.run(image, device="cpu", steps=1)


def test_window_bounds_takes_float32_rounding_as_equal():
    """What resizing made of a constant 0.5: two neighbouring float32 values."""
    noisy = np.full((64, 64), 0.5, np.float32)
    noisy[::2] = np.nextafter(np.float32(0.5), np.float32(1))
    with pytest.raises(InputError, match="is blank"):
        window_bounds(noisy)
    assert window_bounds(np.linspace(0.5, 0.5001, 64 * 64, dtype=np.float32).reshape(64, 64))[1] > 0.5


@pytest.mark.parametrize(("name", "value", "said"), [
    ("steps", -1, "steps must be at least 1; got -1"),
    ("steps", 0, "steps must be at least 1; got 0"),
    ("steps", 2.5, "steps must be a whole number of at least 1"),
    ("steps", True, "steps must be a whole number of at least 1"),
    ("steps", "2", "steps must be a whole number of at least 1"),
    ("num_samples", True, "num_samples must be a whole number of at least 1"),
    ("num_samples", 0, "num_samples must be at least 1; got 0"),
])  # fmt: skip
def test_steps_and_samples_are_checked(name, value, said):
    progress: list = []
    with pytest.raises(InputError, match=said):
        XrayToCTGenerator.tiny().run(_image(), device="cpu", progress=lambda *a: progress.append(a), **{name: value})
    assert progress == []  # refused before anything ran


def test_a_numpy_integer_step_count_is_taken():
    _, report = XrayToCTGenerator.tiny().run(_image(), device="cpu", steps=np.int64(1), num_stages=1)
    assert report["settings"]["steps"] == [1] and type(report["settings"]["steps"][0]) is int


# -- 8. torch's default type -----------------------------------------------------------------------------------------
def _atlas_cascade() -> UnifiedHybridViTCascade:
    """A tiny two-stage cascade with stage 1 on a registered atlas and a patched stage 2: the paths tiny() skips."""

    def cfg(stage: int, r: int, **model) -> object:
        c = tiny_stage_config(stage, r, refine_channels=4)
        return dataclasses.replace(c, model=dataclasses.replace(c.model, **model))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cascade = UnifiedHybridViTCascade([cfg(1, 16, atlas_prior=True, skip_sigma_data=0.5),
                                           cfg(2, 32, keep_coarse=True, inference_patch=16, patch_overlap=4)])  # fmt: skip
        cascade.set_mean_ct(torch.rand(1, 1, 16, 16, 16) * 2 - 1)
    return cascade


@pytest.mark.parametrize("variant", ["tiny", "atlas"])
def test_a_float64_default_dtype_gives_the_same_ct(variant, tmp_path):
    gen = XrayToCTGenerator.tiny() if variant == "tiny" else XrayToCTGenerator(_atlas_cascade())
    kw = {"device": "cpu", "seed": 3, "steps": 2, "lifting_start_t": 0.7}
    expected, _ = gen.run(_image(), **kw)
    weights = tmp_path / "cascade.safetensors"
    gen.cascade.save_pretrained(weights)
    torch.set_default_dtype(torch.float64)
    try:
        got, _ = gen.run(_image(), **kw)
        loaded = XrayToCTGenerator.from_pretrained(weights, allow_unregistered=True)  # built under float64 too
        assert next(loaded.cascade.parameters()).dtype == torch.float32
        again, _ = loaded.run(_image(), **kw)
    finally:
        torch.set_default_dtype(torch.float32)
    assert np.array_equal(got.array, expected.array) and np.array_equal(again.array, expected.array)


# -- minor: view, a read-only array, tiny()'s generator --------------------------------------------------------------
def test_view_ap_and_any_case_mean_the_frontal_view():
    gen = XrayToCTGenerator.tiny()
    expected, _ = gen.run(_image(), device="cpu", steps=1, num_stages=1, view="pa")
    for view in ("ap", "AP", "PA", " Pa "):
        got, report = gen.run(_image(), device="cpu", steps=1, num_stages=1, view=view)
        assert report["settings"]["view"] == "pa" and np.array_equal(got.array, expected.array), view
    with pytest.raises(InputError, match="trained on pa radiographs, but --view lateral was given"):
        gen.run(_image(), device="cpu", steps=1, view="Lateral")
    with pytest.raises(InputError, match=r"view must be 'pa' \(any frontal view: PA and AP alike"):
        gen.run(_image(), device="cpu", steps=1, view="oblique")


def test_a_read_only_array_draws_no_torch_warning():
    image = _image(shape=(96, 80))
    image.flags.writeable = False
    before = image.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        XrayToCTGenerator.tiny().run(image, device="cpu", steps=1, num_stages=1)
    assert np.array_equal(image, before) and not image.flags.writeable


def test_tiny_leaves_the_global_generator_alone_and_keeps_its_weights():
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    made = XrayToCTGenerator.tiny(seed=2).cascade.state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.random.fork_rng(devices=[]):  # the weights as tiny() drew them before: the global seed, then the build
        torch.manual_seed(2)
        old = UnifiedHybridViTCascade([tiny_stage_config(1, 16), tiny_stage_config(2, 32)]).state_dict()
    assert made.keys() == old.keys() and all(torch.equal(made[k], old[k]) for k in made)


def test_from_pretrained_leaves_the_global_random_stream_alone():
    """Probe 47, finding 8: as ``tiny()`` already did, loading the shipped weights leaves torch's generator as the
    caller seeded it (the layers' default initialisation drew from it before the weights overwrote them)."""
    torch.manual_seed(11)
    state = torch.get_rng_state()
    XrayToCTGenerator.from_pretrained("xray-default")
    assert torch.equal(torch.get_rng_state(), state)
