"""One set of SR run settings (``DiffusionCore.sr.settings.SRRunSettings``) for the pipeline and its callers.

What a user relies on: a bad option is refused once, with the error (and exit code) the commands always gave;
settings passed as one object give the same output, bit for bit, as the same options passed by name; and the
``sr`` command, the Slicer batch CLI and the Slicer module's logic turn equivalent inputs into equal settings.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from DiffusionCore.cli import sr as sr_cli
from DiffusionCore.cli.main import build_parser as build_main_parser
from DiffusionCore.cli.main import main
from DiffusionCore.degrade import thin_grid
from DiffusionCore.errors import ConfigError, GeometryError
from DiffusionCore.sr.adapt import DEFAULT_ADAPT_STEPS, AdaptSettings
from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.sr.settings import SRRunSettings
from DiffusionCore.volume import Volume, write_volume

ROOT = Path(__file__).resolve().parents[1]


def thick_ct(shape=(4, 24, 32), spacing=(0.8, 0.8, 3.2), seed=0) -> Volume:
    """A small thick-slice CT-like volume: an elliptic body with a bright disc, smooth along z."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij"
    )
    arr = np.full(shape, -1000.0)
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1
    arr[body] = 40.0 + 300.0 * np.sin(2.5 * z[body] + x[body])
    arr[(x / 0.2) ** 2 + ((y - 0.3) / 0.2) ** 2 < 1] = 900.0
    arr += np.random.default_rng(seed).normal(0.0, 10.0, shape)
    return Volume(arr.astype(np.float32), spacing, (-12.5, 30.0, -100.0), np.eye(3))


def batch_script():
    """CTDiffusionSR/CLI/CTDiffusionSRBatch.py as a module (it is a script, not in a package)."""
    spec = importlib.util.spec_from_file_location(
        "sr_batch_cli", ROOT / "CTDiffusionSR" / "CLI" / "CTDiffusionSRBatch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- checks: once, with the commands' errors --------------------------------------------------------------
BAD = {
    "no steps": ({"steps": 0}, ConfigError, "the number of sampling steps must be at least 1; got 0"),
    "no samples": ({"num_samples": 0}, ConfigError, "num_samples must be at least 1; got 0"),
    "samples of the mean": ({"estimate": "mean", "num_samples": 2}, ConfigError, "--estimate sample --num-samples N"),
    "steps of the mean": ({"estimate": "mean", "steps": 4}, ConfigError, "a step count (4) applies to estimate"),
    "two-value patch": ({"patch_size": [8, 16]}, ConfigError, "patch size needs three positive values (D H W); got (8, 16)"),
    "negative overlap": ({"overlap": (1, -1, 0)}, ConfigError, "overlap needs three values of 0 or more (D H W); got (1, -1, 0)"),
    "no tile batch": ({"tile_batch": 0}, ConfigError, "tile batch must be 1 or more; got 0"),
    "factor and spacing": ({"factor": 2, "target_spacing": 1.0}, GeometryError, "give either a factor or a target spacing, not both."),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_settings_are_refused_when_built_and_by_run(case):
    options, error, message = BAD[case]
    with pytest.raises(error) as built:
        SRRunSettings(**options)
    assert message in str(built.value)
    with pytest.raises(error) as ran:  # the keyword form builds the same settings: the same refusal, no work
        SuperResolver.tiny_predictor().run(thick_ct(), **options)
    assert str(ran.value) == str(built.value)


def test_settings_are_frozen_normalised_and_checked_again_when_changed():
    settings = SRRunSettings(factor=2, patch_size=[8, 16, 16], overlap=[2, 4, 4])
    assert settings.patch_size == (8, 16, 16) and settings.overlap == (2, 4, 4)  # lists from argparse
    assert settings == SRRunSettings(factor=2, patch_size=(8, 16, 16), overlap=(2, 4, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 3  # type: ignore[misc]
    assert settings.replace(seed=3).seed == 3 and settings.seed == 0
    with pytest.raises(GeometryError, match="not both"):
        settings.replace(target_spacing=1.0)
    assert SRRunSettings.of(None, {"seed": 2}) == SRRunSettings(seed=2)
    assert SRRunSettings.of(settings, {}) is settings
    with pytest.raises(TypeError):
        SRRunSettings.of(settings, {"no_such_option": 1})
    with pytest.raises(TypeError):
        SRRunSettings.of({"factor": 2})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["--num-steps", "0"], 2, "error: the number of sampling steps must be at least 1; got 0"),
        (["--patch-size", "0", "16", "16"], 2, "error: patch size needs three positive values (D H W); got (0, 16, 16)"),
        (["--tile-batch", "0"], 2, "error: tile batch must be 1 or more; got 0"),
    ],
)  # fmt: skip
def test_the_sr_command_reports_bad_settings_before_any_work(tmp_path, capsys, argv, code, words):
    src, out = tmp_path / "thick.nii.gz", tmp_path / "thin.nii.gz"
    write_volume(thick_ct(), src)
    rc = main(["sr", str(src), str(out), "--tiny-test-model", "--progress", "none", *argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == code and errors == [words] and not out.exists()


def test_the_batch_cli_reports_bad_settings_before_reading_the_volume(tmp_path, capsys):
    batch = batch_script()
    out = tmp_path / "thin.nrrd"
    rc = batch.main(["--tinyTestModel", "--numSteps", "-1", str(tmp_path / "missing.nrrd"), str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and errors == ["error: the number of sampling steps must be at least 1; got -1"]


# -- one object or keywords: the same run ---------------------------------------------------------------
def _same_run(a: tuple[Volume, dict], b: tuple[Volume, dict]) -> None:
    (out_a, rep_a), (out_b, rep_b) = a, b
    assert out_a.array.dtype == out_b.array.dtype and np.array_equal(out_a.array, out_b.array)
    assert out_a.grid == out_b.grid
    assert rep_a["settings"] == rep_b["settings"] and rep_a["tiles"] == rep_b["tiles"]
    unc_a, unc_b = rep_a["uncertainty"], rep_b["uncertainty"]
    assert (unc_a is None) == (unc_b is None)
    if unc_a is not None:
        assert np.array_equal(unc_a.array, unc_b.array)


def test_run_with_settings_equals_run_with_keywords_bit_for_bit(one_torch_thread):
    vol = thick_ct()
    model = SuperResolver.tiny()
    options = {"factor": 2, "steps": 2, "num_samples": 2, "seed": 3, "device": "cpu", "patch_size": (8, 16, 16),
               "overlap": (2, 4, 4), "tile_batch": 2}  # fmt: skip
    steps: list[tuple[int, int, str]] = []
    by_object = model.run(vol, SRRunSettings(**options), progress=lambda d, t, m: steps.append((d, t, m)))
    by_name = model.run(vol, **options)
    _same_run(by_object, by_name)
    assert by_object[1]["uncertainty"] is not None and steps[-1][0] == steps[-1][1]
    # settings and keywords together: the keywords override the settings
    _same_run(model.run(vol, SRRunSettings(factor=2, seed=9), **{**options, "seed": 3}), by_name)


def test_predictor_runs_and_run_to_grid_take_the_same_settings(one_torch_thread):
    vol = thick_ct()
    predictor = SuperResolver.tiny_predictor()
    options = {"target_spacing": 1.6, "seed": 1, "device": "cpu", "adapt": AdaptSettings(seconds=0, steps=1)}
    _same_run(predictor.run(vol, SRRunSettings(**options)), predictor.run(vol, **options))
    grid = thin_grid(vol, 2, axis=0)
    on_grid = predictor.run_to_grid(vol, grid, SRRunSettings(factor=2, axis=0, device="cpu"))
    _same_run(on_grid, predictor.run_to_grid(vol, grid, factor=2, axis=0, device="cpu"))
    _same_run(on_grid, predictor.run(vol, factor=2, device="cpu"))  # the same thin grid, decided once
    with pytest.raises(ConfigError, match="axis"):
        predictor.run_to_grid(vol, grid, SRRunSettings(factor=2))


def test_weight_dependent_checks_stay_with_the_resolver():
    vol = thick_ct()
    with pytest.raises(ConfigError, match="through-plane predictor without a diffusion stage"):
        SuperResolver.tiny_predictor().run(vol, SRRunSettings(factor=2, steps=3))
    with pytest.raises(ConfigError, match="adaptation fine-tunes the through-plane predictor"):
        SuperResolver.tiny().run(vol, SRRunSettings(factor=2, adapt=AdaptSettings(seconds=1.0)))
    # the default adaptation is optional: weights with nothing to adapt run without it, and say so
    _, report = SuperResolver.tiny().run(vol, SRRunSettings(factor=2, adapt=AdaptSettings(optional=True)))
    assert report["predictor"]["adaptation"] == {"skipped": "no through-plane predictor in these weights", "steps": 0}


# -- the three callers build equal settings --------------------------------------------------------------
#: The same request as flags of ``sr``, flags of CTDiffusionSRBatch and fields of the Slicer module's SRSettings.
EQUIVALENT = [
    ([], [], {}),
    (
        ["--factor", "3", "--axis", "y", "--num-steps", "4", "--guidance-scale", "1.5", "--seed", "7", "--device",
         "cpu", "--patch-size", "16", "64", "64", "--overlap", "4", "8", "8", "--num-samples", "2",
         "--no-data-consistency", "--allow-non-ct", "--adapt", "30"],
        ["--factor", "3", "--axis", "y", "--numSteps", "4", "--guidanceScale", "1.5", "--seed", "7", "--device",
         "cpu", "--patchSize", "16,64,64", "--overlap", "4,8,8", "--numSamples", "2", "--noDataConsistency",
         "--allowNonCT", "--adaptSeconds", "30"],
        {"factor": 3, "axis": "y", "steps": 4, "guidance": 1.5, "seed": 7, "device": "cpu",
         "patch_size": (16, 64, 64), "overlap": (4, 8, 8), "num_samples": 2, "data_consistency": False,
         "allow_non_ct": True, "adapt_seconds": 30.0},
    ),
    (["--target-spacing", "1.25", "--axis", "x"], ["--targetSpacing", "1.25", "--axis", "x"],
     {"target_spacing": 1.25, "axis": "x"}),
]  # fmt: skip


@pytest.mark.parametrize("index", range(len(EQUIVALENT)))
def test_the_sr_command_and_the_batch_cli_build_equal_settings(index):
    sr_flags, batch_flags, _ = EQUIVALENT[index]
    from_cli = sr_cli.run_settings(
        build_main_parser().parse_args(["sr", "in.nii.gz", "out.nii.gz", *sr_flags])
    )
    batch = batch_script()
    recorded = batch.settings_from_args(
        batch.build_parser().parse_args([*batch_flags, "in.nrrd", "out.nrrd"])
    )
    from_batch = batch.run_settings(recorded)
    assert from_cli == from_batch
    assert isinstance(from_cli, SRRunSettings)
    if index == 0:  # adaptation is on by default in both, with the same step count
        assert from_cli.adapt == AdaptSettings() and from_cli.adapt.steps == DEFAULT_ADAPT_STEPS
    if index == 1:
        assert from_cli.adapt == AdaptSettings(seconds=30.0) and from_cli.patch_size == (16, 64, 64)


@pytest.mark.parametrize("index", range(len(EQUIVALENT)))
def test_the_slicer_logic_builds_the_settings_its_batch_cli_builds(index):
    pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side logic")
    for module_dir in (ROOT / "CTDiffusionSR",):
        if str(module_dir) not in sys.path:
            sys.path.insert(0, str(module_dir))
    from CTDiffusionSRLib.sr_logic import SRSettings

    sr_flags, _, fields = EQUIVALENT[index]
    settings = SRSettings(**fields)
    batch = batch_script()
    args = batch.build_parser().parse_args([*settings.cli_arguments(), "in.nrrd", "out.nrrd"])
    assert settings.run_settings() == batch.run_settings(batch.settings_from_args(args))
    from_cli = sr_cli.run_settings(
        build_main_parser().parse_args(["sr", "in.nii.gz", "out.nii.gz", *sr_flags])
    )
    assert settings.run_settings() == from_cli
