"""What a run may start from: ``--init-from`` (and ``train sr --vae``, ``train xray --stageN-checkpoint``) refuse
weights of another model before any data is read, in one line that names what the weights hold and what the
command needs.

What a file holds is what it records itself, as every loader reads it: the ``family`` and ``component`` of its
``"diffusioncore"`` header metadata (:mod:`DiffusionCore.weights.registry`), for a registered name the file the
registry names, for a training folder its exported weights or else the models its latest checkpoint lists (a
checkpoint's model files record ``{"kind": "model", "model": NAME}``). Weights that record no family are left to the
loader's own checks.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from ..errors import WeightsError

#: (family, component) as the exporters record them -> what the weights are, in words. The strings are those of
#: ``sr.model.FAMILY`` ("sr": ``train vae`` / ``train sr`` export components "vae", "sr" and "diffusion"),
#: ``sr.throughplane.COMPONENT`` ("throughplane") and ``xray.cascade.FAMILY`` ("xray"); a component of None stands
#: for any component of that family (Testing/test_trainguard_weights.py pins them against those constants).
KINDS: dict[tuple[str, str | None], str] = {
    ("sr", "throughplane"): "through-plane predictor weights",
    ("sr", "sr"): "SR latent diffusion weights (VAE + denoiser)",
    ("sr", "diffusion"): "SR denoiser weights",
    ("sr", "vae"): "SR VAE weights",
    ("sr", None): "SR latent diffusion weights",
    ("xray", None): "X-ray to CT weights",
    ("sr-latents", None): "precomputed SR latents (not weights)",
}

#: A checkpoint's model names -> the (family, component) its weights are (the families' ``MODEL_NAME`` s).
CHECKPOINT_MODELS: dict[str, tuple[str, str | None]] = {
    "predictor": ("sr", "throughplane"),
    "cascade": ("xray", None),
    "denoiser": ("sr", "sr"),
    "vae": ("sr", "vae"),
}

#: What each family's run may start from: (family, component) pairs; a component of None matches any.
THROUGHPLANE = frozenset({("sr", "throughplane")})
SR_DENOISER = frozenset({("sr", "sr"), ("sr", "diffusion"), ("sr", "")})
SR_VAE = frozenset({("sr", "vae"), ("sr", "sr")})
XRAY = frozenset({("xray", None)})


def describe(holding: tuple[str, str]) -> str:
    """``(family, component)`` in words (``component`` "" when the weights record none)."""
    family, component = holding
    kind = KINDS.get((family, component or None)) or KINDS.get((family, None))
    if kind is not None:
        return kind
    return f"{family!r} weights" + (f" (component {component!r})" if component else "")


def _from_metadata(metadata: dict) -> tuple[str, str] | None:
    family = metadata.get("family")
    if isinstance(family, str):
        return family, str(metadata.get("component") or "")
    model = metadata.get("model")
    if metadata.get("kind") == "model" and model in CHECKPOINT_MODELS:  # a model file inside a checkpoint
        family, component = CHECKPOINT_MODELS[model]
        return family, component or ""
    return None


def _from_file(path: Path) -> tuple[str, str] | None:
    from ..weights.registry import read_safetensors_header

    try:
        _, metadata = read_safetensors_header(path)
    except WeightsError:
        return None  # not readable weights: the loader says what is wrong with the file
    return _from_metadata(metadata)


def _from_folder(path: Path) -> tuple[str, str] | None:
    from .checkpoint import STATE_FILE, find_latest, read_checkpoint_info

    # a run's export (the model files of a checkpoint folder record no family: they come out as None here)
    exported = [h for f in sorted(path.glob("*.safetensors")) if f.is_file() and (h := _from_file(f))]
    if exported:
        return exported[0]
    ckpt = path if (path / STATE_FILE).is_file() else find_latest(path)
    if ckpt is None:
        return None
    try:
        models = read_checkpoint_info(ckpt).get("models") or []
    except (WeightsError, OSError):
        return None
    found = [CHECKPOINT_MODELS[m] for m in models if m in CHECKPOINT_MODELS]
    if ("sr", "vae") in found and ("sr", "sr") in found:  # a train sr run: VAE + denoiser
        found = [("sr", "sr")]
    return (found[0][0], found[0][1] or "") if found else None


def weights_holding(source: str | os.PathLike) -> tuple[str, str] | None:
    """``(family, component)`` that ``source`` records (component "" when none): a weights file, a registered
    name or a training folder. None when it records nothing (or does not exist: the loader then says so)."""
    from ..weights.registry import list_weights

    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        return _from_file(path)
    registered = next((e for e in list_weights() if e["name"] == str(source)), None)
    if registered is not None and Path(registered["path"]).is_file():
        return _from_file(Path(registered["path"]))
    return None


def check_starting_weights(
    source: str | os.PathLike | None, *, option: str, accepts: Collection[tuple[str, str | None]], needs: str
) -> None:
    """Refuse ``source`` when it records weights of another kind than ``accepts`` lists.

    Args:
        source: what the option names (None: not given, nothing to check).
        option: the command and option, for the message (``"train throughplane --init-from"``).
        accepts: the ``(family, component)`` pairs the command can start from; a component of None matches every
            component of that family, "" weights that record no component.
        needs: what the command needs, in words (``"through-plane predictor weights (e.g. sr-default)"``).

    Raises:
        WeightsError: ``source`` holds weights of another model (exit code 3 on the command line).
    """
    if source is None or str(source) == "":
        return
    holding = weights_holding(source)
    if holding is None:
        return
    family, component = holding
    if (family, component) in accepts or (family, None) in accepts:
        return
    raise WeightsError(f"{source} holds {describe(holding)}; {option} needs {needs}")
