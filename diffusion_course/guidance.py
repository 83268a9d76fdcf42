"""Classifier-free guidance (Ho and Salimans 2022) as a wrapper around a model.

The wrapper has the same contract as the model it wraps, `guided(x_t, t, cond) -> eps`, so
every sampler works with it unchanged:

    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)

guidance_scale w = 1 is the plain conditional model, w = 0 the unconditional one, w > 1
pushes samples harder towards the class (the diffusers convention). Ho and Salimans write
eps = (1 + w') eps_cond - w' eps_uncond, so their w' equals our w - 1.

A negative condition replaces the unconditional branch: eps_uncond becomes the prediction
for the negative label, so the sample is pushed away from it ("any digit but 1").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def guided_eps(eps_cond: Tensor, eps_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Combine the two noise predictions: eps_uncond + w * (eps_cond - eps_uncond)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


class ClassifierFreeGuidance(nn.Module):
    """Wrap a class-conditional model (one with a null class) so that it applies guidance.

    Args:
        model: `model(x_t, t, cond) -> eps`, conditional with `model.null_class` set.
        guidance_scale: w above; 1 means no guidance.
        negative: optional label (int) or (B,) int64 labels to steer away from; it takes the
            place of the null label in the unconditional branch.
    """

    def __init__(self, model: nn.Module, guidance_scale: float = 3.0, negative: int | Tensor | None = None):
        super().__init__()
        null_class = getattr(model, "null_class", None)
        if null_class is None:
            raise ValueError("Classifier-free guidance needs a class-conditional model with a null class "
                             "(UNetConfig(num_classes=...)); this model is unconditional.")
        if isinstance(negative, int) and not 0 <= negative < null_class:
            raise ValueError(f"negative must be a class label in [0, {null_class}), got {negative}.")
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.negative = negative

    @property
    def null_class(self) -> int:
        return self.model.null_class

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            cond = torch.full_like(t, self.null_class)
        uncond = self._uncond_labels(t)
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

    def _uncond_labels(self, t: Tensor) -> Tensor:
        if self.negative is None:
            return torch.full_like(t, self.null_class)
        if isinstance(self.negative, Tensor):
            if self.negative.shape != t.shape:
                raise ValueError(f"negative labels must have shape {tuple(t.shape)}, "
                                 f"got {tuple(self.negative.shape)}.")
            negative = self.negative.to(t.device, torch.long)
            if negative.numel() and (int(negative.min()) < 0 or int(negative.max()) >= self.null_class):
                raise ValueError(f"negative labels must lie in [0, {self.null_class}).")
            return negative
        return torch.full_like(t, int(self.negative))
