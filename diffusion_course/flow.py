"""Lesson 10: one ODE, many samplers: the straight path between data and noise, flow matching,
Euler and Heun, and a 2-D Gaussian mixture whose noised density and score are known exactly.
Exercises: flow_matching_loss.

Convention (rectified flow, Liu et al. 2022; flow matching, Lipman et al. 2023, with the time
running the way diffusion's does): time t is a float in [0, 1], t = 0 is data, t = 1 is noise,

    x_t = (1 - t) x0 + t noise,        noise ~ N(0, I)                        (1)

so x_t moves along a straight line at the constant velocity

    dx_t / dt = noise - x0.                                                    (2)

A network v(x_t, t) trained to regress (2) (`flow_matching_loss`) learns the average velocity
through x_t, E[noise - x0 | x_t]; integrating dx/dt = v from t = 1 (pure noise) to t = 0 carries
noise to data (`euler_sample`, `heun_sample` over `flow_time_grid`). This path is a noise
schedule like lesson 01's with signal_scale = 1 - t and noise_scale = t (the mixture functions
below take any pair), and a DDIM step (lesson 04) on it is exactly an Euler step of (2).

The network keeps the course's contract, model(x_t, t, cond) -> prediction, and is called with
TIME_SCALE * t: a float in [0, 1000], the range of lesson 02's timestep embedding, so the U-Net
of the earlier lessons trains by flow matching unchanged. Tensors may be (B, C, H, W) images or
(B, D) points (the 2-D toy); t is a float, or a (B,) tensor, per image.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling import Callback, SamplerStep, apply_callback, check_clip_x0
from .unet import timestep_embedding

TIME_SCALE = 1000.0   # the network sees TIME_SCALE * t, the range of the discrete steps t in [0, 1000)
DEFAULT_FLOW_STEPS = 16


# ----------------------------------------------------------------------------------------------
# The path and the loss


def straight_path(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise (Eq. 1). x0, noise: (B, ...); t: (B,) floats in [0, 1]."""
    t = _per_row(_check_times(t, x0.shape[0]), x0)
    return (1 - t) * x0 + t * noise


def flow_matching_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity of the straight path, d x_t / dt = noise - x0 (Eq. 2), the same for every t."""
    return noise - x0


def flow_matching_loss(model: nn.Module, x0: Tensor, *, cond: Tensor | None = None, t: Tensor | None = None,
                       noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Conditional flow matching: MSE between model(x_t, TIME_SCALE * t, cond) and noise - x0.

        L = E_{x0, t ~ U[0, 1], noise} || (noise - x0) - v(x_t, 1000 t) ||^2,   x_t as in Eq. 1

    It has the training loop's loss contract, so runs.train(model, images, flow_matching_loss)
    and training.train_step(model, optimizer, x0, flow_matching_loss) work unchanged.

    Args:
        x0: (B, ...) clean data. cond: the model's condition or None.
        t: (B,) float times in [0, 1]; uniform when None (drawn from `generator`).
        noise: standard normal, shaped like x0; drawn from `generator` when None (after t).
    Returns:
        Scalar tensor: the mean squared error over all elements.
    """
    if not isinstance(x0, Tensor) or x0.ndim < 2 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a float (B, ...) tensor, got {getattr(x0, 'shape', type(x0).__name__)}.")
    if t is None:
        t = torch.rand(x0.shape[0], device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    if not isinstance(noise, Tensor) or noise.shape != x0.shape:
        raise ValueError(f"noise must be a tensor shaped like x0 {tuple(x0.shape)}.")
    x_t = straight_path(x0, noise, t)
    velocity = model(x_t, TIME_SCALE * t.to(x0.dtype), cond)
    return F.mse_loss(velocity.float(), flow_matching_target(x0, noise).float())


# ----------------------------------------------------------------------------------------------
# Samplers: integrate dx/dt = v(x, t) from t = 1 to t = 0


def flow_time_grid(steps: int = DEFAULT_FLOW_STEPS) -> list[float]:
    """steps + 1 evenly spaced times from 1 (noise) down to 0 (data), both ends included."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}.")
    return [1 - i / steps for i in range(steps + 1)]


def karras_time_grid(steps: int = DEFAULT_FLOW_STEPS, *, rho: float = 7.0, sigma_min: float = 0.002,
                     sigma_max: float = 80.0) -> list[float]:
    """EDM's step spacing (Karras et al. 2022, Eq. 5) moved onto the straight path: evenly spaced in
    sigma^(1/rho) from sigma_max down to sigma_min, where sigma = t / (1 - t) is the path's noise-to-
    signal ratio (x_t / (1 - t) = x0 + sigma noise), so t = sigma / (1 + sigma); then t = 0. The first
    time is 1 (pure noise, what the samplers start from) instead of sigma_max / (1 + sigma_max) = 0.988.
    With rho = 7 the steps crowd towards the data end, where EDM's sigma-ODE curves most."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be a whole number >= 2 for the Karras spacing, got {steps!r}.")
    if not 0 < sigma_min < sigma_max or rho <= 0:
        raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}.")
    ramp = [sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
            for i in range(steps)]
    return [1.0] + [r ** rho / (1 + r ** rho) for r in ramp[1:]] + [0.0]


def velocity(model, x: Tensor, t: float, cond: Tensor | None = None) -> Tensor:
    """The model's velocity at time t (a float in [0, 1]) for every row of x."""
    return model(x, torch.full((x.shape[0],), TIME_SCALE * t, device=x.device, dtype=x.dtype), cond)


def euler_step(x_t: Tensor, t: float, t_next: float, velocity_t: Tensor) -> Tensor:
    """One Euler step of dx/dt = v: x_next = x_t + (t_next - t) v(x_t, t). Going to data, t_next < t."""
    return x_t + (t_next - t) * velocity_t


@torch.no_grad()
def euler_sample(model, noise: Tensor, times: list[float] | None = None, *, cond: Tensor | None = None,
                 generator: torch.Generator | None = None, callback: Callback | None = None,
                 clip_x0: float | None = None) -> Tensor:
    """Euler's method over `times` (default flow_time_grid(16)), one model call per step.

    Args:
        noise: (B, ...) the start at times[0] (pure noise at t = 1).
        times: strictly decreasing floats in [0, 1], e.g. flow_time_grid(steps).
        generator: unused (the ODE is deterministic); accepted for the course's sampler signature.
        callback: called with a SamplerStep per step (t and t_prev are floats here); a returned
            tensor replaces the sample, as in sampling.py.
        clip_x0: None (the default here), or a data range r: x0_pred = x_t - t v is clamped to
            [-r, r] and the velocity recomputed to match it.
    Returns:
        (B, ...) samples at times[-1] (data when it is 0).
    """
    times = _check_grid(noise, times, clip_x0)
    x = noise
    for i, (t, t_next) in enumerate(zip(times, times[1:])):
        v, x0_pred = _velocity_and_x0(model, x, t, cond, clip_x0)
        x_next = euler_step(x, t, t_next, v)
        x = apply_callback(callback, SamplerStep(i, t, t_next, x, x0_pred, x_next))
    return x


@torch.no_grad()
def heun_sample(model, noise: Tensor, times: list[float] | None = None, *, cond: Tensor | None = None,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                clip_x0: float | None = None) -> Tensor:
    """Heun's method (EDM, Karras et al. 2022, Algorithm 1): an Euler step, then the average of the
    velocities at both ends of it,

        x_euler = x_t + (t_next - t) v(x_t, t)
        x_next  = x_t + (t_next - t) (v(x_t, t) + v(x_euler, t_next)) / 2

    at every step, 2 * steps model calls. (EDM skips the correction at the last step, where its
    denoiser's ODE divides by sigma = 0; here v(x, 0) is finite for data with any spread, and
    skipping it would leave a first-order error from the last step: measured on a Gaussian, Heun
    at 8 steps was then 1.8x more accurate than Euler at 8 steps; with it, 8.8x: tests/test_flow.py.)
    Arguments and return as for euler_sample.
    """
    times = _check_grid(noise, times, clip_x0)
    x = noise
    for i, (t, t_next) in enumerate(zip(times, times[1:])):
        v, x0_pred = _velocity_and_x0(model, x, t, cond, clip_x0)
        x_next = euler_step(x, t, t_next, v)
        v_next, _ = _velocity_and_x0(model, x_next, t_next, cond, clip_x0)   # Heun's correction
        x_next = euler_step(x, t, t_next, (v + v_next) / 2)
        x = apply_callback(callback, SamplerStep(i, t, t_next, x, x0_pred, x_next))
    return x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}   # generate's names for the flow samplers


def _velocity_and_x0(model, x: Tensor, t: float, cond, clip_x0) -> tuple[Tensor, Tensor]:
    """v(x, t) and the clean point it implies, x0_pred = x - t v (Eqs. 1-2 with noise = x0 + v);
    with clip_x0 = r, x0_pred is clamped and v recomputed as (x - x0_pred) / t."""
    v = velocity(model, x, t, cond)
    x0_pred = x - t * v
    if clip_x0 is not None and t > 0:
        x0_pred = x0_pred.clamp(-clip_x0, clip_x0)
        v = (x - x0_pred) / t
    return v, x0_pred


# ----------------------------------------------------------------------------------------------
# A 2-D toy with a closed form: a mixture of K Gaussians with means mu_k, one std s, weights w_k


class GaussianMixture(NamedTuple):
    means: Tensor     # (K, D) component means mu_k
    std: float        # the standard deviation s of every component (isotropic)
    weights: Tensor   # (K,) mixing weights w_k, summing to 1


def ring_mixture(num_components: int = 6, *, radius: float = 1.5, std: float = 0.15) -> GaussianMixture:
    """Equal-weight Gaussians evenly spaced on a circle of `radius` in 2-D."""
    angles = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means.float(), float(std), torch.full((num_components,), 1 / num_components))


def mixture_sample(mixture: GaussianMixture, num: int, *, generator: torch.Generator | None = None) -> Tensor:
    """(num, D) draws from the mixture: pick a component by its weight, add std * noise."""
    component = torch.multinomial(mixture.weights, num, replacement=True, generator=generator)
    noise = torch.randn(num, mixture.means.shape[1], generator=generator)
    return mixture.means[component] + mixture.std * noise


def _noised_components(x: Tensor, mixture: GaussianMixture, signal_scale, noise_scale):
    """For x_t = a x0 + s noise, component k is N(a mu_k, var I) with var = a^2 std^2 + s^2.
    Returns (offset x - a mu_k: (B, K, D), var: (B, 1, 1), responsibilities p(k | x_t): (B, K))."""
    a = _per_row(torch.as_tensor(signal_scale, dtype=x.dtype).expand(x.shape[0]), x)[:, None]
    s = _per_row(torch.as_tensor(noise_scale, dtype=x.dtype).expand(x.shape[0]), x)[:, None]
    var = a ** 2 * mixture.std ** 2 + s ** 2
    offset = x[:, None, :] - a * mixture.means.to(x)[None]
    log_p = (mixture.weights.to(x).log()[None] - offset.pow(2).sum(-1) / (2 * var[..., 0])
             - 0.5 * x.shape[1] * torch.log(2 * math.pi * var[..., 0]))
    return offset, var, log_p


def mixture_log_density(x: Tensor, mixture: GaussianMixture, *, signal_scale, noise_scale) -> Tensor:
    """log p_t(x) of x_t = a x0 + s noise, x0 from the mixture: log sum_k w_k N(x; a mu_k, var I).
    x: (B, D); signal_scale a and noise_scale s: floats or (B,) tensors. Returns (B,)."""
    return _noised_components(x, mixture, signal_scale, noise_scale)[2].logsumexp(dim=1)


def mixture_eps(x: Tensor, mixture: GaussianMixture, *, signal_scale, noise_scale) -> Tensor:
    """The exact noise prediction E[noise | x_t] = sum_k p(k | x_t) s (x - a mu_k) / var: what a
    perfect eps model outputs. (B, D)."""
    offset, var, log_p = _noised_components(x, mixture, signal_scale, noise_scale)
    s = _per_row(torch.as_tensor(noise_scale, dtype=x.dtype).expand(x.shape[0]), x)[:, None]
    return (log_p.softmax(dim=1)[..., None] * s * offset / var).sum(dim=1)


def mixture_velocity(x: Tensor, t, mixture: GaussianMixture) -> Tensor:
    """The exact flow-matching velocity E[noise - x0 | x_t] on the straight path (a = 1 - t, s = t),
    with E[x0 | x_t, k] = mu_k + a std^2 (x - a mu_k) / var. x: (B, D); t: float or (B,). (B, D)."""
    t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
    offset, var, log_p = _noised_components(x, mixture, 1 - t, t)
    a, s = _per_row(1 - t, x)[:, None], _per_row(t, x)[:, None]
    x0_mean = mixture.means.to(x)[None] + a * mixture.std ** 2 * offset / var
    return (log_p.softmax(dim=1)[..., None] * (s * offset / var - x0_mean)).sum(dim=1)


class ExactVelocity(nn.Module):
    """The mixture's exact velocity with the model contract: model(x_t, TIME_SCALE * t, cond)."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return mixture_velocity(x, t / TIME_SCALE, self.mixture)


class ToyMLP(nn.Module):
    """A small MLP velocity (or eps) model for (B, D) points: [x, embedding of t] -> D outputs.
    t is a float in [0, TIME_SCALE], embedded as lesson 02's U-Net does."""

    def __init__(self, dim: int = 2, hidden: int = 128, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(nn.Linear(dim + time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.net(torch.cat([x, timestep_embedding(t, self.time_dim)], dim=1))


# ----------------------------------------------------------------------------------------------
# Checks


def _per_row(values: Tensor, x: Tensor) -> Tensor:
    return values.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def _check_times(t, batch: int) -> Tensor:
    if not isinstance(t, Tensor) or t.shape != (batch,) or not t.is_floating_point():
        raise ValueError(f"t must be a float tensor of shape ({batch},) with times in [0, 1], got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}.")
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
        raise ValueError(f"t must lie in [0, 1] (0: data, 1: noise), got values from {float(t.min()):.3g} "
                         f"to {float(t.max()):.3g}. The network's 1000 t is passed for you.")
    return t


def _check_grid(noise: Tensor, times, clip_x0) -> list[float]:
    if not isinstance(noise, Tensor) or noise.ndim < 2:
        raise ValueError(f"noise must be a (B, ...) tensor, got {getattr(noise, 'shape', type(noise).__name__)}.")
    check_clip_x0(clip_x0)
    if times is None:
        return flow_time_grid()
    ok = isinstance(times, (list, tuple)) and len(times) >= 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in times)
    if not ok or any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be a strictly decreasing list of at least two floats in [0, 1] (1: noise, "
                         f"0: data), e.g. flow_time_grid(8), got {times!r}.")
    return [float(v) for v in times]
