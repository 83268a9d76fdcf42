"""Lesson 05 (conditioning and guidance): checkers and hints for the exercises drop_labels and guided_eps,
and the hints and numerical reference of the lesson's derivation, sharpened_gaussian (checked with
checks.check_derivation).

References: guidance.drop_labels and guidance.guided_eps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import guidance
from ._harness import _call, _checker, _close, _compare, _expect_tensor, _first_match, _Wrong

HINTS = {
    "drop_labels": (
        "Each label is dropped on its own, with probability p, by a coin flip that the generator "
        "makes reproducible. Where does the coin land below p, and what replaces a dropped label? "
        "Should the labels the caller passed in change?",
        "Label dropout of classifier-free guidance (Ho and Salimans 2022, lesson 05 section 2): one "
        "uniform number u per label; the result is null_class where u < p and the original label "
        "elsewhere, in a new tensor.",
        "drop = torch.rand(cond.shape, generator=generator) < p\n"
        "return torch.where(drop, null_class (as a tensor like cond), cond)",
    ),
    "guided_eps": (
        "Guidance starts from the unconditional prediction and moves along the direction that the label "
        "adds. How far along that direction does a guidance scale of 1 go, and of 0?",
        "The boxed guidance formula of lesson 05, section 3: eps = eps_uncond + w (eps_cond - eps_uncond), "
        "where w is the guidance scale (Ho and Salimans' w is ours minus 1).",
        "return eps_uncond + guidance_scale * (eps_cond - eps_uncond)",
    ),
}

# The derivation of section 3: no checker of its own; checks.check_derivation compares the learner's
# closed form with sharpened_gaussian_numerical. Its hints join HINTS, so checks.hint finds them.
DERIVATION_HINTS = {
    "sharpened_gaussian": (
        "Guidance samples from p(x) times p(c given x) to the power w. Bayes turns p(c given x) into a ratio of "
        "p(x given c) and p(x), so the target is a product of powers of two Gaussians. A product of Gaussian "
        "densities is Gaussian: add what multiplies x squared in the exponents.",
        "The target is proportional to p(x) to the power 1 - w times p(x given c) to the power w. Precisions add "
        "with those weights: 1 / variance = (1 - w) / a + w / b, and mean / variance = w m / b (the all-digits "
        "Gaussian has mean 0).",
        "precision = (1 - w) / a + w / b\nvariance = 1 / precision\nmean = variance * w * m / b\n"
        "return torch.stack([mean, variance])",
    ),
}
HINTS = {**HINTS, **DERIVATION_HINTS}


def sharpened_gaussian_numerical(w: Tensor, a: float, b: float, m: float, *, points: int = 40001) -> Tensor:
    """Mean and variance of the density proportional to p(x) p(c | x)^w for p(x) = N(0, a) and
    p(x | c) = N(m, b) in one dimension, by summing the density on a fine grid (no closed form used).
    w: (K,) guidance scales with (1 - w) / a + w / b > 0. Returns (2, K) float64: means, variances."""
    w = torch.as_tensor(w, dtype=torch.float64).reshape(-1, 1)
    x = torch.linspace(-30.0, 30.0, points, dtype=torch.float64)
    log_p = -x ** 2 / (2 * a)                                     # log N(x; 0, a) up to a constant
    log_class = -(x - m) ** 2 / (2 * b) + x ** 2 / (2 * a)        # log p(c | x) = log p(x | c) - log p(x) + const
    weights = torch.softmax(log_p + w * log_class, dim=1)        # the sharpened density on the grid, normalised
    mean = (weights * x).sum(1)
    variance = (weights * (x - mean[:, None]) ** 2).sum(1)
    return torch.stack([mean, variance])


@_checker
def check_drop_labels(fn):
    """Check fn(cond, null_class, p, generator=None) -> labels statistically, like guidance.drop_labels."""
    null_class, p = 10, 0.3
    cond = torch.randint(0, null_class, (20000,))
    original = cond.clone()
    got = _call(fn, cond, null_class, p, generator=torch.Generator().manual_seed(1))
    if not torch.equal(cond, original):
        raise _Wrong("your function modified cond in place: return a new tensor and leave the input as it was.")
    _expect_tensor(got, cond.shape, hint="")
    if got.dtype != torch.int64:
        raise _Wrong(f"the labels should stay int64, got {got.dtype}.")
    changed = got != cond
    strays = got[changed & (got != null_class)].unique()
    if strays.numel() and set(strays.tolist()) <= {0, -1}:
        raise _Wrong(f"dropped labels were replaced with {strays[0].item()} instead of null_class.")
    if strays.numel():
        raise _Wrong(f"some labels changed to values other than null_class: {strays[:5].tolist()}.")
    fraction = (got == null_class).float().mean().item()
    if abs(fraction - (1 - p)) < 0.02:
        raise _Wrong(f"p is inverted: you dropped {fraction:.0%} of the labels with p = {p}, so each label "
                     "is kept with probability p instead of dropped with probability p.")
    if abs(fraction - p) > 0.02:
        raise _Wrong(f"you dropped {fraction:.1%} of the labels; with p = {p} about {p:.0%} should become null_class.")
    for edge, expected in ((0.0, cond), (1.0, torch.full_like(cond, null_class))):
        if not _close(_call(fn, cond, null_class, edge), expected):
            raise _Wrong(f"with p = {edge} the result should be {'cond unchanged' if edge == 0 else 'all null_class'}.")
    again = _call(fn, cond, null_class, p, generator=torch.Generator().manual_seed(1))
    if not (isinstance(again, Tensor) and torch.equal(again, got)):
        raise _Wrong("the same generator seed gave different labels: draw the random numbers with "
                     "the generator argument.")
    return f"your label dropout replaces {fraction:.1%} of the labels with null_class (p = {p})."



@_checker
def check_guided_eps(fn):
    """Check fn(eps_cond, eps_uncond, guidance_scale) -> eps against guidance.guided_eps."""
    eps_cond, eps_uncond = torch.randn(2, 2, 1, 4, 4)
    for scale in (3.0, 1.5):
        want = guidance.guided_eps(eps_cond, eps_uncond, scale)
        got = _call(fn, eps_cond, eps_uncond, scale)
        _compare(got, want, lambda: _first_match(got, {
            "you used Ho & Salimans' convention, (1 + w) eps_cond - w eps_uncond. Here guidance_scale "
            "= 1 must give the plain conditional prediction (their w is ours minus 1).":
                guidance.guided_eps(eps_cond, eps_uncond, scale + 1),
            "the two branches are swapped: guidance pushes away from the unconditional prediction, "
            "towards the conditional one.": guidance.guided_eps(eps_uncond, eps_cond, scale),
            "you returned only the guidance term: start from eps_uncond and add it.":
                scale * (eps_cond - eps_uncond),
        }))
    return "your guided noise prediction matches the reference."

