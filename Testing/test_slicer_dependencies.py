"""Dependencies the Slicer way (CTDiffusionSRLib.dependencies, Qt-free): what is missing, the one
confirmation, torch through PyTorchUtils with a version requirement, the other packages with their own
dependencies but Slicer's numpy/SimpleITK pinned, install failures told as what happened and what to do,
and opening a module importing no torch.

What needs the Slicer application (the PyTorchUtils dialog, slicer.util.pip_install's own UI) is stood in
for by callables with the same contract; pip itself is run for real where it can fail for real here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CTDiffusionSR") not in sys.path:
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))

from CTDiffusionSRLib import dependencies  # noqa: E402
from CTDiffusionSRLib.dependencies import (  # noqa: E402
    REQUIREMENTS,
    TORCH_REQUIREMENT,
    constraints_text,
    install_failure_message,
    installed_version,
    plan_dependencies,
    run_install,
    satisfies,
    self_test_skip_reason,
    tensorboard_hint,
)

ALL_INSTALLED = {"torch": "2.4.1", "einops": "0.8.0", "safetensors": "0.4.5", "tqdm": "4.66.0", "nibabel": "5.2.1",
                 "scipy": "1.13.1", "pyyaml": "6.0.2", "numpy": "1.26.4", "simpleitk": "2.4.0"}  # fmt: skip


def versions(**changes):
    table = {**ALL_INSTALLED, **changes}
    return lambda name: table.get(name.lower())


def test_nothing_to_install_when_everything_is_there():
    plan = plan_dependencies(True, version_of=versions())
    assert plan.missing == [] and plan.blocking_problem == "" and plan.torch_ok


def test_one_confirmation_lists_torch_and_every_missing_package():
    plan = plan_dependencies(True, version_of=versions(torch=None, einops=None, scipy="1.9.0"))
    assert plan.install_torch and plan.packages == ["einops>=0.7,<1", "scipy>=1.10,<2"]
    text = plan.confirmation_text()
    assert f"PyTorch (torch{TORCH_REQUIREMENT}) through the PyTorch extension" in text
    assert "- einops>=0.7,<1" in text and "- scipy>=1.10,<2 (installed: 1.9.0)" in text
    assert "numpy and SimpleITK are kept" in text
    # what torch costs depends on the build the PyTorch extension picks: both are named before anyone agrees
    assert "CUDA build of a few GB where an NVIDIA GPU driver is found" in text and "CPU build of several hundred MB" in text
    assert "torchvision" in text
    without_torch = plan_dependencies(True, version_of=versions(einops=None)).confirmation_text()
    assert "- einops>=0.7,<1" in without_torch and "CUDA" not in without_torch  # only pip's small packages


def test_an_installed_torch_is_checked_against_the_requirement():
    old = plan_dependencies(True, version_of=versions(torch="2.0.1"))
    assert not old.torch_ok and old.install_torch
    assert old.missing == [f"PyTorch: upgrade torch 2.0.1 to torch{TORCH_REQUIREMENT} through the PyTorch extension"]
    assert plan_dependencies(True, version_of=versions(torch="2.13.0+cu121")).missing == []  # local versions


def test_without_the_pytorch_extension_the_user_is_told_to_install_it():
    plan = plan_dependencies(False, version_of=versions(torch=None))
    assert "Extensions Manager" in plan.blocking_problem and "'PyTorch'" in plan.blocking_problem
    # a torch that is already there is enough, extension or not
    assert plan_dependencies(False, version_of=versions()).blocking_problem == ""


def test_tensorboard_is_not_installed_and_the_hint_says_only_what_is_true(tmp_path, monkeypatch):
    assert "tensorboard" not in plan_dependencies(True, training=True, version_of=versions()).missing
    assert plan_dependencies(True, training=True, version_of=versions()).missing == []
    monkeypatch.setattr(dependencies, "is_installed", lambda name: False)
    hint = tensorboard_hint(tmp_path)
    assert "tensorboard --logdir" not in hint and str(tmp_path / "metrics.jsonl") in hint
    monkeypatch.setattr(dependencies, "is_installed", lambda name: True)
    assert tensorboard_hint(tmp_path) == f'TensorBoard: tensorboard --logdir "{tmp_path}"'


def test_versions_are_bounded_and_agree_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lower = {re.split(r"[<>=]", r)[0].lower(): r for r in project}
    assert lower["torch"] == f"torch{TORCH_REQUIREMENT}"
    for req in REQUIREMENTS.values():
        name = re.split(r"[<>=]", req)[0]
        assert ">=" in req and "<" in req.replace("<=", ""), f"{req}: needs a lower and an upper bound"
        assert req.startswith(lower[name].split(",")[0]), f"{req} vs pyproject {lower[name]}"
        installed = installed_version(name)
        assert installed is not None and satisfies(installed, req[len(name) :]), f"the tested {name} {installed} is outside {req}"
    assert satisfies("1.0.0", ">=0.7,<1") is False and satisfies("0.9.9", ">=0.7,<1")


def test_constraints_pin_the_installed_protected_packages(tmp_path):
    text = constraints_text(versions(torch="2.4.1+cpu"))
    pins = dict(line.split("==") for line in text.splitlines() if "==" in line)
    assert pins == {"numpy": "1.26.4", "simpleitk": "2.4.0", "torch": "2.4.1+cpu"}
    real = dict(line.split("==") for line in constraints_text().splitlines() if "==" in line)
    assert real["numpy"] == installed_version("numpy")


def test_a_real_pip_failure_offline_becomes_a_message_with_what_to_do(tmp_path):
    # pip for real, against an index that cannot be reached (--isolated: no pip configuration of this machine;
    # installs nothing: --target a temporary folder). Offline, pip retries and then finds "no version".
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--no-cache-dir",
         "--target", str(tmp_path / "t"), "--index-url", "http://127.0.0.1:9/simple", "--retries", "1",
         "--timeout", "2", "einops>=0.7,<1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    error = subprocess.CalledProcessError(proc.returncode, ["pip"])
    message = install_failure_message("the Python packages", proc.stdout + proc.stderr, error)
    assert message.startswith("Installing the Python packages failed: the package index could not be reached")
    assert "What to do: connect this computer to the internet" in message and "Traceback" not in message


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device", "the disk is full"),
        ("WARNING: Retrying ... ProxyError('Cannot connect to proxy.', OSError('Tunnel connection failed: 407 Proxy Authentication Required'))", "proxy"),
        ("ERROR: Could not install packages due to an OSError: [Errno 13] Permission denied: '/opt/Slicer/lib/Python'", "not writable"),
        ("ERROR: Cannot install scipy==1.14 because these package versions have conflicting dependencies.\nERROR: ResolutionImpossible", "never replaced"),
        ("SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed'))", "certificate"),
        ("ERROR: No matching distribution found for scipy<2,>=1.10", "no version of a required package"),
    ],
)
def test_install_failures_say_what_happened_and_what_to_do(output, expected):
    message = install_failure_message("PyTorch", "Collecting torch\n" + output, subprocess.CalledProcessError(1, ["x"]))
    assert message.startswith("Installing PyTorch failed:") and expected in message and "What to do:" in message


def test_an_unknown_failure_still_gives_advice_not_a_traceback():
    message = install_failure_message("PyTorch", "something odd", RuntimeError("boom"))
    assert "RuntimeError: boom" in message and "What to do:" in message


class Installer:
    """Stands in for PyTorchUtils.installTorch and slicer.util.pip_install (both print their log)."""

    def __init__(self, torch_log="", torch_error=None, torch_result="torch", pip_log="", pip_error=None):
        self.calls = []
        self.torch_log, self.torch_error, self.torch_result = torch_log, torch_error, torch_result
        self.pip_log, self.pip_error = pip_log, pip_error

    def install_torch(self, requirement):
        self.calls.append(("torch", requirement))
        print(self.torch_log)
        if self.torch_error:
            raise self.torch_error
        return self.torch_result

    def pip_install(self, args):
        self.calls.append(("pip", list(args)))
        print(self.pip_log)
        if self.pip_error:
            raise self.pip_error


def test_install_runs_torch_then_the_packages_under_the_constraints(tmp_path):
    plan = plan_dependencies(True, version_of=versions(torch=None, tqdm=None))
    installer = Installer()
    outcome = run_install(
        plan, install_torch=installer.install_torch, pip_install=installer.pip_install,
        replan=lambda: plan_dependencies(True, version_of=versions()), constraints_folder=tmp_path,
        version_of=versions(),
    )  # fmt: skip
    assert outcome.ok and outcome.message == ""
    constraints = tmp_path / "ctdiffusion-constraints.txt"
    assert installer.calls == [("torch", TORCH_REQUIREMENT), ("pip", ["--constraint", str(constraints), "tqdm>=4.60,<5"])]
    assert "numpy==1.26.4" in constraints.read_text()


def test_a_failed_torch_install_stops_with_the_cause_and_installs_nothing_else(tmp_path, capsys):
    plan = plan_dependencies(True, version_of=versions(torch=None, tqdm=None))
    installer = Installer(
        torch_log="ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
        torch_error=subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "light_the_torch"]),
    )
    outcome = run_install(
        plan, install_torch=installer.install_torch, pip_install=installer.pip_install, replan=lambda: plan,
        constraints_folder=tmp_path,
    )  # fmt: skip
    assert not outcome.ok and "the disk is full" in outcome.message and "No space left" in outcome.details
    assert [c[0] for c in installer.calls] == ["torch"]
    assert "No space left" in capsys.readouterr().out  # the log still reaches Slicer's console


def test_in_slicer_5_12_a_failed_package_install_shows_one_dialog_the_one_naming_the_cause(tmp_path):
    dialogs, calls = [], []

    def packaging_pip_install(args, show_progress=True, **kwargs):  # slicer.packaging.pip_install's contract
        calls.append((list(args), show_progress))
        print("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device")
        if show_progress:
            dialogs.append("Package installation failed.")
        raise subprocess.CalledProcessError(1, "pip install")

    def util_pip_install(args):
        raise AssertionError("Slicer 5.12's packaging installer must be used where it exists")

    plan = plan_dependencies(True, version_of=versions(nibabel=None))
    outcome = run_install(plan, install_torch=Installer().install_torch, replan=lambda: plan, constraints_folder=tmp_path,
                          pip_install=dependencies.quiet_pip_install(util_pip_install, packaging_pip_install))  # fmt: skip
    assert not outcome.ok and "the disk is full" in outcome.message  # the module's own dialog: the only one
    assert dialogs == [] and calls and all(shown is False for _, shown in calls)
    # before Slicer 5.12 there is no packaging module: slicer.util.pip_install, which shows no dialog, is used as is
    assert dependencies.quiet_pip_install(util_pip_install, None) is util_pip_install


def test_a_declined_or_failed_package_install_is_reported(tmp_path):
    plan = plan_dependencies(True, version_of=versions(torch=None))
    declined = Installer(torch_result=None)
    outcome = run_install(plan, install_torch=declined.install_torch, pip_install=declined.pip_install, replan=lambda: plan, constraints_folder=tmp_path)
    assert not outcome.ok and "PyTorch was not installed" in outcome.message

    plan = plan_dependencies(True, version_of=versions(nibabel=None))
    offline = Installer(pip_log="WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(...: Failed to establish a new connection: [Errno -3] Temporary failure in name resolution')",
                        pip_error=subprocess.CalledProcessError(1, ["pip"]))  # fmt: skip
    outcome = run_install(plan, install_torch=offline.install_torch, pip_install=offline.pip_install, replan=lambda: plan, constraints_folder=tmp_path)
    assert not outcome.ok and "could not be reached" in outcome.message and [c[0] for c in offline.calls] == ["pip"]


def test_an_install_that_leaves_a_package_unusable_says_so(tmp_path):
    plan = plan_dependencies(True, version_of=versions(nibabel=None))
    installer = Installer()
    outcome = run_install(plan, install_torch=installer.install_torch, pip_install=installer.pip_install, replan=lambda: plan, constraints_folder=tmp_path)
    assert not outcome.ok and "still cannot be used: nibabel>=5.0,<6" in outcome.message


def test_a_torch_upgrade_while_torch_is_loaded_asks_for_a_restart(tmp_path):
    plan = plan_dependencies(True, version_of=versions(torch="2.0.1"))
    plan.torch_imported = True
    installer = Installer()
    outcome = run_install(plan, install_torch=installer.install_torch, pip_install=installer.pip_install,
                          replan=lambda: plan_dependencies(True, version_of=versions()), constraints_folder=tmp_path)  # fmt: skip
    assert outcome.ok and outcome.restart_needed and "Restart Slicer" in outcome.message


def test_self_tests_skip_with_a_message_without_torch_and_run_with_it():
    reason = self_test_skip_reason(versions(torch=None))
    assert reason.startswith("Self-test skipped:") and "PyTorch is not installed" in reason
    assert "torch 2.0.1" in self_test_skip_reason(versions(torch="2.0.1"))
    assert "nibabel" in self_test_skip_reason(versions(nibabel=None))
    assert self_test_skip_reason() == ""  # here torch and everything else is installed: the tiny model runs


@pytest.mark.parametrize("module", ["CTDiffusionSR", "XrayToCT"])
def test_self_test_checks_the_skip_reason_before_anything_else(module):
    import ast

    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    test_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == f"{module}Test")
    for method in (f for f in test_cls.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")):
        body = method.body
        assert "self_test_skip_reason" in ast.unparse(body[0]) and "self_test_skip_reason()" in ast.unparse(body[1])
        guard = body[2]
        assert isinstance(guard, ast.If) and isinstance(guard.body[-1], ast.Return)
        assert "delayDisplay(reason)" in ast.unparse(guard) and "logging.warning(reason)" in ast.unparse(guard)
        # nothing that needs torch or numpy is imported before the guard
        assert not any(isinstance(s, ast.Import | ast.ImportFrom) for s in body[:2] if "dependencies" not in ast.unparse(s))


def _run_python(code: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; ``cache``: its DiffusionCore cache folder (a fresh install's, without the
    weights this machine's user imported)."""
    env = {**os.environ, "DIFFUSIONCORE_CACHE": str(cache)} if cache is not None else None
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=180,
                          env=env)  # fmt: skip


def test_what_a_module_does_when_opened_imports_no_torch(tmp_path):
    # What the widgets' setup()/enter() call (the module files need Qt; this is everything they reach).
    proc = _run_python(
        f"""
        import sys
        sys.path[:0] = [{str(ROOT / "CTDiffusionSR")!r}, {str(ROOT / "XrayToCT")!r}]
        import slicer
        from CTDiffusionSRLib.slicer_version import check_slicer_version
        from CTDiffusionSRLib.dependencies import plan_dependencies
        from CTDiffusionSRLib.weights_choice import apply_state, weights_items, weights_problem
        from CTDiffusionSRLib.training import list_presets
        from CTDiffusionSRLib.sr_logic import SRSettings, check_sr_input
        from XrayToCTLib import check_xray_input
        scene = slicer.vtkMRMLScene()
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        check_slicer_version("CT Diffusion SR")
        for family in ("sr", "xray"):
            weights_items(family, "")
            apply_state(running=False, input_problem="", weights_problem=weights_problem(family, ""), action="", cancel="")
            list_presets(family)
        check_sr_input(node, SRSettings()), check_xray_input(node)
        plan_dependencies(True)
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
        print("no torch")
        """
    )
    assert proc.returncode == 0 and "no torch" in proc.stdout, proc.stderr[-2000:]


def test_the_dependency_check_and_weights_list_work_before_anything_is_installed(tmp_path):
    blocked = sorted({*REQUIREMENTS, "torch"})  # DiffusionCore itself ships with the extension
    proc = _run_python(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError("not installed yet: " + name)
        sys.meta_path.insert(0, Block())
        sys.path[:0] = [{str(ROOT / "CTDiffusionSR")!r}]
        from CTDiffusionSRLib.dependencies import plan_dependencies
        from CTDiffusionSRLib.weights_choice import weights_items, weights_problem
        plan = plan_dependencies(True)
        print(weights_items("sr", ""), bool(weights_problem("sr", "")))
        """,
        cache=tmp_path / "cache",  # a fresh install: no weights imported by this machine's user
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the shipped default is listed and preselected, Apply is enabled (it installs what is missing first)
    assert "(['sr-default'], 'sr-default') False" in proc.stdout
