"""The verdict machinery shared by every lesson's checkers (ring 3; no lesson of its own).

A checker is `check(fn) -> pass message`, decorated with `_checker`: it runs the learner's
function through `_call`, compares with the reference through `_compare`, and raises `_Wrong`
with a diagnosis (found with `_first_match` among the usual mistakes) when they differ.
The decorated checker prints one verdict and returns True or False:

    ✅ Passed: ...          the function agrees with the reference
    ⏳ Not done yet: ...    it still raises NotImplementedError; the lesson goes on with the reference
    ❌ ...                  a wrong answer, with the most likely mistake (never the solution)

With DIFFUSION_COURSE_STRICT_CHECKS=1 a wrong answer (or an error from the function) raises
AssertionError after printing: the course's tests set it. An unfinished exercise never raises.
Each verdict runs with its own random seed and leaves the notebook's random state as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
from torch import Tensor

from .. import schedules

STRICT_ENV = "DIFFUSION_COURSE_STRICT_CHECKS"
NOT_DONE = "⏳ Not done yet: the lesson continues with the reference implementation."

BROADCAST_HINT = ("Looks like a broadcasting problem: a per-image value of shape (B,) must become "
                  "(B, 1, 1, 1) before it multiplies (B, C, H, W) images (schedules.gather does this).")


class _NotDone(Exception):
    """The learner's function raised NotImplementedError: the exercise is still a stub."""


class _Wrong(Exception):
    """A wrong answer; the message is the diagnosis shown to the learner."""


# ----------------------------------------------------------------------------------------------
# Verdicts


def _verdict(check, *args) -> bool:
    """Run `check(*args) -> pass message` with a fixed seed, print one verdict, return a bool."""
    try:
        with torch.random.fork_rng(devices=[]):   # keep the notebook's random state
            torch.manual_seed(0)
            message = check(*args)
    except _NotDone:
        print(NOT_DONE)
        return False
    except _Wrong as wrong:
        return _fail(str(wrong))
    except Exception as error:   # something odd in what the function returned
        return _fail(f"could not check your function's result ({type(error).__name__}: {error}).")
    print(f"✅ Passed: {message}")
    return True


def _checker(check):
    """Turn `check(fn) -> message` into a checker that prints one verdict and returns a bool."""
    @functools.wraps(check)
    def run(fn) -> bool:
        return _verdict(check, fn)
    run.__doc__ = f"{check.__doc__}\n\n    Prints one verdict; returns True (passed) or False (not done or wrong).\n"
    return run


def _fail(message: str) -> bool:
    print(f"❌ {message}")
    if os.environ.get(STRICT_ENV) == "1":
        raise AssertionError(message)
    return False


def _call(fn, *args, size_hint: str = BROADCAST_HINT, **kwargs):
    """Run the learner's function; turn NotImplementedError and other errors into verdicts."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise _NotDone from None
    except Exception as error:
        message = f"your function raised {type(error).__name__}: {error}"
        if "must match the size" in str(error):
            message += f"\n   {size_hint}"
        elif isinstance(error, IndexError) and "out of bounds" in str(error) or "t must lie in [0," in str(error):
            message += "\n   Is t off by one? The steps are numbered 0 to T - 1."
        raise _Wrong(message) from None


# ----------------------------------------------------------------------------------------------
# Comparing results


def _expect_tensor(got, shape, hint: str = " (broadcasting?)") -> None:
    shape = torch.Size(shape)
    if got is None:
        raise _Wrong("your function returned None: did you forget the return statement?")
    if not isinstance(got, Tensor):
        raise _Wrong(f"your function returned a {type(got).__name__}; expected a tensor of shape {tuple(shape)}.")
    if got.shape != shape:
        raise _Wrong(f"wrong output shape: expected {tuple(shape)}, got {tuple(got.shape)}{hint}.")


def _close(got, want: Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    return (isinstance(got, Tensor) and got.shape == want.shape
            and torch.allclose(got.detach().double().cpu(), want.detach().double(), atol=atol, rtol=rtol))


def _max_error(got: Tensor, want: Tensor) -> float:
    return (got.detach().double().cpu() - want.detach().double()).abs().max().item()


def _compare(got, want: Tensor, diagnose=None, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise _Wrong unless got matches want; `diagnose()` names the likely mistake (or None)."""
    _expect_tensor(got, want.shape)
    if _close(got, want, atol, rtol):
        return
    message = diagnose() if diagnose is not None else None
    raise _Wrong(message or f"your result differs from the reference by up to {_max_error(got, want):.3g}.")


def _first_match(got: Tensor, mistakes: dict) -> str | None:
    """The message of the first mistake whose result equals got."""
    return next((message for message, result in mistakes.items() if _close(got, result)), None)


def _ignores_argument(fn, got: Tensor, names: str, *args, **kwargs) -> str | None:
    """A message if calling fn again with the very same inputs gives a different result."""
    again = _call(fn, *args, **kwargs)
    if isinstance(again, Tensor) and again.shape == got.shape and not _close(again, got):
        return (f"your function gives a different result each time for the same {names}: use the "
                f"given {names} (draw new values only when the argument is None).")
    return None


# ----------------------------------------------------------------------------------------------
# Noise and schedules, shared by the lessons that noise images


def _recover_noise(x_t: Tensor, x0: Tensor, t: Tensor, schedule) -> Tensor:
    """The noise for which x_t = q_sample(x0, t, schedule, noise), found with the reference."""
    zeros = torch.zeros_like(x0)
    signal = schedules.q_sample(x0, t, schedule, zeros)
    noise_scale = schedules.q_sample(zeros, t, schedule, torch.ones_like(x0))
    return (x_t.detach().float() - signal) / noise_scale


def _noise_problem(noise: Tensor) -> str | None:
    """What is wrong with a sample that should be standard normal, or None."""
    mean, std = noise.mean().item(), noise.std().item()
    if noise.min() > -1e-3 and abs(mean - 0.5) < 0.1:   # (-1e-3: rounding)
        return (f"your noise looks uniform, not Gaussian (mean {mean:.2f}, no negative values, "
                f"variance {std ** 2:.3f} close to 1/12): did you use torch.rand instead of torch.randn?")
    if abs(mean) > 0.1 or abs(std - 1) > 0.1:
        return f"your noise does not look standard normal: mean {mean:.2f} and std {std:.2f} instead of 0 and 1."
    return None


def _schedule_with(schedule, **changes):
    """A copy of the schedule with some entries swapped, to reproduce a mix-up with the reference."""
    return dataclasses.replace(schedule, **changes)
