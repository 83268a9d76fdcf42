"""Lesson 09 (text to image): checkers and hints for the exercises clip_loss and attention_maps, and
the hints of the lesson's derivation, clip_loss_at_chance (checked with checks.check_derivation
against the loss of a mini CLIP whose logits are all equal).

References: text.clip_loss and text.CrossAttention.attention_maps (called as a function of the
layer: attention_maps(layer, x, context, mask)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import text
from ._harness import _call, _checker, _compare, _expect_tensor, _first_match, _Wrong

HINTS = {
    "clip_loss": (
        "In a batch of B pairs, each image should pick out its own caption among the B captions, and each "
        "caption its own image among the B images. Which entry of each row of the B x B similarity table "
        "is the right answer, and are there one or two ways to read the table?",
        "Eq. 1 of lesson 09, CLIP's loss (Radford et al. 2021, Fig. 3): logits = the model's scaled cosine "
        "similarities, images as rows and captions as columns; the cross-entropy of each row with target its "
        "own index, the same for each column, and the average of the two.",
        "logits = model(x0, cond)                      # (B, B), already times exp(logit_scale)\n"
        "target = torch.arange(B)\n"
        "return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2",
    ),
    "attention_maps": (
        "Every pixel asks a question (its query) and every token offers an answer key; the weights say how "
        "much each pixel reads each token. Where do the queries come from, where the keys, how is their "
        "dot product kept from growing with the head size, and how do pads end up with no weight at all?",
        "Eq. 2 of lesson 09: softmax(Q K^T / sqrt(d)) over the tokens, per head, with d = channels / heads; "
        "Q = to_q of the GroupNorm'd pixels (a sequence of H*W pixels), K = to_k of the token features; "
        "scores of pad tokens (mask False) set to minus infinity before the softmax.",
        "pixels = layer.norm(x).flatten(2).transpose(1, 2)                     # (B, H*W, C)\n"
        "q = layer.to_q(pixels) split into heads: (B, heads, H*W, d); k = layer.to_k(context) likewise\n"
        "scores = q @ k.transpose(-2, -1) / math.sqrt(d)\n"
        "return scores.masked_fill(~mask[:, None, None, :], float('-inf')).softmax(dim=-1)",
    ),
}

# The derivation of section 2: no checker of its own (checks.check_derivation compares it with
# chance_clip_loss). Its hints join HINTS, so checks.hint finds them.
DERIVATION_HINTS = {
    "clip_loss_at_chance": (
        "A CLIP that cannot tell captions apart gives every caption the same logit. What probability does "
        "the softmax then give the right caption, and what is minus the log of it?",
        "With B equal logits the softmax is 1/B everywhere, so each cross-entropy term is -log(1/B); both "
        "directions of the symmetric loss are the same, and so is their average.",
        "each term is -log(1 / batch_size), so the average is the same number:\nreturn math.log(batch_size)",
    ),
}
HINTS = {**HINTS, **DERIVATION_HINTS}


def probe_clip(seed: int = 0) -> text.MiniCLIP:
    """A tiny MiniCLIP with random weights (words red, blue, 3, 7, left, right), for the checkers."""
    torch.manual_seed(seed)
    words = ("red", "blue", "3", "7", "left", "right")
    config = text.CLIPConfig(text=text.TextEncoderConfig(words=words, max_length=8, dim=8, depth=1, heads=2),
                             image_size=(8, 16), image_base_channels=4, embed_dim=8)
    return text.MiniCLIP(config).eval()


def chance_clip_loss(model: text.MiniCLIP, images: Tensor, ids: Tensor) -> float:
    """text.clip_loss of `model` with its temperature made huge (all logits about 0): the loss of a
    CLIP that tells nothing apart, measured (the numerical reference of clip_loss_at_chance)."""
    saved = model.logit_scale.detach().clone()
    try:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1e-6))
            return text.clip_loss(model, images, cond=ids).item()
    finally:
        with torch.no_grad():
            model.logit_scale.copy_(saved)


def _clip_variant(model, x0, ids, *, direction="both", scaled=True, reduce=2.0) -> Tensor:
    logits = model(x0, ids) if scaled else model.encode_image(x0) @ model.encode_text(ids).T
    target = torch.arange(len(x0))
    rows, columns = F.cross_entropy(logits, target), F.cross_entropy(logits.T, target)
    return {"both": (rows + columns) / reduce, "images": rows, "captions": columns}[direction]


@_checker
def check_clip_loss(fn):
    """Check fn(model, x0, *, cond, generator=None) -> scalar against text.clip_loss."""
    model = probe_clip()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))     # far from 1, so an unscaled loss shows
    x0 = torch.rand(6, 3, 8, 16) * 2 - 1
    ids = model.tokenizer.encode(["red 3 left", "blue 7 right", "3", "red", "blue 3 right 7 left", "7 7"])
    want = text.clip_loss(model, x0, cond=ids)
    got = _call(fn, model, x0, cond=ids)
    if isinstance(got, (int, float)):
        raise _Wrong("your loss is a Python number: return the tensor (no .item()), so training can "
                     "backpropagate through it.")
    if isinstance(got, Tensor) and got.numel() == 1:
        got = got.reshape(())
    _compare(got, want, lambda: _first_match(got, {
        "you read the table one way only (each image picks its caption): CLIP's loss is symmetric, also each "
        "caption picks its image (the transposed logits), and the two are averaged.":
            _clip_variant(model, x0, ids, direction="images"),
        "you read the table one way only (each caption picks its image): CLIP's loss is symmetric, also each "
        "image picks its caption, and the two are averaged.": _clip_variant(model, x0, ids, direction="captions"),
        "your logits are the plain cosine similarities: multiply them by the learned scale exp(logit_scale) "
        "(model(x0, cond) does), or the softmax can never become confident.":
            _clip_variant(model, x0, ids, scaled=False),
        "you add the two directions: CLIP averages them (divide by 2).": _clip_variant(model, x0, ids, reduce=1.0),
    }), atol=1e-5)
    if not got.requires_grad:
        raise _Wrong("your loss carries no gradient: compute it from the model's outputs with torch operations.")
    return "your CLIP loss matches the reference: both directions, scaled logits, averaged."


def _probe_inputs():
    layer = text.CrossAttention(8, 6, heads=2)
    torch.nn.init.normal_(layer.norm.weight, 1.0, 0.3)
    torch.nn.init.normal_(layer.norm.bias, 0.0, 0.3)
    x, context = torch.randn(2, 8, 3, 5), torch.randn(2, 7, 6) * 2
    mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 6 + [False]])
    return layer, x, context, mask


def _attention_variant(layer, x, context, mask, *, norm=True, scale=True, per_head=True, masked=True,
                       dim=-1, invert=False, after=False) -> Tensor:
    pixels = (layer.norm(x) if norm else x).flatten(2).transpose(1, 2)
    q, k = text._split_heads(layer.to_q(pixels), layer.heads), text._split_heads(layer.to_k(context), layer.heads)
    d = q.shape[-1] if per_head else layer.channels
    scores = q @ k.transpose(-2, -1) / (math.sqrt(d) if scale else 1.0)
    keep = (~mask if invert else mask)[:, None, None, :]
    if masked and not after:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = scores.softmax(dim=dim)
    return weights * keep if after else weights


def _attention_mistakes(got, layer, x, context, mask) -> str | None:
    # A softmax over the pixels gives NaN in the pads' columns (all minus infinity): compare without them.
    case = lambda **changes: _attention_variant(layer, x, context, mask, **changes).nan_to_num(0.0)   # noqa: E731
    return _first_match(got.nan_to_num(0.0), {
        "your softmax runs over the pixels (dim -2): each pixel's weights must sum to 1 over the tokens (the "
        "last dimension).": case(dim=-2),
        "the scores are not divided by sqrt(d): without it they grow with the head size and the softmax "
        "saturates.": case(scale=False),
        "you divide by the square root of all the channels; d is the size of one head, channels / heads.":
            case(per_head=False),
        "the pad tokens are not masked: set their scores to minus infinity before the softmax, so they get "
        "exactly 0 weight.": case(masked=False),
        "the mask is inverted: True marks a real token (keep it), False a pad (mask it out).": case(invert=True),
        "you zero the pads' weights after the softmax: the rows no longer sum to 1. Mask the scores before it.":
            case(after=True),
        "the queries come from the raw pixels: normalise them with layer.norm (GroupNorm) first.": case(norm=False),
    })


@_checker
def check_attention_maps(fn):
    """Check fn(layer, x, context, mask=None) -> (B, heads, H*W, L) weights against
    text.CrossAttention.attention_maps."""
    layer, x, context, mask = _probe_inputs()
    with torch.no_grad():
        for given in (mask, None):
            want = text.CrossAttention.attention_maps(layer, x, context, given)
            got = _call(fn, layer, x, context, given)
            if isinstance(got, Tensor) and got.shape[-1] == x.shape[2] * x.shape[3] != want.shape[-1]:
                raise _Wrong(f"your weights have {got.shape[-1]} columns, one per pixel: the keys must come from "
                             "the text tokens (layer.to_k(context)), not from the pixels; that is self-attention.")
            _expect_tensor(got, want.shape, " (split the channels into heads: (B, heads, H*W, L))")
            if given is None and not torch.isfinite(got).all():
                raise _Wrong("with mask=None every token is real: your weights are not finite then.")
            _compare(got, want, lambda: _attention_mistakes(got, layer, x, context,
                                                            mask if given is not None else torch.ones_like(mask)))
    return ("your attention maps match the reference: one softmax over the tokens per pixel and head, scaled by "
            "1/sqrt(d), pads at exactly 0.")
