"""Lesson 09's checkers (clip_loss, attention_maps) and derivation reference (clip_loss_at_chance):
each accepts the reference and rejects the mistakes its diagnoses name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_course import checks, text
from diffusion_course.checks import text as text_checks


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


def make_clip_loss(*, direction="both", scaled=True, divide=2, item=False, target_shift=0):
    """A CLIP loss with one mistake switched on (all off: the reference)."""
    def loss(model, x0, *, cond, generator=None):
        logits = model(x0, cond) if scaled else model.encode_image(x0) @ model.encode_text(cond).T
        target = (torch.arange(len(x0)) + target_shift) % len(x0)
        rows, columns = F.cross_entropy(logits, target), F.cross_entropy(logits.T, target)
        value = {"both": (rows + columns) / divide, "images": rows, "captions": columns}[direction]
        return value.item() if item else value
    return loss


def test_clip_loss_accepts_the_reference_and_a_hand_written_one(capsys):
    assert checks.check_clip_loss(text.clip_loss)
    assert checks.check_clip_loss(make_clip_loss())
    assert "✅ Passed" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, fn, words", [
    ("images to captions only", make_clip_loss(direction="images"), "one way only (each image picks"),
    ("captions to images only", make_clip_loss(direction="captions"), "one way only (each caption picks"),
    ("logits not scaled", make_clip_loss(scaled=False), "plain cosine similarities"),
    ("sum of the directions", make_clip_loss(divide=1), "CLIP averages them"),
    ("a Python number", make_clip_loss(item=True), "no .item()"),
    ("wrong targets", make_clip_loss(target_shift=1), "differs from the reference"),
])
def test_clip_loss_rejects_the_usual_mistakes(mistake, fn, words, capsys):
    assert not checks.check_clip_loss(fn), mistake
    out = capsys.readouterr().out
    assert "❌" in out and words in out, out


def make_attention_maps(*, norm=True, scale="head", masked="before", dim=-1, invert=False, keys="text"):
    """attention_maps(layer, x, context, mask) with one mistake switched on (all off: the reference)."""
    def attention_maps(layer, x, context, mask=None):
        mask = torch.ones(context.shape[:2], dtype=torch.bool) if mask is None else mask
        pixels = (layer.norm(x) if norm else x).flatten(2).transpose(1, 2)
        q = layer.to_q(pixels).unflatten(-1, (layer.heads, -1)).transpose(1, 2)
        source = layer.to_k(context) if keys == "text" else layer.to_q(pixels)
        k = source.unflatten(-1, (layer.heads, -1)).transpose(1, 2)
        d = {"head": q.shape[-1], "channels": layer.channels, "none": 1}[scale]
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        keep = ~mask if invert else mask
        if masked == "before" and keys == "text":
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        weights = scores.softmax(dim=dim)
        return weights * keep[:, None, None, :] if masked == "after" else weights
    return attention_maps


def test_attention_maps_accepts_the_reference_and_a_hand_written_one(capsys):
    assert checks.check_attention_maps(text.CrossAttention.attention_maps)
    assert checks.check_attention_maps(make_attention_maps())
    assert "✅ Passed" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, fn, words", [
    ("softmax over the pixels", make_attention_maps(dim=-2), "softmax runs over the pixels"),
    ("no 1/sqrt(d)", make_attention_maps(scale="none"), "not divided by sqrt(d)"),
    ("sqrt of all channels", make_attention_maps(scale="channels"), "channels / heads"),
    ("padding not masked", make_attention_maps(masked="none"), "pad tokens are not masked"),
    ("mask inverted", make_attention_maps(invert=True), "mask is inverted"),
    ("pads zeroed after the softmax", make_attention_maps(masked="after"), "after the softmax"),
    ("queries not normalised", make_attention_maps(norm=False), "layer.norm"),
    ("keys from the pixels", make_attention_maps(keys="pixels"), "keys must come from the text tokens"),
])
def test_attention_maps_rejects_the_usual_mistakes(mistake, fn, words, capsys):
    assert not checks.check_attention_maps(fn), mistake
    out = capsys.readouterr().out
    assert "❌" in out and words in out, out


def test_not_done_and_strict_mode(monkeypatch, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError("Exercise: ...")
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    assert not checks.check_clip_loss(stub)
    assert not checks.check_attention_maps(stub)
    assert capsys.readouterr().out.count("Not done yet") == 2
    with pytest.raises(AssertionError):
        checks.check_clip_loss(make_clip_loss(direction="images"))
    with pytest.raises(AssertionError):
        checks.check_attention_maps(make_attention_maps(masked="none"))


@pytest.mark.parametrize("batch_size", [4, 16])
def test_chance_loss_derivation_accepts_log_b_and_rejects_mistakes(batch_size):
    model = text_checks.probe_clip()
    scale = model.logit_scale.detach().clone()
    images = torch.rand(batch_size, 3, 8, 16) * 2 - 1
    ids = model.tokenizer.encode(["red 3 left blue 7 right"] * batch_size)
    measured = text_checks.chance_clip_loss(model, images, ids)
    assert torch.equal(model.logit_scale.detach(), scale)       # the model is left as it was
    assert checks.check_derivation("chance", math.log(batch_size), measured, rtol=1e-3)
    for mistake in (1 / batch_size, math.log(batch_size) / 2, 2 * math.log(batch_size), math.log(batch_size - 1)):
        assert not checks.check_derivation("chance", mistake, measured, rtol=1e-3), mistake


def test_every_hint_has_three_tiers():
    for name in ("clip_loss", "attention_maps", "clip_loss_at_chance"):
        tiers = checks.HINTS[name]
        assert len(tiers) == 3 and all(len(tier) > 40 for tier in tiers)
