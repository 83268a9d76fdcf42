"""Lesson 11 (distill.py): reflow's loss on stored pairs, the guided teacher's ODE, and the point of
it all: a student trained on the teacher's pairs lands in one Euler step where the teacher needs many."""

from __future__ import annotations

import pytest
import torch

from diffusion_course import distill, flow, training
from diffusion_course.guidance import guided


def test_reflow_loss_is_flow_matching_on_the_stored_noise():
    model = flow.ToyMLP(dim=3)
    x0, noise, t = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5)
    expected = flow.flow_matching_loss(model, x0, noise=noise, t=t)
    torch.testing.assert_close(distill.reflow_loss(model, torch.cat([x0, noise], dim=1), t=t), expected)
    by_hand = (model(x0 * (1 - t[:, None]) + noise * t[:, None], 1000 * t) - (noise - x0)).pow(2).mean()
    torch.testing.assert_close(expected, by_hand)


@pytest.mark.parametrize("pairs", [torch.randn(4, 3), torch.randn(4), [[1.0, 2.0]]])
def test_reflow_loss_rejects_what_is_not_a_pair(pairs):
    with pytest.raises(ValueError, match=r"pairs must be a \(B, 2C, ...\) tensor, cat\(\[x0, noise\], dim=1\)"):
        distill.reflow_loss(flow.ToyMLP(), pairs)


def test_teacher_digits_run_the_guided_ode_with_heun(tiny_cond_unet):
    noise, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3])
    digits = distill.teacher_digits(tiny_cond_unet, noise, labels, guidance_scale=2.0, steps=3)
    expected = flow.heun_sample(guided(tiny_cond_unet, 2.0), noise, flow.flow_time_grid(3), cond=labels)
    torch.testing.assert_close(digits, expected)
    unguided = distill.teacher_digits(tiny_cond_unet, noise, labels, guidance_scale=1.0, steps=3)
    assert (digits - unguided).abs().max() > 1e-4                       # w reaches the network


def test_reflow_straightens_the_paths_of_a_curved_teacher():
    """The exact velocity of a ring of Gaussians curves: one Euler step from noise lands near the
    ring's centre, about a radius (1.5) from where the ODE ends. A small MLP trained for a few
    hundred steps on (noise, ODE(noise)) pairs lands within a fraction of that in one step."""
    torch.manual_seed(0)
    teacher = flow.ExactVelocity(flow.ring_mixture())
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 2, generator=generator)
    pairs = torch.cat([distill.teacher_digits(teacher, z, None, steps=32), z], dim=1)
    student = flow.ToyMLP()
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3)
    for step in range(600):
        batch = pairs[torch.randint(len(pairs), (256,), generator=generator)]
        training.train_step(student, optimizer, batch, distill.reflow_loss, generator=generator)
    z_test = torch.randn(1000, 2, generator=generator)
    target = distill.teacher_digits(teacher, z_test, None, steps=32)
    one_step = lambda model: (flow.euler_sample(model, z_test, [1.0, 0.0]) - target).norm(dim=1).mean().item()
    teacher_error, student_error = one_step(teacher), one_step(student.eval())
    assert teacher_error > 1.0, teacher_error
    assert student_error < 0.3 * teacher_error, (student_error, teacher_error)
