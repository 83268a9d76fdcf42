"""Lesson 08 (latent diffusion): the checkers and hints of the exercises kl_divergence,
sample_posterior and measure_scale_factor, and the hints of the lesson's derivation, latent_snr
(checked with checks.check_derivation against the signal-to-noise ratio measured on noised latents).

Reference: autoencoder.kl_divergence, autoencoder.sample_posterior, autoencoder.measure_scale_factor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import autoencoder
from ._harness import (_call, _checker, _compare, _expect_tensor, _first_match, _ignores_argument, _noise_problem,
                       _Wrong)

HINTS = {
    "kl_divergence": (
        "Each latent element has its own Gaussian N(mean, variance) and is compared with a standard normal. "
        "What is the variance, given its logarithm? The KL of independent elements is the sum of theirs; "
        "the function gives one number per image.",
        "Eq. 3 of lesson 08: KL = 1/2 (mean^2 + variance - 1 - log variance) per element, with "
        "variance = exp(logvar) (logvar is the log of the variance, not of the standard deviation). "
        "Sum over every element of an image (channels, height, width), not the mean.",
        "per_element = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)\n"
        "return per_element.flatten(1).sum(dim=1)      # (B,): one KL per image, in nats",
    ),
    "sample_posterior": (
        "A sample of N(mean, variance) is the mean plus the standard deviation times a standard normal "
        "draw: the randomness sits in the noise, so gradients reach mean and logvar. What is the standard "
        "deviation, given the log of the variance?",
        "Eq. 4 of lesson 08: z = mean + exp(logvar / 2) * noise. The standard deviation is exp(logvar / 2) "
        "(the square root of exp(logvar)). Use the given noise; when it is None, draw a standard normal of "
        "the mean's shape from the generator.",
        "mean, logvar = posterior\n"
        "if noise is None:\n"
        "    noise = torch.randn(mean.shape, generator=generator)\n"
        "return mean + torch.exp(0.5 * logvar) * noise",
    ),
    "measure_scale_factor": (
        "The diffusion model should see latents of unit standard deviation. Which latents does it see (the "
        "posterior means, not samples), what is their spread over all elements of all images, and what "
        "number turns that spread into 1?",
        "Encode the images a batch at a time without gradients, keep the posterior means, put them "
        "together, and return 1 / (their standard deviation over every element) as a Python float "
        "(Stable Diffusion's 0.18215 is 1 / 5.49).",
        "with torch.no_grad():\n"
        "    means = torch.cat([model.encode(batch).mean for batch in images.split(batch_size)])\n"
        "return 1.0 / means.std().item()",
    ),
}

DERIVATION_HINTS = {
    "latent_snr": (
        "At step t the noised latent is sqrt(alpha_bar) z + sqrt(1 - alpha_bar) noise. The signal-to-noise "
        "ratio is the variance of the first part over the variance of the second. What is the variance of "
        "a number times z, when z has standard deviation s?",
        "Var(c z) = c^2 Var(z) = c^2 s^2 and the noise has variance 1, so "
        "SNR = alpha_bar s^2 / (1 - alpha_bar): lesson 01's SNR multiplied by s^2.",
        "return alpha_bar * latent_std ** 2 / (1 - alpha_bar)",
    ),
}

HINTS = {**HINTS, **DERIVATION_HINTS}


def _kl(mean: Tensor, logvar: Tensor, *, variance: Tensor | None = None, log_variance: Tensor | None = None,
        half: float = 0.5, minus_one: float = 1.0, reduce: str = "sum") -> Tensor:
    """The KL with one ingredient changed, to recognise a mistake by its result."""
    variance = logvar.exp() if variance is None else variance
    log_variance = logvar if log_variance is None else log_variance
    per_element = (half * (mean ** 2 + variance - minus_one - log_variance)).flatten(1)
    return per_element.sum(1) if reduce == "sum" else per_element.mean(1)


def _diagnose_kl(got: Tensor, mean: Tensor, logvar: Tensor) -> str | None:
    variance = logvar.exp()
    return _first_match(got, {
        "you used logvar as the log of the standard deviation: it is the log of the variance, so the "
        "variance is exp(logvar) and log variance is logvar itself.":
            _kl(mean, logvar, variance=(2 * logvar).exp(), log_variance=2 * logvar),
        "the factor 1/2 in front of the bracket is missing.": _kl(mean, logvar, half=1.0),
        "your KL is a mean over the latent elements; it should be their sum (the KL of independent elements "
        "adds up).": _kl(mean, logvar, reduce="mean"),
        "the -1 in the bracket is missing (at mean 0 and logvar 0 the KL must be 0).": _kl(mean, logvar, minus_one=0.0),
        "the sign of the log-variance term is flipped: the bracket ends with - logvar.":
            _kl(mean, logvar, log_variance=-logvar),
        "you used the standard deviation exp(logvar / 2) where the variance exp(logvar) belongs.":
            _kl(mean, logvar, variance=(logvar / 2).exp()),
        "that is the KL the other way round, KL(N(0, 1) || q); the loss needs KL(q || N(0, 1)).":
            (0.5 * ((1 + mean ** 2) / variance - 1 + logvar)).flatten(1).sum(1),
    })


@_checker
def check_kl_divergence(fn):
    """Check fn(mean, logvar) -> (B,) KL in nats against autoencoder.kl_divergence."""
    generator = torch.Generator().manual_seed(8)
    mean = torch.randn(3, 4, 2, 5, generator=generator)
    logvar = torch.rand(3, 4, 2, 5, generator=generator) * 3 - 2     # in [-2, 1]
    want = autoencoder.kl_divergence(mean, logvar)
    got = _call(fn, mean, logvar)
    if isinstance(got, Tensor) and got.numel() == 1 and want.numel() != 1:
        raise _Wrong("your function returned one number for the whole batch: return one KL per image, "
                     f"shape {tuple(want.shape)} (sum over each image's elements only).")
    if isinstance(got, Tensor) and got.shape == mean.shape:
        raise _Wrong("your function returned the KL of every element: sum them per image, shape (B,).")
    if isinstance(got, Tensor) and not bool(torch.isfinite(got).all()):
        raise _Wrong("your KL has NaN or infinite values: is a log taken of a negative number? logvar is "
                     "already a logarithm; the variance is exp(logvar).")
    _compare(got, want, lambda: _diagnose_kl(got, mean, logvar))
    zero = _call(fn, torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2))
    _compare(zero, torch.zeros(2))
    return "your KL matches the closed form, per image, and is 0 when q is the standard normal itself."


def _diagnose_sample(got: Tensor, mean: Tensor, logvar: Tensor, noise: Tensor) -> str | None:
    return _first_match(got, {
        "you scaled the noise by the variance exp(logvar); the standard deviation exp(logvar / 2) belongs "
        "there.": mean + logvar.exp() * noise,
        "you scaled the noise by logvar itself: it is the log of the variance, so the standard deviation "
        "is exp(logvar / 2).": mean + logvar * noise,
        "the mean is missing: z = mean + standard deviation * noise.": (logvar / 2).exp() * noise,
        "you scaled the noise by exp(2 logvar), as if logvar were the log of the standard deviation; the "
        "standard deviation is exp(logvar / 2).": mean + (2 * logvar).exp() * noise,
        "you multiplied the mean by the standard deviation; the noise is what gets scaled, then the mean is "
        "added.": mean * (logvar / 2).exp() + noise,
    })


@_checker
def check_sample_posterior(fn):
    """Check fn(posterior, *, noise=None, generator=None) -> z against autoencoder.sample_posterior."""
    mean, logvar = torch.randn(2, 4, 3, 5), torch.rand(2, 4, 3, 5) * 3 - 2
    posterior, noise = autoencoder.Posterior(mean, logvar), torch.randn(2, 4, 3, 5)
    want = autoencoder.sample_posterior(posterior, noise=noise)
    got = _call(fn, posterior, noise=noise)
    _compare(got, want, lambda: _diagnose_sample(got, mean, logvar, noise)
             or _ignores_argument(fn, got, "noise", posterior, noise=noise))
    wide = autoencoder.Posterior(torch.full((4000, 4, 1, 1), 0.5), torch.full((4000, 4, 1, 1), math.log(4.0)))
    drawn = _call(fn, wide, generator=torch.Generator().manual_seed(1))
    _expect_tensor(drawn, wide.mean.shape)
    problem = _noise_problem((drawn - 0.5) / 2)
    if problem:
        raise _Wrong(f"without noise, draw a standard normal yourself: {problem}")
    again = _call(fn, wide, generator=torch.Generator().manual_seed(1))
    if not torch.equal(drawn, again):
        raise _Wrong("with the same generator (same seed) your function drew different noise: draw it from "
                     "the given generator (torch.randn takes generator=...).")
    return "your samples match the reparameterisation z = mean + exp(logvar / 2) * noise, and draw their own noise."


def _probe_autoencoder() -> autoencoder.Autoencoder:
    """A tiny, fixed (randomly initialised) autoencoder whose latents have a nonzero mean and a
    posterior variance far from zero, so that the usual mistakes give different numbers."""
    torch.manual_seed(3)
    model = autoencoder.Autoencoder(autoencoder.AutoencoderConfig(base_channels=8, channel_mults=(1, 2)))
    with torch.no_grad():
        bias = model.encoder.conv_out.bias
        bias[:4] += 0.8      # latent means away from zero
        bias[4:] = 0.5       # posterior log-variance around 0.5
    return model.train()


def _diagnose_scale(got: float, means: Tensor, samples: Tensor) -> str | None:
    std = means.std().item()
    per_channel = means.transpose(0, 1).flatten(1).std(1)
    mistakes = {
        "you returned the standard deviation itself; the scale factor is 1 / std, so that "
        "scale_factor * z has standard deviation 1.": std,
        "you returned 1 / variance; the scale factor is 1 / standard deviation.": 1 / std ** 2,
        "you measured the root mean square of the latents, not their standard deviation (around their mean).":
            1 / means.pow(2).mean().sqrt().item(),
        "you measured posterior samples; the diffusion model is trained on the posterior means "
        "(encode_latents), so measure those.": 1 / samples.std().item(),
        "you averaged per-channel standard deviations; take one standard deviation over all elements.":
            1 / per_channel.mean().item(),
    }
    return next((message for message, value in mistakes.items() if math.isclose(got, value, rel_tol=0.03)), None)


@_checker
def check_measure_scale_factor(fn):
    """Check fn(model, images, batch_size=256) -> float against autoencoder.measure_scale_factor."""
    model = _probe_autoencoder()
    images = torch.rand(10, 3, 16, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1   # inputs to code
    want = autoencoder.measure_scale_factor(model, images, batch_size=4)
    got = _call(fn, model, images, batch_size=4)
    if isinstance(got, Tensor):
        if got.numel() != 1:
            raise _Wrong(f"your function returned a tensor of shape {tuple(got.shape)}: return one number, "
                         "1 / the standard deviation over all elements.")
        got = got.item()
    if not isinstance(got, (int, float)) or isinstance(got, bool):
        raise _Wrong(f"your function returned a {type(got).__name__}; return a float.")
    if not math.isclose(got, want, rel_tol=1e-4):
        with torch.no_grad():
            model.eval()
            posterior = model.encode(images)
            samples = autoencoder.sample_posterior(posterior, generator=torch.Generator().manual_seed(5))
        raise _Wrong(_diagnose_scale(got, posterior.mean, samples)
                     or f"your scale factor is {got:.4g}; the reference measures {want:.4g}.")
    return f"your scale factor matches the reference ({want:.4g} on a small random autoencoder)."


def measured_snr(z: Tensor, alpha_bar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The signal-to-noise ratio of noised latents, measured: for each alpha_bar (a (K,) tensor),
    noise z the way q_sample does and return Var(signal part) / Var(noise part), a (K,) tensor."""
    ratios = []
    for a in alpha_bar.tolist():
        signal = math.sqrt(a) * z
        noise_part = math.sqrt(1 - a) * torch.randn(z.shape, generator=generator, dtype=z.dtype)
        ratios.append(signal.var() / noise_part.var())
    return torch.stack(ratios)
