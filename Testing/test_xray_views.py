"""``benchmarks/xray_eval.py views``: the picture the X-ray model card's judgements of anatomy come from (where the
spine is, whether the result follows the radiograph), reproducible for any weights: a row per weights and input with
the input, its PA and lateral re-projections and three views, and a report of the re-projection agreement per row."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg

from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "xray_eval.py"


def test_views_draws_a_row_per_weights_and_input_with_the_lateral_projection(tmp_path, ct_file):
    weights = []
    for seed in (0, 1):
        path = tmp_path / f"tiny{seed}" / "xray_cascade.safetensors"
        path.parent.mkdir()
        UnifiedHybridViTCascade.tiny(seed).save_pretrained(path)
        weights.append(path)
    picture, report = tmp_path / "views.png", tmp_path / "views.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "views", str(picture), "--weights", *map(str, weights),
                          "--reference", str(ct_file), "--inputs", "drr", "--num-samples", "1", "--threads", "1", "--json", str(report)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]

    written = json.loads(report.read_text())
    assert written["num_samples_requested"] == 1
    rows = written["rows"]
    # what each row's generation used, the weights' defaults resolved (no nulls)
    assert all(r["num_samples"] == [1] and all(isinstance(n, int) and n > 0 for n in r["steps"])
               and isinstance(r["lifting_start_t"], float) for r in rows), rows
    assert [(Path(r["weights"]).parent.name, r["input"]) for r in rows] == [("tiny0", "drr"), ("tiny1", "drr")]
    assert [r["weights_sha256"] for r in rows] == [hashlib.sha256(w.read_bytes()).hexdigest() for w in weights]
    assert all(0.0 < r["projection_ncc"] <= 1.0 and r["projection_psnr"] > 0 for r in rows)

    # the reference CT on top and one row per weights: 3 rows of 4.4 in; input, PA and lateral re-projections,
    # axial, coronal, sagittal: 6 columns of 4 in; at 80 dpi
    height, width = mpimg.imread(picture).shape[:2]
    assert (height, width) == (round(3 * 4.4 * 80), 6 * 4 * 80)
