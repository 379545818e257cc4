#!/usr/bin/env python-real
"""Slicer scripted CLI: train a DiffusionCore model (``python -m DiffusionCore train FAMILY ...``).

Runs the way Slicer runs a scripted CLI (flags, booleans as bare flags) and as a plain script:

    python DiffusionTrain.py --family throughplane --data /data/ct --outputDirectory runs/tp1 --resume

Stopping: SIGTERM/SIGINT, or a file named ``STOP`` in the output folder, ends training after a clean
checkpoint (DiffusionCore.train.stop). Metrics stream to ``metrics.jsonl`` in the output folder (plotted
by the modules' training panel) and, where TensorBoard is installed, to TensorBoard. A folder that
holds a previous run is refused unless ``--resume`` (continue it) or ``--overwrite`` (replace it).
"""

from __future__ import annotations

import argparse
import sys

#: The model families ``train`` has: throughplane is the shipped SR design (the through-plane predictor, trained on
#: the CPU), sr the latent diffusion stage, vae its autoencoder, xray the radiograph-to-CT cascade.
FAMILIES = ("throughplane", "sr", "vae", "xray")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=FAMILIES, default="throughplane")
    p.add_argument("--config", default="", help="JSON or YAML training config")
    p.add_argument("--data", default="",
                   help="folder of CT volumes, a text file listing them, or CT sample names (chest-lidc chest-dx)")
    p.add_argument("--outputDirectory", default="", help="checkpoints, weights and logs go here")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the previous run in the output folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--extraArguments", default="", help="more options of the train command")
    p.add_argument("--returnparameterfile", default="", help="accepted for Slicer; nothing is returned")
    return p


def attach_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with each value of an option that takes one attached to it (``--extraArguments=--seed=3``).

    Slicer's CLI launcher (and the training panel) pass a string parameter as its flag followed by the value, two
    items. argparse reads a value that starts with ``--`` and holds no space (``--seed=3``, ``--finetune-decoder``:
    one option typed into Extra options) as an option of its own, and stopped with "expected one argument"; attached
    with ``=`` it is the value, whatever it starts with.
    """
    takes_value = {flag for action in parser._actions if action.nargs is None for flag in action.option_strings}
    out: list[str] = []
    items = iter(argv)
    for item in items:
        if item in takes_value:
            value = next(items, None)
            out.append(item if value is None else f"{item}={value}")  # a flag without a value: argparse says so
        else:
            out.append(item)
    return out


def train_argv(args: argparse.Namespace, supported: set[str]) -> list[str]:
    """The argument list of ``python -m DiffusionCore`` for this run.

    Args:
        args: parsed CLI arguments.
        supported: option strings the installed ``train FAMILY`` command accepts.

    Raises:
        ValueError: a value was given for an option the installed command does not have.
    """
    argv = ["train", args.family]
    output_flag = "--output-dir" if "--output-dir" in supported else "--out-dir"  # families spell it differently
    wanted = [
        ("--config", args.config),
        ("--data", args.data),
        (output_flag, args.outputDirectory),
        ("--device", args.device),
    ]
    for flag, value in wanted:
        if not value:
            continue
        if flag not in supported:
            raise ValueError(f"'train {args.family}' has no {flag} option in this DiffusionCore; update the extension.")
        argv += [flag, *(data_entries(value) if flag == "--data" else [str(value)])]
    for flag, on in (("--resume", args.resume), ("--overwrite", args.overwrite)):
        if not on:
            continue
        if flag not in supported:
            raise ValueError(f"'train {args.family}' has no {flag} option in this DiffusionCore; update the extension.")
        argv.append(flag)
    if "--progress" in supported:
        argv += ["--progress", "slicer"]
    argv += extra_options(args.extraArguments)
    return argv


def data_entries(text: str) -> list[str]:
    """The values of ``--data`` for the train command: a folder, list file or volume (the whole text, when it is a path
    here), or CT sample names and paths separated by spaces (``chest-lidc chest-dx``), as the command line takes them
    (:func:`DiffusionCore.sampledata.data_entries`).

    Raises:
        ValueError: an entry that is neither a path here nor a CT sample's name (the message says which).
    """
    from DiffusionCore.errors import InputError
    from DiffusionCore.sampledata import data_entries as entries

    try:
        return entries(text, "ct")
    except InputError as exc:
        raise ValueError(f"--data: {exc}") from None


#: Options the panel sets in fields of its own: given again in Extra options they would override those fields (the
#: run would train into another folder than the panel follows and stops).
PANEL_OPTIONS = {"--config", "--data", "--out-dir", "--output-dir", "--device", "--resume", "--overwrite", "--progress"}


def extra_options(text: str, windows: bool | None = None) -> list[str]:
    """The options of the Extra options field, split as a shell of this computer would
    (:func:`DiffusionCore.sampledata.split_words`: on Windows, ``windows``, the backslashes of ``C:\\...`` paths kept).

    Raises:
        ValueError: the text cannot be split (an unclosed quote), or it sets what a field of the panel sets.
    """
    from DiffusionCore.sampledata import split_words

    try:
        extra = split_words(text, windows)
    except ValueError as exc:
        raise ValueError(f"Extra options ({text!r}) cannot be read: {exc}; check its quotes") from None
    clash = sorted({token.split("=", 1)[0] for token in extra} & PANEL_OPTIONS)
    if clash:
        raise ValueError(f"Extra options sets {', '.join(clash)}, which the panel's own fields set: set it there "
                         "instead (the run would otherwise not be the one the panel shows and stops)")
    return extra


def family_options(family: str) -> set[str]:
    """Option strings of the installed ``train FAMILY`` command."""
    from DiffusionCore.cli.main import build_parser as core_parser

    def find(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser | None:
        if not path:
            return parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and path[0] in action.choices:
                return find(action.choices[path[0]], path[1:])
        return None

    sub = find(core_parser(), ["train", family])
    if sub is None:
        return set()
    return {opt for action in sub._actions for opt in action.option_strings}


def _core_main():
    import torch  # noqa: F401  (training needs it; imported here so that a missing torch is said before anything runs)

    from DiffusionCore.cli.main import main

    return main


def main(argv: list[str] | None = None) -> int:
    try:  # stdlib only, inside DiffusionCore: fails only where DiffusionCore itself is missing
        from DiffusionCore.cli.missing import needs_packages, own_torch_cache
    except ImportError as exc:
        sys.exit(f"error: DiffusionCore is not installed in this Python ({exc}); install the extension again.")

    with own_torch_cache():  # before torch is imported: no torchinductor folder left in the temp folder
        return _main(argv, needs_packages)


def _main(argv: list[str] | None, needs_packages) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_values(sys.argv[1:] if argv is None else list(argv), parser))
    core_main = needs_packages(_core_main, "CT Diffusion SR")
    supported = family_options(args.family)
    if not supported:
        print(
            f"error: this DiffusionCore has no 'train {args.family}' command; update the extension.",
            file=sys.stderr,
        )
        return 2
    if not args.outputDirectory:
        print("error: set an output folder (--outputDirectory) for checkpoints and logs.", file=sys.stderr)
        return 2
    try:
        argv_core = train_argv(args, supported)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return core_main(argv_core)


if __name__ == "__main__":
    sys.exit(main())
