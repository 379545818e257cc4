"""The commands that the README and the model cards give (to reproduce a figure, to train, to run) parse with today's
command line: an option renamed or made required breaks them silently otherwise (the README's "compare with cubic on
your own data" command lacked the required --factor)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from DiffusionCore.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "model_cards").glob("*.md"))]
#: Words that stand for what the reader fills in, in the syntax lines (`sr INPUT OUTPUT [--factor K]`).
PLACEHOLDERS = {"INPUT", "OUTPUT", "XRAY", "N", "COMMAND", "OUT", "F", "NAME", "FILE", "K", "CT"}


def doc_commands(text: str) -> list[str]:
    """The arguments of every ``python -m DiffusionCore ...`` in ``text``: code blocks with their line continuations,
    and inline code spans, which the prose wraps over lines."""
    text = re.sub(r"\\\n\s*", " ", text)
    parts = text.split("```")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"`[^`]*`", lambda m: m.group(0).replace("\n", " "), parts[i])
    found = re.findall(r"(?:python3?|\.venv/bin/python) -m DiffusionCore ([^`\n]*)", "```".join(parts))
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
