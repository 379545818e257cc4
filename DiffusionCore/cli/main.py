"""``python -m DiffusionCore <command>``: one entry point for users, Slicer CLIs and scripts.

Errors the user can act on print one ``error: ...`` line on stderr and exit with the error's code
(1 a result that failed its final check, 2 bad input or options, 3 weights, 4 output, 5 resources,
6 sample data, 130 cancelled); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .common import run_guarded, setup_logging

#: Modules of DiffusionCore.cli that each add one or more sub-commands through ``register(subparsers)``.
COMMAND_MODULES = [
    "prepare_latents",
    "evaluate",
    "sample_data",
    "demo",
    "sr",
    "xray",
    "train",
    "weights",
]

logger = logging.getLogger("DiffusionCore")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error convention: one ``error:`` line that names the command's ``--help``
    (not argparse's usage block, 15-20 lines for most commands), exit code 2."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}; see {self._command_prog()} --help", file=sys.stderr)
        sys.exit(2)

    def _command_prog(self) -> str:
        """The ``prog`` of the deepest command named on the command line (``python -m DiffusionCore train
        throughplane``): an unknown option is reported by the top-level parser, which has no name for it."""
        parser: argparse.ArgumentParser = self
        argv = getattr(self, "_argv", [])
        while parser._subparsers is not None:
            commands = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
            name = next((t for t in argv if t in commands.choices), None)
            if name is None:
                break
            parser, argv = commands.choices[name], argv[argv.index(name) + 1 :]
        return parser.prog


#: What the out-of-memory error advises unless the command sets its own (``set_defaults(memory_hint=...)``).
DEFAULT_MEMORY_HINT = "use smaller patches (--patch-size) or fewer samples"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m DiffusionCore", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a refused option (exit 2) or --help (0): returned, like every other outcome
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    setup_logging(args.verbose)
    return run_guarded(
        lambda: args.func(args),
        debug=args.debug,
        memory_hint=getattr(args, "memory_hint", DEFAULT_MEMORY_HINT),  # a command's own advice, where it has one
    )


if __name__ == "__main__":
    sys.exit(main())
