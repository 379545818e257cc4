"""``train <family>``: one command for every model family (vae, sr, xray).

Each family lives with its model and adds its own sub-command through ``register(train_subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib

#: Modules that add ``train`` sub-commands.
FAMILY_MODULES: list[str] = [
    "DiffusionCore.sr.train_cli",
    "DiffusionCore.sr.throughplane_train",
    "DiffusionCore.xray.train_cli",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (vae, sr, xray); resumable, TensorBoard logs")
    fam = p.add_subparsers(dest="family", metavar="FAMILY", parser_class=type(p))
    fam.required = True
    for name in FAMILY_MODULES:
        importlib.import_module(name).register(fam)
