"""The shipped default X-ray-to-CT weights: registered, intact, used whenever no weights are named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ct_phantom_array

from DiffusionCore import demo, sampledata
from DiffusionCore.cli.main import main
from DiffusionCore.files import sha256_file
from DiffusionCore.provenance import read_provenance
from DiffusionCore.volume import Volume, read_volume, write_volume
from DiffusionCore.weights import list_weights
from DiffusionCore.xray.data import render_training_drr
from DiffusionCore.xray.pipeline import XrayToCTGenerator, default_weights_name

DEFAULT = "xray-default"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _entry() -> dict:
    bundled = [e for e in list_weights(family="xray") if e["source"] == "bundled"]
    assert [e["name"] for e in bundled] == [DEFAULT]
    return bundled[0]


def test_the_default_xray_weights_are_bundled_registered_and_intact():
    entry = _entry()
    assert entry["available"], "the weights file named in DiffusionCore/weights/registry.json is missing"
    assert sha256_file(entry["path"]) == entry["sha256"]
    assert entry["path"].stat().st_size < 20 * 2**20
    assert "model_cards/xray-default.md" in entry["model_card"]
    assert default_weights_name() == DEFAULT
    gen = XrayToCTGenerator.default()
    assert gen.weights_sha256 == entry["sha256"] and gen.num_stages >= 1
    assert all(torch.isfinite(v).all() for v in gen.cascade.state_dict().values() if v.is_floating_point())


def test_xray2ct_without_weights_uses_the_default(tmp_path):
    truth = ct_phantom_array((64, 64, 64), seed=6)
    drr = render_training_drr(torch.from_numpy(truth)[None, None], 350.0, 128, "pa")[0, 0].numpy()
    src, out, rep = tmp_path / "pa.mha", tmp_path / "ct.nii.gz", tmp_path / "report.json"
    write_volume(Volume(drr[None].astype(np.float32), (1.0, 1.0, 1.0)), src)
    rc = main(["xray2ct", str(src), str(out), "--num-stages", "1", "--steps", "2", "--num-samples", "1",
               "--report", str(rep), "--progress", "none"])  # fmt: skip
    assert rc == 0
    ct = read_volume(out)
    assert ct.shape == (64, 64, 64) and np.isfinite(ct.array).all()
    report = json.loads(rep.read_text())
    assert report["weights_sha256"] == _entry()["sha256"]
    assert report["stages"][0]["projection_psnr"] > 25  # the consistency step makes it re-project onto the input


def test_demo_xray_part_uses_the_default_and_draws_every_picture(tmp_path, monkeypatch):
    truth = ct_phantom_array((64, 64, 64), seed=7)
    ref = Volume(truth, (5.0, 5.0, 5.0))
    drr = render_training_drr(torch.from_numpy(truth)[None, None], 350.0, 128, "pa")[0, 0].numpy()
    pa = tmp_path / "pa.mha"
    write_volume(Volume(drr[None].astype(np.float32), (1.0, 1.0, 1.0)), pa)
    monkeypatch.setattr(sampledata, "fetch", lambda name, **kw: pa)
    summary: dict = {"notes": []}
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    demo._xray_part(tmp_path, ref, XrayToCTGenerator.from_pretrained(default_weights_name()), default_weights_name(),
                    "cpu", 1, {}, summary)
    rows = summary["xray_evaluation"]["results"]
    assert {r["method"] for r in rows} == {"model", "model-raw", "mean-ct", "lifting-only", "lifting+dc"}
    assert summary["xray_evaluation"]["settings"]["weights_sha256"] == _entry()["sha256"]
    for name in ("xray2ct_drr.png", "xray2ct_pa.png", "xray2ct_topogram.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    for name in ("xray2ct_pa.nii.gz", "xray2ct_topogram.nii.gz"):  # both real radiographs: PA and the AP topogram
        assert read_volume(tmp_path / name).shape == (64, 64, 64)
        # labelled synthetic as xray2ct labels its results (probe 24: the demo's files had no label)
        recorded = read_provenance(tmp_path / name)
        assert recorded is not None and recorded.task == "xray2ct" and recorded.input == pa.name
        assert recorded.weights == default_weights_name() and recorded.weights_sha256 == _entry()["sha256"]
    assert summary["xray_report"]["weights_sha256"] == summary["xray_topogram_report"]["weights_sha256"]


def test_train_xray_without_a_config_continues_the_shipped_weights(tmp_path, capsys):
    """The recipe of the shipped weights was a file under benchmarks/, which an installed extension does not have:
    `train xray --init-from xray-default` with any shipped config stopped on tensors of another shape. Without
    --config, train xray now uses that recipe (the package's stage1_default), so the weights continue."""
    from dataclasses import asdict

    from DiffusionCore.weights.registry import load_safetensors
    from DiffusionCore.xray.config import DEFAULT_CONFIG, load_stage_config

    # the preset is the shipped file's own stage config, every key (its start time too)
    assert asdict(load_stage_config(DEFAULT_CONFIG)) == asdict(XrayToCTGenerator.default().cascade.stages[0].cfg)
    ct = tmp_path / "ct.nii.gz"
    write_volume(Volume(ct_phantom_array((40, 96, 96), seed=3), (0.8, 0.8, 2.5)), ct)
    run = tmp_path / "run"
    rc = main(["train", "xray", "--data", str(ct), "--output-dir", str(run), "--max-steps", "1",
               "--init-from", DEFAULT])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    trained, _ = load_safetensors(run / "xray_cascade.safetensors")
    shipped, _ = load_safetensors(_entry()["path"])
    stage1 = [k for k in shipped if k.startswith("stages.0.")]
    assert stage1 and all(trained[k].shape == shipped[k].shape for k in stage1)
    moved = max(float((trained[k].float() - shipped[k].float()).abs().max()) for k in stage1)
    assert 0 < moved < 0.05  # one step away from the shipped tensors, not a new network
    # another recipe cannot take them, and the message names the one that can
    rc = main(["train", "xray", "--config", "stage1_cpu", "--data", str(ct), "--output-dir", str(tmp_path / "other"),
               "--max-steps", "1", "--init-from", DEFAULT])  # fmt: skip
    assert rc == 3 and "--config stage1_default" in capsys.readouterr().err


def test_the_generator_is_where_the_package_says():
    """The package's docstring sends an ML engineer to ``DiffusionCore.xray`` for the X-ray generator, as to
    ``DiffusionCore.sr`` for the super-resolver: both import from there."""
    import DiffusionCore
    from DiffusionCore.sr import SuperResolver
    from DiffusionCore.xray import XrayToCTGenerator as Generator

    assert Generator is XrayToCTGenerator
    assert "``XrayToCTGenerator`` (``DiffusionCore.xray``)" in DiffusionCore.__doc__
    assert SuperResolver.__module__ == "DiffusionCore.sr.pipeline"
