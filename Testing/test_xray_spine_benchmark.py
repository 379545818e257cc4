"""benchmarks/xray_spine.py measures the spine's contrast in the box where the lifting volume puts the column."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _spine_boxes():
    spec = importlib.util.spec_from_file_location("xray_spine_benchmark", ROOT / "benchmarks" / "xray_spine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.spine_boxes


def test_the_spine_box_follows_the_brightest_column_at_the_back_beside_the_midline():
    spine_boxes = _spine_boxes()
    cube = np.full((64, 64, 64), -400.0, np.float32)  # (z, y, x): soft tissue and lung
    cube[:, 44:52, 28:31] = 300.0  # a dense column at the back, left of the midline
    cube[:, 10:20, 30:34] = 900.0  # brighter, but in front (the heart's contrast): not the spine
    xc, spine, beside = spine_boxes(cube)
    assert xc in (28, 29, 30)
    assert cube[spine].mean() > cube[beside].mean() + 100  # the box beside it lies off the column
    assert beside[2].start - spine[2].stop >= 3
