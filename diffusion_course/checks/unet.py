"""Lesson 02 (the U-Net): checkers and hints for the exercises timestep_embedding and res_block_forward.

References: unet.timestep_embedding and unet.ResBlock.forward (block(x, emb)). The lesson's
derivation (how many parameters a residual block has) is compared with a count of the real block:

    res_block_parameters_counted(shapes)   count_parameters(ResBlock(c_in, c_out, emb_dim)) per shape
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import unet
from ._harness import _call, _checker, _close, _compare, _first_match

HINTS = {
    "timestep_embedding": (
        "Each timestep becomes a vector of sines and cosines at geometrically spaced frequencies. How "
        "many frequencies are there for an embedding of size dim, and in which order do the sines and "
        "cosines go?",
        "The embedding formula of lesson 02 ('Telling the network the timestep'): with half = dim / 2 and "
        "f_i = 10000^(-i / half) for i = 0, ..., half - 1, emb(t) = [sin(t f_0), ..., sin(t f_(half-1)), "
        "cos(t f_0), ..., cos(t f_(half-1))].",
        "half = dim // 2\n"
        "freqs = exp(-log(10000) * arange(half) / half)\n"
        "angles = t as float, shape (B, 1), times freqs, shape (1, half)\n"
        "return the concatenation of sin(angles) and cos(angles) along dim 1",
    ),
    "res_block_forward": (
        "A residual block adds a learned correction to its input. Where does the time embedding enter, "
        "as a per-channel scale and shift, and what must its shape be to act on (B, C, H, W) features?",
        "The five lines of the residual block in lesson 02: h = conv1(SiLU(GN1(x))); (s, b) = "
        "Linear(SiLU(e)); h = GN2(h) (1 + s) + b; h = conv2(dropout(SiLU(h))); out = skip(x) + h.",
        "h = block.conv1(SiLU(block.norm1(x)))\n"
        "scale, shift = block.emb_proj(SiLU(emb)) reshaped to (B, 2C, 1, 1), split in two along dim 1\n"
        "h = block.norm2(h) * (1 + scale) + shift\n"
        "h = block.conv2(block.dropout(SiLU(h)))\n"
        "return block.skip(x) + h",
    ),
}


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
# The reference of lesson 02's derivation


def res_block_parameters_counted(shapes) -> torch.Tensor:
    """The number of parameters of unet.ResBlock(c_in, c_out, emb_dim), counted on the module,
    for each (c_in, c_out, emb_dim) in shapes; (len(shapes),) int64."""
    shapes = [tuple(int(n) for n in shape) for shape in shapes]
    if not shapes or any(len(shape) != 3 or min(shape) < 1 for shape in shapes):
        raise ValueError(f"shapes must be a non-empty list of positive (c_in, c_out, emb_dim), got {shapes!r}.")
    return torch.tensor([unet.count_parameters(unet.ResBlock(*shape)) for shape in shapes])
