"""Lesson 11 (fewer steps): the checkers and hints of the exercises teacher_digits and reflow_loss,
and the hints of the lesson's derivation, guided_one_step_landing (checked with
checks.check_derivation against one guided Euler step of the toy's exact velocity fields,
guided_euler_landing).

References: distill.teacher_digits, distill.reflow_loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distill, flow
from ..guidance import guided
from . import flow as flow_checks
from ._harness import _call, _checker, _close, _compare, _first_match, _Wrong

HINTS = {
    "teacher_digits": (
        "The teacher is a flow-matching model (lesson 10) that needs guidance to draw clear digits. Which "
        "wrapper of lesson 05 applies guidance to any model, which of lesson 10's samplers is second order, "
        "and over which times does it integrate, from where to where?",
        "Wrap the teacher with classifier-free guidance at the given scale (guidance.guided), then integrate "
        "its ODE from the noise at t = 1 down to t = 0 with Heun's method over `steps` even steps "
        "(flow.flow_time_grid), passing the labels as the condition.",
        "model = guided(teacher, guidance_scale)\n"
        "return flow.heun_sample(model, noise, flow.flow_time_grid(steps), cond=labels)",
    ),
    "reflow_loss": (
        "Reflow is flow matching with one change: the noise is not drawn afresh, it is the noise the teacher "
        "started from, stored beside the digit it made. Where in `pairs` are the digit and its noise, and "
        "which loss of lesson 10 takes a given noise?",
        "Split pairs along the channels into its first half (the teacher's digits x0) and its second half "
        "(their noise). The loss is lesson 10's: MSE between v(x_t, 1000 t, cond) and noise - x0 with "
        "x_t = (1 - t) x0 + t noise, t uniform when not given.",
        "x0, noise = pairs.chunk(2, dim=1)\n"
        "return flow.flow_matching_loss(model, x0, cond=cond, t=t, noise=noise, generator=generator)",
    ),
}

DERIVATION_HINTS = {
    "guided_one_step_landing": (
        "One Euler step from t = 1 to t = 0 lands at x_1 - v(x_1, 1), the model's guess of x0 from pure "
        "noise. At t = 1 the noise says nothing about which image it will become. So what is the best "
        "guess of x0 given only the label, and given no label? Guidance mixes the two velocities.",
        "Unguided: x_1 - v(x_1, 1) = E[x0 | x_1] = E[x0], the mean of the data (of the class, for a label). "
        "Guided: v_w = v_uncond + w (v_cond - v_uncond), and x_1 - v_w is the same mix of the two means.",
        "return data_mean + w * (class_mean - data_mean)",
    ),
}

HINTS = {**HINTS, **DERIVATION_HINTS}


class _Probe(torch.nn.Module):
    """A fixed conditional 'network' (labels 0..9, null class 10) whose velocity depends on x, t and
    the label, so that guidance, the sampler and the time grid all change its output."""

    null_class = 10

    def null_cond(self, batch_size: int, device=None) -> Tensor:
        return torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        label = torch.zeros(len(x_t)) if cond is None else cond.float()
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        time = (t / flow.TIME_SCALE).view(shape)
        return 0.8 * x_t * time ** 2 - 0.1 * label.view(shape) + 0.3 * (1 - time)


def _teacher_variants(model, noise, labels, w, steps) -> dict[str, Tensor]:
    grid = flow.flow_time_grid(steps)
    return {
        "your digits are unguided: wrap the teacher with guidance.guided(teacher, guidance_scale) first, so "
        "that the pairs carry the guided teacher's digits.": flow.heun_sample(model, noise, grid, cond=labels),
        "you used Euler's method; the teacher's pairs should be accurate, so use Heun's (flow.heun_sample).":
            flow.euler_sample(guided(model, w), noise, grid, cond=labels),
        "your time grid runs the wrong way or has the wrong number of steps: integrate from t = 1 (noise) to "
        "t = 0 (data) over flow.flow_time_grid(steps).":
            flow.heun_sample(guided(model, w), noise, flow.flow_time_grid(2 * steps), cond=labels),
    }


@_checker
def check_teacher_digits(fn):
    """Check fn(teacher, noise, labels, *, guidance_scale, steps) -> digits against distill.teacher_digits."""
    model, generator = _Probe(), torch.Generator().manual_seed(0)
    noise, labels = torch.randn(4, 1, 3, 3, generator=generator), torch.tensor([1, 4, 7, 9])
    want = distill.teacher_digits(model, noise, labels, guidance_scale=2.5, steps=3)
    got = _call(fn, model, noise, labels, guidance_scale=2.5, steps=3)
    _compare(got, want, lambda: _first_match(got, _teacher_variants(model, noise, labels, 2.5, 3)))
    other = _call(fn, model, noise, labels, guidance_scale=1.5, steps=5)
    _compare(other, distill.teacher_digits(model, noise, labels, guidance_scale=1.5, steps=5),
             lambda: "with guidance_scale=1.5 and steps=5 your digits differ from the reference: use both arguments.")
    return "your teacher runs its guided ODE with Heun's method, as the reference does."


def _reflow_diagnosis(fn, got, model, x0, noise, t, labels) -> str | None:
    swapped = flow.flow_matching_loss(model, noise, cond=labels, t=t, noise=x0)
    if _close(got, swapped):
        return ("you took the halves the wrong way round: the teacher's digit x0 is the first half of the channels, "
                "its noise the second (pairs = cat([x0, noise], dim=1)).")
    again = _call(fn, model, torch.cat([x0, noise], dim=1), cond=labels, t=t)
    if isinstance(again, Tensor) and again.shape == got.shape and not _close(again, got):
        return ("your loss changes from call to call with the same pairs and t: it draws fresh noise. Reflow must "
                "use the stored noise, the second half of pairs, the one the teacher turned into x0.")
    return None


@_checker
def check_reflow_loss(fn):
    """Check fn(model, pairs, *, cond=None, t=None, generator=None) -> scalar against distill.reflow_loss."""
    model, generator = flow_checks._Probe(), torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 1, 2, 2, generator=generator), torch.randn(5, 1, 2, 2, generator=generator)
    t, labels = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0]), torch.tensor([3, 1, 4, 1, 5])
    pairs = torch.cat([x0, noise], dim=1)
    want = distill.reflow_loss(model, pairs, cond=labels, t=t)
    got = _call(fn, model, pairs, cond=labels, t=t)
    if isinstance(got, Tensor) and got.numel() == 1 and got.shape != want.shape:
        got = got.reshape(want.shape)
    _compare(got, want, lambda: _reflow_diagnosis(fn, got, model, x0, noise, t, labels))
    if model.cond is None or not torch.equal(model.cond, labels):
        raise _Wrong("pass the labels on to the network (cond=cond): the student learns the guided teacher's digits "
                     "for each label.")
    first = _call(fn, model, pairs, cond=labels, generator=torch.Generator().manual_seed(1))
    again = _call(fn, model, pairs, cond=labels, generator=torch.Generator().manual_seed(1))
    if not isinstance(first, Tensor) or first.numel() != 1 or not torch.allclose(first, again):
        raise _Wrong("without t your function should draw it from the generator (uniform in [0, 1]) and return "
                     "one number, the same for the same generator seed.")
    return "your reflow loss matches the reference, on the stored noise."


def guided_euler_landing(mixture: flow.GaussianMixture, component: int, w: float, noise: Tensor) -> Tensor:
    """Where one guided Euler step (t = 1 -> 0) of the toy's exact fields lands from each row of `noise`,
    for the label `component` at guidance w (distill.LabelledMixtureVelocity: the label's field is that
    component's alone, the unconditional one the whole mixture's). The reference for guided_one_step_landing."""
    field = guided(distill.LabelledMixtureVelocity(mixture), w)
    return flow.euler_sample(field, noise, [1.0, 0.0], cond=torch.full((len(noise),), component))
