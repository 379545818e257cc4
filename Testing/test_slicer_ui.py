"""Structural checks of what only the Slicer application can run: the .ui files, the module files, CMake.

The Qt layer (qt, ctk, qMRML widgets, parameterNodeWrapper's GUI binding) exists only inside Slicer, so it
is checked here without running it: every widget the module code touches exists in its .ui; every
``SlicerParameterName`` names a field of the module's ``@parameterNodeWrapper`` class with a type that
Slicer's GUI connectors can bind to that widget class; custom widget classes are declared; each module file
has the Module/Widget/Logic/Test classes Slicer's factory and generic tests look for; CMake lists every
file that must be installed. The module code is the module file (a thin shell), its panel in the Lib
(parameter node, logic and widget) and the panel lifecycle both modules share (module_widget.py).
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {
    "CTDiffusionSR": ROOT / "CTDiffusionSR",
    "XrayToCT": ROOT / "XrayToCT",
}
#: Each module's panel: its parameter node, its ScriptedLoadableModuleLogic and its widget.
PANELS = {
    "CTDiffusionSR": ROOT / "CTDiffusionSR" / "CTDiffusionSRLib" / "sr_widget.py",
    "XrayToCT": ROOT / "XrayToCT" / "XrayToCTLib" / "xray_widget.py",
}
#: The panel lifecycle both modules share (class ModuleWidget).
SHARED_PANEL = ROOT / "CTDiffusionSR" / "CTDiffusionSRLib" / "module_widget.py"
#: Qt's own widget classes (everything else must be declared as a custom widget).
QT_CLASSES = {
    "QWidget", "QLabel", "QPushButton", "QSpinBox", "QDoubleSpinBox", "QComboBox", "QCheckBox", "QLineEdit",
    "QPlainTextEdit", "QTextEdit", "QProgressBar", "QSlider", "QGroupBox", "QRadioButton", "QFrame",
}
#: Which parameter types Slicer's parameterNodeWrapper GUI connectors bind to which widget class
#: (slicer/parameterNodeWrapper/guiConnectors.py): widget class -> accepted annotation kinds.
CONNECTORS = {
    "QCheckBox": {"bool"},
    "QPushButton": {"bool"},
    "QSpinBox": {"int"},
    "QSlider": {"int"},
    "QDoubleSpinBox": {"float"},
    "ctkSliderWidget": {"float-bounded"},
    "QComboBox": {"choice"},
    "QLineEdit": {"str"},
    "QTextEdit": {"str"},
    "ctkPathLineEdit": {"path"},
    "ctkDirectoryButton": {"path"},
    "qMRMLNodeComboBox": {"node"},
}


def ui_widgets(ui_path: Path) -> dict[str, ET.Element]:
    root = ET.parse(ui_path).getroot()
    widgets = {}
    for w in root.iter("widget"):
        name = w.get("name")
        assert name not in widgets, f"{ui_path.name}: widget name {name} is used twice"
        widgets[name] = w
    return widgets


def string_property(widget: ET.Element, name: str) -> str | None:
    for p in widget.findall("property"):
        if p.get("name") == name:
            s = p.find("string")
            return s.text if s is not None else None
    return None


def wrapper_fields(module_py: Path) -> dict[str, str]:
    """``{field: annotation source}`` of the ``@parameterNodeWrapper`` class in a module's panel file."""
    tree = ast.parse(module_py.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {
                stmt.target.id: ast.unparse(stmt.annotation)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    raise AssertionError(f"{module_py.name} has no @parameterNodeWrapper class")


def annotation_kind(annotation: str) -> set[str]:
    """What a parameter annotation is, in the connector table's terms."""
    kinds = set()
    if "Choice(" in annotation:
        kinds.add("choice")
    base = re.sub(r"Annotated\[(\w+(?:\.\w+)?),.*\]", r"\1", annotation)
    if base in ("int", "float", "str", "bool"):
        kinds.add(base)
        if base == "float" and "WithinRange(" in annotation:
            kinds.add("float-bounded")
    if "pathlib.Path" in base or base == "Path":
        kinds.add("path")
    if re.fullmatch(r"vtkMRML\w+( \| vtkMRML\w+)*", base):
        kinds.add("node")
    return kinds


def ui_attribute_uses(module_py: Path, classes: set[str] | None = None) -> set[str]:
    """Names ``X`` in ``self.ui.X`` inside a Python file (optionally only inside the given classes)."""
    tree = ast.parse(module_py.read_text())
    scopes = [n for n in tree.body if isinstance(n, ast.ClassDef) and (classes is None or n.name in classes)]
    used = set()
    for scope in scopes:
        for node in ast.walk(scope):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"
            ):
                used.add(node.attr)
    return used


def panel_class_source(path: Path, name: str | None = None) -> str:
    """The source of class ``name`` in ``path``; without a name, of the module's panel (a ModuleWidget)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            if node.name == name or (name is None and "ModuleWidget" in bases):
                return ast.unparse(node)
    raise AssertionError(f"{path.name} has no class {name or 'derived from ModuleWidget'}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_widget_the_module_uses_exists_in_its_ui(module):
    widgets = ui_widgets(MODULES[module] / "Resources" / "UI" / f"{module}.ui")
    used = ui_attribute_uses(MODULES[module] / f"{module}.py") | ui_attribute_uses(PANELS[module])
    used |= ui_attribute_uses(SHARED_PANEL)  # the lifecycle both panels share
    # both modules use the shared training panel (CTDiffusionSRLib/widgets.py) on their own .ui
    used |= ui_attribute_uses(MODULES["CTDiffusionSR"] / "CTDiffusionSRLib" / "widgets.py", {"TrainingPanel"})
    missing = sorted(used - set(widgets))
    assert not missing, f"{module}.ui lacks widgets the module code uses: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_parameter_binding_matches_a_wrapper_field_and_widget_type(module):
    widgets = ui_widgets(MODULES[module] / "Resources" / "UI" / f"{module}.ui")
    fields = wrapper_fields(PANELS[module])
    bound = {}
    for name, w in widgets.items():
        param = string_property(w, "SlicerParameterName")
        if param is None:
            continue
        assert param in fields, f"{name}: SlicerParameterName {param!r} is not a field of the parameter node"
        assert param not in bound, f"{param} is bound to both {bound[param]} and {name}"
        bound[param] = name
        cls = w.get("class")
        accepted = CONNECTORS.get(cls)
        assert accepted is not None, f"{name}: Slicer has no parameter connector for {cls}"
        kinds = annotation_kind(fields[param])
        assert accepted & kinds, f"{name} ({cls}) cannot show {param}: {fields[param]}"
        if cls == "QComboBox":
            choices = re.search(r"Choice\(\[(.*?)\]\)", fields[param]).group(1)
            items = [i.find("property/string").text for i in w.findall("item")]
            assert items == [c.strip().strip("'\"") for c in choices.split(",")], f"{name}: items {items} vs {choices}"
    assert {"inputVolume", "inputRadiograph"} & set(bound), "the input selector must be bound"


def test_adapt_to_this_scan_is_a_ticked_checkbox_and_a_steps_box_bound_to_the_parameter_node():
    module_py = PANELS["CTDiffusionSR"]
    ui_path = MODULES["CTDiffusionSR"] / "Resources" / "UI" / "CTDiffusionSR.ui"
    widgets = ui_widgets(ui_path)
    fields = wrapper_fields(module_py)
    check, steps = widgets["adaptToScanCheckBox"], widgets["adaptStepsSpinBox"]
    assert (check.get("class"), string_property(check, "SlicerParameterName")) == ("QCheckBox", "adaptToScan")
    assert (steps.get("class"), string_property(steps, "SlicerParameterName")) == ("QSpinBox", "adaptSteps")
    assert string_property(check, "text") == "Adapt to this scan"
    assert string_property(check, "toolTip") and string_property(steps, "toolTip")
    # on by default, in the .ui and in the parameter node, with the engine's default step count
    from DiffusionCore.sr.adapt import DEFAULT_ADAPT_STEPS

    assert check.find("property[@name='checked']").findtext("bool") == "true"
    assert fields["adaptToScan"] == "bool"
    tree = ast.parse(module_py.read_text())
    defaults = {n.target.id: ast.literal_eval(n.value) for n in ast.walk(tree)
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None
                and n.target.id in ("adaptToScan", "adaptSteps")}  # fmt: skip
    assert defaults == {"adaptToScan": True, "adaptSteps": DEFAULT_ADAPT_STEPS}
    numbers = {p.get("name"): int(p.findtext("number")) for p in steps.findall("property") if p.find("number") is not None}
    assert numbers["value"] == DEFAULT_ADAPT_STEPS
    low, high = re.search(r"WithinRange\((\d+), (\d+)\)", fields["adaptSteps"]).groups()
    assert (numbers["minimum"], numbers["maximum"]) == (int(low), int(high)) and int(low) >= 1
    # the steps box is active only while the checkbox is ticked (a .ui connection; no widget code)
    root = ET.parse(ui_path).getroot()
    toggles = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot")) for c in root.iter("connection")}
    assert ("adaptToScanCheckBox", "toggled(bool)", "adaptStepsSpinBox", "setEnabled(bool)") in toggles
    # the widget hands both to the logic
    settings_from = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "settingsFrom")
    code = ast.unparse(settings_from)
    assert "adapt_to_scan=p.adaptToScan" in code and "adapt_steps=p.adaptSteps" in code


@pytest.mark.parametrize("module", sorted(MODULES))
def test_custom_widget_classes_are_declared(module):
    ui_path = MODULES[module] / "Resources" / "UI" / f"{module}.ui"
    root = ET.parse(ui_path).getroot()
    used = {w.get("class") for w in root.iter("widget")}
    declared = {c.findtext("class"): c for c in root.iter("customwidget")}
    undeclared = sorted(used - QT_CLASSES - set(declared))
    assert not undeclared, f"{ui_path.name}: custom classes without a <customwidget>: {undeclared}"
    for cls, decl in declared.items():
        assert decl.findtext("header") == f"{cls}.h" and decl.findtext("extends")
    assert root.find("widget").get("class") == "qMRMLWidget"  # setMRMLScene reaches the node selectors
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {n for n, w in ui_widgets(ui_path).items() if w.get("class", "").startswith("qMRML") and w.get("class") != "qMRMLWidget"}
    assert mrml_widgets <= receivers, f"node selectors not connected to the scene: {mrml_widgets - receivers}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_file_has_the_classes_slicer_looks_for(module):
    tree = ast.parse((MODULES[module] / f"{module}.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    # the logic is the panel's, imported into the module file under its name
    panel = ast.parse(PANELS[module].read_text())
    classes[f"{module}Logic"] = next(n for n in panel.body if isinstance(n, ast.ClassDef) and n.name == f"{module}Logic")
    imported = {a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert f"{module}Logic" in imported, f"{module}.py does not import {module}Logic"
    expected_bases = {
        module: "ScriptedLoadableModule",
        f"{module}Widget": "ScriptedLoadableModuleWidget",
        f"{module}Logic": "ScriptedLoadableModuleLogic",
        f"{module}Test": "ScriptedLoadableModuleTest",
    }
    for name, base in expected_bases.items():
        assert name in classes, f"{module}.py lacks class {name}"
        assert base in {ast.unparse(b) for b in classes[name].bases}
    test_cls = classes[f"{module}Test"]
    methods = {f.name: f for f in test_cls.body if isinstance(f, ast.FunctionDef)}
    called = {c.func.attr for c in ast.walk(methods["runTest"]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)}
    self_tests = {m for m in methods if m.startswith("test_")}
    assert self_tests and self_tests <= called, "runTest must run every test_ method"
    assert "tiny_test_model=True" in ast.unparse(test_cls), "the self-test runs the tiny model (no download)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_cmake_installs_every_module_file(module):
    folder = MODULES[module]
    cmake = (folder / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "WITH_GENERIC_TESTS" in cmake
    listed = set(re.findall(r"\$\{MODULE_NAME\}(Lib/\w+\.py|\.py)", cmake))
    actual = {f"Lib/{p.name}" for p in (folder / f"{module}Lib").glob("*.py")} | {".py"}
    assert listed == actual, f"{module}/CMakeLists.txt lists {sorted(listed)}, the folder has {sorted(actual)}"
    for res in re.findall(r"Resources/\S+", cmake):
        assert (folder / res.replace("${MODULE_NAME}", module)).is_file(), res
    cli_cmake = (folder / "CLI" / "CMakeLists.txt").read_text()
    assert "SlicerMacroBuildScriptedCLI" in cli_cmake
    for xml in (folder / "CLI").glob("*.xml"):
        assert xml.stem in cli_cmake and xml.with_suffix(".py").is_file()


def test_extension_cmake_metadata():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', cmake), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
    for module in MODULES:
        assert f"add_subdirectory({module})" in cmake
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in cmake and "Slicer_EXTENSION_CPACK" in cmake
    assert "DiffusionCore/*.py" in cmake  # the engine is installed with the modules


@pytest.mark.parametrize("module", sorted(MODULES))
def test_icon_is_a_real_png(module):
    data = (MODULES[module] / "Resources" / "Icons" / f"{module}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 500


def test_guidance_zero_reads_model_default_and_steps_zero_reads_the_mean():
    widgets = ui_widgets(MODULES["CTDiffusionSR"] / "Resources" / "UI" / "CTDiffusionSR.ui")
    guidance, steps = widgets["guidanceSpinBox"], widgets["stepsSpinBox"]
    assert string_property(guidance, "specialValueText") == "model default"
    assert "0 = the model's default" in string_property(guidance, "toolTip")
    assert string_property(steps, "specialValueText") == "mean (1 step)"
    assert "posterior-mean" in string_property(steps, "toolTip")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_training_panel_has_an_overwrite_checkbox_passed_to_the_job(module):
    widgets = ui_widgets(MODULES[module] / "Resources" / "UI" / f"{module}.ui")
    box = widgets["trainingOverwriteCheckBox"]
    assert (box.get("class"), string_property(box, "SlicerParameterName")) == ("QCheckBox", "trainingOverwrite")
    assert "Overwrite" in string_property(box, "text") and "Resume" in string_property(box, "toolTip")
    assert wrapper_fields(PANELS[module])["trainingOverwrite"] == "bool"
    panel = ast.parse((MODULES["CTDiffusionSR"] / "CTDiffusionSRLib" / "widgets.py").read_text())
    on_start = next(n for n in ast.walk(panel) if isinstance(n, ast.FunctionDef) and n.name == "onStart")
    source = ast.unparse(on_start)
    assert "overwrite=p.trainingOverwrite" in source
    assert "output_folder_problem(output, p.trainingResume, p.trainingOverwrite)" in source


@pytest.mark.parametrize(("module", "family"), [("CTDiffusionSR", "sr"), ("XrayToCT", "xray")])
def test_both_modules_import_weights_beside_the_selector_and_gate_apply_on_them(module, family):
    root = ET.parse(MODULES[module] / "Resources" / "UI" / f"{module}.ui").getroot()
    row = next(w for w in root.iter("widget") if w.get("name") == "weightsRow")
    assert {w.get("name") for w in row.iter("widget")} == {"weightsRow", "weightsComboBox", "importWeightsButton"}
    button = ui_widgets(MODULES[module] / "Resources" / "UI" / f"{module}.ui")["importWeightsButton"]
    assert string_property(button, "text") == "Import weights..."
    # the selector, the import and the Apply gate are the shared lifecycle's, for the panel's family
    source = panel_class_source(SHARED_PANEL, "ModuleWidget")
    assert "self.ui.importWeightsButton.connect('clicked(bool)', self.onImportWeights)" in source
    assert "importWeights(self.family" in source and "fillWeightsComboBox(self.ui.weightsComboBox, self.family" in source
    assert "weights_problem(self.family, p.weights)" in source and 'apply_state(' in source
    panel = panel_class_source(PANELS[module])
    assert f"family = '{family}'" in panel
    assert "DiffusionCore" not in source + panel  # listing weights when the module opens must not import torch


#: Calls whose first argument a user reads.
USER_TEXT_CALLS = {"errorDisplay", "warningDisplay", "infoDisplay", "confirmOkCancelDisplay", "confirmYesNoDisplay",
                   "tryWithErrorDisplay", "delayDisplay", "showStatusMessage", "appendPlainText"}  # fmt: skip


def _is_literal_text(node: ast.expr) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str) and any(c.isalpha() for c in node.value))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_user_visible_strings_are_wrapped_for_translation(module):
    problems = []
    for path in (MODULES[module] / f"{module}.py", PANELS[module], SHARED_PANEL):
        problems += untranslated_texts(path)
    assert not problems, f"{module}: user-visible text not wrapped in _(): {problems}"
    tree = ast.parse((MODULES[module] / f"{module}.py").read_text())
    init = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == module)
    assigned = {ast.unparse(t): v for n in ast.walk(init) if isinstance(n, ast.Assign) for t, v in [(n.targets[0], n.value)]}
    for attr in ("self.parent.title", "self.parent.helpText", "self.parent.acknowledgementText"):
        assert isinstance(assigned[attr], ast.Call) and ast.unparse(assigned[attr].func) == "_", attr


def untranslated_texts(path: Path) -> list[str]:
    """User-visible literals in ``path`` that are not wrapped in ``_()`` (which must be Slicer's ``tr``)."""
    tree = ast.parse(path.read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == "slicer.i18n" and any(a.name == "tr" and a.asname == "_" for a in n.names) for n in tree.body), path.name
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_":
            # lupdate extracts only plain literals: no f-strings, no variables (use .format(name=...))
            if not (len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                problems.append(f"line {node.lineno}: _() of {ast.unparse(node.args[0])[:40]}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in USER_TEXT_CALLS:
            if node.args and _is_literal_text(node.args[0]):
                problems.append(f"line {node.lineno}: {node.func.attr}({ast.unparse(node.args[0])[:40]})")
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in ("text", "toolTip", "title", "helpText", "acknowledgementText"):
                    if _is_literal_text(node.value):
                        problems.append(f"line {node.lineno}: .{target.attr} = {ast.unparse(node.value)[:40]}")
    return [f"{path.name} {problem}" for problem in problems]


def test_lib_messages_are_translatable_in_slicer_and_plain_outside():
    for name in ("dependencies", "weights_choice", "training"):
        source = (MODULES["CTDiffusionSR"] / "CTDiffusionSRLib" / f"{name}.py").read_text()
        assert "from slicer.i18n import tr as _" in source and "except ImportError:" in source, name
    assert "from slicer.i18n import tr as _" in (MODULES["XrayToCT"] / "XrayToCTLib" / "xray_logic.py").read_text()


@pytest.mark.parametrize("module", ["CTDiffusionSR", "XrayToCT"])
def test_both_modules_export_the_result_with_its_provenance(module):
    button = ui_widgets(MODULES[module] / "Resources" / "UI" / f"{module}.ui")["exportResultButton"]
    assert string_property(button, "text") == "Export result..." and "DICOM" in string_property(button, "toolTip")
    source = panel_class_source(SHARED_PANEL, "ModuleWidget")  # the export both panels share
    assert "self.ui.exportResultButton.connect('clicked(bool)', self.onExportResult)" in source
    assert "exportResultWithDialog(self._parameterNode.resultVolume)" in source
    assert "self.ui.exportResultButton.enabled" in panel_class_source(PANELS[module])  # once a result exists


def test_xray_to_ct_shares_the_slicer_glue_without_importing_the_other_module():
    """The shared Qt glue lives in CTDiffusionSRLib (widgets.py, module_widget.py); no XrayToCT file imports
    CTDiffusionSR.py."""
    for path in sorted((ROOT / "XrayToCT").rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "CTDiffusionSR" not in imported, f"{path.name} imports the CTDiffusionSR module file"
    assert "from CTDiffusionSRLib.module_widget import ModuleWidget" in PANELS["XrayToCT"].read_text()


def test_allow_interspaced_and_non_ct_are_unticked_advanced_checkboxes_passed_to_the_settings():
    """The two overrides of the engine's refusals (an interspaced series, intensities that do not look like CT) are
    reachable from the panel: unticked checkboxes under Advanced, beside Data consistency, bound to the parameter node
    (off by default there too), whose tooltips say what they do and the risk, and which settingsFrom hands on."""
    module_py = PANELS["CTDiffusionSR"]
    ui_path = MODULES["CTDiffusionSR"] / "Resources" / "UI" / "CTDiffusionSR.ui"
    widgets = ui_widgets(ui_path)
    fields = wrapper_fields(module_py)
    root = ET.parse(ui_path).getroot()
    advanced = next(w for w in root.iter("widget") if w.get("name") == "advancedCollapsibleButton")
    rows = {}  # checkbox name -> its row in the Advanced form
    for item in advanced.iter("item"):
        child = item.find("widget")
        if child is not None and child.get("class") == "QCheckBox":
            rows[child.get("name")] = int(item.get("row"))
    expected = {"allowInterspacedCheckBox": ("allowInterspaced", "Allow interspaced slices"),
                "allowNonCTCheckBox": ("allowNonCT", "Allow non-CT intensities")}  # fmt: skip
    for name, (param, label) in expected.items():
        check = widgets[name]
        assert (check.get("class"), string_property(check, "SlicerParameterName")) == ("QCheckBox", param)
        assert string_property(check, "text") == label
        assert check.find("property[@name='checked']").findtext("bool") == "false"
        assert fields[param] == "bool"
        assert name in rows and abs(rows[name] - rows["dataConsistencyCheckBox"]) <= 2, rows
    assert sorted(rows.values()) == sorted(set(rows.values())), f"two checkboxes share a row: {rows}"
    interspaced = string_property(widgets["allowInterspacedCheckBox"], "toolTip")
    assert "interspaced" in interspaced and "refused otherwise" in interspaced
    assert "the result may hold bright rims at edges; on such series super-resolution measured no better than " \
           "interpolation" in interspaced  # fmt: skip
    non_ct = string_property(widgets["allowNonCTCheckBox"], "toolTip")
    assert "do not look like CT in Hounsfield units" in non_ct and "refused otherwise" in non_ct
    assert "if the data is not CT" in non_ct and "the result is meaningless" in non_ct
    tree = ast.parse(module_py.read_text())
    defaults = {n.target.id: ast.literal_eval(n.value) for n in ast.walk(tree)
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None
                and n.target.id in ("allowInterspaced", "allowNonCT")}  # fmt: skip
    assert defaults == {"allowInterspaced": False, "allowNonCT": False}
    settings_from = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "settingsFrom")
    code = ast.unparse(settings_from)
    assert "allow_interspaced=p.allowInterspaced" in code and "allow_non_ct=p.allowNonCT" in code
