"""Lesson 01 (forward noising): checkers and hints for the exercises q_sample and cosine_alpha_bar.

References: schedules.q_sample and schedules.cosine_schedule(...).alpha_bar. The lesson's
prediction and derivation are measured with the references below, not with the formula the
learner is asked to find:

    snr_crosses_one(schedule)                    the first step whose SNR is below 1
    variance_by_chain(x0, schedule, steps)       Var(x_t) of the step-by-step chain (Monte Carlo)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import schedules
from ._harness import (_call, _checker, _close, _compare, _expect_tensor, _first_match, _ignores_argument,
                       _noise_problem, _recover_noise, _schedule_with, _Wrong)

HINTS = {
    "q_sample": (
        "A noisy image is a weighted sum of the clean image and fresh Gaussian noise. Which schedule "
        "quantity says how much of the signal's variance is left after t steps, and how do you look it "
        "up for each image of the batch so that it multiplies whole images?",
        "The boxed closed form of lesson 01: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, with "
        "alpha_bar (the cumulative product, not alpha) looked up at each image's own t, and eps the given "
        "noise or a standard normal draw when noise is None.",
        "if noise is None: draw noise = torch.randn_like(x0)\n"
        "alpha_bar_t = schedules.gather(schedule.alpha_bar, t, x0)      # shape (B, 1, 1, 1)\n"
        "return sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise",
    ),
    "cosine_alpha_bar": (
        "alpha_bar is a ratio f(t) / f(0). How many values of f do you need for T steps plus the "
        "reference point t = 0, and which of them belong to the output?",
        "Nichol and Dhariwal's cosine schedule (lesson 01, 'A better schedule: cosine'): "
        "f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2) for t = 0, 1, ..., T, and alpha_bar_t = f(t) / f(0) "
        "for the paper's steps t = 1, ..., T (code entries 0, ..., T - 1).",
        "steps = 0, 1, ..., num_steps in float64 (torch.arange(num_steps + 1, dtype=torch.float64))\n"
        "f = cos((steps / num_steps + s) / (1 + s) * pi / 2) squared\n"
        "return (f[1:] / f[0]) converted to float32",
    ),
}


@_checker
def check_q_sample(fn):
    """Check fn(x0, t, schedule, noise=None) -> x_t against schedules.q_sample."""
    schedule = schedules.linear_schedule(50)
    x0 = torch.rand(4, 1, 4, 5) * 2 - 1
    t = torch.tensor([1, 7, 23, 41])
    noise = torch.randn_like(x0)
    want = schedules.q_sample(x0, t, schedule, noise)
    got = _call(fn, x0, t, schedule, noise)

    def diagnose():
        # x_t = a * x0 + b * noise: find a and b with the reference, then try the usual slips.
        a = schedules.q_sample(torch.ones_like(x0), t, schedule, torch.zeros_like(x0))
        b = schedules.q_sample(torch.zeros_like(x0), t, schedule, torch.ones_like(x0))
        return _first_match(got, {
            "the scale matches alpha_t rather than alpha_bar_t (the cumulative product).":
                schedules.q_sample(x0, t, _schedule_with(schedule, alpha_bar=schedule.alpha), noise),
            "looks like a missing square root on both coefficients.": a ** 2 * x0 + b ** 2 * noise,
            "looks like a missing square root on the coefficient of the noise.": a * x0 + b ** 2 * noise,
            "looks like a missing square root on the coefficient of x0.": a ** 2 * x0 + b * noise,
            "the two coefficients are swapped: the signal's weight shrinks as t grows, the noise's grows.":
                b * x0 + a * noise,
            "looks like t is off by one (you used the entry for step t + 1).": schedules.q_sample(x0, t + 1, schedule, noise),
            "looks like t is off by one (you used the entry for step t - 1).": schedules.q_sample(x0, t - 1, schedule, noise),
        }) or _ignores_argument(fn, got, "noise", x0, t, schedule, noise)

    _compare(got, want, diagnose)

    # noise=None: the noise the function draws must be standard normal.
    x0 = torch.rand(8, 1, 16, 16) * 2 - 1
    t = torch.full((8,), 25)
    x_t = _call(fn, x0, t, schedule)
    _expect_tensor(x_t, x0.shape)
    problem = _noise_problem(_recover_noise(x_t, x0, t, schedule))
    if problem:
        raise _Wrong(problem + " (This is the case noise=None.)")
    return "q_sample matches the reference, and the noise it draws is standard normal."


@_checker
def check_cosine_alpha_bar(fn):
    """Check fn(num_steps, s=0.008) -> alpha_bar of shape (T,) against schedules.cosine_schedule.

    The reference clips beta at 0.999, which changes the last entry or so; those entries are
    not compared.
    """
    num_steps = 50
    for s in (None, 0.1):   # the default s, then a larger one
        reference = schedules.cosine_schedule(num_steps, 0.008 if s is None else s)
        got = _call(fn, num_steps) if s is None else _call(fn, num_steps, s=s)
        if isinstance(got, Tensor) and got.shape == (num_steps + 1,):
            raise _Wrong(f"looks like an off-by-one: you returned {num_steps + 1} values for num_steps = "
                         f"{num_steps}, but alpha_bar has exactly one value per noising step.")
        _expect_tensor(got, (num_steps,))
        unclipped = (reference.beta >= 0.999).cumsum(0) == 0
        got, want = got[unclipped], reference.alpha_bar[unclipped]

        def diagnose():
            if abs(got[0].item() - 1) < 1e-6:
                return ("looks like t is off by one: your alpha_bar starts at exactly 1 (no noise yet), "
                        "but its first entry belongs to the first noising step.")
            if _close(got, want.sqrt(), atol=1e-6, rtol=1e-5):
                return "looks like a missing square on the cosine."
            ratio = got.double() / want.double()
            if ratio.std() < 1e-6 * ratio.abs().mean() and abs(ratio.mean().item() - 1) > 1e-5:
                return (f"all your values are off by the same factor ({ratio.mean().item():.5f}): "
                        "did you divide f(t) by f(0)?")
            if s is not None and _close(got, schedules.cosine_schedule(num_steps).alpha_bar[unclipped],
                                        atol=1e-6, rtol=1e-5):
                return "your result does not change with s: use the s argument."
            return None

        _compare(got, want, diagnose, atol=1e-6, rtol=1e-5)
    return "your cosine alpha_bar matches the reference."


# ----------------------------------------------------------------------------------------------
# The references of lesson 01's prediction and derivation


def snr_crosses_one(schedule) -> int:
    """The first (zero-based) step t at which SNR(t) = alpha_bar_t / (1 - alpha_bar_t) is below 1,
    i.e. the signal's variance has fallen below the noise's (alpha_bar_t < 1/2)."""
    below = (schedules.snr(schedule) < 1).nonzero()
    if len(below) == 0:
        raise ValueError(f"the SNR of the {schedule.name} schedule never falls below 1.")
    return int(below[0])


def variance_by_chain(x0: Tensor, schedule, steps, *, generator: torch.Generator | None = None) -> Tensor:
    """Monte Carlo Var(x_t) at the given steps, running the one-step recursion
    x_t = sqrt(alpha_t) x_(t-1) + sqrt(beta_t) eps literally from x0 (never the closed form).

    Args:
        x0: (B, C, H, W) clean images; the variance is pooled over every pixel of every image.
        steps: zero-based steps t at which to measure.
    Returns:
        (len(steps),) float64 tensor: the variance of all values of x_t at each step.
    """
    steps = [int(step) for step in steps]
    if not steps or min(steps) < 0 or max(steps) >= schedule.num_steps:
        raise ValueError(f"steps must be a non-empty list in [0, {schedule.num_steps}), got {steps!r}.")
    x, measured = x0.double(), {}
    for t in range(max(steps) + 1):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = schedule.alpha[t].double().sqrt() * x + schedule.beta[t].double().sqrt() * noise
        if t in steps:
            measured[t] = x.var()
    return torch.stack([measured[t] for t in steps])
