"""The ``weights`` command (list, import, remove, verify) and the rule that every weights path of ``sr`` goes
through the registry's sha256 check, the VAE + diffusion checkpoint pair included. Real subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from DiffusionCore.sr.model import SRModel
from DiffusionCore.volume import Volume, write_volume

ROOT = Path(__file__).resolve().parents[1]


def _cli(cache: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFUSIONCORE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "DiffusionCore", *argv], capture_output=True, text=True, encoding="utf-8",
        errors="replace", env=env, cwd=ROOT,
        timeout=300,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    tiny = SRModel.tiny(seed=0)
    vae, diffusion = folder / "vae.safetensors", folder / "diffusion.safetensors"
    tiny.save(vae, component="vae")
    tiny.save(diffusion, component="diffusion")
    return vae, diffusion


@pytest.fixture
def thick_ct(tmp_path, make_phantom) -> Path:
    vol: Volume = make_phantom(shape=(8, 32, 32), spacing=(1.0, 1.0, 4.0))
    path = tmp_path / "thick.nii.gz"
    write_volume(vol, path)
    return path


def test_an_unregistered_checkpoint_pair_is_refused_like_any_weights_file(tmp_path, pair, thick_ct):
    vae, diffusion = pair
    cache = tmp_path / "cache"
    before = _sha(thick_ct)
    out = tmp_path / "out.nii.gz"
    argv = ["sr", str(thick_ct), str(out), "--factor", "2", "--vae-checkpoint", str(vae),
            "--diffusion-checkpoint", str(diffusion), "--device", "cpu"]
    refused = _cli(cache, *argv)
    assert refused.returncode == 3, refused.stderr
    error = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "not a registered weights file" in error[0]
    assert "weights import" in error[0] and "--allow-unregistered-weights" in error[0]
    assert not out.exists() and _sha(thick_ct) == before

    trusted = _cli(cache, *argv, "--allow-unregistered-weights")
    assert trusted.returncode == 0, trusted.stderr
    assert out.is_file() and trusted.stderr.count("using unregistered weights") == 2  # once per file
    out.unlink()
    (tmp_path / "out.json").unlink()  # the result's provenance sidecar

    for name, file in (("my-vae", vae), ("my-diffusion", diffusion)):
        done = _cli(cache, "weights", "import", str(file), "--name", name)
        assert done.returncode == 0, done.stderr
    registered = _cli(cache, *argv)
    assert registered.returncode == 0, registered.stderr
    assert out.is_file() and "using unregistered weights" not in registered.stderr


def test_import_list_verify_remove(tmp_path, pair):
    vae, _ = pair
    cache = tmp_path / "cache"
    imported = _cli(cache, "weights", "import", str(vae), "--name", "site-vae", "--description", "our VAE")
    assert imported.returncode == 0, imported.stderr
    copy = cache / "weights" / "site-vae.safetensors"
    assert copy.is_file() and _sha(copy) == _sha(vae)
    assert "--weights site-vae" in imported.stdout

    listed = json.loads(_cli(cache, "weights", "list", "--json").stdout)
    mine = {e["name"]: e for e in listed}["site-vae"]
    assert mine["source"] == "user" and mine["available"] and mine["sha256"] == _sha(vae)
    assert mine["description"] == "our VAE" and mine["family"] == "sr"
    assert {e["name"] for e in listed} >= {"site-vae"}
    assert [e["name"] for e in json.loads(_cli(cache, "weights", "list", "--family", "xray", "--json").stdout)] \
        == [e["name"] for e in listed if e["family"] == "xray"]

    ok = _cli(cache, "weights", "verify", "site-vae")
    assert ok.returncode == 0 and "site-vae" in ok.stdout and "ok" in ok.stdout

    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in a tensor: the file still parses, the sha256 differs
    copy.write_bytes(bytes(data))
    bad = _cli(cache, "weights", "verify")
    assert bad.returncode == 3
    assert "site-vae" in bad.stdout and "FAILED" in bad.stdout and "sha256" in bad.stdout
    assert bad.stderr.strip().splitlines()[-1].startswith("error: 1 of")

    removed = _cli(cache, "weights", "remove", "site-vae")
    assert removed.returncode == 0, removed.stderr
    assert not copy.exists()
    assert "site-vae" not in {e["name"] for e in json.loads(_cli(cache, "weights", "list", "--json").stdout)}
    assert vae.is_file()  # the user's own file is never touched

    again = _cli(cache, "weights", "remove", "site-vae")
    assert again.returncode == 3 and "no imported weights named 'site-vae'" in again.stderr


def test_refusals_name_the_problem(tmp_path, pair):
    vae, _ = pair
    cache = tmp_path / "cache"
    bundled = _cli(cache, "weights", "remove", "sr-default")
    assert bundled.returncode == 3 and "ships with the extension" in bundled.stderr

    pickle_file = tmp_path / "model.safetensors"
    pickle_file.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle's first bytes, whatever the suffix
    pickled = _cli(cache, "weights", "import", str(pickle_file), "--name", "p")
    assert pickled.returncode == 3 and "pickle" in pickled.stderr.lower()

    bad_name = _cli(cache, "weights", "import", str(vae), "--name", "../escape")
    assert bad_name.returncode == 3 and "invalid weights name" in bad_name.stderr

    taken = _cli(cache, "weights", "import", str(vae), "--name", "sr-default")
    assert taken.returncode == 3 and "bundled" in taken.stderr

    wrong_family = _cli(cache, "weights", "import", str(vae), "--name", "x", "--family", "xray")
    assert wrong_family.returncode == 3 and "family" in wrong_family.stderr

    missing = _cli(cache, "weights", "import", str(tmp_path / "nope.safetensors"), "--name", "n")
    assert missing.returncode in (2, 3) and "nope.safetensors" in missing.stderr
    assert not (cache / "weights" / "registry.json").exists()

    unknown = _cli(cache, "weights", "verify", "no-such-weights")
    assert unknown.returncode == 3 and "no weights named 'no-such-weights'" in unknown.stderr


def test_a_trusted_unregistered_file_is_checked_and_named_once(tmp_path, thick_ct):
    combined = tmp_path / "sr.safetensors"
    SRModel.tiny(seed=0).save(combined)
    done = _cli(tmp_path / "cache", "sr", str(thick_ct), str(tmp_path / "o.nii.gz"), "--factor", "2",
                "--weights", str(combined), "--allow-unregistered-weights", "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("using unregistered weights") == 1


def test_a_taken_name_is_replaced_only_with_overwrite(tmp_path, pair):
    """`weights import other.safetensors --name my-sr` silently replaced the file already registered under that name
    (exit 0, an info line); every other command asks for --overwrite."""
    vae, diffusion = pair
    cache = tmp_path / "cache"
    folder = cache / "weights"
    assert _cli(cache, "weights", "import", str(vae), "--name", "my-sr").returncode == 0
    again = _cli(cache, "weights", "import", str(vae), "--name", "my-sr")  # the very same file: nothing to refuse
    assert again.returncode == 0, again.stderr
    registry_before = (folder / "registry.json").read_bytes()

    taken = _cli(cache, "weights", "import", str(diffusion), "--name", "my-sr")
    assert taken.returncode == 4, taken.stderr
    error = [line for line in taken.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "the name 'my-sr' is already registered for other weights" in error[0]
    assert f"sha256 {_sha(vae)[:12]}" in error[0] and "pass --overwrite to replace them" in error[0]
    assert (folder / "registry.json").read_bytes() == registry_before  # nothing changed, nothing left behind
    assert _sha(folder / "my-sr.safetensors") == _sha(vae)
    assert sorted(p.name for p in folder.iterdir()) == ["my-sr.safetensors", "registry.json"]

    replaced = _cli(cache, "weights", "import", str(diffusion), "--name", "my-sr", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert _sha(folder / "my-sr.safetensors") == _sha(diffusion)
    entry = {e["name"]: e for e in json.loads(_cli(cache, "weights", "list", "--json").stdout)}["my-sr"]
    assert entry["sha256"] == _sha(diffusion) and entry["available"]
    assert vae.is_file() and diffusion.is_file()  # the user's own files are never touched
