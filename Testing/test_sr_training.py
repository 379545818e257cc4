"""SR training: learning, exact resume, DDP, cancel, the CLI end to end, latents, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from DiffusionCore.errors import Cancelled, ConfigError, InputError
from DiffusionCore.sr.config import tiny_config
from DiffusionCore.sr.data import degrade_and_interpolate, sample_batch, thin_coordinates
from DiffusionCore.sr.model import SRModel
from DiffusionCore.sr.training import SRObjective, set_stage, train_sr, train_vae
from DiffusionCore.volume import Volume, write_volume

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# Runs the real CLI entry point (error convention included) with the ``train`` command registered.
CLI = (
    "import sys; import DiffusionCore.cli.main as m; "
    "'train' in m.COMMAND_MODULES or m.COMMAND_MODULES.append('train'); sys.exit(m.main(sys.argv[1:]))"
)


def _phantom(seed: int = 0, shape=(40, 64, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    arr = np.full(shape, -1000.0, np.float32)
    for _ in range(14):
        c = rng.uniform([0, 0, 0], shape)
        r = rng.uniform(3, 10)
        arr[((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < r * r] = rng.uniform(-300, 1200)
    return arr


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vols")
    write_volume(Volume(_phantom(0), (0.7, 0.7, 1.0), (0, 0, 0), np.eye(3), {}), d / "a.nii.gz")
    return d


def _cfg(folder: Path, **train):
    cfg = tiny_config()
    t = cfg.train
    t.data = [str(folder)]
    t.patch_size = (8, 32, 32)
    t.batch_size = 1
    t.val_fraction = 0.3
    t.val_patches = 1
    t.val_every = 0
    t.checkpoint_every = 2
    t.factors = (2, 4)
    t.device = "cpu"
    t.log_every = 1
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


@pytest.fixture(scope="module")
def vae_dir(folder, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("vae")
    result = train_vae(_cfg(folder, max_steps=2, val_every=2), out_dir=out)
    assert result["steps"] == 2 and Path(result["weights"]).is_file()
    return out


@pytest.mark.parametrize("method", ["slab", "decimate"])
def test_training_degradation_equals_the_inference_path(method):
    """Training pairs are made exactly as inference sees thick input: degrade, then cubic onto thin_grid."""
    from DiffusionCore.degrade import degrade, thin_grid
    from DiffusionCore.interpolation import interpolate

    arr = _phantom(1, (16, 12, 10))
    vol = Volume(arr, (0.7, 0.7, 1.0), (3.0, -2.0, 5.0), np.eye(3), {})
    thick = degrade(vol, 4, "z", method)
    reference = interpolate(thick, thin_grid(thick, 4, axis="z"), "cubic").array
    if method == "slab":
        np.testing.assert_allclose(degrade_and_interpolate(arr, 4, method), reference, atol=1e-2)
    np.testing.assert_allclose(thin_coordinates(8, 4, "slab")[:2], [-0.375, -0.125])


def test_tiny_model_overfits_one_patch():
    torch.manual_seed(0)
    model = SRModel(tiny_config())
    set_stage(model, "joint")
    z, y, x = np.mgrid[:8, :32, :32].astype(np.float32)
    thin = (np.sin(z * 0.9) * np.cos(x * 0.3) * 0.5 + 0.1 * np.sin(y * 0.5)).astype(np.float32)
    cond = degrade_and_interpolate(thin, 4)
    with torch.no_grad():
        x0 = model.encode(torch.from_numpy(thin)[None, None])
        yl = model.encode(torch.from_numpy(cond)[None, None])
    objective = SRObjective(model, "joint")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        t = torch.randint(0, model.diffusion.num_steps, (1,), generator=g)
        loss = objective(x0, yl, t, torch.randn(x0.shape, generator=g), torch.ones(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) / 10


def test_pixel_loss_trains_the_decoder_on_the_output_image():
    """With the pixel loss the decoder gets gradients (encoder frozen) and the decoded output improves."""
    torch.manual_seed(0)
    model = SRModel(tiny_config())
    set_stage(model, "joint", finetune_decoder=True)
    assert all(p.requires_grad for p in model.vae.decoder.parameters())
    assert not any(p.requires_grad for p in model.vae.encoder.parameters())
    z, y, x = np.mgrid[:8, :32, :32].astype(np.float32)
    thin_np = (np.sin(z * 1.3) * np.cos(x * 0.3) * 0.5 + 0.1 * np.sin(y * 0.5)).astype(np.float32)
    thin = torch.from_numpy(thin_np)[None, None]
    cond = torch.from_numpy(degrade_and_interpolate(thin_np, 4))[None, None]
    with torch.no_grad():
        x0, yl = model.encode(thin), model.encode(cond)
    objective = SRObjective(model, "joint", pixel_weight=1.0)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3)
    g = torch.Generator().manual_seed(0)
    enc_before = {k: v.clone() for k, v in model.vae.encoder.state_dict().items()}

    def image_error() -> float:
        with torch.no_grad():
            out = model.super_resolve_patch(cond, steps=4, generator=torch.Generator().manual_seed(1))
        return float((out - thin).abs().mean())

    start = image_error()
    for _ in range(60):
        t = torch.randint(0, model.diffusion.num_steps, (1,), generator=g)
        loss = objective(x0, yl, t, torch.randn(x0.shape, generator=g), torch.ones(1), thin, cond)
        opt.zero_grad()
        loss.backward()
        assert model.vae.decoder.conv_out.weight.grad is not None
        opt.step()
    assert image_error() < 0.8 * start
    assert all(torch.equal(v, model.vae.encoder.state_dict()[k]) for k, v in enc_before.items())


def test_stages_freeze_the_right_parts():
    model = SRModel(tiny_config())
    set_stage(model, "control")
    assert not any(p.requires_grad for p in model.denoiser.unet.parameters())
    assert all(p.requires_grad for p in model.denoiser.controlnet.parameters())
    assert not any(p.requires_grad for p in model.vae.parameters())
    set_stage(model, "base")
    assert all(p.requires_grad for p in model.denoiser.unet.parameters())
    assert not any(p.requires_grad for p in model.denoiser.controlnet.parameters())


def test_batches_are_deterministic_and_in_range(folder):
    from DiffusionCore.sr.data import load_regions

    train, val = load_regions([str(folder)], [], 0.3)
    assert train[0].z1 == 28 and val[0].z0 == 28
    a = sample_batch(train, 2, (8, 32, 32), (2, 4), np.random.default_rng(3), inplane_probability=0.5)
    b = sample_batch(train, 2, (8, 32, 32), (2, 4), np.random.default_rng(3), inplane_probability=0.5)
    assert a[0].shape == (2, 1, 8, 32, 32) and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].min() >= -1.1 and a[0].max() <= 1.1


def test_resume_gives_the_same_next_step(folder, vae_dir, tmp_path):
    cfg = _cfg(folder, vae_weights=str(vae_dir), max_steps=2)
    train_sr(cfg, out_dir=tmp_path / "a")
    cfg.train.max_steps = 3
    resumed = train_sr(cfg, out_dir=tmp_path / "a", resume=True)
    straight = train_sr(_cfg(folder, vae_weights=str(vae_dir), max_steps=3), out_dir=tmp_path / "b")
    assert resumed["steps"] == straight["steps"] == 3
    wa = load_file(tmp_path / "a" / "checkpoint-00000003" / "denoiser.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoint-00000003" / "denoiser.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    changed = load_file(tmp_path / "a" / "checkpoint-00000002" / "denoiser.safetensors")
    assert any(not torch.equal(wa[k], changed[k]) for k in wa)
    # the weight average is part of the exact resume
    ea = load_file(tmp_path / "a" / "checkpoint-00000003" / "ema.safetensors")
    eb = load_file(tmp_path / "b" / "checkpoint-00000003" / "ema.safetensors")
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert int(ea["num_updates"]) == 3
    model = SRModel.from_pretrained(tmp_path / "a" / "sr_model.safetensors", allow_unregistered=True)
    assert model.config.diffusion.latent_scale == pytest.approx(cfg.diffusion.latent_scale)
    # the residual's size is measured from the data, kept across resume and export, and sizes the noise
    d = model.config.diffusion
    first = json.loads((tmp_path / "a" / "checkpoint-00000002" / "state.json").read_text())
    assert d.residual_std != 1.0 and 0 < d.residual_std < 1
    assert d.residual_std == pytest.approx(first["extra"]["residual_std"])
    assert model.diffusion.kappa == pytest.approx(d.kappa * d.residual_std)


def test_export_writes_the_weight_average_and_old_checkpoints_resume(folder, vae_dir, tmp_path):
    # a run without the average (as written before it existed), resumed with it
    train_sr(_cfg(folder, vae_weights=str(vae_dir), max_steps=2, ema_decay=0.0), out_dir=tmp_path)
    assert not (tmp_path / "checkpoint-00000002" / "ema.safetensors").exists()
    cfg = _cfg(folder, vae_weights=str(vae_dir), max_steps=4, ema_decay=0.5, learning_rate=1e-2)
    train_sr(cfg, out_dir=tmp_path, resume=True)
    ckpt = tmp_path / "checkpoint-00000004"
    raw = load_file(ckpt / "denoiser.safetensors")
    avg = load_file(ckpt / "ema.safetensors")
    exported = load_file(tmp_path / "sr_model.safetensors")
    key = "unet.conv_out.weight"
    assert not torch.equal(raw[key], avg[f"denoiser__{key.replace('.', '__')}"])
    assert torch.equal(exported[f"denoiser.{key}"], avg[f"denoiser__{key.replace('.', '__')}"])
    # frozen weights are not averaged: the VAE goes out as it came in
    assert not any(k.startswith("vae__") for k in avg)
    # the export says what it is, for `weights import` and `weights list`
    from DiffusionCore.weights.registry import read_safetensors_header

    _, meta = read_safetensors_header(tmp_path / "sr_model.safetensors")
    assert meta["description"] == "CT super-resolution, latent diffusion, trained with train sr for 4 steps"


def test_cancel_stops_training_with_a_checkpoint(folder, vae_dir, tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        train_sr(_cfg(folder, vae_weights=str(vae_dir), max_steps=5), out_dir=tmp_path, cancel=cancel)
    assert (tmp_path / "checkpoint-00000000" / "state.json").is_file()


def test_validation_reports_psnr_against_cubic(folder, vae_dir, tmp_path):
    cfg = _cfg(folder, vae_weights=str(vae_dir), max_steps=1, val_every=1)
    result = train_sr(cfg, out_dir=tmp_path)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tags = {m["tag"] for m in lines}
    assert {"val/psnr_sr", "val/psnr_cubic", "val/gain_db", "loss/train"} <= tags
    assert np.isfinite(result["cubic_psnr"]) and (tmp_path / "best.json").is_file()


def test_latents_roundtrip_and_latent_training(folder, vae_dir, tmp_path):
    from DiffusionCore.sr.latents import prepare_latents

    files = prepare_latents([str(folder)], vae_dir, tmp_path / "lat", factors=(4,), device="cpu")
    tensors = load_file(files[0])
    assert tensors["x0"].shape == (4, 40, 16, 16) and tensors["y"].shape == tensors["x0"].shape
    assert not torch.equal(tensors["x0"], tensors["y"])
    cfg = _cfg(folder, vae_weights=str(vae_dir), max_steps=1, latent_dir=str(tmp_path / "lat"))
    cfg.train.data = []
    assert train_sr(cfg, out_dir=tmp_path / "run")["steps"] == 1


def test_latent_training_data_passes_over_cohort_series_that_cannot_be_read(vae_dir, tmp_path, diffusioncore_log):
    """`train sr` and `prepare-latents` read a cohort as the through-plane trainer does: a series that is not one
    regular volume is passed over with a warning naming it, and the others are used."""
    from conftest import passed_over, write_cohort_with_unreadable_series

    from DiffusionCore.sr.data import load_regions
    from DiffusionCore.sr.latents import prepare_latents

    write_cohort_with_unreadable_series(tmp_path / "cohort")
    train, val = load_regions([str(tmp_path / "cohort")], [], val_fraction=0.0)
    assert [(r.name, r.z1 - r.z0) for r in train] == [(str(Path("p1", "ct")), 12)] and val == []  # told from p2/ct
    steps = []
    files = prepare_latents([str(tmp_path / "cohort")], vae_dir, tmp_path / "lat", factors=(4,), device="cpu",
                            progress=lambda done, total, _what: steps.append((done, total)))  # fmt: skip
    assert [f.name for f in files] == ["ct_x4.safetensors"]
    assert steps == [(1, 3), (3, 3)]  # the bar ends full although two series were passed over
    said = passed_over(diffusioncore_log)
    assert len(said) == 4 and all("p2/ct" in s or "p3/ct" in s for s in said)


def test_bad_inputs(folder, vae_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no CT volumes"):
        train_vae(_cfg(empty, max_steps=1), out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="vae"):
        train_sr(_cfg(folder, max_steps=1), out_dir=tmp_path / "y")
    with pytest.raises(ConfigError, match="multiple"):
        train_sr(_cfg(folder, vae_weights=str(vae_dir), patch_size=(8, 30, 32)), out_dir=tmp_path / "z")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"epochz": 3}}))
    proc = subprocess.run(
        [PY, "-c", CLI, "train", "sr", "--config", str(bad), "--out-dir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert proc.returncode == 2 and "epochz" in proc.stderr and "epochs" in proc.stderr


def test_cli_train_runs_end_to_end_and_resumes(folder, tmp_path):
    common = ["--data", str(folder), "--patch-size", "8", "32", "32", "--batch-size", "1", "--device", "cpu"]
    tiny = tmp_path / "tiny.json"
    cfg = tiny_config()
    tiny.write_text(
        json.dumps(
            {
                "vae": {"channels": list(cfg.vae.channels)},
                "unet": {"num_heads": 2},
                "diffusion": {"num_train_timesteps": 4, "num_inference_steps": 4},
                "train": {"val_patches": 1, "val_fraction": 0.3, "factors": [4]},
            }
        )
    )
    out_v, out_s = tmp_path / "vae", tmp_path / "sr"

    said = []

    def cli(*args):
        proc = subprocess.run([PY, "-c", CLI, *args], capture_output=True, text=True, env=ENV, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        said.append(proc.stderr)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cli(
        "train",
        "vae",
        "--config",
        str(tiny),
        *common,
        "--max-steps",
        "1",
        "--kl-weight",
        "1e-6",
        "--out-dir",
        str(out_v),
    )
    sr_args = [
        "train",
        "sr",
        "--config",
        str(tiny),
        *common,
        "--vae",
        str(out_v),
        "--model-channels",
        "16",
        "--num-train-timesteps",
        "4",
        "--no-cfg",
        "--ema-decay",
        "0.9",
        "--out-dir",
        str(out_s),
    ]
    first = cli(*sr_args, "--max-steps", "1")
    again = cli(*sr_args, "--max-steps", "2", "--resume")
    assert first["steps"] == 1 and again["steps"] == 2
    assert "differ from the run's" not in said[-1]  # the same settings (what training measured is not a change)
    assert (out_s / "checkpoint-00000002").is_dir() and (out_s / "sr_model.safetensors").is_file()
    exported = cli(
        "train", "export-sr", str(out_s), str(tmp_path / "d.safetensors"), "--component", "diffusion"
    )
    pair = SRModel.from_files(out_v / "vae.safetensors", exported["weights"], allow_unregistered=True)
    assert pair.config.unet.model_channels == 16 and pair.config.unet.cond_dropout == 0.0
    state = json.loads((out_s / "checkpoint-00000002" / "state.json").read_text())
    assert state["config"]["train"]["ema_decay"] == 0.9 and "ema.safetensors" in state["files"]


def test_two_process_ddp_step(folder, vae_dir, tmp_path):
    from DiffusionCore.config import config_to_dict

    cfg_file = tmp_path / "ddp.json"
    cfg_file.write_text(json.dumps(config_to_dict(_cfg(folder, vae_weights=str(vae_dir), max_steps=2))))
    script = tmp_path / "ddp_train.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from DiffusionCore.sr.training import train_sr\n"
        "train_sr(sys.argv[1], out_dir=sys.argv[2])\n"
    )
    proc = subprocess.run(
        [
            PY,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(script),
            str(cfg_file),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(s) for s in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["tag"] == "loss/train"] == [1, 2]
    assert (tmp_path / "out" / "checkpoint-00000002" / "denoiser.safetensors").is_file()


def test_shipped_configs_load_and_build():
    from DiffusionCore.sr.training import resolve_config

    folder = Path(__file__).resolve().parents[1] / "DiffusionCore" / "sr" / "configs"
    files = sorted(folder.glob("*.json"))
    assert {f.name for f in files} >= {"resshift_4step.json", "resshift_15step.json"}
    for f in files:
        cfg = resolve_config(f)
        assert SRModel(cfg).diffusion.num_steps == cfg.diffusion.num_train_timesteps


def test_validation_patches_fit_a_held_out_region_shorter_than_the_training_patch(folder, tmp_path):
    """`train vae --data chest-lidc chest-dx` with the default config stopped at once: the top 20% of a scan of 64
    or 133 slices (13, 27 slices) is shorter than the 32-slice training patch. A cohort of 100-slice scans stops the
    same way. Validation now uses shallower patches that fit, a multiple of the factors."""
    from DiffusionCore.sr.data import VolumeRegion, validation_depth

    cfg = _cfg(folder, max_steps=1, val_every=1, patch_size=(16, 32, 32), val_fraction=0.2)  # 8 of 40 slices held out
    train_vae(cfg, out_dir=tmp_path)
    metrics = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(m["tag"] == "val/psnr_recon" and np.isfinite(m["value"]) for m in metrics)
    arr = np.zeros((40, 8, 8), np.float32)
    regions = [VolumeRegion("a[val]", arr, 27, 40), VolumeRegion("b[val]", arr, 13, 40)]  # 13 and 27 slices
    assert validation_depth(regions, 32, (2, 4)) == 12 and validation_depth(regions, 8, (2, 4)) == 8
    assert validation_depth(regions, 32, (2, 4), multiple=8) == 8
    with pytest.raises(InputError, match=r"has 3 slices, too few .*val_fraction"):
        validation_depth([VolumeRegion("c[val]", arr, 37, 40)], 32, (2, 4))
