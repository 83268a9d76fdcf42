"""Lesson 11's checkers (teacher_digits, reflow_loss) and derivation reference
(guided_one_step_landing): each accepts the reference and rejects the mistakes its diagnoses name."""

from __future__ import annotations

import pytest
import torch

from diffusion_course import checks, distill, flow
from diffusion_course.checks import distill as distill_checks
from diffusion_course.guidance import guided


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


def teacher(*, guide=True, sampler=flow.heun_sample, steps_factor=1, fixed=None):
    """A teacher_digits with one mistake switched on (all off: the reference, written by hand)."""
    def fn(model, noise, labels, *, guidance_scale, steps):
        w, n = (guidance_scale, steps) if fixed is None else fixed
        net = guided(model, w) if guide else model
        return sampler(net, noise, flow.flow_time_grid(n * steps_factor), cond=labels)
    return fn


def test_teacher_digits_accepts_the_reference_and_a_hand_written_one(capsys):
    assert checks.check_teacher_digits(distill.teacher_digits)
    assert checks.check_teacher_digits(teacher())
    assert "✅ Passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, words", [
    (teacher(guide=False), "your digits are unguided"),
    (teacher(sampler=flow.euler_sample), "you used Euler's method"),
    (teacher(steps_factor=2), "wrong number of steps"),
    (teacher(fixed=(2.5, 3)), "use both arguments"),
])
def test_teacher_digits_names_the_mistake(capsys, fn, words):
    assert not checks.check_teacher_digits(fn)
    assert words in capsys.readouterr().out


def reflow(*, swap=False, fresh_noise=False, pass_cond=True):
    """A reflow_loss with one mistake switched on (all off: the reference, written by hand)."""
    def fn(model, pairs, *, cond=None, t=None, generator=None):
        x0, noise = pairs.chunk(2, dim=1)
        x0, noise = (noise, x0) if swap else (x0, noise)
        noise = torch.randn_like(noise) if fresh_noise else noise
        t = torch.rand(len(x0), generator=generator) if t is None else t
        tt = t.view(-1, 1, 1, 1)
        prediction = model((1 - tt) * x0 + tt * noise, 1000 * t, cond if pass_cond else None)
        return (prediction - (noise - x0)).pow(2).mean()
    return fn


def test_reflow_loss_accepts_the_reference_and_a_hand_written_one(capsys):
    assert checks.check_reflow_loss(distill.reflow_loss)
    assert checks.check_reflow_loss(reflow())
    assert "✅ Passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, words", [
    (reflow(swap=True), "the wrong way round"),
    (reflow(fresh_noise=True), "it draws fresh noise"),
    (reflow(pass_cond=False), "pass the labels on to the network"),
])
def test_reflow_loss_names_the_mistake(capsys, fn, words):
    assert not checks.check_reflow_loss(fn)
    assert words in capsys.readouterr().out


def test_the_landing_reference_is_the_guided_mix_of_the_two_means():
    """One guided Euler step from pure noise lands at m + w (mu_k - m), whatever the noise."""
    mixture = flow.GaussianMixture(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]), 0.2,
                                   torch.tensor([0.5, 0.3, 0.2]))
    noise = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    data_mean = mixture.weights @ mixture.means
    for w in (0.0, 1.0, 3.0):
        landing = distill_checks.guided_euler_landing(mixture, 1, w, noise)
        torch.testing.assert_close(landing, (data_mean + w * (mixture.means[1] - data_mean)).expand(7, 2),
                                   atol=1e-5, rtol=1e-5)
