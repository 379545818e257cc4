"""Probe 28 of the Python API: results keep their provenance, evaluate isolates methods, Volume checks its geometry."""

from __future__ import annotations

import numpy as np
import pytest

from DiffusionCore import (
    ConfigError,
    GeometryError,
    InputError,
    MethodResultError,
    OutputError,
    Volume,
    degrade,
    evaluate,
    read_volume,
    register_method,
    save_result,
    write_volume,
)
from DiffusionCore.provenance import read_provenance

SUFFIXES = (".nrrd", ".nii.gz", ".mha")


def _ct(nz: int = 16, n: int = 32, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    arr = np.full((nz, n, n), -1000.0, np.float32)
    arr[:, n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 40.0
    arr += rng.normal(0.0, 5.0, arr.shape).astype(np.float32)
    return Volume(arr, (0.75, 0.75, 1.0), (-12.0, -12.0, 0.0), np.eye(3), {"source": "phantom.nrrd"})


@pytest.fixture(scope="module")
def sr_result():
    from DiffusionCore.sr.pipeline import SuperResolver

    thick = degrade(_ct(), 4, "z")
    out, report = SuperResolver.tiny_predictor().run(thick, factor=4, axis="z", device="cpu")
    return thick, out, report


# -- 4: a result written by write_volume says it is synthetic; save_result writes the full record -----------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_write_volume_of_a_result_marks_it_synthetic(tmp_path, sr_result, suffix):
    _, out, report = sr_result
    path = write_volume(out, tmp_path / f"out{suffix}")
    prov = read_provenance(path)
    assert prov is not None, "a synthetic result was written unmarked"
    assert "synthetic" in prov.title.lower()
    assert report["weights_sha256"].startswith(prov.weights_sha256)
    assert read_volume(path).grid == out.grid


def test_write_volume_of_a_measured_volume_stays_unmarked(tmp_path):
    assert read_provenance(write_volume(_ct(), tmp_path / "ct.nrrd")) is None


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_save_result_writes_the_full_provenance(tmp_path, sr_result, suffix):
    thick, out, report = sr_result
    written = save_result(out, tmp_path / f"out{suffix}", report, input=thick)
    prov = read_provenance(written[0])
    assert prov is not None and prov.task == "sr" and prov.title == "SR x4 (synthetic)"
    assert prov.weights == report["settings"]["weights"] and prov.weights_sha256 == report["weights_sha256"]
    assert prov.settings["factor"] == 4 and prov.input == "phantom.nrrd"
    with pytest.raises(OutputError, match="overwrite=True"):
        save_result(out, tmp_path / f"out{suffix}", report)


def test_an_xray_result_keeps_its_provenance(tmp_path):
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    ct, report = XrayToCTGenerator.tiny().run(image, num_stages=1, device="cpu", seed=0)
    assert read_provenance(write_volume(ct, tmp_path / "ct.mha")) is not None
    written = save_result(ct, tmp_path / "ct.nii.gz", report, input="chest.png", weights="mine")
    prov = read_provenance(written[0])
    assert [p.name for p in written] == ["ct.nii.gz", "ct.json"]
    assert prov.task == "xray2ct" and prov.weights == "mine" and prov.input == "chest.png"
    assert prov.settings["num_stages"] == 1 and prov.settings["seed"] == 0


def test_save_result_refuses_what_is_not_the_report(tmp_path, sr_result):
    _, out, report = sr_result
    with pytest.raises(InputError, match="report"):
        save_result(out, tmp_path / "out.nrrd", out.metadata)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="report"):
        save_result(out, tmp_path / "out.nrrd", {**report, "weights_sha256": "f" * 64})


def test_write_volume_messages_speak_python(tmp_path):
    path = write_volume(_ct(), tmp_path / "ct.nrrd")
    with pytest.raises(OutputError, match=r"already exists; pass overwrite=True .*--overwrite on the command line"):
        write_volume(_ct(), path)
    with pytest.raises(ConfigError, match="'auto'.*'int16'.*'float32'"):
        write_volume(_ct(), tmp_path / "u8.nrrd", dtype="uint8")


# -- 7: evaluate gives each method its own thick input, and refuses NaN results -------------------------------------


def test_a_method_editing_thick_in_place_changes_no_other_score():
    def inplace(thick, grid, options):
        a = thick.array
        a -= a.mean()  # normalising in place
        return Volume.from_grid(grid, np.repeat(a, grid.shape[0] // a.shape[0], axis=0))

    register_method("test-probe28-inplace", inplace)
    ref = _ct(nz=16, n=24)
    alone = evaluate(ref, 4, axis="z", methods=["cubic"])["results"][0]
    after = evaluate(ref, 4, axis="z", methods=["test-probe28-inplace", "cubic"])["results"][1]
    assert after["psnr_body"] == alone["psnr_body"] and after["ssim"] == alone["ssim"]


def test_a_method_returning_nan_is_refused():
    def holes(thick, grid, options):
        out = np.zeros(grid.shape, np.float32)
        out[0, 0, 0] = np.nan
        return Volume.from_grid(grid, out)

    register_method("test-probe28-nan", holes)
    with pytest.raises(MethodResultError, match="test-probe28-nan returned 1 NaN or infinite voxel"):
        evaluate(_ct(nz=16, n=24), 4, axis="z", methods=["test-probe28-nan"])


def test_register_method_refuses_replacing_a_builtin_without_replace():
    from DiffusionCore.evaluate import get_method

    builtin = get_method("cubic")

    def mine(thick, grid, options):
        return builtin(thick, grid, options)

    with pytest.raises(ConfigError, match="'cubic' is a built-in method.*replace=True"):
        register_method("cubic", mine)
    assert get_method("cubic") is builtin
    register_method("cubic", mine, replace=True)
    try:
        assert get_method("cubic") is mine
    finally:
        register_method("cubic", builtin, replace=True)
    register_method("test-probe28-mine", mine)
    register_method("test-probe28-mine", mine)  # a method of one's own: re-registered freely (a notebook re-run)


def test_reimporting_the_model_methods_still_registers_them():
    import subprocess
    import sys

    code = ("import importlib; from DiffusionCore.evaluate import get_method; import DiffusionCore.sr.pipeline as p; "
            "importlib.reload(p); assert get_method('sr') is p._evaluate_sr")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# -- 11, 12: Volume checks its geometry; == is identity; repr shows the geometry ------------------------------------


@pytest.mark.parametrize("direction", [2 * np.eye(3), np.diag([0.7, 0.7, 5.0]), np.diag([1.0, 1.0, 1.05])])
def test_volume_refuses_direction_columns_that_are_not_unit_vectors(direction):
    with pytest.raises(GeometryError, match="columns must be unit vectors.*spacing"):
        Volume(np.zeros((4, 4, 4)), (0.7, 0.7, 5.0), (0, 0, 0), direction)


def test_volume_takes_rounded_direction_cosines():
    c, s = round(np.cos(0.3), 5), round(np.sin(0.3), 5)  # as a DICOM header rounds them
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    np.testing.assert_array_equal(Volume(np.zeros((4, 4, 4)), (1, 1, 1), (0, 0, 0), direction).direction, direction)
    # cosines written with two decimals (0.98, 0.17: 0.5% short) are the directions they round: scaled to unit length
    rough = np.array([[1.0, 0.0, 0.0], [0.0, 0.98, -0.17], [0.0, 0.17, 0.98]])
    vol = Volume(np.zeros((4, 4, 4)), (0.7, 0.7, 5.0), (0, 0, 0), rough)
    np.testing.assert_allclose(np.linalg.norm(vol.direction, axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(vol.direction, rough / np.linalg.norm(rough, axis=0), atol=1e-12)
    assert vol.spacing == (0.7, 0.7, 5.0)  # the voxel size is the spacing's, not the columns'


def test_volume_refuses_a_non_finite_origin_and_an_empty_array():
    with pytest.raises(GeometryError, match="origin must be finite"):
        Volume(np.zeros((4, 4, 4)), (1, 1, 1), (np.nan, 0, 0))
    with pytest.raises(GeometryError, match="origin must be finite"):
        Volume(np.zeros((4, 4, 4)), (1, 1, 1), (0, np.inf, 0))
    with pytest.raises(InputError, match="at least one voxel along each axis"):
        Volume(np.zeros((0, 96, 96)), (1, 1, 1))


def test_volume_equality_is_identity_and_repr_shows_the_geometry():
    a = Volume(np.zeros((4, 5, 6)), (0.5, 0.5, 2.0), (1.0, 2.0, 3.0))
    b = a.copy()
    assert a == a and a != b and a in [b, a] and b not in [a]
    assert len({a, b}) == 2
    text = repr(a)
    assert text.startswith("Volume(shape=(4, 5, 6), dtype=float32, spacing=(0.5, 0.5, 2.0), origin=(1.0, 2.0, 3.0)")
    assert "array(" not in text and len(text) < 300


# -- minor: metrics raise typed errors --------------------------------------------------------------------------------


def test_metrics_raise_typed_errors():
    from DiffusionCore.metrics import hu_mae, psnr, ssim3d

    ref = _ct(nz=16, n=24)
    with pytest.raises(GeometryError, match="shapes differ.*same grid"):
        psnr(ref, np.zeros((16, 24, 23), np.float32))
    with pytest.raises(InputError, match="too small for a 11-voxel SSIM window"):
        ssim3d(np.zeros((4, 24, 24), np.float32), np.zeros((4, 24, 24), np.float32))
    with pytest.raises(InputError, match="mask is empty"):
        hu_mae(ref, ref, mask=np.zeros(ref.shape, bool))
