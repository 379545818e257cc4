"""Where X-ray to CT loses the spine on real radiographs: the lifting volume, the consistency step, the diffusion.

No ground truth exists for a real radiograph, so this measures a contrast, not an error. The place of the spine
is taken from stage 1's lifting volume itself (the depth-lifted radiograph before any diffusion, which shows a
column at the back of the chest): the brightest 5-voxel column within 6 voxels of the midline, in the back third
of the cube (y from 62% to 85% of the side), over the middle 60% of the slices. For each volume the script prints
the mean HU in that box ("spine"), in the box of the same size 6-10 voxels to the side ("beside"), and their
difference ("contrast"):

* ``lifting`` and ``lifting+dc``: the lifting volume, and after the re-projection consistency step;
* ``start T`` with and without ``dc``: the generated CT (``xray2ct``'s defaults, seed ``--seed``), sampling
  started from the lifting volume noised to time T (``--starts``; 1.0 = from noise, what ``xray2ct`` does), with
  and without the consistency step.

A contrast that the consistency step or the diffusion takes away is a spine column the result loses. The picture
(``--figure``) shows the sagittal plane through that column for each volume, one row per input.

Usage::

    python benchmarks/xray_spine.py out.json [--inputs cxr-pa ct-topogram] [--weights NAME_OR_FILE]
        [--starts 0.02 1.0] [--figure spine.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from DiffusionCore.files import write_json_atomic
from DiffusionCore.intensity import unit_to_hu
from DiffusionCore.sampledata import fetch
from DiffusionCore.xray.consistency import drr_consistency
from DiffusionCore.xray.pipeline import XrayToCTGenerator
from DiffusionCore.xray.radiograph import read_radiograph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_threads_argument  # noqa: E402


def spine_boxes(lifting_hu: np.ndarray) -> tuple[int, tuple[slice, ...], tuple[slice, ...]]:
    """``(x of the column, spine box, box beside it)`` in a (z, y, x) cube, from the lifting volume (see the module
    docstring)."""
    n = lifting_hu.shape[-1]
    zs, ys = slice(int(n * 0.2), int(n * 0.8)), slice(int(n * 0.62), int(n * 0.85))
    xs = slice(n // 2 - 6, n // 2 + 6)
    xc = xs.start + int(np.argmax(lifting_hu[zs, ys, xs].mean(axis=(0, 1))))
    return xc, (zs, ys, slice(xc - 2, xc + 3)), (zs, ys, slice(xc + 6, xc + 11))


def measure(gen: XrayToCTGenerator, source: str, starts: list[float], seed: int) -> tuple[dict, list]:
    stage, cfg = gen.cascade.stages[0], gen.cascade.configs[0]
    image = read_radiograph(fetch(source))
    xray, fov, _ = gen.prepare_input(image, None)
    with torch.no_grad():
        lifted = stage.lifted_only(xray)
    lifted_dc, _ = drr_consistency(lifted, xray, fov, cfg.data.view)
    volumes = [("lifting", unit_to_hu(lifted)[0, 0].numpy()), ("lifting+dc", unit_to_hu(lifted_dc)[0, 0].numpy())]
    for t in starts:
        for dc in (False, True):
            vol, _ = gen.run(image, num_stages=1, seed=seed, lifting_start_t=t, consistency=dc)
            volumes.append((f"start {t:g}{' dc' if dc else ''}", np.asarray(vol.array, dtype=np.float32)))
    xc, spine, beside = spine_boxes(volumes[0][1])
    rows = []
    for name, v in volumes:
        s, b = float(v[spine].mean()), float(v[beside].mean())
        rows.append({"volume": name, "spine_hu": round(s, 1), "beside_hu": round(b, 1), "contrast_hu": round(s - b, 1)})
    return {"input": source, "column_x": xc, "rows": rows}, [(name, v[:, :, xc]) for name, v in volumes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="JSON file for the figures")
    parser.add_argument("--inputs", nargs="+", default=["cxr-pa", "ct-topogram"], help="radiograph sample names")
    parser.add_argument("--weights", default=None, help="X-ray to CT weights (default: xray-default)")
    parser.add_argument("--starts", nargs="+", type=float, default=[0.02, 1.0], help="sampling start times")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    parser.add_argument("--figure", default=None, help="PNG of the sagittal planes through the column")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = (XrayToCTGenerator.from_pretrained(args.weights, allow_unregistered=True) if args.weights
           else XrayToCTGenerator.default())  # fmt: skip
    report = {"weights_sha256": gen.weights_sha256, "seed": args.seed, "inputs": []}
    pictures = []
    for source in args.inputs:
        result, planes = measure(gen, source, args.starts, args.seed)
        report["inputs"].append(result)
        pictures.append((source, planes))
        print(f"{source} (column at x {result['column_x']}): spine / beside / contrast, HU")
        for row in result["rows"]:
            print(f"  {row['volume']:16s} {row['spine_hu']:8.1f} {row['beside_hu']:8.1f} {row['contrast_hu']:8.1f}")
    write_json_atomic(report, args.output)
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = max(len(planes) for _, planes in pictures)
        fig, ax = plt.subplots(len(pictures), cols, figsize=(3 * cols, 3.3 * len(pictures)), squeeze=False)
        for r, (source, planes) in enumerate(pictures):
            for c, (name, plane) in enumerate(planes):
                ax[r, c].imshow(plane, cmap="gray", vmin=-1000, vmax=600)
                ax[r, c].set_title(f"{source}: {name}", fontsize=8)
        for a in ax.ravel():
            a.axis("off")
        fig.tight_layout()
        fig.savefig(Path(args.figure), dpi=70)
        print(f"picture: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
