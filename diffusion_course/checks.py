"""Exercise checkers: each one runs your function on small inputs and compares it with the
package's reference implementation.

    from diffusion_course import checks
    checks.check_q_sample(q_sample)      # prints one verdict, returns True or False

The verdicts:

    ✅ Passed: ...          your function agrees with the reference
    ⏳ Not done yet: ...    it still raises NotImplementedError; the lesson goes on with the reference
    ❌ ...                  a wrong answer, with the most likely mistake (never the solution)

With the environment variable DIFFUSION_COURSE_STRICT_CHECKS=1, a wrong answer (or an error
from your function) raises AssertionError after printing: the course's tests set it, so a
broken solution notebook fails. An unfinished exercise never raises.

Each checker runs on the CPU in about a second, with its own random seed, and leaves the
random state of your notebook as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import editing, guidance, sampling, schedules, training, unet
from .schedules import gather

STRICT_ENV = "DIFFUSION_COURSE_STRICT_CHECKS"
NOT_DONE = "⏳ Not done yet: the lesson continues with the reference implementation."

BROADCAST_HINT = ("Looks like a broadcasting problem: a per-image value of shape (B,) must become "
                  "(B, 1, 1, 1) before it multiplies (B, C, H, W) images (schedules.gather does this).")


# ----------------------------------------------------------------------------------------------
# Running the learner's function and reporting the verdict


class _NotDone(Exception):
    """The learner's function raised NotImplementedError: the exercise is still a stub."""


class _Wrong(Exception):
    """A wrong answer; the message is the diagnosis shown to the learner."""


def _checker(check):
    """Turn `check(fn) -> message` into a checker that prints one verdict and returns a bool.

    `check` returns the text of the pass message, or raises _Wrong (with a diagnosis) or
    _NotDone; _call raises those for the learner's function.
    """
    @functools.wraps(check)
    def run(fn) -> bool:
        try:
            with torch.random.fork_rng(devices=[]):   # keep the notebook's random state
                torch.manual_seed(0)
                message = check(fn)
        except _NotDone:
            print(NOT_DONE)
            return False
        except _Wrong as wrong:
            return _fail(str(wrong))
        except Exception as error:   # something odd in what the function returned
            return _fail(f"could not check your function's result ({type(error).__name__}: {error}).")
        print(f"✅ Passed: {message}")
        return True
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


# ----------------------------------------------------------------------------------------------
# The forward process


@_checker
def check_q_sample(fn):
    """Check fn(x0, t, schedule, noise=None) -> x_t against schedules.q_sample."""
    schedule = schedules.linear_schedule(50)
    x0 = torch.rand(4, 1, 4, 5) * 2 - 1
    t = torch.tensor([1, 7, 23, 41])
    noise = torch.randn_like(x0)
    want = schedules.q_sample(x0, t, schedule, noise)
    got = _call(fn, x0, t, schedule, noise)

    def diagnose():
        # x_t = a * x0 + b * noise: find a and b with the reference, then try the usual slips.
        a = schedules.q_sample(torch.ones_like(x0), t, schedule, torch.zeros_like(x0))
        b = schedules.q_sample(torch.zeros_like(x0), t, schedule, torch.ones_like(x0))
        return _first_match(got, {
            "the scale matches alpha_t rather than alpha_bar_t (the cumulative product).":
                schedules.q_sample(x0, t, _schedule_with(schedule, alpha_bar=schedule.alpha), noise),
            "looks like a missing square root on both coefficients.": a ** 2 * x0 + b ** 2 * noise,
            "looks like a missing square root on the coefficient of the noise.": a * x0 + b ** 2 * noise,
            "looks like a missing square root on the coefficient of x0.": a ** 2 * x0 + b * noise,
            "the two coefficients are swapped: the signal's weight shrinks as t grows, the noise's grows.":
                b * x0 + a * noise,
            "looks like t is off by one (you used the entry for step t + 1).": schedules.q_sample(x0, t + 1, schedule, noise),
            "looks like t is off by one (you used the entry for step t - 1).": schedules.q_sample(x0, t - 1, schedule, noise),
        }) or _ignores_argument(fn, got, "noise", x0, t, schedule, noise)

    _compare(got, want, diagnose)

    # noise=None: the noise the function draws must be standard normal.
    x0 = torch.rand(8, 1, 16, 16) * 2 - 1
    t = torch.full((8,), 25)
    x_t = _call(fn, x0, t, schedule)
    _expect_tensor(x_t, x0.shape)
    problem = _noise_problem(_recover_noise(x_t, x0, t, schedule))
    if problem:
        raise _Wrong(problem + " (This is the case noise=None.)")
    return "q_sample matches the reference, and the noise it draws is standard normal."


@_checker
def check_cosine_alpha_bar(fn):
    """Check fn(num_steps, s=0.008) -> alpha_bar of shape (T,) against schedules.cosine_schedule.

    The reference clips beta at 0.999, which changes the last entry or so; those entries are
    not compared.
    """
    num_steps = 50
    for s in (None, 0.1):   # the default s, then a larger one
        reference = schedules.cosine_schedule(num_steps, 0.008 if s is None else s)
        got = _call(fn, num_steps) if s is None else _call(fn, num_steps, s=s)
        if isinstance(got, Tensor) and got.shape == (num_steps + 1,):
            raise _Wrong(f"looks like an off-by-one: you returned {num_steps + 1} values for num_steps = "
                         f"{num_steps}, but alpha_bar has exactly one value per noising step.")
        _expect_tensor(got, (num_steps,))
        unclipped = (reference.beta >= 0.999).cumsum(0) == 0
        got, want = got[unclipped], reference.alpha_bar[unclipped]

        def diagnose():
            if abs(got[0].item() - 1) < 1e-6:
                return ("looks like t is off by one: your alpha_bar starts at exactly 1 (no noise yet), "
                        "but its first entry belongs to the first noising step.")
            if _close(got, want.sqrt(), atol=1e-6, rtol=1e-5):
                return "looks like a missing square on the cosine."
            ratio = got.double() / want.double()
            if ratio.std() < 1e-6 * ratio.abs().mean() and abs(ratio.mean().item() - 1) > 1e-5:
                return (f"all your values are off by the same factor ({ratio.mean().item():.5f}): "
                        "did you divide f(t) by f(0)?")
            if s is not None and _close(got, schedules.cosine_schedule(num_steps).alpha_bar[unclipped],
                                        atol=1e-6, rtol=1e-5):
                return "your result does not change with s: use the s argument."
            return None

        _compare(got, want, diagnose, atol=1e-6, rtol=1e-5)
    return "your cosine alpha_bar matches the reference."


# ----------------------------------------------------------------------------------------------
# The network


@_checker
def check_timestep_embedding(fn):
    """Check fn(t, dim) -> (B, dim) against unet.timestep_embedding."""
    t = torch.tensor([0, 1, 7, 50, 999])
    dim = 32
    want = unet.timestep_embedding(t, dim)
    got = _call(fn, t, dim)

    def diagnose():
        half = dim // 2
        sin, cos = want[:, :half], want[:, half:]
        mistake = _first_match(got, {
            "sin and cos are swapped: the reference puts the sines first, then the cosines.":
                torch.cat([cos, sin], dim=1),
            "your sines and cosines are interleaved (sin, cos, sin, cos, ...); the reference puts "
            "all the sines first, then all the cosines.": torch.stack([sin, cos], dim=2).flatten(1),
        })
        if mistake:
            return mistake
        # Right layout (sin 0 = 0 and cos 0 = 1 at t = 0, and sin^2 + cos^2 = 1) but other angles.
        pairs = got[:, :half].double() ** 2 + got[:, half:].double() ** 2
        if _close(got[0], want[0]) and _close(pairs, torch.ones_like(pairs)):
            return ("the sines and cosines are in the right places but their frequencies differ: "
                    "check the frequency base (max_period = 10000) and the exponent.")
        return None

    _compare(got, want, diagnose)
    return "your timestep embedding matches the reference."


def _res_block_variant(block, x, emb, act_before_norm=False, no_act=False, emb_act=F.silu,
                       emb_after_conv2=False, no_one_plus=False):
    """The ResBlock forward pass with one usual mistake switched on (to recognise it)."""
    scale, shift = block.emb_proj(emb_act(emb))[:, :, None, None].chunk(2, dim=1)
    gain = scale if no_one_plus else 1 + scale

    def norm_act(norm, h, modulate=lambda v: v):
        if act_before_norm:
            return modulate(norm(F.silu(h)))
        return modulate(norm(h)) if no_act else F.silu(modulate(norm(h)))

    h = block.conv1(norm_act(block.norm1, x))
    if emb_after_conv2:
        return block.skip(x) + block.conv2(block.dropout(norm_act(block.norm2, h))) * gain + shift
    h = block.conv2(block.dropout(norm_act(block.norm2, h, lambda v: v * gain + shift)))
    return block.skip(x) + h


@_checker
def check_res_block_forward(fn):
    """Check fn(block, x, emb) -> tensor, a forward pass written with block's layers, against block(x, emb)."""
    block = unet.ResBlock(4, 16, emb_dim=12).eval()
    with torch.no_grad():   # a non-trivial scale and shift, so that mistakes with them show
        block.emb_proj.weight.normal_(0, 0.5)
    x = torch.randn(3, 4, 6, 6)
    emb = torch.randn(3, 12)
    size_hint = ("The shapes do not line up: x has 4 channels and the block's output 16, so the skip "
                 "connection must go through block.skip; and block.emb_proj gives (B, 2C): split it into "
                 "a scale and a shift, each reshaped to (B, C, 1, 1) to act on (B, C, H, W) features.")
    with torch.no_grad():
        want = block(x, emb)
        got = _call(fn, block, x, emb, size_hint=size_hint)

        def diagnose():
            without_emb = copy.deepcopy(block)
            nn.init.zeros_(without_emb.emb_proj.weight)
            nn.init.zeros_(without_emb.emb_proj.bias)
            return _first_match(got, {
                "the skip connection is missing: add the block's input (through block.skip) to the output.":
                    want - block.skip(x),
                "the time embedding does not reach the features (no scale and shift).": without_emb(x, emb),
                "activation order: apply SiLU after each GroupNorm, not before it.":
                    _res_block_variant(block, x, emb, act_before_norm=True),
                "activation missing: each GroupNorm is followed by a SiLU.":
                    _res_block_variant(block, x, emb, no_act=True),
                "activation order: the time embedding goes through a SiLU before block.emb_proj.":
                    _res_block_variant(block, x, emb, emb_act=lambda e: e),
                "the time embedding is applied after the second convolution; apply it between the two.":
                    _res_block_variant(block, x, emb, emb_after_conv2=True),
                "the scale multiplies the features directly; use (1 + scale), so a zero scale changes nothing.":
                    _res_block_variant(block, x, emb, no_one_plus=True),
            })

        _compare(got, want, diagnose)
    return "your ResBlock forward pass matches block(x, emb)."


# ----------------------------------------------------------------------------------------------
# Training


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
    """Check fn(model, x0, schedule, cond=None, t=None, noise=None) -> scalar against training.diffusion_loss."""
    schedule = schedules.linear_schedule(50)
    model = _TinyDenoiser(schedule.num_steps)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.tensor([2, 11, 30, 47])
    noise = torch.randn_like(x0)
    cond = torch.tensor([0, 1, 2, 3])
    want = training.diffusion_loss(model, x0, schedule, cond, t, noise)
    got = _call(fn, model, x0, schedule, cond=cond, t=t, noise=noise)
    if isinstance(got, (float, int)):
        raise _Wrong("you returned a Python number: return the loss tensor (.item() or float() cut it "
                     "off from the gradients that training needs).")
    if isinstance(got, Tensor) and got.numel() > 1:
        raise _Wrong(f"your loss has shape {tuple(got.shape)}, not a scalar: missing mean? Average the "
                     "squared error over all pixels and all images.")
    if isinstance(got, Tensor):
        got = got.reshape(())

    def diagnose():
        x_t = schedules.q_sample(x0, t, schedule, noise)
        eps_pred = model(x_t, t, cond)
        return _first_match(got, {
            "you compared the prediction with x0; the model predicts the noise.": F.mse_loss(eps_pred, x0),
            "looks like a sum instead of a mean over the pixels and images.": want * x0.numel(),
            "the noising uses alpha_t rather than alpha_bar_t (the cumulative product).":
                training.diffusion_loss(model, x0, _schedule_with(schedule, alpha_bar=schedule.alpha), cond, t, noise),
            "the model should see the noisy x_t, not the clean x0.": F.mse_loss(model(x0, t, cond), noise),
            "cond was not passed on to the model.": training.diffusion_loss(model, x0, schedule, None, t, noise),
        }) or _ignores_argument(fn, got, "t and noise", model, x0, schedule, cond=cond, t=t, noise=noise)

    _compare(got, want, diagnose)
    if not got.requires_grad:
        raise _Wrong("your loss has no gradient: do not compute it under torch.no_grad() or detach it.")

    # t=None and noise=None: look at what the model was given.
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
    return "your diffusion loss matches the reference."


@_checker
def check_drop_labels(fn):
    """Check fn(cond, null_class, p, generator=None) -> labels statistically, like training.drop_labels."""
    null_class, p = 10, 0.3
    cond = torch.randint(0, null_class, (20000,))
    original = cond.clone()
    got = _call(fn, cond, null_class, p, generator=torch.Generator().manual_seed(1))
    if not torch.equal(cond, original):
        raise _Wrong("your function modified cond in place: return a new tensor and leave the input as it was.")
    _expect_tensor(got, cond.shape, hint="")
    if got.dtype != torch.int64:
        raise _Wrong(f"the labels should stay int64, got {got.dtype}.")
    changed = got != cond
    strays = got[changed & (got != null_class)].unique()
    if strays.numel() and set(strays.tolist()) <= {0, -1}:
        raise _Wrong(f"dropped labels were replaced with {strays[0].item()} instead of null_class.")
    if strays.numel():
        raise _Wrong(f"some labels changed to values other than null_class: {strays[:5].tolist()}.")
    fraction = (got == null_class).float().mean().item()
    if abs(fraction - (1 - p)) < 0.02:
        raise _Wrong(f"p is inverted: you dropped {fraction:.0%} of the labels with p = {p}, so each label "
                     "is kept with probability p instead of dropped with probability p.")
    if abs(fraction - p) > 0.02:
        raise _Wrong(f"you dropped {fraction:.1%} of the labels; with p = {p} about {p:.0%} should become null_class.")
    for edge, expected in ((0.0, cond), (1.0, torch.full_like(cond, null_class))):
        if not _close(_call(fn, cond, null_class, edge), expected):
            raise _Wrong(f"with p = {edge} the result should be {'cond unchanged' if edge == 0 else 'all null_class'}.")
    again = _call(fn, cond, null_class, p, generator=torch.Generator().manual_seed(1))
    if not (isinstance(again, Tensor) and torch.equal(again, got)):
        raise _Wrong("the same generator seed gave different labels: draw the random numbers with "
                     "the generator argument.")
    return f"your label dropout replaces {fraction:.1%} of the labels with null_class (p = {p})."


def _reference_update(model, optimizer, x0, schedule, cond, x_t, t, grad_clip) -> float:
    """The update of training.train_step, for the t and noise that gave x_t."""
    loss = training.diffusion_loss(model, x0, schedule, cond, t, _recover_noise(x_t, x0, t, schedule))
    optimizer.zero_grad()
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def _parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


@_checker
def check_train_step(fn):
    """Check fn(model, optimizer, x0, schedule, cond=None) -> float over two steps.

    The reference is training.train_step's update (with or without its gradient clipping) for
    the same t and noise: those are read back from the x_t the learner's step gave the model,
    so the check does not depend on the order the random numbers are drawn in.
    """
    schedule = schedules.linear_schedule(50)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    cond = torch.tensor([0, 1, 2, 3])
    model = _Recorder(_TinyDenoiser(schedule.num_steps))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    references = []   # (grad_clip, model, optimizer): training.train_step clips at 1.0 by default
    for grad_clip in (0.0, 1.0):
        reference = copy.deepcopy(model.model)
        references.append((grad_clip, reference, torch.optim.SGD(reference.parameters(), lr=0.1)))

    for step in (1, 2):
        before, calls = _parameters(model), len(model.calls)
        loss = _call(fn, model, optimizer, x0, schedule, cond)
        if isinstance(loss, Tensor):
            raise _Wrong("you returned a tensor: return the loss as a float (loss.item()), so the "
                         "training loop does not keep every step's graph alive.")
        if not isinstance(loss, float):
            raise _Wrong(f"you returned a {type(loss).__name__}: return the loss as a float (loss.item()).")
        if len(model.calls) == calls:
            raise _Wrong("your function never called the model.")
        x_t, t, seen_cond = model.calls[calls]
        if seen_cond is None:
            raise _Wrong("cond was not passed on to the model.")
        if torch.equal(_parameters(model), before):
            raise _Wrong("the parameters did not change: call loss.backward() and then optimizer.step().")
        results = [(_reference_update(ref, opt, x0, schedule, cond, x_t, t, clip), ref, opt, clip)
                   for clip, ref, opt in references]
        if not any(abs(loss - ref_loss) <= 1e-4 * max(1.0, abs(ref_loss)) for ref_loss, *_ in results):
            raise _Wrong(f"the loss you returned ({loss:.5f}) is not the diffusion loss of this batch "
                         f"before the update ({results[0][0]:.5f}).")
        matching = [(clip, ref, opt) for _, ref, opt, clip in results
                    if _close(_parameters(model), _parameters(ref))]
        if not matching and step == 2:
            raise _Wrong("the first step was right but the second was not: the gradients of the first "
                         "step are accumulating. Did you forget optimizer.zero_grad()?")
        if not matching:
            raise _Wrong("the loss is right but the parameters changed differently from one optimizer "
                         "step on its gradient (up to "
                         f"{_max_error(_parameters(model), _parameters(references[0][1])):.3g}).")
        references = matching
    return "your training step updates the model like the reference and returns the loss."


# ----------------------------------------------------------------------------------------------
# Sampling


@_checker
def check_ddpm_step(fn):
    """Check fn(x_t, t, eps_pred, schedule, noise) -> x_prev against sampling.ddpm_step."""
    schedule = schedules.linear_schedule(50)
    x_t, eps_pred, noise = torch.randn(3, 4, 1, 5, 5)
    t = torch.tensor([0, 1, 20, 49])
    want = sampling.ddpm_step(x_t, t, eps_pred, schedule, noise)
    got = _call(fn, x_t, t, eps_pred, schedule, noise)

    def diagnose():
        def variant(**changes):
            return sampling.ddpm_step(x_t, t, eps_pred, _schedule_with(schedule, **changes), noise)

        mean = sampling.ddpm_step(x_t, t, eps_pred, schedule, torch.zeros_like(noise))
        noise_part = want - mean   # sigma_t * noise, zero where t == 0
        beta_t = gather(schedule.beta, t, x_t)
        alpha_bar_t = gather(schedule.alpha_bar, t, x_t)
        alpha_bar_prev = gather(torch.cat([torch.ones(1), schedule.alpha_bar[:-1]]), t, x_t)
        last = (t == 0).view(-1, 1, 1, 1)
        return _first_match(got, {
            "noise was added at t == 0: the last step returns the mean, with no noise.":
                want + last * beta_t.sqrt() * noise,
            "the 1/sqrt(...) factor uses alpha_bar_t where the single step's alpha_t belongs.":
                variant(alpha=schedule.alpha_bar),
            "the noise-prediction coefficient uses alpha_t where alpha_bar_t (the cumulative product) belongs.":
                variant(alpha_bar=schedule.alpha),
            "looks like a missing square root on alpha_t.": variant(alpha=schedule.alpha ** 2),
            "looks like a missing square root on 1 - alpha_bar_t.":
                variant(alpha_bar=1 - (1 - schedule.alpha_bar) ** 2),
            "sigma_t is the square root of the variance beta_t: you used sigma = beta (not sqrt).":
                mean + noise_part * beta_t.sqrt(),
            "you used the posterior variance beta_tilde_t as sigma_t^2. It is a valid choice (DDPM, "
            "Sec. 3.2), but this course uses sigma_t^2 = beta_t.":
                mean + noise_part * ((1 - alpha_bar_prev) / (1 - alpha_bar_t)).sqrt(),
        }) or _ignores_argument(fn, got, "noise", x_t, t, eps_pred, schedule, noise)

    _compare(got, want, diagnose)
    return "your DDPM step matches the reference."


@_checker
def check_ddim_step(fn):
    """Check fn(x_t, t, t_prev, eps_pred, schedule, eta=0.0, noise=None) -> x_prev against sampling.ddim_step."""
    schedule = schedules.linear_schedule(50)
    x_t, eps_pred, noise = torch.randn(3, 4, 1, 5, 5)
    t = torch.tensor([3, 10, 25, 49])
    t_prev = torch.tensor([-1, 5, 20, 30])   # -1: jump to the clean image
    want = sampling.ddim_step(x_t, t, t_prev, eps_pred, schedule)
    got = _call(fn, x_t, t, t_prev, eps_pred, schedule)

    def diagnose():
        clean = t_prev == -1
        if _close(got[~clean], want[~clean]):
            return ("only the images with t_prev = -1 are wrong: t_prev = -1 means the clean image, "
                    "where alpha_bar_prev = 1 (alpha_bar[-1] would be the last step of the schedule).")
        mistake = _first_match(got, {
            "alpha_t is used where alpha_bar_t (the cumulative product) belongs.":
                sampling.ddim_step(x_t, t, t_prev, eps_pred, _schedule_with(schedule, alpha_bar=schedule.alpha)),
        })
        if mistake:
            return mistake
        # With eps_pred = 0 the step only rescales x_t, by a ratio of square roots.
        alpha_bar_t = gather(schedule.alpha_bar, t, x_t)
        alpha_bar_prev = gather(torch.cat([torch.ones(1), schedule.alpha_bar]), t_prev + 1, x_t)
        scaled = _call(fn, x_t, t, t_prev, torch.zeros_like(eps_pred), schedule)
        return _first_match(scaled, {
            "looks like a missing square root.": x_t * alpha_bar_prev / alpha_bar_t,
            "looks like a missing square root (in x0_pred).": x_t * alpha_bar_prev.sqrt() / alpha_bar_t,
            "looks like a missing square root (on alpha_bar_prev).": x_t * alpha_bar_prev / alpha_bar_t.sqrt(),
        })

    _compare(got, want, diagnose)

    # eta = 1 with given noise.
    want = sampling.ddim_step(x_t, t, t_prev, eps_pred, schedule, eta=1.0, noise=noise)
    got = _call(fn, x_t, t, t_prev, eps_pred, schedule, eta=1.0, noise=noise)
    _compare(got, want, lambda: _first_match(got, {
        "your result does not change with eta: for eta > 0 add sigma * noise (and shrink the direction term).":
            sampling.ddim_step(x_t, t, t_prev, eps_pred, schedule),
    }) or _ignores_argument(fn, got, "noise", x_t, t, t_prev, eps_pred, schedule, eta=1.0, noise=noise))
    return "your DDIM step matches the reference, for eta = 0 and eta = 1."


# ----------------------------------------------------------------------------------------------
# Guidance


@_checker
def check_guided_eps(fn):
    """Check fn(eps_cond, eps_uncond, guidance_scale) -> eps against guidance.guided_eps."""
    eps_cond, eps_uncond = torch.randn(2, 2, 1, 4, 4)
    for scale in (3.0, 1.5):
        want = guidance.guided_eps(eps_cond, eps_uncond, scale)
        got = _call(fn, eps_cond, eps_uncond, scale)
        _compare(got, want, lambda: _first_match(got, {
            "you used Ho & Salimans' convention, (1 + w) eps_cond - w eps_uncond. Here guidance_scale "
            "= 1 must give the plain conditional prediction (their w is ours minus 1).":
                guidance.guided_eps(eps_cond, eps_uncond, scale + 1),
            "the two branches are swapped: guidance pushes away from the unconditional prediction, "
            "towards the conditional one.": guidance.guided_eps(eps_uncond, eps_cond, scale),
            "you returned only the guidance term: start from eps_uncond and add it.":
                scale * (eps_cond - eps_uncond),
        }))
    return "your guided noise prediction matches the reference."


# ----------------------------------------------------------------------------------------------
# Editing


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


@_checker
def check_inpaint_step(fn):
    """Check fn(x_t, t, x_known, mask, schedule, noise) -> x against editing.inpaint_step."""
    schedule = schedules.linear_schedule(50)
    x_t, x_known, noise = torch.randn(3, 2, 1, 6, 6)
    x_known = x_known.clamp(-1, 1)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 1:4, 2:5] = 1            # 1: generate, 0: known
    for t in (20, 3, -1):
        want = editing.inpaint_step(x_t, t, x_known, mask, schedule, noise)
        try:
            got = _call(fn, x_t, t, x_known, mask, schedule, noise)
        except _Wrong as wrong:
            if t == -1:
                raise _Wrong(f"{str(wrong).splitlines()[0]}\n   t = -1 is the final replacement after the last "
                             "step: the sample is clean there, so the known pixels go back without noise.") from None
            raise
        t_batch = torch.full((len(x_t),), t)
        known_t = x_known if t < 0 else schedules.q_sample(x_known, t_batch, schedule, noise)

        def diagnose():
            mistakes = {
                "the mask is inverted: 1 marks the pixels to generate (keep x_t there), 0 the known pixels.":
                    (1 - mask) * x_t + mask * known_t,
                "the known pixels are put back clean, but x_t is noisy: noise them to step t first (q_sample), "
                "so they match the rest of the image.": mask * x_t + (1 - mask) * x_known,
                "the known pixels are missing from the result.": mask * x_t,
                "t = -1 means the clean image (after the last step), not alpha_bar[-1], the last step of the "
                "schedule.": mask * x_t + (1 - mask) * schedules.q_sample(
                    x_known, torch.full((len(x_t),), schedule.num_steps - 1), schedule, noise),
            }
            if t >= 0:
                mistakes.update({
                    "the known pixels are noised with alpha_t rather than alpha_bar_t (the cumulative product).":
                        mask * x_t + (1 - mask) * schedules.q_sample(
                            x_known, t_batch, _schedule_with(schedule, alpha_bar=schedule.alpha), noise),
                    "looks like t is off by one: the known pixels are noised to step t + 1, the sample is at t.":
                        mask * x_t + (1 - mask) * schedules.q_sample(x_known, t_batch + 1, schedule, noise),
                    "looks like t is off by one: the known pixels are noised to step t - 1, the sample is at t.":
                        mask * x_t + (1 - mask) * schedules.q_sample(x_known, (t_batch - 1).clamp(min=0),
                                                                     schedule, noise),
                })
            return _first_match(got, mistakes) or _ignores_argument(fn, got, "noise", x_t, t, x_known, mask,
                                                                    schedule, noise)

        _compare(got, want, diagnose)
    return "your inpainting step keeps the generated pixels and puts back the known ones, noised to step t."
