"""Lesson 03 (training): checkers and hints for the exercises diffusion_loss and train_step, against
training.diffusion_loss and training.train_step (with a loss function whose t and noise are fixed, so
both steps see the same batch); hints for the derivation noise_error_per_x0_error (check_derivation).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import schedules, training
from ._harness import (_call, _checker, _close, _compare, _first_match, _ignores_argument, _max_error,
                       _noise_problem, _recover_noise, _schedule_with, _Wrong)

HINTS = {
    "diffusion_loss": (
        "The network is trained to recognise the noise that was mixed into an image. What do you need "
        "to make a noisy image for each picture of the batch, and what do you compare the model's "
        "prediction with?",
        "DDPM's simplified loss (Ho et al. 2020, Eq. 14): draw t uniformly from 0, ..., T - 1 and eps "
        "standard normal when they are not given, make x_t with lesson 01's closed form, and return the "
        "mean over all pixels and images of (eps - model(x_t, t, cond)) squared.",
        "if t is None: t = torch.randint(0, schedule.num_steps, (B,))\n"
        "if noise is None: noise = torch.randn_like(x0)\n"
        "x_t = schedules.q_sample(x0, t, schedule, noise)\n"
        "return F.mse_loss(model(x_t, t, cond), noise)",
    ),
    "train_step": (
        "One training step is: measure how wrong the model is on this batch, find which way each weight "
        "should move, move it. What must be cleared first so that one step's gradients do not add up "
        "with the last step's, and what should the function give back so that no graph stays alive?",
        "Algorithm 1 of DDPM (lesson 03, section 3), step 3: one gradient step on the loss. The loss is "
        "the loss function applied to the model and the batch (with the condition passed on by name); "
        "the gradient norm is clipped to grad_clip when grad_clip is set.",
        "loss = loss_fn(model, x0, cond=cond)\n"
        "optimizer.zero_grad(); loss.backward()\n"
        "if grad_clip: torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n"
        "optimizer.step(); return loss.item()",
    ),
}
DERIVATION_HINTS = {
    "noise_error_per_x0_error": (
        "Both errors come from the same x_t. If the model's noise guess is off by some amount, how far off is "
        "the clean image you get by solving lesson 01's closed form for x0 with that guess?",
        "Section 1's x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t). Subtract it from the "
        "same formula with the true eps; square; the ratio of the squares is a function of alpha_bar_t alone "
        "(lesson 01 gave it a name).",
        "x0 - x0_hat = sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t) * (eps_hat - eps), so the factor is\n"
        "alpha_bar_t / (1 - alpha_bar_t), the SNR",
    ),
}
HINTS = {**HINTS, **DERIVATION_HINTS}


class _TinyDenoiser(nn.Module):
    """A stand-in for the U-Net with the same contract: tiny, fast and deterministic."""
    def __init__(self, num_steps: int, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.time_scale = nn.Embedding(num_steps, 1)
        self.class_shift = nn.Embedding(num_classes + 1, 1)
        self.null_class = num_classes

    def forward(self, x_t, t, cond=None):
        eps_pred = self.conv(x_t) * (1 + self.time_scale(t)[:, :, None, None])
        if cond is not None:
            eps_pred = eps_pred + self.class_shift(cond)[:, :, None, None]
        return eps_pred


class _Recorder(nn.Module):
    """Wraps a model and records the (x_t, t, cond) of every call."""
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.null_class = model.null_class
        self.calls = []

    def forward(self, x_t, t, cond=None):
        self.calls.append((x_t.detach().clone(), t.clone(), cond))
        return self.model(x_t, t, cond)


@_checker
def check_diffusion_loss(fn):
    """Check fn(model, x0, schedule, cond=None, t=None, noise=None) -> scalar against training.diffusion_loss
    (both called with cond, t and noise by name)."""
    schedule = schedules.linear_schedule(50)
    model = _TinyDenoiser(schedule.num_steps)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t, noise, cond = torch.tensor([2, 11, 30, 47]), torch.randn_like(x0), torch.tensor([0, 1, 2, 3])
    want = training.diffusion_loss(model, x0, schedule, cond=cond, t=t, noise=noise)
    got = _call(fn, model, x0, schedule, cond=cond, t=t, noise=noise)
    if isinstance(got, (float, int)):
        raise _Wrong("you returned a Python number: return the loss tensor (.item() or float() cut it "
                     "off from the gradients that training needs).")
    if isinstance(got, Tensor) and got.numel() > 1:
        raise _Wrong(f"your loss has shape {tuple(got.shape)}, not a scalar: missing mean? Average the "
                     "squared error over all pixels and all images.")
    got = got.reshape(()) if isinstance(got, Tensor) else got

    def diagnose():
        x_t = schedules.q_sample(x0, t, schedule, noise)
        eps_pred = model(x_t, t, cond)
        return _first_match(got, {
            "you compared the prediction with x0; the model predicts the noise.": F.mse_loss(eps_pred, x0),
            "looks like a sum instead of a mean over the pixels and images.": want * x0.numel(),
            "the noising uses alpha_t rather than alpha_bar_t (the cumulative product).":
                training.diffusion_loss(model, x0, _schedule_with(schedule, alpha_bar=schedule.alpha),
                                        cond=cond, t=t, noise=noise),
            "the model should see the noisy x_t, not the clean x0.": F.mse_loss(model(x0, t, cond), noise),
            "cond was not passed on to the model.": training.diffusion_loss(model, x0, schedule, t=t, noise=noise),
        }) or _ignores_argument(fn, got, "t and noise", model, x0, schedule, cond=cond, t=t, noise=noise)

    _compare(got, want, diagnose)
    if not got.requires_grad:
        raise _Wrong("your loss has no gradient: do not compute it under torch.no_grad() or detach it.")
    _check_drawn_t_and_noise(fn, model, schedule)
    return "your diffusion loss matches the reference."


def _check_drawn_t_and_noise(fn, model, schedule) -> None:
    """With t=None and noise=None the model must get one valid random step per image and standard normal noise."""
    recorder = _Recorder(model)
    x0 = torch.rand(64, 1, 8, 8) * 2 - 1
    _call(fn, recorder, x0, schedule)
    if not recorder.calls:
        raise _Wrong("your function never called the model.")
    x_t, t, _ = recorder.calls[0]
    try:
        schedules.check_timesteps(t, schedule, x0.shape[0])
    except ValueError as error:
        raise _Wrong(f"with t=None, the t you drew is not valid: {error}") from None
    if t.unique().numel() == 1:
        raise _Wrong("with t=None, every image got the same t: draw one random step per image.")
    problem = _noise_problem(_recover_noise(x_t, x0, t, schedule))
    if problem:
        raise _Wrong(problem + " (This is the case noise=None.)")


def _parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def _reference_step(model: nn.Module, x0, loss_fn, cond, grad_clip) -> Tensor:
    """The parameters after training.train_step on a copy of model (SGD keeps no state)."""
    model = copy.deepcopy(model)
    training.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x0, loss_fn, cond=cond, grad_clip=grad_clip)
    return _parameters(model)


def _step_diagnosis(step: int, grad_clip: float, got: Tensor, start: nn.Module, x0, loss_fn, cond) -> str:
    """Why the parameters after the learner's step differ from the reference's."""
    other_clip = 0.0 if grad_clip else 1.0
    if _close(got, _reference_step(start, x0, loss_fn, cond, other_clip)):
        if grad_clip:
            return (f"the parameters moved as if the gradient was not clipped: with grad_clip = {grad_clip}, "
                    "clip the gradients' total norm to grad_clip after backward() and before optimizer.step().")
        return "with grad_clip = 0 the gradient must not be clipped: clip only when grad_clip is set."
    if step > 1:
        return ("the first step was right but a later one was not: the gradients of the earlier steps are "
                "accumulating. Did you forget optimizer.zero_grad()?")
    return ("the loss is right but the parameters changed differently from one optimizer step on its "
            f"gradient (up to {_max_error(got, _reference_step(start, x0, loss_fn, cond, grad_clip)):.3g}).")


def _call_step(fn, *args, **kwargs):
    try:
        return _call(fn, *args, **kwargs)
    except _Wrong as wrong:
        if "multiple values for argument" in str(wrong):
            raise _Wrong(f"{wrong}\n   Call the loss function as loss_fn(model, x0, cond=cond): "
                         "cond goes by name.") from None
        raise


@_checker
def check_train_step(fn):
    """Check fn(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0) -> float over three steps: after
    each, the model must match training.train_step run on a reference copy (clipped twice, then not), with
    loss_fn training.diffusion_loss with the schedule, t and noise fixed."""
    schedule = schedules.linear_schedule(50)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    cond = torch.tensor([0, 1, 2, 3])
    t, noise = torch.tensor([2, 11, 30, 47]), torch.randn_like(x0)
    loss_fn = functools.partial(training.diffusion_loss, schedule=schedule, t=t, noise=noise)
    model = _Recorder(_TinyDenoiser(schedule.num_steps))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = copy.deepcopy(model.model)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step, grad_clip in enumerate((1.0, 1.0, 0.0), start=1):
        before, calls, start = _parameters(model), len(model.calls), copy.deepcopy(reference)
        loss = _call_step(fn, model, optimizer, x0, loss_fn, cond=cond, grad_clip=grad_clip)
        if isinstance(loss, Tensor):
            raise _Wrong("you returned a tensor: return the loss as a float (loss.item()), so the "
                         "training loop does not keep every step's graph alive.")
        if not isinstance(loss, float):
            raise _Wrong(f"you returned a {type(loss).__name__}: return the loss as a float (loss.item()).")
        if len(model.calls) == calls:
            raise _Wrong("your function never called the model (through loss_fn).")
        if model.calls[calls][2] is None:
            raise _Wrong("cond was not passed on to the loss function (loss_fn(model, x0, cond=cond)).")
        if torch.equal(_parameters(model), before) and not grad_clip:
            raise _Wrong("with grad_clip = 0 the parameters did not change: clip only when grad_clip is set "
                         "(a maximum norm of 0 zeroes the gradient).")
        if torch.equal(_parameters(model), before):
            raise _Wrong("the parameters did not change: call loss.backward() and then optimizer.step().")
        reference_loss = training.train_step(reference, reference_optimizer, x0, loss_fn, cond=cond,
                                             grad_clip=grad_clip)
        if abs(loss - reference_loss) > 1e-4 * max(1.0, abs(reference_loss)):
            raise _Wrong(f"the loss you returned ({loss:.5f}) is not the diffusion loss of this batch "
                         f"before the update ({reference_loss:.5f}).")
        if not _close(_parameters(model), _parameters(reference)):
            raise _Wrong(_step_diagnosis(step, grad_clip, _parameters(model), start, x0, loss_fn, cond))
    return "your training step updates the model like the reference (with and without clipping) and returns the loss."
