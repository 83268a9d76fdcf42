"""Lesson 11: fewer steps: distilling a guided flow-matching teacher into a few-step student by
reflow (rectified flow, Liu et al. 2022), with classifier-free guidance folded into the student.
Exercises: reflow_loss.

A flow-matching model (lesson 10) learns the *average* velocity through each point x_t. Paths from
different (noise, digit) pairs cross, so the average bends, and the ODE's trajectories curve:
Euler with few steps cuts the corners and blurs. Reflow straightens them:

1. Run the teacher's ODE (guided, many small Heun steps) from noise z to a digit x0 = ODE(z):
   a *coupling* of noise and data that no longer crosses (an ODE's trajectories never meet).
2. Train a student (starting from the teacher's weights) with flow matching on these pairs:

       L = E_{(z, x0), t} || (z - x0) - v(x_t, 1000 t, label) ||^2,    x_t = (1 - t) x0 + t z

   The straight line between z and ODE(z) is what the student learns, so one Euler step
   x0 = z - v(z, 1000, label) already lands near the teacher's digit.

The teacher's x0 were made with guidance w, so the student learns the guided ODE with the label
alone: one network call per step instead of two (guidance distillation, Meng et al. 2023).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import flow
from .guidance import guided

DEFAULT_TEACHER_GUIDANCE = 2.0     # the teacher's w when making the pairs
DEFAULT_TEACHER_STEPS = 8          # Heun steps (16 velocity evaluations, 32 network calls with guidance)
# What `mnist-fast` was distilled for: its config.json "sampling", used by generate and the CLI.
FAST_SAMPLING = {"sampler": "euler", "steps": 2, "guidance": 1.0}


@torch.no_grad()
def teacher_digits(teacher: nn.Module, noise: Tensor, labels: Tensor, *, guidance_scale: float = DEFAULT_TEACHER_GUIDANCE,
                   steps: int = DEFAULT_TEACHER_STEPS) -> Tensor:
    """The teacher's guided ODE from `noise` (t = 1) to data (t = 0): Heun over `steps` even steps.
    noise: (B, C, H, W); labels: (B,). Returns (B, C, H, W), not clamped."""
    model = guided(teacher, guidance_scale)
    return flow.heun_sample(model, noise, flow.flow_time_grid(steps), cond=labels)


def reflow_loss(model: nn.Module, pairs: Tensor, *, cond: Tensor | None = None, t: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Flow matching on fixed (digit, noise) pairs: the training loop's loss contract, with each
    training "image" holding both halves side by side in channels, pairs = cat([x0, noise], dim=1).

    Args:
        pairs: (B, 2C, H, W): the teacher's digit x0 in the first C channels, the noise it came
            from in the last C. cond: the labels (B,). t: (B,) floats in [0, 1], uniform when None.
    Returns:
        Scalar: mean squared error between v(x_t, 1000 t, cond) and noise - x0.
    """
    if not isinstance(pairs, Tensor) or pairs.ndim < 2 or pairs.shape[1] % 2:
        raise ValueError(f"pairs must be a (B, 2C, ...) tensor, cat([x0, noise], dim=1), got "
                         f"{getattr(pairs, 'shape', type(pairs).__name__)}.")
    x0, noise = pairs.chunk(2, dim=1)
    return flow.flow_matching_loss(model, x0, cond=cond, t=t, noise=noise, generator=generator)


class LabelledMixtureVelocity(nn.Module):
    """Lesson 10's toy with labels: label k means "component k", so its exact velocity is that one
    Gaussian's; the null label (K) means "any component", the whole mixture's. A conditional model
    with the course's contract (model(x_t, 1000 t, cond), null_cond), so guidance wraps it as it
    wraps the U-Net. x: (B, D); cond: (B,) labels in [0, K]."""

    def __init__(self, mixture: flow.GaussianMixture):
        super().__init__()
        self.mixture = mixture
        self.null_class = len(mixture.weights)

    def null_cond(self, batch_size: int, device=None) -> Tensor:
        return torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        cond = self.null_cond(len(x), x.device) if cond is None else cond
        t = (t / flow.TIME_SCALE).to(x.dtype).expand(len(x))
        out = flow.mixture_velocity(x, t, self.mixture)
        for k in cond.unique().tolist():
            if k != self.null_class:
                rows = cond == k
                one = flow.GaussianMixture(self.mixture.means[k:k + 1], self.mixture.std, torch.ones(1))
                out[rows] = flow.mixture_velocity(x[rows], t[rows], one)
        return out
