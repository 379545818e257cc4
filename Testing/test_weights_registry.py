"""Weights: safetensors only (pickles never loaded), sha256 checks, registry names and user imports."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from DiffusionCore.errors import WeightsError
from DiffusionCore.sr.throughplane import state_dict_for_file, tiny_predictor
from DiffusionCore.weights import (
    cache_dir,
    import_weights,
    list_weights,
    load_safetensors,
    resolve_weights,
    save_safetensors,
    sha256_file,
)


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Every test gets its own empty user cache (never the real ~/.cache)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(cache))
    return cache


#: The metadata of a tiny through-plane predictor: weights that load (import and verify check that they do).
PREDICTOR_META = {"component": "throughplane", "config": {"throughplane": {"channels": 4, "blocks": 1}}}


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    return state_dict_for_file(tiny_predictor(seed))


def _weights_file(path, family="sr", seed=0):
    sha = save_safetensors(path, _tensors(seed), {"family": family, **PREDICTOR_META})
    return path, sha


def test_save_then_load_round_trip_with_metadata(tmp_path):
    path, sha = _weights_file(tmp_path / "w.safetensors")
    assert sha == sha256_file(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    tensors, meta = load_safetensors(path, expected_sha256=sha)
    assert meta == {"family": "sr", **PREDICTOR_META}
    for k, v in _tensors().items():
        assert torch.equal(tensors[k], v)


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(3, 3)
    save_safetensors(tmp_path / "tied.safetensors", {"a": w, "b": w, "c": w[0]}, {})
    tensors, _ = load_safetensors(tmp_path / "tied.safetensors")
    assert torch.equal(tensors["b"], w) and torch.equal(tensors["c"], w[0])


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_renamed_safetensors_is_refused_without_unpickling(tmp_path, monkeypatch, legacy):
    evil = tmp_path / "model.safetensors"
    torch.save({"weight": torch.ones(2)}, evil, _use_new_zipfile_serialization=not legacy)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the file was unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(WeightsError) as info:
        load_safetensors(evil)
    msg = str(info.value)
    assert "never loaded" in msg and "safetensors" in msg
    with pytest.raises(WeightsError, match="never loaded"):
        resolve_weights(evil, family="sr", allow_unregistered=True)
    with pytest.raises(WeightsError, match="never loaded"):
        import_weights(evil, "evil", family="sr")
    assert not (cache_dir() / "weights" / "evil.safetensors").exists()


def test_sha_mismatch_is_refused(tmp_path):
    path, sha = _weights_file(tmp_path / "w.safetensors")
    wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
    with pytest.raises(WeightsError, match="sha256"):
        load_safetensors(path, expected_sha256=wrong)


def test_truncated_file_is_refused(tmp_path):
    path, _ = _weights_file(tmp_path / "w.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match="truncated"):
        load_safetensors(cut)
    cut.write_bytes(data[:40])  # cut inside the header
    with pytest.raises(WeightsError, match="truncated"):
        load_safetensors(cut)
    with pytest.raises(WeightsError, match="does not exist"):
        load_safetensors(tmp_path / "nothing.safetensors")


def test_unregistered_file_refused_unless_allowed(tmp_path):
    path, sha = _weights_file(tmp_path / "w.safetensors")
    with pytest.raises(WeightsError) as info:
        resolve_weights(path, family="sr")
    msg = str(info.value)
    assert "not a registered" in msg and "import_weights" in msg and "--allow-unregistered-weights" in msg
    # where import_weights is (probe 47, finding 11: it is not in DiffusionCore's namespace), and that it is there
    assert "`DiffusionCore.weights.import_weights(path, name)`" in msg and callable(import_weights)
    resolved = resolve_weights(path, family="sr", allow_unregistered=True)
    assert resolved.sha256 == sha and resolved.name is None and resolved.metadata["family"] == "sr"


def test_family_mismatch_is_refused(tmp_path):
    path, _ = _weights_file(tmp_path / "vae.safetensors", family="vae")
    with pytest.raises(WeightsError, match="'vae' model family.*'sr'") as refused:
        resolve_weights(path, family="sr", allow_unregistered=True)
    # the command line first (it pointed command-line users at Python only), then the Python API
    assert "`python -m DiffusionCore weights list --family sr` lists them" in str(refused.value)
    assert "(in Python: `list_weights(family='sr')`)" in str(refused.value)
    bare = tmp_path / "bare.safetensors"
    save_safetensors(bare, _tensors(), {})
    with pytest.raises(WeightsError, match="family"):
        resolve_weights(bare, family="sr", allow_unregistered=True)


def test_import_then_resolve_by_name_and_by_path(tmp_path, user_cache, no_bundled_weights):
    path, sha = _weights_file(tmp_path / "w.safetensors")
    imported = import_weights(path, "my-sr", description="test weights")
    assert imported.sha256 == sha and imported.path.parent == user_cache / "weights"
    registry = json.loads((user_cache / "weights" / "registry.json").read_text())
    assert registry["weights"]["my-sr"]["sha256"] == sha
    assert registry["weights"]["my-sr"]["family"] == "sr"

    by_name = resolve_weights("my-sr", family="sr")
    assert by_name.name == "my-sr" and by_name.sha256 == sha and by_name.path == imported.path
    loaded = by_name.load()
    assert loaded.keys() == _tensors().keys() and all(torch.equal(loaded[k], v) for k, v in _tensors().items())
    # The original file is now accepted by path, because its hash is registered.
    assert resolve_weights(path, family="sr").name == "my-sr"
    listed = list_weights(family="sr")
    assert [w["name"] for w in listed] == ["my-sr"] and listed[0]["available"]
    assert list_weights(family="xray") == []


def test_registered_file_that_changed_is_refused(tmp_path):
    path, _ = _weights_file(tmp_path / "w.safetensors")
    imported = import_weights(path, "my-sr")
    save_safetensors(imported.path, {"x": torch.ones(1)}, {"family": "sr"})  # replaced behind our back
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights("my-sr", family="sr")
    imported.path.unlink()
    with pytest.raises(WeightsError, match="missing"):
        resolve_weights("my-sr", family="sr")


def test_unknown_name_lists_what_exists(tmp_path):
    path, _ = _weights_file(tmp_path / "w.safetensors")
    import_weights(path, "known-sr")
    with pytest.raises(WeightsError, match="no weights named 'nope'.*known-sr"):
        resolve_weights("nope", family="sr")


def test_import_rejects_bad_names_and_family_conflicts(tmp_path):
    path, _ = _weights_file(tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="invalid weights name"):
        import_weights(path, "../escape")
    with pytest.raises(WeightsError, match="records family 'sr'"):
        import_weights(path, "x", family="xray")


def test_a_training_folder_given_as_weights_names_the_file_to_give(tmp_path):
    """`sr --weights runs/tp` (the run folder, not its export) said only 'give the .safetensors file inside it'."""
    run = tmp_path / "tp"
    (run / "checkpoint-00000010").mkdir(parents=True)
    with pytest.raises(WeightsError, match="holds no exported .safetensors file"):
        load_safetensors(run)
    _weights_file(run / "throughplane.safetensors")
    with pytest.raises(WeightsError, match=r"a folder, not a weights file; give the weights file inside it: .*tp/throughplane\.safetensors$"):
        load_safetensors(run)


def test_imported_weights_and_the_registry_get_normal_permissions(tmp_path, user_cache):
    """The copy and registry.json were written owner-only (0600: mkstemp, renamed), so a lab's shared cache
    (DIFFUSIONCORE_CACHE) could not be read by colleagues."""
    import os
    import stat

    path, _ = _weights_file(tmp_path / "w.safetensors")
    old = os.umask(0o022)
    try:
        imported = import_weights(path, "shared-sr")
    finally:
        os.umask(old)
    for f in (imported.path, user_cache / "weights" / "registry.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert sorted(p.name for p in (user_cache / "weights").iterdir()) == ["registry.json", "shared-sr.safetensors"]


def test_a_taken_name_needs_overwrite(tmp_path, user_cache):
    from DiffusionCore.errors import OutputExistsError

    first, first_sha = _weights_file(tmp_path / "a.safetensors")
    other, other_sha = _weights_file(tmp_path / "b.safetensors", seed=1)
    import_weights(first, "my-sr")
    assert import_weights(first, "my-sr", description="same file again").sha256 == first_sha  # not an error
    registry = user_cache / "weights" / "registry.json"
    before = registry.read_bytes()
    with pytest.raises(OutputExistsError, match="'my-sr' is already registered for other weights") as refused:
        import_weights(other, "my-sr")
    assert refused.value.exit_code == 4 and "overwrite=True" in str(refused.value)
    assert registry.read_bytes() == before and sha256_file(user_cache / "weights" / "my-sr.safetensors") == first_sha
    assert import_weights(other, "my-sr", overwrite=True).sha256 == other_sha
    assert resolve_weights("my-sr", family="sr").sha256 == other_sha
