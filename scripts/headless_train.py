"""Train a DiffusionCore model headless, inside 3D Slicer or with plain Python.

Inside Slicer (its Python, its installed torch, no window):

    Slicer --no-main-window --python-script <extension>/scripts/headless_train.py -- \\
        --family throughplane --data /data/ct --output-dir runs/tp1 [--resume] [--init-from sr-default]

Without ``--config``, ``throughplane`` trains the recipe of the shipped sr-default weights (the one
``--init-from sr-default`` fits) and ``xray`` that of xray-default; ``--resume`` continues with the settings the
run recorded.

With plain Python (DiffusionCore installed, e.g. ``pip install -e .[train]``):

    python scripts/headless_train.py --family sr --config sr.json --data /data/ct --output-dir runs/sr1 --device cuda

Options after the known ones are passed to ``python -m DiffusionCore train FAMILY`` unchanged
(e.g. ``--epochs 2 --batch-size 1``). Stop with Ctrl-C or by creating ``<output-dir>/STOP``: the trainer
writes a clean checkpoint first; ``--resume`` continues from it. Exit code: the train command's.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("DiffusionCore")


#: What ``--help`` says after the script's own options: the train command's options it passes on, the most used ones
#: named (the README's examples use them), and where all of them are listed.
PASSED_THROUGH_HELP = """\
other options are passed to `python -m DiffusionCore train FAMILY` unchanged; the most used:
  --init-from WEIGHTS   start from exported weights, e.g. sr-default or xray-default (throughplane, sr, xray)
  --max-steps N         stop after this many steps in total
  --max-minutes M       stop after this many minutes with a clean checkpoint; 0: no limit (throughplane, xray)
  --threads N           torch threads (throughplane)
  --val-data PATH ...   held-out volumes for validation (sr, vae)
  --epochs N, --batch-size N, --seed N (where the family has them)

all of a family's options: python -m DiffusionCore train FAMILY --help (e.g. train throughplane --help)

example:
  headless_train.py --family throughplane --data /data/ct --output-dir runs/tp1 --init-from sr-default \\
      --max-minutes 120
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headless_train.py", description=__doc__.splitlines()[0],
                                epilog=PASSED_THROUGH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("throughplane", "sr", "vae", "xray"), default="throughplane",
                   help="model family to train (throughplane: the shipped SR design, on the CPU)")
    p.add_argument("--config", default=None,
                   help="JSON or YAML training config (default: the shipped weights' recipe for throughplane and "
                        "xray; with --resume, the settings the run recorded)")
    p.add_argument("--data", default=None, help="folder of CT volumes, or a text file listing them")
    p.add_argument("--output-dir", required=True, help="checkpoints, weights, TensorBoard logs, metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    return p


def train_arguments(args: argparse.Namespace, extra: list[str], supported: set[str]) -> list[str]:
    """``python -m DiffusionCore`` arguments for this run (the families name the output option differently)."""
    out_flag = "--output-dir" if "--output-dir" in supported else "--out-dir"
    argv = ["train", args.family, out_flag, args.output_dir]
    for flag, value in (("--config", args.config), ("--data", args.data), ("--device", args.device)):
        if value is not None:
            argv += [flag, value]
    if args.resume:
        argv.append("--resume")
    return argv + extra


def supported_options(family: str) -> set[str]:
    """Option strings of the installed ``train FAMILY`` command."""
    from DiffusionCore.cli.main import build_parser as core_parser

    parser = core_parser()
    for path_part in ("train", family):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or path_part not in subs[0].choices:
            return set()
        parser = subs[0].choices[path_part]
    return {opt for action in parser._actions for opt in action.option_strings}


def script_arguments(argv: list[str]) -> list[str]:
    """The script's own arguments: Slicer passes everything after ``--`` (the separator may remain)."""
    return argv[1:] if argv and argv[0] == "--" else argv


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(script_arguments(sys.argv[1:] if argv is None else argv))
    from DiffusionCore.cli.main import main as core_main

    supported = supported_options(args.family)
    if not supported:
        print(f"error: this DiffusionCore has no 'train {args.family}' command; update it.", file=sys.stderr)
        return 2
    return core_main(train_arguments(args, extra, supported))


def _exit(code: int) -> None:
    """Leave Slicer (when running in it) or the interpreter with ``code``."""
    try:
        import slicer

        app = getattr(slicer, "app", None)
    except ImportError:
        app = None
    if app is not None and hasattr(app, "exit"):
        app.exit(code)  # --no-main-window: without this Slicer keeps running
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
