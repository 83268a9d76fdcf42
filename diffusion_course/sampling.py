"""Lesson 04: samplers, from pure noise x_T back to an image x_0, one function per algorithm.
Exercises: ddpm_step, ddim_step.

Every sampler has the same signature (the shape of k-diffusion's samplers):

    sampler(model, x_T, schedule, timesteps=None, *, cond=None, generator=None, callback=None, clip_x0=1.0)

- `model(x_t, t, cond) -> eps_pred`, the course's contract (a guided model works the same way).
- `timesteps`: the decreasing list of steps to visit, built outside the sampler by
  `timestep_grid`; after the last one the sample is clean (t = -1). img2img passes a grid that
  starts lower, so no sampler needs to know about editing.
- Randomness comes from `generator` (a torch.Generator), so the same seed gives the same images.
- `callback(step)` is called once per step with one `SamplerStep` record whose values belong
  together: the x_t the model saw at t, its x0_pred, and the x_prev the step made at t_prev.
  If it returns a tensor, that tensor replaces x_prev: inpainting keeps the known pixels so.
- `clip_x0`: the data range r; the model's guess of x_0 is clamped to [-r, r] before each
  update, as DDPM's and improved DDPM's samplers do (None: no clamp, e.g. for latents, whose
  range is not fixed). Why it matters: x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
  divides by sqrt(alpha_bar_t), about 5e-5 at t = T - 1 for the cosine schedule, so a small error
  in eps becomes a huge one in x_0 at the noisiest steps. Without the clamp, models trained here
  drew noise instead of digits.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .schedules import NoiseSchedule, alpha_bar_prev, check_timesteps, gather


class SamplerStep(NamedTuple):
    i: int            # the step's index, 0 first
    t: int            # the timestep of x_t
    t_prev: int       # the timestep of x_prev (-1: clean)
    x_t: Tensor       # (B, C, H, W) the sample the model saw
    x0_pred: Tensor   # (B, C, H, W) the model's guess of x_0 at t (after clipping)
    x_prev: Tensor    # (B, C, H, W) the sample after the step


class Prediction(NamedTuple):
    eps_pred: Tensor  # (B, C, H, W) the noise the model sees in x_t
    x0_pred: Tensor   # (B, C, H, W) the clean image that noise implies


Callback = Callable[[SamplerStep], "Tensor | None"]


def predict_x0(x_t: Tensor, t: Tensor, eps_pred: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Invert the closed form of q_sample: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    check_timesteps(t, schedule, x_t.shape[0])
    alpha_bar_t = gather(schedule.alpha_bar, t, x_t)
    return (x_t - (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()


def predict_eps(x_t: Tensor, t: Tensor, x0_pred: Tensor, schedule: NoiseSchedule) -> Tensor:
    """The noise that takes x0_pred to x_t: eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)."""
    check_timesteps(t, schedule, x_t.shape[0])
    alpha_bar_t = gather(schedule.alpha_bar, t, x_t)
    return (x_t - alpha_bar_t.sqrt() * x0_pred) / (1 - alpha_bar_t).sqrt()


def denoise(model, x_t: Tensor, t: Tensor, schedule: NoiseSchedule, *, cond: Tensor | None = None,
            clip_x0: float | None = 1.0) -> Prediction:
    """Call the model and return Prediction(eps_pred, x0_pred). With clip_x0 = r, x0_pred is
    clamped to [-r, r] and eps_pred recomputed to match it."""
    eps_pred = model(x_t, t, cond)
    x0_pred = predict_x0(x_t, t, eps_pred, schedule)
    if clip_x0 is not None:
        x0_pred = x0_pred.clamp(-clip_x0, clip_x0)
        eps_pred = predict_eps(x_t, t, x0_pred, schedule)
    return Prediction(eps_pred, x0_pred)


def ddpm_step(x_t: Tensor, t: Tensor, eps_pred: Tensor, schedule: NoiseSchedule,
              noise: Tensor | None = None) -> Tensor:
    """One ancestral step x_t -> x_{t-1} (DDPM, Algorithm 2, line 4), with sigma_t^2 = beta_t.

        x_{t-1} = 1/sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_pred) + sigma_t * z

    Here alpha_t = 1 - beta_t (one step's share of the signal), not sqrt(alpha_bar) as in DPM-Solver.

    Args:
        x_t: (B, C, H, W) current images.  t: (B,) int64 in [0, T).
        eps_pred: (B, C, H, W) the model's noise prediction at (x_t, t).
        noise: (B, C, H, W) standard normal z; drawn with randn_like when None. No noise is
            added where t == 0 (the last step returns the mean).
    Returns:
        (B, C, H, W) images at step t - 1.
    """
    check_timesteps(t, schedule, x_t.shape[0])
    beta_t = gather(schedule.beta, t, x_t)
    alpha_t = gather(schedule.alpha, t, x_t)
    alpha_bar_t = gather(schedule.alpha_bar, t, x_t)
    mean = (x_t - beta_t / (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_t.sqrt()
    if noise is None:
        noise = torch.randn_like(x_t)
    not_last = (t > 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    return mean + not_last * beta_t.sqrt() * noise


def ddim_step(x_t: Tensor, t: Tensor, t_prev: Tensor, eps_pred: Tensor, schedule: NoiseSchedule,
              eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, Eq. 12).

        x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        x_prev  = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev - s^2) eps + s z
        s       = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_prev)

    (s is the paper's sigma_t.) eta = 0 is deterministic; eta = 1 matches DDPM's noise level.

    Args:
        t_prev: (B,) int64 in [-1, t): the step to jump to; -1 means "clean" (alpha_bar = 1).
        eta: a finite number >= 0.
    """
    _check_jump(x_t, t, t_prev, schedule)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0 (0: DDIM, 1: DDPM's noise level), got {eta!r}.")
    alpha_bar_t = gather(schedule.alpha_bar, t, x_t)
    alpha_bar_to = alpha_bar_prev(schedule, t_prev, x_t)
    x0_pred = (x_t - (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()
    noise_std = eta * ((1 - alpha_bar_to) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_to)).sqrt()
    direction = (1 - alpha_bar_to - noise_std**2).clamp(min=0).sqrt() * eps_pred
    if eta > 0 and noise is None:
        noise = torch.randn_like(x_t)
    random_part = noise_std * noise if eta > 0 else 0.0
    return alpha_bar_to.sqrt() * x0_pred + direction + random_part


def dpm_solver_step(x_t: Tensor, t: Tensor, t_prev: Tensor, x0_pred: Tensor, schedule: NoiseSchedule,
                    previous: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One step of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), in terms of x0 predictions.

    In DPM-Solver's notation alpha_t, sigma_t are our signal_scale = sqrt(alpha_bar_t) and
    noise_scale = sqrt(1 - alpha_bar_t); lambda_t = log(signal_scale / noise_scale), half the
    log-SNR, and h = lambda_prev - lambda_t is the step's length in lambda:

        first order:  x_prev = noise_scale_prev / noise_scale_t * x_t - signal_scale_prev * (exp(-h) - 1) * x0_pred
        second order: the same with D = (1 + 1/(2r)) x0_pred - 1/(2r) x0_before,
                      r = h_before / h, h_before = lambda_t - lambda_before (the previous step's length)

    Args:
        t_prev: (B,) int64 in [-1, t): the step to jump to; rows with -1 ("clean") return their
            x0_pred (noise_scale is 0 there, so the update is the data prediction itself).
        previous: (x0_before, t_before), the x0 prediction of the step before and its timestep,
            or None for a first-order step.
    """
    _check_jump(x_t, t, t_prev, schedule)
    clean = t_prev < 0
    to = t_prev.clamp(min=0)                      # rows that end clean are replaced below
    lambda_t, lambda_prev = _half_log_snr(schedule, t), _half_log_snr(schedule, to)
    h = lambda_prev - lambda_t
    signal_scale_prev = gather(schedule.alpha_bar, to, x_t).sqrt()
    noise_ratio = (gather(1 - schedule.alpha_bar, to, x_t) / gather(1 - schedule.alpha_bar, t, x_t)).sqrt()
    data = x0_pred
    if previous is not None:
        x0_before, t_before = previous
        r = (lambda_t - _half_log_snr(schedule, t_before)) / h
        weight = _per_image(1 / (2 * r), x_t)
        data = (1 + weight) * x0_pred - weight * x0_before
    x_prev = noise_ratio * x_t - signal_scale_prev * _per_image(torch.expm1(-h), x_t) * data
    return torch.where(_per_image(clean, x_t).bool(), x0_pred, x_prev)


@torch.no_grad()
def ddpm_sample(model, x_T: Tensor, schedule: NoiseSchedule, timesteps: list[int] | None = None, *,
                cond: Tensor | None = None, generator: torch.Generator | None = None,
                callback: Callback | None = None, clip_x0: float | None = 1.0) -> Tensor:
    """DDPM ancestral sampling (Algorithm 2): every step from timesteps[0] (default T - 1) down to 0.

    Args:
        x_T: (B, C, H, W) starting images, pure noise for generation.
        timesteps: consecutive steps t_start, t_start - 1, ..., 0 (DDPM cannot skip steps).
    Returns:
        (B, C, H, W) samples, in [-clip_x0, clip_x0] roughly.
    """
    timesteps = _check_grid(x_T, schedule, timesteps, "ddpm", clip_x0)
    x = x_T
    for i, (step, step_prev) in enumerate(_pairs(timesteps)):
        t = _full(x, step)
        eps_pred, x0_pred = denoise(model, x, t, schedule, cond=cond, clip_x0=clip_x0)
        x_prev = ddpm_step(x, t, eps_pred, schedule, _randn(x, generator))
        x = apply_callback(callback, SamplerStep(i, step, step_prev, x, x0_pred, x_prev))
    return x


@torch.no_grad()
def ddim_sample(model, x_T: Tensor, schedule: NoiseSchedule, timesteps: list[int] | None = None, *,
                eta: float = 0.0, cond: Tensor | None = None, generator: torch.Generator | None = None,
                callback: Callback | None = None, clip_x0: float | None = 1.0) -> Tensor:
    """DDIM sampling over `timesteps` (default: 50 evenly spaced from T - 1 to 0), one model call each."""
    timesteps = _check_grid(x_T, schedule, timesteps, "ddim", clip_x0)
    x = x_T
    for i, (step, step_prev) in enumerate(_pairs(timesteps)):
        t, t_prev = _full(x, step), _full(x, step_prev)
        eps_pred, x0_pred = denoise(model, x, t, schedule, cond=cond, clip_x0=clip_x0)
        noise = _randn(x, generator) if eta > 0 else None
        x_prev = ddim_step(x, t, t_prev, eps_pred, schedule, eta, noise)
        x = apply_callback(callback, SamplerStep(i, step, step_prev, x, x0_pred, x_prev))
    return x


@torch.no_grad()
def dpm_solver_sample(model, x_T: Tensor, schedule: NoiseSchedule, timesteps: list[int] | None = None, *,
                      cond: Tensor | None = None, generator: torch.Generator | None = None,
                      callback: Callback | None = None, clip_x0: float | None = 1.0) -> Tensor:
    """DPM-Solver++(2M) over `timesteps` (default: 20, denser near t = 0): good digits in 10-20
    model calls. Deterministic, so `generator` is accepted only for the shared signature."""
    timesteps = _check_grid(x_T, schedule, timesteps, "dpm", clip_x0)
    x, previous = x_T, None
    for i, (step, step_prev) in enumerate(_pairs(timesteps)):
        t, t_prev = _full(x, step), _full(x, step_prev)
        x0_pred = denoise(model, x, t, schedule, cond=cond, clip_x0=clip_x0).x0_pred
        x_prev = dpm_solver_step(x, t, t_prev, x0_pred, schedule, previous)
        previous = (x0_pred, t)
        x = apply_callback(callback, SamplerStep(i, step, step_prev, x, x0_pred, x_prev))
    return x


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpm": dpm_solver_sample}
DEFAULT_SAMPLING_STEPS = {"ddim": 50, "dpm": 20}
SPACING = {"ddim": "linear", "dpm": "quadratic"}


def timestep_grid(sampler: str, schedule: NoiseSchedule, sampling_steps: int | None = None,
                  t_start: int | None = None) -> list[int]:
    """The timesteps `sampler` visits from t_start (default T - 1) down to 0.

    DDPM visits every one (sampling_steps must be None or that count); DDIM spaces
    sampling_steps (default 50) evenly; DPM-Solver++ (default 20) puts them closer near t = 0.
    """
    _check_sampler(sampler)
    t_start = schedule.num_steps - 1 if t_start is None else t_start
    if isinstance(t_start, bool) or not isinstance(t_start, int) or not 0 <= t_start < schedule.num_steps:
        raise ValueError(f"t_start must be an integer in [0, {schedule.num_steps}), got {t_start!r}.")
    if sampler == "ddpm":
        if sampling_steps not in (None, t_start + 1):
            raise ValueError(f"DDPM takes every step ({t_start + 1} here); use sampler 'ddim' or 'dpm' "
                             f"for {sampling_steps} steps.")
        return list(range(t_start, -1, -1))
    steps = min(DEFAULT_SAMPLING_STEPS[sampler], t_start + 1) if sampling_steps is None else sampling_steps
    return timestep_sequence(steps, t_start, SPACING[sampler])


def sample(model, x_T: Tensor, schedule: NoiseSchedule, *, sampler: str = "dpm", sampling_steps: int | None = None,
           t_start: int | None = None, **kwargs) -> Tensor:
    """Run the sampler named `sampler` ("ddpm", "ddim" or "dpm") on its default grid from t_start
    (see timestep_grid); kwargs go to the sampler (cond, generator, callback, clip_x0, eta)."""
    timesteps = timestep_grid(sampler, schedule, sampling_steps, t_start)
    return SAMPLERS[sampler](model, x_T, schedule, timesteps, **kwargs)


def timestep_sequence(sampling_steps: int, t_start: int, spacing: str = "linear") -> list[int]:
    """sampling_steps distinct timesteps from t_start down to 0, both ends included.

    spacing "linear": evenly spaced (DDIM). "quadratic": t ~ (1 - i/n)^2, denser near t = 0
    where the fine detail is decided (DPM-Solver's "time_quadratic" option); it made
    DPM-Solver++ about 20x more accurate at 20 steps on a Gaussian test case (tests/test_sampling.py).
    """
    if isinstance(sampling_steps, bool) or not isinstance(sampling_steps, int) \
            or not 1 <= sampling_steps <= t_start + 1:
        raise ValueError(f"the number of sampling steps must be an integer from 1 to {t_start + 1}, "
                         f"got {sampling_steps!r}.")
    if sampling_steps == 1:
        return [t_start]
    power = {"linear": 1, "quadratic": 2}[spacing]
    steps = [round(t_start * (1 - i / (sampling_steps - 1)) ** power) for i in range(sampling_steps)]
    for i in range(sampling_steps - 2, -1, -1):      # keep them strictly decreasing
        steps[i] = max(steps[i], steps[i + 1] + 1)
    return steps


def _pairs(timesteps: list[int]) -> list[tuple[int, int]]:
    """(t, t_prev) for each step; the last step goes to -1, "clean" (EDM's zip(t[:-1], t[1:]))."""
    return list(zip(timesteps, [*timesteps[1:], -1]))


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}.")


def check_clip_x0(clip_x0) -> None:
    """Raise a clear error unless clip_x0 is a positive finite data range or None (every sampler checks it)."""
    if clip_x0 is not None and (isinstance(clip_x0, bool) or not isinstance(clip_x0, (int, float))
                                or not 0 < clip_x0 < math.inf):
        raise ValueError(f"clip_x0 must be the data range (1.0 for images in [-1, 1]) or None, got {clip_x0!r}.")


def _check_grid(x_T: Tensor, schedule: NoiseSchedule, timesteps, sampler: str, clip_x0) -> list[int]:
    if not isinstance(x_T, Tensor) or x_T.ndim != 4:
        raise ValueError(f"x_T must be a (B, C, H, W) tensor, got {getattr(x_T, 'shape', type(x_T).__name__)}.")
    check_clip_x0(clip_x0)
    if timesteps is None:
        return timestep_grid(sampler, schedule)
    steps = [int(s) for s in timesteps] if isinstance(timesteps, (list, tuple)) and all(
        isinstance(s, int) and not isinstance(s, bool) for s in timesteps) else None
    if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[-1] < 0 \
            or steps[0] >= schedule.num_steps:
        raise ValueError(f"timesteps must be a non-empty, strictly decreasing list of integers in "
                         f"[0, {schedule.num_steps}), got {timesteps!r}.")
    if sampler == "ddpm" and steps != list(range(steps[0], -1, -1)):
        raise ValueError("DDPM takes every step down to 0: timesteps must be t_start, t_start - 1, ..., 0.")
    return steps


def _check_jump(x_t: Tensor, t: Tensor, t_prev: Tensor, schedule: NoiseSchedule) -> None:
    check_timesteps(t, schedule, x_t.shape[0])
    if not isinstance(t_prev, Tensor) or t_prev.shape != t.shape or bool((t_prev >= t).any()) \
            or (t_prev.numel() and int(t_prev.min()) < -1):
        raise ValueError("t_prev must be a tensor of the same shape as t with -1 <= t_prev < t.")


def _half_log_snr(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """lambda_t = log(signal_scale / noise_scale) = 0.5 * log(SNR), in float64 for accuracy. Shape (B,)."""
    alpha_bar = schedule.alpha_bar.double().to(t.device)[t]
    return 0.5 * (torch.log(alpha_bar) - torch.log1p(-alpha_bar))


def _per_image(values: Tensor, x: Tensor) -> Tensor:
    return values.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def _full(x: Tensor, step: int) -> Tensor:
    return torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def apply_callback(callback: Callback | None, step: SamplerStep) -> Tensor:
    """The sample after a step: step.x_prev, or the tensor the callback returned to replace it."""
    if callback is None:
        return step.x_prev
    replaced = callback(step)
    if replaced is None:
        return step.x_prev
    if not isinstance(replaced, Tensor) or replaced.shape != step.x_prev.shape:
        raise ValueError(f"A sampler callback returns None or a tensor of shape {tuple(step.x_prev.shape)} to "
                         f"replace the sample, got {type(replaced).__name__}.")
    return replaced
