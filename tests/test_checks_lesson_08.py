"""Lesson 08's checkers (kl_divergence, sample_posterior, measure_scale_factor) and derivation
reference (latent_snr): each accepts the reference and rejects the mistakes its diagnoses name."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_course import autoencoder, checks
from diffusion_course.checks import autoencoder as ae_checks


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


def make_kl(*, variance=lambda lv: lv.exp(), log_variance=lambda lv: lv, half=0.5, minus_one=1.0, reduce="sum"):
    """A closed-form KL with one mistake switched on (all off: the reference)."""
    def kl_divergence(mean, logvar):
        per_element = half * (mean ** 2 + variance(logvar) - minus_one - log_variance(logvar))
        if reduce == "sum":
            return per_element.flatten(1).sum(1)
        if reduce == "mean":
            return per_element.flatten(1).mean(1)
        return {"batch": per_element.sum(), "none": per_element}[reduce]
    return kl_divergence


def test_kl_accepts_the_reference_and_a_hand_written_one(capsys):
    assert checks.check_kl_divergence(autoencoder.kl_divergence)
    assert checks.check_kl_divergence(make_kl())
    assert checks.check_kl_divergence(
        lambda m, lv: torch.distributions.kl_divergence(torch.distributions.Normal(m, (lv / 2).exp()),
                                                        torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1))
    assert "✅ Passed" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, fn, words", [
    ("logvar as log std", make_kl(variance=lambda lv: (2 * lv).exp(), log_variance=lambda lv: 2 * lv),
     "log of the standard deviation"),
    ("missing 1/2", make_kl(half=1.0), "factor 1/2"),
    ("mean, not sum", make_kl(reduce="mean"), "mean over the latent elements"),
    ("one number for the batch", make_kl(reduce="batch"), "one number for the whole batch"),
    ("no reduction", make_kl(reduce="none"), "KL of every element"),
    ("missing -1", make_kl(minus_one=0.0), "the -1 in the bracket"),
    ("+ logvar", make_kl(log_variance=lambda lv: -lv), "sign of the log-variance term"),
    ("std for variance", make_kl(variance=lambda lv: (lv / 2).exp()), "standard deviation exp(logvar / 2)"),
    ("logvar as the variance", make_kl(variance=lambda lv: lv, log_variance=lambda lv: lv.log()), "NaN"),
    ("KL(p || q)", lambda m, lv: (0.5 * ((1 + m ** 2) / lv.exp() - 1 + lv)).flatten(1).sum(1), "other way round"),
])
def test_kl_rejects_the_usual_mistakes(mistake, fn, words, capsys):
    assert not checks.check_kl_divergence(fn), mistake
    out = capsys.readouterr().out
    assert "❌" in out and words in out, out


def make_sample(*, scale=lambda lv: (lv / 2).exp(), with_mean=True, own_noise=False, draw=torch.randn,
                use_generator=True):
    """A reparameterised sampler with one mistake switched on (all off: the reference)."""
    def sample_posterior(posterior, *, noise=None, generator=None):
        mean, logvar = posterior
        if noise is None or own_noise:
            noise = draw(mean.shape, generator=generator if use_generator else None)
        return (mean if with_mean else 0) + scale(logvar) * noise
    return sample_posterior


def test_sample_accepts_the_reference_and_a_hand_written_one(capsys):
    assert checks.check_sample_posterior(autoencoder.sample_posterior)
    assert checks.check_sample_posterior(make_sample())
    assert checks.check_sample_posterior(make_sample(scale=lambda lv: lv.exp().sqrt()))
    assert "✅ Passed" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, fn, words", [
    ("exp(logvar)", make_sample(scale=lambda lv: lv.exp()), "by the variance exp(logvar)"),
    ("logvar as std", make_sample(scale=lambda lv: lv), "by logvar itself"),
    ("exp(2 logvar)", make_sample(scale=lambda lv: (2 * lv).exp()), "exp(2 logvar)"),
    ("no mean", make_sample(with_mean=False), "the mean is missing"),
    ("noise ignored", make_sample(own_noise=True), "use the given noise"),
    ("rand for randn", make_sample(draw=torch.rand), "torch.rand instead of torch.randn"),
    ("generator ignored", make_sample(use_generator=False), "given generator"),
])
def test_sample_rejects_the_usual_mistakes(mistake, fn, words, capsys):
    assert not checks.check_sample_posterior(fn), mistake
    out = capsys.readouterr().out
    assert "❌" in out and words in out, out


def make_scale(*, statistic=lambda z: 1 / z.std(), latents="mean", per_batch=False, as_float=True):
    """A scale-factor measurement with one mistake switched on (all off: the reference)."""
    def measure_scale_factor(model, images, batch_size=256):
        with torch.no_grad():
            posteriors = [model.encode(batch) for batch in images.split(batch_size)]
            parts = [p.mean if latents == "mean" else autoencoder.sample_posterior(p) for p in posteriors]
        if per_batch:
            value = torch.stack([statistic(z) for z in parts]).mean()
        else:
            value = statistic(torch.cat(parts))
        return value.item() if as_float else value
    return measure_scale_factor


def test_scale_accepts_the_reference_and_a_hand_written_one(capsys):
    assert checks.check_measure_scale_factor(autoencoder.measure_scale_factor)
    assert checks.check_measure_scale_factor(make_scale())
    assert checks.check_measure_scale_factor(make_scale(as_float=False))   # a 0-d tensor is fine too
    assert "✅ Passed" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, fn, words", [
    ("std, not 1/std", make_scale(statistic=lambda z: z.std()), "the standard deviation itself"),
    ("1/variance", make_scale(statistic=lambda z: 1 / z.var()), "1 / variance"),
    ("root mean square", make_scale(statistic=lambda z: 1 / z.pow(2).mean().sqrt()), "root mean square"),
    ("posterior samples", make_scale(latents="sample"), "posterior samples"),
    ("per-channel mean", make_scale(statistic=lambda z: 1 / z.transpose(0, 1).flatten(1).std(1).mean()),
     "per-channel"),
    ("per-channel tensor", make_scale(statistic=lambda z: 1 / z.transpose(0, 1).flatten(1).std(1), as_float=False),
     "return one number"),
    ("mean of batch stds", make_scale(per_batch=True), "the reference measures"),
])
def test_scale_rejects_the_usual_mistakes(mistake, fn, words, capsys):
    assert not checks.check_measure_scale_factor(fn), mistake
    out = capsys.readouterr().out
    assert "❌" in out and words in out, out


def test_not_done_and_strict_mode(monkeypatch, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError("Exercise: ...")
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    for checker in (checks.check_kl_divergence, checks.check_sample_posterior, checks.check_measure_scale_factor):
        assert not checker(stub)
        assert "Not done yet" in capsys.readouterr().out
    with pytest.raises(AssertionError):
        checks.check_kl_divergence(make_kl(half=1.0))


Z = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3.0 + 0.5
ALPHA_BAR = torch.tensor([0.9, 0.5, 0.1, 0.01], dtype=torch.float64)


def test_snr_derivation_accepts_the_formula_and_rejects_mistakes():
    measured = ae_checks.measured_snr(Z, ALPHA_BAR, generator=torch.Generator().manual_seed(1))
    std = Z.std().item()
    assert checks.check_derivation("SNR", ALPHA_BAR * std ** 2 / (1 - ALPHA_BAR), measured, rtol=0.05)
    for mistake in (ALPHA_BAR / (1 - ALPHA_BAR), ALPHA_BAR * std / (1 - ALPHA_BAR),
                    ALPHA_BAR.sqrt() * std / (1 - ALPHA_BAR).sqrt(), ALPHA_BAR * std ** 2):
        assert not checks.check_derivation("SNR", mistake, measured, rtol=0.05)


def test_kl_closed_form_agrees_with_monte_carlo():
    """What the lesson checks: the closed form against E_q[log q(z) - log p(z)] from samples."""
    generator = torch.Generator().manual_seed(2)
    mean, logvar = torch.randn(2, 3, 2, 2, generator=generator), torch.rand(2, 3, 2, 2, generator=generator) - 1
    z = autoencoder.sample_posterior(autoencoder.Posterior(mean.expand(40000, *mean.shape),
                                                           logvar.expand(40000, *logvar.shape)), generator=generator)
    log_q = -0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 / logvar.exp())
    log_p = -0.5 * (math.log(2 * math.pi) + z ** 2)
    estimate = (log_q - log_p).flatten(2).sum(2).mean(0)
    assert torch.allclose(autoencoder.kl_divergence(mean, logvar), estimate, rtol=0.05)


def test_every_hint_has_three_tiers():
    assert set(ae_checks.HINTS) == {"kl_divergence", "sample_posterior", "measure_scale_factor", "latent_snr"}
    assert all(len(tiers) == 3 for tiers in ae_checks.HINTS.values())
