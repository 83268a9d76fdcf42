"""Lesson 10 (flow.py): the straight path, the flow-matching loss, Euler and Heun, and the 2-D
mixture's closed forms, against hand computations and oracles with known endpoints."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_course import flow, runs, training


class GaussianVelocity(torch.nn.Module):
    """The exact velocity for data x0 ~ N(m, s^2 I): x_t = (1 - t) m + sigma_t z with
    sigma_t^2 = (1 - t)^2 s^2 + t^2, so v = -m + sigma_t' z, sigma_t' = (t - (1 - t) s^2) / sigma_t.
    The ODE from x_1 at t = 1 ends at m + s x_1 (each z keeps its quantile)."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = torch.as_tensor(mean, dtype=torch.float64), std

    def forward(self, x, t, cond=None):
        t = (t / flow.TIME_SCALE).view(-1, 1)
        sigma = ((1 - t) ** 2 * self.std ** 2 + t ** 2).sqrt()
        z = (x - (1 - t) * self.mean) / sigma
        return -self.mean + (t - (1 - t) * self.std ** 2) / sigma * z


MEAN, STD = [1.0, -0.5], 0.2


def gaussian_problem(num=64):
    x1 = torch.randn(num, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return GaussianVelocity(MEAN, STD), x1, torch.tensor(MEAN, dtype=torch.float64) + STD * x1


def test_straight_path_and_target_by_hand():
    x0, noise = torch.tensor([[1.0, 2.0]]), torch.tensor([[-3.0, 5.0]])
    assert torch.allclose(flow.straight_path(x0, noise, torch.tensor([0.25])), torch.tensor([[0.0, 2.75]]))
    assert torch.equal(flow.flow_matching_target(x0, noise), torch.tensor([[-4.0, 3.0]]))


def test_loss_equals_a_hand_computation_and_scales_t_by_1000():
    seen = {}

    def model(x_t, t, cond=None):
        seen["x_t"], seen["t"] = x_t, t
        return 2 * x_t

    x0, noise, t = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[-3.0, 5.0], [1.0, 1.0]]), torch.tensor([0.25, 1.0])
    loss = flow.flow_matching_loss(model, x0, t=t, noise=noise)
    x_t = torch.tensor([[0.0, 2.75], [1.0, 1.0]])
    target = torch.tensor([[-4.0, 3.0], [1.0, 2.0]])
    assert torch.allclose(seen["x_t"], x_t) and torch.allclose(seen["t"], torch.tensor([250.0, 1000.0]))
    assert loss.item() == pytest.approx(((2 * x_t - target) ** 2).mean().item())


def test_loss_draws_from_the_generator():
    model = flow.ToyMLP()
    x0 = torch.randn(8, 2)
    a = flow.flow_matching_loss(model, x0, generator=torch.Generator().manual_seed(3))
    b = flow.flow_matching_loss(model, x0, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


@pytest.mark.parametrize("sampler", [flow.euler_sample, flow.heun_sample])
def test_samplers_reach_the_gaussian_endpoint(sampler):
    model, x1, endpoint = gaussian_problem()
    got = sampler(model, x1, flow.flow_time_grid(256))
    assert (got - endpoint).abs().max() < 0.01


def test_heun_is_far_more_accurate_than_euler_at_the_same_steps():
    model, x1, endpoint = gaussian_problem()
    for steps in (4, 8, 16):
        euler = (flow.euler_sample(model, x1, flow.flow_time_grid(steps)) - endpoint).abs().max().item()
        heun = (flow.heun_sample(model, x1, flow.flow_time_grid(steps)) - endpoint).abs().max().item()
        assert heun < euler / 4, (steps, euler, heun)   # measured 5.3x, 8.8x, 14.7x
    # Also at the same number of network calls (Heun makes two per step): measured 4.7x at 8 steps.
    for steps in (8, 16):
        euler = (flow.euler_sample(model, x1, flow.flow_time_grid(2 * steps)) - endpoint).abs().max().item()
        heun = (flow.heun_sample(model, x1, flow.flow_time_grid(steps)) - endpoint).abs().max().item()
        assert heun < euler / 3, (steps, euler, heun)
    # Euler is first order: doubling the steps about halves its error.
    e8 = (flow.euler_sample(model, x1, flow.flow_time_grid(8)) - endpoint).abs().max().item()
    e16 = (flow.euler_sample(model, x1, flow.flow_time_grid(16)) - endpoint).abs().max().item()
    assert 1.6 < e8 / e16 < 2.5


def test_a_point_mass_is_reached_by_one_euler_step():
    """All data at one point x*: v = (x - x*) / t, constant along each straight line."""
    target = torch.tensor([0.5, -2.0])
    model = lambda x, t, cond=None: (x - target) / (t / flow.TIME_SCALE).view(-1, 1)
    x1 = torch.randn(5, 2)
    assert torch.allclose(flow.euler_sample(model, x1, [1.0, 0.0]), target.expand(5, 2), atol=1e-6)


def test_mixture_closed_forms_agree_with_each_other_and_autograd():
    mixture = flow.ring_mixture(5, std=0.3)
    x = torch.randn(16, 2, dtype=torch.float64)
    mixture = flow.GaussianMixture(mixture.means.double(), mixture.std, mixture.weights.double())
    for t in (0.1, 0.5, 0.9):
        x_req = x.clone().requires_grad_(True)
        log_p = flow.mixture_log_density(x_req, mixture, signal_scale=1 - t, noise_scale=t)
        score = torch.autograd.grad(log_p.sum(), x_req)[0]
        eps = flow.mixture_eps(x, mixture, signal_scale=1 - t, noise_scale=t)
        assert torch.allclose(eps, -t * score, atol=1e-10)                          # Tweedie
        x0_mean = (x - t * eps) / (1 - t)
        assert torch.allclose(flow.mixture_velocity(x, t, mixture), eps - x0_mean, atol=1e-10)
    one = flow.GaussianMixture(torch.tensor([MEAN], dtype=torch.float64), STD, torch.ones(1, dtype=torch.float64))
    t = torch.full((16,), 0.3, dtype=torch.float64)
    assert torch.allclose(flow.mixture_velocity(x, t, one), GaussianVelocity(MEAN, STD)(x, flow.TIME_SCALE * t))


def test_exact_mixture_velocity_carries_noise_to_the_mixture():
    mixture = flow.ring_mixture(6)
    x1 = torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    samples = flow.heun_sample(flow.ExactVelocity(mixture), x1, flow.flow_time_grid(32))
    nearest = torch.cdist(samples, mixture.means).min(dim=1).values
    assert (nearest < 3 * mixture.std).float().mean() > 0.97


def test_callback_gets_float_times_and_can_replace_the_sample():
    model, x1, _ = gaussian_problem(4)
    steps = []
    out = flow.euler_sample(model, x1, [1.0, 0.5, 0.0], callback=lambda s: steps.append(s) or torch.zeros_like(s.x_prev))
    assert [(s.i, s.t, s.t_prev) for s in steps] == [(0, 1.0, 0.5), (1, 0.5, 0.0)]
    assert torch.equal(out, torch.zeros_like(x1)) and torch.equal(steps[1].x_t, torch.zeros_like(x1))


def test_clip_x0_clamps_the_guess():
    model = lambda x, t, cond=None: torch.full_like(x, -10.0)        # x0_pred = x + 10 t, far out of range
    got = flow.euler_sample(model, torch.zeros(2, 2), [1.0, 0.0], clip_x0=1.0)
    assert torch.allclose(got, torch.ones(2, 2))


def test_runs_train_accepts_the_flow_matching_loss():
    images = flow.mixture_sample(flow.ring_mixture(), 64).view(64, 2, 1, 1)

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = flow.ToyMLP(hidden=16)

        def forward(self, x, t, cond=None):
            return self.mlp(x.flatten(1), t).view_as(x)

    result = runs.train(Flat(), images, flow.flow_matching_loss,
                        config=runs.TrainConfig(steps=3, minutes=None, batch_size=16, progress=False,
                                                checkpoint_minutes=None, warmup_steps=0))
    assert result.step == 3 and all(math.isfinite(loss) for loss in result.losses)


def test_train_step_accepts_the_flow_matching_loss():
    model = flow.ToyMLP(hidden=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert math.isfinite(training.train_step(model, optimizer, torch.randn(8, 2), flow.flow_matching_loss))


@pytest.mark.parametrize("call, message", [
    (lambda: flow.flow_time_grid(0), "steps must be"),
    (lambda: flow.euler_sample(flow.ToyMLP(), torch.randn(2, 2), [0.0, 1.0]), "strictly decreasing"),
    (lambda: flow.heun_sample(flow.ToyMLP(), torch.randn(2, 2), [1.5, 0.0]), "in \\[0, 1\\]"),
    (lambda: flow.euler_sample(flow.ToyMLP(), torch.randn(2), None), "noise must be"),
    (lambda: flow.euler_sample(flow.ToyMLP(), torch.randn(2, 2), None, clip_x0=0), "clip_x0"),
    (lambda: flow.flow_matching_loss(flow.ToyMLP(), torch.randn(2, 2), t=torch.tensor([0, 1])), "float tensor"),
    (lambda: flow.flow_matching_loss(flow.ToyMLP(), torch.randn(2, 2), t=torch.tensor([0.5, 2.0])), "lie in \\[0, 1\\]"),
    (lambda: flow.flow_matching_loss(flow.ToyMLP(), torch.randn(2, 2), noise=torch.randn(3, 2)), "noise must be"),
    (lambda: flow.flow_matching_loss(flow.ToyMLP(), torch.arange(4).view(2, 2)), "x0 must be"),
])
def test_bad_inputs_give_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_karras_time_grid_is_edm_spacing_on_the_straight_path():
    """Evenly spaced in sigma^(1/rho) with sigma = t / (1 - t); starts at 1 (pure noise), ends at 0."""
    times = flow.karras_time_grid(5, rho=7.0, sigma_min=0.002, sigma_max=80.0)
    assert len(times) == 6 and times[0] == 1.0 and times[-1] == 0.0
    assert all(a > b for a, b in zip(times, times[1:]))
    sigmas = [t / (1 - t) for t in times[1:-1]]
    roots = [80.0 ** (1 / 7)] + [s ** (1 / 7) for s in sigmas]          # sigma_max, then the grid's own
    assert all(abs((a - b) - (roots[0] - 0.002 ** (1 / 7)) / 4) < 1e-9 for a, b in zip(roots, roots[1:]))
    assert sigmas[-1] == pytest.approx(0.002)
    with pytest.raises(ValueError, match="steps must be a whole number >= 2"):
        flow.karras_time_grid(1)
