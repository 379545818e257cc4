"""The shipped default SR weights: registered, intact, used whenever no weights are named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from DiffusionCore import degrade, demo, sampledata, write_volume
from DiffusionCore.cli.main import main
from DiffusionCore.degrade import MAX_FACTOR
from DiffusionCore.files import sha256_file
from DiffusionCore.sr.adapt import DEFAULT_ADAPT_STEPS
from DiffusionCore.sr.pipeline import SuperResolver, default_weights_name
from DiffusionCore.volume import Volume, read_volume
from DiffusionCore.weights import list_weights

DEFAULT = "sr-default"


def test_the_default_sr_weights_are_bundled_registered_and_intact():
    bundled = [e for e in list_weights(family="sr") if e["source"] == "bundled"]
    assert [e["name"] for e in bundled] == [DEFAULT]
    entry = bundled[0]
    assert entry["available"], "the weights file named in DiffusionCore/weights/registry.json is missing"
    assert sha256_file(entry["path"]) == entry["sha256"]
    assert entry["path"].stat().st_size < 20 * 2**20  # small enough to ship in the repository
    assert "model_cards/sr-default.md" in entry["model_card"]
    assert default_weights_name() == DEFAULT


def test_the_default_is_a_finite_predictor_for_every_factor():
    resolver = SuperResolver.default()
    assert resolver.model is None and resolver.predictor is not None
    assert resolver.predictor.factors == list(range(2, MAX_FACTOR + 1))
    assert all(np.isfinite(v.numpy()).all() for v in resolver.predictor.state_dict().values())
    assert resolver.weights_sha256 == next(e["sha256"] for e in list_weights("sr") if e["name"] == DEFAULT)


def test_sr_without_weights_uses_the_default(tmp_path, make_phantom):
    thin = make_phantom(shape=(32, 48, 48), spacing=(0.8, 0.8, 1.0), seed=2)
    thick = degrade(thin, 4)
    src, out, rep = tmp_path / "thick.nii.gz", tmp_path / "thin.nii.gz", tmp_path / "report.json"
    write_volume(thick, src)
    rc = main(["sr", str(src), str(out), "--factor", "4", "--report", str(rep), "--progress", "none"])
    assert rc == 0
    result = read_volume(out)
    assert result.shape == (32, 48, 48) and np.isfinite(result.array).all()
    report = json.loads(rep.read_text())
    assert report["predictor"]["used"] and report["predictor"]["factor"] == 4
    assert report["settings"]["weights"] == DEFAULT
    assert report["weights_sha256"] == SuperResolver.default().weights_sha256
    assert report["consistency_psnr"] > 60  # thickened again, it reproduces its input
    # adapted to the scan first, by default, for the default (deterministic) number of steps
    adaptation = report["predictor"]["adaptation"]
    assert adaptation["steps"] == DEFAULT_ADAPT_STEPS and adaptation["skipped"] is None
    assert report["settings"]["adapt"] == {"seconds": 0.0, "steps": DEFAULT_ADAPT_STEPS, "steps_run": DEFAULT_ADAPT_STEPS}
    # --no-adapt: the weights as they are
    rc = main(["sr", str(src), str(out), "--factor", "4", "--report", str(rep), "--progress", "none", "--overwrite",
               "--no-adapt"])
    assert rc == 0
    report = json.loads(rep.read_text())
    assert report["predictor"]["adaptation"] is None and report["settings"]["adapt"] is None


@pytest.fixture
def local_samples(tmp_path, make_phantom, monkeypatch):
    thin = make_phantom(shape=(40, 32, 32), spacing=(0.8, 0.8, 1.0), seed=3)
    files = {"chest-lidc": tmp_path / "thin.nii.gz", "chest-dx": tmp_path / "thick.nii.gz"}
    write_volume(thin, files["chest-lidc"])
    write_volume(degrade(thin, 4), files["chest-dx"])
    monkeypatch.setattr(sampledata, "fetch", lambda name, **kw: files[name])
    return files


def test_demo_uses_the_default_with_adaptation_and_draws_sr_minus_cubic(local_samples, cache_home, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(demo, "DEMO_ADAPT_STEPS", 2)
    out = tmp_path / "demo"
    summary = demo.run_demo(out, skip_xray=True)
    methods = [r["method"] for r in summary["evaluation"]["results"]]
    assert methods == ["nearest", "linear", "cubic", "cubic+dc", "sr", "sr+adapt"]
    assert summary["sr_report"]["weights_sha256"] == SuperResolver.default().weights_sha256
    assert summary["sr_report"]["predictor"]["adaptation"]["steps"] == 2  # the SR volume is what `sr` gives
    assert (out / "chest-dx_sr_x4.nii.gz").exists()
    assert (out / "chest-dx_comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert isinstance(read_volume(out / "chest-dx_sr_x4.nii.gz"), Volume)
