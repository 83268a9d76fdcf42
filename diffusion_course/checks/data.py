"""Lesson 07 (colour images): the checkers and hints of the exercises pixels_to_model and
random_hflip, and the hints of the lesson's derivation, cost_ratio (checked with
checks.check_derivation against the FLOPs that PyTorch counts for real U-Nets).

Reference: data.pixels_to_model, data.random_hflip.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import data
from ._harness import _call, _checker, _close, _compare, _expect_tensor, _first_match, _Wrong

HINTS = {
    "pixels_to_model": (
        "Two things differ between the stored photos and what the model wants: where the colour axis "
        "sits (stored last, wanted second), and the range of the numbers (0 to 255 whole numbers, wanted "
        "floats from -1 to 1). Which operation moves an axis and keeps every pixel's three colours together?",
        "Move the axes with permute, putting the channel axis (3) second: (N, H, W, C) -> (N, C, H, W). "
        "Not reshape or view: they keep the numbers in memory order and only relabel the axes. "
        "Then the lessons' range: x / 127.5 - 1 maps 0 to -1 and 255 to 1 (in floating point).",
        "images = pixels.permute(0, 3, 1, 2).float()\n"
        "return images / 127.5 - 1.0",
    ),
    "random_hflip": (
        "Each image gets its own coin toss: heads, it is mirrored left-right; tails, it stays. The "
        "coins come from the given generator, so the same seed gives the same flips. Which axis of "
        "(N, C, H, W) runs from left to right?",
        "Draw N uniform numbers with torch.rand(N, generator=generator) and flip where they are < 0.5. "
        "images.flip(-1) mirrors every image along the width; torch.where picks, per image, the "
        "mirrored or the original one (shape the (N,) choice as (N, 1, 1, 1)).",
        "flip = torch.rand(images.shape[0], generator=generator) < 0.5\n"
        "return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)",
    ),
}

DERIVATION_HINTS = {
    "cost_ratio": (
        "A 3 x 3 convolution does the same work at every position of its input: for each output channel "
        "it reads all input channels. How does its cost grow when both channel counts double? When the "
        "image has more positions? Every layer of the U-Net has channels proportional to the base "
        "channels and positions proportional to the image's.",
        "One convolution costs about 2 x 9 x C_in x C_out x H x W FLOPs per image. Multiply every channel "
        "count by b_a / b_b and every side by s_a / s_b: the cost is multiplied by (b_a / b_b)^2 (s_a / s_b)^2.",
        "return (base_a / base_b) ** 2 * (size_a / size_b) ** 2",
    ),
}

HINTS = {**HINTS, **DERIVATION_HINTS}


def _diagnose_pixels(got: Tensor, pixels: Tensor) -> str | None:
    n, h, w, c = pixels.shape
    first = pixels.permute(0, 3, 1, 2).double()
    reshaped = pixels.reshape(n, c, h, w).double()
    return _first_match(got, {
        "you reshaped (or viewed) the array instead of moving its axes: a reshape keeps the numbers in "
        "memory order, so each 'channel' gets a strip of mixed colours. Use permute.": reshaped / 127.5 - 1,
        "your values lie in [0, 1]: that is x / 255, the range of torchvision's ToTensor. The model's range "
        "is [-1, 1].": first / 255,
        "your values still run from 0 to 255: scale them to [-1, 1].": first,
        "your values lie in [0, 2]: subtract 1 after dividing by 127.5.": first / 127.5,
        "your colours are inverted: 0 must become -1 and 255 must become 1.": 1 - first / 127.5,
        "the colour channels are in reverse order (BGR): keep R, G, B as stored.": first.flip(1) / 127.5 - 1,
    })


@_checker
def check_pixels_to_model(fn):
    """Check fn(pixels) -> (N, C, H, W) in [-1, 1] against data.pixels_to_model."""
    pixels = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    pixels[0, 0, 0] = torch.tensor([0, 255, 0], dtype=torch.uint8)   # both ends of the range
    stored = pixels.clone()
    want = data.pixels_to_model(pixels)
    got = _call(fn, pixels)
    if isinstance(got, Tensor) and got.shape == pixels.shape:
        raise _Wrong(f"your images have the shape they were stored in, {tuple(got.shape)}: the channel "
                     f"axis must come second, {tuple(want.shape)}.")
    if isinstance(got, Tensor) and got.shape == (3, 3, 7, 5):
        raise _Wrong("height and width are swapped (shape (N, C, W, H)): the axes go (N, C, H, W), so "
                     "height stays before width.")
    _expect_tensor(got, want.shape)
    if not got.is_floating_point():
        raise _Wrong(f"your images are {got.dtype}: the model computes in floating point (float32).")
    if not torch.equal(pixels, stored):
        raise _Wrong("your function changed the stored pixels in place: leave its input as it was.")
    _compare(got, want, lambda: _diagnose_pixels(got, pixels))
    return "channels first, every pixel's colour kept, and 0 -> -1, 255 -> 1."


def _diagnose_flips(got: Tensor, images: Tensor) -> str | None:
    per_image = {
        "some images are upside down: you flipped the height axis; left-right is the last axis (width).":
            images.flip(-2),
        "some images have their colour channels reversed (RGB -> BGR): you flipped the channel axis; "
        "left-right is the last axis (width).": images.flip(1),
    }
    for message, wrong in per_image.items():
        if any(_close(g, x) and not _close(g, i) for g, x, i in zip(got, wrong, images)):
            return message
    if _close(got, images.flip(0)):
        return "you reversed the order of the images in the batch (axis 0); mirror each image along its width."
    return None


@_checker
def check_random_hflip(fn):
    """Check fn(images, generator) -> (N, C, H, W): each image kept or mirrored left-right, about half mirrored,
    reproducible from the generator."""
    images = torch.arange(2000 * 3 * 2 * 4, dtype=torch.float32).view(2000, 3, 2, 4)
    stored = images.clone()
    got = _call(fn, images, torch.Generator().manual_seed(0))
    _expect_tensor(got, images.shape)
    if not torch.equal(images, stored):
        raise _Wrong("your function changed its input in place: return new images and leave the originals.")
    mirrored = (got == images.flip(-1)).flatten(1).all(1)
    kept = (got == images).flatten(1).all(1)
    if not bool((mirrored | kept).all()):
        raise _Wrong(_diagnose_flips(got, images) or "some images are neither the original nor its left-right "
                     "mirror image: flip whole images along the width axis only.")
    share = mirrored.float().mean().item()
    if share in (0.0, 1.0):
        raise _Wrong(f"{'every' if share else 'no'} image was mirrored: toss one coin per image (with "
                     "probability 1/2), not one for the whole batch.")
    if abs(share - 0.5) > 0.05:
        raise _Wrong(f"{share:.0%} of 2,000 images were mirrored: each should be with probability 1/2.")
    again = _call(fn, images, torch.Generator().manual_seed(0))
    other = _call(fn, images, torch.Generator().manual_seed(1))
    if not torch.equal(got, again) or torch.equal(got, other):
        raise _Wrong("the flips do not follow the generator: draw the coin tosses from the given generator "
                     "(torch.rand(..., generator=generator)), so the same seed gives the same flips.")
    return f"each image is kept or mirrored left-right ({share:.1%} of 2,000 mirrored), reproducibly from the generator."
