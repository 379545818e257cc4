"""``scripts/ship_weights.py``: bundling exported weights, optionally as float16, with their sha256 registered."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from DiffusionCore.files import sha256_file
from DiffusionCore.weights.registry import load_safetensors, save_safetensors
from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("ship_weights", REPO / "scripts/ship_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def exported(tmp_path) -> tuple[Path, UnifiedHybridViTCascade]:
    cascade = UnifiedHybridViTCascade.tiny(seed=3)
    src = tmp_path / "run" / "xray_cascade.safetensors"
    src.parent.mkdir()
    cascade.save_pretrained(src)
    return src, cascade


@pytest.mark.parametrize("half", [False, True])
def test_ships_a_registered_copy_that_loads_as_the_same_network(exported, tmp_path, half):
    src, cascade = exported
    registry = tmp_path / "weights" / "registry.json"
    registry.parent.mkdir()
    dest, digest = _script().ship(src, "xray-test", "xray", "a test", "no card", half=half, registry_file=registry)
    entry = json.loads(registry.read_text())["weights"]["xray-test"]
    assert dest == registry.parent / "xray-test.safetensors" and entry["sha256"] == digest == sha256_file(dest)
    tensors, meta = load_safetensors(dest, expected_sha256=digest)
    assert meta["name"] == "xray-test" and {v.dtype for v in tensors.values()} == {torch.float16 if half else torch.float32}
    if half:  # half the bytes, and the network built from it holds the float32 tensors rounded to float16
        assert dest.stat().st_size < 0.55 * src.stat().st_size
    loaded = UnifiedHybridViTCascade.from_pretrained(dest)
    for k, v in cascade.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == v.dtype
        torch.testing.assert_close(got, v.half().float() if half and v.is_floating_point() else v, atol=0, rtol=0)


def test_refuses_values_beyond_float16_and_another_family(exported, tmp_path):
    src, _ = exported
    tensors, meta = load_safetensors(src)
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = 1e6
    big = tmp_path / "big.safetensors"
    save_safetensors(big, tensors, meta)
    registry = tmp_path / "registry.json"
    ship = _script().ship
    with pytest.raises(SystemExit, match="float16's range"):
        ship(big, "x", "xray", "d", "c", half=True, registry_file=registry)
    with pytest.raises(SystemExit, match="records family 'xray', not 'sr'"):
        ship(src, "x", "sr", "d", "c", registry_file=registry)
    assert not registry.exists() and not (tmp_path / "x.safetensors").exists()
    ship(big, "x", "xray", "d", "c", registry_file=registry)  # float32 keeps it
