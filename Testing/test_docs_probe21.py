"""The documentation says what the code does (probe 21): names, numbers and ranges the README, the model cards and
the panels quote, checked against the package, the shipped weights and the .ui files.

Each test reads the text a user reads and the fact it states, so that the two cannot drift apart again: the error
classes the README lists, the Slicer call it gives for a self-test, the sr-default parameter count, the recipe the
xray-default card names for the shipped file, and the factor range of the SR panel.
"""

from __future__ import annotations

import ast
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import DiffusionCore
from DiffusionCore.degrade import MAX_FACTOR
from DiffusionCore.weights.header import read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
WEIGHTS = ROOT / "DiffusionCore" / "weights"


def test_every_error_class_the_readme_lists_is_importable_from_the_package():
    listed = re.search(r"raises a subclass of `DiffusionCore\.DiffusionCoreError` \(([^)]*)\)", README)
    assert listed, "the README's Python API section lists the error classes"
    names = [n for n in re.findall(r"`(\w+)`", listed.group(1)) if n != "DiffusionCore"]
    assert {"NumericalError", "DataUnavailableError", "MethodResultError", "Cancelled"} <= set(names)
    for name in names:
        cls = getattr(DiffusionCore, name)  # `from DiffusionCore import NAME` works
        assert issubclass(cls, DiffusionCore.DiffusionCoreError), name
        assert name in DiffusionCore.__all__, name
    # every DiffusionCoreError subclass the package exports is listed (OutputExistsError is an OutputError)
    exported = {n for n in DiffusionCore.__all__ if isinstance(getattr(DiffusionCore, n), type)
                and issubclass(getattr(DiffusionCore, n), DiffusionCore.DiffusionCoreError)}  # fmt: skip
    assert exported - {"DiffusionCoreError"} == set(names)


def test_the_error_a_wrong_method_result_raises_has_the_name_the_readme_prints():
    from DiffusionCore.evaluate import MethodResultError

    assert "`DiffusionCore.MethodResultError`" in README
    assert DiffusionCore.MethodResultError is MethodResultError
    assert "DiffusionCore.evaluate.MethodResultError" not in README  # DiffusionCore.evaluate is the function


@pytest.mark.parametrize("module", ["CTDiffusionSR", "XrayToCT"])
def test_the_documented_self_test_call_is_the_entry_slicer_registers(module):
    """ScriptedLoadableModule.__init__ registers ``slicer.selfTests[moduleName] = self.runTest`` (moduleName: the
    module class's name), and that runTest runs the ``<moduleName>Test`` class of the module file."""
    assert f'slicer.selfTests["{module}"]()' in README
    tree = ast.parse((ROOT / module / f"{module}.py").read_text(encoding="utf-8"))
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    assert [b.id for b in classes[module].bases if isinstance(b, ast.Name)] == ["ScriptedLoadableModule"]
    test_class = classes[f"{module}Test"]
    assert [b.id for b in test_class.bases if isinstance(b, ast.Name)] == ["ScriptedLoadableModuleTest"]
    assert f'slicer.selfTests["{module}"]()' in (ast.get_docstring(test_class) or "")


def test_every_slicer_util_function_the_docs_name_exists():
    util = pytest.importorskip("slicer.util")
    texts = [README] + [p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md")]
    texts += [(ROOT / m / f"{m}.py").read_text(encoding="utf-8") for m in ("CTDiffusionSR", "XrayToCT")]
    named = {n for text in texts for n in re.findall(r"slicer\.util\.(\w+)", text)}
    assert "pip_install" in named  # the developer install from Slicer's Python console
    assert [n for n in sorted(named) if not hasattr(util, n)] == []


def test_the_sr_default_parameter_count_quoted_is_the_shipped_files():
    tensors, _ = read_safetensors_header(WEIGHTS / "sr-default.safetensors")
    count = sum(math.prod(t["shape"]) for t in tensors.values())
    said = f"{count:,} parameters"
    assert said in README
    card = (ROOT / "docs" / "model_cards" / "sr-default.md").read_text(encoding="utf-8")
    assert f"network of {count:,} parameters" in card


def test_the_xray_card_names_the_recipe_the_shipped_file_records():
    """The first command block of the card's Recipe trains with the preset whose model and data settings the
    shipped file's metadata records, and continues the shipped weights with that preset, which they fit."""
    from DiffusionCore.config import config_to_dict as to_dict
    from DiffusionCore.xray.config import load_stage_config

    _, metadata = read_safetensors_header(WEIGHTS / "xray-default.safetensors")  # the decoded metadata
    recorded = metadata["configs"][0]
    preset = load_stage_config(ROOT / "DiffusionCore" / "xray" / "configs" / "stage1_default.json")
    held = load_stage_config(recorded)
    assert to_dict(held.model) == to_dict(preset.model)
    assert to_dict(held.data) == to_dict(preset.data)
    card = (ROOT / "docs" / "model_cards" / "xray-default.md").read_text(encoding="utf-8")
    recipe = card.split("## Recipe", 1)[1]
    first_block = recipe.split("```bash", 1)[1].split("```", 1)[0]
    assert "CFG=DiffusionCore/xray/configs/stage1_default.json" in first_block
    assert "--init-from xray-default" in first_block
    assert "stage1_cpu" not in first_block


def test_the_sr_panels_factor_range_is_the_engines():
    ui = ET.parse(ROOT / "CTDiffusionSR" / "Resources" / "UI" / "CTDiffusionSR.ui")
    box = next(w for w in ui.iter("widget") if w.get("name") == "factorSpinBox")
    props = {p.get("name"): p for p in box.iter("property")}
    assert int(props["maximum"].find("number").text) == MAX_FACTOR
    assert int(props["minimum"].find("number").text) == 0  # 0: auto, from the slice spacing
    assert props["specialValueText"].find("string").text == "auto"
    tooltip = props["toolTip"].find("string").text
    assert f"2 to {MAX_FACTOR} (1 is refused)" in tooltip


def _expanded_commands(text: str) -> list[str]:
    """``python -m DiffusionCore ...`` commands of ``text`` (see test_docs_commands.doc_commands), with the shell
    variables a code block sets (``CFG=...``) substituted in that block's commands."""
    from test_docs_commands import doc_commands

    parts = text.split("```")
    commands = doc_commands("```".join(p for i, p in enumerate(parts) if i % 2 == 0))  # prose
    for block in parts[1::2]:
        values = dict(re.findall(r"^(\w+)=\"?([^\"#\n]*?)\"?\s*(?:#.*)?$", block, flags=re.M))
        for cmd in doc_commands("```" + block + "```"):
            for name, value in values.items():
                cmd = cmd.replace(f"${name}", value.strip())
            commands.append(cmd)
    return commands


def test_the_documented_runs_that_continue_xray_default_build_a_network_it_fits():
    """Every ``train xray ... --init-from xray-default`` in the README and the model card builds stage 1 as the shipped
    weights hold it (checked on the meta device: nothing network-sized is allocated or trained). The card's recipe
    continued them with stage1_cpu.json, which ``train xray`` refuses."""
    import shlex

    from DiffusionCore.cli.main import build_parser
    from DiffusionCore.nn.architecture import build_on_meta
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
    from DiffusionCore.xray.config import DEFAULT_CONFIG, SHIPPED_CONFIGS, load_stage_config
    from DiffusionCore.xray.train import XrayTrainOptions, check_stage_fits, plan_stages

    runs = []
    for doc in ("README.md", "docs/model_cards/xray-default.md"):
        for cmd in _expanded_commands((ROOT / doc).read_text(encoding="utf-8")):
            argv = shlex.split(cmd)
            if argv[:2] == ["train", "xray"] and "xray-default" in argv and (
                    "--init-from" in argv or "--load-all-stages" in argv):  # fmt: skip
                runs.append((doc, argv))
    assert {doc for doc, _ in runs} == {"README.md", "docs/model_cards/xray-default.md"}
    for doc, argv in runs:
        args = build_parser().parse_args(argv)
        assert args.load_all_stages == "xray-default", (doc, argv)
        names = args.config or [DEFAULT_CONFIG]
        configs = [load_stage_config(c if c in SHIPPED_CONFIGS else ROOT / c) for c in names]
        opts = XrayTrainOptions(configs=configs, data=args.data, output_dir=Path(args.output_dir),
                                load_all_stages=args.load_all_stages)  # fmt: skip
        plan = plan_stages(opts)
        cascade = build_on_meta(lambda p=plan: UnifiedHybridViTCascade(p.configs), f"{doc}: {' '.join(argv)}")
        check_stage_fits(cascade.state_dict(), plan.configs, plan.init_source, [1], "--init-from", plan.origins)
