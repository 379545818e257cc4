"""``benchmarks/sr_adapt_ablation.py``: its pair variants change the pairs adaptation trains on, and only
inside the variant's run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array

from DiffusionCore.sr import adapt as adapt_module
from DiffusionCore.sr import planes
from DiffusionCore.sr.planes import PairSettings, PlaneSource, sample_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location(
        "sr_adapt_ablation", ROOT / "benchmarks" / "sr_adapt_ablation.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pairs(settings: PairSettings) -> np.ndarray:
    src = PlaneSource("scan", ct_phantom_array((12, 96, 96)), (5.0, 0.8, 0.8), thin_reference=False)
    return sample_pairs([src], 4, 8, settings, np.random.default_rng(3))[1]


def test_noise_and_profile_variants_change_in_plane_pairs_and_are_undone(ablation):
    settings = PairSettings(
        thick_rows=4, width=32, through_plane_probability=0.0, thick_mm=5.0, intensity_jitter=0.0
    )
    originals = planes.in_plane_pair, adapt_module.PairSettings, adapt_module.PlaneSource
    plain = _pairs(settings)
    with ablation.pair_variant(0.0, 30.0, 0.0, seed=0):
        noisy = _pairs(settings)
    with ablation.pair_variant(1.0, 0.0, 0.0, seed=0):
        blurred = _pairs(settings)
    # the same planes (same pair draws), plus noise of about 30 HU (model units: HU / 1536) / minus detail
    assert 0.5 * 30 / 1536 < float(np.std(noisy - plain)) < 2 * 30 / 1536
    rough = lambda a: float(np.abs(np.diff(a, axis=2)).mean())  # noqa: E731  (along the thick axis)
    assert rough(blurred) < rough(plain)
    # outside the block the pair maker is the package's own again
    np.testing.assert_array_equal(_pairs(settings), plain)
    assert (planes.in_plane_pair, adapt_module.PairSettings, adapt_module.PlaneSource) == originals


def test_zoom_variant_cuts_pairs_along_the_scans_own_slice_axis(ablation):
    with ablation.pair_variant(0.0, 0.0, 0.25, seed=0):
        src = adapt_module.PlaneSource(
            "scan", ct_phantom_array((40, 64, 64)), (5.0, 0.8, 0.8), thin_reference=False
        )
        settings = adapt_module.PairSettings(thick_rows=4, width=32, through_plane_probability=0.0)
    assert src.thin_reference and settings.through_plane_probability == 0.25
    assert adapt_module.PlaneSource is PlaneSource


def test_rehearsal_variant_mixes_real_through_plane_pairs_into_the_steps_only(ablation):
    scan = PlaneSource("scan", ct_phantom_array((12, 96, 96)), (5.0, 0.8, 0.8), thin_reference=False)
    thin_ct = np.full((80, 96, 96), 2500.0, dtype=np.float32)  # a thin-slice CT told apart by its values
    rehearse = [PlaneSource("thin", thin_ct, (1.25, 0.8, 0.8))]
    settings = PairSettings(thick_rows=4, width=32, through_plane_probability=0.0, thick_mm=5.0)
    rehearsed = lambda thin: (thin.reshape(len(thin), -1).mean(axis=1) > 0.9).sum()  # noqa: E731 (2500 HU: > 1)
    with ablation.pair_variant(0.0, 0.0, 0.0, seed=0, rehearsal=0.5, rehearsal_from=rehearse):
        rng = np.random.default_rng(5)
        check = adapt_module.sample_pairs([scan], 4, 32, settings, rng)[1]  # adaptation draws its check batch first
        steps = [adapt_module.sample_pairs([scan], 4, 16, settings, rng)[1] for _ in range(20)]
    assert rehearsed(check) == 0  # the check batch is the scan's own
    share = sum(rehearsed(s) for s in steps) / (16 * 20)
    assert 0.35 < share < 0.65 and all(s.shape == (16, 1, 16, 32) for s in steps)
    assert adapt_module.sample_pairs is sample_pairs  # undone outside the block
    with pytest.raises(SystemExit, match="--rehearsal-data"), ablation.pair_variant(0.0, 0.0, 0.0, 0, rehearsal=0.5):
        pass
