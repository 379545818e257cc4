"""Hostile weights files and registries (security probe 13): what loading refuses, ``weights import`` and
``weights verify`` refuse too, cleanly (a WeightsError, exit code 3), and nothing hangs, recurses or allocates
what the file asks for. The files are written byte by byte here, as an attacker would."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import DiffusionCore.sr.pipeline  # noqa: F401  (registers the sr architecture check that import and verify use)
import DiffusionCore.xray.cascade  # noqa: F401  (the same for xray)
from DiffusionCore.errors import WeightsError
from DiffusionCore.sr.throughplane import state_dict_for_file, tiny_predictor
from DiffusionCore.weights import registry
from DiffusionCore.weights.registry import (
    import_weights,
    list_weights,
    load_safetensors,
    read_safetensors_header,
    remove_weights,
    resolve_weights,
    save_safetensors,
    sha256_file,
    verify_weights,
)

ROOT = Path(__file__).resolve().parents[1]
PREDICTOR_META = {"family": "sr", "component": "throughplane", "config": {"throughplane": {"channels": 4, "blocks": 1}}}


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(cache))
    return cache


def _cli(cache: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFUSIONCORE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "DiffusionCore", *argv], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", env=env, cwd=ROOT, timeout=timeout)  # fmt: skip


def _predictor_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    return state_dict_for_file(tiny_predictor(seed))


def _predictor_file(path: Path, meta: dict | None = None, tensors: dict | None = None) -> Path:
    save_safetensors(path, _predictor_tensors() if tensors is None else tensors, PREDICTOR_META if meta is None else meta)
    return path


def _raw_file(path: Path, header: str | bytes, data: bytes = b"") -> Path:
    """A safetensors file from a header written by hand (JSON text, not re-encoded by Python's json)."""
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _register_by_hand(cache: Path, name: str, file: Path, family: str = "sr") -> None:
    """A user registry entry for ``file``, as a colleague or an old version could have written it."""
    folder = cache / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{name}.safetensors"
    dest.write_bytes(file.read_bytes())
    reg = folder / "registry.json"
    entries = json.loads(reg.read_text())["weights"] if reg.exists() else {}
    entries[name] = {"file": dest.name, "sha256": sha256_file(dest), "family": family}
    reg.write_text(json.dumps({"weights": entries}))


# -- #3: not a regular file ------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_is_refused_before_it_is_read(tmp_path, user_cache):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    link = tmp_path / "link.safetensors"
    link.symlink_to(fifo)
    for path in (fifo, link):
        for call in (lambda p: read_safetensors_header(p), lambda p: load_safetensors(p),
                     lambda p: resolve_weights(p, family="sr", allow_unregistered=True),
                     lambda p: import_weights(p, "f", family="sr")):  # fmt: skip
            with pytest.raises(WeightsError, match="FIFO.*not a regular file") as info:
                call(path)
            assert str(path) in str(info.value)
    done = _cli(user_cache, "weights", "import", str(fifo), "--name", "f", timeout=60)  # hung forever before
    assert done.returncode == 3 and "not a regular file" in done.stderr and "Traceback" not in done.stderr


def test_a_device_is_refused(tmp_path):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    with pytest.raises(WeightsError, match="a device, not a regular file"):
        load_safetensors("/dev/zero")


# -- #8 and #12f: one read, a bounded header ------------------------------------------------------------------


def test_the_bytes_hashed_are_the_bytes_loaded(tmp_path, monkeypatch):
    """A file swapped right after its hash is checked must not be what is loaded (TOCTOU)."""
    path = _predictor_file(tmp_path / "w.safetensors")
    sha = sha256_file(path)
    evil = _predictor_file(tmp_path / "evil.safetensors", tensors={
        k: torch.zeros_like(v) for k, v in _predictor_tensors().items()}).read_bytes()

    def swap_after(hash_function):
        def hashed(*args, **kwargs):
            digest = hash_function(*args, **kwargs)
            path.write_bytes(evil)  # the attacker swaps the file right after it was hashed
            return digest

        return hashed

    monkeypatch.setattr(registry, "sha256_file", swap_after(registry.sha256_file))  # hashing by path
    monkeypatch.setattr(registry, "hashlib", type("SwappingHashlib", (), {
        "sha256": staticmethod(swap_after(registry.hashlib.sha256))}))  # hashing bytes  # fmt: skip
    tensors, _ = load_safetensors(path, expected_sha256=sha)
    assert all(torch.equal(tensors[k], v) for k, v in _predictor_tensors().items())


def test_a_header_of_megabytes_is_refused_before_it_is_parsed(tmp_path):
    huge = json.dumps({"__metadata__": {"pad": "x" * (9 * 2**20)}})
    path = _raw_file(tmp_path / "huge.safetensors", huge)
    with pytest.raises(WeightsError, match=r"MiB safetensors header .*not a DiffusionCore weights file") as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


# -- #4, #5, #6: refusals, never "internal error" -------------------------------------------------------------


@pytest.mark.parametrize("where", ["top", "metadata", "inner"])
def test_deeply_nested_json_is_a_corrupt_header(tmp_path, user_cache, where):
    deep = "[" * 200_000 + "]" * 200_000
    header = {"top": deep, "metadata": '{"__metadata__": {"x": ' + deep + "}}",
              "inner": json.dumps({"__metadata__": {"diffusioncore": deep}})}[where]  # fmt: skip
    path = _raw_file(tmp_path / f"deep_{where}.safetensors", header)
    with pytest.raises(WeightsError, match="corrupt") as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)
    done = _cli(user_cache, "weights", "import", str(path), "--name", "deep", "--family", "sr")
    assert done.returncode == 3 and "corrupt" in done.stderr and "internal error" not in done.stderr


def test_a_config_that_is_a_string_is_an_invalid_configuration(tmp_path):
    from DiffusionCore.sr.pipeline import SuperResolver

    path = _predictor_file(tmp_path / "w.safetensors", {**PREDICTOR_META, "config": "x"})
    with pytest.raises(WeightsError, match="configuration is invalid") as info:
        SuperResolver.from_pretrained(path, allow_unregistered=True)
    assert str(path) in str(info.value)


def test_a_registry_entry_that_is_not_an_object_makes_the_registry_unreadable(user_cache):
    reg = user_cache / "weights" / "registry.json"
    reg.parent.mkdir(parents=True)
    reg.write_text('{"weights": {"a": 5}}')
    with pytest.raises(WeightsError, match="unreadable.*fix or delete it") as info:
        list_weights()
    assert str(reg) in str(info.value)
    for argv in (("weights", "list"), ("weights", "verify")):
        done = _cli(user_cache, *argv)
        assert done.returncode == 3 and str(reg) in done.stderr and "internal error" not in done.stderr, done.stderr


# -- #7 and #12b: import and verify check what loading checks ------------------------------------------------


def _hostile_files(folder: Path) -> dict[str, Path]:
    ok = _predictor_tensors()
    meta = json.dumps(PREDICTOR_META)
    one = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    files = {
        "dtype_unknown": _raw_file(folder / "dtype.safetensors", json.dumps(
            {"__metadata__": {"diffusioncore": meta}, "predictor.x": {**one, "dtype": "Q99"}}), b"\0" * 4),
        # Python's json keeps the last __metadata__, safetensors' own parser refuses the file
        "dup_meta": _raw_file(folder / "dup.safetensors", '{"__metadata__": {"diffusioncore": "{}"}, '
                              f'"__metadata__": {{"diffusioncore": {json.dumps(meta)}}}, "a": {json.dumps(one)}}}',
                              b"\0" * 4),
        "nan": _predictor_file(folder / "nan.safetensors", tensors={
            k: torch.full_like(v, math.nan) for k, v in ok.items()}),
        "int_tensors": _predictor_file(folder / "int.safetensors", tensors={
            k: v.to(torch.int32) for k, v in ok.items()}),
        "missing_tensor": _predictor_file(folder / "missing.safetensors", tensors=dict(list(ok.items())[1:])),
        "shape_mismatch": _predictor_file(folder / "shape.safetensors", tensors={
            k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if i == 0 else v for i, (k, v) in enumerate(ok.items())}),
        "extra_tensor": _predictor_file(folder / "extra.safetensors", tensors={**ok, "evil.x": torch.zeros(2)}),
        "channels_bomb": _predictor_file(folder / "bomb.safetensors", {
            **PREDICTOR_META, "config": {"throughplane": {"channels": 10**6, "blocks": 10**6}}}),
        "family_list": _predictor_file(folder / "flist.safetensors", {**PREDICTOR_META, "family": ["sr"]}),
        "family_path": _predictor_file(folder / "fpath.safetensors", {**PREDICTOR_META, "family": "../../x"}),
    }
    return files


def test_import_refuses_weights_that_cannot_load(tmp_path, user_cache):
    for case, path in _hostile_files(tmp_path).items():
        with pytest.raises(WeightsError) as info:
            import_weights(path, "hostile")
        assert str(path) in str(info.value), (case, str(info.value))
        assert not (user_cache / "weights" / "hostile.safetensors").exists(), case
    good = import_weights(_predictor_file(tmp_path / "good.safetensors"), "good")
    assert good.path.is_file() and good.sha256 == sha256_file(tmp_path / "good.safetensors")


def test_verify_fails_weights_that_cannot_load(tmp_path, user_cache, no_bundled_weights):
    files = _hostile_files(tmp_path)
    for case, path in files.items():
        _register_by_hand(user_cache, case.replace("_", "-"), path)
    _register_by_hand(user_cache, "good", _predictor_file(tmp_path / "good.safetensors"))
    checks = {c.name: c for c in verify_weights()}
    assert checks["good"].ok
    assert [n for n, c in checks.items() if c.ok] == ["good"], {n: c.problem for n, c in checks.items()}
    done = _cli(user_cache, "weights", "verify", "nan", "good")
    assert done.returncode == 3 and "good" in done.stdout and "non-finite" in done.stdout, done.stdout + done.stderr


def test_the_shipped_weights_still_verify_and_load_bit_identically():
    bundled = registry.read_registry(registry.BUNDLED_REGISTRY)
    checks = verify_weights(list(bundled))
    assert all(c.ok for c in checks), [c.problem for c in checks]
    for name, entry in bundled.items():
        path = registry.BUNDLED_REGISTRY.parent / entry["file"]
        assert sha256_file(path) == entry["sha256"]
        from safetensors.torch import load_file

        reference = load_file(str(path))
        loaded = resolve_weights(name, family=entry["family"]).load()
        assert reference.keys() == loaded.keys() and all(torch.equal(reference[k], loaded[k]) for k in loaded)


def test_sr_refuses_tensors_outside_the_predictor(tmp_path):
    from DiffusionCore.sr.pipeline import SuperResolver

    path = _predictor_file(tmp_path / "extra.safetensors", tensors={**_predictor_tensors(), "evil.x": torch.zeros(2)})
    with pytest.raises(WeightsError, match="outside 'predictor.'"):
        SuperResolver.from_pretrained(path, allow_unregistered=True)


# -- #9: the X-ray metadata's sizes are bounded ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("xray_resolution", 10**6), ("diffusion.sampling_steps", 10**9), ("diffusion.num_samples", 10**6),
     ("data.fov_mm", 0.0), ("data.fov_mm", -5.0), ("data.fov_mm", 1e9)],  # fmt: skip
)
def test_xray_sizes_in_metadata_are_refused_up_front(key, value):
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

    model = UnifiedHybridViTCascade.tiny()
    meta = model.export_metadata()
    section, _, field = key.rpartition(".")
    (meta["configs"][0][section] if section else meta["configs"][0])[field] = value
    with pytest.raises(WeightsError, match=field) as info:
        UnifiedHybridViTCascade.from_tensors(model.state_dict(), meta, "x.safetensors")
    assert "x.safetensors" in str(info.value)


def test_xray_nan_fov_and_unknown_trained_stages_are_refused(tmp_path):
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

    model = UnifiedHybridViTCascade.tiny()
    meta = model.export_metadata({"trained_stages": [99]})
    with pytest.raises(WeightsError, match=r"trained_stages \[99\]"):
        UnifiedHybridViTCascade.from_tensors(model.state_dict(), meta, "x.safetensors")
    path = tmp_path / "nanfov.safetensors"
    meta = model.export_metadata()
    meta["configs"][0]["data"]["fov_mm"] = math.nan
    save_safetensors(path, model.state_dict(), meta)  # json writes NaN, and reads it back
    with pytest.raises(WeightsError, match="fov_mm"):
        UnifiedHybridViTCascade.from_pretrained(path)
    with pytest.raises(WeightsError, match="fov_mm"):
        import_weights(path, "nanfov")


# -- #10, #11: listings and remove ------------------------------------------------------------------------------


def test_control_characters_in_metadata_are_escaped_in_listings(tmp_path, user_cache):
    fake = "\x1b[2J\x1b[31mFAKE\n\rerror: none\x9b"
    path = _predictor_file(tmp_path / "w.safetensors", {**PREDICTOR_META, "description": fake,
                                                         "model_card": "../../../../etc/passwd"})
    done = _cli(user_cache, "weights", "import", str(path), "--name", "esc")
    assert done.returncode == 0, done.stderr
    listed = _cli(user_cache, "weights", "list")
    assert listed.returncode == 0
    assert not any(c in listed.stdout for c in "\x1b\r\x9b") and "FAKE\\n\\rerror: none" in listed.stdout
    as_json = _cli(user_cache, "weights", "list", "--json")
    entry = next(e for e in json.loads(as_json.stdout) if e["name"] == "esc")
    assert entry["description"] == fake and entry["model_card"] == "../../../../etc/passwd"  # text, never opened
    assert "\x1b" not in as_json.stdout


def test_remove_deletes_only_the_names_own_file(tmp_path, user_cache):
    import_weights(_predictor_file(tmp_path / "w.safetensors"), "t")
    folder = user_cache / "weights"
    entries = registry.read_registry(folder / "registry.json")
    entries["evil"] = {"file": "registry.json", "sha256": "0" * 64, "family": "sr"}
    entries["evil2"] = {"file": "t.safetensors", "sha256": "0" * 64, "family": "sr"}
    registry.write_registry(folder / "registry.json", entries)
    remove_weights("evil")
    remove_weights("evil2")
    assert (folder / "registry.json").is_file() and (folder / "t.safetensors").is_file()
    assert [e["name"] for e in list_weights() if e["source"] == "user"] == ["t"]
    remove_weights("t")
    assert not (folder / "t.safetensors").exists()


def test_evaluate_checks_its_weights_before_reading_any_volume(tmp_path, monkeypatch, make_phantom, capsys):
    from DiffusionCore.cli import evaluate as evaluate_cli
    from DiffusionCore.cli.main import main
    from DiffusionCore.volume import write_volume

    reference = tmp_path / "thin.nii.gz"
    write_volume(make_phantom(), reference)
    nan = _predictor_file(tmp_path / "nan.safetensors", tensors={
        k: torch.full_like(v, math.nan) for k, v in _predictor_tensors().items()})

    def no_reading(*args, **kwargs):
        raise AssertionError("the reference was read (and degraded) before the weights were checked")

    monkeypatch.setattr(evaluate_cli, "_read_reference", no_reading)
    rc = main(["evaluate", "--reference", str(reference), "--factor", "2", "--methods", "sr",
               "--weights", str(nan), "--allow-unregistered-weights"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 3 and "non-finite" in err and str(nan) in err, err


@pytest.mark.parametrize("channels", ["4", 4.5, True])
def test_config_numbers_are_not_coerced(tmp_path, channels):
    from DiffusionCore.sr.pipeline import SuperResolver

    meta = {**PREDICTOR_META, "config": {"throughplane": {"channels": channels, "blocks": 1}}}
    path = _predictor_file(tmp_path / "w.safetensors", meta)
    with pytest.raises(WeightsError, match=r"configuration is invalid .*channels must be an integer") as info:
        SuperResolver.from_pretrained(path, allow_unregistered=True)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError, match="channels must be an integer"):
        import_weights(path, "coerced")


def test_the_xray_generator_loads_like_the_super_resolver():
    import inspect

    from DiffusionCore.sr.pipeline import SuperResolver
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    for cls in (SuperResolver, XrayToCTGenerator):
        params = inspect.signature(cls.from_pretrained).parameters
        assert params["allow_unregistered"].kind is inspect.Parameter.KEYWORD_ONLY, cls
        assert "PathLike" in str(params["name_or_file"].annotation), cls
