"""Exit codes and messages match the table in docs/reliability.md, and small failures leave nothing behind.

Each family is fixed where its mechanism lives, and tested here through the real command line (a subprocess:
its exit code and its single ``error:`` line) or the library where that is the natural level:

* network configurations (``DiffusionCore.nn.architecture``): empty channel lists, zero strides or heads and
  huge sizes are a ConfigError (exit 2) from a config file and a WeightsError (exit 3) from a weights file's
  metadata, before anything is allocated; tensors of another shape are one line;
* volume files (``DiffusionCore.volume``): a damaged compressed stream says "corrupt", a short one
  "truncated", a header that lies about compression says so; ITK's console output never reaches stderr;
  a DICOM slice of another size is named;
* the cache folder (``DIFFUSIONCORE_CACHE``), option lists (``--methods``), stage counts, stale temporary
  files, file permissions, the memory limit's scope, a corrupt cached sample, refused training runs.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ct_phantom_array, write_dicom_series
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from DiffusionCore import sampledata
from DiffusionCore.cli.common import run_guarded
from DiffusionCore.cli.main import main
from DiffusionCore.errors import ConfigError, InputError, WeightsError
from DiffusionCore.nn.architecture import MAX_PARAMETERS, build_checked, check_state_fits
from DiffusionCore.volume import Volume, read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "DiffusionCore" / "weights"


def cli(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                "DIFFUSIONCORE_CACHE": str(tmp / "cache"), **env}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "DiffusionCore", *args], capture_output=True, text=True, cwd=tmp,
                          env=full_env, timeout=120)  # fmt: skip


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line, checking that nothing else but ``warning:`` / ``info:`` lines reached stderr."""
    lines = proc.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    stray = [ln for ln in lines if not ln.startswith(("error:", "warning:", "info:", "usage:", " "))]
    assert not stray, proc.stderr[-3000:]
    return errors[0]


def tampered(src: Path, dst: Path, edit) -> Path:
    """A copy of a weights file whose metadata ``edit(meta)`` changed (its tensors untouched)."""
    with safe_open(str(src), "pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header["diffusioncore"])
    edit(meta)
    header["diffusioncore"] = json.dumps(meta)
    save_file(load_file(str(src)), str(dst), metadata=header)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from DiffusionCore.sr.model import SRModel

    d = tmp_path_factory.mktemp("errors")
    out = {"thick": write_volume(Volume(ct_phantom_array((4, 32, 32)), (0.8, 0.8, 3.2)), d / "thick.nii.gz")}
    sr = d / "sr.safetensors"
    SRModel.tiny().save(sr)
    out["sr"] = sr
    return out


# ---------------------------------------------------------------------------------------------- architectures
def _sr_config(**sections):
    def edit(meta):
        for section, values in sections.items():
            meta["config"][section].update(values)

    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_sr_config(unet={"num_heads": 0}), "unet.num_heads must be an integer >= 1; got 0"),
    (_sr_config(vae={"channels": []}), "vae.channels must list at least one size; got []"),
    (_sr_config(vae={"downsample": [[0, 2, 2], [1, 2, 2]]}), "vae.downsample[0][0] must be an integer >= 1; got 0"),
    (_sr_config(unet={"num_heads": 3}), "unet.num_heads (3) must divide"),
    (_sr_config(unet={"model_channels": 100_000}), "would have more than 2e+09 parameters"),
])  # fmt: skip
def test_sr_weights_whose_metadata_cannot_be_built_are_weights_errors(files, tmp_path, edit, message):
    from DiffusionCore.sr.model import SRModel
    from DiffusionCore.weights.registry import load_safetensors

    path = tampered(files["sr"], tmp_path / "w.safetensors", edit)
    tensors, meta = load_safetensors(path)
    with pytest.raises(WeightsError) as err:
        SRModel.from_state(meta["config"], tensors, source=str(path))
    text = str(err.value)
    assert message in text and "\n" not in text and "record an architecture that cannot be built" in text


def test_weights_asking_for_100000_channels_exit_3_not_5(files, tmp_path):
    path = tampered(files["sr"], tmp_path / "huge.safetensors", _sr_config(unet={"model_channels": 100_000}))
    proc = cli(["sr", str(files["thick"]), "out.nii.gz", "--weights", str(path), "--allow-unregistered-weights",
                "--progress", "none"], tmp_path)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "would have more than 2e+09 parameters" in error_line(proc)
    assert not (tmp_path / "out.nii.gz").exists()


def test_the_default_predictor_with_100000_channels_in_its_metadata_exits_3(files, tmp_path):
    def edit(meta):
        meta["config"]["throughplane"]["channels"] = 100_000

    path = tampered(WEIGHTS / "sr-default.safetensors", tmp_path / "tp.safetensors", edit)
    proc = cli(["sr", str(files["thick"]), "out.nii.gz", "--weights", str(path), "--allow-unregistered-weights",
                "--progress", "none"], tmp_path)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "the through-plane predictor would have more than" in error_line(proc)


def test_a_shape_mismatch_is_one_line(files, tmp_path):
    path = tampered(files["sr"], tmp_path / "shape.safetensors", _sr_config(unet={"model_channels": 8}))
    proc = cli(["sr", str(files["thick"]), "out.nii.gz", "--weights", str(path), "--allow-unregistered-weights",
                "--progress", "none"], tmp_path)  # fmt: skip
    assert proc.returncode == 3
    line = error_line(proc)
    assert "do not fit the architecture recorded in their own metadata" in line
    assert "tensor(s) of another shape (e.g. denoiser." in line and "in the file" in line
    assert len(proc.stderr.splitlines()) <= 3  # the unregistered-weights warning(s) and the error


@pytest.mark.parametrize(("edit", "message"), [
    ({"vit_heads": 0}, "model.vit_heads must be an integer >= 1; got 0"),
    ({"encoder_channels": []}, "model.encoder_channels must list at least one size"),
    ({"voxel_channels": 100_000}, "would have more than 2e+09 parameters"),
    ({"voxel_channels": 64}, "tensor(s) of another shape (e.g. stages.0."),
])  # fmt: skip
def test_xray_weights_whose_metadata_does_not_fit_are_weights_errors(tmp_path, edit, message):
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

    src = tmp_path / "x.safetensors"
    UnifiedHybridViTCascade.tiny(0, resolutions=(16,)).save_pretrained(src)
    path = tampered(src, tmp_path / "bad.safetensors", lambda meta: meta["configs"][0]["model"].update(edit))
    with pytest.raises(WeightsError, match=None) as err:
        UnifiedHybridViTCascade.from_pretrained(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_xray2ct_with_zero_heads_in_the_weights_exits_3(tmp_path):
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

    src = tmp_path / "x.safetensors"
    UnifiedHybridViTCascade.tiny(0, resolutions=(16,)).save_pretrained(src)
    path = tampered(
        src, tmp_path / "heads.safetensors", lambda meta: meta["configs"][0]["model"].update(vit_heads=0)
    )
    png = tmp_path / "chest.png"
    sitk.WriteImage(
        sitk.GetImageFromArray((np.random.default_rng(0).random((32, 32)) * 4000).astype(np.uint16)), str(png)
    )
    proc = cli(["xray2ct", str(png), "out.nii.gz", "--weights", str(path), "--allow-unregistered-weights",
                "--progress", "none"], tmp_path)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "model.vit_heads must be an integer >= 1; got 0" in error_line(proc)


@pytest.mark.parametrize(("config", "message"), [
    ({"vae": {"channels": []}}, "error: vae.channels must list at least one size; got []"),
    ({"vae": {"downsample": [[1, 2, 2], [1, 0, 2]]}}, "error: vae.downsample[1][1] must be an integer >= 1; got 0"),
])  # fmt: skip
def test_a_training_config_that_cannot_be_built_exits_2_and_leaves_nothing(tmp_path, config, message):
    data = write_volume(Volume(ct_phantom_array((24, 32, 32)), (0.8, 0.8, 1.0)), tmp_path / "thin.nii.gz")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    proc = cli(["train", "vae", "--config", str(cfg), "--data", str(data), "--out-dir", str(tmp_path / "run"),
                "--device", "cpu"], tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc) == message
    assert not (tmp_path / "run").exists()  # no metrics.jsonl, no tensorboard/, no empty folder


def test_a_training_run_refused_during_setup_leaves_no_logs(tmp_path):
    from DiffusionCore.train.logger import TrainLogger

    run = tmp_path / "run"
    run.mkdir()
    log = TrainLogger(run)  # a run whose setup then fails: nothing was logged, nothing is left
    log.close()
    assert list(run.iterdir()) == []
    with TrainLogger(run) as log:
        log.scalar("loss/train", 0.5, step=1)
    assert (run / "metrics.jsonl").is_file()


def test_xray_configs_are_checked_before_anything_divides_by_them():
    from DiffusionCore.config import config_to_dict
    from DiffusionCore.xray.config import XrayStageConfig, load_stage_config, tiny_stage_config

    base = config_to_dict(tiny_stage_config(1, 16))
    for key, value, message in [("vit_heads", 0, "model.vit_heads must be an integer >= 1"),
                                ("patch_size", 0, "model.patch_size must be an integer >= 1"),
                                ("vit_heads", 3, "model.vit_heads (3) must divide model.voxel_channels (16)"),
                                ("mlp_ratio", float("nan"), "model.mlp_ratio must be a finite number > 0")]:  # fmt: skip
        cfg = json.loads(json.dumps(base))
        cfg["model"][key] = value
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_stage_config(cfg)
    assert isinstance(load_stage_config(base), XrayStageConfig)


def test_the_size_limit_stops_before_allocating(monkeypatch):
    from DiffusionCore.nn import architecture

    with pytest.raises(ConfigError, match="more than 2e"):
        build_checked(
            lambda: torch.nn.Linear(100_000, 100_000), "a layer"
        )  # 1e10 values: refused unallocated
    monkeypatch.setattr(architecture, "MAX_TENSORS", 50)  # the same rule as 20000 tensors, faster to reach
    with pytest.raises(ConfigError, match="more than 50 weight tensors"):
        build_checked(lambda: torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(26)]), "a stack")
    assert MAX_PARAMETERS >= 10 * 40_000_000  # far above the shipped models
    layer = build_checked(lambda: torch.nn.Conv3d(2, 4, 3), "a layer")
    assert layer.weight.device.type == "cpu" and torch.isfinite(layer.weight).all()
    with pytest.raises(
        WeightsError, match=r"1 tensor\(s\) of another shape \(e.g. weight: \(4, 2\) in the file"
    ):
        check_state_fits({"weight": torch.zeros(2, 4)}, {"weight": torch.zeros(4, 2)}, "w.safetensors")


def test_every_error_is_one_line(capsys):
    def fails():
        raise WeightsError("first line\n\tsecond line\n\tthird line")

    def crashes():
        raise RuntimeError("Error(s) in loading state_dict:\n" + "\n".join(f"\tline {i}" for i in range(80)))

    assert run_guarded(fails) == 3
    assert run_guarded(crashes) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0] == "error: first line; second line; third line"
    assert lines[1].startswith("error: internal error (RuntimeError: Error(s) in loading state_dict:; line 0")


# ---------------------------------------------------------------------------------------------- volume files
def _mha(path: Path, compressed: bool) -> Path:
    img = Volume(ct_phantom_array((4, 32, 32)), (0.8, 0.8, 3.2)).to_sitk(np.int16)
    sitk.WriteImage(img, str(path), compressed)
    return path


def _flip(src: Path, dst: Path, at: int) -> Path:
    data = bytearray(src.read_bytes())
    data[at] ^= 0x10
    dst.write_bytes(bytes(data))
    return dst


def test_compressed_volumes_say_corrupt_truncated_or_lying_header(files, tmp_path):
    gz = files["thick"]
    size = gz.stat().st_size
    raw, comp = _mha(tmp_path / "raw.mha", False), _mha(tmp_path / "comp.mha", True)
    raw_text, comp_text = raw.read_bytes(), comp.read_bytes()
    (tmp_path / "says_compressed.mha").write_bytes(
        raw_text.replace(b"CompressedData = False", b"CompressedData = True")
    )
    head, _, body = comp_text.partition(b"ElementDataFile = LOCAL\n")
    head = b"\n".join(ln for ln in head.split(b"\n") if not ln.startswith(b"CompressedDataSize"))
    (tmp_path / "says_raw.mha").write_bytes(head.replace(b"CompressedData = True", b"CompressedData = False")
                                            + b"ElementDataFile = LOCAL\n" + body)  # fmt: skip
    nrrd = tmp_path / "comp.nrrd"
    sitk.WriteImage(Volume(ct_phantom_array((4, 32, 32)), (0.8, 0.8, 3.2)).to_sitk(np.int16), str(nrrd), True)
    (tmp_path / "cut.nii.gz").write_bytes(gz.read_bytes()[: size // 2])
    cases = {
        _flip(gz, tmp_path / "flip.nii.gz", size // 2): "gzip-compressed data are corrupt",
        _flip(gz, tmp_path / "crc.nii.gz", size - 6): "gzip-compressed data are corrupt (CRC check failed",
        tmp_path / "cut.nii.gz": "the file is truncated",
        _flip(comp, tmp_path / "flip.mha", len(comp_text) - 40): "zlib-compressed data are corrupt",
        _flip(nrrd, tmp_path / "flip.nrrd", nrrd.stat().st_size - 40): "gzip-compressed data are corrupt",
        tmp_path / "says_compressed.mha": "its header says the voxel data are compressed (CompressedData = True), but they are not",
        tmp_path / "says_raw.mha": "its header says the voxel data are not compressed (CompressedData = False), but they are",
    }  # fmt: skip
    for path, message in cases.items():
        with pytest.raises(InputError) as err:
            read_volume(path)
        assert message in str(err.value), (path.name, str(err.value))
        assert "constant" not in str(err.value)
    assert read_volume(comp).shape == read_volume(raw).shape == (4, 32, 32)


def test_a_lying_mha_header_is_one_line_without_itk_output(files, tmp_path):
    raw = _mha(tmp_path / "raw.mha", False)
    bad = tmp_path / "lie.mha"
    bad.write_bytes(raw.read_bytes().replace(b"CompressedData = False", b"CompressedData = True"))
    proc = cli(["sr", str(bad), "out.nii.gz", "--progress", "none"], tmp_path)
    assert proc.returncode == 2
    assert "but they are not: the header does not describe the data" in error_line(proc)
    assert "Uncompress" not in proc.stderr and proc.stderr.count("\n") == 1


def test_itk_warnings_become_one_warning_line(tmp_path):
    import pydicom

    paths = write_dicom_series(tmp_path / "uneven", Volume(ct_phantom_array((6, 32, 32)), (0.8, 0.8, 3.2)))
    for p in paths[4:]:  # the last two slices 0.25 mm further: uneven (ITK warns), within a tenth of a spacing
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient = [
            float(v) + (0.25 if i == 2 else 0.0) for i, v in enumerate(ds.ImagePositionPatient)
        ]
        ds.save_as(p)
    proc = cli(["sr", str(tmp_path / "uneven"), "out.nrrd", "--progress", "none"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: In" not in proc.stderr and "0x" not in proc.stderr
    assert "reported by ITK" not in proc.stderr and "Non uniform sampling" not in proc.stderr  # in our words:
    warnings = [ln for ln in proc.stderr.splitlines() if "from an evenly spaced grid" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert "stacked at their mean spacing" in warnings[0]


def test_a_dicom_slice_of_another_size_is_named(tmp_path):
    write_dicom_series(tmp_path / "series", Volume(ct_phantom_array((6, 32, 32)), (0.8, 0.8, 3.2)))
    write_dicom_series(tmp_path / "other", Volume(ct_phantom_array((6, 40, 40)), (0.8, 0.8, 3.2)))
    shutil.copy(tmp_path / "other" / "slice003.dcm", tmp_path / "series" / "slice003.dcm")
    with pytest.raises(InputError, match=r"mixes slice sizes: slice003.dcm is 40x40 pixels, where 5 of its 6 "
                                         r"slices are 32x32"):  # fmt: skip
        read_volume(tmp_path / "series")


def test_a_dicom_slice_of_another_pixel_spacing_is_named(tmp_path):
    """ITK stacks every slice at the first one's pixel spacing: a slice of another field of view would be stretched
    into the volume. It is named instead; spacings that differ only by rounding are read."""
    import pydicom

    paths = write_dicom_series(tmp_path / "series", Volume(ct_phantom_array((6, 32, 32)), (0.8, 0.8, 3.2)))
    ds = pydicom.dcmread(paths[3])
    ds.PixelSpacing = ["0.80004", "0.79996"]
    ds.save_as(paths[3])
    assert read_volume(tmp_path / "series").spacing[:2] == pytest.approx((0.8, 0.8))
    ds.PixelSpacing = ["0.9", "0.9"]
    ds.save_as(paths[3])
    with pytest.raises(InputError, match=r"mixes pixel spacings: slice003.dcm has 0.9 x 0.9 mm pixels, where 5 of its "
                                         r"6 slices have 0.8 x 0.8 mm"):  # fmt: skip
        read_volume(tmp_path / "series")
    ds.PixelSpacing = "0.8"  # one value where two belong: also not this volume's slice
    ds.save_as(paths[3])
    with pytest.raises(InputError, match=r"slice003.dcm has 0.8 mm pixels, where 5 of its 6 slices have 0.8 x 0.8 mm"):
        read_volume(tmp_path / "series")


def test_a_dicom_series_without_slice_positions_is_refused_not_stacked_1_mm_apart(tmp_path):
    """Without ImagePositionPatient ITK stacks the slices 1 mm apart whatever they are (5 mm slices read as 1 mm,
    their order the files'); the series is refused, naming the slice that does not say where it lies."""
    import pydicom

    paths = write_dicom_series(tmp_path / "series", Volume(ct_phantom_array((6, 32, 32)), (0.8, 0.8, 5.0)))
    ds = pydicom.dcmread(paths[2])
    del ds.ImagePositionPatient
    ds.save_as(paths[2])
    with pytest.raises(InputError, match=r"does not record where its slices lie: slice002.dcm \(slice 3\) has no "
                                         r"usable ImagePositionPatient"):  # fmt: skip
        read_volume(tmp_path / "series")


# ---------------------------------------------------------------------------------------------- the cache
def test_a_cache_that_is_a_file_or_unwritable_exits_4(tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = cli(["sample-data", "cxr-pa"], tmp_path, DIFFUSIONCORE_CACHE=str(tmp_path / "a-file"))
    assert proc.returncode == 4, proc.stderr
    assert "is a file, not a folder" in error_line(proc) and "DIFFUSIONCORE_CACHE" in error_line(proc)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    unwritable = Path("/proc") if os.geteuid() == 0 else locked  # root writes through permission bits
    proc = cli(["sample-data", "cxr-pa"], tmp_path, DIFFUSIONCORE_CACHE=str(unwritable))
    assert proc.returncode == 4, proc.stderr
    assert "cannot be created or written" in error_line(proc) and "DIFFUSIONCORE_CACHE" in error_line(proc)


def test_a_corrupt_cached_sample_is_listed_as_corrupt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(tmp_path))
    sample = sampledata.SAMPLES["cxr-pa"]
    target = sampledata.sample_dir("cxr-pa") / sample.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the radiograph")
    assert (
        sampledata.cache_state("cxr-pa") == "corrupt"
        and sampledata.cache_state("shoulder-ap") == "not cached"
    )
    assert main(["sample-data", "--list"]) == 0
    listing = capsys.readouterr().out
    assert any(ln.startswith("cxr-pa") and "corrupt" in ln for ln in listing.splitlines())
    assert target.read_bytes() == b"not the radiograph"  # listing changes nothing


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(("methods", "message"), [
    (",", "must name at least one"), ("cubic,,", "has an empty entry"), ("cubic,cubic", "names cubic more than once"),
    ("cubic cubic", "names cubic more than once"),  # space-separated: checked as one list too
])  # fmt: skip
def test_evaluate_methods_lists_are_checked_when_parsed(methods, message, tmp_path, capsys):
    assert (
        main(
            ["evaluate", "--reference", str(tmp_path / "none.nii.gz"), "--factor", "2", "--methods", *methods.split()]
        )
        == 2
    )
    assert f"error: argument --methods: {message}" in capsys.readouterr().err
    assert main(["evaluate-xray", "--reference", "none.nii.gz", "--methods", *methods.split()]) == 2


def test_xray2ct_stage_counts_beyond_the_weights_are_refused(tmp_path, capsys):
    assert main(["xray2ct", "x.png", str(tmp_path / "o.nii.gz"), "--num-stages", "5"]) == 2
    assert "argument --num-stages: must be an integer from 1 to 3; got 5" in capsys.readouterr().err
    assert main(["xray2ct", "x.png", str(tmp_path / "o.nii.gz"), "--steps", "0"]) == 2
    assert "argument --steps: must be an integer >= 1; got 0" in capsys.readouterr().err
    png = tmp_path / "chest.png"
    sitk.WriteImage(
        sitk.GetImageFromArray((np.random.default_rng(0).random((32, 32)) * 4000).astype(np.uint16)), str(png)
    )
    proc = cli(["xray2ct", str(png), "o.nii.gz", "--tiny-test-model", "--num-stages", "3", "--progress", "none"],
               tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert "--num-stages 3: the X-ray to CT weights have 2 stage(s) (16^3, 32^3)" in error_line(proc)
    assert not (tmp_path / "o.nii.gz").exists()


# ---------------------------------------------------------------------------------------------- small ones
def test_stale_partial_files_of_the_same_output_are_removed_at_the_next_run(tmp_path):
    out = tmp_path / "out.nii.gz"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = [tmp_path / ".out.nii.gz.999999999.abcd.partial.nii", tmp_path / ".out.nii.gz.999999999.efgh.partial.nii.gz",
                 tmp_path / ".out.nii.gz.k2j3h4.partial.nii.gz"]  # fmt: skip
        live = tmp_path / f".out.nii.gz.{sleeper.pid}.wxyz.partial.nii.gz"  # another run writing it now
        other = tmp_path / ".other.nii.gz.999999999.abcd.partial.nii"
        for p in (*stale, live, other):
            p.write_bytes(b"half")
        write_volume(Volume(ct_phantom_array((4, 32, 32)), (0.8, 0.8, 3.2)), out)
        assert out.is_file() and live.exists() and other.exists()
        assert not any(p.exists() for p in stale)
        assert sorted(p.name for p in tmp_path.iterdir() if ".partial" in p.name) == sorted(
            [live.name, other.name]
        )
    finally:
        sleeper.kill()
        sleeper.wait()


def test_weights_and_checkpoints_follow_the_umask(tmp_path):
    from DiffusionCore.train.checkpoint import save_training_state
    from DiffusionCore.weights.registry import save_safetensors

    old = os.umask(0o022)
    try:
        save_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)}, {"family": "sr"})
        net = torch.nn.Linear(2, 2)
        ckpt = save_training_state(tmp_path / "run", step=1, epoch=0, models={"net": net},
                                   optimizers={"opt": torch.optim.SGD(net.parameters(), lr=0.1)})  # fmt: skip
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o755
    for p in [*ckpt.iterdir(), tmp_path / "run" / "latest.json"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_the_memory_limit_says_what_it_covers(files, tmp_path):
    proc = cli(["sr", str(files["thick"]), "out.nii.gz", "--memory-limit", "300MiB", "--report", "r.json",
                "--progress", "none"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--memory-limit 300.0 MiB caps the working memory the run plans (volumes and patches)" in proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    memory = (report[0] if isinstance(report, list) else report)["memory"]
    assert memory["limit_bytes"] == 300 << 20 and "not the Python process" in memory["limit_covers"]
    from DiffusionCore.cli.main import build_parser

    sr_parser = build_parser()._subparsers._group_actions[0].choices["sr"]
    [option] = [a for a in sr_parser._actions if "--memory-limit" in a.option_strings]
    assert "the process itself (Python, PyTorch and the weights" in option.help


@pytest.mark.parametrize("command", [
    ["sr", "in.nii.gz", "out.nii.gz"], ["evaluate", "--reference", "ct.nii.gz", "--factor", "4"],
    ["xray2ct", "xr.dcm", "ct.nii.gz"], ["evaluate-xray"], ["prepare-latents", "--data", "d", "--vae", "v",
    "--output-dir", "o"], ["demo"], ["train", "sr", "--data", "d", "--out-dir", "o"],
    ["train", "xray", "--data", "d", "--output-dir", "o"], ["train", "throughplane", "--data", "d", "--out-dir", "o"],
])  # fmt: skip
def test_every_command_refuses_an_unknown_device_when_it_is_parsed(command, capsys):
    """`evaluate --device gpu` computed cubic interpolation first and then failed; with interpolation methods only it
    was accepted without a word. Every command now takes the same devices and says so at once."""
    assert main([*command, "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --device: must be auto, cpu, cuda or cuda:N; got 'gpu'"), err
    assert len(err.splitlines()) == 1


def test_a_message_logged_while_a_progress_bar_is_drawn_gets_a_line_of_its_own(capsys):
    # the terminal showed "...| 48/48 [00:12, predictor]info: super-resolution done in 12 s": the message went on
    # the end of the bar's line
    import logging

    from DiffusionCore.cli.common import Progress, setup_logging

    setup_logging()
    progress = Progress("bar", desc="sr")
    progress(3, 8, "predictor")
    logging.getLogger("DiffusionCore.test").info("super-resolution done in 12 s")
    progress.close()
    err = capsys.readouterr().err
    lines = [part.strip() for part in err.replace("\r", "\n").split("\n")]
    assert "info: super-resolution done in 12 s" in lines
    assert any("predictor" in line for line in lines)  # the bar was drawn


def test_a_volume_written_to_a_full_disk_says_the_disk_is_full(small_disk):
    """ITK said only "could not write OUT: Write: Error writing OUT.partial...": no reason. A full temp disk
    under the Slicer modules' hand-off files, or a full output disk, now says so, with the free space."""
    import errno as errno_module

    from DiffusionCore.errors import OutputError

    full = small_disk
    # noise: no form of it fits, compressed or not (a .nii.gz that fits only compressed is written: test_disk_room)
    vol = Volume(np.random.default_rng(0).normal(0.0, 300.0, (8, 64, 64)).astype(np.float32), (1.0, 1.0, 1.0))
    for name in ("ct.nrrd", "ct.nii.gz", "ct.mha"):
        with pytest.raises(OutputError, match=r"the disk holding .*small disk is full \(.* free; the file needs "
                           r"up to 128\.0 KiB\): free some space there or write to another folder"):
            write_volume(vol, full / name, dtype="float32", compress=False)
        assert os.listdir(full) == []  # no partial file left
    fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)  # a disk full to the last block
    try:
        for chunk in (4096, 1):
            with pytest.raises(OSError) as filled:
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    assert filled.value.errno == errno_module.ENOSPC
    for compress in (False, True):  # ITK reported success for a NRRD of 0 bytes here
        with pytest.raises(OutputError, match=r"is full \(0 B free; the file needs up to 512 B\)"):
            write_volume(Volume(np.zeros((1, 16, 16), np.float32), (1.0, 1.0, 1.0)), full / "tiny.nrrd",
                         compress=compress)  # fmt: skip
        assert not (full / "tiny.nrrd").exists()
    from DiffusionCore.volume import write_image  # a 2D radiograph handed to X-ray to CT's command

    with pytest.raises(OutputError, match=r"could not write .*radiograph\.mha: the disk holding .* is full"):
        write_image(sitk.GetImageFromArray(np.ones((64, 64), np.float32)), full / "radiograph.mha")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_size_that_is_not_a_finite_number_is_a_configuration_error(value):
    """int(nan) raised ValueError and int(inf) OverflowError: not the ConfigError naming the key that callers handle."""
    from DiffusionCore.errors import ConfigError
    from DiffusionCore.nn.architecture import require_positive

    with pytest.raises(ConfigError, match=r"channels must be an integer >= 1; got (nan|inf|-inf)"):
        require_positive("channels", value)
