"""Lesson 07's checkers (pixels_to_model, random_hflip) and derivation hint (cost_ratio): each accepts the
reference and hand-written equivalents, and rejects the mistakes its diagnoses name."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion_course import checks, data, schedules, training, unet
from diffusion_course.checks import data as data_checks


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


def test_pixels_to_model_accepts_the_reference_and_hand_written_ones(capsys):
    assert checks.check_pixels_to_model(data.pixels_to_model)
    assert checks.check_pixels_to_model(lambda p: p.permute(0, 3, 1, 2).float() * (2 / 255) - 1)
    assert checks.check_pixels_to_model(lambda p: torch.einsum("nhwc->nchw", p.double()) / 127.5 - 1)
    assert "✅ Passed" in capsys.readouterr().out


def fresh_ones(p):
    p += 1          # an in-place change of the learner's input
    return data.pixels_to_model(p - 1)


@pytest.mark.parametrize("mistake, fn, words", [
    ("reshape", lambda p: p.reshape(p.shape[0], 3, *p.shape[1:3]).float() / 127.5 - 1, "Use permute"),
    ("view", lambda p: p.view(p.shape[0], 3, *p.shape[1:3]).float() / 127.5 - 1, "instead of moving its axes"),
    ("ToTensor range", lambda p: p.permute(0, 3, 1, 2).float() / 255, "range of torchvision's ToTensor"),
    ("no scaling", lambda p: p.permute(0, 3, 1, 2).float(), "still run from 0 to 255"),
    ("no -1", lambda p: p.permute(0, 3, 1, 2).float() / 127.5, "subtract 1"),
    ("inverted", lambda p: 1 - p.permute(0, 3, 1, 2).float() / 127.5, "inverted"),
    ("BGR", lambda p: p.permute(0, 3, 1, 2).flip(1).float() / 127.5 - 1, "(BGR)"),
    ("channels last", lambda p: p.float() / 127.5 - 1, "channel axis must come second"),
    ("H and W swapped", lambda p: p.permute(0, 3, 2, 1).float() / 127.5 - 1, "height and width are swapped"),
    ("integers", lambda p: p.permute(0, 3, 1, 2).long() - 128, "floating point"),
    ("in place", fresh_ones, "in place"),
    ("no return", lambda p: None, "return statement"),
])
def test_pixels_to_model_rejects_the_usual_mistakes(mistake, fn, words, capsys):
    assert not checks.check_pixels_to_model(fn), mistake
    out = capsys.readouterr().out
    assert "❌" in out and words in out, out


def make_flip(*, axis=-1, per_image=True, share=0.5, use_generator=True, in_place=False):
    """A random flip with one mistake switched on (all off: a correct one, drawn differently from the reference)."""
    def random_hflip(images, generator=None):
        n = images.shape[0]
        coins = torch.rand(n if per_image else 1, generator=generator if use_generator else None) < share
        flip = coins.expand(n).view(-1, 1, 1, 1)
        out = torch.where(flip, images.flip(axis), images)
        if in_place:
            images.mul_(1.0).add_(1.0)
        return out
    return random_hflip


def test_random_hflip_accepts_the_reference_and_other_correct_draws(capsys):
    assert checks.check_random_hflip(data.random_hflip)
    assert checks.check_random_hflip(make_flip())
    assert checks.check_random_hflip(lambda x, g: torch.stack([i.flip(-1) if torch.randint(2, (1,), generator=g)
                                                               else i for i in x]))
    assert "✅ Passed" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, fn, words", [
    ("height", make_flip(axis=-2), "upside down"),
    ("channels", make_flip(axis=1), "RGB -> BGR"),
    ("batch order", lambda x, g: x.flip(0), "reversed the order of the images"),
    ("one coin", make_flip(per_image=False), "one coin per image"),
    ("always", lambda x, g: x.flip(-1), "every image was mirrored"),
    ("never", lambda x, g: x.clone(), "no image was mirrored"),
    ("biased", make_flip(share=0.8), "with probability 1/2"),
    ("global random state", make_flip(use_generator=False), "from the given generator"),
    ("in place", make_flip(in_place=True), "in place"),
])
def test_random_hflip_rejects_the_usual_mistakes(mistake, fn, words, capsys):
    assert not checks.check_random_hflip(fn), mistake
    out = capsys.readouterr().out
    assert "❌" in out and words in out, out


def test_the_cost_ratio_hint_agrees_with_counted_flops():
    """The derivation's tier-3 line, run, gives the ratio PyTorch's FLOP counter measures for a training
    step of the CIFAR-10 U-Net (base 32, 32 x 32) over the MNIST one (base 16, 28 x 28): within 1%."""
    def flops(config):
        model, x = unet.UNet(config), torch.randn(2, config.in_channels, config.image_size, config.image_size)
        with FlopCounterMode(display=False) as counter:
            training.diffusion_loss(model, x, schedules.cosine_schedule(1000), cond=torch.tensor([0, 1])).backward()
        return counter.get_total_flops()
    measured = flops(unet.UNetConfig(3, 32, 32, num_classes=10)) / flops(unet.UNetConfig(1, 28, 16, num_classes=10))
    line = data_checks.DERIVATION_HINTS["cost_ratio"][2]
    namespace = {}
    exec("def cost_ratio(base_a, size_a, base_b, size_b):\n    " + line, namespace)
    assert namespace["cost_ratio"](32, 32, 16, 28) == pytest.approx(measured, rel=0.01)
    assert checks.check_derivation("cost ratio", namespace["cost_ratio"](32, 32, 16, 28), measured, rtol=0.02)
    assert not checks.check_derivation("cost ratio", 32 / 16 * 32 / 28, measured, rtol=0.02)
