"""The module files are thin shells in the SlicerNNUnet layout; the panels live in the Lib packages.

CTDiffusionSR.py and XrayToCT.py hold the ``ScriptedLoadableModule`` class, a widget that builds the Lib
panel (``CTDiffusionSRLib.sr_widget.SRWidget``, ``XrayToCTLib.xray_widget.XrayWidget``) and forwards its
lifecycle, and the self-test; the logic and parameter-node names are re-exported for scripts. Both panels
share one lifecycle (``CTDiffusionSRLib.module_widget.ModuleWidget``). The files are read with ``ast``, and
imported in a subprocess with stand-ins for what only the Slicer application has (qt, slicer.i18n,
slicer.parameterNodeWrapper, slicer.ScriptedLoadableModule), with a recording stand-in for the panel.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: module -> (its folder, the Lib module of its panel, the panel class)
MODULES = {
    "CTDiffusionSR": (ROOT / "CTDiffusionSR", "CTDiffusionSRLib.sr_widget", "SRWidget"),
    "XrayToCT": (ROOT / "XrayToCT", "XrayToCTLib.xray_widget", "XrayWidget"),
}
#: Module-level functions a shell may keep: the Sample Data hooks Slicer's module template puts there.
SHELL_FUNCTIONS = {"CTDiffusionSR": {"registerSampleData", "loadSampleData"}, "XrayToCT": set()}
#: The longest a module file may grow (measured: 184 and 130 lines); the panels belong in the Lib.
MAX_SHELL_LINES = 200
#: What a shell widget may define: construction and the lifecycle Slicer calls.
SHELL_WIDGET_METHODS = {"__init__", "setup", "cleanup", "enter", "exit", "onReload"}
#: The lifecycle both panels take from ModuleWidget unchanged.
SHARED_LIFECYCLE = {
    "cleanup", "enter", "exit", "onSceneStartClose", "onSceneEndClose", "setParameterNode", "_checkCanApply",
    "fillWeights", "onWeightsChanged", "onImportWeights", "onApplyButton", "onJobFinished", "onExportResult",
}  # fmt: skip


def module_tree(module: str) -> ast.Module:
    return ast.parse((MODULES[module][0] / f"{module}.py").read_text(encoding="utf-8"))


def top_level(tree: ast.Module, kind) -> dict[str, ast.AST]:
    return {n.name: n for n in tree.body if isinstance(n, kind)}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_module_file_holds_only_the_shell(module):
    path = MODULES[module][0] / f"{module}.py"
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines < MAX_SHELL_LINES, f"{path.name} has {lines} lines: the panel code belongs in the Lib"
    tree = module_tree(module)
    assert set(top_level(tree, ast.ClassDef)) == {module, f"{module}Widget", f"{module}Test"}
    assert set(top_level(tree, ast.FunctionDef)) == SHELL_FUNCTIONS[module]
    # the logic and the parameter node are the panel module's, re-exported under their old names
    panel_module = MODULES[module][1]
    imported = {
        a.name
        for n in tree.body
        if isinstance(n, ast.ImportFrom) and n.module == panel_module
        for a in n.names
    }
    assert imported == {f"{module}Logic", f"{module}ParameterNode", MODULES[module][2]}
    assigned = {ast.unparse(n.targets[0]): n.value for n in tree.body if isinstance(n, ast.Assign)}
    exported = set(ast.literal_eval(assigned["__all__"]))
    assert {
        module,
        f"{module}Widget",
        f"{module}Test",
        f"{module}Logic",
        f"{module}ParameterNode",
    } <= exported
    defined = set(top_level(tree, ast.ClassDef)) | set(top_level(tree, ast.FunctionDef))
    assert exported <= defined | imported


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_module_widget_only_builds_the_panel_and_forwards_its_lifecycle(module):
    widget = top_level(module_tree(module), ast.ClassDef)[f"{module}Widget"]
    assert [ast.unparse(b) for b in widget.bases] == ["ScriptedLoadableModuleWidget"]
    methods = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert set(methods) <= SHELL_WIDGET_METHODS and {"setup", "cleanup", "enter", "exit"} <= set(methods)
    for method in methods.values():
        statements = [
            s for s in method.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
        ]
        assert len(statements) <= 4, f"{module}Widget.{method.name} does more than delegate"
    setup = ast.unparse(methods["setup"])
    assert f"self.widget = {MODULES[module][2]}(self.parent)" in setup
    assert "self.logic = self.widget.logic" in setup  # slicer.util.getModuleLogic reads the widget's logic
    assert "self.layout.addWidget(self.widget.uiWidget)" in setup


def test_no_x_ray_file_imports_the_sr_module_file():
    for path in sorted((ROOT / "XrayToCT").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "CTDiffusionSR" not in imported, (
            f"{path.relative_to(ROOT)} imports the CTDiffusionSR module file"
        )


#: Imports both module files with stand-ins for the Slicer application, then drives each shell widget with a
#: recording panel; prints what it saw as JSON.
SHELL_RUN = """
import importlib, json, sys, types

sys.path[:0] = [{sr!r}, {xray!r}]
import slicer

def stand_in(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    if "." in name:
        setattr(sys.modules[name.rsplit(".", 1)[0]], name.rsplit(".", 1)[1], module)
    return module

calls = []

class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent, self.layout = parent, parent.layout()
    def setup(self):
        calls.append("base.setup")
    def onReload(self):
        calls.append("base.onReload")

stand_in("qt")
stand_in("slicer.i18n", tr=lambda text: text)
stand_in("slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls, Choice=lambda *a: None,
         WithinRange=lambda *a: None)
stand_in("slicer.ScriptedLoadableModule", ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
         ScriptedLoadableModule=type("ScriptedLoadableModule", (), {{}}),
         ScriptedLoadableModuleLogic=type("ScriptedLoadableModuleLogic", (), {{}}),
         ScriptedLoadableModuleTest=type("ScriptedLoadableModuleTest", (), {{}}))

report = {{}}
import XrayToCT  # first: it must not pull in the other module's file
report["xray_imports_sr_module"] = "CTDiffusionSR" in sys.modules
import CTDiffusionSR
report["heavy_imports"] = sorted(m for m in ("torch", "DiffusionCore") if m in sys.modules)

from CTDiffusionSRLib.module_widget import ModuleWidget

hooks = set(ModuleWidget.__abstractmethods__)
report["hooks"] = sorted(hooks)

class Layout:
    def addWidget(self, widget):
        calls.append(("addWidget", widget))

class Parent:
    def layout(self):
        return self._layout
    _layout = Layout()

for shell, panelModule, panelName in [(CTDiffusionSR, {sr_panel!r}, {sr_name!r}),
                                      (XrayToCT, {xray_panel!r}, {xray_name!r})]:
    panelClass = getattr(shell, panelName)
    entry = report[shell.__name__] = {{}}
    entry["panel_is_module_widget"] = issubclass(panelClass, ModuleWidget)
    entry["panel_redefines"] = sorted(set(vars(panelClass)) & {shared!r})
    entry["panel_misses_hooks"] = sorted(panelClass.__abstractmethods__)
    entry["logic_is_panels"] = getattr(shell, shell.__name__ + "Logic") is panelClass.logicClass
    entry["logic_module"] = panelClass.logicClass.__module__

    class Panel:  # records what the shell asks of its panel
        def __init__(self, parent):
            self.parent, self.logic, self.uiWidget = parent, "the logic", "the ui widget"
            calls.append("panel.__init__")
        def enter(self):
            calls.append("panel.enter")
        def exit(self):
            calls.append("panel.exit")
        def cleanup(self):
            calls.append("panel.cleanup")

    setattr(shell, panelName, Panel)
    calls.clear()
    parent = Parent()
    widget = getattr(shell, shell.__name__ + "Widget")(parent)
    widget.setup()
    widget.enter()
    widget.exit()
    widget.cleanup()
    entry["calls"] = [c if isinstance(c, str) else list(c) for c in calls]
    entry["panel_parent_is_module_widget"] = widget.widget.parent is parent
    entry["logic"] = widget.logic
    before = sys.modules[panelModule]
    previous = vars(before)[panelName]
    calls.clear()
    widget.onReload()
    entry["reloaded_panel"] = vars(sys.modules[panelModule])[panelName] is not previous
    entry["reload_calls"] = calls[:]
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def shell_run() -> dict:
    code = SHELL_RUN.format(
        sr=str(ROOT / "CTDiffusionSR"),
        xray=str(ROOT / "XrayToCT"),
        sr_panel=MODULES["CTDiffusionSR"][1],
        sr_name=MODULES["CTDiffusionSR"][2],
        xray_panel=MODULES["XrayToCT"][1],
        xray_name=MODULES["XrayToCT"][2],
        shared=SHARED_LIFECYCLE,
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_opening_the_modules_imports_neither_torch_nor_the_other_module_file(shell_run):
    assert shell_run["heavy_imports"] == []
    assert shell_run["xray_imports_sr_module"] is False


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_shell_widget_builds_the_panel_and_forwards_enter_exit_cleanup_and_reload(shell_run, module):
    entry = shell_run[module]
    assert entry["calls"] == [
        "base.setup", "panel.__init__", ["addWidget", "the ui widget"], "panel.enter", "panel.exit", "panel.cleanup"
    ]  # fmt: skip
    assert entry["panel_parent_is_module_widget"] and entry["logic"] == "the logic"
    # Reload re-reads the panel's Lib file too (Slicer's own Reload re-reads only the module file)
    assert entry["reloaded_panel"] and entry["reload_calls"] == ["base.onReload"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_both_panels_take_the_shared_lifecycle_and_fill_in_every_hook(shell_run, module):
    entry = shell_run[module]
    assert {"inputProblem", "startJob", "showResult"} <= set(shell_run["hooks"])
    assert entry["panel_is_module_widget"]
    assert entry["panel_redefines"] == [], (
        "the shared lifecycle is ModuleWidget's; a panel only fills in hooks"
    )
    assert entry["panel_misses_hooks"] == []
    assert entry["logic_is_panels"] and entry["logic_module"] == MODULES[module][1]
