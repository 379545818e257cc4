"""The benchmark scripts' command lines say what each option does and what it defaults to, ``--threads`` defaults the
same way in every script (``OMP_NUM_THREADS`` when set, else 2, the thread count of the model cards' figures), and
``xray_eval.py evaluate``'s JSON records the settings that made its table: the steps and samples the generator used,
not null for "the weights' default", and one record of the seeds."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
#: The scripts whose every option must have a help text naming its default.
DOCUMENTED = ("sr_quality.py", "interpolation.py", "xray_eval.py")
#: Every script with a --threads option: they share benchmarks/bench_common.py's default.
WITH_THREADS = (*DOCUMENTED, "sr_adapt_ablation.py", "sr_speed.py", "train_speed.py", "xray_spine.py")


class _Parser(Exception):
    """Raised in place of parsing, carrying the script's parser."""


def _parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The script's parser, built by its own ``main`` (nothing runs)."""
    spec = importlib.util.spec_from_file_location(f"options_benchmark_{Path(script).stem}", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def capture(self, args=None, namespace=None):
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(_Parser) as caught:
        module.main()
    return caught.value.args[0]


def _all_parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_parsers(sub)
    return found


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("script", DOCUMENTED)
def test_every_option_says_what_it_does_and_its_default(script, monkeypatch):
    missing = []
    for prog, parser in _all_parsers(_parser(script, monkeypatch)):
        for action in _options(parser):
            text = action.help or ""
            name = f"{prog} {action.option_strings[-1]}"
            if len(text) < 10:
                missing.append(f"{name}: no help")
            elif "default" not in text:
                missing.append(f"{name}: the help does not say its default")
        for action in parser._actions:
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction) and not action.help:
                missing.append(f"{prog} {action.dest}: no help")
        parser.format_help()  # every %(default)s expands
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("script", WITH_THREADS)
@pytest.mark.parametrize(("omp", "expected"), [(None, 2), ("1", 1), ("3", 3), ("", 2), ("4,2", 4)])
def test_threads_default_to_omp_num_threads_else_two_in_every_script(script, omp, expected, monkeypatch):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    seen = []
    for prog, parser in _all_parsers(_parser(script, monkeypatch)):
        for action in _options(parser):
            if "--threads" in action.option_strings:
                seen.append(prog)
                assert action.default == expected, prog
                text = parser.format_help()
                assert "OMP_NUM_THREADS" in text and "sr+adapt" in text, prog
                assert action.type("2") == 2
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type("0")
    assert seen, f"{script} has no --threads"


def test_xray_eval_json_records_the_steps_and_samples_used_and_one_record_of_the_seeds(tmp_path, ct_file):
    weights = tmp_path / "tiny" / "xray_cascade.safetensors"
    cascade = UnifiedHybridViTCascade.tiny(0, resolutions=(16,))
    cascade.save_pretrained(weights)
    cfg = cascade.configs[0].diffusion
    report = tmp_path / "eval.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "xray_eval.py"), "evaluate", "--reference", str(ct_file),
                          "--weights", str(weights), "--seeds", "0", "1", "--threads", "1", "--json", str(report)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    written = json.loads(report.read_text())
    settings = written["settings"]
    # the weights' defaults, resolved as the generator resolved them, not null for "default"
    assert settings["steps"] == cfg.sampling_steps and isinstance(settings["steps"], int)
    assert settings["num_samples"] == cfg.num_samples and isinstance(settings["num_samples"], int)
    assert settings["steps_per_stage"] == [cfg.sampling_steps]
    assert settings["num_samples_per_stage"] == [cfg.num_samples]
    assert settings["lifting_start_t"] == pytest.approx(cfg.lifting_start_t)
    assert settings["steps_requested"] is None and settings["num_samples_requested"] is None
    # one record of the seeds: the mean names them all, each run its own
    assert "seed" not in settings and settings["seeds"] == [0, 1]
    assert [r["settings"]["seed"] for r in written["per_seed"]] == [0, 1]
    assert all(r["settings"]["steps"] == settings["steps"] for r in written["per_seed"])
    assert settings["threads"] == 1
    assert f"{cfg.sampling_steps} DDIM steps x {cfg.num_samples} samples" in run.stdout
