"""Asking before telling (ring 3; no lesson of its own): tiered hints, predictions, derivations.

    checks.hint("q_sample")              # tier 1 the first time, then 2, then 3 (the line, close to code)
    checks.hint("q_sample", tier=2)      # a given tier
    checks.predict("snr_crosses_one", 400)           # commit to an answer before the experiment
    checks.reveal("snr_crosses_one", measured_t, tolerance=50)   # then compare with what was measured
    checks.check_derivation("posterior variance", mine, monte_carlo_estimate, rtol=0.05)

A prediction is never "wrong" in the test sense: `reveal` says how close it was and never raises,
not even in strict mode. A derivation gets a verdict like an exercise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._harness import _call, _max_error, _NotDone, _verdict, _Wrong

TIERS = ("what to think about", "which equation", "the line(s)")
_shown: dict[str, int] = {}          # hint name -> highest tier shown so far
_predictions: dict[str, object] = {}  # question id -> the learner's committed answer


def show_hint(hints: dict[str, tuple], name: str, tier: int | None = None) -> None:
    """Print one tier of the hint `name`: the next one (1, 2, 3, then 3 again) or the given tier."""
    name = name.removeprefix("check_")
    if name not in hints:
        raise ValueError(f"No hint called {name!r}. Hints exist for: {', '.join(sorted(hints))}.")
    if tier is None:
        tier = min(_shown.get(name, 0) + 1, len(TIERS))
    if tier not in range(1, len(TIERS) + 1):
        raise ValueError(f"tier must be 1, 2 or 3 ({', '.join(TIERS)}), got {tier!r}.")
    _shown[name] = max(_shown.get(name, 0), tier)
    more = (f"(Call again for tier {tier + 1}: {TIERS[tier]}.)" if tier < len(TIERS)
            else "(That was the last tier: the check's diagnosis says what still differs.)")
    print(f"💡 Hint {tier}/{len(TIERS)} for {name} ({TIERS[tier - 1]}):\n{hints[name][tier - 1]}\n{more}")


def _unanswered(answer) -> bool:
    return answer is None or answer is Ellipsis


def predict(question_id: str, answer) -> None:
    """Record the learner's answer to a question, before the experiment that reveals it."""
    if _unanswered(answer):
        _predictions.pop(question_id, None)
        print(f"✍️  No prediction for {question_id!r} yet: replace the ... with your answer, then run the cell.")
        return
    changed = question_id in _predictions and _predictions[question_id] != answer
    _predictions[question_id] = answer
    print(f"📌 {'Changed' if changed else 'Recorded'} your prediction for {question_id!r}: {answer!r}. "
          "The experiment below will show how close it is.")


def _number(value) -> float | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def reveal(question_id: str, true_value, *, tolerance: float = 0.0, rtol: float = 0.1) -> bool | None:
    """Compare the recorded prediction with the measured value; print how close it was.

    Numbers are close when |prediction - value| <= tolerance + rtol * |value|; anything else
    (a word, a choice) when it is equal (strings ignoring case and spaces). Returns True or False,
    or None when no prediction was made. Never raises for a far-off prediction.
    """
    if _unanswered(_predictions.get(question_id)):
        print(f"✍️  You did not commit to a prediction for {question_id!r}: the measured value is "
              f"{true_value!r}. Next time, write your guess down first; it sticks better.")
        return None
    answer = _predictions[question_id]
    guess, value = _number(answer), _number(true_value)
    if guess is not None and value is not None:
        close = abs(guess - value) <= tolerance + rtol * abs(value)
        off = f"off by {abs(guess - value):.3g}" + (f" ({abs(guess - value) / abs(value):.0%})" if value else "")
        print(f"{'🎯' if close else '🔍'} You predicted {guess:.4g}; measured {value:.4g}: {off}. "
              + ("Close." if close else "Worth a second look: what did your reasoning leave out?"))
        return close
    same = (str(answer).strip().lower() == str(true_value).strip().lower() if isinstance(answer, str)
            else answer == true_value)
    print(f"{'🎯' if same else '🔍'} You predicted {answer!r}; the answer is {true_value!r}.")
    return bool(same)


def _derivation(name: str, value, reference, rtol: float, atol: float) -> str:
    if callable(value):
        value = _call(value)
    if value is None or value is Ellipsis:   # the cell still holds its placeholder
        raise _NotDone
    got, want = torch.as_tensor(value, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    if got.shape != want.shape and got.numel() != 1:
        raise _Wrong(f"your {name} has shape {tuple(got.shape)}; the estimate has shape {tuple(want.shape)}.")
    if not bool(torch.isfinite(got).all()):
        raise _Wrong(f"your {name} is not finite ({value!r}).")
    if not torch.allclose(got.expand_as(want), want, rtol=rtol, atol=atol):
        relative = _max_error(got.expand_as(want), want) / max(want.abs().max().item(), math.ulp(1.0))
        raise _Wrong(f"your {name} differs from the numerical estimate by up to {relative:.1%} of its size "
                     f"(allowed: {rtol:.0%}). Check each factor of your derivation against a special case.")
    return f"your {name} agrees with the numerical estimate (within {rtol:.0%})."


def check_derivation(name: str, value, reference, *, rtol: float = 0.05, atol: float = 0.0) -> bool:
    """Compare a quantity the learner derived (a number, a tensor, or a function of no arguments
    returning one) with a numerical reference, e.g. a Monte Carlo estimate, within rtol.

    Prints one verdict and returns True or False, like an exercise checker (strict mode raises
    for a wrong value). A function that still raises NotImplementedError is "not done yet".
    """
    return _verdict(_derivation, name, value, reference, rtol, atol)
