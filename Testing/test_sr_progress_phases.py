"""The SR progress bar moves through every phase that takes time, each named: adaptation, cubic interpolation (in
chunks, cancel checked between them), the through-plane predictor, data consistency, and in the ``sr`` command the
reading and the writing; it never goes backwards and reaches 1 only once the output is written."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_sr_pipeline import thick_ct

from DiffusionCore.errors import Cancelled
from DiffusionCore.interpolation import interpolate
from DiffusionCore.sr.adapt import AdaptSettings
from DiffusionCore.sr.pipeline import SuperResolver, interpolate_cubic
from DiffusionCore.volume import write_volume

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("adapting to this scan", "interpolating (cubic)", "through-plane predictor", "data consistency", "done")


def phase_of(message: str) -> str | None:
    return next((p for p in PHASES if message.startswith(p)), None)


def record(resolver: SuperResolver, vol, cancel_at: str | None = None, **options):
    """The run's progress calls ``(done, total, message)``; with ``cancel_at``, cancel is set at the first message
    of that phase."""
    calls: list[tuple[int, int, str]] = []
    cancel = threading.Event()

    def progress(done: int, total: int, message: str) -> None:
        calls.append((done, total, message))
        if cancel_at is not None and message.startswith(cancel_at):
            cancel.set()

    resolver.run(vol, progress=progress, cancel=cancel, **options)
    return calls


def test_every_phase_reports_progress_in_order_and_the_bar_never_goes_back():
    calls = record(SuperResolver.tiny_predictor(), thick_ct(shape=(6, 32, 64)), factor=4, adapt=AdaptSettings(steps=3))
    phases = [phase_of(m) for _, _, m in calls]
    assert None not in phases, [m for _, _, m in calls]
    assert list(dict.fromkeys(phases)) == list(PHASES)  # each phase, in order, named
    assert len({t for _, t, _ in calls}) == 1 and calls[-1][0] == calls[-1][1]
    done = [d for d, _, _ in calls]
    assert done == sorted(done)
    # the interpolation moves in chunks, and has units of its own between adaptation and the predictor
    chunks = [(d, m) for d, _, m in calls if m.startswith("interpolating (cubic), ")]
    assert len(chunks) >= 4 and chunks[-1][1].endswith(f"{len(chunks)}/{len(chunks)}")
    last_adapt = max(d for d, _, m in calls if m.startswith("adapting"))
    first_predictor = min(d for d, _, m in calls if m.startswith("through-plane predictor"))
    assert last_adapt < chunks[-1][0] < first_predictor
    # consistency starts below the total and ends at it
    consistency = [d for d, _, m in calls if m.startswith("data consistency")]
    assert consistency[0] < consistency[-1] == calls[-1][1]


def test_a_grid_off_the_predictors_factor_reports_its_resampling():
    calls = record(SuperResolver.tiny_predictor(), thick_ct(), target_spacing=1.5)
    messages = [m for _, _, m in calls]
    assert any(m.startswith("resampling onto the grid (cubic)") for m in messages)
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] == calls[-1][1]


@pytest.mark.parametrize("phase", ["interpolating (cubic)", "data consistency"])
def test_cancel_during_a_phase_stops_the_run(phase):
    resolver, vol = SuperResolver.tiny_predictor(), thick_ct()
    calls: list[str] = []
    cancel = threading.Event()

    def progress(done: int, total: int, message: str) -> None:
        calls.append(message)
        if message.startswith(phase):
            cancel.set()

    with pytest.raises(Cancelled):
        resolver.run(vol, factor=4, progress=progress, cancel=cancel)
    later = PHASES[PHASES.index(phase) + 1:]
    assert not any(m.startswith(later) for m in calls), calls
    if phase.startswith("interpolating"):  # stopped between chunks, not after the whole volume
        assert not any(m.endswith("16/16") for m in calls)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shape", [(40, 37, 41), (48, 50, 40), (36, 72, 64)])
def test_interpolation_in_chunks_equals_the_whole_volume(axis, shape):
    from DiffusionCore.degrade import thin_grid

    vol = thick_ct(shape=shape, spacing=(0.8, 0.8, 0.8))
    spacing = list(vol.spacing_zyx)
    spacing[axis] = 4.0
    vol = type(vol)(vol.array, tuple(spacing[::-1]), vol.origin, vol.direction)
    grid = thin_grid(vol, 4, axis=axis)
    seen = []
    chunked = interpolate_cubic(vol, grid, axis, progress=lambda i, n: seen.append((i, n)))
    assert seen[-1][0] == seen[-1][1] and (len(seen) > 1 or shape != (36, 72, 64))  # odd sizes may need one chunk
    # bit for bit with this machine's BLAS (chunks aligned to its kernels: BLAS_ALIGN); to float rounding on any
    np.testing.assert_allclose(chunked, interpolate(vol, grid, "cubic").array, rtol=0, atol=1e-3)


def test_sr_command_bar_climbs_through_the_phases_and_ends_at_one_after_writing(tmp_path):
    from DiffusionCore.sr.throughplane import tiny_predictor
    from DiffusionCore.sr.throughplane_train import export_predictor

    weights = tmp_path / "tiny-predictor.safetensors"
    export_predictor(tiny_predictor(0), weights, {})
    src, out = tmp_path / "thick.nrrd", tmp_path / "thin.nrrd"
    write_volume(thick_ct(shape=(6, 32, 64)), src)
    res = subprocess.run(
        [sys.executable, "-m", "DiffusionCore", "sr", str(src), str(out), "--weights", str(weights),
         "--allow-unregistered-weights", "--factor", "4", "--adapt-steps", "3", "--progress", "slicer"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    events: list[tuple[str, float]] = []  # (the comment in force, fraction)
    comment = ""
    for line in res.stdout.splitlines():
        if line.startswith("<filter-comment>"):
            comment = line[len("<filter-comment>"):-len("</filter-comment>")]
        elif line.startswith("<filter-progress>"):
            events.append((comment, float(line[len("<filter-progress>"):-len("</filter-progress>")])))
    fractions = [f for _, f in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [c for c, f in events if f == 1.0] == ["written"]  # 1 only at the end of writing
    order = ["reading thick.nrrd", "loading the weights", *PHASES[:-1], "writing thin.nrrd", "written"]
    firsts = [next((i for i, (c, _) in enumerate(events) if c.startswith(o)), None) for o in order]
    assert None not in firsts and firsts == sorted(firsts), list(zip(order, firsts))
    # the bar moves inside each phase of the run
    for phase in PHASES[:3]:
        inside = {f for c, f in events if c.startswith(phase)}
        assert len(inside) >= 2, (phase, inside)
    assert out.exists()
