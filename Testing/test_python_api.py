"""The Python API as an ML engineer meets it: the README's "Python API" code blocks run as written (on small
stand-ins for the samples, and a short adaptation), and the library's refusals are typed DiffusionCore errors
that say what to do (a custom evaluate method's result, a stack of radiographs)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ct_phantom_array

from DiffusionCore import DiffusionCoreError, InputError, Volume, evaluate, register_method, sampledata
from DiffusionCore.evaluate import _METHODS, MethodResultError
from DiffusionCore.volume import write_volume

ROOT = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def stand_in_samples(tmp_path, monkeypatch, cache_home):
    """chest-lidc and cxr-pa stand-ins on disk: a 40x64x64 thin chest-like CT (1 mm slices) and a 96x96 PNG
    radiograph, returned by ``sampledata.fetch`` in place of the real samples (no download)."""
    thin = Volume(ct_phantom_array((40, 64, 64), seed=3), (0.7, 0.7, 1.0), (-22.4, -22.4, 0.0))
    y, x = np.mgrid[0:96, 0:96] / 95 - 0.5
    img = 0.35 + 0.3 * np.exp(-((x / 0.12) ** 2)) - 0.2 * ((((np.abs(x) - 0.2) / 0.15) ** 2 + (y / 0.35) ** 2) < 1)
    png = tmp_path / "cxr.png"
    sitk.WriteImage(sitk.GetImageFromArray((np.clip(img, 0, 1) * 4000).astype(np.uint16)), str(png))
    files = {"chest-lidc": write_volume(thin, tmp_path / "thin.nii.gz"), "cxr-pa": png}
    monkeypatch.setattr(sampledata, "fetch", lambda name, **kw: Path(files[name]))
    return files


def test_the_readme_python_blocks_run_as_written(stand_in_samples, tmp_path, monkeypatch, capsys):
    import DiffusionCore.sr.adapt as adapt

    monkeypatch.setattr(adapt, "DEFAULT_ADAPT_STEPS", 3)  # AdaptSettings() reads it: 3 steps, not 400, here
    monkeypatch.chdir(tmp_path)
    blocks = readme_python_blocks()
    assert len(blocks) >= 5, "the README's Python API section lost its code blocks (or the extraction broke)"
    namespace: dict = {}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md Python API block {i + 1}", "exec"), namespace)  # noqa: S102
    finally:
        _METHODS.pop("repeat", None)
    printed = capsys.readouterr().out
    assert "(40, 64, 64) (5.0, 0.7, 0.7)" in printed  # the first block's comment says what it prints
    assert namespace["thin"].grid == namespace["reference"].grid
    assert namespace["adapt_report"]["predictor"]["adaptation"]["steps"] == 3
    assert [r["method"] for r in namespace["scores"]["results"]] == ["cubic", "repeat"]
    assert isinstance(namespace["ct"], Volume) and namespace["ct"].shape[0] == namespace["ct"].shape[2]


def _thin() -> Volume:
    return Volume(ct_phantom_array((16, 24, 24), seed=1), (0.8, 0.8, 1.0))


@pytest.mark.parametrize(("result", "said"), [
    (lambda thick, grid: thick.array, "returned numpy.ndarray, not a Volume"),
    (lambda thick, grid: Volume(np.zeros(grid.shape), grid.spacing, (5.0, 0.0, 0.0), grid.direction_matrix),
     "off the reference's grid"),
    (lambda thick, grid: thick, "returned shape"),
], ids=["ndarray", "off-grid", "shape"])  # fmt: skip
def test_a_custom_evaluate_method_that_breaks_its_contract_gets_a_typed_error(result, said):
    register_method("test-broken", lambda thick, grid, options: result(thick, grid))
    try:
        with pytest.raises(MethodResultError, match=said) as caught:
            evaluate(_thin(), 2, methods=["test-broken"])
    finally:
        _METHODS.pop("test-broken", None)
    assert isinstance(caught.value, DiffusionCoreError) and isinstance(caught.value, RuntimeError)
    assert "must return a Volume on the grid it is given" in str(caught.value)


@pytest.mark.parametrize("images", ["stack", "list"])
def test_several_radiographs_are_refused_as_one_radiograph_per_call(images):
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    img = np.random.default_rng(0).random((133, 96)).astype(np.float32)
    given = np.stack([img, img]) if images == "stack" else [img, img]
    with pytest.raises(InputError, match="one radiograph per call. For several, call run once per image"):
        XrayToCTGenerator.tiny().run(given, device="cpu")


def test_a_ct_volume_given_as_a_radiograph_points_to_evaluate_xray():
    from DiffusionCore.xray.radiograph import as_radiograph

    with pytest.raises(InputError, match="is a 3D volume of shape .*give the CT to evaluate-xray"):
        as_radiograph(np.zeros((40, 64, 64), np.float32))


def test_dir_of_the_subpackages_lists_their_lazy_entry_points():
    """Probe 47, finding 11: ``dir()`` and a notebook's tab completion did not show ``SuperResolver`` and
    ``XrayToCTGenerator``, which the subpackages import only when asked for."""
    import DiffusionCore.sr as sr
    import DiffusionCore.xray as xray

    assert "SuperResolver" in dir(sr) and "SRModel" in dir(sr) and "hu_to_unit" in dir(sr)
    assert "XrayToCTGenerator" in dir(xray)
    assert all(hasattr(sr, name) for name in sr.__all__) and all(hasattr(xray, name) for name in xray.__all__)
