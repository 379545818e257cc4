"""The package's layering stays as ARCHITECTURE.md draws it: no import cycle among DiffusionCore's modules,
xray/ imports nothing from sr/, inference imports nothing from train/ (scripts/import_graph.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import import_graph  # noqa: E402


def test_no_cycle_and_no_broken_layer():
    edges = import_graph.graph()
    assert len(edges) > 60 and "DiffusionCore.volume" in edges
    assert import_graph.cycles(edges) == []
    assert import_graph.broken_rules(edges) == []
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py"), "--check", "--quiet"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout


def test_the_checker_sees_function_level_and_string_imports(tmp_path, monkeypatch):
    package = tmp_path / "DiffusionCore"
    (package / "xray").mkdir(parents=True)
    (package / "sr").mkdir()
    for f in ("__init__.py", "xray/__init__.py", "sr/__init__.py"):
        (package / f).write_text("")
    (package / "a.py").write_text("def f():\n    from .b import g\n")
    (package / "b.py").write_text('LATER = {"x": "DiffusionCore.a"}\n')
    (package / "xray" / "c.py").write_text("from ..sr import d\n")
    (package / "sr" / "d.py").write_text("")
    monkeypatch.setattr(import_graph, "ROOT", tmp_path)
    edges = import_graph.graph()
    assert import_graph.cycles(edges) == [["DiffusionCore.a", "DiffusionCore.b"]]
    assert [r.split(":")[0] for r in import_graph.broken_rules(edges)] == ["DiffusionCore.xray.c imports DiffusionCore.sr.d"]
