"""``benchmarks/xray_eval.py estimates``: stage 1's first x0 estimate at each start time against the lifting volume
it corrects, the figures behind the X-ray model card's account of where the spine goes. Its lifting-only row must be
the very figure ``evaluate-xray`` prints for the same reference (same cube, same DRR), or the two could not be set
side by side."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from conftest import chest_like_ct

from DiffusionCore.volume import Volume, read_volume, write_volume
from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
from DiffusionCore.xray.evaluate import evaluate_xray
from DiffusionCore.xray.pipeline import XrayToCTGenerator

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "xray_eval.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "estimates", *args, "--threads", "1"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def off_centre_ct(tmp_path_factory) -> Path:
    """A chest-like CT whose body lies about 75 mm off the scan's centre front-to-back, as a table height can put
    it: a cube that is not centred on the body front-to-back, as evaluate-xray's is, scores another volume."""
    path = tmp_path_factory.mktemp("ct") / "off_centre.nii.gz"
    write_volume(Volume(chest_like_ct(rows=36, body_offset=0.3), (14.0, 14.0, 14.0)), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "xray_cascade.safetensors"
    UnifiedHybridViTCascade.tiny(0, resolutions=(16,)).save_pretrained(path)
    return path


def test_estimates_score_each_start_time_beside_the_lifting_volume_evaluate_xray_scores(tmp_path, off_centre_ct,
                                                                                     weights):
    report, picture = tmp_path / "est.json", tmp_path / "est.png"
    run = _run("--reference", str(off_centre_ct), "--weights", str(weights), "--times", "0.5", "1.0", "--draws", "2",
               "--figure", str(picture), "--json", str(report))  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(report.read_text())["rows"]
    assert [(r["volume"], r["t"]) for r in rows] == [("lifting-only", None), ("estimate", 0.5), ("estimate", 1.0)]
    for r in rows[1:]:  # the denoiser moved the lifting volume, and the move is measured in HU
        assert r["mean_abs_change_hu"] > 0.0
        assert r["psnr3d"] != rows[0]["psnr3d"]

    gen = XrayToCTGenerator.from_pretrained(str(weights), allow_unregistered=True)
    same = evaluate_xray(gen, read_volume(off_centre_ct), methods=("lifting-only",), device="cpu")["results"][0]
    assert rows[0]["psnr3d"] == pytest.approx(same["psnr3d"], abs=1e-6)
    assert rows[0]["ssim3d"] == pytest.approx(same["ssim3d"], abs=1e-6)

    # reference, lifting-only, then an estimate and its correction per time: 6 columns of 2.4 in, 2 rows, 80 dpi
    height, width = mpimg.imread(picture).shape[:2]
    assert (height, width) == (round(5.2 * 80), round(6 * 2.4 * 80))


def test_estimates_refuse_a_start_time_outside_the_diffusion(ct_file, weights):
    run = _run("--reference", str(ct_file), "--weights", str(weights), "--times", "0")
    assert run.returncode == 2 and "--times" in run.stderr
