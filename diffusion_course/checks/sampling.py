"""Lesson 04 (sampling): checkers and hints for the exercises ddpm_step and ddim_step, and the
hints and Monte Carlo reference of the lesson's derivation, ddim_eta_one_variance (checked with
checks.check_derivation).

References: sampling.ddpm_step and sampling.ddim_step.
"""

from __future__ import annotations

import torch

from torch import Tensor

from .. import sampling, schedules
from ..schedules import gather
from ._harness import _call, _checker, _close, _compare, _first_match, _ignores_argument, _schedule_with

HINTS = {
    "ddpm_step": (
        "One reverse step removes the model's estimate of this step's noise, rescales, and adds a little "
        "fresh noise back, except at the very last step. Which schedule quantities belong to this single "
        "step and which to the whole chain up to t?",
        "Algorithm 2 of DDPM (lesson 04, section 2): mean = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_pred) "
        "/ sqrt(alpha_t), and x_prev = mean + sqrt(beta_t) z, with z the given noise, for every image "
        "whose t is not 0 (those get the mean alone).",
        "beta_t, alpha_t, alpha_bar_t = schedules.gather(schedule.beta / .alpha / .alpha_bar, t, x_t)\n"
        "mean = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_pred) / sqrt(alpha_t)\n"
        "not_last = (t > 0) as a float, shaped (B, 1, 1, 1)\n"
        "return mean + not_last * sqrt(beta_t) * noise",
    ),
    "ddim_step": (
        "DDIM guesses the clean image from x_t and the predicted noise, then noises that guess again to the "
        "level of t_prev. What is alpha_bar at t_prev when t_prev is -1, the clean image, and what would "
        "indexing alpha_bar with -1 give instead?",
        "DDIM, Eq. 12 (lesson 04, section 5): x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps_pred) / "
        "sqrt(alpha_bar_t); x_prev = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev - sigma^2) "
        "eps_pred + sigma z, with sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) "
        "sqrt(1 - alpha_bar_t / alpha_bar_prev), and alpha_bar_prev = 1 where t_prev = -1.",
        "alpha_bar_t = schedules.gather(schedule.alpha_bar, t, x_t)\n"
        "alpha_bar_prev = schedules.alpha_bar_prev(schedule, t_prev, x_t)    # 1 where t_prev == -1\n"
        "x0_pred = (x_t - sqrt(1 - alpha_bar_t) * eps_pred) / sqrt(alpha_bar_t)\n"
        "sigma = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))\n"
        "x_prev = sqrt(alpha_bar_prev) * x0_pred + sqrt(1 - alpha_bar_prev - sigma ** 2) * eps_pred\n"
        "if eta > 0: add sigma * noise (drawn with torch.randn_like when noise is None)",
    ),
}

# The derivation of section 5: no checker of its own; checks.check_derivation compares the learner's
# closed form with ddim_variance_monte_carlo. Its hints join HINTS, so checks.hint finds them.
DERIVATION_HINTS = {
    "ddim_eta_one_variance": (
        "One DDIM step with eta equal to 1 from t to t minus 1 adds sigma times fresh noise and nothing else "
        "random, so its variance is sigma squared. Write sigma squared out and look at the ratio of the two "
        "alpha bars of neighbouring steps: which single schedule entry is that ratio?",
        "The sigma of DDIM, Eq. 16 (lesson 04, section 5) with eta 1 and t_prev equal to t minus 1. The ratio "
        "alpha_bar_t over alpha_bar_{t-1} is alpha_t, so one minus it is beta_t. Compare with the posterior "
        "variance beta_tilde_t of section 1 (DDPM, Eq. 7).",
        "alpha_bar_t = schedule.alpha_bar[t]; alpha_bar_before = alpha_bar one step earlier (1 where t is 0)\n"
        "return (1 - alpha_bar_before) / (1 - alpha_bar_t) * schedule.beta[t]",
    ),
}

HINTS = {**HINTS, **DERIVATION_HINTS}


def ddim_variance_monte_carlo(schedule, t: Tensor, *, num: int = 40000, seed: int = 0) -> Tensor:
    """The variance of x_{t-1} given x_t for one sampling.ddim_step with eta = 1 from each t in
    `t` (a (K,) int64 tensor, values >= 1) to t - 1, estimated from `num` noise draws. Returns (K,)
    float64. Its relative standard error is about sqrt(2 / num), 0.7% for the default."""
    t = torch.as_tensor(t, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(t), 1, 1, num, generator=generator, dtype=torch.float64)
    x_t = torch.zeros_like(noise)        # x_t and eps_pred only shift the mean; the variance is the noise's
    x_prev = sampling.ddim_step(x_t, t, t - 1, torch.zeros_like(noise), schedule, eta=1.0, noise=noise)
    return x_prev.flatten(1).var(dim=1)


@_checker
def check_ddpm_step(fn):
    """Check fn(x_t, t, eps_pred, schedule, noise) -> x_prev against sampling.ddpm_step."""
    schedule = schedules.linear_schedule(50)
    x_t, eps_pred, noise = torch.randn(3, 4, 1, 5, 5)
    t = torch.tensor([0, 1, 20, 49])
    want = sampling.ddpm_step(x_t, t, eps_pred, schedule, noise)
    got = _call(fn, x_t, t, eps_pred, schedule, noise)

    def diagnose():
        def variant(**changes):
            return sampling.ddpm_step(x_t, t, eps_pred, _schedule_with(schedule, **changes), noise)

        mean = sampling.ddpm_step(x_t, t, eps_pred, schedule, torch.zeros_like(noise))
        noise_part = want - mean   # sigma_t * noise, zero where t == 0
        beta_t = gather(schedule.beta, t, x_t)
        alpha_bar_t = gather(schedule.alpha_bar, t, x_t)
        alpha_bar_prev = schedules.alpha_bar_prev(schedule, t - 1, x_t)   # 1 at t == 0
        last = (t == 0).view(-1, 1, 1, 1)
        return _first_match(got, {
            "noise was added at t == 0: the last step returns the mean, with no noise.":
                want + last * beta_t.sqrt() * noise,
            "the 1/sqrt(...) factor uses alpha_bar_t where the single step's alpha_t belongs.":
                variant(alpha=schedule.alpha_bar),
            "the noise-prediction coefficient uses alpha_t where alpha_bar_t (the cumulative product) belongs.":
                variant(alpha_bar=schedule.alpha),
            "looks like a missing square root on alpha_t.": variant(alpha=schedule.alpha ** 2),
            "looks like a missing square root on 1 - alpha_bar_t.":
                variant(alpha_bar=1 - (1 - schedule.alpha_bar) ** 2),
            "sigma_t is the square root of the variance beta_t: you used sigma = beta (not sqrt).":
                mean + noise_part * beta_t.sqrt(),
            "you used the posterior variance beta_tilde_t as sigma_t^2. It is a valid choice (DDPM, "
            "Sec. 3.2), but this course uses sigma_t^2 = beta_t.":
                mean + noise_part * ((1 - alpha_bar_prev) / (1 - alpha_bar_t)).sqrt(),
        }) or _ignores_argument(fn, got, "noise", x_t, t, eps_pred, schedule, noise)

    _compare(got, want, diagnose)
    return "your DDPM step matches the reference."


@_checker
def check_ddim_step(fn):
    """Check fn(x_t, t, t_prev, eps_pred, schedule, eta=0.0, noise=None) -> x_prev against sampling.ddim_step."""
    schedule = schedules.linear_schedule(50)
    x_t, eps_pred, noise = torch.randn(3, 4, 1, 5, 5)
    t = torch.tensor([3, 10, 25, 49])
    t_prev = torch.tensor([-1, 5, 20, 30])   # -1: jump to the clean image
    want = sampling.ddim_step(x_t, t, t_prev, eps_pred, schedule)
    got = _call(fn, x_t, t, t_prev, eps_pred, schedule)

    def diagnose():
        clean = t_prev == -1
        if _close(got[~clean], want[~clean]):
            return ("only the images with t_prev = -1 are wrong: t_prev = -1 means the clean image, "
                    "where alpha_bar_prev = 1 (alpha_bar[-1] would be the last step of the schedule).")
        mistake = _first_match(got, {
            "alpha_t is used where alpha_bar_t (the cumulative product) belongs.":
                sampling.ddim_step(x_t, t, t_prev, eps_pred, _schedule_with(schedule, alpha_bar=schedule.alpha)),
        })
        if mistake:
            return mistake
        # With eps_pred = 0 the step only rescales x_t, by a ratio of square roots.
        alpha_bar_t = gather(schedule.alpha_bar, t, x_t)
        alpha_bar_prev = schedules.alpha_bar_prev(schedule, t_prev, x_t)
        scaled = _call(fn, x_t, t, t_prev, torch.zeros_like(eps_pred), schedule)
        return _first_match(scaled, {
            "looks like a missing square root.": x_t * alpha_bar_prev / alpha_bar_t,
            "looks like a missing square root (in x0_pred).": x_t * alpha_bar_prev.sqrt() / alpha_bar_t,
            "looks like a missing square root (on alpha_bar_prev).": x_t * alpha_bar_prev / alpha_bar_t.sqrt(),
        })

    _compare(got, want, diagnose)

    # eta = 1 with given noise.
    want = sampling.ddim_step(x_t, t, t_prev, eps_pred, schedule, eta=1.0, noise=noise)
    got = _call(fn, x_t, t, t_prev, eps_pred, schedule, eta=1.0, noise=noise)
    _compare(got, want, lambda: _first_match(got, {
        "your result does not change with eta: for eta > 0 add sigma * noise (and shrink the direction term).":
            sampling.ddim_step(x_t, t, t_prev, eps_pred, schedule),
    }) or _ignores_argument(fn, got, "noise", x_t, t, t_prev, eps_pred, schedule, eta=1.0, noise=noise))
    return "your DDIM step matches the reference, for eta = 0 and eta = 1."

