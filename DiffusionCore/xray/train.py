"""Training of the X-ray to CT cascade: one stage at a time (previous stages frozen) or jointly.

Radiographs are DRRs rendered on the fly from augmented CT cubes (:mod:`DiffusionCore.xray.data`), so any
folder of CTs (e.g. LIDC-IDRI DICOM series) is a training set. Stages 2-3 are conditioned in training on
the previous stages' own one-pass estimate from the DRR for a share of the samples (``data.prev_from_model``),
else the ground-truth cube of the previous resolution, both plus Gaussian noise (``data.prev_noise``;
noise-conditioning augmentation of cascaded diffusion); at generation on the previous stage's output. They are
trained at the times they are sampled at (t up to ``diffusion.prev_stage_t``).

Runs on CPU, one GPU (bfloat16 autocast) or several (``torchrun``, DDP); writes atomic resumable checkpoints,
TensorBoard + ``metrics.jsonl`` (losses, DRR re-projection error, slices) and, at the end, the cascade weights
``xray_cascade.safetensors`` for :class:`XrayToCTGenerator`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..config import config_to_dict
from ..errors import ConfigError, WeightsError
from ..intensity import hu_to_unit
from ..train.numerics import LossWatch, check_training_numbers
from ..train.precision import autocast, resolve_amp
from .atlas import training_atlas
from .cascade import StageModel, UnifiedHybridViTCascade, _crop
from .config import (
    DEFAULT_CONFIG,
    XrayLossWeights,
    XrayStageConfig,
    load_stage_config,
    patch_alignment,
    stages_geometry_problem,
    tiny_stage_config,
)
from .consistency import drr_consistency
from .data import MANIFEST, XrayCubeDataset, ct_to_cube, load_cubes, named_volumes
from .drr import cross_view
from .losses import line_integrals, stage_loss

logger = logging.getLogger(__name__)

EXPORT_NAME = "xray_cascade.safetensors"


@dataclass
class XrayTrainOptions:
    """What to train and from what (the command line's options).

    Attributes:
        configs: stage configs (the last one is the stage trained); an earlier stage not given is built as
            recorded in the weights it is loaded from (``stage_checkpoints`` / ``load_all_stages``), else from the
            shipped stageN.json.
        data: CT folder, list file, sample name(s) or a ``prepare-xray-data`` output folder.
        output_dir: training folder (checkpoints, logs, exported weights).
        stage_checkpoints: stage number -> weights file or training folder holding that stage.
        freeze_previous: keep the earlier stages fixed (``--freeze-stage1``); matters only with ``train_all_stages``
            (otherwise only the highest stage is trained).
        train_all_stages: train every stage jointly (sum of the stages' losses).
        load_all_stages: a cascade weights file or training folder to start from.
        unfreeze_all: with ``load_all_stages``: fine-tune every stage.
        resume: continue from the latest checkpoint in ``output_dir``.
        device: auto, cpu or cuda.
        max_steps: override of ``training.max_steps`` (0 keeps the config's).
        max_minutes: stop after this many minutes of this run (0: no limit); the run ends as after a STOP
            file: checkpoint, then export.
        tiny_test_model: replace the configs' networks by tiny ones (tests only).
    """

    configs: list[XrayStageConfig]
    data: Any
    output_dir: Path
    stage_checkpoints: dict[int, str] = field(default_factory=dict)
    freeze_previous: bool = False
    train_all_stages: bool = False
    load_all_stages: str | None = None
    unfreeze_all: bool = False
    resume: bool = False
    device: str = "auto"
    max_steps: int = 0
    max_minutes: float = 0.0
    tiny_test_model: bool = False


def complete_configs(
    configs: list[XrayStageConfig], recorded: dict[int, XrayStageConfig] | None = None
) -> list[XrayStageConfig]:
    """Stage configs 1..S for the highest given stage S. A stage not given takes the config recorded with the weights
    it is loaded from (``recorded``: stage -> config, from :func:`read_stage_source`), else the shipped stageN.json."""
    by_stage = {c.stage: c for c in configs}
    top = max(by_stage)
    recorded = recorded or {}
    return [by_stage.get(s) or recorded.get(s) or load_stage_config(f"stage{s}") for s in range(1, top + 1)]


def describe_stage(cfg: XrayStageConfig) -> str:
    """A stage config in the words a mismatch message needs: grid, radiograph, view, field of view, width."""
    return (f"stage {cfg.stage} at {cfg.resolution}^3 from {cfg.xray_resolution}-pixel {cfg.data.view} DRRs, "
            f"{cfg.data.fov_mm:g} mm field of view, {cfg.model.voxel_channels} channels")  # fmt: skip


@dataclass
class StageSource:
    """A file that stages are loaded from (``--stageN-checkpoint``, ``--init-from``).

    Attributes:
        name: the source as the user gave it (file, training folder or registered name).
        path: the safetensors file read.
        tensors: its tensors.
        configs: stage number -> the stage config recorded with it (the exported file's metadata, or the training
            folder's ``state.json``); empty when it records none.
        metadata: the file's metadata (empty for a checkpoint).
    """

    name: str
    path: Path
    tensors: dict[str, torch.Tensor]
    configs: dict[int, XrayStageConfig]
    metadata: dict[str, Any]


def _recorded_stage_configs(records: Any) -> dict[int, XrayStageConfig]:
    out: dict[int, XrayStageConfig] = {}
    for rec in records if isinstance(records, list) else []:
        try:
            cfg = load_stage_config(rec)
        except (ConfigError, TypeError, ValueError):  # a record this version cannot read: the run's own configs rule
            continue
        out[cfg.stage] = cfg
    return out


def read_stage_source(source: str) -> StageSource:
    """Read a cascade weights file, a registered name (checked against its sha256) or a training folder (its exported
    weights, else its latest checkpoint), with the stage configs it records."""
    from ..train.checkpoint import find_latest, read_checkpoint_info
    from ..weights.registry import load_safetensors, resolve_weights

    p = Path(source)
    recorded: Any = None
    if not p.exists():  # a registered name (e.g. the shipped xray-default): checked against its sha256
        p = resolve_weights(str(source), family="xray").path
    elif p.is_dir():
        exported = p / EXPORT_NAME
        if exported.is_file():
            p = exported
        else:
            latest = find_latest(p) if not (p / "cascade.safetensors").is_file() else p
            if latest is None:
                raise WeightsError(f"{source} holds no checkpoint or {EXPORT_NAME}; train that stage first")
            p = Path(latest) / "cascade.safetensors"
            config = read_checkpoint_info(Path(latest)).get("config")
            recorded = config.get("configs") if isinstance(config, dict) else None
    tensors, meta = load_safetensors(p)
    meta = dict(meta or {})
    if recorded is None:
        recorded = meta.get("configs")
    return StageSource(str(source), p, tensors, _recorded_stage_configs(recorded), meta)


def _is_prepared(data: Any) -> bool:
    return isinstance(data, str | os.PathLike) and (Path(data) / MANIFEST).is_file()


def load_training_cubes(data: Any, resolutions: list[int], fov_mm: float) -> list[dict[int, np.ndarray]]:
    """Cubes from a ``prepare-xray-data`` folder (manifest.json) or from CT volumes (see :func:`training_cubes`)."""
    return training_cubes(data, resolutions, fov_mm)[0]


def training_cubes(
    data: Any, resolutions: list[int], fov_mm: float, view: str | None = None, passed_over: list[str] | None = None
) -> tuple[list[dict[int, np.ndarray]], list[str]]:
    """The cubes a run on ``data`` trains on, and the CTs they come from as its checkpoints record them
    (``extra["data"]``): a ``prepare-xray-data`` folder's cases by their source CT, or of the CT volumes found (see
    :func:`~DiffusionCore.inputs.collect_volumes`) those read and used, not those passed over (unreadable, or too
    small for the cube; ``passed_over``, where given, gets their paths).

    A prepared folder must hold cubes at least as fine as the finest resolution trained (a coarser one is made by
    resampling the finest prepared cube, a finer one is refused). Its DRRs are not read: training renders its own in
    the config's ``view``, and a folder prepared for another view is said in a warning."""
    from ..train.checkpoint import log_volumes_used, volume_record
    from ..volume import read_volume

    if _is_prepared(data):
        root = Path(data)
        manifest = json.loads((root / MANIFEST).read_text())
        if abs(float(manifest["fov_mm"]) - fov_mm) > 1e-3:
            raise ConfigError(
                f"the prepared data in {root} has a {manifest['fov_mm']} mm field of view but the config "
                f"asks for {fov_mm} mm; prepare it again with --fov-mm {fov_mm} or change data.fov_mm"
            )
        if view is not None and manifest.get("view") not in (None, view):
            logger.warning(
                "the prepared data in %s was prepared for %s radiographs, and this run trains on %s ones: train xray "
                "renders its own DRRs from the prepared cubes in the config's view (data.view) and does not read the "
                "prepared DRRs, so the run goes on in %s", root, manifest["view"], view, view,
            )  # fmt: skip
        out = []
        for case in manifest["cases"]:
            cubes = {}
            prepared = sorted(int(k.split("_")[1]) for k in case["files"] if k.startswith("cube_"))
            for r in resolutions:
                key = f"cube_{r}"
                if key in case["files"]:
                    cubes[r] = read_volume(root / case["files"][key], check=False).array
                else:
                    finest = max(prepared)
                    if r > finest:  # an upsampled cube would teach the stage blurred targets
                        raise ConfigError(
                            f"the prepared data in {root} has cubes of {', '.join(f'{x}^3' for x in prepared)} voxels "
                            f"and this run trains a stage at {r}^3; prepare it again with --resolutions "
                            f"{','.join(str(x) for x in sorted(set(resolutions)))}, or give the CT folder as --data"
                        )
                    cubes[r] = ct_to_cube(
                        read_volume(root / case["files"][f"cube_{finest}"]), r, fov_mm
                    ).array
            out.append(cubes)
        return out, [str(case.get("source") or root / f"case {i}") for i, case in enumerate(manifest["cases"])]
    from ..inputs import collect_volumes

    # folders, list files, volume files, samples' names; a CT too small for the cube stops the run if named, else it
    # is passed over
    paths = collect_volumes(data)
    out, used = load_cubes(paths, resolutions, fov_mm, named=named_volumes(data))
    log_volumes_used(paths, used)
    if passed_over is not None:
        kept = {Path(p) for p in used}
        passed_over.extend(str(p) for p in paths if Path(p) not in kept)
    return out, volume_record(used)


def patch_origin(cfg: XrayStageConfig, generator: torch.Generator | None = None) -> tuple[int, int, int]:
    """A random (z, y, x) voxel corner for a training patch of side ``model.train_patch``.

    Per axis a multiple of :func:`config.patch_alignment` (so the patch holds the same attention windows
    that generation uses), or the last position ``R - P`` so that the grid's far end is trained as well.
    """
    r, side = cfg.resolution, cfg.model.train_patch
    candidates = sorted(set(range(0, r - side + 1, patch_alignment(cfg))) | {r - side})
    idx = torch.randint(len(candidates), (3,), generator=generator)
    return tuple(candidates[int(i)] for i in idx)  # type: ignore[return-value]


class _PatchView:
    """A stage seen through one patch of its grid, called like the stage by ``losses.stage_loss``; keeps its
    last prediction for the patch DRR loss."""

    def __init__(self, stage: StageModel, origin: tuple[int, int, int]):
        self.stage, self.origin, self.cfg = stage, origin, stage.cfg
        self.prediction: torch.Tensor | None = None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, xray: torch.Tensor, prev: torch.Tensor | None, *,
                 return_lifted: bool = False) -> Any:  # fmt: skip
        out = self.stage(x_t, t, xray, prev, return_lifted=return_lifted, origin=self.origin)
        self.prediction = out[0] if return_lifted else out
        return out


def patch_stage_loss(
    stage: StageModel,
    x0: torch.Tensor,
    xray: torch.Tensor,
    prev: torch.Tensor | None,
    weights: XrayLossWeights,
    *,
    origin: tuple[int, int, int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of one stage on one random cubic patch of its grid (``model.train_patch``).

    The network denoises only the patch (its positional embeddings, lifted features and previous-stage input
    read at the patch's place; the whole radiograph and previous volume condition it through cross-attention
    and AdaLN). The diffusion, depth-prior, gradient and structural losses are those of
    ``losses.stage_loss`` on the patch.

    The DRR loss needs the whole volume, which a patch step does not predict. On a patch it compares the
    patch's own contribution to the line integrals: the part of every ray that crosses the patch's slab of
    depth. Line integrals add up along a ray, so this is exactly the change that the patch's error makes to
    the whole DRR over the rays it covers. It is normalised by the 99th percentile of the whole target's DRR
    (not the patch's, which is near zero for a patch in air and would weight such patches up). The cross-view DRR
    loss (``cross_view_drr_loss``) is computed the same way in the view at right angles to the input's.

    Args:
        stage: the stage.
        x0: (B, 1, R, R, R) whole target cube, model units (the patch is cut from it).
        xray: (B, 1, H, W) DRR input, attenuation style.
        prev: (B, 1, r, r, r) whole previous-stage volume (stages 2-3) or None.
        weights: loss weights.
        origin: the patch corner; default :func:`patch_origin` (random).
        generator: RNG for the corner, t and noise (deterministic tests).

    Returns:
        (total loss tensor, dict of the unweighted components as floats).
    """
    cfg = stage.cfg
    side = cfg.model.train_patch
    origin = origin if origin is not None else patch_origin(cfg, generator)
    view = _PatchView(stage, origin)
    target = _crop(x0, origin, side)
    loss, parts = stage_loss(view, target, xray, prev, replace(weights, drr_loss=0.0, cross_view_drr_loss=0.0),  # type: ignore[arg-type]
                             generator=generator)
    spacing = cfg.data.fov_mm / cfg.resolution
    for name, weight, drr_view in (("drr_loss", weights.drr_loss, cfg.data.view),
                                   ("cross_view_drr_loss", weights.cross_view_drr_loss, cross_view(cfg.data.view))):
        if weight <= 0 or view.prediction is None:
            continue
        pred = line_integrals(view.prediction.float().clamp(-1.5, 1.5), spacing, drr_view)
        with torch.no_grad():
            ref = line_integrals(target, spacing, drr_view)
            whole = line_integrals(x0, spacing, drr_view)
            scale = torch.quantile(whole.flatten(1), 0.99, dim=1).clamp_min(1e-3).view(-1, 1, 1, 1)
        drr = ((pred - ref) / scale).abs().mean()
        loss = loss + weight * drr
        parts[name] = float(drr.detach())
    return loss, parts


def trains_on_patches(cfg: XrayStageConfig) -> bool:
    """Whether the stage trains on random patches (``0 < model.train_patch < resolution``)."""
    return 0 < cfg.model.train_patch < cfg.resolution


class CascadeObjective(nn.Module):
    """Wraps the cascade so one forward computes the summed loss of the trained stages (DDP-friendly)."""

    def __init__(self, cascade: UnifiedHybridViTCascade, trained: list[int]):
        super().__init__()
        self.cascade = cascade
        self.trained = trained

    def forward(
        self, vols: dict[int, torch.Tensor], xray: torch.Tensor, prev_noise: float
    ) -> tuple[torch.Tensor, dict]:
        total = xray.new_zeros(())
        parts: dict[str, float] = {}
        for s in self.trained:
            stage = self.cascade.stages[s - 1]
            cfg = stage.cfg
            if s > 1:
                prev = previous_stage_volume(self.cascade, s, vols, xray, prev_noise)
            else:
                prev = stage_one_training_atlas(stage, vols[cfg.resolution])
            if trains_on_patches(cfg):
                loss, p = patch_stage_loss(stage, vols[cfg.resolution], xray, prev, cfg.loss_weights)
            else:
                loss, p = stage_loss(stage, vols[cfg.resolution], xray, prev, cfg.loss_weights)
            total = total + loss
            parts.update({f"stage{s}/{k}": v for k, v in p.items()})
            parts[f"stage{s}/total"] = float(loss.detach())
        return total, parts


def previous_stage_volume(
    cascade: UnifiedHybridViTCascade, s: int, vols: dict[int, torch.Tensor], xray: torch.Tensor, prev_noise: float
) -> torch.Tensor:
    """What stage ``s`` (2-3) is conditioned on in training: per sample, with probability ``data.prev_from_model``,
    the earlier stages' own one-pass estimate from this DRR followed by the re-projection consistency step (what
    generation hands it, in kind); with probability ``data.prev_from_atlas``, the ground truth at the previous
    resolution made into another patient's (:func:`~DiffusionCore.xray.atlas.training_atlas` with the stage's
    ``data.atlas_*``) followed by the consistency step (a previous stage as wrong as on a CT it never saw); else
    the ground truth at the previous resolution. All plus ``prev_noise``."""
    truth = vols[cascade.configs[s - 2].resolution]
    d = cascade.configs[s - 1].data
    share, atlas_share = float(d.prev_from_model), float(d.prev_from_atlas)
    prev = truth
    if share > 0 or atlas_share > 0:
        u = torch.rand(truth.shape[0], device=truth.device)
        pick, misregister = u < share, (u >= share) & (u < share + atlas_share)
        prev = truth.clone()
        if bool(pick.any()):
            first = vols[cascade.configs[0].resolution][pick]
            prev[pick] = earlier_stages_estimate(cascade, s - 1, xray[pick], first).to(truth.dtype)
        if bool(misregister.any()):
            moved = training_atlas(truth[misregister].float(), d.atlas_blur_voxels, d.atlas_zoom,
                                   d.atlas_shift_voxels, d.atlas_deform_voxels)  # fmt: skip
            prev[misregister] = drr_consistency(moved, xray[misregister], d.fov_mm, d.view)[0].to(truth.dtype)
    return (prev + prev_noise * torch.randn_like(prev)).clamp(-1, 1)


def stage_one_training_atlas(stage: nn.Module, truth: torch.Tensor) -> torch.Tensor | None:
    """What an atlas stage 1 (``model.atlas_prior``) starts from in training: each sample's own CT (B, 1, R, R, R)
    at its grid made into another patient's atlas (:func:`~DiffusionCore.xray.atlas.training_atlas`), instead of
    registering the mean CT to every DRR (seconds per step). None for a stage without an atlas."""
    if not stage.uses_atlas:
        return None
    d = stage.cfg.data
    return training_atlas(truth, d.atlas_blur_voxels, d.atlas_zoom, d.atlas_shift_voxels, d.atlas_deform_voxels)


@torch.no_grad()
def earlier_stages_estimate(
    cascade: UnifiedHybridViTCascade, s: int, xray: torch.Tensor, first_truth: torch.Tensor | None = None
) -> torch.Tensor:
    """Stages 1..s run once each (:meth:`StageModel.quick_estimate`), each followed by the consistency step.

    ``first_truth``: the samples' CTs at stage 1's grid; an atlas stage 1 then starts from
    :func:`stage_one_training_atlas` of them rather than registering its atlas to each DRR."""
    first = cascade.stages[0]
    vol = stage_one_training_atlas(first, first_truth) if first_truth is not None else None
    for stage in cascade.stages[:s]:
        was_training = stage.training
        stage.eval()
        try:
            vol = stage.quick_estimate(xray, vol)
        finally:
            stage.train(was_training)
        vol, _ = drr_consistency(vol, xray, stage.cfg.data.fov_mm, stage.cfg.data.view)
    assert vol is not None
    return vol


def check_stage_fits(
    own: dict[str, torch.Tensor], configs: list[XrayStageConfig], source: StageSource, stages: list[int],
    option: str, origins: dict[int, str] | None = None,
) -> None:
    """Check that ``source`` holds the given stages with the shapes of ``own`` (a cascade's state dict, possibly on
    the meta device) built from ``configs``.

    Raises:
        WeightsError: the file lacks a stage, or holds it with other shapes: the message says what the file holds
            (its recorded config) and what this run built, and how to make them agree.
    """
    for s in stages:
        prefix = f"stages.{s - 1}."
        for k in own:
            if k.startswith(prefix) and (k not in source.tensors or source.tensors[k].shape != own[k].shape):
                raise WeightsError(_stage_mismatch(configs, source, s, k, option, (origins or {}).get(s, "")))


def _load_stage_weights(
    cascade: UnifiedHybridViTCascade, source: StageSource, stages: list[int], option: str,
    origins: dict[int, str] | None = None,
) -> None:
    """Copy the given stages' tensors from ``source`` (:func:`read_stage_source`) into ``cascade``, after
    :func:`check_stage_fits`."""
    own = cascade.state_dict()
    check_stage_fits(own, cascade.configs, source, stages, option, origins)
    keys = [k for k in own if any(k.startswith(f"stages.{s - 1}.") for s in stages)]
    for k in keys:
        own[k] = source.tensors[k]
    cascade.load_state_dict(own)
    logger.info("loaded stage(s) %s from %s (%d tensors)", stages, source.path, len(keys))


def _stage_mismatch(
    configs: list[XrayStageConfig], source: StageSource, s: int, key: str, option: str, origin: str
) -> str:
    """The refusal of a stage ``source`` does not fit: what the file holds, what this run built, the model settings in
    which they differ in a config file's spelling, and how to make them agree."""
    from ..train.checkpoint import model_differences

    built = configs[s - 1]
    held = source.configs.get(s)
    said = f"{option} {source.name} ({source.path}) does not fit stage {s} of this run (tensor {key} "
    said += "missing or of another shape): "
    if held is None:
        present = sorted(source.configs)
        said += (f"the file holds no stage {s}" if present and s not in present else
                 f"the file records no stage {s} configuration")  # fmt: skip
    else:
        said += f"it holds {describe_stage(held)}"
    said += f"; this run built {describe_stage(built)}"
    said += f" (from {origin})" if origin else ""
    if held is None:
        return said + f". Give {option} the weights or training folder of a stage {s} trained with that config"
    differs = model_differences(held.model, built.model, Path(source.name).name or source.name)
    said += f", with {differs}" if differs else ""
    if option.startswith("--stage"):
        return (said + f". Leave stage {s}'s config out of --config (the run then takes it from the file's own record) "
                f"or give the config that trained it, e.g. --config <stage {s} config> <stage {len(configs)} "
                "config>")  # fmt: skip
    same_grid = (held.resolution, held.xray_resolution) == (built.resolution, built.xray_resolution)
    settle = ", set those model settings as the weights have them" if differs and same_grid else ""
    return (said + ". Give --config the configuration those weights were trained with (the shipped xray-default: "
            f"--config {DEFAULT_CONFIG}){settle}, or start without {option}")


def train_step(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    vols: dict[int, torch.Tensor],
    xray: torch.Tensor,
    prev_noise: float,
    *,
    amp_dtype: torch.dtype | None = None,
    gradient_clip: float = 0.0,
    step: int = 0,
    watch: LossWatch | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step of a :class:`CascadeObjective` (possibly DDP-wrapped).

    Args:
        objective: the objective (or its DDP wrapper); its forward returns (loss, parts).
        optimizer: optimizer over ``params``.
        params: the trained parameters (gradient clipping).
        vols: resolution -> (B, 1, R, R, R) target cubes, model units.
        xray: (B, 1, X, X) DRRs, attenuation style [0, 1].
        prev_noise: noise std on the previous-stage cube (model units).
        amp_dtype: autocast dtype (``torch.bfloat16``) or None for float32; parameters and gradients stay float32.
        gradient_clip: gradient-norm clip (0 disables).
        step: the step number, for the divergence message.
        watch: the run's :class:`LossWatch` (default: a NaN/Inf check only).

    Returns:
        (the loss, detached; the unweighted loss components).

    Raises:
        NumericalError: the loss is not finite, or exploded (training diverged); the weights are left as they were.
    """
    with autocast(xray.device, amp_dtype):
        loss, parts = objective(vols, xray, prev_noise)
    (watch or LossWatch(optimizer.defaults.get("lr")))(loss, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if gradient_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, gradient_clip)
    optimizer.step()
    return loss.detach(), parts


def _tiny_like(cfg: XrayStageConfig) -> XrayStageConfig:
    """A tiny network with ``cfg``'s structure: a refinement head, a decoder, the rays, the full-resolution
    lifting (on the mean CT), the atlas, the lifting residual, the noise-level skip, and half-grid patches, where it
    has them."""
    t = tiny_stage_config(
        cfg.stage, 16 * 2 ** (cfg.stage - 1), refine_channels=4 if cfg.model.refine_channels else 0
    )
    if cfg.model.decoder_channels:  # the tiny network's 4^3-voxel tokens: two doublings
        t = replace(t, model=replace(t.model, decoder_channels=[8, 4]))
    if cfg.model.lifting_profile:
        t = replace(t, model=replace(t.model, lifting_profile=8))
    for switch in ("atlas_prior", "lifting_mean_prior", "lifting_residual", "keep_coarse"):
        if getattr(cfg.model, switch):
            t = replace(t, model=replace(t.model, **{switch: True}))
    t = replace(t, model=replace(t.model, skip_sigma_data=cfg.model.skip_sigma_data))
    if cfg.model.refine_xray and (t.model.refine_channels or t.model.decoder_channels):
        t = replace(t, model=replace(t.model, refine_xray=True))
    if cfg.model.train_patch or cfg.model.inference_patch:
        align = patch_alignment(t)
        half = max(align, t.resolution // 2 // align * align)
        model = replace(t.model, train_patch=half if cfg.model.train_patch else 0,
                        inference_patch=half if cfg.model.inference_patch else 0)  # fmt: skip
        t = replace(t, model=model)
    return t


@dataclass
class StagePlan:
    """The stages a run builds and where their weights come from (:func:`plan_stages`).

    Attributes:
        configs: stage configs 1..S (before ``--tiny-test-model`` shrinks them).
        sources: stage number -> the ``--stageN-checkpoint`` it is loaded from.
        init_source: the ``--init-from`` cascade, or None.
        origins: stage number -> where its config came from, in words (for messages).
    """

    configs: list[XrayStageConfig]
    sources: dict[int, StageSource]
    init_source: StageSource | None
    origins: dict[int, str]


def plan_stages(opts: XrayTrainOptions) -> StagePlan:
    """Read the starting weights and settle each stage's config: the configs given, then for a stage left out the
    configuration recorded in the weights it is loaded from (``--stageN-checkpoint``, then ``--init-from``), then the
    shipped stageN.json.

    Raises:
        ConfigError: a ``--stageN-checkpoint`` for the trained stage or a later one.
        WeightsError: starting weights that cannot be read or are of another family.
    """
    from ..train.starting_weights import XRAY, check_starting_weights

    given = {c.stage for c in opts.configs}
    top_stage = max(given)
    for s in sorted(opts.stage_checkpoints):
        if s >= top_stage:
            raise ConfigError(
                f"--stage{s}-checkpoint given while training stage {top_stage}; it must be earlier"
            )
    starts = [(f"--stage{s}-checkpoint", src) for s, src in sorted(opts.stage_checkpoints.items())]
    for option, source in [*starts, ("--init-from", opts.load_all_stages)]:
        check_starting_weights(source, option=f"train xray {option}", accepts=XRAY,
                               needs="X-ray to CT weights (e.g. xray-default)")  # fmt: skip
    sources = {s: read_stage_source(src) for s, src in opts.stage_checkpoints.items()}
    init_source = read_stage_source(opts.load_all_stages) if opts.load_all_stages else None
    # a stage not named in --config is built as the weights it is loaded from were trained, not from stageN.json
    recorded: dict[int, XrayStageConfig] = {}
    origins = {s: "this run's config" for s in given}
    for s, src in [*((k, init_source) for k in range(1, top_stage) if init_source), *sources.items()]:
        if s not in given and s in src.configs:
            recorded[s] = src.configs[s]
            origins[s] = f"the configuration recorded in {src.path}"
    for s in range(1, top_stage):
        if s not in given and s in recorded:
            logger.info("stage %d: built as recorded in %s (%s)", s, sources.get(s, init_source).path,
                        describe_stage(recorded[s]))  # fmt: skip
        elif s not in given:
            origins[s] = f"the shipped stage{s}.json"
    configs = complete_configs(opts.configs, recorded)
    problem = stages_geometry_problem(configs)
    if problem:
        said = "; ".join(f"stage {s}'s config from {origins[s]}" for s in sorted(origins))
        raise ConfigError(f"{problem} ({said}): make the trained stage's config match the earlier stages")
    return StagePlan(configs, sources, init_source, origins)


def stage_lineage(
    top: int, trained: list[int], sources: dict[int, StageSource], init_source: StageSource | None
) -> tuple[dict[str, str], list[int]]:
    """Where each stage 1..``top`` of the cascade a run exports comes from, and which were never trained.

    A stage trained in this run is trained (from ``--init-from`` when given); one loaded from a file (``--stageN-
    checkpoint``, else ``--init-from``) is as that file records it (its ``untrained_stages``); any other stage keeps its
    random initial weights.

    Returns:
        (stage number as text -> where it comes from, in words; the stages never trained in this lineage).
    """
    from ..files import sha256_file
    from ..train.checkpoint import weights_label

    lineage: dict[str, str] = {}
    untrained: list[int] = []
    digests: dict[Path, str] = {}

    def named(src: StageSource) -> str:  # a file or folder by its own name: the folders above may name a patient
        digest = digests.setdefault(src.path, sha256_file(src.path))
        return f"{weights_label(src.name)} (sha256 {digest[:16]})"

    for s in range(1, top + 1):
        src = sources.get(s) or init_source
        if s in trained:
            lineage[str(s)] = "trained with train xray" + (f", starting from {named(src)}" if src else "")
            continue
        if src is None:
            lineage[str(s)] = "never trained (random initial weights)"
            untrained.append(s)
            continue
        before = src.metadata.get("untrained_stages")
        was_untrained = isinstance(before, list) and s in before
        lineage[str(s)] = f"loaded from {named(src)}" + (", where it was never trained" if was_untrained else "")
        if was_untrained:
            untrained.append(s)
    return lineage, untrained


def train_xray(opts: XrayTrainOptions, progress=None) -> dict[str, Any]:
    """Train (part of) the cascade; returns a summary (steps, final losses, weights path and sha256).

    Raises:
        ConfigError, InputError, WeightsError: bad configs, data or starting weights.
    """
    from ..train.checkpoint import (
        load_training_state,
        nothing_to_resume,
        public_data_record,
        refuse_nothing_to_train,
        resumable_checkpoint,
        save_training_state,
        volume_names,
        warn_resumed_config,
        warn_resumed_data,
    )
    from ..train.distributed import all_reduce_mean, cleanup, init_distributed, wrap_model
    from ..train.ema import EMA_MODEL, ParameterEMA
    from ..train.logger import TrainLogger
    from ..train.stop import StopFlag

    plan = plan_stages(opts)
    configs, sources, init_source, origins = plan.configs, plan.sources, plan.init_source, plan.origins
    if opts.tiny_test_model:
        # tiny networks with the configs' structure: a refinement head and patches where the config has them
        configs = [_tiny_like(c) for c in configs]
    top = configs[-1]
    tcfg = top.training
    check_training_numbers(tcfg, "training.")
    max_steps = opts.max_steps or tcfg.max_steps or tcfg.epochs * tcfg.steps_per_epoch
    if opts.resume:
        refuse_nothing_to_train(opts.output_dir, max_steps,
                                f"--max-steps {opts.max_steps}" if opts.max_steps else
                                f"the config's training.max_steps {max_steps}")  # fmt: skip
    info = init_distributed(opts.device)
    torch.manual_seed(tcfg.seed + info.rank)
    rng = np.random.default_rng(tcfg.seed + info.rank)
    cascade = UnifiedHybridViTCascade(configs)
    for st, c in zip(cascade.stages, configs):
        st.gradient_checkpointing = c.training.gradient_checkpointing
    for s, src in sorted(sources.items()):
        _load_stage_weights(cascade, src, [s], f"--stage{s}-checkpoint", origins)
    if init_source is not None:
        _load_stage_weights(cascade, init_source, list(range(1, top.stage + 1)), "--init-from", origins)
    for c in configs:
        if trains_on_patches(c):
            logger.info("stage %d trains on random %d^3 patches of its %d^3 grid; its DRR loss compares each "
                        "patch's share of the line integrals", c.stage, c.model.train_patch, c.resolution)  # fmt: skip
    if opts.train_all_stages or opts.unfreeze_all:
        trained = list(range(1, top.stage + 1))
    else:
        trained = [top.stage]
        if top.stage > 1 and not opts.stage_checkpoints and not opts.load_all_stages:
            logger.warning(
                "training stage %d without --stage%d-checkpoint: the exported cascade's earlier stages are "
                "untrained; pass the previous stage's weights to get a usable cascade",
                top.stage,
                top.stage - 1,
            )
    if opts.freeze_previous and not (opts.train_all_stages or opts.unfreeze_all):
        logger.info("--freeze-stage1 changes nothing here: only stage %d is trained and the earlier stages are always "
                    "kept fixed (they train only with --train-all-stages)", top.stage)  # fmt: skip
    for s in range(1, top.stage + 1):
        frozen = s not in trained or (opts.freeze_previous and s < top.stage and not opts.unfreeze_all)
        for p in cascade.stages[s - 1].parameters():
            p.requires_grad_(not frozen)
        if frozen and s in trained:
            trained.remove(s)
    cascade.to(info.device)
    objective = CascadeObjective(cascade, trained)
    # the lifting head is used only by the depth-prior loss; DDP must be told when that loss is off
    unused = any(configs[k - 1].model.use_depth_lifting and configs[k - 1].loss_weights.depth_prior_loss == 0
                 for k in trained)  # fmt: skip
    wrapped = wrap_model(objective, info, find_unused_parameters=unused) if info.distributed else objective
    params = [p for p in cascade.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            "nothing to train: every stage is frozen (drop --freeze-stage1 or add --unfreeze-all)"
        )
    opt = torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    ema = ParameterEMA({"cascade": cascade}, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    models: dict[str, nn.Module] = {"cascade": cascade}
    if ema is not None:
        models[EMA_MODEL] = ema
    warm = max(1, tcfg.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
    out_dir = Path(opts.output_dir)
    resolutions = sorted({c.resolution for c in configs[: top.stage]})
    passed_over: list[str] = []
    cubes, volumes = training_cubes(opts.data, resolutions, top.data.fov_mm, top.data.view, passed_over)
    r1 = configs[0].resolution
    mean_hu = np.mean([c[r1] for c in cubes], axis=0)
    cascade.set_mean_ct(hu_to_unit(torch.from_numpy(mean_hu))[None, None])
    from ..devices import shard_list

    if info.distributed and len(cubes) >= info.world_size:
        cubes = shard_list(cubes, info)
    dataset = XrayCubeDataset(cubes, top.data, top.data.fov_mm)
    step, epoch = 0, 0
    config_dict = {"configs": [config_to_dict(c) for c in configs], "trained": trained}
    lineage, untrained = stage_lineage(top.stage, trained, sources, init_source)
    if opts.resume:
        latest = resumable_checkpoint(out_dir, warn=info.is_main)  # the newest intact one (a damaged one is named)
        if latest is None:
            raise nothing_to_resume(out_dir)
        else:
            # read on the CPU: the optimizer moves its moments to the parameters' device and keeps its step counters on
            # the CPU (on a GPU they would be read back at every step)
            state = load_training_state(latest, models=models, optimizers={"opt": opt},
                                        schedulers={"lr": sched}, generators={"data": rng},
                                        map_location="cpu")  # fmt: skip
            if info.is_main:
                warn_resumed_config(state, config_dict, latest)
                warn_resumed_data((state["extra"] or {}).get("data"), volumes, latest)
            recorded_lineage = (state["extra"] or {}).get("stage_lineage")
            if isinstance(recorded_lineage, dict):  # the checkpoint's weights are the run's, whatever is given now
                lineage = {str(k): str(v) for k, v in recorded_lineage.items()}
                untrained = [int(v) for v in (state["extra"] or {}).get("untrained_stages") or []]
            step, epoch = int(state["step"]), int(state["epoch"])
            if info.rank > 0:  # the checkpoint holds rank 0's random streams; the others draw their own
                rng = np.random.default_rng([tcfg.seed, info.rank, step])
                torch.manual_seed(tcfg.seed + 7919 * info.rank + step)
            logger.info("resumed from %s at step %d", latest, step)
    tlog = TrainLogger(out_dir, enabled=info.is_main)
    amp_dtype = resolve_amp(tcfg.amp, info.device)
    xres = max(configs[s - 1].xray_resolution for s in range(1, top.stage + 1))
    last_parts: dict[str, float] = {}
    t_start = time.time()
    cascade.train()

    saved_step = -1

    def save() -> None:
        nonlocal saved_step
        if info.is_main and saved_step != step:
            saved_step = step
            save_training_state(out_dir, step=step, epoch=epoch, models=models,
                                optimizers={"opt": opt}, schedulers={"lr": sched}, config=config_dict,
                                extra={"trained": trained, "data": volumes, "stage_lineage": lineage,
                                       "untrained_stages": untrained}, generators={"data": rng},
                                keep=tcfg.keep_checkpoints)  # fmt: skip

    stopped = None
    watch = LossWatch(tcfg.learning_rate)
    with StopFlag(out_dir / "STOP") as stop:
        while step < max_steps:
            requested = stop.requested
            # every rank stops at the same step (else the others would wait in all-reduce forever)
            if info.distributed:
                requested = all_reduce_mean(float(requested), info) > 0
            if requested:
                stopped = stop.reason or "stop requested by another process"
                break
            if opts.max_minutes and time.time() - t_start > 60.0 * opts.max_minutes:
                stopped = f"time limit of {opts.max_minutes:g} min reached"
                logger.info("%s", stopped)
                break
            vols, xray = dataset.sample(rng, tcfg.batch_size, resolutions, xres)
            vols = {r: v.to(info.device) for r, v in vols.items()}
            xray = xray.to(info.device)
            loss, parts = train_step(wrapped, opt, params, vols, xray, top.data.prev_noise, amp_dtype=amp_dtype,
                                     gradient_clip=tcfg.gradient_clip, step=step, watch=watch)  # fmt: skip
            sched.step()
            if ema is not None:
                ema.update()
            step += 1
            epoch = step // max(1, tcfg.steps_per_epoch)
            last_parts = {k: float(all_reduce_mean(v, info)) for k, v in parts.items()}
            if (step % tcfg.log_every == 0 or step == max_steps) and info.is_main:
                for k, v in last_parts.items():
                    tlog.scalar(f"loss/{k}", v, step)
                tlog.scalar("lr", sched.get_last_lr()[0], step)
                logger.info("step %d/%d %s", step, max_steps,
                            " ".join(f"{k}={v:.4f}" for k, v in last_parts.items() if k.endswith("total")))  # fmt: skip
            if progress is not None:
                progress(step, max_steps, f"loss {float(loss.detach()):.4f}")
            if step % tcfg.checkpoint_every == 0:
                if info.is_main:
                    with ema.applied() if ema is not None else contextlib.nullcontext():
                        log_validation(cascade, trained, vols, xray, tlog, step)
                save()
        if stopped is None and stop.requested:
            stopped = stop.reason
    save()
    summary: dict[str, Any] = {"steps": step, "losses": last_parts, "seconds": time.time() - t_start,
                               "stopped": stopped, "trained_stages": trained}  # fmt: skip
    if info.is_main:
        if ema is not None:  # export the weight average (the checkpoints keep both)
            ema.copy_to_models()
        weights = out_dir / EXPORT_NAME
        # the weights, which a user shares, count the volumes and name only the project's samples (a user's file and
        # folder names are often a patient's name or MRN); the checkpoints' state.json keeps the paths
        recorded = public_data_record(volume_names(volumes), volumes)
        sha = cascade.save_pretrained(
            weights,
            {
                "trained_stages": trained,
                "stage_lineage": lineage,
                "untrained_stages": untrained,
                "steps": step,
                "weight_average": bool(ema is not None),
                "data": recorded["names"],
                "volumes": recorded["count"],
                "passed_over": len(passed_over),
                "description": f"X-ray to CT cascade trained with DiffusionCore train xray for {step} steps on "
                               f"{recorded['description']}",
            },
        )
        summary.update({"weights": str(weights), "sha256": sha})
        logger.info("wrote %s (sha256 %s)", weights, sha)
    tlog.close()
    del wrapped  # the DDP wrapper holds the process group: released before leaving it (see cleanup)
    cleanup(info, completed=True)
    return summary


@torch.no_grad()
def log_validation(
    cascade: UnifiedHybridViTCascade,
    trained: list[int],
    vols: dict[int, torch.Tensor],
    xray: torch.Tensor,
    tlog: Any,
    step: int,
) -> None:
    """Log, per trained stage, the DRR re-projection error (relative L1 of line integrals) of the lifting-only
    volume and of a one-step estimate from t = 0.5, and coronal slices of target and estimates."""
    from .vdiffusion import q_sample

    was = cascade.training
    cascade.eval()
    for s in trained:
        st = cascade.stages[s - 1]
        r = st.cfg.resolution
        target = vols[r][:1]
        prev = None
        if s > 1:
            prev = vols[cascade.configs[s - 2].resolution][:1]
        t = torch.full((1,), 0.5, device=target.device)
        x_t = q_sample(target, t, torch.randn_like(target))
        ctx = st.condition(xray[:1], prev)
        plan = st.sampling_plan(1, target.device)  # a patch-trained stage may not fit as a whole
        if plan is None:
            one_step = st.predict(x_t, t, ctx)
        else:
            one_step = st.predict_tiled(x_t, t, st.pad_condition(ctx, plan), plan)
        one_step = one_step.clamp(-1, 1)
        sp = st.cfg.data.fov_mm / r
        lt = line_integrals(target, sp, st.cfg.data.view)
        for name, est in (("lifting", st.lifted_only(xray[:1])), ("one_step_t0.5", one_step)):
            le = line_integrals(est, sp, st.cfg.data.view)
            tlog.scalar(f"val/stage{s}/{name}_projection_l1", float((le - lt).abs().mean() / lt.amax()), step)
            tlog.image(
                f"val/stage{s}/{name}_coronal", ((est[0, 0, :, r // 2].flip(0) + 1) / 2).cpu().numpy(), step
            )
        tlog.image(
            f"val/stage{s}/target_coronal", ((target[0, 0, :, r // 2].flip(0) + 1) / 2).cpu().numpy(), step
        )
    cascade.train(was)
