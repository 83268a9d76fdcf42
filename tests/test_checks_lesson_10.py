"""Lesson 10's checker (flow_matching_loss) and derivation reference (score_from_eps): each
accepts the reference and rejects the mistakes its diagnoses name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusion_course import checks, flow
from diffusion_course.checks import flow as flow_checks


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


def make_loss(*, sign=1, target="velocity", swap=False, scale=flow.TIME_SCALE, reduce="mean", draw_t=torch.rand,
              fixed_noise=False):
    """A flow-matching loss with one mistake switched on (all off: the reference)."""
    def loss(model, x0, *, cond=None, t=None, noise=None, generator=None):
        t = draw_t(x0.shape[0]) if t is None else t
        noise = torch.randn_like(x0) if noise is None or fixed_noise else noise
        tt = t.view(-1, 1)
        x_t = tt * x0 + (1 - tt) * noise if swap else (1 - tt) * x0 + tt * noise
        goal = {"velocity": sign * (noise - x0), "noise": noise, "x0": x0}[target]
        error = (model(x_t, scale * t, cond) - goal) ** 2
        return error.sum() if reduce == "sum" else error.mean()
    return loss


def test_accepts_the_reference_and_a_hand_written_loss(capsys):
    assert checks.check_flow_matching_loss(flow.flow_matching_loss)
    assert checks.check_flow_matching_loss(make_loss())
    assert "✅ Passed" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, fn, words", [
    ("x0 - noise", make_loss(sign=-1), "wrong sign"),
    ("eps prediction", make_loss(target="noise"), "lesson 03's eps prediction"),
    ("x0 prediction", make_loss(target="x0"), "your target is x0"),
    ("path the wrong way", make_loss(swap=True), "path runs the wrong way"),
    ("t not scaled", make_loss(scale=1.0), "1000 t"),
    ("sum, not mean", make_loss(reduce="sum"), "sum over the elements"),
    ("integer steps for t", make_loss(draw_t=lambda n: torch.randint(0, 1000, (n,)).float()), "uniformly in [0, 1]"),
    ("t from a normal", make_loss(draw_t=lambda n: torch.randn(n).abs().clamp(max=1) * 0.6), "uniformly"),
    ("noise ignored when given", make_loss(fixed_noise=True), "differs from the reference"),
])
def test_rejects_the_usual_mistakes(mistake, fn, words, capsys):
    assert not checks.check_flow_matching_loss(fn), mistake
    out = capsys.readouterr().out
    assert "❌" in out and words in out, out


def test_not_done_and_strict_mode(monkeypatch, capsys):
    def stub(model, x0, *, cond=None, t=None, noise=None, generator=None):
        raise NotImplementedError("Exercise: ...")
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    assert not checks.check_flow_matching_loss(stub)
    assert "Not done yet" in capsys.readouterr().out
    with pytest.raises(AssertionError):
        checks.check_flow_matching_loss(make_loss(sign=-1))


MIXTURE = flow.ring_mixture(6)
X = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.95])   # not 0.5, where 1 - t = t
def test_score_derivation_accepts_tweedie_and_rejects_mistakes(t):
    reference = flow_checks.score_by_autograd(X, t, MIXTURE)
    means = flow.GaussianMixture(MIXTURE.means.double(), MIXTURE.std, MIXTURE.weights.double())
    eps = flow.mixture_eps(X, means, signal_scale=1 - t, noise_scale=t)
    assert checks.check_derivation("score", -eps / t, reference, rtol=1e-4, atol=1e-6)
    for mistake in (eps / t, -eps * t, -eps / t ** 2, -eps / (1 - t), -eps):
        assert not checks.check_derivation("score", mistake, reference, rtol=1e-4, atol=1e-6)


def test_every_hint_has_three_tiers():
    assert set(flow_checks.HINTS) == {"flow_matching_loss", "score_from_eps", "x0_error_weight"}
    assert all(len(tiers) == 3 for tiers in flow_checks.HINTS.values())


def test_x0_error_weights_match_the_measured_ratios_and_refuse_mix_ups():
    """The derivation of section 10: eps, x0 and v predictions weigh the clean-image error by SNR, 1 and
    SNR + 1. The tier-3 hint, run, passes the check; swapped or inverted weights do not."""
    alpha_bar = torch.tensor([0.02, 0.3, 0.7, 0.98], dtype=torch.float64)
    measured = flow_checks.x0_error_ratios(alpha_bar, torch.Generator().manual_seed(0))
    namespace = {"torch": torch}
    exec("def x0_error_weight(alpha_bar, prediction):\n    " + flow_checks.DERIVATION_HINTS["x0_error_weight"][2]
         .replace("\n", "\n    "), namespace)
    mine = torch.stack([namespace["x0_error_weight"](alpha_bar, n) for n in ("eps", "x0", "v")])
    assert checks.check_derivation("weights", mine, measured, rtol=1e-6)
    snr = alpha_bar / (1 - alpha_bar)
    for wrong in (torch.stack([1 / snr, torch.ones_like(snr), snr + 1]), torch.stack([snr, torch.ones_like(snr), snr]),
                  torch.stack([snr + 1, torch.ones_like(snr), snr])):
        assert not checks.check_derivation("weights", wrong, measured, rtol=1e-6)
