"""Lesson 01: noise schedules and the forward (noising) process of DDPM.
Exercises: q_sample, cosine alpha_bar.

Names used here, the symbol in the papers, and the name in Hugging Face diffusers:

    ours                     paper                                diffusers
    ----------------------   ----------------------------------   -------------------
    beta                     beta_t                               betas
    alpha                    alpha_t = 1 - beta_t                 alphas
    alpha_bar                bar{alpha}_t = prod alpha            alphas_cumprod
    num_steps                T (training steps)                   num_train_timesteps
    sampling_steps           model calls when sampling            num_inference_steps
    signal_scale (sampling)  DPM-Solver/k-diffusion alpha_t       sqrt(alphas_cumprod)
                             = sqrt(alpha_bar_t)
    noise_scale (sampling)   DPM-Solver sigma_t                   sqrt(1 - alphas_cumprod)
                             = sqrt(1 - alpha_bar_t)

Timesteps `t` are zero-based: an int64 tensor of shape (B,) with values in [0, T).
Step t = 0 is the first (least noisy) step, t = T - 1 the last (almost pure noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class NoiseSchedule:
    """The variances of the forward process, one entry per step (shape (T,), float32)."""

    beta: Tensor       # variance of the noise added at each step, in (0, 1)
    alpha: Tensor      # 1 - beta: the fraction of the signal's variance kept by each step
    alpha_bar: Tensor  # cumulative product of alpha: the signal's variance left after step t
    name: str = "custom"  # "linear", "cosine" or "scaled_linear"; recorded in checkpoints
    options: tuple = ()   # the named schedule's other arguments, as (key, value) pairs

    @property
    def num_steps(self) -> int:
        """T, the number of forward steps."""
        return self.beta.shape[0]

    def to_config(self) -> dict:
        """A small dict that `schedule_from_config` turns back into this schedule."""
        if self.name not in SCHEDULES:
            raise ValueError(f"Only named schedules can be saved, got name={self.name!r}.")
        return {"name": self.name, "num_steps": self.num_steps, **dict(self.options)}


def schedule_from_beta(beta: Tensor, name: str = "custom", options: tuple = ()) -> NoiseSchedule:
    """Build a NoiseSchedule from its betas (Ho et al. 2020, Sec. 2)."""
    beta = beta.to(torch.float64)
    if beta.ndim != 1 or not bool(((beta > 0) & (beta < 1)).all()):
        raise ValueError("beta must be a 1-D tensor with every value strictly between 0 and 1.")
    alpha = 1.0 - beta
    alpha_bar = torch.cumprod(alpha, dim=0)
    return NoiseSchedule(beta.float(), alpha.float(), alpha_bar.float(), name, options)


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> NoiseSchedule:
    """DDPM's schedule: beta grows linearly from beta_start to beta_end (Ho et al. 2020)."""
    _check_num_steps(num_steps)
    # Scaled so that the total amount of noise matches DDPM's 1000-step schedule.
    scale = 1000 / num_steps
    if beta_end * scale >= 1:
        raise ValueError(f"With num_steps={num_steps}, beta_end={beta_end} scales to {beta_end * scale:.3g} "
                         "(>= 1): use more steps or a smaller beta_end.")
    beta = torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)
    return schedule_from_beta(beta, "linear", (("beta_start", beta_start), ("beta_end", beta_end)))


def cosine_schedule(num_steps: int = 1000, s: float = 0.008) -> NoiseSchedule:
    """alpha_bar follows a squared cosine (Nichol and Dhariwal 2021, Eq. 17).

    Betas are clipped to at most 0.999 so the last step stays well defined.
    """
    _check_num_steps(num_steps)
    steps = torch.arange(num_steps + 1, dtype=torch.float64)
    f = torch.cos((steps / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    beta = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    return schedule_from_beta(beta, "cosine", (("s", s),))


def scaled_linear_schedule(num_steps: int = 1000, beta_start: float = 0.00085,
                           beta_end: float = 0.012) -> NoiseSchedule:
    """Stable Diffusion's schedule (Rombach et al. 2022; diffusers' "scaled_linear"): sqrt(beta)
    grows linearly. It stops early: alpha_bar_{T-1} is about 0.0047, not about 0 as with the cosine
    schedule, so a sampler's first x0 guess divides the noise error by sqrt(alpha_bar) ~ 0.07
    instead of ~5e-5. Latents cannot be clipped to a known range as pixels can, so a latent model
    needs that (lesson 08)."""
    _check_num_steps(num_steps)
    scale = 1000 / num_steps
    beta = torch.linspace(math.sqrt(beta_start * scale), math.sqrt(beta_end * scale), num_steps,
                          dtype=torch.float64) ** 2
    return schedule_from_beta(beta, "scaled_linear", (("beta_start", beta_start), ("beta_end", beta_end)))


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule, "scaled_linear": scaled_linear_schedule}


def schedule_from_config(config: dict) -> NoiseSchedule:
    """Inverse of `NoiseSchedule.to_config`."""
    name = config.get("name")
    if name not in SCHEDULES:
        raise ValueError(f"Unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}.")
    options = {key: value for key, value in config.items() if key != "name"}
    try:
        return SCHEDULES[name](**options)
    except TypeError:
        raise ValueError(f"Unknown options for the {name} schedule: {sorted(options)}.") from None


def check_timesteps(t: Tensor, schedule: NoiseSchedule, batch_size: int | None = None) -> None:
    """Raise a clear error unless t is an int64 tensor of shape (B,) with values in [0, T)."""
    if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.ndim != 1:
        got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"t must be an int64 tensor of shape (B,), got {got}. "
                         "Try torch.full((B,), step, dtype=torch.long).")
    if batch_size is not None and t.shape[0] != batch_size:
        raise ValueError(f"t has {t.shape[0]} entries but the batch has {batch_size} images.")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= schedule.num_steps):
        raise ValueError(f"t must lie in [0, {schedule.num_steps}) for this {schedule.num_steps}-step "
                         f"schedule, got values from {int(t.min())} to {int(t.max())}.")


def gather(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """values[t] reshaped to (B, 1, 1, 1) so it broadcasts against images x of shape (B, C, H, W)."""
    out = values.to(x.device)[t]
    return out.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def alpha_bar_prev(schedule: NoiseSchedule, t_prev: Tensor, x: Tensor) -> Tensor:
    """alpha_bar at the step jumped to, per image: 1 where t_prev = -1 ("clean"), shaped like gather."""
    padded = torch.cat([torch.ones(1, dtype=schedule.alpha_bar.dtype), schedule.alpha_bar])   # index 0 is t = -1
    return gather(padded, t_prev + 1, x)


def q_sample(x0: Tensor, t: Tensor, schedule: NoiseSchedule,
             noise: Tensor | None = None) -> Tensor:
    """Sample x_t ~ q(x_t | x_0) in closed form (DDPM, Eq. 4).

        x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise

    Args:
        x0: (B, C, H, W) clean images in [-1, 1].
        t: (B,) int64 timesteps in [0, T).
        noise: optional (B, C, H, W) standard normal noise; drawn with randn_like when None.
    Returns:
        (B, C, H, W) noisy images.
    """
    check_timesteps(t, schedule, x0.shape[0])
    if noise is None:
        noise = torch.randn_like(x0)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}.")
    alpha_bar_t = gather(schedule.alpha_bar, t, x0)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise


def snr(schedule: NoiseSchedule) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at every step, shape (T,)."""
    return schedule.alpha_bar / (1 - schedule.alpha_bar)


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer of at least 2, got {num_steps!r}.")
