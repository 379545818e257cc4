"""What the benchmark scripts share: the ``--threads`` option and its default.

The rule, the same in every script: ``--threads`` defaults to ``OMP_NUM_THREADS`` when that is set to a positive
integer (as torch itself reads it), else to 2, the thread count the model cards' figures were measured at. CPU
reductions depend on the thread count, so figures made at another count can differ in their last digits, and the
adapted SR figures (``sr+adapt``) reproduce only at the same thread count: pass ``--threads 2`` to be sure. (The
X-ray evaluation's figures are the same at 1 and 2 threads to the fourth decimal.)

Scripts import it after putting their own folder on ``sys.path`` (run as ``python benchmarks/NAME.py`` that folder is
already there)."""

from __future__ import annotations

import argparse
import os
import re

from DiffusionCore.cli.common import bounded_int

#: The thread count of the published figures (docs/model_cards/sr-default.md: "CPU, 2 threads").
CARD_THREADS = 2

THREADS_HELP = (
    "torch CPU threads (default %(default)s: OMP_NUM_THREADS when set, else 2). Figures made at another thread "
    "count can differ in their last digits, and the adapted SR figures (sr+adapt) reproduce only at the same "
    "thread count (the sr-default model card's figures used 2)"
)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when it is set to a positive integer (its first level, for a nested ``"4,2"``), else
    :data:`CARD_THREADS`."""
    match = re.match(r"\s*(\d+)", os.environ.get("OMP_NUM_THREADS", ""))
    if match and int(match.group(1)) > 0:
        return int(match.group(1))
    return CARD_THREADS


def add_threads_argument(parser: argparse.ArgumentParser, help_extra: str = "") -> None:
    """Add ``--threads`` with the shared default (:func:`default_threads`, read when the parser is built)."""
    parser.add_argument("--threads", type=bounded_int(1), default=default_threads(), metavar="N",
                        help=THREADS_HELP + (f"; {help_extra}" if help_extra else ""))  # fmt: skip
