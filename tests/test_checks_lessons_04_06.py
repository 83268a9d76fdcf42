"""The derivations, predictions and helpers that lessons 04-06 add (issue 13): each numerical
reference accepts the reference closed form and rejects the mistakes the lesson's hints name."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_course import checks, generate, schedules
from diffusion_course.checks import editing as editing_checks
from diffusion_course.checks import guidance as guidance_checks
from diffusion_course.checks import sampling as sampling_checks


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


COSINE = schedules.cosine_schedule(1000)
T_CHECK = torch.tensor([1, 3, 10, 30, 300, 900])


def beta_tilde(schedule, t):
    return (1 - schedule.alpha_bar[t - 1]) / (1 - schedule.alpha_bar[t]) * schedule.beta[t]


def test_ddim_monte_carlo_matches_the_posterior_variance_on_both_schedules():
    for schedule in (COSINE, schedules.linear_schedule(1000)):
        estimate = sampling_checks.ddim_variance_monte_carlo(schedule, T_CHECK)
        assert torch.allclose(estimate, beta_tilde(schedule, T_CHECK).double(), rtol=0.03)


@pytest.mark.parametrize("mistake, value", [
    ("DDPM's beta_t instead of beta_tilde_t", lambda t: COSINE.beta[t]),
    ("the ratio of variances left out", lambda t: (1 - COSINE.alpha_bar[t]) * COSINE.beta[t]),
    ("sigma, not sigma squared", lambda t: beta_tilde(COSINE, t).sqrt()),
    ("alpha_t where alpha_bar belongs", lambda t: (1 - COSINE.alpha[t - 1]) / (1 - COSINE.alpha[t]) * COSINE.beta[t]),
])
def test_ddim_variance_derivation_rejects_mistakes(mistake, value, capsys):
    reference = sampling_checks.ddim_variance_monte_carlo(COSINE, T_CHECK)
    assert checks.check_derivation("v", lambda: beta_tilde(COSINE, T_CHECK), reference, rtol=0.05)
    assert not checks.check_derivation("v", lambda: value(T_CHECK), reference, rtol=0.05), mistake
    assert "❌" in capsys.readouterr().out


def test_ddim_variance_derivation_not_done_never_fails(capsys, monkeypatch):
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    def stub(): raise NotImplementedError("Exercise: ...")
    assert not checks.check_derivation("v", stub, torch.ones(3))
    assert not checks.check_derivation("v", ..., torch.ones(3))
    assert capsys.readouterr().out.count("Not done yet") == 2


W = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0], dtype=torch.float64)


def sharpened(w, a, b, m, first=lambda w: 1 - w):
    variance = 1 / (first(w) / a + w / b)
    return torch.stack([variance * w * m / b, variance])


def test_sharpened_gaussian_numerical_matches_the_closed_form():
    numerical = guidance_checks.sharpened_gaussian_numerical(W, 1.0, 0.25, 1.0)
    assert torch.allclose(numerical, sharpened(W, 1.0, 0.25, 1.0), rtol=1e-4, atol=1e-6)
    assert torch.allclose(numerical[:, 2], torch.tensor([1.0, 0.25], dtype=torch.float64), atol=1e-6)  # w = 1: the class


@pytest.mark.parametrize("mistake, value", [
    ("p(x) p(x|c)^w, forgetting that p(c|x) divides by p(x)", sharpened(W, 1.0, 0.25, 1.0, first=lambda w: 1 + 0 * w)),
    ("Ho and Salimans' w (ours minus 1)", sharpened(W + 1, 1.0, 0.25, 1.0)),
    ("precisions not weighted: variance b / w", torch.stack([torch.full_like(W, 1.0), 0.25 / W.clamp(min=1e-9)])),
])
def test_sharpened_gaussian_derivation_rejects_mistakes(mistake, value):
    numerical = guidance_checks.sharpened_gaussian_numerical(W, 1.0, 0.25, 1.0)
    assert checks.check_derivation("g", sharpened(W, 1.0, 0.25, 1.0), numerical, rtol=0.01, atol=1e-6)
    assert not checks.check_derivation("g", value, numerical, rtol=0.01, atol=1e-6), mistake


STRENGTHS = torch.tensor([0.1, 0.25, 0.5, 0.6, 0.75, 0.9], dtype=torch.float64)
FROM_SCHEDULE = COSINE.alpha_bar[(STRENGTHS * 1000).ceil().long() - 1].double()


def cosine_f(u):
    return torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


@pytest.mark.parametrize("mistake, value", [
    ("the amplitude sqrt(alpha_bar) instead of the variance", (cosine_f(STRENGTHS) / cosine_f(0 * STRENGTHS)).sqrt()),
    ("a straight line 1 - s", 1 - STRENGTHS),
    ("f without the offset s", torch.cos(STRENGTHS * math.pi / 2) ** 2),
])
def test_variance_kept_derivation(mistake, value):
    assert checks.check_derivation("k", cosine_f(STRENGTHS) / cosine_f(0 * STRENGTHS), FROM_SCHEDULE, rtol=0.01)
    assert not checks.check_derivation("k", value, FROM_SCHEDULE, rtol=0.01), mistake


def test_lesson_06_prediction_value_is_a_third():
    assert FROM_SCHEDULE[3].item() == pytest.approx(0.34, abs=0.005)


@pytest.mark.parametrize("name", ["ddim_eta_one_variance", "sharpened_gaussian", "variance_kept"])
def test_derivation_hints_have_three_tiers_and_are_found(name, capsys):
    for tier in (1, 2, 3):
        checks.hint(name, tier)
    assert capsys.readouterr().out.count(f"for {name}") == 3
    assert name in (sampling_checks.DERIVATION_HINTS | guidance_checks.DERIVATION_HINTS | editing_checks.DERIVATION_HINTS)


def test_generate_with_a_progress_bar_returns_the_same_images():
    """The lessons' long runs pass progress=True; the bar's callback must not replace the samples."""
    model = lambda x_t, t, cond: torch.zeros_like(x_t)
    options = dict(num=3, shape=(1, 4, 4), sampler="dpm", sampling_steps=3, seed=0)
    assert torch.equal(generate.generate(model, COSINE, progress=True, **options),
                       generate.generate(model, COSINE, **options))
