"""Lesson 06: editing real images with a trained model: image-to-image (SDEdit), inpainting,
outpainting. Exercises: img2img_start, inpaint_step.

All three reuse the samplers of sampling.py unchanged, with any model (guided or not):

- img2img (Meng et al. 2022, SDEdit): noise the image part of the way (to a timestep set by
  `strength`), then run the reverse process from there. Strength 0 returns the image, strength
  1 starts from pure noise and ignores it. The sampler visits a grid that starts at that timestep.
- inpaint (the "replacement" method, Lugmayr et al. 2022 without resampling): after every
  reverse step, overwrite the known pixels with the original noised to the same timestep, so
  the model only invents the masked region, in keeping with what is around it.
- outpaint: inpainting on a larger canvas whose new border is the masked region.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import sampling
from .schedules import NoiseSchedule, q_sample


class StartPoint(NamedTuple):
    x_t: Tensor    # (B, C, H, W) the noised image to start the reverse process from
    t_start: int   # its timestep, in [0, T)


def img2img_start(x0: Tensor, strength: float, schedule: NoiseSchedule, noise: Tensor | None = None) -> StartPoint:
    """SDEdit's starting point: x0 noised to the timestep t_start = ceil(strength * T) - 1.

    strength 1 gives t_start = T - 1 and returns the noise itself (the input is ignored entirely);
    a small strength gives a small t_start, so little of x0 is lost.

    Args:
        x0: (B, C, H, W) images in [-1, 1].
        strength: in (0, 1]; how far towards pure noise to go (1: all the way).
        noise: (B, C, H, W) standard normal; drawn with randn_like when None.
    Returns:
        StartPoint(x_t, t_start): (B, C, H, W) noisy images and their timestep, an int in [0, T).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1] here (0 means 'no edit'), got {strength}.")
    if noise is None:
        noise = torch.randn_like(x0)
    t_start = max(0, math.ceil(strength * schedule.num_steps) - 1)
    if strength == 1.0:
        return StartPoint(noise, t_start)       # pure noise: the input is ignored entirely
    t = torch.full((x0.shape[0],), t_start, dtype=torch.long, device=x0.device)
    return StartPoint(q_sample(x0, t, schedule, noise), t_start)


def img2img(model, x0: Tensor, schedule: NoiseSchedule, *, strength: float = 0.6, sampler: str = "ddim",
            sampling_steps: int | None = 50, cond: Tensor | None = None,
            generator: torch.Generator | None = None, clip_x0: float | None = 1.0) -> Tensor:
    """Image-to-image: keep the rough layout of x0, redraw the details (SDEdit).

    sampling_steps counts model calls for the whole 0..T range (None: the sampler's default); a
    strength of 0.5 takes about half of them (DDPM takes every step from t_start down).
    Returns (B, C, H, W) in about [-clip_x0, clip_x0].
    """
    check_images(x0)
    _check_strength(strength)
    if strength == 0:
        return x0.clone()
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    start = img2img_start(x0, strength, schedule, noise)
    timesteps = sampling.timestep_grid(sampler, schedule, _steps_for(sampler, sampling_steps, strength, start.t_start),
                                       start.t_start)
    return sampling.SAMPLERS[sampler](model, start.x_t, schedule, timesteps, cond=cond, generator=generator,
                                      clip_x0=clip_x0)


def inpaint_step(x_t: Tensor, t: Tensor, x_known: Tensor, mask: Tensor, schedule: NoiseSchedule,
                 noise: Tensor | None = None) -> Tensor:
    """Keep the generated pixels inside the mask and put back the known ones outside it.

        x_t <- mask * x_t + (1 - mask) * q_sample(x_known, t)

    Args:
        x_t: (B, C, H, W) the sample after a reverse step, at timestep t.
        t: (B,) int64 in [-1, T); rows with t = -1 (clean) get the known pixels exactly.
        mask: (B or 1, 1 or C, H, W), 1 where pixels are to be generated, 0 where they are known.
    """
    if not isinstance(t, Tensor) or t.shape != (x_t.shape[0],):
        raise ValueError(f"t must be a (B,) int64 tensor (B = {x_t.shape[0]}), -1 meaning clean, got {t!r}.")
    clean = (t < 0).view(-1, *([1] * (x_t.ndim - 1)))
    known_t = torch.where(clean, x_known, q_sample(x_known, t.clamp(min=0), schedule, noise))
    return mask * x_t + (1 - mask) * known_t


def inpaint(model, x0: Tensor, mask: Tensor, schedule: NoiseSchedule, *, sampler: str = "ddim",
            sampling_steps: int | None = 50, cond: Tensor | None = None,
            generator: torch.Generator | None = None, clip_x0: float | None = 1.0) -> Tensor:
    """Regenerate the masked region of the images x0 (1 in `mask`) and keep the rest.

    Args:
        x0: (B, C, H, W) in [-1, 1]; its pixels under the mask are ignored.
        mask: (B or 1, 1 or C, H, W) with values in {0, 1}; 1 = generate.
    Returns:
        (B, C, H, W); equal to x0 outside the mask.
    """
    check_images(x0)
    mask = _check_mask(mask, x0)

    def keep_known(step: sampling.SamplerStep) -> Tensor:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t_prev = torch.full((x0.shape[0],), step.t_prev, dtype=torch.long, device=x0.device)
        return inpaint_step(step.x_prev, t_prev, x0, mask, schedule, noise)

    x_T = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    timesteps = sampling.timestep_grid(sampler, schedule, _steps_for(sampler, sampling_steps, 1.0, schedule.num_steps - 1))
    return sampling.SAMPLERS[sampler](model, x_T, schedule, timesteps, cond=cond, generator=generator,
                                      callback=keep_known, clip_x0=clip_x0)


def outpaint(model, x0: Tensor, schedule: NoiseSchedule, *, left: int = 0, right: int = 0, top: int = 0,
             bottom: int = 0, fill: float = -1.0, **inpaint_kwargs) -> Tensor:
    """Extend the canvas by the given number of pixels on each side and fill the new border.

    The new border starts as `fill` (-1 is black for images in [-1, 1], 0 suits latents); inpainting
    ignores the pixels under its mask, so the value never reaches the output. The network is convolutional, so it runs
    on the larger canvas; its sides must divide by the U-Net's downsampling factor (4 for the
    course model). Returns the larger images, (B, C, top + H + bottom, left + W + right).
    """
    check_images(x0)
    pads = {"left": left, "right": right, "top": top, "bottom": bottom}
    bad = {name: value for name, value in pads.items() if isinstance(value, bool) or not isinstance(value, int)
           or value < 0}
    if bad:
        raise ValueError(f"outpaint needs whole, non-negative numbers of pixels per side, got {bad}.")
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not math.isfinite(fill):
        raise ValueError(f"fill must be a finite number (the value of the new pixels), got {fill!r}.")
    canvas = F.pad(x0, (left, right, top, bottom), value=float(fill))
    mask = F.pad(torch.zeros_like(x0[:1, :1]), (left, right, top, bottom), value=1.0)
    return inpaint(model, canvas, mask, schedule, **inpaint_kwargs)


MASKS = ("left", "right", "top", "bottom", "center")


def make_mask(name: str, size: int) -> Tensor:
    """A (1, 1, size, size) mask, 1 in the region to regenerate: a half, the centre, or a border."""
    if name not in MASKS:
        raise ValueError(f"Unknown mask {name!r}; expected one of {list(MASKS)}.")
    mask = torch.zeros(1, 1, size, size)
    half, quarter = size // 2, size // 4
    regions = {"left": (slice(None), slice(0, half)), "right": (slice(None), slice(half, None)),
               "top": (slice(0, half), slice(None)), "bottom": (slice(half, None), slice(None)),
               "center": (slice(quarter, size - quarter), slice(quarter, size - quarter))}
    mask[0, 0][regions[name]] = 1
    return mask


def slerp(noise_a: Tensor, noise_b: Tensor, weight: float) -> Tensor:
    """Spherical interpolation between two noise tensors (weight 0: noise_a, 1: noise_b).

    Gaussian noise in many dimensions lies near a sphere of radius sqrt(numel); a straight line
    between two draws cuts inside it (at weight 0.5 the norm shrinks by about 1/sqrt(2)), where the
    model has never seen its inputs. Slerp follows the sphere instead (Shoemake 1985), per image:

        slerp = sin((1 - weight) theta) / sin(theta) * a + sin(weight theta) / sin(theta) * b
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number (0: noise_a, 1: noise_b), got {weight!r}.")
    if noise_a.shape != noise_b.shape:
        raise ValueError(f"the two noises must have the same shape, got {tuple(noise_a.shape)} "
                         f"and {tuple(noise_b.shape)}.")
    a, b = noise_a.flatten(1), noise_b.flatten(1)
    cos = (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))
    theta = torch.arccos(cos.clamp(-1, 1))
    line = (1 - weight) * a + weight * b
    parallel = theta.abs() < 1e-4              # (nearly) the same direction: a straight line is as good
    safe_theta = torch.where(parallel, torch.ones_like(theta), theta)      # no division by sin(0)
    arc = (torch.sin((1 - weight) * safe_theta) * a + torch.sin(weight * safe_theta) * b) / torch.sin(safe_theta)
    return torch.where(parallel, line, arc).view_as(noise_a)


def _steps_for(sampler: str, sampling_steps: int | None, strength: float, t_start: int) -> int | None:
    """The model calls an edit at `strength` takes: that share of sampling_steps, at least 1.
    DDPM takes every step from t_start down, whatever sampling_steps says (None)."""
    if sampler == "ddpm":
        return None
    if sampling_steps is None:
        sampling_steps = sampling.DEFAULT_SAMPLING_STEPS[sampler]
    if isinstance(sampling_steps, bool) or not isinstance(sampling_steps, int) or sampling_steps < 1:
        raise ValueError(f"sampling_steps must be a whole number of at least 1 (or None), got {sampling_steps!r}.")
    return max(1, min(t_start + 1, round(sampling_steps * strength)))


def _check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (0 keeps the image, 1 ignores it), got {strength!r}.")


def check_images(images: Tensor) -> None:
    """Raise a clear error unless `images` is a float (B, C, H, W) tensor."""
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float (B, C, H, W) tensor in [-1, 1], got {got}.")


def _check_mask(mask: Tensor, image: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor of 0s and 1s, got a {type(mask).__name__}.")
    mask = mask.to(image.device, image.dtype)
    if mask.ndim != 4 or mask.shape[-2:] != image.shape[-2:] or mask.shape[0] not in (1, image.shape[0]) \
            or mask.shape[1] not in (1, image.shape[1]):
        raise ValueError(f"mask must have shape (1 or {image.shape[0]}, 1 or {image.shape[1]}, "
                         f"{image.shape[2]}, {image.shape[3]}) to match the image, got {tuple(mask.shape)}.")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 (keep) and 1 (generate).")
    return mask
