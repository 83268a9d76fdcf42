"""Lesson 10 (one ODE, many samplers): the checker and hints of the exercise flow_matching_loss,
and the hints of the lesson's derivations, score_from_eps (checked with checks.check_derivation
against the gradient of the toy mixture's exact log-density) and x0_error_weight (against the
ratios of squared errors that x0_error_ratios measures).

Reference: flow.flow_matching_loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import flow
from ._harness import _call, _compare, _checker, _first_match, _Wrong

HINTS = {
    "flow_matching_loss": (
        "Flow matching trains the network to output the velocity of the straight path from data to noise. "
        "Which point of the path does the network see, which time does it see, and what is the velocity of a "
        "straight line that goes from x0 at time 0 to the noise at time 1?",
        "Eq. 1 of lesson 10: x_t = (1 - t) x0 + t noise, with t uniform in [0, 1] and noise standard normal "
        "(each drawn from the generator only when not given). Eq. 2: the target is noise - x0. The network "
        "is called as model(x_t, 1000 t, cond), and the loss is the mean squared error.",
        "draw t with torch.rand of shape (B,) and noise with torch.randn shaped like x0 (generator=generator) if None\n"
        "x_t = (1 - t) * x0 + t * noise      # t reshaped to (B, 1, ...) to broadcast\n"
        "velocity_pred = model(x_t, flow.TIME_SCALE * t, cond)\n"
        "return F.mse_loss(velocity_pred, noise - x0)",
    ),
}

DERIVATION_HINTS = {
    "x0_error_weight": (
        "Each target (the noise, the clean image, or v) is a fixed linear mix of x_t and the clean image at a "
        "given step. Write the clean-image guess that a predicted target implies, subtract it from the true "
        "clean image, and see what factor multiplies the target's error.",
        "With x_t = sqrt(a) x0 + sqrt(1 - a) eps: from eps, x0_hat = (x_t - sqrt(1 - a) eps_hat) / sqrt(a), so "
        "x0 - x0_hat = sqrt((1 - a) / a) (eps_hat - eps); from v = sqrt(a) eps - sqrt(1 - a) x0, "
        "x0_hat = sqrt(a) x_t - sqrt(1 - a) v_hat, so x0 - x0_hat = sqrt(1 - a) (v_hat - v). Square, and write "
        "the factors with SNR = a / (1 - a).",
        "snr = alpha_bar / (1 - alpha_bar)\n"
        "return {\"eps\": snr, \"x0\": torch.ones_like(alpha_bar), \"v\": snr + 1}[prediction]",
    ),
    "score_from_eps": (
        "Given which mixture component x0 came from, x_t is Gaussian. Write the gradient of the log of that "
        "Gaussian and compare it with the best guess of the noise given x_t: both are built from the same "
        "difference between x_t and its mean. What is the noise scale of the straight path at time t?",
        "Tweedie's formula: E[x0 | x_t] follows from the score, and since x_t = a x0 + s noise, "
        "E[noise | x_t] = -s * score(x_t). On the straight path s = t.",
        "the score is minus the predicted noise over the noise scale, and on the straight path the noise scale is t:\nreturn -eps_pred / t",
    ),
}

HINTS = {**HINTS, **DERIVATION_HINTS}


class _Probe(torch.nn.Module):
    """A fixed 'network' whose output depends on x_t and on the time it is given, and which
    remembers the inputs of its last call (x_t, t and cond). x_t: (B, ...) of any shape.
    (Lesson 11's reflow_loss checker uses it too.)"""

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        self.x_t, self.t, self.cond = x_t.detach(), t.detach(), cond
        return 0.5 * x_t - 0.002 * t.view(-1, *([1] * (x_t.ndim - 1))) + 0.3


def _variant(model, x0, t, noise, *, swap_path=False, target=None, time_scale=flow.TIME_SCALE, total=False) -> Tensor:
    """The loss with one ingredient changed, to recognise a mistake by its result."""
    tt = t.view(-1, 1)
    x_t = tt * x0 + (1 - tt) * noise if swap_path else (1 - tt) * x0 + tt * noise
    target = noise - x0 if target is None else target
    error = (model(x_t, time_scale * t) - target) ** 2
    return error.sum() if total else error.mean()


def _diagnose(got, model, x0, t, noise) -> str | None:
    return _first_match(got, {
        "your target has the wrong sign: the path goes from x0 (t = 0) to noise (t = 1), so its velocity is "
        "noise - x0.": _variant(model, x0, t, noise, target=x0 - noise),
        "your target is the noise: that is lesson 03's eps prediction. Flow matching regresses the velocity "
        "of the path, noise - x0.": _variant(model, x0, t, noise, target=noise),
        "your target is x0; flow matching regresses the velocity of the path, noise - x0.":
            _variant(model, x0, t, noise, target=x0),
        "your path runs the wrong way: at t = 0 x_t is the data x0, at t = 1 it is pure noise "
        "(x_t = (1 - t) x0 + t noise).": _variant(model, x0, t, noise, swap_path=True),
        "the network gets t in [0, 1]: call it with 1000 t (flow.TIME_SCALE), the range its time embedding "
        "was built for.": _variant(model, x0, t, noise, time_scale=1.0),
        "your loss is a sum over the elements, not their mean.": _variant(model, x0, t, noise, total=True),
    })


@_checker
def check_flow_matching_loss(fn):
    """Check fn(model, x0, *, cond=None, t=None, noise=None, generator=None) -> scalar against
    flow.flow_matching_loss."""
    model, x0 = _Probe(), torch.randn(6, 2)
    noise, t = torch.randn(6, 2), torch.tensor([0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
    want = flow.flow_matching_loss(model, x0, t=t, noise=noise)
    got = _call(fn, model, x0, t=t, noise=noise)
    if isinstance(got, Tensor) and got.numel() == 1 and got.shape != want.shape:
        got = got.reshape(want.shape)
    _compare(got, want, lambda: _diagnose(got, model, x0, t, noise))
    drawn = _call(fn, model, torch.randn(4000, 2))
    if not isinstance(drawn, Tensor) or drawn.numel() != 1:
        raise _Wrong("without t and noise your function should draw them and still return one number.")
    times = model.t / flow.TIME_SCALE
    if times.min() < 0 or times.max() > 1.0 or times.std() < 0.2:
        raise _Wrong(f"when t is None, draw it uniformly in [0, 1] (the network then sees 1000 t); the times "
                     f"the network saw, divided by 1000, ranged from {times.min():.3g} to {times.max():.3g}.")
    if abs(times.mean() - 0.5) > 0.05:
        raise _Wrong("when t is None, draw it uniformly in [0, 1] (torch.rand), not from another distribution.")
    return "your flow-matching loss matches the reference, and draws t and noise when they are not given."


def score_by_autograd(x: Tensor, t: float, mixture: flow.GaussianMixture) -> Tensor:
    """The exact score, grad_x log p_t(x), of the mixture noised along the straight path to time t,
    by automatic differentiation of flow.mixture_log_density: the reference for score_from_eps."""
    x = x.detach().double().requires_grad_(True)
    means = flow.GaussianMixture(mixture.means.double(), mixture.std, mixture.weights.double())
    log_p = flow.mixture_log_density(x, means, signal_scale=1 - t, noise_scale=t)
    return torch.autograd.grad(log_p.sum(), x)[0]


def x0_error_ratios(alpha_bar: Tensor, generator: torch.Generator | None = None, size: int = 4096) -> Tensor:
    """For each alpha_bar (a (T,) tensor): random clean data x0 and noise, and a wrong prediction of each
    target (eps, x0, v); the squared error of the target divided by the squared error of the clean-image
    guess it implies. Returns (3, T), rows in the order eps, x0, v (float64)."""
    a = alpha_bar.double().view(-1, 1)
    x0, eps = (torch.randn(len(a), size, generator=generator, dtype=torch.float64) for _ in range(2))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    guesses = {name: target + torch.randn(target.shape, generator=generator, dtype=torch.float64)
               for name, target in (("eps", eps), ("x0", x0), ("v", v))}
    x0_hat = {"eps": (x_t - (1 - a).sqrt() * guesses["eps"]) / a.sqrt(), "x0": guesses["x0"],
              "v": a.sqrt() * x_t - (1 - a).sqrt() * guesses["v"]}
    targets = {"eps": eps, "x0": x0, "v": v}
    return torch.stack([(targets[n] - guesses[n]).square().sum(1) / (x0 - x0_hat[n]).square().sum(1)
                        for n in ("eps", "x0", "v")])
