"""``python -m DiffusionCore <command>``: one entry point for users, Slicer CLIs and scripts.

Errors the user can act on print one ``error: ...`` line on stderr and exit with the error's code
(1 a result that failed its final check, 2 bad input or options, 3 weights, 4 output, 5 resources,
6 sample data, 7 a batch with some volumes failed and the others written, 130 cancelled); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
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


#: The exit codes, as ``--help`` lists them (the classes of :mod:`DiffusionCore.errors` carry them).
EXIT_CODES = ("exit codes: 0 done; 1 a result that failed its final check, or an internal error; 2 bad input or "
              "options; 3 weights; 4 output; 5 resources (memory); 6 sample data; 7 a batch in which some volumes "
              "failed and the others were written; 130 cancelled")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m DiffusionCore", description=__doc__.splitlines()[0], epilog=EXIT_CODES)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def _escape_unencodable_output() -> None:
    """Make stdout and stderr escape what their encoding cannot write (``\\u4e2d``) instead of raising: a cp1252
    or ASCII console must not turn a finished command into an internal error."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # absent on a stream a caller replaced (io.StringIO)
        if reconfigure is not None and getattr(stream, "errors", None) in ("strict", None):
            reconfigure(errors="backslashreplace")


def undecodable_argument(argv: list[str]) -> str | None:
    """The first command-line argument that this locale could not decode, shown with its bytes read as UTF-8;
    None when all are text.

    Under ``LC_ALL=C`` with ``PYTHONUTF8=0``, Python keeps an argument's non-ASCII bytes as lone surrogates. Such
    text cannot reach ITK (the process would abort), a JSON report or the weights registry intact, so the command
    is refused before it starts."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(arg).decode("utf-8", "backslashreplace")
    return None


def main(argv: list[str] | None = None) -> int:
    _escape_unencodable_output()
    bad = undecodable_argument(list(sys.argv[1:] if argv is None else argv))
    if bad is not None:
        print(
            f"error: the argument {bad!r} holds characters that this locale ({sys.getfilesystemencoding()}) "
            "cannot decode; run with a UTF-8 locale (PYTHONUTF8=1 or LANG=C.UTF-8)",
            file=sys.stderr,
        )
        return 2
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
