"""Print the import graph of the DiffusionCore package: each module's imports of other package modules, the
import cycles, and the layering rules the architecture asks for.

Every import counts, also one inside a function (it still ties the two modules together), a string
import through ``importlib.import_module("...")`` and a module's full name written as a string (a table of
modules imported later). Usage::

    python scripts/import_graph.py            # the graph, cycles and rule checks
    python scripts/import_graph.py --check    # exit 1 when there is a cycle or a rule is broken
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "DiffusionCore"
#: (importing prefix, imported prefix, why it is not allowed)
RULES = (
    ("DiffusionCore.xray", "DiffusionCore.sr", "X-ray to CT must not depend on super-resolution"),
    *((f"DiffusionCore.{m}", "DiffusionCore.train", "inference must not depend on training")
      for m in ("sr.pipeline", "xray.pipeline", "cli.sr", "results")),
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *(target.split(".") if target else [])])


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (the longest known module name of each import)."""
    current = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != current:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(current, path.name == "__init__.py", node.level, node.module) if node.level else (
                node.module or "")  # fmt: skip
            if not base.startswith(PACKAGE):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules and "." in node.value:
            add(node.value)  # a module named in a string, e.g. a table of modules imported later
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
                if name.startswith("."):
                    level = len(name) - len(name.lstrip("."))
                    name = _resolve(current, path.name == "__init__.py", level, name.lstrip("."))
                if name.startswith(PACKAGE):
                    add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def broken_rules(edges: dict[str, set[str]]) -> list[str]:
    return [f"{a} imports {b}: {why}" for src, dst, why in RULES for a, targets in sorted(edges.items())
            if a.startswith(src) for b in sorted(targets) if b.startswith(dst)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a cycle or a broken rule")
    parser.add_argument("--quiet", action="store_true", help="print only cycles and rules")
    args = parser.parse_args(argv)
    edges = graph()
    if not args.quiet:
        for name in sorted(edges):
            short = sorted(t.removeprefix(PACKAGE + ".") for t in edges[name])
            print(f"{name.removeprefix(PACKAGE + '.') or PACKAGE}: {', '.join(short) or '-'}")
    found = cycles(edges)
    rules = broken_rules(edges)
    print(f"\n{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(found)} cycle(s)")
    for comp in found:
        print("cycle: " + " <-> ".join(c.removeprefix(PACKAGE + ".") for c in comp))
    for line in rules:
        print("rule: " + line)
    return 1 if args.check and (found or rules) else 0


if __name__ == "__main__":
    sys.exit(main())
