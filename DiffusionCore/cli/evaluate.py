"""``evaluate``: score reconstruction methods on simulated thick slices of a thin-slice reference."""

from __future__ import annotations

import argparse
import logging
import math

from ..errors import ConfigError, NumericalError
from ..evaluate import evaluate, format_table
from ..files import check_writable_file, refuse_overwriting_inputs, write_json_atomic
from ..provenance import synthetic_input_warning
from ..sampledata import load_reference
from ..volume import crop_slices
from .common import (
    NameList,
    Progress,
    adapt_settings,
    add_adapt_arguments,
    add_progress_argument,
    device_name,
)

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare methods (nearest, linear, cubic, sr) on simulated thick slices",
        description="Simulate thick slices from a thin-slice CT, reconstruct with each method, print a "
        "table and optionally write JSON.",
    )
    p.add_argument("--reference", required=True, help="thin-slice CT: file, DICOM folder or sample name")
    p.add_argument("--factor", type=int, required=True, help="slices per thick slab (2..8)")
    p.add_argument("--axis", default="z", choices=("z", "y", "x"), help="array axis to degrade (default z)")
    p.add_argument("--degradation", default="slab", choices=("slab", "decimate"), help="default slab")
    p.add_argument(
        "--methods", action=NameList, default=("nearest", "linear", "cubic"),
        help="methods, comma- or space-separated: nearest, linear, cubic, cubic+dc (cubic then the data-consistency step "
        "that sr uses), sr (the weights as they are: sr --no-adapt), sr+adapt (adapted to the thick input "
        "first, what the sr command does by default; --adapt / --adapt-steps change how long)",
    )
    p.add_argument(
        "--slices", type=int, nargs=2, default=None, metavar=("START", "STOP"),
        help="evaluate only reference slices START..STOP-1 along --axis (e.g. a held-out test region)",
    )
    p.add_argument("--weights", default=None, help="weights name or file for model methods (sr)")
    p.add_argument("--allow-unregistered-weights", action="store_true", help="accept a weights file that is in no registry (only files you trust)")
    p.add_argument("--estimate", choices=("mean", "sample"), default=None, help="sr: the posterior mean (one step; the weights' default) or a posterior sample")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps for model methods (sr: implies --estimate sample)")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N (model methods)")
    p.add_argument("--seed", type=int, default=0, help="random seed for model methods")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing JSON file")
    add_adapt_arguments(p)
    add_progress_argument(p)
    p.set_defaults(func=run)


def check_scores(results: list[dict], what: str) -> None:
    """Refuse an evaluation in which a method scored NaN (its reconstruction held NaN voxels): such a row would
    be written as ``null`` and read as a result. An infinite PSNR (an exact reconstruction) is kept.

    Raises:
        NumericalError: exit code 1; nothing is printed or written.
    """
    for row in results:
        bad = [k for k, v in row.items() if isinstance(v, float) and math.isnan(v)]
        if bad:
            label = row.get("method", "?") + (f" (stage {row['stage']})" if "stage" in row else "")
            raise NumericalError(
                f"{what}: method {label} scored NaN ({', '.join(bad)}): its result failed numerically; nothing "
                "was written. Check the weights and options, or run again with --debug and report it."
            )


def run(args: argparse.Namespace) -> int:
    from ..files import keep_freed_memory

    keep_freed_memory()  # a one-shot process: the model's buffers are reused, not mapped afresh
    from ..sr import pipeline  # noqa: F401  (registers the model methods: sr, sr+adapt, cubic+dc)

    methods = list(args.methods)  # unknown names are refused by evaluate() before any work
    adapt = adapt_settings(args)
    if "sr+adapt" in methods and adapt is None:
        raise ConfigError(
            "the method sr+adapt adapts the model, but --no-adapt (or --adapt 0) turns adaptation off: drop one "
            "of them (the method sr is the weights without adaptation)"
        )
    refuse_overwriting_inputs([args.reference, args.weights], [("--json", args.json_out)])
    if args.json_out:
        check_writable_file(args.json_out, overwrite=args.overwrite)
    ref = load_reference(args.reference)
    warning = synthetic_input_warning(args.reference)  # "" for a sample name: no such file
    if warning:
        logger.warning("%s", warning)
    if args.slices is not None:
        ref = crop_slices(ref, args.axis, *args.slices)
    options = {
        "weights": args.weights, "estimate": args.estimate, "num_steps": args.num_steps, "device": args.device,
        "seed": args.seed, "allow_unregistered": args.allow_unregistered_weights, "adapt": adapt,
    }
    progress = Progress(args.progress, desc="evaluate")
    try:
        report = evaluate(
            ref,
            args.factor,
            axis=args.axis,
            degradation=args.degradation,
            methods=methods,
            method_options=options,
            reference_name=str(args.reference),
            progress=progress,
        )
    finally:
        progress.close()
    check_scores(report["results"], "evaluate")
    print(format_table(report))
    if args.json_out:
        write_json_atomic(report, args.json_out)
    return 0
