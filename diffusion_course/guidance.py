"""Lesson 05: conditioning and classifier-free guidance (Ho and Salimans 2022).
Exercises: drop_labels, guided_eps.

Training: label dropout replaces each row's condition by the model's "no condition"
(`model.null_cond(B)`) with probability p, so one network learns both the conditional and the
unconditional prediction.

Sampling: a wrapper with the same contract as the model it wraps, `guided(x_t, t, cond) -> eps`,
so every sampler works with it unchanged:

    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)

guidance_scale w = 1 is the plain conditional model, w = 0 the unconditional one, w > 1
pushes samples harder towards the class (the diffusers convention). Ho and Salimans write
eps = (1 + w') eps_cond - w' eps_uncond, so their w' equals our w - 1.

A negative condition replaces the unconditional branch: eps_uncond becomes the prediction
for the negative condition, so the sample is pushed away from it ("any digit but 1").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def drop_cond(cond: Tensor, null_cond: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each row of `cond` by the same row of `null_cond` with probability p.

    Works for any condition with the batch first: (B,) labels or (B, L, D) text embeddings.
    """
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}.")
    if null_cond.shape != cond.shape:
        raise ValueError(f"null_cond must have the shape of cond {tuple(cond.shape)}, got {tuple(null_cond.shape)}.")
    drop = torch.rand(cond.shape[0], generator=generator, device=cond.device) < p
    return torch.where(drop.view(-1, *([1] * (cond.ndim - 1))), null_cond, cond)


def drop_labels(cond: Tensor, null_class: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class with probability p (label dropout, Ho and Salimans 2022)."""
    return drop_cond(cond, torch.full_like(cond, null_class), p, generator)


def guided_eps(eps_cond: Tensor, eps_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Combine the two noise predictions: eps_uncond + w * (eps_cond - eps_uncond)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def has_null_cond(model) -> bool:
    """True for a conditional model that knows its "no condition" (model.null_cond(B) is not None)."""
    null_cond = getattr(model, "null_cond", None)
    return callable(null_cond) and null_cond(1) is not None


def guided(model, guidance_scale: float = 1.0, negative: int | Tensor | None = None):
    """`model` wrapped in classifier-free guidance, or `model` itself when it has no null condition
    (an unconditional model) or when there is nothing to do (w = 1 and no negative)."""
    if not has_null_cond(model):
        if negative is not None:
            raise ValueError("A negative condition needs a conditional model; this one is unconditional.")
        return model
    if guidance_scale == 1.0 and negative is None:
        return model
    return ClassifierFreeGuidance(model, guidance_scale, negative)


class ClassifierFreeGuidance(nn.Module):
    """Wrap a conditional model (one with a null condition) so that it applies guidance.

    Args:
        model: `model(x_t, t, cond) -> eps` with `model.null_cond(B)`.
        guidance_scale: w above; 1 means no guidance. A finite number.
        negative: optional condition to steer away from: a label (int), a (B,) tensor of them, or
            one row for the whole batch (e.g. a negative prompt's (1, L) token ids); it takes the
            place of the null condition in the unconditional branch.
    """

    def __init__(self, model: nn.Module, guidance_scale: float = 3.0, negative: int | Tensor | None = None):
        super().__init__()
        if not has_null_cond(model):
            raise ValueError("Classifier-free guidance needs a conditional model with a null condition "
                             "(UNetConfig(num_classes=...)); this model is unconditional.")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number (1: no guidance, 3 is usual), got {guidance_scale!r}.")
        null_class = getattr(model, "null_class", None)
        if isinstance(negative, bool) or (negative is not None and not isinstance(negative, (int, Tensor))):
            raise ValueError(f"negative must be a class label (int) or a tensor of labels, got {negative!r}.")
        if isinstance(negative, int) and null_class is not None and not 0 <= negative < null_class:
            raise ValueError(f"negative must be a class label in [0, {null_class}), got {negative}.")
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.negative = negative

    @property
    def null_class(self) -> int | None:
        return getattr(self.model, "null_class", None)

    def null_cond(self, batch_size: int, device=None) -> Tensor | None:
        return self.model.null_cond(batch_size, device)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            cond = self.model.null_cond(x_t.shape[0], x_t.device)
        uncond = self._uncond(x_t)
        if torch.equal(cond, uncond):
            return self.model(x_t, t, cond)       # both branches alike (e.g. no label): one call is enough
        if self.guidance_scale == 1.0:
            return self.model(x_t, t, cond)       # w = 1: the unconditional branch cancels out
        if self.guidance_scale == 0.0:
            return self.model(x_t, t, uncond)     # w = 0: only the unconditional branch is left
        # Both branches in one batch: one call to the network instead of two.
        eps = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
        eps_cond, eps_uncond = eps.chunk(2)
        return guided_eps(eps_cond, eps_uncond, self.guidance_scale)

    def _uncond(self, x_t: Tensor) -> Tensor:
        null = self.model.null_cond(x_t.shape[0], x_t.device)
        if self.negative is None:
            return null
        if isinstance(self.negative, int):
            return torch.full_like(null, self.negative)
        negative = self.negative.to(null.device, null.dtype)
        if negative.shape[:1] == (1,) and negative.shape[1:] == null.shape[1:]:
            negative = negative.expand_as(null)     # one negative condition (e.g. a prompt's ids) for all
        if negative.shape != null.shape:
            raise ValueError(f"negative labels must have shape {tuple(null.shape)} (or one row for all), "
                             f"got {tuple(self.negative.shape)}.")
        if self.null_class is not None and negative.numel() and \
                (int(negative.min()) < 0 or int(negative.max()) >= self.null_class):
            raise ValueError(f"negative labels must lie in [0, {self.null_class}).")
        return negative
