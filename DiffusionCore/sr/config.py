"""SR configuration: one dataclass tree with a default and a sentence of help for every field.

Load from JSON/YAML with ``DiffusionCore.config.load_config(path, SRConfig)``; print the documented
fields with ``config_help(SRConfig)``. The same tree is stored in checkpoints and in exported weights,
so a weights file rebuilds its own networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: What inference returns: the posterior mean (one evaluation) or a posterior sample (the reverse chain).
MEAN, SAMPLE = "mean", "sample"
ESTIMATES = (MEAN, SAMPLE)


def _f(default, help: str):  # noqa: A002 - "help" reads best in the field definitions
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class VAEConfig:
    """3D KL autoencoder (HU window -> latent)."""

    channels: tuple[int, ...] = _f(
        (32, 64, 96), "Feature channels per resolution level (full resolution first)."
    )
    latent_channels: int = _f(4, "Channels of the latent (mean and log-variance each).")
    num_res_blocks: int = _f(1, "Residual blocks per level in encoder and decoder.")
    downsample: tuple[tuple[int, int, int], ...] = _f(
        ((1, 2, 2), (1, 2, 2)),
        "Stride (z, y, x) between consecutive levels; in-plane only keeps the through-plane detail that SR "
        "must produce (latent is (D, H/4, W/4) by default).",
    )
    mid_attention: bool = _f(False, "Self-attention in the VAE middle block (about 3x slower on CPU).")
    shortcut: bool = _f(
        True,
        "Space-to-channel shortcut around the encoder and decoder (residual autoencoding, as in DC-AE): the "
        "latent starts as the patch's voxels folded into channels (block means when there are fewer latent "
        "channels than voxels per block) and the networks learn what to add. With as many latent channels "
        "as voxels per block the fresh VAE is exact.",
    )


@dataclass
class UNetConfig:
    """Latent denoiser: 3D UNet plus IRControlNet."""

    model_channels: int = _f(64, "Base channel count of the latent UNet (and of its ControlNet copy).")
    channel_mult: tuple[int, ...] = _f((1, 2, 2), "Channel multiplier per UNet level.")
    num_res_blocks: int = _f(1, "Residual blocks per UNet level.")
    downsample: tuple[tuple[int, int, int], ...] = _f(
        ((2, 2, 2), (2, 2, 2)), "Stride (z, y, x) between consecutive UNet levels (one entry per level - 1)."
    )
    attention_levels: tuple[bool, ...] = _f(
        (False, False, True),
        "Self-attention after the res blocks of each level (use only at low resolution).",
    )
    num_heads: int = _f(4, "Attention heads.")
    attention_window: tuple[int, int, int] | None = _f(
        (8, 8, 8),
        "Attention window (z, y, x) in voxels of the attention level; null = global. Keeps inference tiles "
        "at the context size the network was trained with and the cost linear in the tile size.",
    )
    dropout: float = _f(0.0, "Dropout in the UNet residual blocks.")
    use_controlnet: bool = _f(True, "Condition through an IRControlNet fed the low-resolution latent.")
    concat_condition: bool = _f(
        True,
        "Also feed the condition latent y to the UNet's input beside x_t (as ResShift does), so the base "
        "network can regress the residual from y from the first step instead of waiting for the "
        "zero-initialised ControlNet; dropped with the condition (guidance).",
    )
    cond_dropout: float = _f(0.1, "Probability of dropping the condition in training (enables guidance).")
    gradient_checkpointing: bool = _f(
        False, "Recompute UNet activations in the backward pass to save memory."
    )


@dataclass
class DiffusionConfig:
    """Diffusion process in latent space."""

    predict_residual: bool = _f(
        True,
        "ResShift (residual shifting from the low-resolution latent, x0 prediction); false: DDIM with eps.",
    )
    num_train_timesteps: int = _f(
        15, "Diffusion steps T of the training process (ResShift 15; DDIM e.g. 1000)."
    )
    estimate: str = _f(
        "mean",
        "What inference returns. 'mean': the posterior-mean estimate E[x0 | y], the x0 prediction at the last "
        "step from x_T = y (one network evaluation per patch; the smallest squared error, no invented "
        "texture). 'sample': a draw from the posterior through num_inference_steps reverse steps (plausible "
        "fine texture, more squared error than the mean: up to twice). DDIM (predict_residual false) samples.",
    )
    num_inference_steps: int = _f(
        15, "Sampling steps for estimate 'sample' (ResShift: T or fewer; DDIM: e.g. 50)."
    )
    kappa: float = _f(2.0, "ResShift noise scale kappa.")
    power: float = _f(0.3, "ResShift schedule exponent p.")
    eta_1: float = _f(0.0004, "ResShift first shift eta_1 (paper: min((0.04/kappa)^2, 0.001)).")
    eta_T: float = _f(0.99, "ResShift last shift eta_T.")
    guidance_scale: float = _f(1.0, "Default classifier-free guidance scale at sampling (1.0 = off).")
    decode_residual: bool = _f(
        True,
        "Output = cubic input + decode(x0) - decode(y): the VAE's errors on input and output cancel, so the "
        "result is not capped by the VAE's reconstruction quality.",
    )
    latent_scale: float = _f(
        1.0, "Latents are multiplied by this before diffusion (set from data in training)."
    )
    residual_std: float = _f(
        1.0,
        "Typical std of the latent residual x0 - y (scaled latent units; set from data in training). "
        "ResShift's noise is kappa x residual_std and the network predicts the residual in these units, "
        "so kappa keeps its meaning however small the thick/thin difference is in the latent.",
    )


@dataclass
class TrainConfig:
    """Training loop (both `train vae` and `train sr`)."""

    data: list[str] = _f([], "Training volumes: folders, files or list files (one path per line).")
    val_data: list[str] = _f(
        [], "Held-out volumes for validation; empty: hold out a z-range of each training volume."
    )
    val_fraction: float = _f(0.2, "Fraction of slices (the top z-range) held out when val_data is empty.")
    latent_dir: str = _f("", "Folder of precomputed latents from prepare-latents (sr training only).")
    epochs: int = _f(20, "Passes over the training samples.")
    steps_per_epoch: int = _f(200, "Optimizer steps per epoch (patches are sampled at random).")
    max_steps: int = _f(0, "Stop after this many optimizer steps in total (0: no limit).")
    batch_size: int = _f(2, "Patches per step and per process.")
    learning_rate: float = _f(1e-4, "AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(100, "Linear learning-rate warm-up steps.")
    grad_clip: float = _f(1.0, "Gradient norm clip (0: off).")
    ema_decay: float = _f(
        0.999,
        "Decay of the exponential moving average of the trained weights (0: off). Validation scores the "
        "average, the best checkpoint is chosen by it, and export writes it.",
    )
    patch_size: tuple[int, int, int] = _f(
        (32, 128, 128), "Training patch (D, H, W) on the thin grid, voxels."
    )
    kl_weight: float = _f(1e-6, "KL weight of the VAE loss.")
    gradient_loss_weight: float = _f(0.1, "Weight of the VAE's image-gradient L1 loss (sharper edges).")
    factors: tuple[int, ...] = _f((2, 3, 4), "Thick/thin factors simulated in SR training.")
    degradation: str = _f("slab", "Thick-slice simulation: 'slab' (slab average) or 'decimate'.")
    inplane_probability: float = _f(
        0.5,
        "Probability of using an in-plane axis as the thick axis (self-supervision from sharper in-plane).",
    )
    affine_probability: float = _f(0.2, "Probability of a small random rotation/zoom of a training patch.")
    stage: str = _f(
        "joint", "SR stage: 'base' (UNet only), 'control' (freeze UNet, train ControlNet), 'joint'."
    )
    init_from: str = _f("", "SR checkpoint folder or exported file to start from (e.g. the base stage).")
    vae_weights: str = _f(
        "", "VAE weights (exported safetensors or a `train vae` output folder) for SR training."
    )
    pixel_loss_weight: float = _f(
        0.0,
        "Weight of an L1 loss on the decoded output (cubic input + decode(x0_hat) - decode(y)) against the thin "
        "patch, in model units, added to the latent loss: trains the network on what the user sees.",
    )
    finetune_decoder: bool = _f(
        False,
        "Also train the VAE decoder in SR training (with pixel_loss_weight > 0) so it renders the through-plane "
        "detail the latent model adds; the encoder stays frozen.",
    )
    use_amp: bool = _f(False, "bf16 autocast (GPU only; ignored on CPU where it is slower).")
    channels_last: bool = _f(False, "Use channels_last_3d memory format.")
    augment: bool = _f(True, "Random flips, small rotations/scaling, HU jitter on training patches.")
    val_every: int = _f(200, "Validate every N optimizer steps (and at the end of training).")
    val_patches: int = _f(8, "Held-out patches used for validation.")
    val_steps: int = _f(
        0,
        "Sampling steps at validation when diffusion.estimate is 'sample' (0: num_inference_steps); "
        "validation scores the weights' estimate.",
    )
    checkpoint_every: int = _f(200, "Write a resumable checkpoint every N steps.")
    keep_checkpoints: int = _f(3, "Checkpoints kept (plus the best).")
    log_every: int = _f(10, "Log the training loss every N steps.")
    seed: int = _f(0, "Random seed.")
    device: str = _f("auto", "auto, cpu or cuda.")


@dataclass
class SRConfig:
    """Everything that defines an SR model and its training."""

    vae: VAEConfig = field(default_factory=VAEConfig, metadata={"help": "The 3D autoencoder."})
    unet: UNetConfig = field(default_factory=UNetConfig, metadata={"help": "The latent UNet and ControlNet."})
    diffusion: DiffusionConfig = field(
        default_factory=DiffusionConfig, metadata={"help": "The diffusion process."}
    )
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Training options."})


def tiny_config() -> SRConfig:
    """A tiny configuration for tests and self-tests (runs in well under a second per 16x32x32 patch)."""
    cfg = SRConfig()
    cfg.vae.channels = (8, 8, 16)
    cfg.unet.model_channels = 16
    cfg.unet.channel_mult = (1, 2, 2)
    cfg.unet.num_heads = 2
    cfg.diffusion.num_inference_steps = 4
    cfg.diffusion.num_train_timesteps = 4
    cfg.train.patch_size = (16, 32, 32)
    return cfg
