"""The commands that the README and the model cards give (to reproduce a figure, to train, to run) parse with today's
command line and today's benchmark scripts: an option renamed or made required breaks them silently otherwise (the
README's "compare with cubic on your own data" command lacked the required --factor)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

from DiffusionCore.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "model_cards").glob("*.md"))]
#: Words that stand for what the reader fills in, in the syntax lines (`sr INPUT OUTPUT [--factor K]`).
PLACEHOLDERS = {"INPUT", "OUTPUT", "XRAY", "N", "COMMAND", "OUT", "F", "NAME", "FILE", "K", "CT", "T"}


#: ``python -m DiffusionCore ARGS``; :data:`BENCHMARK` is ``python benchmarks/NAME.py ARGS``.
PACKAGE = r"(?:python3?|\.venv/bin/python) -m DiffusionCore ([^`\n]*)"
BENCHMARK = r"(?:python3?|\.venv/bin/python) (benchmarks/\w+\.py [^`\n]*)"


def doc_commands(text: str, pattern: str = PACKAGE) -> list[str]:
    """The arguments of every ``python -m DiffusionCore ...`` in ``text`` (or what ``pattern`` finds): code blocks
    with their line continuations, and inline code spans, which the prose wraps over lines."""
    text = re.sub(r"\\\n\s*", " ", text)
    parts = text.split("```")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"`[^`]*`", lambda m: m.group(0).replace("\n", " "), parts[i])
    found = re.findall(pattern, "```".join(parts))
    commands = []
    for cmd in found:
        cmd = re.split(r" #| &&| \||;", cmd)[0]
        cmd = re.sub(r"\[([^\]]*)\]", r"\1", cmd).replace("...", "").strip()  # optional parts, elided ones
        commands.append(cmd)
    return commands


@pytest.mark.parametrize("doc", DOCS)
def test_the_commands_in_the_docs_parse(doc):
    commands = doc_commands((ROOT / doc).read_text(encoding="utf-8"))
    assert len(commands) >= 3, f"{doc}: no commands found; has the extraction broken?"
    failures = []
    for cmd in commands:
        argv = shlex.split(cmd)
        if len(argv) < 2 or PLACEHOLDERS & set(argv):  # a command named in prose, or a syntax line
            continue
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                build_parser().parse_args(argv)
            except SystemExit as exc:
                if exc.code:
                    failures.append(f"{cmd}\n    {err.getvalue().strip().splitlines()[-1]}")
    assert not failures, f"{doc}: commands that no longer parse:\n" + "\n".join(failures)


def test_a_command_missing_a_required_option_is_caught():
    text = "Compare (`python -m DiffusionCore evaluate --reference YOUR_CT\n--methods cubic,sr`)."
    (cmd,) = doc_commands(text)
    assert cmd == "evaluate --reference YOUR_CT --methods cubic,sr"
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        build_parser().parse_args(shlex.split(cmd))  # --factor is required


class _Parsed(Exception):
    """Raised in place of running a benchmark once its command line has parsed."""


def _parse_only(parse_args):
    def parse(self, args=None, namespace=None):
        parsed = parse_args(self, args, namespace)
        raise _Parsed(parsed)

    return parse


def _benchmark_main(script: str):
    spec = importlib.util.spec_from_file_location(f"doc_benchmark_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("doc", DOCS)
def test_the_benchmark_commands_in_the_docs_parse(doc, monkeypatch):
    """``python benchmarks/NAME.py ...`` as the docs give it, parsed by that script's own parser (nothing runs)."""
    commands = doc_commands((ROOT / doc).read_text(encoding="utf-8"), BENCHMARK)
    if doc.endswith(("sr-default.md", "xray-default.md")):
        assert len(commands) >= 10, f"{doc}: few benchmark commands found; has the extraction broken?"
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _parse_only(argparse.ArgumentParser.parse_args))
    mains: dict[str, object] = {}
    failures = []
    for cmd in commands:
        script, *argv = shlex.split(cmd)
        if PLACEHOLDERS & set(argv):  # a syntax line
            continue
        assert (ROOT / script).is_file(), f"{doc}: {script} does not exist"
        main = mains.setdefault(script, _benchmark_main(script))
        monkeypatch.setattr(sys, "argv", [script, *argv])
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main()
            except _Parsed:
                continue
            except SystemExit as exc:
                if exc.code:
                    failures.append(f"{cmd}\n    {err.getvalue().strip().splitlines()[-1]}")
                    continue
        failures.append(f"{cmd}\n    ran past its command line")
    assert not failures, f"{doc}: benchmark commands that no longer parse:\n" + "\n".join(failures)


def test_a_benchmark_command_with_an_unknown_option_is_caught(monkeypatch):
    (cmd,) = doc_commands("Score (`python benchmarks/sr_quality.py r.json\n--adapt-seconds 120`).", BENCHMARK)
    assert cmd == "benchmarks/sr_quality.py r.json --adapt-seconds 120"
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _parse_only(argparse.ArgumentParser.parse_args))
    script, *argv = shlex.split(cmd)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        _benchmark_main(script)()
