"""The demo's wiring on small local volumes: the table, the comparison picture, the SR column when SR
weights are registered, and a plain note (not a failure) when none are."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from DiffusionCore import degrade, demo, sampledata, write_volume
from DiffusionCore.cli.main import main
from DiffusionCore.provenance import read_provenance
from DiffusionCore.sr.model import SRModel
from DiffusionCore.weights.registry import import_weights


@pytest.fixture
def local_samples(tmp_path, make_phantom, monkeypatch):
    """chest-lidc / chest-dx stand-ins: a thin phantom and its 4x slab-averaged version on disk."""
    thin = make_phantom(shape=(40, 32, 32), spacing=(0.8, 0.8, 1.0), seed=3)  # its top 30%: 12 slices
    thick = degrade(thin, 4)
    files = {"chest-lidc": tmp_path / "thin.nii.gz", "chest-dx": tmp_path / "thick.nii.gz"}
    write_volume(thin, files["chest-lidc"])
    write_volume(thick, files["chest-dx"])
    monkeypatch.setattr(sampledata, "fetch", lambda name, **kw: files[name])
    return files


def test_demo_without_weights_writes_picture_table_and_says_what_is_missing(local_samples, cache_home, tmp_path,
                                                                              capsys, no_bundled_weights):
    out = tmp_path / "demo out"
    rc = main(["demo", "--output-dir", str(out), "--skip-xray"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "No default SR weights are installed" in printed
    assert "cubic" in printed and "PSNR" in printed
    png = out / "chest-dx_comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    methods = [r["method"] for r in summary["evaluation"]["results"]]
    assert methods == ["nearest", "linear", "cubic"]
    assert summary["notes"] and "timings" in summary
    assert (out / "chest-dx_cubic_x4.nii.gz").exists()
    # the timings are a table: every stage's seconds in one column, however long its name
    rows = printed.split("\ntimings:\n", 1)[1].splitlines()
    rows = [r for r in rows if r.endswith(" s")]
    assert len(rows) >= 3 and len({len(r) for r in rows}) == 1


def test_demo_uses_registered_sr_weights(local_samples, cache_home, tmp_path, capsys, no_bundled_weights):
    weights = tmp_path / "tiny.safetensors"
    SRModel.tiny(seed=0).save(weights, extra_metadata={"description": "tiny random model for tests"})
    import_weights(weights, "tiny-test", family="sr")
    out = tmp_path / "out"
    summary = demo.run_demo(out, skip_xray=True, steps=2)
    methods = [r["method"] for r in summary["evaluation"]["results"]]
    assert methods == ["nearest", "linear", "cubic", "cubic+dc", "sr"]  # no predictor: no sr+adapt
    sr = summary["evaluation"]["results"][-1]
    assert np.isfinite(sr["psnr"]) and sr["seconds"] > 0
    assert (out / "chest-dx_sr_x4.nii.gz").exists()
    assert summary["sr_report"]["weights_sha256"]
    # labelled synthetic as sr labels its results (probe 24: the demo's file had an empty description, no sidecar)
    recorded = read_provenance(out / "chest-dx_sr_x4.nii.gz")
    assert recorded is not None and recorded.task == "sr" and recorded.weights_sha256 == summary["sr_report"]["weights_sha256"]
    assert nib.load(out / "chest-dx_sr_x4.nii.gz").header["descrip"].tobytes().startswith(b"SYNTHETIC")
    assert summary["sr_report"]["settings"]["steps"] == 2  # weights with a diffusion stage take --steps
    assert not any("--steps" in n for n in summary["notes"])
    # the long steps show the commands' progress bar (probe 24: silent for minutes), each ending at 100%
    bars = capsys.readouterr().err
    assert "SR x4: 100%" in bars and "evaluation: 100%" in bars and "100/100" in bars  # evaluation in percent


@pytest.fixture
def sample_reads(monkeypatch) -> list[str]:
    """The sample names the demo fetched (none is served: a refused demo must not get that far)."""
    fetched: list[str] = []

    def fetch(name, **kw):
        fetched.append(name)
        raise AssertionError(f"the demo fetched {name} before refusing its options")

    monkeypatch.setattr(sampledata, "fetch", fetch)
    return fetched


REFUSED_OPTIONS = {
    # options argparse checks when the command line is parsed
    "factor out of range": (["--factor", "99"], 2, "argument --factor: must be an integer from 2 to 8; got 99"),
    "unknown device": (["--device", "gpu"], 2, "argument --device: must be auto, cpu, cuda or cuda:N; got 'gpu'"),
    "steps below 1": (["--steps", "0"], 2, "argument --steps: must be an integer >= 1; got 0"),
    # options checked at the top of run_demo, before the folder is made
    "unknown SR weights": (["--sr-weights", "nope"], 3, "no weights named 'nope'"),
    "X-ray weights as SR weights": (["--sr-weights", "xray-default"], 3,
                                    "weights list --family sr"),  # fmt: skip
    "unknown X-ray weights": (["--xray-weights", "nope"], 3, "no weights named 'nope'"),
    "SR weights as X-ray weights": (["--xray-weights", "sr-default"], 3, "weights list --family xray"),
}


@pytest.mark.parametrize("argv, code, message", list(REFUSED_OPTIONS.values()), ids=list(REFUSED_OPTIONS))
def test_bad_options_are_refused_before_the_demo_reads_or_writes_anything(argv, code, message, sample_reads,
                                                                          cache_home, tmp_path, capsys):
    """A bad --sr-weights, --factor or --device was refused only after the sample data were read and
    chest-dx_cubic_x4.nii.gz written (and left behind)."""
    out = tmp_path / "demo out"
    assert main(["demo", "--output-dir", str(out), *argv]) == code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists() and sample_reads == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_missing_gpu_is_refused_before_any_work(sample_reads, cache_home, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--output-dir", str(out), "--device", "cuda", "--skip-xray"]) == 5
    assert "no CUDA GPU is usable here" in capsys.readouterr().err
    assert not out.exists() and sample_reads == []


def test_an_output_dir_that_is_a_file_is_refused(sample_reads, cache_home, tmp_path, capsys):
    """`demo --output-dir some_existing_file.nii.gz` was an internal error (FileExistsError)."""
    existing = tmp_path / "ct.nii.gz"
    existing.write_bytes(b"the user's file")
    for given, words in ((existing, "ct.nii.gz is a file; give a folder (--output-dir)"),
                         (existing / "sub", "lies under a file")):  # fmt: skip
        assert main(["demo", "--output-dir", str(given), "--skip-xray"]) == 4
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: the output folder") and words in err[0], err
    assert existing.read_bytes() == b"the user's file" and sample_reads == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ct.nii.gz"]


def test_steps_go_to_the_sr_part_only_when_its_weights_sample(local_samples, cache_home, tmp_path, capsys,
                                                              monkeypatch):
    """`demo --steps 4 --skip-xray` always failed with the shipped sr-default (a through-plane predictor): --steps was
    passed to the SR part too, which has no sampling steps."""
    monkeypatch.setattr(demo, "DEMO_ADAPT_STEPS", 1)  # the wiring, not the adaptation, is tested here
    out = tmp_path / "out"
    assert main(["demo", "--output-dir", str(out), "--steps", "4", "--skip-xray", "--sr-weights", "sr-default"]) == 0
    printed = capsys.readouterr().out
    note = ("--steps 4 is not used (the X-ray part is skipped): the SR weights sr-default are a through-plane "
            "predictor without a diffusion stage")  # fmt: skip
    assert note in printed
    summary = json.loads((out / "summary.json").read_text())
    assert any(n.startswith(note) for n in summary["notes"])
    assert [r["method"] for r in summary["evaluation"]["results"]][-2:] == ["sr", "sr+adapt"]
    assert (out / "chest-dx_sr_x4.nii.gz").exists()


@pytest.mark.parametrize("rows, cols, blank", [(4, 6, None), (2, 5, (1, 0))])
def test_a_figure_title_keeps_clear_of_the_panel_titles(rows, cols, blank):
    """The pictures' overall title sits above the top row's panel titles, and each row's panel titles below the
    panels of the row above: the layouts of `xray_eval.py views` (4 rows of 6) and of the demo's X-ray picture
    (2 rows of 5, the first panel of the reference's row blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.4 * rows))
    shown = [(r, c) for r in range(rows) for c in range(cols) if (r, c) != blank]
    for r, c in shown:
        axes[r][c].imshow(np.zeros((8, 8)))
        axes[r][c].set_title("generated (synthetic): re-projection", fontsize=10)
    for ax in axes.flat:
        ax.axis("off")
    text = demo._lay_out(fig, "X-ray to CT from a DRR of chest-dx (seed 0); no ground truth exists for the real radiographs")
    fig.canvas.draw()
    title = text.get_window_extent()
    panel_tops = [axes[0][c].title.get_window_extent().y1 for c in range(cols)]
    clear = [axes[r][c].title.get_window_extent().y1
             <= min(axes[r - 1][j].get_window_extent().y0 for j in range(cols) if (r - 1, j) in shown)
             for r, c in shown if r > 0]  # fmt: skip
    plt.close(fig)
    assert title.y1 <= fig.bbox.height and title.y0 >= max(panel_tops)
    assert all(clear)
