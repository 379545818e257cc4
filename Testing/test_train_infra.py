"""Training infrastructure: distributed helpers, clean stop, metrics log, data discovery, augmentation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from DiffusionCore.devices import resolve_device, shard_list
from DiffusionCore.errors import ConfigError, InputError, ResourceError
from DiffusionCore.inputs import collect_volumes
from DiffusionCore.train.augment import (
    AugmentConfig,
    Augmenter,
    apply_affine,
    elastic,
    hu_jitter,
    random_crop,
    random_crop_box,
    random_flip,
)
from DiffusionCore.train.distributed import (
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    wrap_model,
)
from DiffusionCore.train.logger import TrainLogger, read_metrics
from DiffusionCore.train.stop import StopFlag
from DiffusionCore.volume import Volume, read_volume, write_volume

# ---------------------------------------------------------------------------------------------- distributed


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.device) == (0, 1, True, torch.device("cpu"))
    model = nn.Linear(2, 1)
    assert wrap_model(model, info) is model
    assert shard_list([1, 2, 3], info) == [1, 2, 3]
    assert all_reduce_mean(2.5, info) == 2.5
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_mean(t, info) is t
    barrier(info)
    cleanup(info)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ResourceError, match="no CUDA GPU"):
            resolve_device("cuda")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_group_averages_and_syncs(tmp_path):
    """Two processes started as torchrun would (RANK/WORLD_SIZE/MASTER_* env) train one DDP step."""
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            import torch
            from torch import nn
            from DiffusionCore.devices import shard_list
            from DiffusionCore.train.distributed import (
                all_reduce_mean, barrier, cleanup, init_distributed, wrap_model)

            info = init_distributed("cpu")
            torch.manual_seed(0)
            model = wrap_model(nn.Linear(3, 1), info)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            x = torch.full((4, 3), float(info.rank + 1))  # different data on each rank
            model(x).sum().backward()
            opt.step()
            result = {
                "rank": info.rank,
                "world_size": info.world_size,
                "is_main": info.is_main,
                "mean_float": all_reduce_mean(float(info.rank + 1), info),
                "mean_tensor": all_reduce_mean(torch.tensor([2.0 * info.rank, 1.0]), info).tolist(),
                "shard": shard_list(list(range(5)), info),
                "weight": model.module.weight.detach().flatten().tolist(),
                "wrapped": type(model).__name__,
            }
            barrier(info)
            cleanup(info)
            with open(sys.argv[1], "w") as f:
                json.dump(result, f)
            """
        )
    )
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path / f"rank{rank}.json")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (r0["world_size"], r0["is_main"], r1["is_main"]) == (2, True, False)
    assert r0["mean_float"] == r1["mean_float"] == 1.5
    assert r0["mean_tensor"] == r1["mean_tensor"] == [1.0, 1.0]
    assert r0["shard"] == [0, 2, 4] and r1["shard"] == [1, 3]
    assert r0["wrapped"] == "DistributedDataParallel"
    # DDP averaged the gradients, so both ranks hold the same weights after a step on different data:
    # grad of sum(w.x) over 4 rows is 4 * x, averaged over ranks 4 * 1.5 = 6.
    assert r0["weight"] == r1["weight"]
    torch.manual_seed(0)
    initial = nn.Linear(3, 1).weight.detach().flatten()
    assert torch.allclose(torch.tensor(r0["weight"]), initial - 0.1 * 6.0)


# ---------------------------------------------------------------------------------------------- stop


def test_sigterm_requests_a_clean_stop_in_a_real_process(tmp_path):
    script = textwrap.dedent(
        """
        import signal, time
        from DiffusionCore.train.stop import StopFlag
        steps = 0
        with StopFlag() as stop:
            print("ready", flush=True)
            while not stop.requested:
                steps += 1
                time.sleep(0.01)
            print("checkpoint written after", steps, "steps; reason:", stop.reason, flush=True)
        print("handler restored:", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "reason: SIGTERM" in out and "handler restored: True" in out


def test_stop_file_and_second_signal():
    previous = signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second one aborts at once
    assert signal.getsignal(signal.SIGINT) is previous


def test_stop_file(tmp_path):
    stop_file = tmp_path / "STOP"
    with StopFlag(stop_file=stop_file) as stop:
        assert not stop.requested
        stop_file.touch()
        assert stop.requested and "STOP" in stop.reason
        stop.clear_stop_file()
    assert not stop_file.exists()


# ---------------------------------------------------------------------------------------------- logger


def test_logger_writes_metrics_jsonl_and_tensorboard(tmp_path):
    with TrainLogger(tmp_path / "run") as log:
        log.scalar("loss/train", 0.5, step=1)
        log.scalar("loss/train", torch.tensor(0.25), step=2)
        log.scalars({"lr": 1e-4, "loss/val": float("nan")}, step=2)
        log.image("sample/axial", np.random.default_rng(0).normal(size=(16, 16)), step=2)
        has_tb = log.tensorboard
    records = read_metrics(tmp_path / "run")
    assert [(r["step"], r["tag"], r["value"]) for r in records] == [
        (1, "loss/train", 0.5),
        (2, "loss/train", 0.25),
        (2, "lr", 1e-4),
        (2, "loss/val", "nan"),
    ]
    assert all(isinstance(r["time"], float) for r in records)
    if has_tb:
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="image must be"):
        TrainLogger(tmp_path / "x").image("bad", np.zeros((2, 4, 4)), 0)


def test_resumed_logger_drops_records_after_the_checkpoint(tmp_path):
    with TrainLogger(tmp_path) as log:
        for step in range(1, 6):
            log.scalar("loss", 1.0 / step, step)
    with TrainLogger(tmp_path, resume_step=3) as log:  # the run died after step 5, resumed from step 3
        log.scalar("loss", 0.3, 4)
    assert [(r["step"], r["value"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 0.5),
        (3, 1 / 3),
        (4, 0.3),
    ]


def test_disabled_logger_writes_nothing(tmp_path):
    log = TrainLogger(tmp_path / "rank1", enabled=False)
    log.scalar("loss", 1.0, 0)
    log.close()
    assert not (tmp_path / "rank1").exists()


# ---------------------------------------------------------------------------------------------- data


def _tiny_volume(value: float = 0.0) -> Volume:
    arr = np.full((4, 6, 6), value, dtype=np.float32)
    return Volume(arr, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))


def _write_dicom_slices(folder, n=3, suffix=".dcm", modality="CT", image_type="ORIGINAL\\PRIMARY\\AXIAL"):
    """A real DICOM series: n slices (CT by default), 2 mm apart, sharing one SeriesInstanceUID."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(n):
        img = sitk.GetImageFromArray(np.full((1, 6, 6), 40 * k, dtype=np.int16))
        for tag, value in {
            "0008|0060": modality,
            "0008|0008": image_type,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.2.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{2.0 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "1\\1",
        }.items():
            img.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k}{suffix}"))
        writer.Execute(img)


def test_collect_volumes_from_folder_list_file_and_list(tmp_path):
    data = tmp_path / "data"
    for sub in ("nested", ".hidden"):
        (data / sub).mkdir(parents=True)
    write_volume(_tiny_volume(), data / "a.nii.gz")
    write_volume(_tiny_volume(), data / "nested" / "b.nrrd")
    write_volume(_tiny_volume(), data / "nested" / "c.mha")
    _write_dicom_slices(data / "patient1" / "series1")
    (data / "notes.txt").write_text("not a volume")
    write_volume(_tiny_volume(), data / ".hidden" / "d.nii")
    found = collect_volumes(data)
    assert found == [
        data / "a.nii.gz",
        data / "nested" / "b.nrrd",
        data / "nested" / "c.mha",
        data / "patient1" / "series1",
    ]
    for p in found:
        assert read_volume(p, check=False).array.ndim == 3
    assert read_volume(data / "patient1" / "series1", check=False).shape == (3, 6, 6)

    listing = tmp_path / "train.txt"
    listing.write_text("# training cases\ndata/a.nii.gz\n\ndata/patient1/series1  # DICOM\n")
    assert collect_volumes(listing) == [data / "a.nii.gz", data / "patient1" / "series1"]
    assert collect_volumes([data / "nested" / "c.mha", str(data / "a.nii.gz"), data / "a.nii.gz"]) == [
        data / "nested" / "c.mha",
        data / "a.nii.gz",
    ]


def test_collect_volumes_finds_dicom_without_suffix(tmp_path):
    _write_dicom_slices(tmp_path / "series", suffix=".dcm")
    for p in (tmp_path / "series").iterdir():
        p.rename(p.with_suffix(""))
    assert collect_volumes(tmp_path) == [tmp_path / "series"]


def test_collect_volumes_passes_over_dicom_folders_that_hold_no_ct_series(tmp_path, diffusioncore_log):
    """A cohort's patient folders (LIDC-IDRI's, for one) hold radiographs, scouts and single images beside the CT
    series: training and batch `sr` use the CT series and say which folders they passed over, and why."""
    cohort = tmp_path / "cohort"
    _write_dicom_slices(cohort / "p1" / "ct")
    _write_dicom_slices(cohort / "p1" / "chest_radiograph", n=1, modality="CR", image_type="ORIGINAL\\PRIMARY")
    _write_dicom_slices(cohort / "p1" / "scout", n=2, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    _write_dicom_slices(cohort / "p1" / "one_slice", n=1)
    write_volume(_tiny_volume(), cohort / "p2.nii.gz")
    assert collect_volumes(cohort) == [cohort / "p2.nii.gz", cohort / "p1" / "ct"]
    said = " ".join(r.getMessage() for r in diffusioncore_log)
    assert "p1/chest_radiograph: its DICOM files are CR images, not a CT series" in said
    assert "p1/scout: its DICOM files are CT localizers (topograms or scouts)" in said
    assert "p1/one_slice: its DICOM files are a single image, not a series of slices" in said
    with pytest.raises(InputError, match=r"no CT volumes found in .*chest_radiograph \(.*chest_radiograph holds CR images\)"):
        collect_volumes(cohort / "p1" / "chest_radiograph")


def test_training_passes_over_cohort_series_that_cannot_be_read_as_one_volume(tmp_path, diffusioncore_log):
    """A cohort holds a few CT series that are not one regular volume (a missing slice, two slice spacings): reading
    refuses them, and training passes over each with a warning saying why, as it passes over folders that hold no
    CT series, instead of stopping at the first. With none readable it stops and lists why; a volume file that
    cannot be read still stops the run with its own error."""
    from conftest import passed_over, write_cohort_with_unreadable_series, write_dicom_series

    from DiffusionCore.inputs import readable_volumes
    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig, load_sources

    cohort = tmp_path / "cohort"
    written = write_cohort_with_unreadable_series(cohort)
    paths = collect_volumes(cohort)
    assert paths == written
    assert [p for p, _ in readable_volumes(paths)] == [cohort / "p1" / "ct"]
    said = passed_over(diffusioncore_log)
    assert len(said) == 2 and "p2/ct" in said[0] and "missing slices" in said[0]
    assert "p3/ct" in said[1] and "are not evenly spaced: 2.50 mm apart" in said[1]
    train, val = load_sources(paths, ThroughPlaneTrainConfig())  # the shipped predictor's trainer reads through it
    # named apart from the other volumes called "ct" that were found (and passed over), as the log names them
    assert [s.name for s in train] == ["p1/ct"] and train[0].array.shape == (12, 16, 16)
    with pytest.raises(InputError, match=r"none of the CT volumes could be read: .*p2/ct: .*missing slices.*; .*p3/ct"):
        list(readable_volumes(paths[1:]))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    with pytest.raises(InputError, match="broken.nii.gz"):
        list(readable_volumes([broken, *paths]))

    # a series too short to hold out test and validation slices (a scout of 3 slices) is passed over the same way;
    # named on the command line as a file, it stops the run with its name
    scout = Volume(np.full((3, 16, 16), 40.0, np.float32), (0.8, 0.8, 2.5))
    write_dicom_series(cohort / "p4" / "scout", scout, series_uid="1.2.826.0.1.3680043.8.498.14")
    diffusioncore_log.clear()
    train, _ = load_sources([*paths, cohort / "p4" / "scout"], ThroughPlaneTrainConfig())
    assert [s.name for s in train] == ["p1/ct"]
    assert any("p4/scout" in said and "3 slices is too short" in said for said in passed_over(diffusioncore_log))
    with pytest.raises(InputError, match=r"none of the CT volumes is long enough to train on: .*p4/scout"):
        load_sources([cohort / "p4" / "scout"], ThroughPlaneTrainConfig())
    write_volume(scout, tmp_path / "scout.nrrd")
    with pytest.raises(InputError, match=r"scout.nrrd: a volume with 3 slices is too short .*leave it out of --data"):
        load_sources([tmp_path / "scout.nrrd", *paths], ThroughPlaneTrainConfig())


def test_collect_volumes_errors(tmp_path):
    from DiffusionCore.inputs import readable_volumes

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no CT volumes found in .*empty"):
        collect_volumes(empty)
    with pytest.raises(InputError, match="does not exist"):
        collect_volumes(tmp_path / "missing")
    listing = tmp_path / "list.txt"
    listing.write_text("nope.nii.gz\n")
    # a missing entry is kept, as an unreadable one is: named now, then refused when read (train) or passed over
    # (sr, evaluate); a missing INPUT itself (above) is still refused at once
    assert collect_volumes(listing) == [tmp_path / "nope.nii.gz"]
    with pytest.raises(InputError, match=r"nope.nii.gz does not exist"):
        list(readable_volumes(collect_volumes(listing)))
    with pytest.raises(InputError, match="no training data"):
        collect_volumes([])


# ---------------------------------------------------------------------------------------------- augment


def _ramp(shape=(12, 14, 16)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_random_crop_is_a_window_of_the_input_or_padded():
    arr = _ramp()
    rng = np.random.default_rng(0)
    box = random_crop_box(arr.shape, (4, 5, 6), np.random.default_rng(0))
    crop = random_crop(arr, (4, 5, 6), rng)
    assert crop.shape == (4, 5, 6) and np.array_equal(crop, arr[box])
    small = random_crop(np.zeros((2, 3, 4), np.float32), (4, 5, 6), rng, pad_value=-1024.0)
    assert small.shape == (4, 5, 6)
    assert np.count_nonzero(small == 0.0) == 2 * 3 * 4 and np.count_nonzero(small == -1024.0) == 120 - 24


def test_flip_flips_only_the_requested_axes():
    arr = _ramp()
    for seed in range(6):
        out = random_flip(arr, np.random.default_rng(seed), axes=(2,), p=0.5)
        assert np.array_equal(out, arr) or np.array_equal(out, arr[:, :, ::-1])
    assert np.array_equal(random_flip(arr, np.random.default_rng(0), axes=(0, 1), p=1.0), arr[::-1, ::-1])


def test_affine_geometry():
    arr = _ramp((5, 9, 9))
    assert np.allclose(apply_affine(arr, (0, 0, 0), 1.0), arr)
    # 90 degrees within the axial plane is an exact array rotation.
    assert np.allclose(
        apply_affine(arr, (90, 0, 0), 1.0, order=1), np.rot90(arr, k=1, axes=(1, 2)), atol=1e-3
    )
    # Zooming by 1.25 enlarges a centred ball's volume by 1.25^3.
    z, y, x = np.mgrid[:31, :31, :31] - 15.0
    ball = ((z**2 + y**2 + x**2) <= 8.0**2).astype(np.float32)
    zoomed = apply_affine(ball, (0, 0, 0), 1.25, order=0, pad_value=0.0)
    assert zoomed.sum() / ball.sum() == pytest.approx(1.25**3, rel=0.08)
    # A rotation in millimetres keeps an anisotropic ball (3 mm slices) a ball: its voxel count is kept.
    z2, y2, x2 = np.mgrid[:21, :41, :41]
    aniso = (((z2 - 10) * 3.0) ** 2 + (y2 - 20.0) ** 2 + (x2 - 20.0) ** 2 <= 15.0**2).astype(np.float32)
    turned = apply_affine(aniso, (0, 30, 0), 1.0, spacing_zyx=(3.0, 1.0, 1.0), order=0, pad_value=0.0)
    assert turned.sum() == pytest.approx(aniso.sum(), rel=0.05)


def test_elastic_displacement_has_the_requested_size():
    shape = (24, 24, 24)
    x_coord = np.broadcast_to(np.arange(24, dtype=np.float32), shape).copy()
    assert np.allclose(elastic(x_coord, np.random.default_rng(0), sigma=3.0, alpha=0.0), x_coord)
    warped = elastic(x_coord, np.random.default_rng(0), sigma=3.0, alpha=1.0)
    # On a ramp of the x index, linear interpolation returns the sampled x: the output is x + dx.
    interior = (slice(4, -4),) * 3
    shift = (warped - x_coord)[interior]
    assert np.abs(shift).max() <= 3.0 + 1e-4
    assert 0.5 < shift.std() < 1.5
    # Smooth: neighbouring voxels move almost together.
    assert np.abs(np.diff(shift, axis=2)).mean() < 0.5 * np.abs(shift).mean()


def test_hu_jitter_is_a_bounded_linear_change():
    arr = np.linspace(-1000, 1000, 27, dtype=np.float32).reshape(3, 3, 3)
    out = hu_jitter(arr, np.random.default_rng(3), scale=0.05, shift=10.0)
    a, b = np.polyfit(arr.ravel(), out.ravel(), 1)
    assert abs(a - 1) <= 0.05 + 1e-6 and abs(b) <= 10.0 + 1e-3
    assert np.allclose(out, a * arr + b, atol=1e-2)


def test_augmenter_is_deterministic_and_keeps_shape():
    vol = np.random.default_rng(0).normal(0, 300, size=(20, 40, 40)).astype(np.float32)
    aug = Augmenter({"crop_size": [8, 16, 16], "affine_p": 1.0, "elastic_p": 1.0, "hu_p": 1.0})
    a = aug(vol, np.random.default_rng(7), spacing_zyx=(2.0, 1.0, 1.0))
    b = aug(vol, np.random.default_rng(7), spacing_zyx=(2.0, 1.0, 1.0))
    c = aug(vol, np.random.default_rng(8), spacing_zyx=(2.0, 1.0, 1.0))
    assert a.shape == (8, 16, 16) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # No padding from the rotation reaches the patch (the volume has no air, so -1024 would be padding).
    assert not np.any(a == -1024.0)
    # Channels are transformed together; tensors in, tensors out.
    stacked = torch.from_numpy(np.stack([vol, vol]))
    t = aug(stacked, np.random.default_rng(7))
    assert isinstance(t, torch.Tensor) and t.shape == (2, 8, 16, 16) and torch.equal(t[0], t[1])
    # With everything off, the augmenter is a pure random crop.
    plain = Augmenter(AugmentConfig(crop_size=(8, 16, 16), flip_p=0.0, affine_p=0.0, elastic_p=0.0, hu_p=0.0))
    rng = np.random.default_rng(1)
    rng.random(), rng.random()  # the augmenter draws its two geometric decisions first
    box = random_crop_box(vol.shape, (8, 16, 16), rng)
    assert np.array_equal(plain(vol, np.random.default_rng(1)), vol[box])
    with pytest.raises(ConfigError, match="probability"):
        Augmenter({"affine_p": 2.0})


def test_ema_averages_only_trained_weights_and_restores_them():
    from DiffusionCore.train.ema import ParameterEMA

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[1].requires_grad_(False)  # a frozen part is not averaged
    ema = ParameterEMA({"net": net}, decay=0.9)
    assert {k for k in ema.state_dict()} == {"net__0__weight", "net__0__bias", "num_updates"}
    start = net[0].weight.detach().clone()
    expected = start.clone()
    for n in range(30):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        d = min(0.9, (1 + n) / (10 + n))  # warm-up, then the configured decay
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        expected = d * expected + (1 - d) * net[0].weight.detach()
    assert int(ema.num_updates) == 30
    assert torch.allclose(ema.net__0__weight, expected, atol=1e-5)
    trained = net[0].weight.detach().clone()
    with ema.applied():
        assert torch.allclose(net[0].weight, expected, atol=1e-5)
    assert torch.equal(net[0].weight, trained)  # the trained weights come back
    # the state travels like a model's (exact resume)
    other = ParameterEMA({"net": net}, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.net__0__weight, ema.net__0__weight) and int(other.num_updates) == 30
    with pytest.raises(ValueError, match="decay"):
        ParameterEMA({"net": net}, decay=1.0)


def test_resuming_with_other_settings_is_named_setting_by_setting():
    from DiffusionCore.train.checkpoint import config_differences

    saved = {"learning_rate": 0.001, "model": {"channels": 32, "factors": [2, 4]}, "max_steps": 100, "seed": 1}
    same_run_longer = {**saved, "max_steps": 500, "seed": 0}  # how long and the seed are free to change
    assert config_differences(saved, same_run_longer) == []
    other = {"learning_rate": 0.0002, "model": {"channels": 32, "factors": [2, 3]}, "max_steps": 100, "amp": True}
    assert config_differences(saved, other) == [
        "amp: '(none)' -> True", "learning_rate: 0.001 -> 0.0002", "model.factors.1: 4 -> 3",
    ]  # fmt: skip
    assert config_differences({"factors": [2, 4]}, {"factors": [2]}) == ["factors: [2, 4] -> [2]"]
