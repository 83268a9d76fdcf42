"""Noise schedules and the forward process, checked against DDPM, Nichol & Dhariwal and closed forms."""

import math

import pytest
import torch

from diffusion_course import schedules
from diffusion_course.schedules import (cosine_schedule, gather, linear_schedule, q_sample,
                                        schedule_from_config, snr)


# --- linear and cosine schedules -------------------------------------------------------------

def test_linear_schedule_matches_ddpm():
    schedule = linear_schedule()   # DDPM: beta from 1e-4 to 0.02 over T = 1000 steps
    expected = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert schedule.name == "linear"
    assert schedule.num_steps == 1000
    torch.testing.assert_close(schedule.beta.double(), expected, rtol=1e-6, atol=1e-9)
    assert schedule.beta[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert schedule.beta[-1].item() == pytest.approx(0.02, rel=1e-6)


@pytest.mark.parametrize("make", [linear_schedule, cosine_schedule], ids=["linear", "cosine"])
def test_schedule_shapes_dtypes_and_cumulative_product(make):
    schedule = make(1000)
    for values in (schedule.beta, schedule.alpha, schedule.alpha_bar):
        assert values.shape == (1000,)
        assert values.dtype == torch.float32
    torch.testing.assert_close(schedule.alpha, 1 - schedule.beta)
    # alpha_bar_t = prod_{s <= t} alpha_s, computed independently in float64.
    running, expected = 1.0, []
    for a in schedule.alpha.double().tolist():
        running *= a
        expected.append(running)
    torch.testing.assert_close(schedule.alpha_bar.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-12)
    assert bool((schedule.alpha_bar[1:] < schedule.alpha_bar[:-1]).all()), "alpha_bar must decrease"
    assert 0 < schedule.alpha_bar[-1] < schedule.alpha_bar[0] < 1


def test_cosine_alpha_bar_matches_nichol_dhariwal_eq17():
    T, s = 1000, 0.008
    schedule = cosine_schedule(T, s)

    def f(t):   # Eq. 17: f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    # Zero-based step i holds alpha_bar at the end of step i, that is at t = i + 1 in Eq. 17.
    expected = torch.tensor([f(i + 1) / f(0) for i in range(T)], dtype=torch.float64)
    beta = 1 - expected[1:] / expected[:-1]
    clipped = beta > 0.999    # Nichol & Dhariwal clip beta at 0.999; only the last step is affected
    assert clipped.sum() == 1 and bool(clipped[-1])
    torch.testing.assert_close(schedule.alpha_bar[:-1].double(), expected[:-1], rtol=2e-5, atol=1e-9)
    assert schedule.beta[-1].item() == pytest.approx(0.999, rel=1e-6)
    assert schedule.alpha_bar[-1].item() == pytest.approx(schedule.alpha_bar[-2].item() * 0.001, rel=1e-4)


def test_cosine_schedule_short():
    schedule = cosine_schedule(50)
    assert schedule.beta.shape == (50,)
    assert bool(((schedule.beta > 0) & (schedule.beta <= 0.999)).all())


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    for schedule in (linear_schedule(), cosine_schedule()):
        ab = schedule.alpha_bar.double()
        torch.testing.assert_close(snr(schedule).double(), ab / (1 - ab), rtol=1e-4, atol=1e-12)
        assert snr(schedule).shape == (1000,)
        assert bool((snr(schedule)[1:] < snr(schedule)[:-1]).all()), "the SNR must fall with t"


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [100, 1000])
def test_schedule_from_config_round_trip(name, num_steps):
    schedule = schedules.SCHEDULES[name](num_steps)
    config = schedule.to_config()
    assert config["name"] == name and config["num_steps"] == num_steps
    again = schedule_from_config(config)
    assert again.name == name
    assert torch.equal(again.beta, schedule.beta)
    assert torch.equal(again.alpha_bar, schedule.alpha_bar)


def test_schedule_from_config_rejects_unknown_name():
    with pytest.raises(ValueError, match="Unknown schedule"):
        schedule_from_config({"name": "sigmoid", "num_steps": 1000})


def test_custom_schedule_cannot_be_saved():
    schedule = schedules.schedule_from_beta(torch.full((10,), 0.1))
    with pytest.raises(ValueError, match="named schedules"):
        schedule.to_config()


def test_schedule_config_keeps_non_default_parameters():
    schedule = linear_schedule(1000, beta_start=1e-3, beta_end=0.03)
    try:
        again = schedule_from_config(schedule.to_config())
    except ValueError:
        return   # refusing to save such a schedule would also be acceptable
    torch.testing.assert_close(again.beta, schedule.beta)


@pytest.mark.parametrize("num_steps", [1, 0, -5, 2.5, "1000"])
def test_num_steps_below_two_rejected(num_steps):
    for make in (linear_schedule, cosine_schedule):
        with pytest.raises(ValueError, match="num_steps must be an integer of at least 2"):
            make(num_steps)


def test_schedule_from_beta_rejects_out_of_range():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        schedules.schedule_from_beta(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        schedules.schedule_from_beta(torch.tensor([0.0, 0.1]))


# --- q_sample ----------------------------------------------------------------------------------

def test_q_sample_with_given_noise_is_the_closed_form():
    schedule = cosine_schedule()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 5, 5, generator=generator) * 2 - 1
    noise = torch.randn(4, 1, 5, 5, generator=generator)
    t = torch.tensor([0, 10, 500, 999])
    out = q_sample(x0, t, schedule, noise)
    for b in range(4):
        ab = schedule.alpha_bar[t[b]]
        expected = ab.sqrt() * x0[b] + (1 - ab).sqrt() * noise[b]
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-6)
    assert out.shape == x0.shape and out.dtype == x0.dtype


@pytest.mark.parametrize("make", [linear_schedule, cosine_schedule], ids=["linear", "cosine"])
def test_q_sample_empirical_mean_and_variance(make):
    schedule = make()
    torch.manual_seed(0)
    n = 20000
    pixel_values = torch.tensor([-1.0, -0.3, 0.5, 1.0])
    x0 = pixel_values.view(1, 1, 1, 4).expand(n, 1, 1, 4).contiguous()
    for step in (0, 100, 400, 999):
        t = torch.full((n,), step, dtype=torch.long)
        x_t = q_sample(x0, t, schedule)
        ab = schedule.alpha_bar[step].double()
        mean, var = x_t.double().mean(0).flatten(), x_t.double().var(0).flatten()
        expected_mean = ab.sqrt() * pixel_values.double()
        expected_var = (1 - ab).expand(4)
        # Standard errors: sqrt(var / n) for the mean, var * sqrt(2 / n) for the variance; 5 of them.
        torch.testing.assert_close(mean, expected_mean, rtol=0, atol=5 * math.sqrt((1 - ab) / n) + 1e-9)
        torch.testing.assert_close(var, expected_var, rtol=5 * math.sqrt(2 / n), atol=1e-9)


def test_gather_shape():
    values = torch.arange(10, dtype=torch.float32)
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    out = gather(values, torch.tensor([0, 4, 9]), x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float64
    assert out.flatten().tolist() == [0.0, 4.0, 9.0]


@pytest.mark.parametrize("t, message", [
    (torch.tensor([1.0, 2.0]), "int64 tensor of shape"),                 # float timesteps
    (torch.tensor([[1], [2]]), r"int64 tensor of shape \(B,\)"),          # (B, 1)
    (torch.tensor([3, 1000]), r"t must lie in \[0, 1000\)"),              # t == T
    (torch.tensor([-1, 3]), r"t must lie in \[0, 1000\)"),                # t < 0
    (torch.tensor([1, 2, 3]), "3 entries but the batch has 2"),          # wrong batch size
    (5, "int64 tensor of shape"),                                        # a plain int
])
def test_q_sample_rejects_bad_timesteps(t, message):
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=message):
        q_sample(x0, t, linear_schedule())


def test_q_sample_rejects_noise_of_the_wrong_shape():
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 1, 4, 5\) but x0 has \(2, 1, 4, 4\)"):
        q_sample(x0, torch.tensor([1, 2]), linear_schedule(), torch.zeros(2, 1, 4, 5))


def test_timestep_error_suggests_a_fix():
    with pytest.raises(ValueError, match="torch.full"):
        q_sample(torch.zeros(2, 1, 4, 4), torch.tensor([1, 2], dtype=torch.int32), linear_schedule())


def test_scaled_linear_is_stable_diffusions_schedule():
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed")
    give Stable Diffusion's terminal signal scale sqrt(alpha_bar_{T-1}) = 0.068265 and its
    terminal SNR 0.004682; the cosine schedule's last alpha_bar is about 1e-9 by comparison."""
    from diffusion_course.schedules import scaled_linear_schedule, schedule_from_config, snr
    schedule = scaled_linear_schedule()
    assert schedule.alpha_bar[-1].sqrt().item() == pytest.approx(0.068265, abs=2e-6)
    assert snr(schedule)[-1].item() == pytest.approx(0.004682, abs=2e-5)
    assert schedule.alpha_bar[-1] > 1e6 * cosine_schedule().alpha_bar[-1]
    assert torch.equal(schedule_from_config(schedule.to_config()).beta, schedule.beta)
