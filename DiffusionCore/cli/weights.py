"""``weights``: list, import, remove and verify the registered model weights.

Every command that runs a model (``sr``, ``evaluate``, ``xray2ct``, the Slicer modules) takes weights by
registered name, or a file whose sha256 is registered; ``weights import`` registers a file once, so that
it can be used by name without ``--allow-unregistered-weights``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re

from ..errors import WeightsError
from ..weights import registry

FAMILIES = registry.FAMILIES
#: C0 and C1 control characters (ESC, CR, ...): text from a weights file's metadata is shown with them escaped,
#: so that a description cannot clear the screen or fake lines in a listing.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    """``value`` as one line of text, its control characters escaped as in ``repr`` (``\\x1b``, ``\\n``)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="list, import, remove or verify registered model weights",
        description="Model weights are safetensors files registered by name with their sha256: the bundled "
        f"registry ships with the extension, the user registry lives in {registry.user_registry_path()} "
        "(set DIFFUSIONCORE_CACHE to move it).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    ls = actions.add_parser("list", help="the registered weights, bundled first, and whether their file is here")
    ls.add_argument("--family", choices=FAMILIES, default=None, help="only weights of this model family")
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ls.set_defaults(func=_list)

    imp = actions.add_parser(
        "import",
        help="copy a .safetensors file into the user registry under a name",
        description="Copy FILE into the user registry and register it under NAME with its sha256. The file must "
        "be safetensors (pickled .pt/.ckpt files are refused) and say which model family it belongs to.",
    )
    imp.add_argument("file", metavar="FILE", help="the .safetensors weights file (e.g. exported by `train`)")
    imp.add_argument("--name", required=True, help="the name to use with --weights (ASCII letters, digits, . _ -)")
    imp.add_argument("--family", choices=FAMILIES, default=None, help="model family (default: the file's own)")
    imp.add_argument("--description", default=None, help="one sentence for listings (default: the file's own)")
    imp.add_argument("--overwrite", action="store_true",
                     help="replace weights already registered under NAME for another file (importing the same file "
                     "again needs no --overwrite)")
    imp.set_defaults(func=_import)

    rm = actions.add_parser("remove", help="unregister imported weights and delete their copy")
    rm.add_argument("name", metavar="NAME", help="a name listed as 'user' by `weights list`")
    rm.set_defaults(func=_remove)

    ver = actions.add_parser(
        "verify", help="check that registered files exist, match their sha256 and load (dtypes, finite values, "
        "tensors that fit the recorded architecture; exit 3 if one does not)"
    )
    ver.add_argument("names", nargs="*", metavar="NAME", help="names to check (default: all)")
    ver.set_defaults(func=_verify)


def _list(args: argparse.Namespace) -> int:
    entries = registry.list_weights(args.family)
    if args.json:
        print(json.dumps([{**e, "path": str(e["path"])} for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no weights registered{f' for family {args.family}' if args.family else ''}")
        return 0
    for e in entries:  # names, families and descriptions come from registries and weights files: escaped
        state = "available" if e["available"] else "file missing"
        print(f"{printable(e['name']):20s} {printable(e['family']):5s} {e['source']:8s} {state:12s} "
              f"{printable(e['description'])}")
        print(f"{'':20s} sha256 {printable(e['sha256'])}  {printable(e['path'])}")
    return 0


def _register_architecture_checks() -> None:
    """Import the model modules, which register the checks that import and verify compare files with
    (:func:`~DiffusionCore.weights.registry.register_architecture_check`)."""
    from ..sr import pipeline  # noqa: F401
    from ..xray import cascade  # noqa: F401


def _said_by_the_command(record: logging.LogRecord) -> bool:
    """False for the registry's own "imported weights ..." line: ``weights import`` confirms the import once, on
    stdout, with how to use the weights (the library's line is for Python callers)."""
    return not str(record.msg).startswith("imported weights ")


def _import(args: argparse.Namespace) -> int:
    _register_architecture_checks()
    log = logging.getLogger(registry.__name__)
    log.addFilter(_said_by_the_command)
    try:
        rw = registry.import_weights(args.file, args.name, family=args.family, description=args.description,
                                     overwrite=args.overwrite)
    finally:
        log.removeFilter(_said_by_the_command)
    family = printable(args.family or rw.metadata.get("family"))
    print(f"imported {args.name} ({family}, sha256 {rw.sha256}) as {rw.path}; use it with --weights {args.name}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    path = registry.remove_weights(args.name)
    print(f"removed {args.name} ({path})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    _register_architecture_checks()
    checks = registry.verify_weights(args.names or None)
    for c in checks:
        print(f"{printable(c.name):20s} {c.source:8s} {'ok' if c.ok else 'FAILED: ' + printable(c.problem)}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise WeightsError(f"{len(failed)} of {len(checks)} registered weights failed: {', '.join(failed)}")
    return 0
