"""Probe 40: the demo's comparison pictures said no display window, had no orientation letters, a difference column
("HU, +-150") without a colour bar or which sign is red, and no word on whether the axial slice shown is an acquired
(input) slice or one between them. The X-ray pictures said no window and had no scale.

The picture functions run on small synthetic volumes; the figure is caught before it is written
(``demo._save_figure``) and its texts read, and one PNG is written for real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array, rotation_matrix

from DiffusionCore import demo
from DiffusionCore.degrade import thin_grid
from DiffusionCore.interpolation import interpolate
from DiffusionCore.volume import Volume

DIFF = "SR - cubic (HU, +-150)"


@pytest.fixture
def caught(monkeypatch):
    """The figures the picture functions would write, kept open (closed at the end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []

    def keep(fig, path, title, dpi):
        demo._lay_out(fig, title)
        figures.append(fig)
        return path

    monkeypatch.setattr(demo, "_save_figure", keep)
    yield figures
    for fig in figures:
        plt.close(fig)


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _columns(factor: int = 4) -> tuple[dict[str, Volume], Volume]:
    thick = Volume(ct_phantom_array((6, 24, 24), 0), spacing=(0.8, 0.8, 5.0))
    grid = thin_grid(thick, factor)
    cubic = interpolate(thick, grid, "cubic")
    sr = cubic.with_array(cubic.array + 20.0)
    columns = {"input 5.0 mm (nearest)": interpolate(thick, grid, "nearest"), f"cubic x{factor}": cubic,
               f"SR x{factor} (synthetic)": sr, DIFF: sr.with_array(sr.array - cubic.array)}  # fmt: skip
    return columns, thick


def test_the_comparison_picture_states_window_colours_orientation_and_the_axial_slice(tmp_path, caught):
    columns, thick = _columns(4)
    demo.comparison_figure(columns, tmp_path / "c.png", "chest-dx x4", differences=(DIFF,), acquired=thick)
    (fig,) = caught
    texts = _texts(fig)
    joined = "\n".join(texts)
    assert "window W 1600 / L -200 HU" in joined  # DISPLAY_WINDOW -1000..600
    assert "red: SR brighter than cubic" in joined
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "red: SR brighter than cubic" in bars[0].get_ylabel()
    # every view of every column has its letters (an identity LPS grid: R left, L right; A top in the axial view)
    for letter, count in (("R", 8), ("L", 8), ("A", 8), ("P", 8), ("S", 8), ("I", 8)):
        assert texts.count(letter) == count, (letter, texts.count(letter))
    # x4: no thin slice lies at an acquired slice's centre; the middle one 1.875 mm from the nearest
    row = fig.axes[0].get_ylabel()
    assert "axial, slice 13 of 24" in row and "between acquired slices" in row and "1.88 mm" in row


def test_the_axial_slice_note_says_an_acquired_position_or_between():
    columns, thick = _columns(3)  # odd factor: every third thin slice lies at an acquired slice's centre
    thin = columns["cubic x3"]
    notes = [demo.axial_slice_note(thin, thick, k) for k in range(thin.shape[0])]
    assert notes[1] == notes[4] == "at an acquired slice"
    assert notes[0] == "between acquired slices (1.67 mm from the nearest)"
    one = Volume(thick.array[1:2], spacing=thick.spacing)  # one acquired slice, at z = 0
    assert demo.axial_slice_note(thin, one, 17) == "beyond the acquired slices"


def test_an_oblique_grid_is_shown_as_stored_without_letters(tmp_path, caught):
    turned = Volume(ct_phantom_array((8, 16, 16)), spacing=(1.0, 1.0, 2.0), direction=rotation_matrix((0, 0, 1), 45.0))
    demo.comparison_figure({"CT": turned}, tmp_path / "o.png", "oblique")  # x and y halfway between R/L and A/P
    texts = _texts(caught[0])
    assert texts.count("orientation as stored") == 3 and "R" not in texts


def test_the_difference_legend_names_which_sign_is_red():
    assert demo.difference_legend(DIFF) == "red: SR brighter than cubic, blue: SR darker"
    assert demo.difference_legend("residual") == "red: positive, blue: negative"
    assert demo.window_text((-1000.0, 600.0)) == "window W 1600 / L -200 HU"


def test_the_xray_picture_states_the_window_letters_and_a_scale(tmp_path, caught, monkeypatch):
    monkeypatch.setattr(demo, "reprojection", lambda vol, view="pa": vol.array.mean(axis=1))  # no torch needed
    cube = Volume(ct_phantom_array((32, 32, 32), 1), spacing=(10.0, 10.0, 10.0))
    demo.xray_figure(np.zeros((32, 32)), {"generated (synthetic)": cube, "reference CT": cube}, tmp_path / "x.png",
                     "X-ray to CT")  # fmt: skip
    texts = _texts(caught[0])
    joined = "\n".join(texts)
    assert "CT views: window W 1600 / L -200 HU" in joined and "intensity scale 0 to 1" in joined
    assert texts.count("50 mm") == 2  # one scale bar a row, on the axial view: 320 mm wide
    assert texts.count("R") == texts.count("S") == 4  # axial and coronal; coronal and sagittal; two rows


def test_the_pictures_are_still_written(tmp_path):
    columns, thick = _columns(2)
    path = demo.comparison_figure(columns, tmp_path / "chest-dx_comparison.png", "x2", differences=(DIFF,),
                                  acquired=thick)  # fmt: skip
    assert path == tmp_path / "chest-dx_comparison.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["chest-dx_comparison.png"]
