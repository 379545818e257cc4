"""What the commands never write: a non-finite or empty result, or a file over one of their inputs.

Each case runs the real command line (``python -m DiffusionCore ...`` in a subprocess) and checks its exit
code, its single ``error:`` line, that every input is byte-identical afterwards and that no output (nor a
temporary file) was left. Three checks cover the families:

* options: every float option is parsed by ``finite_float`` (NaN, Inf and out-of-range values refused
  when the command line is parsed, exit 2);
* weights: ``load_safetensors`` refuses NaN/Inf tensors in any weights file (exit 3);
* results: ``check_result`` refuses a volume with NaN/Inf voxels, values far outside CT's range or one
  value everywhere before it is written, and ``check_scores`` an evaluation with NaN scores (exit 1);
* inputs: ``refuse_overwriting_inputs`` refuses any output that is an input file (by identity: links,
  ``..``) or lies inside an input DICOM folder, whatever ``--overwrite`` says (exit 4).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ct_phantom_array, write_dicom_series

from DiffusionCore.cli.common import bounded_int, check_result, finite_float
from DiffusionCore.errors import NumericalError, OutputError, WeightsError
from DiffusionCore.files import refuse_overwriting_inputs
from DiffusionCore.volume import Volume, write_volume
from DiffusionCore.weights.registry import load_safetensors

ROOT = Path(__file__).resolve().parents[1]


# -- inputs ------------------------------------------------------------------------------------------------
def thick_ct() -> Volume:
    """A 4x32x32 chest-like CT, 3.2 mm slices: ``sr`` makes 16x32x32 of it."""
    return Volume(ct_phantom_array((4, 32, 32)), (0.8, 0.8, 3.2), (-12.0, -12.0, -20.0))


def radiograph_png(path: Path) -> Path:
    """A chest-radiograph-like 64x64 uint16 PNG."""
    y, x = np.mgrid[0:64, 0:64] / 63 - 0.5
    img = 0.35 + 0.3 * np.exp(-((x / 0.12) ** 2)) - 0.2 * ((((np.abs(x) - 0.2) / 0.15) ** 2 + (y / 0.35) ** 2) < 1)
    sitk.WriteImage(sitk.GetImageFromArray((np.clip(img, 0, 1) * 4000).astype(np.uint16)), str(path))
    return path


def _scaled(model, scale: float | None = None, nan: bool = False):
    with torch.no_grad():
        params = list(model.parameters())
        if nan:
            params[0].view(-1)[0] = float("nan")
        if scale is not None:
            for p in params:
                p.mul_(scale)
    return model


@dataclass
class Shared:
    """Files several cases read (never written by any case)."""

    thick: Path
    thin: Path
    xray: Path
    sr_nan: Path  # SR weights with one NaN
    sr_overflow: Path  # SR weights x1000: finite, but the result overflows to NaN
    sr_wild: Path  # through-plane predictor weights x10: finite, but thousands of HU below air
    sr_good: Path
    xray_nan: Path
    xray_overflow: Path  # X-ray weights x1e30: the first stage overflows to NaN


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    from DiffusionCore.sr.model import SRModel
    from DiffusionCore.sr.throughplane import tiny_predictor
    from DiffusionCore.sr.throughplane_train import export_predictor
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

    d = tmp_path_factory.mktemp("shared")
    paths = {}
    for name, kwargs in {"sr_nan": {"nan": True}, "sr_overflow": {"scale": 1e3}, "sr_good": {}}.items():
        paths[name] = d / f"{name}.safetensors"
        _scaled(SRModel.tiny(seed=0), **kwargs).save(paths[name])
    # the latent model's decoder is clamped to CT's range, so only a predictor can go this far off
    paths["sr_wild"] = d / "sr_wild.safetensors"
    export_predictor(_scaled(tiny_predictor(0), scale=10.0), paths["sr_wild"], {})
    for name, kwargs in {"xray_nan": {"nan": True}, "xray_overflow": {"scale": 1e30}}.items():
        paths[name] = d / f"{name}.safetensors"
        _scaled(UnifiedHybridViTCascade.tiny(0), **kwargs).save_pretrained(paths[name])
    thin = Volume(ct_phantom_array((24, 32, 32)), (0.8, 0.8, 1.0))
    return Shared(write_volume(thick_ct(), d / "thick.nii.gz"), write_volume(thin, d / "thin.nii.gz"),
                  radiograph_png(d / "chest.png"), **paths)  # fmt: skip


# -- the command line --------------------------------------------------------------------------------------
def digest(path: Path) -> str:
    """sha256 of a file, or of every file below a folder (names and contents)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(argv: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DIFFUSIONCORE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "DiffusionCore", *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)  # fmt: skip


@dataclass
class Case:
    """A refused command: its arguments, exit code, a text of its ``error:`` line, the inputs that must stay
    byte-identical, and the outputs that must not exist afterwards (their folders gain no file)."""

    argv: list[str]
    code: int
    message: str
    inputs: list[Path]
    absent: list[Path]


def sr(src: Path, out: Path, *extra: str) -> list[str]:
    return ["sr", str(src), str(out), "--progress", "none", "--num-steps", "1", *extra]


def tiny_sr(src: Path, out: Path, *extra: str) -> list[str]:
    return sr(src, out, "--tiny-test-model", *extra)


def with_weights(path: Path) -> list[str]:
    return ["--weights", str(path), "--allow-unregistered-weights"]


def copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


CASES: dict[str, Callable[[Path, Shared], Case]] = {}


def case(name: str):
    def register(fn: Callable[[Path, Shared], Case]) -> Callable[[Path, Shared], Case]:
        CASES[name] = fn
        return fn

    return register


# --- 1a. options: non-finite or out-of-range numbers, refused when the command line is parsed (exit 2)
FINITE = "must be a finite number"

for _value in ("nan", "inf", "1e38"):

    @case(f"sr-guidance-scale-{_value}")
    def _(d: Path, s: Shared, value: str = _value) -> Case:
        out = d / "out.nii.gz"
        return Case(tiny_sr(s.thick, out, "--guidance-scale", value, "--output-dtype", "int16"), 2,
                    f"argument --guidance-scale: {FINITE} from 0 to 10; got {value}", [s.thick], [out])  # fmt: skip


@case("sr-target-spacing-nan")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(tiny_sr(s.thick, out, "--target-spacing", "nan"), 2, f"argument --target-spacing: {FINITE} > 0",
                [s.thick], [out])  # fmt: skip


@case("xray2ct-fov-inf")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(["xray2ct", str(s.xray), str(out), "--tiny-test-model", "--fov-mm", "inf"], 2,
                f"argument --fov-mm: {FINITE} > 0; got inf", [s.xray], [out])  # fmt: skip


@case("xray2ct-steps-0")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(["xray2ct", str(s.xray), str(out), "--tiny-test-model", "--steps", "0"], 2,
                "argument --steps: must be an integer >= 1; got 0", [s.xray], [out])  # fmt: skip


@case("evaluate-adapt-inf")
def _(d: Path, s: Shared) -> Case:
    out = d / "scores.json"
    return Case(["evaluate", "--reference", str(s.thin), "--factor", "2", "--adapt", "inf", "--json", str(out)], 2,
                f"argument --adapt: {FINITE} >= 0; got inf", [s.thin], [out])  # fmt: skip


# --- 1b. weights holding NaN: refused when they are loaded (exit 3)
NONFINITE_WEIGHTS = "holds non-finite values (NaN/Inf) in 1 tensor(s)"


@case("sr-nan-weights")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(sr(s.thick, out, *with_weights(s.sr_nan)), 3, NONFINITE_WEIGHTS, [s.thick, s.sr_nan], [out])


@case("xray2ct-nan-weights")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(["xray2ct", str(s.xray), str(out), "--num-stages", "1", "--progress", "none", *with_weights(s.xray_nan)],
                3, NONFINITE_WEIGHTS, [s.xray, s.xray_nan], [out])  # fmt: skip


@case("evaluate-nan-weights")
def _(d: Path, s: Shared) -> Case:
    out = d / "scores.json"
    return Case(["evaluate", "--reference", str(s.thin), "--factor", "2", "--methods", "cubic,sr", "--num-steps", "1",
                 "--progress", "none", "--json", str(out), *with_weights(s.sr_nan)], 3, NONFINITE_WEIGHTS,
                [s.thin, s.sr_nan], [out])  # fmt: skip


# --- 1c. results that fail their final check: nothing is written (exit 1)
@case("sr-result-nan-int16")
def _(d: Path, s: Shared) -> Case:
    # finite weights whose activations overflow: the result is NaN, which an int16 cast would hide as 0 HU
    out = d / "out.nii.gz"
    return Case(sr(s.thick, out, "--output-dtype", "int16", *with_weights(s.sr_overflow)), 1,
                "holds 16384 NaN or infinite voxels (of 16384): the computation failed numerically; nothing was "
                "written", [s.thick], [out])  # fmt: skip


@case("sr-result-far-outside-hu")
def _(d: Path, s: Shared) -> Case:
    out, report = d / "out.nii.gz", d / "report.json"
    return Case(["sr", str(s.thick), str(out), "--progress", "none", "--report", str(report), "--no-adapt",
                 *with_weights(s.sr_wild)], 1,
                "more than twice the input's value range below air", [s.thick], [out, report])  # fmt: skip


@case("xray2ct-result-nan-with-stages")
def _(d: Path, s: Shared) -> Case:
    out, report = d / "ct.nii.gz", d / "report.json"
    return Case(["xray2ct", str(s.xray), str(out), "--save-stages", "--report", str(report), "--progress", "none",
                 *with_weights(s.xray_overflow)], 1, "stage 1 of the xray2ct result holds 4096 NaN or infinite voxels",
                [s.xray], [out, report, d / "ct_stage1.nii.gz"])  # fmt: skip


@case("evaluate-nan-score")
def _(d: Path, s: Shared) -> Case:
    out = d / "scores.json"
    return Case(["evaluate", "--reference", str(s.thin), "--factor", "2", "--methods", "cubic,sr", "--num-steps", "1",
                 "--progress", "none", "--json", str(out), *with_weights(s.sr_overflow)], 1,
                "method sr: the super-resolved volume holds 24576 NaN or infinite voxels", [s.thin], [out])  # fmt: skip


@case("evaluate-xray-nan-score")
def _(d: Path, s: Shared) -> Case:
    out = d / "scores.json"
    return Case(["evaluate-xray", "--reference", str(s.thin), "--num-stages", "1", "--methods", "model,mean-ct",
                 "--progress", "none", "--json", str(out), *with_weights(s.xray_overflow)], 1,
                "evaluate-xray: method model (stage 1) returned 4,096 NaN voxel(s) of 4,096", [s.thin], [out])  # fmt: skip


# --- 3. an output over an input, whatever --overwrite says (exit 4)
IS_INPUT = "writing it would destroy the input, so it is refused even with --overwrite"
INSIDE = ("writing there would change what is read from that folder (a series, a cohort), so it is refused even "
          "with --overwrite")


@case("sr-output-is-input")
def _(d: Path, s: Shared) -> Case:
    v = copy(s.thick, d / "v.nii.gz")
    return Case(tiny_sr(v, v, "--overwrite"), 4, f"the output {v} is the input {v}: {IS_INPUT}", [v], [])


@case("sr-folder-into-itself")
def _(d: Path, s: Shared) -> Case:
    folder = d / "scans"
    folder.mkdir()
    a, b = copy(s.thick, folder / "a.nii.gz"), copy(s.thick, folder / "b.nii.gz")
    return Case(tiny_sr(folder, folder, "--overwrite"), 4, f"is the input {a}: {IS_INPUT}", [folder, a, b], [])


@case("sr-report-is-input")
def _(d: Path, s: Shared) -> Case:
    v, out = copy(s.thick, d / "v.nii.gz"), d / "out.nii.gz"
    return Case(tiny_sr(v, out, "--report", str(v), "--overwrite"), 4, f"--report {v} is the input", [v], [out])


@case("sr-uncertainty-is-input")
def _(d: Path, s: Shared) -> Case:
    v, out = copy(s.thick, d / "v.nii.gz"), d / "out.nii.gz"
    return Case(tiny_sr(v, out, "--num-samples", "2", "--uncertainty", str(v), "--overwrite"), 4,
                f"--uncertainty {v} is the input", [v], [out])  # fmt: skip


@case("sr-report-is-weights")
def _(d: Path, s: Shared) -> Case:
    weights, out = copy(s.sr_good, d / "w.safetensors"), d / "out.nii.gz"
    return Case(sr(s.thick, out, *with_weights(weights), "--report", str(weights), "--overwrite"), 4,
                f"--report {weights} is the input", [s.thick, weights], [out])  # fmt: skip


@case("sr-output-symlink-to-input")
def _(d: Path, s: Shared) -> Case:
    v = copy(s.thick, d / "v.nii.gz")
    link = d / "link.nii.gz"
    link.symlink_to(v.name)
    return Case(tiny_sr(v, link, "--overwrite"), 4, "(the same file under another name)", [v, link], [])


@case("sr-output-hard-link-to-input")
def _(d: Path, s: Shared) -> Case:
    v = copy(s.thick, d / "v.nii.gz")
    hard = d / "hard.nii.gz"
    os.link(v, hard)
    return Case(tiny_sr(v, hard, "--overwrite"), 4, "(the same file under another name)", [v, hard], [])


@case("sr-output-through-dotdot")
def _(d: Path, s: Shared) -> Case:
    v = copy(s.thick, d / "v.nii.gz")
    (d / "sub").mkdir()
    return Case(tiny_sr(v, d / "sub" / ".." / "v.nii.gz", "--overwrite"), 4, IS_INPUT, [v], [])


@case("sr-output-inside-dicom-folder")
def _(d: Path, s: Shared) -> Case:
    series = d / "series"
    write_dicom_series(series, Volume(ct_phantom_array((4, 16, 16)), (0.8, 0.8, 3.2)))
    out = series / "out.nii.gz"
    return Case(tiny_sr(series, out, "--factor", "2", "--overwrite"), 4,
                f"the output {out} lies inside the input folder {series}: {INSIDE}", [series], [out])  # fmt: skip


def _listed_folder(d: Path, src: Path, suffix: str, listing: str) -> tuple[Path, Path]:
    """A folder of two copies of ``src`` and a list file (``listing``'s text) naming it: (folder, list file)."""
    folder = d / "cohort"
    folder.mkdir()
    for name in ("a", "b"):
        copy(src, folder / f"{name}{suffix}")
    path = d / listing.split("\n", 1)[0]
    path.write_text(listing.split("\n", 1)[1], encoding="utf-8")
    return folder, path


# a list naming a folder protects it as the folder itself given would: a rerun would read the outputs as inputs
@case("sr-output-folder-inside-a-folder-a-list-names")
def _(d: Path, s: Shared) -> Case:
    cohort, listing = _listed_folder(d, s.thick, ".nii.gz", "cases.txt\ncohort\n")
    out = cohort / "thin"
    return Case(tiny_sr(listing, out, "--factor", "2"), 4,
                f"the output {out / 'a.nii.gz'} lies inside the input folder {cohort}: {INSIDE}", [cohort, listing],
                [out])  # fmt: skip


@case("xray2ct-output-folder-inside-a-folder-a-list-names")
def _(d: Path, s: Shared) -> Case:
    pictures, listing = _listed_folder(d, s.xray, ".png", "radiographs.csv\npath\ncohort\n")
    out = pictures / "ct"
    return Case(["xray2ct", str(listing), str(out), "--tiny-test-model", "--progress", "none"], 4,
                f"the output {out / 'a.nii.gz'} lies inside the input folder {pictures}: {INSIDE}",
                [pictures, listing], [out])  # fmt: skip


@case("sr-dicom-folder-as-its-own-output-folder")
def _(d: Path, s: Shared) -> Case:
    series = d / "series"
    write_dicom_series(series, Volume(ct_phantom_array((4, 16, 16)), (0.8, 0.8, 3.2)))
    return Case(tiny_sr(series, series, "--factor", "2", "--overwrite"), 4, INSIDE, [series],
                [series / "series.nii.gz"])  # fmt: skip


@case("sr-report-is-output")
def _(d: Path, s: Shared) -> Case:
    out = d / "out.nii.gz"
    return Case(tiny_sr(s.thick, out, "--report", str(out), "--overwrite"), 4,
                f"--report {out} and the output {out} are the same file", [s.thick], [out])  # fmt: skip


@case("evaluate-json-is-reference")
def _(d: Path, s: Shared) -> Case:
    ref = copy(s.thin, d / "ref.nii.gz")
    return Case(["evaluate", "--reference", str(ref), "--factor", "2", "--json", str(ref), "--overwrite"], 4,
                f"--json {ref} is the input {ref}: {IS_INPUT}", [ref], [])  # fmt: skip


@case("evaluate-xray-json-is-reference")
def _(d: Path, s: Shared) -> Case:
    ref = copy(s.thin, d / "ref.nii.gz")
    return Case(["evaluate-xray", "--reference", str(ref), "--tiny-test-model", "--json", str(ref), "--overwrite"],
                4, f"--json {ref} is the input", [ref], [])  # fmt: skip


@case("xray2ct-report-is-radiograph")
def _(d: Path, s: Shared) -> Case:
    x, out = copy(s.xray, d / "X.png"), d / "ct.nii.gz"
    return Case(["xray2ct", str(x), str(out), "--report", str(x), "--tiny-test-model", "--overwrite"], 4,
                f"--report {x} is the input {x}: {IS_INPUT}", [x], [out])  # fmt: skip


@case("xray2ct-stage-output-is-radiograph")
def _(d: Path, s: Shared) -> Case:
    x, out = copy(s.xray, d / "ct_stage1.nii.gz"), d / "ct.nii.gz"  # the radiograph under the stage-1 name
    return Case(["xray2ct", str(x), str(out), "--save-stages", "--tiny-test-model", "--overwrite"], 4,
                f"a stage output {x} is the input", [x], [out])  # fmt: skip


def _listing(folders: set[Path]) -> dict[Path, set[str]]:
    return {f: {p.name for p in f.iterdir()} if f.is_dir() else set() for f in folders}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_with_one_error_line_inputs_unchanged_and_nothing_written(name, shared, tmp_path):
    c = CASES[name](tmp_path, shared)
    digests = {p: digest(p) for p in c.inputs}
    folders = {tmp_path, *(p.parent for p in c.absent), *(p for p in c.inputs if p.is_dir())}
    before = _listing(folders)
    cache = tmp_path.parent / f"{tmp_path.name}-cache"
    cache.mkdir()
    proc = run_cli(c.argv, cache)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == c.code, proc.stderr
    assert len(errors) == 1 and c.message in errors[0], proc.stderr
    for path, sha in digests.items():
        assert digest(path) == sha, f"{path} was changed"
    for path in c.absent:
        assert not path.exists(), f"{path} was written"
    assert _listing(folders) == before, "a file was written or left behind"
    if c.code == 1:
        assert proc.stdout.strip() == "", "a failed evaluation must not print its table"


# -- the same checks in Python -----------------------------------------------------------------------------
def test_finite_float_and_bounded_int_refuse_what_float_and_int_accept():
    parse = finite_float(0.0, 10.0)
    assert parse("1.5") == 1.5 and parse("0") == 0.0 and parse("10") == 10.0
    for bad in ("nan", "inf", "-inf", "1e38", "-0.1", "1e999", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number from 0 to 10"):
            parse(bad)
    positive = finite_float(0.0, low_open=True)
    assert positive("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match="> 0; got 0"):
        positive("0")
    steps = bounded_int(1)
    assert steps("3") == 3
    for bad in ("0", "-2", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer >= 1"):
            steps(bad)


def test_check_result_refuses_nan_constant_and_wild_volumes_and_accepts_a_ct():
    good = thick_ct()
    check_result(good, "ct")
    nan = good.copy()
    nan.array[0, 0, :3] = np.nan
    with pytest.raises(NumericalError, match="ct holds 3 NaN or infinite voxels"):
        check_result(nan, "ct")
    with pytest.raises(NumericalError, match=r"is constant \(0 HU everywhere\): an empty result"):
        check_result(good.with_array(np.zeros(good.shape, np.float32)), "ct")
    with pytest.raises(NumericalError, match="far outside the plausible -2048..32767 HU"):
        check_result(good.with_array(good.array - 5000.0), "ct")
    zero_spread = good.with_array(np.zeros(good.shape, np.float32))  # a standard deviation of 0 everywhere
    check_result(zero_spread, "std", hu_range=(0.0, 32767.0), allow_constant=True)
    with pytest.raises(NumericalError):
        check_result(good, "std", hu_range=(0.0, 32767.0), allow_constant=True)  # negative spread


def test_load_safetensors_refuses_non_finite_tensors_unless_asked_not_to(tmp_path):
    from DiffusionCore.weights.registry import save_safetensors

    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "steps": torch.tensor([7])})
    with pytest.raises(WeightsError, match=r"non-finite values \(NaN/Inf\) in 1 tensor\(s\), e.g. b"):
        load_safetensors(path)
    tensors, _ = load_safetensors(path, check_finite=False)
    assert torch.isinf(tensors["b"]).any()


def test_refuse_overwriting_inputs_by_identity_and_folder(tmp_path):
    v = copy(Path(write_volume(thick_ct(), tmp_path / "v.nii.gz")), tmp_path / "w.nii.gz")
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"x")
    os.link(folder / "1.dcm", tmp_path / "linked.dcm")
    refuse_overwriting_inputs([v, folder, None, "sample-name"], [("the output", tmp_path / "new.nii.gz"), ("--report", None)])
    for out, message in (
        (v, "is the input"),
        (tmp_path / "." / "w.nii.gz", "is the input"),
        (tmp_path / "linked.dcm", "is the input"),  # a hard link to a file of the input folder
        (folder / "out.nii.gz", "lies inside the input folder"),
        (folder / "deeper" / "out.nii.gz", "lies inside the input folder"),
    ):
        with pytest.raises(OutputError, match=message):
            refuse_overwriting_inputs([v, folder], [("the output", out)])
    with pytest.raises(OutputError, match="are the same file"):
        refuse_overwriting_inputs([v], [("the output", tmp_path / "o.nii.gz"), ("--report", tmp_path / "o.nii.gz")])


def test_a_corrupt_dicom_file_given_to_sr_is_named_not_its_folder(tmp_path):
    """``sr FILE.dcm`` reads FILE's series from its folder; a corrupt FILE is named (and the folder of a good one
    still reads)."""
    bad_folder = tmp_path / "bad"
    bad_folder.mkdir()
    bad = bad_folder / "scan.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xf0\xff" + b"\0" * 32)  # a value length past the end
    r = run_cli(["sr", str(bad), str(tmp_path / "out.nii.gz"), "--progress", "none", "--no-adapt"], tmp_path / "cache")
    assert r.returncode == 2, r.stderr
    assert f"corrupt DICOM file {bad}" in r.stderr and "copy or export it again" in r.stderr
    assert "is a folder without" not in r.stderr and "Traceback" not in r.stderr
    series = tmp_path / "series"
    write_dicom_series(series, Volume(ct_phantom_array((4, 16, 16)), (0.8, 0.8, 3.2)))
    one = sorted(series.iterdir())[0]
    r = run_cli(["sr", str(one), str(tmp_path / "ok.nii.gz"), "--progress", "none", "--no-adapt"], tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert sitk.ReadImage(str(tmp_path / "ok.nii.gz")).GetSize()[2] == 16
