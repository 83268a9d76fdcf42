"""Lesson 08: latent diffusion: a small autoencoder squeezes each image into a latent 4x smaller
per side, and a diffusion model can then work on the latents instead of the pixels.
Exercises: kl_divergence, sample_posterior, measure_scale_factor.

This is the first stage of Stable Diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.1): a KL-regularised autoencoder, i.e. a
variational autoencoder (Kingma and Welling 2014) whose KL term has a tiny weight. With the
default config a (3, 32, 64) canvas becomes a (4, 8, 16) latent: 12x fewer numbers.

    encode(x)  -> Posterior(mean, logvar)      q(z | x) = N(mean, exp(logvar)), per latent element
    z = mean + exp(logvar / 2) * noise         the reparameterisation trick (Kingma and Welling, Eq. 10)
    decode(z)  -> reconstruction of x

    loss = MSE(decode(z), x) + kl_weight * KL(q(z | x) || N(0, I)) / (latent elements per image)

The KL weight is tiny (1e-6, as the paper's "KL-reg." autoencoders), so the latents are nearly
deterministic and their scale is whatever training made it. Before a diffusion model sees them
they are rescaled to unit standard deviation: z_scaled = scale_factor * z, with scale_factor =
1 / std(z) measured on training images once the autoencoder is trained (`measure_scale_factor`;
Stable Diffusion's 0.18215 was measured the same way) and stored in the config. `encode_latents`
and `decode_latents` apply it; `encode` and `decode` work on unscaled latents.

What Stable Diffusion adds and this lesson leaves out: a perceptual (LPIPS) loss and a
patch discriminator (sharper details), and attention in the middle of the encoder and decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import ConfigDict, group_norm

LOGVAR_RANGE = (-30.0, 20.0)   # the encoder's log-variance is clamped here (as Stable Diffusion does)


@dataclass(frozen=True)
class AutoencoderConfig(ConfigDict):
    in_channels: int = 3                 # image channels (3: RGB canvases)
    latent_channels: int = 4             # channels of the latent (Stable Diffusion: 4)
    base_channels: int = 32              # channels at full resolution
    channel_mults: tuple = (1, 2, 2)     # channels per level = base_channels * mult; each level after the first halves H, W
    kl_weight: float = 1e-6              # weight of the KL term per latent element (tiny: nearly a plain autoencoder)
    scale_factor: float = 1.0            # z_scaled = scale_factor * z; measured after training (measure_scale_factor)

    def __post_init__(self):
        for name in ("in_channels", "latent_channels", "base_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}.")
        if not self.channel_mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                         for m in self.channel_mults):
            raise ValueError(f"channel_mults must be a non-empty list of whole numbers >= 1, got {self.channel_mults!r}.")
        if not _is_number(self.kl_weight) or self.kl_weight < 0:
            raise ValueError(f"kl_weight must be a finite number >= 0 (1e-6 is usual), got {self.kl_weight!r}.")
        if not _is_number(self.scale_factor) or self.scale_factor <= 0:
            raise ValueError(f"scale_factor must be a finite number > 0 (1 / std of the latents), "
                             f"got {self.scale_factor!r}.")

    @property
    def downsampling(self) -> int:
        """How many times smaller the latent is per side: 2 ** (len(channel_mults) - 1)."""
        return 2 ** (len(self.channel_mults) - 1)



def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Posterior(NamedTuple):
    mean: Tensor     # (B, latent_channels, H / f, W / f): the mean of q(z | x)
    logvar: Tensor   # same shape: its log-variance, clamped to LOGVAR_RANGE


# ----------------------------------------------------------------------------------------------
# The maths: sampling the posterior, its KL divergence, the loss


def sample_posterior(posterior: Posterior, *, noise: Tensor | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """z ~ q(z | x) by the reparameterisation trick: z = mean + exp(logvar / 2) * noise
    (Kingma and Welling 2014, Eq. 10), so gradients flow into mean and logvar.

    Args:
        noise: standard normal, the shape of posterior.mean; drawn from `generator` when None.
    Returns:
        Latents z, the shape of posterior.mean (unscaled).
    """
    mean, logvar = posterior
    if noise is None:
        noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise must have the latents' shape {tuple(mean.shape)}, got {tuple(noise.shape)}.")
    return mean + torch.exp(0.5 * logvar) * noise


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) in closed form (Kingma and Welling 2014, App. B),
    summed over all latent elements of each image:

        KL = 1/2 * sum(mean^2 + exp(logvar) - 1 - logvar)

    Args:
        mean, logvar: (B, ...) the posterior's parameters.
    Returns:
        (B,) the KL of each image in nats (a sum, not a mean; autoencoder_loss divides by the
        number of latent elements per image).
    """
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must have the same shape, got {tuple(mean.shape)} and {tuple(logvar.shape)}.")
    per_element = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return per_element.flatten(1).sum(1)


def autoencoder_loss(model: "Autoencoder", x0: Tensor, *, cond: Tensor | None = None, kl_weight: float | None = None,
                     noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The training loss: MSE between x0 and the decoding of a posterior sample, plus kl_weight
    times the KL per latent element (the loss function `runs.train` takes).

    Args:
        x0: (B, C, H, W) images in [-1, 1].
        cond: must be None (an autoencoder takes no condition; runs.train passes None without labels).
        kl_weight: the KL term's weight; model.config.kl_weight when None.
        noise: standard normal of the latents' shape for the posterior sample; drawn from
            `generator` when None.
    Returns:
        Scalar tensor: mean squared error per pixel + kl_weight * mean KL per latent element.
    """
    if cond is not None:
        raise ValueError("An autoencoder takes no condition: train it without labels (cond=None).")
    if not isinstance(model, Autoencoder):
        raise ValueError(f"autoencoder_loss needs an Autoencoder, got {type(model).__name__} "
                         "(a DistributedDataParallel wrapper is not supported: train on one process).")
    kl_weight = model.config.kl_weight if kl_weight is None else kl_weight
    if not _is_number(kl_weight) or kl_weight < 0:
        raise ValueError(f"kl_weight must be a finite number >= 0 (1e-6 is usual), got {kl_weight!r}.")
    posterior = model.encode(x0)
    z = sample_posterior(posterior, noise=noise, generator=generator)
    reconstruction = model.decode(z)
    mse = F.mse_loss(reconstruction.float(), x0.float())
    kl_per_element = kl_divergence(posterior.mean.float(), posterior.logvar.float()) / posterior.mean[0].numel()
    return mse + kl_weight * kl_per_element.mean()


# ----------------------------------------------------------------------------------------------
# The network


class Block(nn.Module):
    """Lesson 02's residual block without the time embedding: two 3x3 convolutions with GroupNorm
    and SiLU, and a skip connection around both (a 1x1 convolution when the channels change)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """Image -> 2 * latent_channels maps (mean and log-variance). Per level a Block, then a stride-2
    convolution to the next level's channels (not after the last level)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels = [config.base_channels * m for m in config.channel_mults]
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        layers = []
        for level, ch in enumerate(channels):
            layers.append(Block(ch, ch))
            if level < len(channels) - 1:
                layers.append(nn.Conv2d(ch, channels[level + 1], 3, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)
        self.norm_out = group_norm(channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image, the encoder's mirror: per level (deepest first) a Block, then a 2x nearest
    upsampling and a convolution to the next level's channels (not after the full-size level)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels = [config.base_channels * m for m in config.channel_mults]
        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], 3, padding=1)
        layers = []
        for level in reversed(range(len(channels))):
            layers.append(Block(channels[level], channels[level]))
            if level > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(channels[level], channels[level - 1], 3, padding=1)]
        self.layers = nn.Sequential(*layers)
        self.norm_out = group_norm(channels[0])
        self.conv_out = nn.Conv2d(channels[0], config.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.layers(self.conv_in(z))
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """A KL-regularised autoencoder (Rombach et al. 2022, Sec. 3.1): encode(x) -> Posterior,
    decode(z) -> image; forward(x) reconstructs x through the posterior mean."""

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: Tensor) -> Posterior:
        """(B, C, H, W) images in [-1, 1] (H, W divisible by config.downsampling) -> Posterior of
        (B, latent_channels, H / f, W / f) unscaled latents, f = config.downsampling."""
        self._check_input(x, "x", self.config.in_channels, self.config.downsampling)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(*LOGVAR_RANGE))

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_channels, h, w) unscaled latents -> (B, C, h * f, w * f) images (about [-1, 1], not clamped)."""
        self._check_input(z, "z", self.config.latent_channels, 1)
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of x through the posterior mean (no sampling), not clamped."""
        return self.decode(self.encode(x).mean)

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Images -> the latents a diffusion model sees: scale_factor * the posterior mean (or,
        with sample=True, scale_factor * a posterior sample drawn from `generator`)."""
        posterior = self.encode(x)
        z = sample_posterior(posterior, generator=generator) if sample else posterior.mean
        return self.config.scale_factor * z

    def decode_latents(self, z_scaled: Tensor) -> Tensor:
        """Scaled latents (from encode_latents or a latent diffusion sampler) -> images clamped to [-1, 1]."""
        return self.decode(z_scaled / self.config.scale_factor).clamp(-1.0, 1.0)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The (latent_channels, H / f, W / f) latent of a (C, H, W) image."""
        _, height, width = image_shape
        f = self.config.downsampling
        return (self.config.latent_channels, height // f, width // f)

    def _check_input(self, x: Tensor, name: str, channels: int, factor: int) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != channels or x.shape[2] % factor or x.shape[3] % factor:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            sides = f" with H and W divisible by {factor}" if factor > 1 else ""
            raise ValueError(f"{name} must have shape (B, {channels}, H, W){sides}, got {got}.")
        weight_dtype = self.encoder.conv_in.weight.dtype
        if x.dtype != weight_dtype:
            raise ValueError(f"{name} must be {weight_dtype} like the model's weights, got {x.dtype}"
                             + (" (scale pixels with data.to_model_range)." if not x.is_floating_point() else "."))


# ----------------------------------------------------------------------------------------------
# After training: the scale of the latents


@torch.no_grad()
def measure_scale_factor(model: Autoencoder, images: Tensor, batch_size: int = 256) -> float:
    """1 / (standard deviation of the posterior-mean latents of `images`), over all their elements
    (Rombach et al. 2022, Sec. 4.3.2 and App. G): multiplying the latents by it gives them unit
    variance, the scale a diffusion model's noise schedule expects.

    Args:
        images: (N, C, H, W) training images in [-1, 1] (a few thousand are plenty).
        batch_size: images encoded at a time.
    Returns:
        The scale factor (a float); store it with `with_scale_factor`.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got {got}.")
    was_training = model.training
    model.eval()
    means = [model.encode(batch).mean.double() for batch in images.split(batch_size)]
    model.train(was_training)
    std = torch.cat(means).std().item()
    if not std > 0 or not math.isfinite(std):
        raise ValueError(f"The latents' standard deviation is {std}: the scale factor is undefined "
                         "(are all images the same, or is the model untrained and constant?).")
    return 1.0 / std


def with_scale_factor(model: Autoencoder, value: float) -> Autoencoder:
    """The same model (changed in place and returned) with config.scale_factor = value."""
    if not _is_number(value) or value <= 0:
        raise ValueError(f"The scale factor must be a finite number > 0, got {value!r}.")
    model.config = replace(model.config, scale_factor=float(value))
    return model
