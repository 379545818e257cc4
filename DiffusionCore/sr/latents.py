"""Latent precompute: encode each thin volume and its simulated thick version once (``prepare-latents``).

Files: ``OUTPUT_DIR/<volume>_x<k>.safetensors`` with tensors ``x0`` (latent of the thin volume) and ``y``
(latent of the thick version cubic-interpolated back onto the thin grid), both ``(C, d, h, w)`` float32,
unscaled VAE posterior means; metadata ``family="sr-latents"``, factor, degradation, the VAE file's
sha256 and the source path. ``train sr --latent-dir`` samples aligned crops from them instead of
encoding patches at every step (much faster, but without augmentation: a flipped latent is not the
latent of the flipped volume, so latents are used as encoded).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..intensity import hu_to_unit
from .data import degrade_and_interpolate
from .vae import CTAutoencoderKL

logger = logging.getLogger(__name__)

LATENT_FAMILY = "sr-latents"


@torch.no_grad()
def encode_volume(
    vae: CTAutoencoderKL,
    units: np.ndarray,
    tile: tuple[int, int, int] = (32, 128, 128),
    margin: tuple[int, int, int] = (8, 16, 16),
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Encode a whole volume in overlapping tiles (each tile's border ``margin`` is discarded).

    Args:
        vae: the autoencoder.
        units: ``(D, H, W)`` model units; each size is padded (edge values) to a multiple of the VAE's
            compression.
        tile, margin: core tile and overlap in voxels, multiples of the compression.

    Returns:
        ``(C, d, h, w)`` latent means on the CPU (``d = ceil(D / fz)`` etc.).
    """
    f = vae.downsample
    pad = [(-n) % fi for n, fi in zip(units.shape, f)]
    arr = np.pad(units, [(0, p) for p in pad], mode="edge")
    shape = arr.shape
    lat_shape = tuple(n // fi for n, fi in zip(shape, f))
    out = torch.zeros((vae.latent_channels, *lat_shape))
    starts = [list(range(0, n, t)) for n, t in zip(shape, tile)]
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                core0 = (z, y, x)
                core1 = tuple(min(c + t, n) for c, t, n in zip(core0, tile, shape))
                lo = tuple(max(c - m, 0) for c, m in zip(core0, margin))
                hi = tuple(min(c + m, n) for c, m, n in zip(core1, margin, shape))
                block = arr[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
                x_t = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))[None, None].to(device)
                mean, _ = vae.encode(x_t)
                mean = mean[0].float().cpu()
                a = [(c - low) // fi for c, low, fi in zip(core0, lo, f)]
                b = [(c - low) // fi for c, low, fi in zip(core1, lo, f)]
                oa = [c // fi for c, fi in zip(core0, f)]
                ob = [c // fi for c, fi in zip(core1, f)]
                out[:, oa[0] : ob[0], oa[1] : ob[1], oa[2] : ob[2]] = mean[
                    :, a[0] : b[0], a[1] : b[1], a[2] : b[2]
                ]
    return out


def prepare_latents(
    data: Sequence[str | os.PathLike] | str | os.PathLike,
    vae_weights: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    factors: Sequence[int] = (2, 3, 4),
    degradation: str = "slab",
    device: str = "auto",
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[Path]:
    """Encode every volume (thin) and its thick version per factor; returns the written files.

    Raises:
        InputError: no volumes; OutputError: an existing file without ``overwrite``.
    """
    from ..devices import resolve_device
    from ..errors import OutputError
    from ..inputs import collect_volumes, done_through, readable_volumes
    from ..weights import save_safetensors, sha256_file
    from .model import load_vae_weights

    paths = collect_volumes(data if isinstance(data, list | tuple) else [data])
    dev = resolve_device(device)
    vae_cfg_dict, tensors = load_vae_weights(vae_weights)
    from ..config import load_config
    from .config import VAEConfig

    vae = CTAutoencoderKL(load_config(vae_cfg_dict, VAEConfig))
    vae.load_state_dict({k[len("vae.") :]: v for k, v in tensors.items()})
    vae.to(dev).eval()
    vae_file = Path(vae_weights)
    vae_file = vae_file / "vae.safetensors" if vae_file.is_dir() else vae_file
    vae_sha = sha256_file(vae_file)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    total = len(paths) * len(factors)
    done = 0
    for p, vol in readable_volumes(paths):
        done = (done_through(paths, p) - 1) * len(factors)  # series passed over count as done
        units = hu_to_unit(vol.array)
        stem = Path(p).name.split(".")[0]
        for k in factors:
            target = out_dir / f"{stem}_x{k}.safetensors"
            if target.exists() and not overwrite:
                raise OutputError(
                    f"{target} exists: pass --overwrite to replace it or choose another --output-dir"
                )
            n = (units.shape[0] // k) * k
            if n < 2 * k:
                raise InputError(f"{p} has too few slices ({units.shape[0]}) for factor {k}")
            thin = units[:n]
            cond = degrade_and_interpolate(thin, k, degradation)
            x0 = encode_volume(vae, thin, device=dev)
            y = encode_volume(vae, cond, device=dev)
            meta = {
                "family": LATENT_FAMILY,
                "factor": int(k),
                "degradation": degradation,
                "vae_sha256": vae_sha,
                "source": str(p),
                "thin_shape": list(thin.shape),
                "spacing": list(vol.spacing),
            }
            save_safetensors(target, {"x0": x0, "y": y}, meta)
            written.append(target)
            done += 1
            logger.info("wrote %s (latent %s)", target, tuple(x0.shape))
            if progress is not None:
                progress(done, total, f"{stem} x{k}")
    if progress is not None and done < total:  # the last series were passed over
        progress(total, total, "the rest passed over")
    return written


@dataclass
class LatentPair:
    """Aligned latents of one volume and factor, and the latent z-range that training may use."""

    name: str
    x0: torch.Tensor
    y: torch.Tensor
    z0: int
    z1: int


def load_latent_dir(folder: str | os.PathLike, val_fraction: float, hold_out: bool) -> list[LatentPair]:
    """Read ``prepare-latents`` output; with ``hold_out`` the top ``val_fraction`` of latent z is excluded."""
    from ..weights import load_safetensors

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise InputError(f"no latent files in {folder}: run `python -m DiffusionCore prepare-latents` first")
    pairs = []
    for f in files:
        tensors, meta = load_safetensors(f)
        if meta.get("family") != LATENT_FAMILY or "x0" not in tensors or "y" not in tensors:
            raise InputError(f"{f} is not a prepare-latents file; remove it from {folder}")
        d = tensors["x0"].shape[1]
        z1 = int(round(d * (1 - val_fraction))) if hold_out else d
        pairs.append(LatentPair(f.stem, tensors["x0"], tensors["y"], 0, max(1, z1)))
    return pairs


def sample_latent_batch(
    pairs: Sequence[LatentPair], batch: int, lat_patch: tuple[int, int, int], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned random crops ``(x0, y)``, each ``(B, C, d, h, w)``."""
    xs, ys = [], []
    for _ in range(batch):
        p = pairs[int(rng.integers(len(pairs)))]
        region = (p.z1 - p.z0, p.x0.shape[2], p.x0.shape[3])
        if any(n < s for n, s in zip(region, lat_patch)):
            raise InputError(f"latents {p.name} {region} are smaller than the latent patch {lat_patch}")
        s = [int(rng.integers(0, n - q + 1)) for n, q in zip(region, lat_patch)]
        s[0] += p.z0
        sl = (
            slice(None),
            slice(s[0], s[0] + lat_patch[0]),
            slice(s[1], s[1] + lat_patch[1]),
            slice(s[2], s[2] + lat_patch[2]),
        )
        xs.append(p.x0[sl])
        ys.append(p.y[sl])
    return torch.stack(xs), torch.stack(ys)
