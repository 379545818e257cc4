"""The through-plane predictor: a light 2D network that restores thin slices from thick ones.

Why it exists. On a 2-core CPU the latent diffusion stack needs about ten CPU-hours to gain +0.6 dB over
cubic interpolation, while a small 2D network on the planes that contain the thick axis gains more in
minutes (see ``docs/model_cards/sr-default.md``). So the SR pipeline starts from this predictor's output
instead of cubic interpolation; the latent ResShift stage, when its weights are present, refines from
there (ResShift's starting point ``y``), and the pipeline without it is this predictor followed by data
consistency.

The network (:class:`ThroughPlaneNet`) sees a *thick* plane ``(m, W)``: ``m`` thick slices along the thick
axis by ``W`` voxels along one in-plane axis, in model units. All its convolutions run at the thick
resolution (k times fewer pixels than the thin grid: the work is where the information is); a head per
factor ``k`` then emits ``k`` values per thick pixel, one for each thin slice of the slab (depth-to-space
along the thick axis). These are a *residual* added to the cubic B-spline interpolation of the same
plane, and each head starts at zero: a fresh network returns cubic interpolation exactly.

A volume ``(m, H, W)`` (thick axis first) is predicted twice, as ``H`` planes ``(m, W)`` and as ``W``
planes ``(m, H)``, and the two residuals are averaged (:func:`predict_residual`).

Weights files (safetensors, family ``"sr"``, ``component="throughplane"``) hold the tensors under
``predictor.*`` and the :class:`ThroughPlaneConfig` in their metadata.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import Cancelled, ConfigError, WeightsError
from ..interpolation import cubic_matrix

logger = logging.getLogger(__name__)

COMPONENT = "throughplane"
#: Tensor-name prefix of the predictor inside a weights file.
PREFIX = "predictor."
#: Planes per network call at inference (bounds memory: ~C x m x W x 4 bytes each).
DEFAULT_PLANE_BATCH = 16
#: The most bytes one feature map of a plane batch may take at inference (channels x planes x m x W x 4): a batch
#: holds about six such maps at once, so a volume of many thick slices runs fewer planes per call instead of
#: gigabytes of activations (at 2 threads 4 planes of 64x512 per call run as fast as 16, which took 4 times the memory).
PLANE_BATCH_FEATURE_BYTES = 16 * 2**20


def plane_batch_for(channels: int, m: int, width: int, plane_batch: int = DEFAULT_PLANE_BATCH) -> int:
    """Planes per network call for ``(m, width)`` planes: ``plane_batch``, fewer when one feature map of the batch
    would exceed :data:`PLANE_BATCH_FEATURE_BYTES` (never fewer than one)."""
    per_plane = max(1, int(channels) * int(m) * int(width) * 4)
    return max(1, min(int(plane_batch), PLANE_BATCH_FEATURE_BYTES // per_plane))


@dataclass
class ThroughPlaneConfig:
    """Architecture of the through-plane predictor.

    Attributes:
        channels: feature channels of every convolution at the thick resolution.
        blocks: residual blocks (two 3x3 convolutions each) at the thick resolution.
        factors: the integer factors the network has a head for (thin slices per thick slice).
        low_blocks: residual blocks of a second level at half the resolution along both axes of the plane,
            with twice the channels (0: no second level, a single-resolution network). For about the cost of
            as many full-resolution blocks they see four times the area, so the context of a structure
            (a rib's course, an organ's outline) reaches each thin slice.
        post_blocks: full-resolution residual blocks after the second level's features are added back
            (needs ``low_blocks``).
    """

    channels: int = 32
    blocks: int = 5
    factors: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8])
    low_blocks: int = 0
    post_blocks: int = 0

    def __post_init__(self) -> None:
        from ..nn.architecture import require_positive

        try:  # integers, never coerced: "32" or 1.5 in a weights file's config is a damaged file, not 32 or 1
            self.channels = require_positive("channels", self.channels)
            self.blocks = require_positive("blocks", self.blocks, minimum=0)
            self.low_blocks = require_positive("low_blocks", self.low_blocks, minimum=0)
            self.post_blocks = require_positive("post_blocks", self.post_blocks, minimum=0)
            if not isinstance(self.factors, list | tuple) or not self.factors:
                raise ConfigError(f"factors must be a list of integers >= 2; got {self.factors!r}")
            self.factors = sorted({require_positive("factors", k, minimum=2) for k in self.factors})
        except ConfigError as exc:
            raise ConfigError(f"through-plane predictor: {exc}") from None
        if self.post_blocks > 0 and self.low_blocks == 0:
            raise ConfigError("through-plane predictor: post_blocks follow the half-resolution level; set "
                              f"low_blocks > 0 or put the blocks in 'blocks' (got {self})")


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, padding_mode="replicate")
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, padding_mode="replicate")
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class ThroughPlaneNet(nn.Module):
    """Thick plane ``(B, 1, m, W)`` in model units -> thin residual ``(B, 1, m*k, W)`` for factor ``k``.

    Args:
        config: the architecture (:class:`ThroughPlaneConfig`).
    """

    def __init__(self, config: ThroughPlaneConfig | None = None) -> None:
        super().__init__()
        self.config = config or ThroughPlaneConfig()
        ch = int(self.config.channels)
        self.stem = nn.Conv2d(1, ch, 3, padding=1, padding_mode="replicate")
        # a learned offset per factor tells the shared body how anisotropic the plane is
        self.factor_embedding = nn.ParameterDict(
            {str(k): nn.Parameter(torch.zeros(1, ch, 1, 1)) for k in self.config.factors}
        )
        self.body = nn.Sequential(*[_ResBlock(ch) for _ in range(int(self.config.blocks))])
        if int(self.config.low_blocks) > 0:
            # second level: stride-2 down, blocks at twice the width, 2x up; its output starts at zero
            self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1, padding_mode="replicate")
            self.low = nn.Sequential(*[_ResBlock(2 * ch) for _ in range(int(self.config.low_blocks))])
            self.up = nn.ConvTranspose2d(2 * ch, ch, 2, stride=2)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
            self.post = nn.Sequential(*[_ResBlock(ch) for _ in range(int(self.config.post_blocks))])
        self.act = nn.ReLU(inplace=True)
        self.heads = nn.ModuleDict(
            {str(k): nn.Conv2d(ch, k, 3, padding=1, padding_mode="replicate") for k in self.config.factors}
        )
        for head in self.heads.values():  # a fresh network returns cubic interpolation
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @property
    def factors(self) -> list[int]:
        return list(self.config.factors)

    def supports(self, factor: int | None) -> bool:
        return factor is not None and int(factor) in self.config.factors

    def forward(self, thick: torch.Tensor, factor: int) -> torch.Tensor:
        if not self.supports(factor):
            raise ConfigError(
                f"the through-plane predictor has no head for factor {factor} (it has {self.config.factors})"
            )
        k = int(factor)
        h = self.body(self.stem(thick) + self.factor_embedding[str(k)])
        if int(self.config.low_blocks) > 0:
            m, w = h.shape[-2:]
            low = self.up(self.low(self.act(self.down(h))))  # (B, C, 2*ceil(m/2), 2*ceil(w/2))
            h = self.post(h + low[..., :m, :w])
        h = self.act(h)
        out = self.heads[str(k)](h)  # (B, k, m, W): one value per thin slice of each slab
        b, _, m, w = out.shape
        return out.permute(0, 2, 1, 3).reshape(b, 1, m * k, w)


def slab_coordinates(n_thin: int, k: int) -> np.ndarray:
    """Continuous thick-slice index of each thin slice centre when each thick slice averages ``k`` thin ones."""
    return (np.arange(n_thin, dtype=np.float64) - (k - 1) / 2.0) / k


def cubic_operator(m: int, k: int) -> torch.Tensor:
    """``(m*k, m)`` float32: cubic B-spline interpolation from ``m`` thick slices onto the ``m*k`` thin
    slice centres (the same spline as the cubic baseline and the pipeline)."""
    return torch.from_numpy(cubic_matrix(m, slab_coordinates(m * k, k)).astype(np.float32))


def cubic_planes(thick: torch.Tensor, k: int) -> torch.Tensor:
    """Cubic interpolation of planes ``(B, 1, m, W)`` along ``m`` onto ``(B, 1, m*k, W)``."""
    op = cubic_operator(thick.shape[-2], k).to(thick.device, thick.dtype)
    return torch.einsum("nm,bcmw->bcnw", op, thick)


ProgressFn = Callable[[int, int, str], None]

#: Voxels at or below this HU count as air around the patient: planes there are not predicted (the
#: residual of air is zero) .
AIR_HU = -900.0
#: Voxels kept around the body box: the crop's edges are air, which the convolutions' replicate padding
#: continues, so a network whose receptive field is wider than this margin sees what it would see uncropped.
BODY_MARGIN = 16


def body_box(thick_hu: np.ndarray, margin: int = BODY_MARGIN) -> tuple[int, int, int, int]:
    """``(h0, h1, w0, w1)``: the in-plane extent of ``(m, H, W)`` holding anything denser than air, widened by
    ``margin`` (the whole extent when there is nothing but air)."""
    dense = thick_hu > AIR_HU
    rows, cols = np.flatnonzero(dense.any(axis=(0, 2))), np.flatnonzero(dense.any(axis=(0, 1)))
    hh, ww = thick_hu.shape[1:]
    if rows.size == 0:
        return 0, hh, 0, ww
    return (max(0, int(rows[0]) - margin), min(hh, int(rows[-1]) + 1 + margin),
            max(0, int(cols[0]) - margin), min(ww, int(cols[-1]) + 1 + margin))


def channels_last(net: ThroughPlaneNet) -> ThroughPlaneNet:
    """A copy of ``net`` whose convolution weights are stored channels-last (NHWC).

    oneDNN's CPU convolutions run this network's 32-channel 3x3 convolutions faster in that layout (the
    speed benchmark, ``benchmarks/sr_speed.py``: 11-18% less time for the predictor and the adaptation at 2
    threads); the outputs agree with the default layout to float rounding. The caller's network is left as it is.
    """
    return copy.deepcopy(net).to(memory_format=torch.channels_last)


@torch.no_grad()
def predict_residual(
    net: ThroughPlaneNet,
    thick_units: torch.Tensor,
    factor: int,
    *,
    plane_batch: int = DEFAULT_PLANE_BATCH,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    into: np.ndarray | None = None,
    scale: float = 1.0,
) -> torch.Tensor | None:
    """The thin-grid residual (model units) for a whole thick volume.

    Args:
        net: the predictor (in eval mode).
        thick_units: ``(m, H, W)`` thick volume in model units, thick axis first (CPU tensor).
        factor: thin slices per thick slice.
        plane_batch: planes per network call (fewer for planes so large that a batch's feature maps would take more
            than :data:`PLANE_BATCH_FEATURE_BYTES` each: :func:`plane_batch_for`).
        device: where the network runs.
        progress: ``progress(done, total, message)`` over the ``H + W`` planes.
        cancel: checked between calls (raises :class:`~DiffusionCore.errors.Cancelled`).
        into: a float32 ``(m*k, H, W)`` array (any strides: a flipped or cropped view of the caller's volume) to add
            ``scale`` times the residual to, batch by batch, instead of returning it: no volume-sized buffer is made.
            On cancel it holds part of the residual.
        scale: the factor of ``into`` (e.g. HU per model unit); unused without ``into``.

    Returns:
        ``(m*k, H, W)`` float32 CPU tensor: the mean of the residuals predicted from the ``(m, W)`` planes
        and from the ``(m, H)`` planes; None when ``into`` was given.
    """
    k = int(factor)
    net = channels_last(net).to(device)
    m, hh, ww = thick_units.shape
    if into is not None and (into.shape != (m * k, hh, ww) or into.dtype != np.float32):
        raise ValueError(f"predict_residual: into must be a float32 array of shape {(m * k, hh, ww)}; got "
                         f"{into.dtype} {into.shape}")
    out = np.zeros((m * k, hh, ww), dtype=np.float32) if into is None else None
    target = out if into is None else into
    half = np.float32(0.5 * (1.0 if into is None else scale))
    channels = int(net.config.channels)
    total = hh + ww
    done = 0
    # orientation 0: planes over H, each (m, W); orientation 1: planes over W, each (m, H)
    for orientation, count in ((0, hh), (1, ww)):
        batch = plane_batch_for(channels, m, ww if orientation == 0 else hh, plane_batch)
        for start in range(0, count, batch):
            if cancel is not None and cancel.is_set():
                raise Cancelled("super-resolution cancelled; no output was written.")
            stop = min(count, start + batch)
            if orientation == 0:
                planes = thick_units[:, start:stop, :].permute(1, 0, 2)  # (b, m, W)
            else:
                planes = thick_units[:, :, start:stop].permute(2, 0, 1)  # (b, m, H)
            pred = net(planes.unsqueeze(1).to(device, torch.float32), k)[:, 0].float().cpu()  # (b, n, .)
            part = pred.numpy()  # numpy: ``into`` may be a view with negative strides, which torch cannot hold
            part *= half
            if orientation == 0:
                target[:, start:stop, :] += part.transpose(1, 0, 2)
            else:
                target[:, :, start:stop] += part.transpose(1, 2, 0)
            done += stop - start
            if progress is not None:
                progress(done, total, f"through-plane predictor, {done}/{total} planes")
    return None if out is None else torch.from_numpy(out)


def tiny_predictor(seed: int = 0) -> ThroughPlaneNet:
    """A tiny random-weight predictor for tests and self-tests (its heads are not zero, so its output
    differs from cubic interpolation). Its images are meaningless."""
    return random_weights(ThroughPlaneNet(ThroughPlaneConfig(channels=4, blocks=1)), seed, 0.05)


def random_weights(net: ThroughPlaneNet, seed: int = 0, scale: float = 0.05) -> ThroughPlaneNet:
    """``net`` with every parameter drawn from N(0, scale^2) (seeded), in eval mode: a test network whose heads
    are not zero. Its images are meaningless."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net.eval()


def state_dict_for_file(net: ThroughPlaneNet) -> dict[str, torch.Tensor]:
    """The predictor's tensors under :data:`PREFIX` (as stored in a weights file)."""
    return {PREFIX + k: v for k, v in net.state_dict().items()}


def from_state(
    tensors: dict[str, torch.Tensor], config: dict | ThroughPlaneConfig, source: str = "the through-plane predictor's weights"
) -> ThroughPlaneNet:
    """Build a predictor from a weights file's tensors (all under :data:`PREFIX`) and its config.

    Args:
        source: the weights, for messages (their file).

    Raises:
        WeightsError: tensors outside :data:`PREFIX`, missing or of the wrong shape for the config.
    """
    from ..nn.architecture import build_from_weights

    cfg = config if isinstance(config, ThroughPlaneConfig) else ThroughPlaneConfig(**dict(config))
    outside = [k for k in tensors if not k.startswith(PREFIX)]
    if outside:  # as every other loader: a tensor nothing reads means the file is not what it says
        raise WeightsError(
            f"{source}: {len(outside)} tensor(s) lie outside {PREFIX!r}, e.g. "
            f"{outside[0]!r}: the file was changed after export or is not a predictor; use other weights"
        )
    state = {k[len(PREFIX):]: v.float() for k, v in tensors.items()}
    net = build_from_weights(lambda: ThroughPlaneNet(cfg), state, source, "the through-plane predictor")
    net.eval()
    return net

