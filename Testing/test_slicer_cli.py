"""The scripted CLI modules: XML interfaces (parsed with ctk_cli) and end-to-end runs the way Slicer runs them.

Slicer runs a scripted CLI as ``python <Name>.py [--flag value ...] [--returnparameterfile FILE] <index
args>``: every parameter with a value is passed (defaults included), booleans as bare flags only when
true, images as temporary files written by Slicer's storage nodes and read back the same way. The tests
below build that command line from the XML itself, so a drift between XML and script fails here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ctk_cli = pytest.importorskip("ctk_cli")
slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

from CTDiffusionSRLib import mrml_io  # noqa: E402
from CTDiffusionSRLib.process import parse_progress_line  # noqa: E402
from CTDiffusionSRLib.testing import phantom_ct, phantom_radiograph  # noqa: E402

from DiffusionCore.degrade import thin_grid  # noqa: E402
from DiffusionCore.errors import ConfigError  # noqa: E402

CLI_FILES = {
    "CTDiffusionSRBatch": ROOT / "CTDiffusionSR" / "CLI" / "CTDiffusionSRBatch",
    "DiffusionTrain": ROOT / "CTDiffusionSR" / "CLI" / "DiffusionTrain",
    "XrayToCTGenerate": ROOT / "XrayToCT" / "CLI" / "XrayToCTGenerate",
}
#: Script options that are Slicer's protocol, not parameters of the XML.
PROTOCOL_OPTIONS = {"-h", "--help", "--returnparameterfile"}


def _module(name: str):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ctk_cli.CLIModule(str(CLI_FILES[name].with_suffix(".xml")))


def _parameters(name: str) -> list:
    return list(_module(name).parameters())


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", CLI_FILES[name].with_suffix(".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _is_return_value(p) -> bool:
    return p.channel == "output" and p.index is None and not p.longflag and not p.flag


def slicer_command_line(name: str, values: dict, return_file: Path | None = None) -> list[str]:
    """The argv Slicer builds for a scripted CLI from its XML and the parameter values."""
    args: list[str] = []
    params = _parameters(name)
    for p in params:
        if p.index is not None or _is_return_value(p):
            continue
        value = values.get(p.name, p.default)
        if value is None or value == "":
            continue
        flag = p.longflag or p.flag
        if p.typ == "boolean":
            if value in (True, "true"):
                args.append(flag)
            continue
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        args += [flag, str(value)]
    if return_file is not None:
        args += ["--returnparameterfile", str(return_file)]
    for p in sorted((p for p in params if p.index is not None), key=lambda p: int(p.index)):
        args.append(str(values[p.name]))
    return [sys.executable, str(CLI_FILES[name].with_suffix(".py")), *args]


def run_like_slicer(argv: list[str], timeout: float = 240, env: dict | None = None
                    ) -> tuple[subprocess.CompletedProcess, list[float]]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    fractions = [f for f, _ in map(parse_progress_line, proc.stdout.splitlines()) if f is not None]
    return proc, fractions


def write_like_slicer(scene, node, path: Path) -> Path:
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(node), f"Slicer could not write {path}"
    return path


def read_like_slicer(scene, path: Path, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return node


def read_cli_output_like_slicer(node, path: Path) -> None:
    """What Slicer does with a CLI's output file when the CLI ends (``ReadDataRequestFile::Execute`` in
    Base/Logic/vtkSlicerApplicationLogicRequests.h): a storage node for the hand-off file on the output node
    that the CLI's panel created, read, the file name cleared, the file deleted, the node modified."""
    node.AddDefaultStorageNode(str(path))
    storage = node.GetStorageNode()
    storage.SetWriteStateIdle()
    storage.SetFileName(str(path))
    assert storage.ReadData(node, True), f"Slicer could not read {path}"
    storage.SetFileName("")  # nullptr in C++
    path.unlink()
    node.Modified()


def read_return_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


# -- XML -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLI_FILES))
def test_cli_xml_is_valid_for_slicer(name):
    module = _module(name)
    assert module.title and module.category and module.description and module.version
    params = list(module.parameters())
    names = [p.name for p in params]
    assert len(names) == len(set(names)), "parameter names must be unique"
    flags = [p.longflag for p in params if p.longflag] + [p.flag for p in params if p.flag]
    assert len(flags) == len(set(flags)), "flags must be unique"
    indices = sorted(int(p.index) for p in params if p.index is not None)
    assert indices == list(range(len(indices))), "indices must be 0, 1, 2, ..."
    for p in params:
        assert p.label and p.description, f"{p.name} needs a label and a description"
        if _is_return_value(p):
            continue
        assert p.index is not None or p.longflag, f"{p.name} can be neither passed by flag nor by position"
        if p.typ in ("string-enumeration", "integer-enumeration", "float-enumeration"):
            assert p.default in p.elements, f"{p.name}: default {p.default!r} is not one of {p.elements}"
        if p.constraints is not None and p.default is not None:
            lo, hi = float(p.constraints.minimum), float(p.constraints.maximum)
            assert lo <= float(p.default) <= hi, f"{p.name}: default {p.default} outside [{lo}, {hi}]"
        if p.typ == "boolean":
            # Slicer passes a boolean as a bare flag only when true: a default of true could never be unset.
            assert p.default is False, f"{p.name}: boolean defaults must be false"
        if p.isExternalType() or p.typ in ("file", "directory"):
            assert p.channel in ("input", "output"), f"{p.name} needs a channel"


@pytest.mark.parametrize("name", sorted(CLI_FILES))
def test_script_parser_mirrors_the_xml(name):
    parser = _script(name).build_parser()
    by_option = {opt: a for a in parser._actions for opt in a.option_strings}
    positionals = [a.dest for a in parser._actions if not a.option_strings]
    params = [p for p in _parameters(name) if not _is_return_value(p)]
    assert positionals == [p.name for p in sorted((p for p in params if p.index is not None), key=lambda p: int(p.index))]
    for p in params:
        if p.index is not None:
            continue
        action = by_option.get(p.longflag)
        assert action is not None, f"{name}.py does not accept {p.longflag}"
        assert action.dest == p.name
        if p.typ == "boolean":
            assert action.nargs == 0 and action.default is False, f"{p.longflag} must be a bare flag"
        elif p.typ.endswith("-enumeration"):
            assert list(action.choices) == list(p.elements)
            assert action.default == p.default
        elif p.default is not None:
            default = action.default if action.type is None or not isinstance(action.default, str) else action.type(action.default)
            expected = tuple(p.default) if isinstance(p.default, list) else p.default
            assert default == expected, f"{p.longflag}: script default {default!r} != XML default {expected!r}"
    xml_flags = {p.longflag for p in params if p.longflag}
    extra = {opt for opt in by_option if opt.startswith("--")} - xml_flags - PROTOCOL_OPTIONS
    assert not extra, f"{name}.py accepts options the XML does not declare: {extra}"


def test_sr_cli_declares_adaptation_on_by_default_and_records_it_as_json():
    from DiffusionCore.sr.adapt import DEFAULT_ADAPT_STEPS

    params = {p.name: p for p in _parameters("CTDiffusionSRBatch")}
    steps, off, seconds = params["adaptSteps"], params["noAdapt"], params["adaptSeconds"]
    tiny = params["tinyTestPredictor"]
    # on by default, with the engine's default step count (what `sr` does)
    assert (steps.typ, steps.default, steps.longflag) == ("integer", DEFAULT_ADAPT_STEPS, "--adaptSteps")
    assert "Adapt to this scan" in steps.description and not steps.hidden
    assert (off.typ, off.default, off.longflag) == ("boolean", False, "--noAdapt")
    assert (seconds.typ, seconds.default, seconds.longflag) == ("float", 0.0, "--adaptSeconds")  # 0 = use steps
    assert tiny.typ == "boolean" and tiny.hidden  # like tinyTestModel: for self-tests only
    script = _script("CTDiffusionSRBatch")
    parser = script.build_parser()

    def adapt(*flags):
        settings = script.settings_from_args(parser.parse_args([*flags, "in.nrrd", "out.nrrd"]))
        json.dumps(settings)  # the report and the Slicer node record the settings as JSON
        return settings["adapt"], script.adapt_settings(settings["adapt"])

    # Slicer passes every value, defaults included
    recorded, engine = adapt("--adaptSteps", str(DEFAULT_ADAPT_STEPS), "--adaptSeconds", "0")
    assert recorded == {"seconds": 0.0, "steps": DEFAULT_ADAPT_STEPS, "optional": True}
    assert (engine.steps, engine.optional) == (DEFAULT_ADAPT_STEPS, True)
    assert adapt("--noAdapt", "--adaptSteps", "400", "--adaptSeconds", "0") == (None, None)
    recorded, engine = adapt("--adaptSeconds", "30")  # a time budget replaces the steps
    assert recorded == {"seconds": 30.0, "steps": None, "optional": True} and (engine.seconds, engine.steps) == (30.0, None)
    recorded, engine = adapt("--adaptSteps", "5")
    assert recorded["steps"] == 5 and engine.steps == 5
    for bad in (["--adaptSeconds", "-1"], ["--adaptSeconds", "nan"], ["--adaptSteps", "0"]):
        with pytest.raises(ConfigError):
            adapt(*bad)


# -- end to end ------------------------------------------------------------------------------------------
def test_sr_cli_runs_as_slicer_runs_it(scene, tmp_path):
    vol = phantom_ct()
    node = mrml_io.add_volume_node(scene, vol, "CT_01")
    inp = write_like_slicer(scene, node, tmp_path / "input.nrrd")
    argv = slicer_command_line(
        "CTDiffusionSRBatch",
        {
            "inputVolume": inp, "outputVolume": tmp_path / "out.nrrd", "uncertaintyVolume": tmp_path / "unc.nrrd",
            "factor": 4, "numSteps": 2, "numSamples": 2, "device": "cpu", "tinyTestModel": True,
            "reportFile": tmp_path / "report.json",
        },
        tmp_path / "return.txt",
    )
    assert "--tinyTestModel" in argv and "--noDataConsistency" not in argv  # bare booleans
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    proc, fractions = run_like_slicer(argv, env={**env, "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(temp) == []  # importing torch made a torchinductor_<user> folder there, left by every run
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    out = read_like_slicer(scene, tmp_path / "out.nrrd", "result")
    # Slicer's hand-off files are read once and deleted: written without the slow gzip
    assert b"encoding: raw" in (tmp_path / "out.nrrd").read_bytes()[:2000]
    # the output nodes that the CLI's panel created are labelled synthetic when Slicer reads the files back
    mrml_io.watch_results_of_loaded_scenes(scene)
    labelled = {}
    for key in ("out", "unc"):
        labelled[key] = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Output Volume")
        shutil.copy(tmp_path / f"{key}.nrrd", tmp_path / f"handoff_{key}.nrrd")
        read_cli_output_like_slicer(labelled[key], tmp_path / f"handoff_{key}.nrrd")
    expected = thin_grid(vol, 4, axis=0)
    got = mrml_io.volume_from_node(out)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.origin, expected.origin, atol=1e-4)
    np.testing.assert_allclose(got.spacing, expected.spacing, atol=1e-5)
    np.testing.assert_allclose(got.direction, vol.direction, atol=1e-5)
    unc = mrml_io.volume_from_node(read_like_slicer(scene, tmp_path / "unc.nrrd", "unc"))
    assert unc.shape == expected.shape and (unc.array >= 0).all()
    ret = read_return_file(tmp_path / "return.txt")
    assert set(ret) == {"weightsSha256", "modelName", "elapsedSeconds"}
    assert len(ret["weightsSha256"]) == 64 and float(ret["elapsedSeconds"]) > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["num_samples"] == 2 and report["weights_sha256"] == ret["weightsSha256"]
    info = mrml_io.provenance(labelled["out"])
    assert info["kind"] == "super-resolution" and info["weights_sha256"] == ret["weightsSha256"]
    assert info["settings"]["num_samples"] == 2 and labelled["out"].GetName() == "Output Volume (synthetic)"
    assert mrml_io.provenance_record(labelled["unc"]).title == "SR x4 uncertainty (synthetic)"
    assert mrml_io.provenance(labelled["unc"])["kind"] == "uncertainty"
    assert labelled["out"].GetDescription().startswith("SYNTHETIC")


def test_sr_cli_adapts_to_the_scan_before_super_resolving(scene, tmp_path):
    vol = phantom_ct()
    inp = write_like_slicer(scene, mrml_io.add_volume_node(scene, vol, "CT_01"), tmp_path / "input.nrrd")
    argv = slicer_command_line(
        "CTDiffusionSRBatch",
        {
            "inputVolume": inp, "outputVolume": tmp_path / "out.nrrd", "factor": 4, "device": "cpu",
            "tinyTestPredictor": True, "adaptSteps": 2, "reportFile": tmp_path / "report.json",
        },
    )
    proc, fractions = run_like_slicer(argv)
    assert proc.returncode == 0, proc.stderr
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    # the bar reaches its end only once the result is written: "done" at 100% while it was written before
    said = [(f, c) for f, c in map(parse_progress_line, proc.stdout.splitlines()) if f is not None or c]
    writing = next(i for i, (_, c) in enumerate(said) if c == "writing out.nrrd")
    assert all(f is None or f < 1.0 for f, _ in said[:writing]) and any(c == "written" for _, c in said[writing:])
    got = mrml_io.volume_from_node(read_like_slicer(scene, tmp_path / "out.nrrd", "result"))
    assert got.shape == thin_grid(vol, 4, axis=0).shape and np.isfinite(got.array).all()
    report = json.loads((tmp_path / "report.json").read_text())
    adaptation = report["predictor"]["adaptation"]
    assert adaptation["steps"] == 2 and adaptation["skipped"] is None  # exactly the steps asked for
    assert np.isfinite([adaptation["loss_before"], adaptation["loss_after"]]).all()
    assert report["settings"]["adapt"]["steps"] == 2


def test_sr_cli_goes_on_without_adaptation_for_weights_without_a_predictor(scene, tmp_path):
    # adaptation is on by default, so weights with nothing to adapt must not stop the run: the report says why
    inp = write_like_slicer(scene, mrml_io.add_volume_node(scene, phantom_ct(), "CT_01"), tmp_path / "input.nrrd")
    argv = slicer_command_line(
        "CTDiffusionSRBatch",
        {"inputVolume": inp, "outputVolume": tmp_path / "out.nrrd", "factor": 4, "device": "cpu",
         "tinyTestModel": True, "reportFile": tmp_path / "report.json"},
    )
    proc, _ = run_like_slicer(argv)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    adaptation = report["predictor"]["adaptation"]
    assert adaptation["steps"] == 0 and "no through-plane predictor" in adaptation["skipped"]
    assert (tmp_path / "out.nrrd").exists()


def test_sr_cli_says_once_that_diffusion_options_do_nothing_with_the_shipped_weights(scene, tmp_path):
    """Run as Slicer runs it with the shipped sr-default (a through-plane predictor, no diffusion stage): a guidance
    scale, patch size and overlap set away from their defaults are named in one line as having no effect, and the
    result is the one without them; at their defaults nothing is said. Steps and samples, which it cannot give, are
    refused in this CLI's own names (the engine's refusal names the sr command's --num-steps)."""
    inp = write_like_slicer(scene, mrml_io.add_volume_node(scene, phantom_ct(), "CT_01"), tmp_path / "input.nrrd")
    base = {"inputVolume": inp, "factor": 2, "device": "cpu", "noAdapt": True}
    results = {}
    for run, options in (("set", {"guidanceScale": 3.0, "patchSize": "8,32,32", "overlap": "2,8,8"}), ("default", {})):
        proc, _ = run_like_slicer(slicer_command_line(
            "CTDiffusionSRBatch", {**base, **options, "outputVolume": tmp_path / f"{run}.nrrd"}))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        said = [line for line in proc.stderr.splitlines() if "no effect" in line]
        expected = ["warning: --guidanceScale, --patchSize and --overlap have no effect with the weights sr-default: "
                    "they act on the latent diffusion stage alone, and these weights are a through-plane predictor "
                    "without one"] if options else []  # fmt: skip
        assert said == expected, proc.stderr
        results[run] = mrml_io.volume_from_node(read_like_slicer(scene, tmp_path / f"{run}.nrrd", run)).array
    np.testing.assert_array_equal(results["set"], results["default"])
    proc, _ = run_like_slicer(slicer_command_line(
        "CTDiffusionSRBatch", {**base, "numSteps": 3, "outputVolume": tmp_path / "steps.nrrd"}))  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "so --numSteps 3 cannot be used. Set numSteps to 0" in errors[0] and "--num-steps" not in errors[0]
    assert not (tmp_path / "steps.nrrd").exists()


def test_sr_cli_failure_is_one_error_line_with_the_error_code(scene, tmp_path):
    node = mrml_io.add_volume_node(scene, phantom_ct(), "CT_01")
    inp = write_like_slicer(scene, node, tmp_path / "input.nrrd")
    argv = slicer_command_line(
        "CTDiffusionSRBatch",
        {"inputVolume": inp, "outputVolume": tmp_path / "out.nrrd", "weights": str(tmp_path / "missing.safetensors")},
    )
    proc, _ = run_like_slicer(argv)
    assert proc.returncode == 3  # WeightsError
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.nrrd").exists()


def test_a_cli_output_node_takes_the_provenance_of_each_run_read_into_it(scene, tmp_path):
    """Slicer's CLI panel keeps its output node selected after a run and hands every run's result to that node
    through the same file name. A node loaded from an acquired file and then chosen as the output stayed unlabelled,
    and a second run (another factor) left the first run's settings on the node. Each run's file now labels it."""
    from DiffusionCore.volume import write_volume

    def result_file(factor: int, path: Path) -> Path:
        made = mrml_io.add_volume_node(scene, phantom_ct(), f"made x{factor}")
        mrml_io.set_provenance(made, kind="super-resolution", model="sr-default", weights_sha256=f"{factor}" * 64,
                               settings={"factor": factor}, title=f"SR x{factor} (synthetic)",
                               recorded_input=(f"CT x{factor}", ""))  # fmt: skip
        mrml_io.export_result(made, str(path))
        scene.RemoveNode(made)
        return path

    mrml_io.watch_results_of_loaded_scenes(scene)
    write_volume(phantom_ct(), tmp_path / "acquired.nrrd")
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    output = logic.AddArchetypeVolume(str(tmp_path / "acquired.nrrd"), "acquired")  # loaded, then chosen as output
    assert mrml_io.provenance(output) == {}
    handoff = tmp_path / "IAEBC_vtkMRMLScalarVolumeNodeB.nrrd"  # one name per node, run after run
    read_cli_output_like_slicer(output, result_file(2, handoff))
    info = mrml_io.provenance(output)
    assert (info["kind"], info["settings"], info["weights_sha256"]) == ("super-resolution", {"factor": 2}, "2" * 64)
    assert output.GetName() == "acquired (synthetic)" and output.GetDescription().startswith("SYNTHETIC")
    read_cli_output_like_slicer(output, result_file(4, handoff))  # Apply again, another factor
    info = mrml_io.provenance(output)
    assert (info["settings"], info["weights_sha256"]) == ({"factor": 4}, "4" * 64)
    assert mrml_io.provenance_record(output).title == "SR x4 (synthetic)"
    assert mrml_io.provenance_record(output).input == "CT x4" and output.GetName() == "acquired (synthetic)"

    # a result made in this session and saved by Slicer keeps its source: its own file is not another run's
    source = mrml_io.add_volume_node(scene, phantom_ct(), "CT")
    live = mrml_io.add_volume_node(scene, phantom_ct(), "CT SR x3 (synthetic)")
    mrml_io.set_provenance(live, kind="super-resolution", model="sr-default", weights_sha256="3" * 64,
                           settings={"factor": 3}, source=source, title="SR x3 (synthetic)")  # fmt: skip
    storage = live.GetStorageNode()
    storage.SetFileName(str(tmp_path / "saved.nrrd"))
    assert storage.WriteData(live)
    assert "ctdiffusion_synthetic:=true" in (tmp_path / "saved.nrrd").read_bytes()[:4000].decode("latin-1")
    live.SetName("CT SR x3 (synthetic) renamed")  # any later change examines the saved file
    assert mrml_io.source_node(live) is source and mrml_io.provenance(live)["settings"] == {"factor": 3}


def test_xray_cli_runs_as_slicer_runs_it(scene, tmp_path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray((phantom_radiograph(64) * 3000).astype(np.float32))
    image.SetSpacing((5.0, 5.0))
    sitk.WriteImage(image, str(tmp_path / "radiograph.mha"))
    argv = slicer_command_line(
        "XrayToCTGenerate",
        {
            "inputRadiograph": tmp_path / "radiograph.mha", "outputVolume": tmp_path / "ct.nrrd",
            "stageDirectory": tmp_path / "stages", "numStages": 2, "numSteps": 2, "device": "cpu",
            "tinyTestModel": True, "reportFile": tmp_path / "report.json",
        },
        tmp_path / "return.txt",
    )
    proc, fractions = run_like_slicer(argv)
    assert proc.returncode == 0, proc.stderr
    assert fractions and fractions[-1] == 1.0
    stage_lines = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("stage-ready ")]
    assert [s["stage"] for s in stage_lines] == [1, 2]
    assert all(Path(s["file"]).is_file() and "projection_psnr" in s["projection"] for s in stage_lines)
    mrml_io.watch_results_of_loaded_scenes(scene)
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Output Volume")
    shutil.copy(tmp_path / "ct.nrrd", tmp_path / "handoff.nrrd")
    read_cli_output_like_slicer(output, tmp_path / "handoff.nrrd")
    assert mrml_io.provenance(output)["kind"] == "xray-to-ct" and "synthetic" in output.GetName()
    ct = mrml_io.volume_from_node(read_like_slicer(scene, tmp_path / "ct.nrrd", "ct"))
    stage2 = mrml_io.volume_from_node(read_like_slicer(scene, Path(stage_lines[1]["file"]), "stage 2"))
    assert ct.shape == stage2.shape and ct.shape[0] > stage_lines[0]["shape"][0]  # stage 2 is finer
    np.testing.assert_allclose(ct.array, stage2.array, atol=1e-3)
    ret = read_return_file(tmp_path / "return.txt")
    assert len(ret["projectionErrors"].split(",")) == 2 and ret["modelName"].startswith("tiny-test-model")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fov_source"].startswith("pixel spacing")  # the 5 mm header spacing reached the model


def test_xray_cli_prints_the_reference_scores_with_or_without_a_report_file(scene, tmp_path):
    """With a reference CT the run scores its result (3D PSNR, 3D SSIM); without --reportFile those figures were
    computed and thrown away. They are printed on stdout, the output a CLI module's user sees, either way."""
    import SimpleITK as sitk

    from DiffusionCore.volume import read_volume
    from DiffusionCore.xray.evaluate import reference_scores

    image = sitk.GetImageFromArray((phantom_radiograph(64) * 3000).astype(np.float32))
    image.SetSpacing((5.0, 5.0))
    sitk.WriteImage(image, str(tmp_path / "radiograph.mha"))
    reference = write_like_slicer(scene, mrml_io.add_volume_node(scene, phantom_ct(shape=(12, 32, 32), spacing=(8.0, 8.0, 8.0)),
                                                                 "reference"), tmp_path / "reference.nrrd")  # fmt: skip
    for report in ("", tmp_path / "report.json"):
        out = tmp_path / f"ct{'_reported' if report else ''}.nrrd"
        proc, _ = run_like_slicer(slicer_command_line("XrayToCTGenerate", {
            "inputRadiograph": tmp_path / "radiograph.mha", "outputVolume": out, "referenceVolume": reference,
            "numStages": 1, "numSteps": 1, "device": "cpu", "tinyTestModel": True, "reportFile": report}))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        scores = reference_scores(read_volume(out), read_volume(reference))
        lines = proc.stdout.splitlines()
        start = lines.index(f"reference scores against {reference} (its body-centred cube, HU clipped to [-1024, 2048]):")
        assert lines[start + 1:start + 3] == [f"  3D PSNR  {scores['psnr']:.2f} dB", f"  3D SSIM  {scores['ssim']:.3f}"]
        if report:
            assert json.loads(report.read_text())["reference_metrics"] == pytest.approx(scores, rel=1e-4)


def _train_registered() -> bool:
    return bool(_script("DiffusionTrain").family_options("vae"))


def _train_command_line(values: dict) -> list[str]:
    """DiffusionTrain's command line as Slicer builds it; where DiffusionCore's command table lacks "train" in this
    checkout, the same script run with it registered."""
    argv = slicer_command_line("DiffusionTrain", values)
    if _train_registered():
        return argv
    shim = (
        "import runpy, sys; import DiffusionCore.cli.main as m; m.COMMAND_MODULES.append('train'); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [sys.executable, "-c", shim, *argv[1:]]


def test_train_cli_trains_and_writes_metrics_and_weights(tmp_path):
    from DiffusionCore.config import config_to_dict
    from DiffusionCore.sr.config import tiny_config
    from DiffusionCore.volume import write_volume

    (tmp_path / "data").mkdir()
    write_volume(phantom_ct(shape=(32, 40, 40), spacing=(1, 1, 1), direction=np.eye(3)), tmp_path / "data" / "a.nrrd")
    write_volume(phantom_ct(shape=(24, 40, 40), spacing=(1, 1, 1), direction=np.eye(3), seed=1), tmp_path / "val.nrrd")
    (tmp_path / "tiny.json").write_text(json.dumps(config_to_dict(tiny_config())))
    values = {
        "family": "vae", "config": tmp_path / "tiny.json", "data": tmp_path / "data", "outputDirectory": tmp_path / "run",
        "device": "cpu",
        "extraArguments": f"--max-steps 2 --batch-size 1 --patch-size 16 32 32 --val-data {tmp_path / 'val.nrrd'} --val-every 100 --checkpoint-every 100",
    }
    proc = subprocess.run(_train_command_line(values), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["tag"].startswith("loss") for r in records) and all({"step", "tag", "value"} <= r.keys() for r in records)
    assert (tmp_path / "run" / "vae.safetensors").is_file()


def test_train_cli_trains_the_shipped_sr_design_from_slicer(tmp_path):
    """The SR module's training panel (DiffusionTrain) trains the through-plane predictor, the design of the shipped
    sr-default weights, by default: it had only the latent diffusion families, so a Slicer user could not fine-tune
    the shipped model on their own data. The panel's Device reaches it: "auto" trains here (on the CPU), "cuda" on a
    machine without a GPU is refused with a message that says what to choose."""
    import os

    from conftest import ct_phantom_array

    from DiffusionCore.sr.pipeline import SuperResolver
    from DiffusionCore.volume import Volume, write_volume

    (tmp_path / "data").mkdir()
    write_volume(Volume(ct_phantom_array((60, 64, 64), seed=3), spacing=(0.8, 0.8, 1.0)), tmp_path / "data" / "a.nii.gz")
    (tmp_path / "tiny.json").write_text(json.dumps({
        "model": {"channels": 8, "blocks": 1, "factors": [2, 4]}, "pairs": {"thick_rows": 6, "width": 32},
        "batch_size": 4, "val_every": 5, "checkpoint_every": 5, "val_pairs": 4,
    }))  # fmt: skip
    assert _script("DiffusionTrain").build_parser().parse_args([]).family == "throughplane"
    values = {"config": tmp_path / "tiny.json", "data": tmp_path / "data", "outputDirectory": tmp_path / "run",
              "extraArguments": "--max-steps 20"}  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_train_command_line(values), capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/train", "val/gain"} <= {r["tag"] for r in records}  # what the panel plots
    resolver = SuperResolver.from_pretrained(str(tmp_path / "run" / "throughplane.safetensors"), allow_unregistered=True)
    assert resolver.predictor.factors == [2, 4]
    cuda = _train_command_line({**values, "device": "cuda", "outputDirectory": tmp_path / "run2"})
    if not torch.cuda.is_available():
        proc = subprocess.run(cuda, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 5
        assert "no CUDA GPU is usable here" in proc.stderr and "use --device cpu or auto" in proc.stderr
        assert not (tmp_path / "run2").exists()


def test_train_cli_refuses_more_options_that_override_the_panels_fields(tmp_path):
    """`--out-dir X` in Extra options trained into X while the panel followed (and stopped) its own output folder;
    an unclosed quote said only "No closing quotation"."""
    values = {"family": "throughplane", "data": tmp_path, "outputDirectory": tmp_path / "run"}
    for extra, said in ((f"--max-steps 5 --out-dir {tmp_path / 'elsewhere'}", "Extra options sets --out-dir, which the panel's own "
                         "fields set: set it there instead"),
                        ("--max-steps 5 --data=x", "Extra options sets --data"),
                        ("--description 'unclosed", "Extra options (\"--description 'unclosed\") cannot be read: No "
                         "closing quotation; check its quotes")):
        proc = subprocess.run(slicer_command_line("DiffusionTrain", {**values, "extraArguments": extra}),
                              capture_output=True, text=True, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1].startswith(f"error: {said}"), proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "elsewhere").exists()


def test_train_cli_needs_an_output_folder(tmp_path):
    proc = subprocess.run(slicer_command_line("DiffusionTrain", {"family": "sr"}), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")


def test_headless_training_script_builds_the_train_command(monkeypatch):
    import DiffusionCore.cli.main as core_main

    if "train" not in core_main.COMMAND_MODULES:  # see test_train_cli_trains_and_writes_metrics_and_weights
        monkeypatch.setattr(core_main, "COMMAND_MODULES", [*core_main.COMMAND_MODULES, "train"])
    spec = importlib.util.spec_from_file_location("headless_train", ROOT / "scripts" / "headless_train.py")
    headless = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headless)
    # Slicer hands the script everything after "--"; options it does not know go to the train command.
    argv = headless.script_arguments(["--", "--family", "vae", "--output-dir", "run", "--resume", "--max-steps", "2"])
    args, extra = headless.build_parser().parse_known_args(argv)
    # every training family accepts --output-dir (SR / VAE also keep their older --out-dir spelling)
    for family, out_flag in (("vae", "--output-dir"), ("xray", "--output-dir")):
        args.family = family
        supported = headless.supported_options(family)
        command = headless.train_arguments(args, extra, supported)
        assert command[:4] == ["train", family, out_flag, "run"] and out_flag in supported
        assert "--resume" in command and command[-2:] == ["--max-steps", "2"]
        parsed = core_main.build_parser().parse_args(command)  # the train command accepts it
        assert parsed.resume is True
    # the shipped SR design takes the panel's device as every family does
    args.family, args.device, args.data = "throughplane", "auto", "data"
    supported = headless.supported_options("throughplane")
    command = headless.train_arguments(args, extra, supported)
    assert command[:2] == ["train", "throughplane"] and command[command.index("--device") + 1] == "auto"
    assert core_main.build_parser().parse_args(command).resume is True
    args.device = "cuda"
    command = headless.train_arguments(args, extra, supported)
    assert command[command.index("--device") + 1] == "cuda" and core_main.build_parser().parse_args(command)


@pytest.mark.parametrize(("name", "default"), [("CTDiffusionSRBatch", "sr-default"), ("XrayToCTGenerate", "xray-default")])
def test_weights_is_a_safetensors_file_parameter_that_tells_the_truth(name, default):
    weights = next(p for p in _parameters(name) if p.name == "weights")
    # in Slicer's CLI panel: a file picker for .safetensors, not a free-text box
    assert (weights.typ, weights.channel, weights.longflag, weights.fileExtensions) == ("file", "input", "--weights", [".safetensors"])
    assert "bundled default" not in weights.description
    assert default in weights.description and "Import weights" in weights.description
    # the module (and a terminal) may still pass a registered name to the same flag
    args = _script(name).build_parser().parse_args(["--weights", default, "in", "out"])
    assert args.weights == default


def test_train_cli_passes_overwrite_to_the_train_command():
    script = _script("DiffusionTrain")
    params = {p.name: p for p in _parameters("DiffusionTrain")}
    assert params["overwrite"].typ == "boolean" and "Resume or Overwrite" in params["overwrite"].description
    parser = script.build_parser()
    supported = script.family_options("sr")
    assert "--overwrite" in supported  # DiffusionCore's train command has it for every family
    for flags, expected in (([], set()), (["--overwrite"], {"--overwrite"}), (["--resume"], {"--resume"})):
        args = parser.parse_args(["--family", "sr", "--outputDirectory", "run", *flags])
        argv = script.train_argv(args, supported)
        assert {"--overwrite", "--resume"} & set(argv) == expected
    old = parser.parse_args(["--family", "sr", "--outputDirectory", "run", "--overwrite"])
    with pytest.raises(ValueError, match="no --overwrite option"):
        script.train_argv(old, supported - {"--overwrite"})


def test_every_training_front_end_offers_the_same_families_as_the_train_command():
    """The family list is written out in each front end, which must parse its arguments before DiffusionCore can be
    imported (to say when it is not installed): the Slicer CLI (its XML is checked against it above), the headless
    script, the training panel's Lib and both panels' parameter nodes. They must stay the train command's families,
    the shipped design first."""
    import ast

    from CTDiffusionSRLib.training import FAMILIES

    from DiffusionCore.cli.main import build_parser as core_parser

    train = core_parser()._subparsers._group_actions[0].choices["train"]
    commands = set(train._subparsers._group_actions[0].choices)  # the families, and export-sr / export-vae
    spec = importlib.util.spec_from_file_location("headless_train", ROOT / "scripts" / "headless_train.py")
    headless = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headless)
    headless_families = next(a.choices for a in headless.build_parser()._actions if a.dest == "family")
    assert FAMILIES[0] == "throughplane" and set(FAMILIES) == {c for c in commands if not c.startswith("export")}
    assert tuple(_script("DiffusionTrain").FAMILIES) == tuple(headless_families) == FAMILIES
    for panel, first in (("CTDiffusionSR/CTDiffusionSRLib/sr_widget.py", "throughplane"),
                         ("XrayToCT/XrayToCTLib/xray_widget.py", "xray")):  # fmt: skip
        tree = ast.parse((ROOT / panel).read_text(encoding="utf-8"))
        field = next(n for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and ast.unparse(n.target) == "trainingFamily")
        choices = ast.literal_eval(next(c for c in ast.walk(field.annotation) if isinstance(c, ast.List)))
        assert set(choices) == set(FAMILIES) and choices[0] == first and field.value.value == first


#: Runs a CLI script as Slicer does, with the named top-level packages made unimportable (Slicer before the first
#: Apply has numpy, scipy and pydicom, but not torch, tqdm, einops, safetensors or nibabel).
_WITHOUT_PACKAGES = """
import runpy, sys
blocked = set(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
sys.meta_path.insert(0, Block())
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("blocked", ["torch", "tqdm"])
@pytest.mark.parametrize("name,module", [("CTDiffusionSRBatch", "CT Diffusion SR"),
                                         ("XrayToCTGenerate", "X-ray to CT"), ("DiffusionTrain", "CT Diffusion SR")])
def test_a_cli_run_before_the_packages_are_installed_says_which_and_how_to_install_them(tmp_path, name, module, blocked):
    args = {"DiffusionTrain": ["--outputDirectory", str(tmp_path / "run")],
            "CTDiffusionSRBatch": [str(tmp_path / "in.nrrd"), str(tmp_path / "out.nrrd")],
            "XrayToCTGenerate": [str(tmp_path / "in.png"), str(tmp_path / "out.nrrd")]}[name]
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_PACKAGES, blocked, str(CLI_FILES[name].with_suffix(".py")), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"error: the Python package '{blocked}', which CT Diffusion needs, is not installed here" in proc.stderr
    assert f"open the {module} module and press Apply once" in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.nrrd").exists()


@pytest.mark.parametrize("name", ["CTDiffusionSRBatch", "XrayToCTGenerate", "DiffusionTrain"])
def test_a_cli_without_diffusioncore_says_to_install_the_extension_again(tmp_path, name):
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_PACKAGES, "DiffusionCore", str(CLI_FILES[name].with_suffix(".py")),
                           str(tmp_path / "a.nrrd"), str(tmp_path / "b.nrrd")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: DiffusionCore is not installed in this Python" in proc.stderr and "install the extension again" in proc.stderr
