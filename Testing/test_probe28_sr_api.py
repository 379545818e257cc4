"""The SR Python API as a researcher scripts it (probe 28): adaptation inside ``torch.no_grad()`` /
``torch.inference_mode()``, a diverging adaptation, the process-wide torch random stream, wrong types for ``adapt``
and ``AdaptSettings``, ``run_to_grid`` onto another in-plane grid, and options that predictor-only weights cannot use.
Each is a typed DiffusionCore error or a result with a note, never a raw traceback or a silent NaN volume.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ct_phantom_array

import DiffusionCore.sr.adapt as adapt_module
from DiffusionCore import ConfigError, GeometryError, NumericalError, Volume, degrade, evaluate
from DiffusionCore.sr.adapt import AdaptSettings
from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.volume import crop_slices

#: a short adaptation: a few steps on small batches (seconds on one CPU thread)
SHORT = {"steps": 3, "batch_size": 4, "check_pairs": 8}


@pytest.fixture(scope="module")
def resolver() -> SuperResolver:
    return SuperResolver.from_pretrained("sr-default")


@pytest.fixture(scope="module")
def reference() -> Volume:
    """A chest-like thin-slice phantom, 16 slices of 48x48 at 1 mm."""
    return Volume(ct_phantom_array((16, 48, 48), seed=3), (0.8, 0.8, 1.0), (-19.2, -19.2, 0.0))


@pytest.fixture(scope="module")
def thick(reference) -> Volume:
    return degrade(reference, 4, "z")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def run(resolver, thick, **options):
    return resolver.run(thick, factor=4, device="cpu", seed=0, **options)


# -- 1: the caller's grad mode ------------------------------------------------------------------------------------
def test_adaptation_inside_no_grad_and_inference_mode_trains_and_gives_the_same_volume(resolver, thick, reference):
    plain, report = run(resolver, thick, adapt=AdaptSettings(**SHORT))
    assert report["predictor"]["adaptation"]["steps"] == 3 and not report["predictor"]["adaptation"]["discarded"]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out, _ = run(resolver, thick, adapt=AdaptSettings(**SHORT))
        np.testing.assert_array_equal(out.array, plain.array)
    with torch.no_grad():  # evaluate's sr+adapt method runs the same adaptation
        result = evaluate(reference, 4, methods=["sr+adapt"], method_options={
            "resolver": resolver, "device": "cpu", "adapt": AdaptSettings(**SHORT)})["results"][0]  # fmt: skip
    assert np.isfinite(result["psnr_body"])


# -- 2: a diverging adaptation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("learning_rate", [10.0, 1e4], ids=["inf-loss", "nan-weights"])
def test_a_diverging_adaptation_is_discarded_with_a_warning_and_a_note(resolver, thick, learning_rate, caplog):
    unadapted, _ = run(resolver, thick)
    out, report = run(resolver, thick, adapt=AdaptSettings(**{**SHORT, "steps": 10}, learning_rate=learning_rate))
    np.testing.assert_array_equal(out.array, unadapted.array)  # the unadapted predictor's volume, no NaN
    record = report["settings"]["adapt"]
    assert "lower the learning rate" in record["discarded"]
    assert any("adaptation discarded" in note for note in report["notes"])
    assert any("adaptation discarded" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    done = report["predictor"]["adaptation"]
    assert done["discarded"] == record["discarded"]
    assert all(v is None or np.isfinite(v) for v in (done["loss_after"], done["gain_after_db"]))  # JSON, no NaN


def test_an_adaptation_that_ends_worse_on_its_check_batch_is_discarded(resolver, thick, monkeypatch):
    monkeypatch.setattr(adapt_module, "DISCARD_BELOW_DB", -1e9)  # any adapted network counts as worse
    unadapted, _ = run(resolver, thick)
    out, report = run(resolver, thick, adapt=AdaptSettings(**SHORT))
    np.testing.assert_array_equal(out.array, unadapted.array)
    assert "worse on the scan's check batch" in report["settings"]["adapt"]["discarded"]


def test_a_useful_adaptation_is_kept(resolver, thick):
    unadapted, _ = run(resolver, thick)
    out, report = run(resolver, thick, adapt=AdaptSettings(**SHORT))
    assert "discarded" not in report["settings"]["adapt"] and not report.get("notes")
    assert not np.array_equal(out.array, unadapted.array)


def test_a_result_with_nan_voxels_is_a_numerical_error(thick):
    broken = SuperResolver.tiny_predictor(seed=0)
    with torch.no_grad():
        next(broken.predictor.parameters()).fill_(float("nan"))
    with pytest.raises(NumericalError, match="NaN or infinite voxel"):
        run(broken, thick)


@pytest.mark.parametrize(("field", "value"), [
    ("batch_size", 0), ("batch_size", -3), ("batch_size", 2.5), ("check_pairs", 0), ("width", 0),
    ("thick_rows", 0), ("thick_rows", True), ("steps", 2.7), ("steps", True), ("steps", 0), ("seconds", "5"),
    ("learning_rate", "3e-4"),
])  # fmt: skip
def test_adapt_settings_refuse_wrong_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"AdaptSettings\.{field}\b"):
        AdaptSettings(**{field: value})


def test_adapt_settings_take_whole_numbers_given_as_floats():
    assert AdaptSettings(steps=2.0, batch_size=4.0).steps == 2 and isinstance(AdaptSettings(steps=2.0).steps, int)


# -- 3: torch's global random stream ------------------------------------------------------------------------------
def test_the_global_torch_random_stream_is_neither_reseeded_nor_rewound(resolver, thick):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    during = []

    def progress(done, total, message):
        if message.startswith("adapting"):
            during.append(torch.get_rng_state())

    first, report = resolver.run(thick, factor=4, device="cpu", seed=5, adapt=AdaptSettings(**SHORT),
                                 progress=progress)  # fmt: skip
    assert report["predictor"]["adaptation"]["steps"] == 3 and during
    assert all(torch.equal(s, state) for s in during), "the adaptation reseeded the process-wide generator"
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # another global state: the same volume for the same seed
    again, _ = resolver.run(thick, factor=4, device="cpu", seed=5, adapt=AdaptSettings(**SHORT))
    np.testing.assert_array_equal(first.array, again.array)


def test_tiny_predictor_leaves_the_global_random_stream_alone():
    torch.manual_seed(7)
    state = torch.get_rng_state()
    SuperResolver.tiny_predictor(seed=1)
    assert torch.equal(torch.get_rng_state(), state)


# -- 4: the type of adapt -----------------------------------------------------------------------------------------
def test_adapt_true_is_the_default_adaptation_and_false_none(resolver, thick, monkeypatch):
    monkeypatch.setattr(adapt_module, "DEFAULT_ADAPT_STEPS", 2)  # AdaptSettings() reads it: 2 steps, not 400
    _, report = run(resolver, thick, adapt=True)
    assert report["settings"]["adapt"] == {"seconds": 0.0, "steps": 2, "steps_run": 2}
    _, report = run(resolver, thick, adapt=False)
    assert report["settings"]["adapt"] is None and report["predictor"]["adaptation"] is None


@pytest.mark.parametrize("value", [{"steps": 2}, 5, "yes"], ids=["dict", "int", "str"])
def test_adapt_of_another_type_is_a_config_error_naming_adapt_settings(resolver, thick, value):
    with pytest.raises(ConfigError, match="adapt must be an AdaptSettings"):
        run(resolver, thick, adapt=value)


# -- 5, 6: run_to_grid's grid, options predictor-only weights cannot use ------------------------------------------
def test_run_to_grid_onto_another_in_plane_grid_is_a_geometry_error(resolver, thick, reference):
    other = crop_slices(crop_slices(reference, "y", 0, 32), "x", 0, 32).grid
    with pytest.raises(GeometryError, match="in-plane grid.*32 voxels along y where the input has 48"):
        resolver.run_to_grid(thick, other, axis="z", device="cpu")
    shifted = crop_slices(reference, "x", 2, 48).grid
    with pytest.raises(GeometryError, match="along x"):
        resolver.run_to_grid(thick, shifted, axis="z", device="cpu")
    out, _ = resolver.run_to_grid(thick, reference.grid, axis="z", factor=4, device="cpu")  # its own grid: runs
    assert out.grid == reference.grid


def test_an_unknown_estimate_is_a_config_error(resolver, thick):
    with pytest.raises(ConfigError, match="estimate 'median': use one of mean, sample"):
        run(resolver, thick, estimate="median")


def test_diffusion_options_unused_by_predictor_only_weights_are_noted(resolver, thick):
    plain, report = run(resolver, thick)
    assert not report.get("notes")
    out, report = run(resolver, thick, guidance=3.0, patch_size=(8, 64, 64))
    assert report["notes"] == ["guidance and patch_size have no effect with the weights sr-default: they act on the "
                               "latent diffusion stage alone, and these weights are a through-plane predictor "
                               "without one"]  # fmt: skip
    np.testing.assert_array_equal(out.array, plain.array)


@pytest.mark.parametrize("limit", [-5, 0, float("nan"), True, "1G"])
def test_a_memory_limit_that_is_not_a_positive_byte_count_is_a_config_error(resolver, thick, limit):
    with pytest.raises(ConfigError, match="memory limit must be a positive number of bytes"):
        run(resolver, thick, memory_limit=limit)


def test_from_pretrained_leaves_the_global_random_stream_alone():
    """Probe 47, finding 8: building the networks drew from torch's generator before the weights overwrote them, so
    a notebook that seeded torch and then loaded the model drew other numbers than one that loaded it first."""
    torch.manual_seed(7)
    state = torch.get_rng_state()
    SuperResolver.from_pretrained("sr-default")  # a through-plane predictor (the shipped weights)
    assert torch.equal(torch.get_rng_state(), state)


def test_from_pretrained_of_a_diffusion_model_leaves_the_global_random_stream_alone(tmp_path):
    from DiffusionCore.sr.model import SRModel

    path = tmp_path / "tiny-sr.safetensors"
    SRModel.tiny(seed=0).save(path)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    resolver = SuperResolver.from_pretrained(path, allow_unregistered=True)
    assert resolver.model is not None and torch.equal(torch.get_rng_state(), state)
