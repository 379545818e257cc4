"""The Slicer modules' path against the engine on the real DICOM samples: largest voxel difference, in HU.

Each sample is read by Slicer's own reader (slicer-core's archetype storage node, as the DICOM module loads it) into a
node marked as loaded from the DICOM database, and run through the module's background job (the scripted CLI in a
process, as in Slicer); the same file is run through the engine directly (``read_radiograph`` / ``read_volume`` and
the pipeline). The two volumes should be the same: what the modules hand their CLI (pixels, spacing, the DICOM
header's view, orientation and slice thickness) must not change the result.

    python benchmarks/slicer_parity.py                  # cxr-pa, ct-topogram (X-ray to CT), chest-dx x4 (SR)
    python benchmarks/slicer_parity.py --skip-sr        # the radiographs only (seconds; SR: about 4 minutes)

``slicer.dicomDatabase`` (ctkDICOMDatabase, the Slicer application's) is stood in for by an object with its
``fileForInstance``; everything else is the modules' own code on real MRML nodes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for module in ("CTDiffusionSR", "XrayToCT"):
    if str(ROOT / module) not in sys.path:
        sys.path.insert(0, str(ROOT / module))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-sr", action="store_true",
                        help="only the radiographs (the SR runs, adapted as Apply does, take about 4 minutes on 2 cores)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import slicer
    from CTDiffusionSRLib import mrml_io
    from CTDiffusionSRLib.process import JobState
    from CTDiffusionSRLib.sr_logic import SRJob, SRSettings
    from CTDiffusionSRLib.testing import DicomDatabaseStandIn, load_dicom_node
    from XrayToCTLib import XrayJob, XraySettings

    from DiffusionCore import sampledata
    from DiffusionCore.sr.adapt import DEFAULT_ADAPT_STEPS, AdaptSettings
    from DiffusionCore.sr.pipeline import SuperResolver
    from DiffusionCore.volume import read_volume
    from DiffusionCore.xray.pipeline import XrayToCTGenerator
    from DiffusionCore.xray.radiograph import read_radiograph

    database = DicomDatabaseStandIn()
    slicer.dicomDatabase = database
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    rows = []
    generator = XrayToCTGenerator.from_pretrained("xray-default")
    for sample in ("cxr-pa", "ct-topogram"):
        path = Path(sampledata.fetch(sample))
        node = load_dicom_node(scene, [path], sample, database)
        job = XrayJob(scene, node, XraySettings(device=args.device))
        if job.run(timeout=600) != JobState.COMPLETED:
            raise RuntimeError(f"{sample}: the module's job failed: {job.error}")
        module = mrml_io.volume_from_node(job.result_nodes[0])
        engine, _ = generator.run(read_radiograph(path), device=args.device)
        rows.append((f"X-ray to CT, {sample}", module, engine))
    if not args.skip_sr:
        folder = Path(sampledata.fetch("chest-dx")).parent / "dicom"
        node = load_dicom_node(scene, sorted(folder.glob("*.dcm")), "chest-dx", database)
        job = SRJob(scene, node, SRSettings(factor=4, device=args.device))  # adapted to the scan, as Apply does
        if job.run(timeout=900) != JobState.COMPLETED:
            raise RuntimeError(f"chest-dx: the module's job failed: {job.error}")
        module = mrml_io.volume_from_node(job.result_nodes[0])
        engine, _ = SuperResolver.from_pretrained("sr-default").run(
            read_volume(folder), factor=4, device=args.device, adapt=AdaptSettings(steps=DEFAULT_ADAPT_STEPS))
        rows.append(("SR x4 adapted, chest-dx", module, engine))
    print(f"{'case':32} {'shape':>16} {'voxel mm (module / engine)':>30} {'largest |difference| HU':>24}")
    worst = 0.0
    for case, module, engine in rows:
        same_grid = module.shape == engine.shape and np.allclose(module.index_to_physical(), engine.index_to_physical(),
                                                                  atol=1e-3)  # fmt: skip
        diff = float(np.abs(module.array - engine.array).max()) if same_grid else float("inf")
        worst = max(worst, diff)
        spacing = f"{min(module.spacing):.3f} / {min(engine.spacing):.3f}"
        print(f"{case:32} {'x'.join(map(str, module.shape)):>16} {spacing:>30} {diff:>24.3f}")
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
