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
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

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


class CommandParser(argparse.ArgumentParser):
    """argparse with the project's error convention: one ``error:`` line that names the command's ``--help``
    (not argparse's usage block, 15-20 lines for most commands), exit code 2."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        command, argv = self._command()
        dashed = _dash_led_path(command, argv)
        if dashed is not None:  # argparse took it for an option: what it says next (required: INPUT) misleads
            message = f"{dashed} looks like an option: write ./{dashed}, or put -- before the paths"
        else:
            message = _without_hidden_arguments(message, command)
        print(f"error: {message}; see {command.prog} --help", file=sys.stderr)
        sys.exit(2)

    def _command(self) -> tuple[argparse.ArgumentParser, list[str]]:
        """The parser of the deepest command named on the command line (``python -m DiffusionCore train
        throughplane``), and the arguments after that command's name: an unknown option is reported by the
        top-level parser, which has no name for it."""
        parser: argparse.ArgumentParser = self
        argv = getattr(self, "_argv", [])
        while parser._subparsers is not None:
            commands = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
            name = next((t for t in argv if t in commands.choices), None)
            if name is None:
                break
            parser, argv = commands.choices[name], argv[argv.index(name) + 1 :]
        return parser, argv


_REQUIRED = re.compile(r"(the following arguments are required: )(.*)")


def _without_hidden_arguments(message: str, parser: argparse.ArgumentParser) -> str:
    """argparse's ``required: OUTPUT, extra_paths`` without the positionals ``--help`` hides (``extra_paths``, which
    takes the paths after OUTPUT only to refuse them with advice): the user cannot give what is not documented."""
    found = _REQUIRED.fullmatch(message)
    if found is None:
        return message
    hidden = set()
    for action in parser._actions:
        if not action.option_strings and action.help == argparse.SUPPRESS:
            hidden.update({action.dest, action.metavar})
    shown = [name for name in found.group(2).split(", ") if name not in hidden]
    return found.group(1) + ", ".join(shown) if shown else message


def _path_suffixes() -> tuple[str, ...]:
    """Endings of the file names the commands take: volumes, DICOM, radiographs, lists, weights, reports."""
    from ..files import LIST_SUFFIXES, VOLUME_SUFFIXES
    from ..xray.radiograph import IMAGE_SUFFIXES

    return (*VOLUME_SUFFIXES, ".dcm", *IMAGE_SUFFIXES, *LIST_SUFFIXES, ".safetensors", ".json")


def _dash_led_path(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The first argument before ``--`` that argparse takes for an option but that names a file: one that exists,
    or whose name ends like a volume, image or weights file (``-in.nii.gz``); None when there is none."""
    options = parser._option_string_actions
    for token in argv:
        if token == "--":
            break
        if len(token) < 2 or not token.startswith("-") or token in options or token.split("=", 1)[0] in options:
            continue
        if os.path.lexists(token) or token.lower().endswith(_path_suffixes()):
            return token
    return None


#: What the out-of-memory error advises unless the command sets its own (``set_defaults(memory_hint=...)``) or
#: :data:`MEMORY_HINTS` has advice for it.
DEFAULT_MEMORY_HINT = "use smaller patches (--patch-size) or fewer samples"

#: The out-of-memory advice of commands that set none themselves, by command name. ``sr``'s holds whatever the
#: weights: the shipped through-plane predictor takes no patches and draws no samples (--patch-size has no effect
#: with it), while a diffusion model takes both.
MEMORY_HINTS = {
    "sr": "use a smaller --factor (or a larger --target-spacing), --no-adapt, or a --memory-limit below this "
    "machine's free memory; with weights that take them, fewer --num-samples or a smaller --patch-size",
    "evaluate": "use fewer --methods, a smaller --factor, or a smaller region (--slices)",
}


#: The exit codes, as ``--help`` lists them (the classes of :mod:`DiffusionCore.errors` carry them).
EXIT_CODES = ("exit codes: 0 done; 1 a result that failed its final check, or an internal error; 2 bad input or "
              "options; 3 weights; 4 output; 5 resources (memory); 6 sample data; 7 a batch in which some volumes "
              "failed and the others were written; 130 cancelled")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m DiffusionCore", description=__doc__.splitlines()[0], epilog=EXIT_CODES)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
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


def undecodable_argument_advice(shown: str) -> str:
    """What to do about an argument :func:`undecodable_argument` found (``shown``: its bytes read as UTF-8). Under a
    UTF-8 locale its bytes are in another encoding (a Latin-1 file name from a Windows share or an old USB stick),
    and only a new name helps; under another locale (``LC_ALL=C``) a UTF-8 locale lets Python decode it."""
    encoding = sys.getfilesystemencoding()
    if encoding.lower().replace("-", "").replace("_", "") == "utf8":
        return (f"the argument {shown!r} is not UTF-8 text: a file or folder name in another encoding (e.g. Latin-1, "
                "as a Windows share or an old USB stick may give it); rename it with UTF-8 (e.g. ASCII) characters")
    return (f"the argument {shown!r} holds characters that this locale ({encoding}) cannot decode; run with a UTF-8 "
            "locale (PYTHONUTF8=1 or LANG=C.UTF-8)")


class _ReaderMayLeave:
    """stdout or stderr whose reader may go away (``| head -1``, a viewer closed): once a write or flush meets the
    closed pipe, the stream's descriptor is pointed at os.devnull and what follows is dropped. The command still
    does its work and exits with its own code; a reader that stopped listening is no error of the run (before: an
    "internal error", exit 1, after the output was written)."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_left()
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_left()

    def _reader_left(self) -> None:
        """Drop what follows; point the descriptor at os.devnull, so that the interpreter's own flush at exit
        writes what the stream still buffers there instead of printing "Exception ignored ... BrokenPipeError"."""
        self._gone = True
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a caller's replacement)
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _open_devnull_for_closed(name: str, fd: int):
    """A stream for ``sys.<name>`` when it is None: the process was started with that descriptor closed
    (``2>&-``, as cron jobs and daemons are), and logging and progress would fail on None. What is written there
    is dropped. The descriptor itself is pointed at os.devnull: else the next file opened would take its number
    and receive what native libraries (ITK) write to stderr."""
    try:
        os.fstat(fd)
    except OSError:
        devnull = os.open(os.devnull, os.O_RDWR)
        if devnull != fd:
            os.dup2(devnull, fd)
            os.close(devnull)
    return open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - sys.<name> until main() returns


@contextmanager
def standard_streams() -> Iterator[None]:
    """For a command's run (``python -m DiffusionCore`` and the Slicer scripted CLI modules alike): a None stdout
    or stderr replaced by os.devnull, and both made to drop what a reader that left can no longer take
    (:class:`_ReaderMayLeave`). Restored when the command returns (tests call :func:`main` in their own process)."""
    saved = sys.stdout, sys.stderr
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if getattr(sys, name) is None:
            setattr(sys, name, _open_devnull_for_closed(name, fd))
    _escape_unencodable_output()
    sys.stdout, sys.stderr = _ReaderMayLeave(sys.stdout), _ReaderMayLeave(sys.stderr)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # a closed pipe met here is dropped here, not at the interpreter's exit
        sys.stdout, sys.stderr = saved


def main(argv: list[str] | None = None) -> int:
    with standard_streams():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    bad = undecodable_argument(list(sys.argv[1:] if argv is None else argv))
    if bad is not None:
        print(f"error: {undecodable_argument_advice(bad)}", file=sys.stderr)
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
        # a command's own advice, where it has one
        memory_hint=getattr(args, "memory_hint", MEMORY_HINTS.get(args.command, DEFAULT_MEMORY_HINT)),
    )


if __name__ == "__main__":
    sys.exit(main())
