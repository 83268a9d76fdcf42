"""Lesson 06 (editing): checkers and hints for the exercises img2img_start and inpaint_step, and the
hints of the lesson's derivation, variance_kept (checked with checks.check_derivation against the
schedule's own alpha_bar at t_start).

References: editing.img2img_start and editing.inpaint_step (t is a (B,) int64 tensor; -1 = clean).
"""

from __future__ import annotations

import functools

import math

import torch
from torch import Tensor

from .. import editing, schedules
from ._harness import _call, _checker, _close, _compare, _first_match, _ignores_argument, _schedule_with, _Wrong

HINTS = {
    "img2img_start": (
        "SDEdit starts the reverse process part of the way up the noise ladder: the strength says how far. "
        "Which step number does strength 1 correspond to, with steps numbered from 0, and how do you bring "
        "x0 to that step?",
        "Lesson 06, section 1: t_start = ceil(strength T) - 1, a whole number, and x_t is lesson 01's closed "
        "form applied to x0 at t_start for every image, with the given noise.",
        "t_start = math.ceil(strength * schedule.num_steps) - 1\n"
        "t = a (B,) int64 tensor full of t_start\n"
        "return editing.StartPoint(schedules.q_sample(x0, t, schedule, noise), t_start)",
    ),
    "inpaint_step": (
        "After each reverse step the known region is overwritten with the original, noised to the same "
        "level as the rest of the sample. What is that level for each image, and what happens for the "
        "images whose step is -1, already clean?",
        "The replacement formula of lesson 06, section 3: x_t <- m x_t + (1 - m) (sqrt(alpha_bar_t) x_known "
        "+ sqrt(1 - alpha_bar_t) eps), row by row with each image's own t; rows with t = -1 take x_known "
        "itself, without noise.",
        "clean = (t == -1) shaped (B, 1, 1, 1)\n"
        "known_t = torch.where(clean, x_known, schedules.q_sample(x_known, t.clamp(min=0), schedule, noise))\n"
        "return mask * x_t + (1 - mask) * known_t",
    ),
}

# The derivation of section 1: no checker of its own (checks.check_derivation compares it with
# schedule.alpha_bar at t_start). Its hints join HINTS, so checks.hint finds them.
DERIVATION_HINTS = {
    "variance_kept": (
        "The share of x0's variance left in x_t is alpha_bar at t_start, and lesson 01 wrote alpha_bar of the "
        "cosine schedule in closed form as a function of t over T. Which t over T does a strength give?",
        "Lesson 01's cosine schedule (Nichol and Dhariwal 2021, Eq. 17): alpha_bar = f(t) / f(0) with f(t) = "
        "cosine squared of ((t / T + s) / (1 + s) times pi / 2), s = 0.008. Here x_{t_start} is the output "
        "of step t_start, whose index is strength times T minus one, so f is taken at t over T = strength.",
        "f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2\nreturn f(strength) / f(0.0)",
    ),
}
HINTS = {**HINTS, **DERIVATION_HINTS}


def _start_point(got) -> tuple:
    """(x_t, t_start) from what an img2img_start returned (a StartPoint or any pair)."""
    if got is None:
        raise _Wrong("your function returned None: did you forget the return statement?")
    if isinstance(got, Tensor) or not isinstance(got, (tuple, list)) or len(got) != 2:
        raise _Wrong("return two things: the noisy images x_t and the timestep t_start "
                     "(editing.StartPoint(x_t, t_start) or a plain pair).")
    x_t, t_start = got
    if isinstance(t_start, Tensor) and t_start.numel() == 1:
        t_start = t_start.item()
    if isinstance(t_start, float) and t_start.is_integer():
        t_start = int(t_start)
    if isinstance(t_start, bool) or not isinstance(t_start, int):
        raise _Wrong(f"t_start should be a whole step number (an int), got {t_start!r}.")
    return x_t, t_start


@_checker
def check_img2img_start(fn):
    """Check fn(x0, strength, schedule, noise) -> (x_t, t_start) against editing.img2img_start."""
    schedule = schedules.linear_schedule(50)
    T = schedule.num_steps
    x0 = torch.rand(3, 1, 5, 5) * 2 - 1
    noise = torch.randn_like(x0)
    for strength in (0.5, 0.13, 0.9, 1.0):
        want = editing.img2img_start(x0, strength, schedule, noise)
        x_t, t_start = _start_point(_call(fn, x0, strength, schedule, noise))
        if t_start != want.t_start:
            raise _Wrong({
                want.t_start + 1: f"t_start is off by one: with strength {strength} and T = {T} you chose step "
                                  f"{t_start}. Steps are numbered 0 to T - 1, so strength 1 must give T - 1.",
                want.t_start - 1: f"t_start is off by one (one step too small) for strength {strength}: round "
                                  "strength * T up, then subtract one.",
                math.ceil((1 - strength) * T) - 1: "strength is inverted: strength 1 should go all the way to "
                                                   "noise (t_start = T - 1), a small strength only a little way.",
            }.get(t_start, f"with strength {strength} and T = {T}, t_start should be {want.t_start}, not {t_start}."))
        if strength == 1.0 and _close(x_t, want.x_t, atol=1e-2, rtol=0):
            continue        # q_sample at T - 1 or the noise itself: both ignore x0 (to within 1e-2 here)
        t = torch.full((len(x0),), t_start)

        def diagnose():
            return _first_match(x_t, {
                "the noise level matches alpha_t rather than alpha_bar_t (the cumulative product).":
                    schedules.q_sample(x0, t, _schedule_with(schedule, alpha_bar=schedule.alpha), noise),
                "x_t is x0 itself: noise it to step t_start with q_sample.": x0,
                "x_t is noised to step t_start + 1; the start point must be at t_start itself.":
                    schedules.q_sample(x0, (t + 1).clamp(max=T - 1), schedule, noise),
                "x_t is noised to step t_start - 1; the start point must be at t_start itself.":
                    schedules.q_sample(x0, (t - 1).clamp(min=0), schedule, noise),
            }) or _ignores_argument(lambda *args: _start_point(_call(fn, *args))[0], x_t, "noise",
                                    x0, strength, schedule, noise)

        _compare(x_t, want.x_t, diagnose)
    return "your SDEdit start point matches the reference (t_start and x_t)."



def _inpaint_call(fn, t: Tensor, *args):
    """The learner's inpaint_step(x_t, t, ...), with the likely reason when it raises."""
    try:
        return _call(fn, args[0], t, *args[1:])
    except _Wrong as wrong:
        first = str(wrong).splitlines()[0]
        if "ambiguous" in str(wrong):
            raise _Wrong(f"{first}\n   t is a (B,) tensor with one step per image, not a single number: "
                         "treat each row with its own t (the rows with t = -1 are clean).") from None
        if bool((t == -1).any()):
            raise _Wrong(f"{first}\n   t = -1 is the final replacement after the last step: the sample is "
                         "clean there, so the known pixels go back without noise.") from None
        raise


@_checker
def check_inpaint_step(fn):
    """Check fn(x_t, t, x_known, mask, schedule, noise) -> x against editing.inpaint_step.

    t is a (B,) int64 tensor; the batches are all noisy, mixed (-1 next to positive steps), all clean.
    """
    schedule = schedules.linear_schedule(50)
    T = schedule.num_steps
    x_t, x_known, noise = torch.randn(3, 3, 1, 6, 6)
    x_known = x_known.clamp(-1, 1)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 1:4, 2:5] = 1            # 1: generate, 0: known
    for t in (torch.tensor([20, 3, 41]), torch.tensor([-1, 20, 3]), torch.tensor([-1, -1, -1])):
        want = editing.inpaint_step(x_t, t, x_known, mask, schedule, noise)
        got = _inpaint_call(fn, t, x_t, x_known, mask, schedule, noise)
        clean = (t == -1).view(-1, 1, 1, 1)

        diagnose = functools.partial(_inpaint_mistakes, fn, got, t, x_t, x_known, mask, schedule, noise)
        _compare(got, want, diagnose)
    return ("your inpainting step keeps the generated pixels and puts back the known ones, noised to each "
            "image's step t (and clean where t = -1).")


def _inpaint_mistakes(fn, got, t, x_t, x_known, mask, schedule, noise) -> str | None:
    """The usual inpainting-step mistakes, each computed for this batch; the first that matches."""
    T = schedule.num_steps
    clean = (t == -1).view(-1, 1, 1, 1)

    def replaced(steps, schedule=schedule, inverted=False):
        """x_t with the known pixels noised to `steps` put back (clean rows: x_known itself)."""
        known_t = torch.where(clean, x_known, schedules.q_sample(x_known, steps.clamp(0, T - 1), schedule, noise))
        keep = 1 - mask if inverted else mask
        return keep * x_t + (1 - keep) * known_t

    mistakes = {}
    if clean.any() and not clean.all():
        mistakes["only the rows whose t is -1 get the known pixels without noise; the other rows "
                  "noise them to their own t."] = mask * x_t + (1 - mask) * x_known
    if not clean.any():
        mistakes["every image got the step of the first one: t holds one step per image."] = \
            replaced(t[:1].expand_as(t))
    mistakes.update({
        "the mask is inverted: 1 marks the pixels to generate (keep x_t there), 0 the known pixels.":
            replaced(t, inverted=True),
        "the known pixels are put back clean, but x_t is noisy: noise them to step t first (q_sample), "
        "so they match the rest of the image.": mask * x_t + (1 - mask) * x_known,
        "the known pixels are missing from the result.": mask * x_t,
        "t = -1 means the clean image (after the last step), not alpha_bar[-1], the last step of the "
        "schedule.": mask * x_t + (1 - mask) * schedules.q_sample(
            x_known, torch.where(t < 0, T - 1, t), schedule, noise),
        "the known pixels are noised with alpha_t rather than alpha_bar_t (the cumulative product).":
            replaced(t, _schedule_with(schedule, alpha_bar=schedule.alpha)),
        "looks like t is off by one: the known pixels are noised to step t + 1, the sample is at t.":
            replaced(t + 1),
        "looks like t is off by one: the known pixels are noised to step t - 1, the sample is at t.":
            replaced(t - 1),
    })
    return _first_match(got, mistakes) or _ignores_argument(
        lambda *args: _inpaint_call(fn, t, *args), got, "noise", x_t, x_known, mask, schedule, noise)
