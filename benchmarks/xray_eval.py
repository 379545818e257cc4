"""X-ray to CT figures: DRR agreement with DiffDRR, and the evaluate-xray table.

Usage::

    # DRR agreement and speed (DiffDRR 0.6.1 installed apart from the project, e.g.
    #   pip install --no-deps --target /tmp/diffdrr diffdrr==0.6.1 fastcore torchio pandas jaxtyping ...)
    PYTHONPATH=/tmp/diffdrr python benchmarks/xray_eval.py drr --reference chest-lidc --json drr.json --figure drr.png

    # generation quality per stage against a held-out CT (model, model-raw, mean-ct, lifting-only, lifting+dc; from
    # stage 2 on previous-stage and previous-stage+dc), the mean over three noise seeds (default weights: the shipped xray-default)
    python benchmarks/xray_eval.py evaluate --reference chest-dx --weights runs/s1/xray_cascade.safetensors

    # pictures (no ground truth exists for the real radiographs): per weights, the CT generated from a DRR of
    # the reference CT, from the real PA radiograph and from the CT topogram, each with its PA and lateral
    # re-projections and its axial, coronal and sagittal views through the centre; the reference CT on top
    python benchmarks/xray_eval.py views views.png --weights xray-default runs/s1/xray_cascade.safetensors

    # what stage 1's denoiser does to the lifting volume it corrects: its x0 estimate at each start time (the
    # lifting volume noised to t, pure noise at 1), averaged over noise draws, scored like evaluate against the
    # reference beside the lifting volume itself; --figure draws them and the corrections (estimate - lifting)
    python benchmarks/xray_eval.py estimates --reference chest-lidc --times 0.3 0.6 1.0 --figure estimates.png

The DRR comparison resamples the CT to an identity-direction cube (128^3 over 350 mm, as in training), then
renders a PA cone beam (SDD 1020 mm, SID 850 mm, 200x200 detector at 2 mm) with DiffDRR's Siddon renderer and
with DiffusionCore's ray marcher, twice: on the same attenuation volume (projector geometry agreement) and with
each package's own HU conversion (physics difference). Agreement is the normalised cross-correlation (NCC) after
the best of the 8 flips/transposes (the two packages' detector axes differ by convention; the one used is
reported).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DiffusionCore.files import write_json_atomic  # noqa: E402
from DiffusionCore.sampledata import load_reference  # noqa: E402
from DiffusionCore.xray.data import ct_to_cube  # noqa: E402
from DiffusionCore.xray.drr import DRRGeometry, hu_to_mu, project_parallel_axis, render_drr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_threads_argument  # noqa: E402


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = (a - a.mean()) / (a.std() + 1e-12)
    b = (b - b.mean()) / (b.std() + 1e-12)
    return float((a * b).mean())


def dihedral(img: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for tname, t in (("", img), ("transpose+", img.T)):
        for fname, f in (
            ("identity", t),
            ("flip-rows", t[::-1]),
            ("flip-cols", t[:, ::-1]),
            ("rot180", t[::-1, ::-1]),
        ):
            out[tname + fname] = f
    return out


def best_ncc(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, str]:
    scores = {k: ncc(ours, v) for k, v in dihedral(theirs).items()}
    k = max(scores, key=scores.get)
    return scores[k], k


def drr_agreement(args: argparse.Namespace) -> dict:
    import torchio
    from diffdrr.data import read
    from diffdrr.drr import DRR

    torch.set_num_threads(args.threads)
    ref = load_reference(args.reference)
    cube = ct_to_cube(ref, args.resolution, args.fov_mm)
    sp = cube.spacing[0]
    hu = torch.from_numpy(cube.array)[None, None]
    mu = hu_to_mu(hu)
    geom = DRRGeometry(view="pa", projection="cone", sdd=args.sdd, sid=args.sid, detector_shape=(args.pixels,) * 2,
                       pixel_spacing=(args.delx, args.delx))  # fmt: skip
    # torchio wants (C, i, j, k) with a RAS affine; our cube is LPS with identity direction
    affine = np.diag([-sp, -sp, sp, 1.0])
    affine[:3, 3] = [-cube.origin[0], -cube.origin[1], cube.origin[2]]
    vol_xyz = torch.from_numpy(cube.array.transpose(2, 1, 0).copy())[None]
    subject = read(torchio.ScalarImage(tensor=vol_xyz, affine=affine), orientation="PA")
    drr = DRR(subject, sdd=args.sdd, height=args.pixels, delx=args.delx)
    rot, xyz = torch.zeros(1, 3), torch.tensor([[0.0, args.sid, 0.0]])

    def theirs_render() -> np.ndarray:
        with torch.no_grad():
            return drr(rot, xyz, parameterization="euler_angles", convention="ZXY")[0, 0].numpy()

    t0 = time.perf_counter()
    theirs_own = theirs_render()
    t_theirs = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        ours_cone = render_drr(mu, (sp,) * 3, geom)[0, 0].numpy()
        t_ours_cone = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(10):
            project_parallel_axis(mu, (sp,) * 3, "pa")
        t_ours_par = (time.perf_counter() - t0) / 10
    # same attenuation in both renderers: swap DiffDRR's density for our mu
    subject.density = torchio.ScalarImage(tensor=hu_to_mu(vol_xyz.float()), affine=subject.volume.affine)
    drr_same = DRR(subject, sdd=args.sdd, height=args.pixels, delx=args.delx)
    with torch.no_grad():
        theirs_same = drr_same(rot, xyz, parameterization="euler_angles", convention="ZXY")[0, 0].numpy()
    geo_ncc, geo_t = best_ncc(ours_cone, theirs_same)
    phys_ncc, phys_t = best_ncc(ours_cone, theirs_own)
    oriented = dihedral(theirs_same)[geo_t]
    scale = float((ours_cone * oriented).sum() / max((oriented * oriented).sum(), 1e-12))
    result = {
        "reference": str(args.reference),
        "cube": f"{args.resolution}^3 over {args.fov_mm} mm ({sp:.3f} mm voxels)",
        "geometry": f"PA cone beam, SDD {args.sdd} mm, SID {args.sid} mm, {args.pixels}^2 detector at {args.delx} mm",
        "ncc_same_attenuation": geo_ncc,
        "ncc_own_hu_conversion": phys_ncc,
        "orientation_map": geo_t,
        "line_integral_ratio_ours_over_diffdrr": scale,
        "seconds": {
            "diffdrr_siddon": t_theirs,
            "ours_cone_march": t_ours_cone,
            "ours_parallel_axis": t_ours_par,
        },
        "threads": args.threads,
        "device": "cpu",
    }
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 4, figsize=(16, 4.4))
        panels = [(ours_cone, "DiffusionCore cone (70 keV mu)"), (oriented, "DiffDRR Siddon, same mu"),
                  (dihedral(theirs_own)[phys_t], "DiffDRR own density"),
                  (ours_cone / max(scale, 1e-12) - oriented, f"difference (NCC {geo_ncc:.4f})")]  # fmt: skip
        for a, (img, title) in zip(ax, panels):
            a.imshow(img, cmap="gray")
            a.set_title(title, fontsize=9)
            a.axis("off")
        fig.tight_layout()
        fig.savefig(args.figure, dpi=80)
    return result


def evaluate(args: argparse.Namespace) -> dict:
    from DiffusionCore.xray.data import CLINICAL_LOOK
    from DiffusionCore.xray.evaluate import evaluate_xray, format_xray_table
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    torch.set_num_threads(args.threads)
    gen = (XrayToCTGenerator.from_pretrained(args.weights, allow_unregistered=True) if args.weights
           else XrayToCTGenerator.default())  # fmt: skip
    used = _record_run_settings(gen)
    reference = load_reference(args.reference)
    runs = []
    for seed in args.seeds:
        used.clear()
        report = evaluate_xray(gen, reference, num_stages=args.num_stages, steps=args.steps, seed=seed,
                               num_samples=args.num_samples, lifting_start_t=args.lifting_start,
                               device=args.device, look=tuple(args.look) if args.look else
                               CLINICAL_LOOK if args.processed else None,
                               reference_name=str(args.reference))  # fmt: skip
        report["settings"] = _effective_settings(report["settings"], used, gen, args)
        print(f"seed {seed}")
        print(format_xray_table(report))
        runs.append(report)
    # the mean over the seeds (the generation is a sample; mean-ct, lifting-only and lifting+dc do not depend on it)
    mean = dict(runs[0])
    rows = []
    for i, row in enumerate(runs[0]["results"]):
        same = [r["results"][i] for r in runs]
        rows.append({**row, **{k: float(np.mean([s[k] for s in same])) for k in ("psnr3d", "ssim3d",
                                                                                 "reprojection_psnr", "cross_view_psnr",
                                                                                 "seconds")},
                     "psnr3d_spread": float(np.ptp([s["psnr3d"] for s in same]))})  # fmt: skip
    mean["results"] = rows
    # one record of the seeds: the mean's settings name them all ("seeds"); each per_seed run's settings keep the
    # one seed ("seed") it ran with
    settings = {k: v for k, v in runs[0]["settings"].items() if k != "seed"}
    mean["settings"] = {**settings, "seeds": list(args.seeds), "threads": args.threads}
    mean["per_seed"] = runs
    print(f"mean over seeds {list(args.seeds)}: {settings['steps']} DDIM steps x {settings['num_samples']} samples "
          f"per stage, stage 1 from t {settings['lifting_start_t']:g}, {args.threads} threads")
    print(format_xray_table(mean))
    return mean


def _record_run_settings(gen) -> list[dict]:
    """Make ``gen.run`` (which ``evaluate_xray`` calls, once per generating method) keep the settings its report
    says it used (the steps and samples per stage and the start time, with the weights' defaults resolved);
    returns the list they are appended to."""
    used: list[dict] = []
    run = gen.run

    def recording_run(*args, **kwargs):
        volume, report = run(*args, **kwargs)
        used.append(report["settings"])
        return volume, report

    gen.run = recording_run
    return used


def _effective_settings(settings: dict, used: list[dict], gen, args: argparse.Namespace) -> dict:
    """``evaluate_xray``'s settings with what the generation actually used in place of what was asked for (None:
    the weights' defaults): ``steps`` and ``num_samples`` are integers when every stage used the same (else a list
    per stage; ``steps_per_stage`` / ``num_samples_per_stage`` are always the lists), ``lifting_start_t`` the start
    time; ``*_requested`` keep the command's values (null: the weights' default)."""
    if used:  # from the generator's own report (the same for each generating method)
        steps, samples = list(used[0]["steps"]), list(used[0]["num_samples"])
        start = float(used[0]["lifting_start_t"])
    else:  # no generating method ran: resolved as XrayToCTGenerator.run resolves them
        cfgs = gen.cascade.configs[: settings["num_stages"]]
        steps = [int(args.steps or c.diffusion.sampling_steps) for c in cfgs]
        samples = [int(args.num_samples or c.diffusion.num_samples) for c in cfgs]
        start = float(args.lifting_start if args.lifting_start is not None else cfgs[0].diffusion.lifting_start_t)
    return {
        **settings,
        "steps": steps[0] if len(set(steps)) == 1 else steps,
        "steps_per_stage": steps,
        "steps_requested": args.steps,
        "num_samples": samples[0] if len(set(samples)) == 1 else samples,
        "num_samples_per_stage": samples,
        "num_samples_requested": args.num_samples,
        "lifting_start_t": start,
        "lifting_start_t_requested": args.lifting_start,
    }


#: The inputs ``views`` turns into CTs: "drr" (a DRR of the reference CT) or sample radiographs.
VIEW_INPUTS = ("drr", "cxr-pa", "ct-topogram")


def views(args: argparse.Namespace) -> dict:
    """Draw the ``views`` picture (see the module docstring) and return what it shows, row by row: the
    re-projection agreement with each input (``projection_psnr`` / ``projection_ncc``, as ``xray2ct``
    reports them) and the weights' sha256."""
    from DiffusionCore.demo import xray_rows_figure
    from DiffusionCore.sampledata import fetch
    from DiffusionCore.xray.data import render_training_drr
    from DiffusionCore.xray.pipeline import XrayToCTGenerator
    from DiffusionCore.xray.radiograph import read_radiograph

    torch.set_num_threads(args.threads)
    gens = [XrayToCTGenerator.from_pretrained(w, allow_unregistered=True) if w else XrayToCTGenerator.default()
            for w in args.weights]  # fmt: skip
    cfg = gens[0].cascade.configs[0]
    cube = ct_to_cube(load_reference(args.reference), cfg.resolution, cfg.data.fov_mm)
    drr = render_training_drr(torch.from_numpy(cube.array)[None, None], cfg.data.fov_mm, cfg.xray_resolution,
                              cfg.data.view)[0, 0].numpy()  # fmt: skip
    rows = [(f"{args.reference} (reference)", drr, cube)]
    report = {"reference": str(args.reference), "seed": args.seed, "lifting_start_t_requested": args.lifting_start,
              "num_samples_requested": args.num_samples, "rows": []}  # fmt: skip
    for weights, gen in zip(args.weights, gens):
        label = Path(weights).parent.name if weights and weights.endswith(".safetensors") else weights or "default"
        for source in args.inputs:
            image, fov = (drr, cfg.data.fov_mm) if source == "drr" else (read_radiograph(fetch(source)), None)
            vol, rep = gen.run(image, num_stages=args.num_stages, seed=args.seed, device=args.device, fov_mm=fov,
                               lifting_start_t=args.lifting_start, num_samples=args.num_samples)  # fmt: skip
            seen = gen.prepare_input(image, fov)[0][0, 0].numpy()
            rows.append((f"{label}, {args.reference if source == 'drr' else source}", seen, vol))
            last = rep["stages"][-1]
            used = rep["settings"]  # what the generation used, the weights' defaults resolved
            report["rows"].append({"weights": weights or "default", "weights_sha256": gen.weights_sha256,
                                   "input": source, "projection_psnr": last["projection_psnr"],
                                   "projection_ncc": last["projection_ncc"], "steps": list(used["steps"]),
                                   "num_samples": list(used["num_samples"]),
                                   "lifting_start_t": float(used["lifting_start_t"])})  # fmt: skip
    xray_rows_figure(rows, Path(args.figure), f"X-ray to CT: {', '.join(str(w or 'default') for w in args.weights)}"
                     f" (seed {args.seed}); no ground truth exists for the real radiographs", ("pa", "lateral"))  # fmt: skip
    print(f"picture: {args.figure}")
    return report


def estimates(args: argparse.Namespace) -> dict:
    """Stage 1's x0 estimate from its own sampling start at each time in ``args.times`` (the lifting-only volume
    noised to t; pure noise at t = 1), the mean over ``args.draws`` noise draws, against the reference CT: how far
    the denoiser moves the lifting volume, and whether toward the reference. One pass per draw, no sampling steps
    after it and no consistency step: the denoiser's own first move."""
    from DiffusionCore.intensity import unit_to_hu
    from DiffusionCore.metrics import HU_RANGE, body_mask, hu_mae, psnr, ssim3d
    from DiffusionCore.xray.data import render_training_drr
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    torch.set_num_threads(args.threads)
    gen = (XrayToCTGenerator.from_pretrained(args.weights, allow_unregistered=True) if args.weights
           else XrayToCTGenerator.default())  # fmt: skip
    stage, cfg = gen.cascade.stages[0].eval(), gen.cascade.configs[0]
    r = cfg.resolution
    ref_hu = ct_to_cube(load_reference(args.reference), r, cfg.data.fov_mm).array.astype(np.float32)
    xray = render_training_drr(torch.from_numpy(ref_hu)[None, None], cfg.data.fov_mm, cfg.xray_resolution,
                               cfg.data.view)  # fmt: skip
    body = body_mask(ref_hu)

    def scores(unit: torch.Tensor) -> dict:
        hu = unit_to_hu(unit.float())[0, 0].numpy()
        return {"psnr3d": psnr(ref_hu, hu, hu_range=HU_RANGE), "ssim3d": ssim3d(ref_hu, hu, hu_range=HU_RANGE),
                "mae_body_hu": hu_mae(ref_hu, hu, mask=body, hu_range=HU_RANGE)}  # fmt: skip

    gen_ = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        lifting = stage.lifted_only(xray)
        rows = [{"volume": "lifting-only", "t": None, **scores(lifting)}]
        pictures = [("reference", torch.from_numpy(ref_hu)), ("lifting-only", unit_to_hu(lifting)[0, 0])]
        for t in args.times:
            mean = sum(stage.quick_estimate(xray, generator=gen_, lifting_start_t=t) for _ in range(args.draws))
            mean = mean / args.draws
            rows.append({"volume": "estimate", "t": float(t), **scores(mean),
                         "mean_abs_change_hu": float((unit_to_hu(mean) - unit_to_hu(lifting)).abs().mean())})  # fmt: skip
            pictures.append((f"estimate at t {t:g}", unit_to_hu(mean)[0, 0]))
            pictures.append((f"estimate - lifting, t {t:g}", (unit_to_hu(mean) - unit_to_hu(lifting))[0, 0]))
    print(f"reference: {args.reference}; stage 1 x0 estimate, mean of {args.draws} draws (seed {args.seed})")
    print(f"{'volume':<14}{'t':>6}{'PSNR3D dB':>11}{'SSIM3D':>9}{'MAE body HU':>13}{'change HU':>11}")
    for row in rows:
        t = "" if row["t"] is None else f"{row['t']:.2f}"
        change = f"{row['mean_abs_change_hu']:.1f}" if "mean_abs_change_hu" in row else ""
        print(f"{row['volume']:<14}{t:>6}{row['psnr3d']:>11.2f}{row['ssim3d']:>9.3f}{row['mae_body_hu']:>13.1f}"
              f"{change:>11}")  # fmt: skip
    if args.figure:
        _estimates_figure(pictures, Path(args.figure), f"stage 1 of {args.weights or 'xray-default'}: x0 estimates "
                          f"from the DRR of {args.reference}, mean of {args.draws} draws")  # fmt: skip
        print(f"picture: {args.figure}")
    return {"reference": str(args.reference), "weights_sha256": gen.weights_sha256, "draws": args.draws,
            "seed": args.seed, "hu_range": list(HU_RANGE), "rows": rows}  # fmt: skip


def _estimates_figure(pictures: list, path: Path, title: str) -> None:
    """Axial (at 55% of the height, through the heart) and mid-sagittal planes of each volume; the corrections on a
    blue-white-red scale of +-300 HU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, len(pictures), figsize=(2.4 * len(pictures), 5.2), layout="constrained")
    for i, (name, hu) in enumerate(pictures):
        vol = hu.numpy()
        r = vol.shape[-1]
        style = (dict(cmap="bwr", vmin=-300, vmax=300) if name.startswith("estimate -")
                 else dict(cmap="gray", vmin=-1000, vmax=600))  # fmt: skip
        ax[0, i].imshow(vol[int(r * 0.55)], **style)
        ax[1, i].imshow(vol[::-1, :, r // 2], **style)
        ax[0, i].set_title(name, fontsize=8)
        ax[0, i].axis("off")
        ax[1, i].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("drr", help="DRR agreement and speed against DiffDRR")
    d.add_argument("--reference", default="chest-lidc", help="sample name or path of the CT (default %(default)s)")
    d.add_argument("--resolution", type=int, default=128,
                   help="voxels along each side of the cube the CT is resampled to (default %(default)s)")
    d.add_argument("--fov-mm", type=float, default=350.0, help="side of that cube in mm (default %(default)s)")
    d.add_argument("--sdd", type=float, default=1020.0, help="source to detector distance in mm (default %(default)s)")
    d.add_argument("--sid", type=float, default=850.0, help="source to isocentre distance in mm (default %(default)s)")
    d.add_argument("--pixels", type=int, default=200, help="detector pixels along each side (default %(default)s)")
    d.add_argument("--delx", type=float, default=2.0, help="detector pixel size in mm (default %(default)s)")
    d.add_argument("--figure", default=None, help="PNG of the two renderings and their difference (default: none)")
    e = sub.add_parser("evaluate", help="evaluate-xray table for given weights")
    e.add_argument("--reference", default="chest-dx",
                   help="sample name or path of the CT whose DRR is the input and which scores the result "
                        "(default %(default)s)")
    e.add_argument("--weights", default=None, help="weights name or file (default: the shipped default)")
    e.add_argument("--num-stages", type=int, default=None,
                   help="cascade stages to run and score (default: all the weights have)")
    e.add_argument("--steps", type=int, default=None,
                   help="DDIM sampling steps per stage (default: each stage's diffusion.sampling_steps; the JSON "
                        "records the steps used)")
    e.add_argument("--num-samples", type=int, default=None,
                   help="samples averaged per stage (default: each stage's diffusion.num_samples; the JSON records "
                        "the samples used)")
    e.add_argument("--lifting-start", type=float, default=None,
                   help="stage 1's start time from the lifting-only volume (1: from noise; default: the weights' "
                        "diffusion.lifting_start_t; the JSON records the time used)")
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="noise seeds, one run each; the table is their mean (default %(default)s)")
    e.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default %(default)s)")
    looks = e.add_mutually_exclusive_group()
    looks.add_argument("--processed", action="store_true",
                   help="give the DRR the look of a processed clinical radiograph first (data.CLINICAL_LOOK: "
                        "unsharp masking and flattened broad contrast, the histogram kept; default: a plain DRR)")
    looks.add_argument("--look", type=float, nargs=3, default=None, metavar=("AMOUNT", "SIGMA", "FLATTEN"),
                   help="like --processed with this look (xray.data.clinical_look: unsharp-mask gain, its sigma in "
                        "pixels of 128^2, share of the broad contrast removed; e.g. 1.5 3 1.0 for an equalised "
                        "radiograph whose lateral chest walls are as bright as its midline; default: a plain DRR)")
    v = sub.add_parser("views", help="pictures with PA and lateral re-projections for given weights")
    v.add_argument("figure", help="PNG to write")
    v.add_argument("--weights", nargs="+", default=[None],
                   help="weights names or files, a block of rows each (default: the shipped default)")
    v.add_argument("--reference", default="chest-dx",
                   help="the CT on top, whose DRR is the 'drr' input (default %(default)s)")
    v.add_argument("--inputs", nargs="+", default=list(VIEW_INPUTS), choices=VIEW_INPUTS,
                   help="what each weights turns into a CT: drr (a DRR of the reference) or sample radiographs "
                        "(default %(default)s)")
    v.add_argument("--num-stages", type=int, default=1, help="cascade stages to run (default %(default)s)")
    v.add_argument("--lifting-start", type=float, default=None,
                   help="stage 1's start time from the lifting-only volume (1: from noise; default: the weights' "
                        "diffusion.lifting_start_t)")
    v.add_argument("--num-samples", type=int, default=None,
                   help="samples averaged per stage (default: each stage's diffusion.num_samples)")
    v.add_argument("--seed", type=int, default=0, help="noise seed of every row (default %(default)s)")
    v.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default %(default)s)")
    s = sub.add_parser("estimates", help="stage 1's x0 estimate at each start time against the lifting volume")
    s.add_argument("--reference", default="chest-lidc",
                   help="the CT whose DRR is the input, and the reference (default %(default)s)")
    s.add_argument("--weights", default=None, help="weights name or file (default: the shipped default)")
    s.add_argument("--times", type=float, nargs="+", default=[0.3, 0.6, 0.9, 1.0],
                   help="start times (the lifting volume noised to t; 1: pure noise; default %(default)s)")
    s.add_argument("--draws", type=int, default=8, help="noise draws averaged per time (default %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default %(default)s)")
    s.add_argument("--figure", default=None, help="PNG to write (axial and sagittal planes; default: none)")
    for q in (d, e, v, s):
        add_threads_argument(q)
        q.add_argument("--json", default=None, help="JSON file to write the results to (default: none)")
    args = p.parse_args()
    if args.what == "estimates" and (args.draws < 1 or not all(0.0 < t <= 1.0 for t in args.times)):
        p.error("--draws must be at least 1 and every --times value in (0, 1]")
    result = {"drr": drr_agreement, "evaluate": evaluate, "views": views, "estimates": estimates}[args.what](args)
    if args.what == "drr":
        print(json.dumps(result, indent=2, default=str))
    if args.json:
        write_json_atomic(result, args.json)


if __name__ == "__main__":
    main()
