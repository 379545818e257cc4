"""``train <family>``: one command for every model family (vae, sr, throughplane, xray).

Each family lives with its model and adds its own sub-command through ``register(train_subparsers)``. What
every family shares is added here, once:

* **numeric options are checked when parsed**: every option named in :data:`NUMERIC_OPTIONS` gets its
  checked type (``finite_float`` / ``bounded_int``), whatever the family declared, so ``--learning-rate nan``,
  ``--ema-decay 2``, ``--checkpoint-every 0`` or ``--max-steps 0`` end with one ``error:`` line and exit
  code 2 before anything is read. Leaving out ``--max-steps`` keeps the config's (for ``train vae`` /
  ``sr`` a config's ``max_steps: 0`` means no limit; for ``train xray`` epochs x steps_per_epoch).
* **the output folder is claimed** for the run (:func:`~DiffusionCore.train.outdir.claim_output_dir`): a
  lock (a second run on the folder refuses, exit code 4), and a folder holding a previous run's checkpoints
  or weights is refused unless ``--resume`` or ``--overwrite`` (added to every family here).
* **how a run ends**: the loop ends at ``--max-steps``, at ``--max-minutes`` or on a ``STOP`` file with a
  checkpoint, the export and exit code 0. SIGTERM or Ctrl-C end it the same way (checkpoint, then export,
  so a stopped background run is not lost) and then exit with 130; during setup or the export they stop at
  once with 130. A second signal aborts without a checkpoint. A loss that becomes NaN/Inf stops the run with
  exit code 1 and no export (``DiffusionCore.train.numerics``).
* **under torchrun only rank 0 logs**: every process runs the same setup; the others log errors only, so each
  setup line and each warning about the user's data comes once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator

from .common import bounded_int, finite_float, sigterm_cancels

#: Modules that add ``train`` sub-commands.
FAMILY_MODULES: list[str] = [
    "DiffusionCore.sr.train_cli",
    "DiffusionCore.sr.throughplane_train",
    "DiffusionCore.xray.train_cli",
]

#: The checked type of every numeric option of any ``train`` family, by option string.
NUMERIC_OPTIONS: dict[str, Callable[[str], object]] = {
    "--max-steps": bounded_int(1),
    "--max-minutes": finite_float(0.0),  # 0: no time limit
    "--epochs": bounded_int(1),
    "--steps-per-epoch": bounded_int(1),
    "--batch-size": bounded_int(1),
    "--learning-rate": finite_float(0.0, low_open=True),
    "--ema-decay": finite_float(0.0, 1.0),  # 0: off; 1 (no averaging at all) is refused with the config
    "--kl-weight": finite_float(0.0),
    "--pixel-loss-weight": finite_float(0.0),
    "--patch-size": bounded_int(1),
    "--val-every": bounded_int(0),  # 0: no validation
    "--checkpoint-every": bounded_int(1),
    "--seed": bounded_int(0),
    "--threads": bounded_int(0),  # 0: torch's default
    "--num-train-timesteps": bounded_int(1),
    "--num-inference-steps": bounded_int(1),
    "--model-channels": bounded_int(1),
    "--factors": bounded_int(2, 8),
}


#: Options naming what a run starts from (another run's folder or weights), by ``args`` attribute.
STARTS_FROM = ("init_from", "load_all_stages", "stage1_checkpoint", "stage2_checkpoint", "vae")

#: Options naming the data a run reads (volumes, folders, list files, a ``prepare-xray-data`` folder), by ``args``
#: attribute: the output folder may not be one of them or lie inside one.
READS_DATA = ("data", "val_data", "data_dir")


def data_inputs(args: argparse.Namespace, names: Iterable[str] = READS_DATA) -> list[str]:
    """The paths given to the options ``names`` of ``args`` (each one path or a list of them; unset ones left out)."""
    found: list[str] = []
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str | os.PathLike):
            value = [value]
        found.extend(str(v) for v in value or () if v)
    return found


def _check_numeric_options(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        for option in action.option_strings:
            if option in NUMERIC_OPTIONS:
                action.type = NUMERIC_OPTIONS[option]


def _output_dir(args: argparse.Namespace) -> str | None:
    return getattr(args, "out_dir", None) or getattr(args, "output_dir", None)


@contextlib.contextmanager
def _quiet_unless_main(is_main: bool) -> Iterator[None]:
    """Under torchrun every process runs the same setup: only rank 0 logs it (its info lines and the warnings about
    the user's data, which would otherwise come once per process); the other ranks still report their errors."""
    log = logging.getLogger("DiffusionCore")
    level = log.level
    if not is_main:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _run_in_claimed_folder(
    family_run: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """A family's command run inside its claimed output folder, ending with 130 when a signal stopped it."""

    def run(args: argparse.Namespace) -> int:
        from ..errors import Cancelled
        from ..files import keep_freed_memory, refuse_overwriting_inputs
        from ..train import stop
        from ..train.outdir import claim_output_dir

        out = _output_dir(args)
        if not out or getattr(args, "show_config", False) or getattr(args, "config_help", False):
            return family_run(args)  # nothing is trained; the family says what is missing
        starts = getattr(args, "init_from", None) or getattr(args, "load_all_stages", None)
        if getattr(args, "resume", False) and starts:
            # a resumed run continues from its checkpoint's weights, and records what it first started from
            # (train xray spells --init-from also --load-all-stages: one dest)
            from ..errors import ConfigError
            from ..sr.throughplane_train import resume_with_init_from

            option = "--init-from" if getattr(args, "init_from", None) else "--init-from / --load-all-stages"
            raise ConfigError(resume_with_init_from(out, option))
        # a one-shot process: every step's activation buffers are reused instead of mapped afresh (train xray
        # went from 29.5 to 37.4 steps per minute on 2 cores, benchmarks/xray_stage1_rays.json)
        # the run's checkpoints, logs and weights never go into the data it reads: a cohort folder scanned again
        # would take them in (or lose its files to --overwrite)
        flag = "--out-dir" if getattr(args, "out_dir", None) else "--output-dir"
        refuse_overwriting_inputs(data_inputs(args), [(flag, out)])
        keep_freed_memory()
        is_main = os.environ.get("RANK", "0") in ("", "0")  # under torchrun rank 0 holds the folder
        reads = [v for k in STARTS_FROM if isinstance(v := getattr(args, k, None), str) and v]
        claim = claim_output_dir(
            out, resume=args.resume, overwrite=args.overwrite, is_main=is_main, reads=reads
        )
        # outside the training loop (setup, export) SIGTERM stops at once (exit 130); the loop installs its
        # own handlers (a clean stop) and puts these back after
        outcome = f" outside its training loop; the checkpoints in {out} (if any) can be continued with --resume"
        with sigterm_cancels(what="training", outcome=outcome), claim, _quiet_unless_main(is_main):
            stop.forget_signals()
            code = family_run(args)
            name = stop.stopped_by_signal()
        if name is not None:
            raise Cancelled(
                f"training was stopped by {name}: the checkpoint and the exported weights in {out} were written "
                "first; continue with --resume"
            )
        return code

    return run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (vae, sr, throughplane, xray); resumable, TensorBoard logs"
    )
    fam = p.add_subparsers(dest="family", metavar="FAMILY", parser_class=type(p))
    fam.required = True
    for name in FAMILY_MODULES:
        importlib.import_module(name).register(fam)
    for parser in {id(q): q for q in fam.choices.values()}.values():  # each once (aliases share one)
        _check_numeric_options(parser)
        trains = any(a.dest in ("out_dir", "output_dir") for a in parser._actions)
        if trains:  # a training run (not export-sr): its output folder is claimed
            parser.add_argument(
                "--overwrite",
                action="store_true",
                help="replace the previous run in the output folder (its checkpoints; its weights when this "
                "run exports) instead of refusing; --resume continues it instead",
            )
            parser.set_defaults(func=_run_in_claimed_folder(parser.get_default("func")))
