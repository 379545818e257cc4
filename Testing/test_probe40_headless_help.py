"""Probe 40: ``scripts/headless_train.py --help`` showed the docstring's first line and the script's own options only,
though the README runs it with ``--init-from`` and other options it passes to ``python -m DiffusionCore train
FAMILY``. Its help now says that other options are passed through, names the most used ones, and where all of them
are listed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "headless_train.py"
MOST_USED = ("--init-from", "--max-steps", "--max-minutes", "--threads", "--val-data")


def test_help_names_the_options_passed_to_the_train_command():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "other options are passed to `python -m DiffusionCore train FAMILY` unchanged" in done.stdout
    for option in MOST_USED:
        assert option in done.stdout, option
    assert "python -m DiffusionCore train FAMILY --help" in done.stdout


def test_the_options_named_are_the_train_commands_own(monkeypatch):
    """Each option the help names is one that some family's ``train`` command takes (no stale names)."""
    import DiffusionCore.cli.main as core_main

    if "train" not in core_main.COMMAND_MODULES:  # as test_slicer_cli's headless test: train may be left out
        monkeypatch.setattr(core_main, "COMMAND_MODULES", [*core_main.COMMAND_MODULES, "train"])
    spec = importlib.util.spec_from_file_location("headless_train", SCRIPT)
    headless = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headless)
    supported = set().union(*(headless.supported_options(f) for f in ("throughplane", "sr", "vae", "xray")))
    named = {word.rstrip(",)") for word in headless.PASSED_THROUGH_HELP.split() if word.startswith("--")}
    assert set(MOST_USED) <= named and named <= supported | {"--family", "--data", "--output-dir"}, named - supported
