"""Stage configurations of the X-ray to CT cascade (JSON/YAML files, every field documented).

The seed's keys work as written: ``stage``, ``resolution``, ``xray_resolution``, ``model.*``, ``training.*``
and ``loss_weights.*``. Files for the three stages ship in ``DiffusionCore/xray/configs/``; print every
field with ``python -m DiffusionCore train xray --config-help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError
from ..nn.architecture import finite_positive, require_heads, require_positive, require_sizes

CONFIG_DIR = Path(__file__).with_name("configs")
#: Upper bounds on the sizes a stage's config (or a weights file's metadata) sets for generation: beyond them a
#: run would only exhaust memory or time (a 10^6-pixel radiograph side is 4 TB; 10^9 DDIM steps never end).
MAX_XRAY_RESOLUTION = 4096
MAX_SAMPLING_STEPS = 1000
MAX_NUM_SAMPLES = 100
MAX_FOV_MM = 2000.0


@dataclass
class XrayModelConfig:
    voxel_channels: int = field(
        default=64, metadata={"help": "Width of the voxel token features (ViT width)."}
    )
    vit_depth: int = field(default=4, metadata={"help": "Number of hybrid ViT blocks."})
    vit_heads: int = field(
        default=4, metadata={"help": "Attention heads per block (must divide voxel_channels)."}
    )
    use_depth_lifting: bool = field(
        default=True, metadata={"help": "Back-project X-ray features into the voxel grid with depth priors."}
    )
    use_adaln: bool = field(
        default=True,
        metadata={"help": "AdaLN-Zero modulation from time + X-ray + previous stage (else plain pre-norm)."},
    )
    v_parameterization: bool = field(
        default=True,
        metadata={
            "help": "Train on the error of v = alpha*eps - sigma*x0 (True) or of eps (False) implied by x0."
        },
    )
    use_memory_efficient: bool = field(
        default=True,
        metadata={"help": "Windowed SDPA attention when the token count exceeds max_full_tokens."},
    )
    patch_size: int = field(default=4, metadata={"help": "Voxel patch size: tokens = (resolution/patch)^3."})
    window_size: int = field(default=8, metadata={"help": "Attention window side in tokens (windowed mode)."})
    max_full_tokens: int = field(
        default=4096, metadata={"help": "Largest token count attended globally; above it windows are used."}
    )
    encoder_channels: list[int] = field(
        default_factory=lambda: [32, 64, 128],
        metadata={"help": "Channels of the X-ray encoder's scales (each halves the resolution)."},
    )
    xray_tokens: int = field(
        default=16,
        metadata={"help": "Side of the X-ray token grid used by cross-attention (tokens = side^2)."},
    )
    depth_bands: int = field(
        default=3,
        metadata={"help": "Anatomical depth bands of the lifting prior (anterior, mid, posterior)."},
    )
    mlp_ratio: float = field(
        default=4.0, metadata={"help": "Hidden width of the ViT MLP over its input width."}
    )
    cross_attention: bool = field(
        default=True, metadata={"help": "Cross-attention from voxels to X-ray tokens."}
    )
    refine_channels: int = field(
        default=0,
        metadata={"help": "Width of a full-resolution 3D conv head refining the token output (0 = none)."},
    )
    refine_xray: bool = field(
        default=False,
        metadata={
            "help": "The refinement head (and the decoder, where there is one) also reads the radiograph itself "
            "at the stage's resolution, spread along each ray, and each voxel's depth along the ray: a "
            "full-resolution path from the radiograph to the output beside the token grid's (needs "
            "refine_channels > 0 or decoder_channels)."
        },
    )
    lifting_profile: int = field(
        default=0,
        metadata={
            "help": "Width of a 2D network that lifts the radiograph at full resolution: for every pixel the "
            "value of each voxel along its ray, added to the token-grid lifting estimate and read by the denoiser "
            "(its token embedding and refinement head or decoder) as a volume; 0 = none. Needs use_depth_lifting."
        },
    )
    lifting_mean_prior: bool = field(
        default=False,
        metadata={
            "help": "Stage 1 only: the full-resolution lifting volume is the mean training CT plus the lifting "
            "head's correction, instead of the correction alone: the anatomy every chest shares (the spine behind "
            "the mediastinum, the body's depth) is there from the start, and the radiograph moves it. Needs "
            "lifting_profile."
        },
    )
    lifting_residual: bool = field(
        default=False,
        metadata={
            "help": "Stage 1 only: the denoiser outputs a correction on the lifting-only volume (the token-grid "
            "lifting plus, with lifting_profile, the full-resolution one), as stages 2-3 correct the previous "
            "stage's volume, instead of the whole volume: what the lifting resolves (e.g. the spine behind the "
            "mediastinum) is kept unless the radiograph and x_t say otherwise. Needs use_depth_lifting; not with "
            "atlas_prior (whose output is a correction on the atlas)."
        },
    )
    skip_sigma_data: float = field(
        default=0.0,
        metadata={
            "help": "A noise-level skip on the denoiser's output (0 = none): x0 = base + c_skip(t) (x_t - alpha base) "
            "+ c_out(t) * correction, with c_skip = alpha s^2 / (alpha^2 s^2 + sigma^2) and c_out = sigma s / "
            "sqrt(alpha^2 s^2 + sigma^2) for s = this value (the typical spread of x0 around the base, model units), "
            "the base being what the stage corrects (the previous stage's volume, the lifting volume, the atlas, or "
            "zero). Where little noise is left the output is x_t itself, so the anatomy x_t already holds is kept "
            "by construction instead of redrawn by the token head; the network learns only what x_t and the base "
            "do not say. Changes what the weights mean: train from scratch with it."
        },
    )
    keep_coarse: bool = field(
        default=False,
        metadata={
            "help": "Stages 2-3 only: the stage adds detail only. Its correction on the upsampled previous-stage volume "
            "loses its 2x2x2-block means, so every block of the output averages to that block of its input: where "
            "things are stays what the previous stage (and its consistency step) decided, and the stage adds what "
            "its finer grid can show inside each coarse voxel. On a CT never seen, stage 2 trained without it lost "
            "against its input in the block means alone; with it, stage 2 is level with its input after the "
            "consistency step (docs/model_cards/xray-default.md): it makes the stage safe, not yet better."
        },
    )
    atlas_prior: bool = field(
        default=False,
        metadata={
            "help": "Stage 1 only: refine an anatomical atlas (the mean training CT, blurred by data.atlas_blur_voxels, "
            "registered to the radiograph by an affine map) as stages 2-3 refine the previous stage's volume: it is "
            "read beside x_t, the output is a residual on it, and sampling starts from it noised to "
            "diffusion.prev_stage_t. See DiffusionCore.xray.atlas."
        },
    )
    decoder_channels: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Widths of a convolutional decoder from the token grid to the voxels, one per doubling of "
            "the resolution (so log2(patch_size) entries; each level also reads x_t, the previous stage's volume "
            "and, with refine_xray, the rays, averaged to its resolution). Empty: a linear head per token."
        },
    )
    train_patch: int = field(
        default=0,
        metadata={
            "help": "Side (voxels) of the random cubic patch of this stage's grid each training step sees "
            "(0 = the whole grid); a multiple of the patch alignment (patch_size, x window_size where "
            "attention is windowed)."
        },
    )
    inference_patch: int = field(
        default=0,
        metadata={
            "help": "Side (voxels) of the cubic patches the denoiser runs on at generation, blended into the "
            "grid (0 = whole grid, switching to patches by itself when its memory estimate exceeds the free "
            "memory); a multiple of the patch alignment."
        },
    )
    patch_overlap: int = field(
        default=16,
        metadata={
            "help": "Least overlap (voxels) of neighbouring generation patches, blended by a raised-cosine "
            "ramp, where attention inside a patch is global; window-aligned patches of a windowed grid are "
            "exact and do not overlap."
        },
    )


@dataclass
class XrayTrainingConfig:
    batch_size: int = field(
        default=2, metadata={"help": "Volumes per optimizer step (per process under DDP)."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    epochs: int = field(default=100, metadata={"help": "Passes over the training volumes."})
    steps_per_epoch: int = field(
        default=50, metadata={"help": "Optimizer steps per epoch (each draws fresh augmented samples)."}
    )
    max_steps: int = field(
        default=0, metadata={"help": "Stop after this many steps (0 = epochs x steps_per_epoch)."}
    )
    gradient_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0 disables)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute ViT blocks in the backward pass to save memory."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear learning-rate warm-up steps."})
    amp: bool = field(default=True, metadata={"help": "bfloat16 autocast on GPU (ignored on CPU)."})
    seed: int = field(default=0, metadata={"help": "Random seed (data order, augmentation, noise)."})
    checkpoint_every: int = field(
        default=500, metadata={"help": "Write a resumable checkpoint every N steps."}
    )
    log_every: int = field(default=10, metadata={"help": "Log scalars every N steps."})
    keep_checkpoints: int = field(default=3, metadata={"help": "How many recent checkpoints to keep."})
    num_workers: int = field(default=0, metadata={"help": "Data-loading worker processes."})
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "Decay of the weight average that validation logs and export writes (0: off, the raw "
            "weights are exported)."
        },
    )


@dataclass
class XrayLossWeights:
    v_loss: float = field(default=1.0, metadata={"help": "Weight of the diffusion loss (v or eps MSE)."})
    drr_loss: float = field(
        default=0.2,
        metadata={"help": "Weight of the DRR (re-projection) loss; seed defaults 0.2 / 0.3 / 0.5 per stage."},
    )
    depth_prior_loss: float = field(
        default=0.1, metadata={"help": "Weight of the lifted-volume loss that trains the depth priors."}
    )
    perceptual_loss: float = field(
        default=0.0,
        metadata={"help": "Weight of a structural (SSIM, no downloaded network) loss on orthogonal slices."},
    )
    gradient_loss: float = field(default=0.1, metadata={"help": "Weight of the 3D image-gradient L1 loss."})
    cross_view_drr_loss: float = field(
        default=0.0,
        metadata={"help": "Weight of a DRR loss in the view at right angles to the input's (lateral for a PA "
                          "radiograph), rendered from the training CT: it scores where the volume puts things in "
                          "depth (the spine behind the heart), which the input view cannot show. 0: off."},
    )
    bone_loss: float = field(
        default=0.0,
        metadata={"help": "Weight of an L1 loss over the voxels the training CT holds as bone (above losses.BONE_HU): "
                          "spine and ribs are a few percent of the cube, so the losses averaged over every voxel "
                          "barely notice them smoothed away. 0: off."},
    )


@dataclass
class XrayDataConfig:
    fov_mm: float = field(
        default=350.0, metadata={"help": "Side of the cubic field of view, mm (CT cropped/padded)."}
    )
    view: str = field(default="pa", metadata={"help": "Radiograph view used for training: pa or lateral."})
    pose_jitter_deg: float = field(
        default=2.0, metadata={"help": "Max pose rotation of the DRR source, degrees."}
    )
    intensity_jitter: float = field(default=0.1, metadata={"help": "Relative DRR gain/gamma jitter."})
    noise_std: float = field(
        default=0.01, metadata={"help": "Gaussian noise added to DRRs (attenuation style)."}
    )
    blur_sigma_px: float = field(
        default=1.0, metadata={"help": "Max scatter-like Gaussian blur of DRRs, pixels."}
    )
    hu_jitter: float = field(default=0.03, metadata={"help": "Relative HU scale jitter of the CT."})
    flip: bool = field(default=True, metadata={"help": "Random left-right flips of CT and DRR together."})
    max_rotation_deg: float = field(default=5.0, metadata={"help": "Max 3D rotation of the CT, degrees."})
    zoom_jitter: float = field(
        default=0.0,
        metadata={
            "help": "Body-habitus zoom of the CT: each axis scaled on its own by exp(u), u uniform in +-this "
            "(0.12: about 0.89-1.13), so one chest becomes wider, deeper or longer ones; 0 turns it off."
        },
    )
    elastic_mm: float = field(
        default=0.0,
        metadata={
            "help": "Smooth elastic deformation of the CT: displacement standard deviation in mm (a field "
            "varying over about a quarter of the field of view; the same field at every stage's "
            "resolution); 0 turns it off."
        },
    )
    processing: float = field(
        default=0.0,
        metadata={
            "help": "Share of training DRRs given the look of a processed clinical radiograph (random unsharp "
            "masking and flattening of broad brightness differences, the histogram kept), so that the model "
            "reads real radiographs as it reads DRRs; 0 turns it off."
        },
    )
    processing_flatten: float = field(
        default=0.7,
        metadata={
            "help": "data.processing: the largest share of the broad brightness differences (a Gaussian of 16 "
            "pixels of a 128^2 radiograph) that a processed look removes, drawn per DRR in [0, this]. Above 1 the "
            "broad profile is inverted (the lateral chest walls brighter than the midline), as in an equalised "
            "clinical radiograph."
        },
    )
    atlas_blur_voxels: float = field(
        default=2.0,
        metadata={"help": "model.atlas_prior (and data.prev_from_atlas): Gaussian blur (voxels of the stage's "
                  "grid) of the atlas, in training and in the weights' mean-CT atlas."},
    )
    atlas_zoom: float = field(
        default=0.08,
        metadata={"help": "model.atlas_prior (and data.prev_from_atlas), training: per-axis log-zoom range of "
                  "the sample's own CT made into its atlas (another patient's size)."},
    )
    atlas_shift_voxels: float = field(
        default=2.0,
        metadata={"help": "model.atlas_prior (and data.prev_from_atlas), training: largest shift of the atlas, "
                  "voxels."},
    )
    atlas_deform_voxels: float = field(
        default=1.5,
        metadata={"help": "model.atlas_prior (and data.prev_from_atlas), training: standard deviation of the "
                  "atlas's smooth deformation (another patient's shape), voxels."},
    )
    prev_noise: float = field(
        default=0.1, metadata={"help": "Noise on the previous-stage volume given to stages 2-3 in training."}
    )
    prev_from_model: float = field(
        default=0.5,
        metadata={
            "help": "Share of training samples of stages 2-3 whose previous-stage volume is that stage's own "
            "one-pass estimate from the DRR (with the re-projection consistency step), as at generation; "
            "the others get the ground truth at the previous resolution (or, for data.prev_from_atlas, its "
            "misregistered copy). All get prev_noise."
        },
    )
    prev_from_atlas: float = field(
        default=0.0,
        metadata={
            "help": "Share of training samples of stages 2-3 whose previous-stage volume is their own CT at the "
            "previous resolution made into another patient's (data.atlas_blur_voxels, atlas_zoom, "
            "atlas_shift_voxels, atlas_deform_voxels, in voxels of the previous stage's grid) and then given the "
            "re-projection consistency step: a previous stage as wrong as on a CT it never saw, where its own "
            "estimate on a training CT is far closer to the truth. Off (0) by default."
        },
    )


@dataclass
class XrayDiffusionConfig:
    sampling_steps: int = field(default=8, metadata={"help": "Default DDIM steps at generation."})
    min_t: float = field(default=1e-3, metadata={"help": "Smallest training time t in (0, 1)."})
    prev_stage_t: float = field(
        default=0.6,
        metadata={"help": "Stages 2-3 start DDIM from the noised previous-stage volume at this t (< 1)."},
    )
    num_samples: int = field(
        default=1,
        metadata={
            "help": "Default samples averaged per stage at generation (their mean estimates the most likely "
            "CT; more cost proportionally more time)."
        },
    )
    lifting_start_t: float = field(
        default=1.0,
        metadata={
            "help": "Stage 1 starts DDIM from its lifting-only volume noised to this t (< 1: the diffusion "
            "refines the deterministic estimate, with proportionally fewer steps' worth of change); 1.0 starts "
            "from pure noise."
        },
    )


@dataclass
class XrayStageConfig:
    stage: int = field(default=1, metadata={"help": "Cascade stage: 1 (64^3), 2 (128^3) or 3 (256^3)."})
    resolution: int = field(default=64, metadata={"help": "Voxels per side of this stage's cube."})
    xray_resolution: int = field(default=128, metadata={"help": "Pixels per side of the radiograph input."})
    model: XrayModelConfig = field(default_factory=XrayModelConfig, metadata={"help": "Network settings."})
    training: XrayTrainingConfig = field(
        default_factory=XrayTrainingConfig, metadata={"help": "Optimisation."}
    )
    loss_weights: XrayLossWeights = field(default_factory=XrayLossWeights, metadata={"help": "Loss weights."})
    data: XrayDataConfig = field(
        default_factory=XrayDataConfig, metadata={"help": "Field of view, augmentation."}
    )
    diffusion: XrayDiffusionConfig = field(
        default_factory=XrayDiffusionConfig, metadata={"help": "Sampling."}
    )

    def __post_init__(self) -> None:
        m = self.model
        if self.stage not in (1, 2, 3):
            raise ConfigError(f"stage must be 1, 2 or 3; got {self.stage}")
        check_xray_architecture(self)
        check_xray_generation(self)
        if self.resolution % m.patch_size:
            raise ConfigError(
                f"resolution {self.resolution} must be a multiple of model.patch_size {m.patch_size}"
            )
        if m.voxel_channels % m.vit_heads:
            raise ConfigError(
                f"model.voxel_channels {m.voxel_channels} must be divisible by vit_heads {m.vit_heads}"
            )
        if self.xray_resolution < 16 or self.xray_resolution % (2 ** len(m.encoder_channels)):
            raise ConfigError(
                f"xray_resolution {self.xray_resolution} must be >= 16 and a multiple of "
                f"{2 ** len(m.encoder_channels)} (2 ^ number of encoder scales)"
            )
        if self.data.view not in ("pa", "lateral"):
            raise ConfigError(f"data.view must be pa or lateral; got {self.data.view!r}")
        align = patch_alignment(self)
        why = f"patch_size {m.patch_size}"
        if align != m.patch_size:
            why += f" x window_size {m.window_size}, as attention over this grid is windowed"
        for name in ("train_patch", "inference_patch"):
            side = getattr(m, name)
            if side < 0 or side % align:
                raise ConfigError(
                    f"model.{name} {side} must be 0 (whole grid) or a positive multiple of {align} voxels "
                    f"({why}); e.g. {max(align, side // align * align)}"
                )
        if m.train_patch > self.resolution:
            raise ConfigError(
                f"model.train_patch {m.train_patch} exceeds the stage resolution {self.resolution}; "
                "use at most the resolution (or 0 for the whole grid)"
            )
        if m.patch_overlap < 0:
            raise ConfigError(f"model.patch_overlap must be >= 0 voxels; got {m.patch_overlap}")
        if self.diffusion.num_samples < 1:
            raise ConfigError(f"diffusion.num_samples must be >= 1; got {self.diffusion.num_samples}")
        if not 0.0 < self.diffusion.lifting_start_t <= 1.0:
            raise ConfigError(
                f"diffusion.lifting_start_t must be in (0, 1] (1: start from noise); got {self.diffusion.lifting_start_t}"
            )
        if not 0.0 <= self.training.ema_decay < 1.0:
            raise ConfigError(f"training.ema_decay must be in [0, 1) (0: off); got {self.training.ema_decay}")
        d = self.diffusion
        if not 0.0 < d.min_t < d.prev_stage_t <= 1.0:
            raise ConfigError(
                f"diffusion.min_t ({d.min_t}) and diffusion.prev_stage_t ({d.prev_stage_t}) must satisfy "
                "0 < min_t < prev_stage_t <= 1"
            )
        if not 0.0 <= self.data.prev_from_model <= 1.0:
            raise ConfigError(f"data.prev_from_model must be in [0, 1] (a share of samples); got {self.data.prev_from_model}")
        if not 0.0 <= self.data.prev_from_atlas <= 1.0 - self.data.prev_from_model:
            raise ConfigError(
                f"data.prev_from_atlas must be in [0, 1 - data.prev_from_model] (a share of samples); got "
                f"{self.data.prev_from_atlas} with prev_from_model {self.data.prev_from_model}"
            )
        if self.data.prev_from_atlas and self.stage == 1:
            raise ConfigError("data.prev_from_atlas is for stages 2-3 (stage 1 has no previous stage); stage 1 has "
                              f"{self.data.prev_from_atlas}")  # fmt: skip
        if m.lifting_mean_prior and self.stage != 1:
            raise ConfigError(f"model.lifting_mean_prior is for stage 1 (the mean CT is at its grid); stage {self.stage} has it")
        if m.lifting_mean_prior and not m.lifting_profile:
            raise ConfigError("model.lifting_mean_prior adds the mean CT to the full-resolution lifting volume: it needs "
                              "model.lifting_profile > 0")  # fmt: skip
        if m.lifting_residual and (self.stage != 1 or not m.use_depth_lifting or m.atlas_prior):
            raise ConfigError("model.lifting_residual makes stage 1's output a correction on its lifting volume: it is for "
                              "stage 1, needs model.use_depth_lifting, and does not go with model.atlas_prior (whose "
                              f"output is a correction on the atlas); stage {self.stage} has use_depth_lifting "
                              f"{m.use_depth_lifting}, atlas_prior {m.atlas_prior}")  # fmt: skip
        if not 0.0 <= m.skip_sigma_data <= 2.0:
            raise ConfigError("model.skip_sigma_data is the typical spread of the clean volume around what the stage "
                              f"corrects, in model units (e.g. 0.1; 0 = no skip); got {m.skip_sigma_data}")  # fmt: skip
        if m.keep_coarse and self.stage == 1:
            raise ConfigError("model.keep_coarse keeps the previous stage's coarse volume: it is for stages 2-3 (stage 1 "
                              "has no previous stage)")  # fmt: skip
        if m.atlas_prior and self.stage != 1:
            raise ConfigError(f"model.atlas_prior is for stage 1 (stages 2-3 refine the previous stage); stage {self.stage} has it")
        for name in ("atlas_blur_voxels", "atlas_zoom", "atlas_shift_voxels", "atlas_deform_voxels"):
            if not getattr(self.data, name) >= 0.0:
                raise ConfigError(f"data.{name} must be >= 0; got {getattr(self.data, name)}")
        for name in (f.name for f in fields(self.loss_weights)):
            if not getattr(self.loss_weights, name) >= 0.0:
                raise ConfigError(f"loss_weights.{name} must be >= 0 (0: off); got {getattr(self.loss_weights, name)}")
        if not 0.0 <= self.data.processing <= 1.0:
            raise ConfigError(f"data.processing must be in [0, 1] (a share of samples); got {self.data.processing}")
        if not 0.0 <= self.data.processing_flatten <= 2.0:
            raise ConfigError("data.processing_flatten must be in [0, 2] (a share of the broad brightness differences "
                              f"removed; above 1 inverts them); got {self.data.processing_flatten}")  # fmt: skip


def check_xray_architecture(cfg: XrayStageConfig) -> None:
    """The sizes a stage's network is built from: positive, non-empty, heads dividing the width. Checked before
    the rules that divide by them, whether the config comes from a file or from a weights file's metadata.

    Raises:
        ConfigError: naming the key.
    """
    m = cfg.model
    require_positive("resolution", cfg.resolution)
    require_positive("xray_resolution", cfg.xray_resolution)
    width = require_positive("model.voxel_channels", m.voxel_channels)
    require_heads("model.voxel_channels", width, "model.vit_heads", m.vit_heads)
    require_positive("model.vit_depth", m.vit_depth, minimum=0)
    require_positive("model.patch_size", m.patch_size)
    require_positive("model.window_size", m.window_size)
    require_positive("model.max_full_tokens", m.max_full_tokens)
    require_sizes("model.encoder_channels", m.encoder_channels)
    require_positive("model.xray_tokens", m.xray_tokens)
    require_positive("model.depth_bands", m.depth_bands)
    finite_positive("model.mlp_ratio", m.mlp_ratio)
    require_positive("model.refine_channels", m.refine_channels, minimum=0)
    require_positive("model.lifting_profile", m.lifting_profile, minimum=0)
    if m.lifting_profile and not m.use_depth_lifting:
        raise ConfigError("model.lifting_profile is a depth-lifting head: it needs model.use_depth_lifting")
    decoder = require_sizes("model.decoder_channels", m.decoder_channels, allow_empty=True)
    if decoder and 2 ** len(decoder) != m.patch_size:
        raise ConfigError(
            f"model.decoder_channels needs one width per doubling from a token to its {m.patch_size}^3 voxels "
            f"(log2 of model.patch_size entries); got {len(decoder)}: {list(decoder)}"
        )
    if m.refine_xray and not (m.refine_channels or decoder):
        raise ConfigError(
            "model.refine_xray needs a refinement head or a decoder: set model.refine_channels above 0 or "
            "model.decoder_channels"
        )
    if m.patch_size > cfg.resolution:
        raise ConfigError(f"model.patch_size {m.patch_size} exceeds the stage resolution {cfg.resolution}")


def check_xray_generation(cfg: XrayStageConfig) -> None:
    """The sizes generation runs with: the radiograph side, DDIM steps, samples and field of view, within bounds
    (:data:`MAX_XRAY_RESOLUTION`, ...), so that a config or weights file cannot ask for terabytes or years.

    Raises:
        ConfigError: naming the key and its bound.
    """
    bounds = (("xray_resolution", cfg.xray_resolution, MAX_XRAY_RESOLUTION),
              ("diffusion.sampling_steps", cfg.diffusion.sampling_steps, MAX_SAMPLING_STEPS),
              ("diffusion.num_samples", cfg.diffusion.num_samples, MAX_NUM_SAMPLES))  # fmt: skip
    for key, value, most in bounds:
        if require_positive(key, value) > most:
            raise ConfigError(f"{key} must be at most {most}; got {value}")
    fov = finite_positive("data.fov_mm", cfg.data.fov_mm)
    if fov > MAX_FOV_MM:
        raise ConfigError(f"data.fov_mm must be at most {MAX_FOV_MM:g} mm; got {fov:g}")


def windowed_attention(cfg: XrayStageConfig) -> bool:
    """Whether self-attention over this stage's whole token grid uses windows (too many tokens to attend
    globally, and ``use_memory_efficient`` on). Patches of such a grid use the same windows."""
    m = cfg.model
    return bool(m.use_memory_efficient) and (cfg.resolution // m.patch_size) ** 3 > m.max_full_tokens


def patch_alignment(cfg: XrayStageConfig) -> int:
    """Voxels that patch sides and patch origins are multiples of: one token (``patch_size``), or one attention
    window (``patch_size * window_size``) where the grid's attention is windowed, so that a patch holds whole
    windows of the grid and computes them exactly as the whole-grid pass does."""
    m = cfg.model
    return m.patch_size * (m.window_size if windowed_attention(cfg) else 1)


#: The recipe of the shipped ``xray-default`` weights (stage 1): what ``train xray`` and the training panel use when
#: no config is named, and the one under which ``--init-from xray-default`` continues those weights.
DEFAULT_CONFIG = "stage1_default"

#: Configs shipped in ``configs/``, by name: the shipped weights' recipe, the three stages' GPU recipes, ``stage3_384``
#: (a 384^3 stage 3 trained on random 128^3 patches and generated in window-aligned 192^3 patches, 0.91 mm voxels over
#: 350 mm), and the CPU recipes of stages 1 (the one shipped before ``stage1_default``) and 2.
SHIPPED_CONFIGS = (DEFAULT_CONFIG, "stage1", "stage2", "stage3", "stage3_384", "stage1_cpu", "stage2_cpu")


def stages_geometry_problem(configs: list[XrayStageConfig]) -> str:
    """What makes a cascade's stage configs disagree on the radiograph they are conditioned on (``data.view``,
    ``data.fov_mm``: every stage sees the same radiograph of the same field of view), in words; "" when they agree."""
    first = configs[0]
    for cfg in configs[1:]:
        if cfg.data.view != first.data.view or abs(cfg.data.fov_mm - first.data.fov_mm) > 1e-3:
            return (f"stage {first.stage} is for {first.data.view} radiographs over a {first.data.fov_mm:g} mm field "
                    f"of view and stage {cfg.stage} for {cfg.data.view} ones over {cfg.data.fov_mm:g} mm; every stage "
                    "of a cascade sees the same radiograph, so data.view and data.fov_mm must be the same in all "
                    "stages")  # fmt: skip
    return ""


def load_stage_config(source: str | Path | dict | XrayStageConfig | None) -> XrayStageConfig:
    """A stage config from a file, a dict, a config, or a shipped name (:data:`SHIPPED_CONFIGS`)."""
    if isinstance(source, str) and source in SHIPPED_CONFIGS:
        source = CONFIG_DIR / f"{source}.json"
    return load_config(source, XrayStageConfig)


def tiny_stage_config(
    stage: int, resolution: int, xray_resolution: int = 32, refine_channels: int = 0
) -> XrayStageConfig:
    """A tiny configuration for tests and self-tests (seconds on CPU).

    Args:
        stage: cascade stage (1-3).
        resolution: cube side in voxels (a multiple of 4).
        xray_resolution: radiograph side in pixels (a multiple of 4, at least 16).
        refine_channels: width of the full-resolution refinement head (0 = none).
    """
    return load_config(
        {
            "stage": stage,
            "resolution": resolution,
            "xray_resolution": xray_resolution,
            "model": {
                "voxel_channels": 16,
                "vit_depth": 1,
                "vit_heads": 2,
                "patch_size": 4,
                "window_size": 4,
                "max_full_tokens": 256,
                "encoder_channels": [8, 16],
                "xray_tokens": 4,
                "mlp_ratio": 2.0,
                "refine_channels": refine_channels,
            },
            "training": {
                "batch_size": 2,
                "learning_rate": 2e-3,
                "warmup_steps": 0,
                "amp": False,
                "checkpoint_every": 2,
                "log_every": 1,
            },
            "loss_weights": {"drr_loss": [0.2, 0.3, 0.5][stage - 1]},
            "diffusion": {"sampling_steps": 2},
        },
        XrayStageConfig,
    )
