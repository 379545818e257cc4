"""Security rules, checked: no code runs from a data, config or weights file; no shell with user strings;
temporary files are private until published.

The weights rules themselves (safetensors only, sha256 registry, refusal of unknown hashes without
``--allow-unregistered-weights``, pickles never unpickled) are exercised through the command line, the
Python API and the Slicer modules in test_bad_inputs.py and at the registry level in
test_weights_registry.py.
"""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from DiffusionCore.config import load_config
from DiffusionCore.errors import ConfigError, InputError
from DiffusionCore.sr.config import SRConfig
from DiffusionCore.volume import Volume, write_volume
from DiffusionCore.weights import save_safetensors

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("DiffusionCore", "CTDiffusionSR", "XrayToCT")


def _sources() -> list[Path]:
    files = [p for d in SOURCE_FOLDERS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30, "the source scan must see the package"
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords
    )


def unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that can run code from data or hand strings to a shell."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(
                n and n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve") for n in names
            ):
                found.append((node.lineno, "imports a pickle module"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if _keyword_true(node, "shell"):
            found.append((node.lineno, f"{name}(shell=True)"))
        if name in (
            "os.system",
            "os.popen",
            "eval",
            "exec",
            "subprocess.getoutput",
            "subprocess.getstatusoutput",
        ):
            found.append((node.lineno, name))
        if name.endswith("torch.load") and not _keyword_true(node, "weights_only"):
            found.append((node.lineno, "torch.load without weights_only=True"))
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load") and not _config_loader(node):
            found.append((node.lineno, f"{name} (use yaml.safe_load)"))
        if name.endswith(("np.load", "numpy.load")) and _keyword_true(node, "allow_pickle"):
            found.append((node.lineno, "np.load(allow_pickle=True)"))
    return found


def _config_loader(node: ast.Call) -> bool:
    """``yaml.load(text, Loader=_yaml_loader(yaml))``: the config reader's SafeLoader subclass, checked to be safe by
    :func:`test_the_config_yaml_loader_is_a_safe_loader`."""
    loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
    return isinstance(loader, ast.Call) and _dotted(loader.func) == "_yaml_loader"


def test_the_config_yaml_loader_is_a_safe_loader(tmp_path):
    """The one yaml.load the scan lets through reads with a SafeLoader subclass: a Python tag in a config is refused."""
    import yaml

    from DiffusionCore.config import _yaml_loader, read_config_file
    from DiffusionCore.errors import ConfigError

    assert issubclass(_yaml_loader(yaml), yaml.SafeLoader)
    evil = tmp_path / "evil.yaml"
    evil.write_text("learning_rate: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(evil)
    assert not (tmp_path / "pwned").exists()


def test_the_scan_finds_what_it_looks_for():
    code = (
        "import pickle\nimport subprocess, torch, yaml, numpy as np\nsubprocess.run(cmd, shell=True)\n"
        "torch.load(f)\ntorch.load(f, weights_only=True)\nyaml.load(t)\nnp.load(f, allow_pickle=True)\neval(s)\n"
    )
    assert [line for line, _ in unsafe_calls(ast.parse(code))] == [1, 3, 4, 6, 7, 8]


def test_no_source_runs_code_from_data_or_uses_a_shell():
    problems = []
    for path in _sources():
        for line, what in unsafe_calls(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            problems.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert problems == []


def test_yaml_config_with_a_python_tag_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg, SRConfig)
    assert not marker.exists()


def test_volume_temp_file_is_private_and_in_the_output_folder(tmp_path, monkeypatch):
    import DiffusionCore.volume as volume_module

    seen = []
    real = volume_module.sitk.WriteImage

    def spy(img, path, *args, **kwargs):
        seen.append((Path(path), stat.S_IMODE(os.stat(path).st_mode)))
        return real(img, path, *args, **kwargs)

    monkeypatch.setattr(volume_module.sitk, "WriteImage", spy)
    out = write_volume(Volume(np.zeros((2, 4, 4), np.float32)), tmp_path / "ct.nrrd")
    ((tmp, mode),) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".ct.nrrd.") and mode == 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # published with the usual permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_weights_temp_file_is_private_until_renamed(tmp_path, monkeypatch):
    import safetensors.torch

    seen = []
    real = safetensors.torch.save_file

    def spy(tensors, path, metadata=None):
        seen.append((Path(path), stat.S_IMODE(os.stat(path).st_mode)))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    save_safetensors(tmp_path / "w.safetensors", {"a": torch.ones(2)}, {"family": "sr"})
    ((tmp, mode),) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".w.safetensors.") and mode == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_slicer_job_folder_is_private_and_removed(tmp_path, monkeypatch):
    pytest.importorskip("vtk", reason="the Slicer Lib needs vtk (slicer-core)")
    import sys
    import tempfile

    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))
    from CTDiffusionSRLib.jobs import CLIJob

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    class Probe(CLIJob):
        def prepare(self, tempdir: Path) -> list[str]:
            seen.append(stat.S_IMODE(tempdir.stat().st_mode))
            raise InputError("stop before any process starts")

    with pytest.raises(InputError):
        Probe(scene=None).start()
    assert seen == [0o700]  # tempfile.mkdtemp: only the user can list or open the exported volumes
    assert list(tmp_path.iterdir()) == []
