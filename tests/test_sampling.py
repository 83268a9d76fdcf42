"""Samplers, checked with oracle noise models whose right answers are known in closed form."""

import pytest
import torch

from diffusion_course import sampling
from diffusion_course.sampling import (SamplerStep, ddim_sample, ddim_step, ddpm_sample, ddpm_step, denoise,
                                       dpm_solver_sample, dpm_solver_step, predict_eps, predict_x0, sample,
                                       timestep_grid, timestep_sequence)
from diffusion_course.schedules import cosine_schedule, linear_schedule, q_sample

SAMPLE_FUNCTIONS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpm": dpm_solver_sample}


def run_sampler(name, model, x_T, schedule, sampling_steps=None, t_start=None, **kwargs):
    """A sampler on its default grid (timestep_grid), as sampling.sample builds it."""
    timesteps = timestep_grid(name, schedule, sampling_steps, t_start)
    return SAMPLE_FUNCTIONS[name](model, x_T, schedule, timesteps, **kwargs)


class KnownX0Oracle:
    """The perfect denoiser for a data set of one image x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab).
    Every sampler must then return x0. Records the (x_t, t) it is called with.

    DDPM's last step recovers x0 only up to ~1e-5 even in float64: the schedule stores beta and
    alpha_bar separately rounded to float32, so 1 - alpha_bar[0] and beta[0] differ by ~6e-4 relative.
    """

    def __init__(self, x0, schedule):
        self.x0, self.alpha_bar = x0, schedule.alpha_bar.double()
        self.calls = []

    def __call__(self, x_t, t, cond=None):
        self.calls.append((x_t.clone(), t.clone()))
        ab = self.alpha_bar[t].view(-1, 1, 1, 1).to(x_t.dtype)
        return (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()


class GaussianOracle:
    """The exact noise prediction E[eps | x_t] when every pixel of x0 is N(mu, s^2):
    with a = sqrt(ab), sigma = sqrt(1 - ab), eps = sigma (x_t - a mu) / (a^2 s^2 + sigma^2)."""

    def __init__(self, mu, s, schedule):
        self.mu, self.s, self.alpha_bar = mu, s, schedule.alpha_bar.double()

    def __call__(self, x_t, t, cond=None):
        a = self.alpha_bar[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - self.alpha_bar[t]).sqrt().view(-1, 1, 1, 1)
        return sigma * (x_t - a * self.mu) / (a**2 * self.s**2 + sigma**2)

    def ode_endpoint(self, x_T):
        """The probability-flow ODE keeps (x_t - a mu) / sqrt(a^2 s^2 + sigma^2) constant, so it ends at
        x0 = mu + s (x_T - a_T mu) / sqrt(a_T^2 s^2 + sigma_T^2)."""
        a, sigma = self.alpha_bar[-1].sqrt(), (1 - self.alpha_bar[-1]).sqrt()
        return self.mu + self.s * (x_T - a * self.mu) / (a**2 * self.s**2 + sigma**2).sqrt()


def oracle_tolerance(name, dtype=torch.float64):
    return 1e-4 if dtype == torch.float32 or name == "ddpm" else 1e-9


def make_x0(dtype=torch.float32):
    return (torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(dtype)


def start_noise(dtype=torch.float32, shape=(3, 1, 6, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)


# --- oracles -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make_schedule", [linear_schedule, cosine_schedule], ids=["linear", "cosine"])
@pytest.mark.parametrize("name, num_steps", [("ddpm", None), ("ddim", 20), ("ddim", 1000), ("dpm", 20),
                                             ("dpm", 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_every_sampler_returns_x0_for_the_oracle(make_schedule, name, num_steps, dtype):
    schedule = make_schedule()
    x0 = make_x0(dtype)
    oracle = KnownX0Oracle(x0, schedule)
    out = run_sampler(name, oracle, start_noise(dtype), schedule, num_steps,
                      generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype
    torch.testing.assert_close(out, x0, rtol=0, atol=oracle_tolerance(name, dtype))
    assert len(oracle.calls) == (num_steps or schedule.num_steps)


def test_ddim_with_noise_also_returns_x0_for_the_oracle():
    schedule = linear_schedule()
    x0 = make_x0(torch.float64)
    out = ddim_sample(KnownX0Oracle(x0, schedule), start_noise(torch.float64), schedule,
                      timestep_sequence(30, 999), eta=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def gaussian_errors(num_steps_ddim, num_steps_dpm):
    schedule = cosine_schedule()
    oracle = GaussianOracle(mu=0.3, s=0.5, schedule=schedule)
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = oracle.ode_endpoint(x_T)
    # No clipping of x0_pred: these Gaussian "images" leave [-1, 1], and the test is about the ODE solvers.
    ddim = [(run_sampler("ddim", oracle, x_T, schedule, n, clip_x0=None) - exact).abs().max().item()
            for n in num_steps_ddim]
    dpm = [(run_sampler("dpm", oracle, x_T, schedule, n, clip_x0=None) - exact).abs().max().item()
           for n in num_steps_dpm]
    return ddim, dpm


def test_gaussian_oracle_ddim_converges_and_dpm_solver_is_more_accurate():
    (ddim_10, ddim_20, ddim_50), (dpm_20,) = gaussian_errors([10, 20, 50], [20])
    # Measured (float64, cosine schedule, mu = 0.3, s = 0.5): DDIM 0.25 / 0.12 / 0.049 at 10 / 20 / 50
    # steps (first order: the error halves when the steps double); DPM-Solver++(2M) 0.0066 at 20 steps.
    assert ddim_50 < ddim_20 < ddim_10
    assert ddim_50 < 0.6 * ddim_20 and ddim_20 < 0.6 * ddim_10
    assert ddim_50 < 0.07
    assert dpm_20 < 0.015
    assert dpm_20 < ddim_20 / 8


# --- single steps -------------------------------------------------------------------------------

def test_predict_x0_inverts_q_sample():
    schedule = cosine_schedule()
    x0, noise = make_x0(torch.float64), start_noise(torch.float64)
    t = torch.tensor([0, 300, 900])
    x_t = q_sample(x0, t, schedule, noise)
    torch.testing.assert_close(predict_x0(x_t, t, noise, schedule), x0, rtol=0, atol=1e-9)


def test_predict_eps_inverts_predict_x0():
    schedule = linear_schedule()
    x_t, eps = start_noise(torch.float64), make_x0(torch.float64)
    t = torch.tensor([0, 300, 999])
    torch.testing.assert_close(predict_eps(x_t, t, predict_x0(x_t, t, eps, schedule), schedule), eps,
                               rtol=1e-7, atol=1e-7)


def test_denoise_clips_x0_and_keeps_eps_consistent():
    schedule = cosine_schedule()
    x_t = 3 * start_noise(torch.float64)
    t = torch.tensor([999, 500, 10])
    wild = lambda x, t, cond: -4 * x          # a poor model: x0 guesses far outside [-1, 1]
    eps_raw, x0_raw = denoise(wild, x_t, t, schedule, clip_x0=None)
    assert torch.equal(eps_raw, -4 * x_t)
    torch.testing.assert_close(x0_raw, predict_x0(x_t, t, eps_raw, schedule))
    assert x0_raw.abs().max() > 1
    eps, x0 = denoise(wild, x_t, t, schedule)           # clip_x0=1.0 is the default
    torch.testing.assert_close(x0, x0_raw.clamp(-1, 1))
    torch.testing.assert_close(predict_x0(x_t, t, eps, schedule), x0, rtol=1e-6, atol=1e-6)
    half = denoise(wild, x_t, t, schedule, clip_x0=0.5)  # another data range, e.g. latents
    torch.testing.assert_close(half.x0_pred, x0_raw.clamp(-0.5, 0.5))


@pytest.mark.parametrize("clip_x0", [True, 0.0, -1.0, float("nan"), float("inf"), "1"])
def test_bad_clip_x0_rejected(clip_x0):
    with pytest.raises(ValueError, match="clip_x0 must be the data range"):
        ddim_sample(lambda x, t, c: x, start_noise(), linear_schedule(), clip_x0=clip_x0)


def test_predict_x0_rejects_t_minus_one():
    """t = -1 ("clean") has no alpha_bar in the table: it used to wrap around to the last step."""
    x = start_noise()
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        predict_x0(x, torch.full((3,), -1), x, linear_schedule())


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm"])
def test_clip_x0_keeps_the_guesses_in_range(name):
    schedule = linear_schedule()
    wild = lambda x, t, cond: -4 * x
    seen = {}
    for clip in (1.0, None):
        guesses = []
        run_sampler(name, wild, start_noise(), schedule, None if name == "ddpm" else 5, t_start=20, clip_x0=clip,
                    callback=lambda step: guesses.append(step.x0_pred.abs().max().item()),
                    generator=torch.Generator().manual_seed(0))
        seen[clip] = max(guesses)
    assert seen[1.0] <= 1.0 < seen[None]


def beta_tilde(schedule, step):
    """DDPM's posterior variance (Eq. 7): (1 - ab_{t-1}) / (1 - ab_t) * beta_t, with ab_{-1} = 1."""
    ab = schedule.alpha_bar.double()
    ab_prev = ab[step - 1] if step > 0 else torch.tensor(1.0, dtype=torch.float64)
    return (1 - ab_prev) / (1 - ab[step]) * schedule.beta.double()[step]


@pytest.mark.parametrize("make_schedule", [linear_schedule, cosine_schedule], ids=["linear", "cosine"])
def test_ddim_eta_one_has_ddpm_posterior_variance_and_mean(make_schedule):
    schedule = make_schedule()
    steps = torch.tensor([0, 1, 10, 500, 998, 999])
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(6, 1, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(6, 1, 4, 4, generator=generator, dtype=torch.float64)
    z = torch.randn(6, 1, 4, 4, generator=generator, dtype=torch.float64)
    mean = ddim_step(x_t, steps, steps - 1, eps, schedule, eta=1.0, noise=torch.zeros_like(z))
    with_noise = ddim_step(x_t, steps, steps - 1, eps, schedule, eta=1.0, noise=z)
    sigma = (with_noise - mean) / z
    for b, step in enumerate(steps.tolist()):
        expected = beta_tilde(schedule, step).sqrt().item()
        # rtol 5e-4: at small t, 1 - alpha_bar_t / alpha_bar_prev (DDIM's form of beta_t) loses digits
        # to the float32 rounding of alpha_bar (seen: 1.8e-4 relative at t = 1); a wrong formula is off by far more.
        torch.testing.assert_close(sigma[b], torch.full_like(sigma[b], expected), rtol=5e-4, atol=1e-8)
    # The mean is DDPM's posterior mean too: ddpm_step without its noise (the two formulas agree up to
    # the float32 rounding of the stored schedule).
    torch.testing.assert_close(mean, ddpm_step(x_t, steps, eps, schedule, noise=torch.zeros_like(z)),
                               rtol=1e-4, atol=1e-5)


def test_ddpm_step_against_algorithm_2():
    schedule = linear_schedule()
    generator = torch.Generator().manual_seed(0)
    x_t, eps, z = (torch.randn(2, 1, 3, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 600])
    out = ddpm_step(x_t, t, eps, schedule, noise=z)
    for b, step in enumerate(t.tolist()):
        beta, alpha, ab = (v.double()[step] for v in (schedule.beta, schedule.alpha, schedule.alpha_bar))
        sigma = beta.sqrt() if step > 0 else 0.0       # no noise on the last step
        expected = (x_t[b] - beta / (1 - ab).sqrt() * eps[b]) / alpha.sqrt() + sigma * z[b]
        torch.testing.assert_close(out[b], expected, rtol=1e-6, atol=1e-6)


def test_ddim_step_eta_zero_ignores_noise_and_first_order_dpm_solver_equals_it():
    schedule = cosine_schedule()
    generator = torch.Generator().manual_seed(0)
    x_t, eps = (torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    t, t_prev = torch.tensor([999, 500, 40]), torch.tensor([900, 100, 39])
    ddim = ddim_step(x_t, t, t_prev, eps, schedule)
    assert torch.equal(ddim, ddim_step(x_t, t, t_prev, eps, schedule, noise=torch.ones_like(x_t)))
    # DPM-Solver++ of first order is DDIM (Lu et al. 2022, Sec. 4.1).
    x0_pred = predict_x0(x_t, t, eps, schedule)
    torch.testing.assert_close(dpm_solver_step(x_t, t, t_prev, x0_pred, schedule), ddim, rtol=1e-7, atol=1e-7)
    # To t_prev = -1 (clean) both return x0_pred.
    clean = torch.full_like(t, -1)
    torch.testing.assert_close(ddim_step(x_t, t, clean, eps, schedule), x0_pred)
    assert torch.equal(dpm_solver_step(x_t, t, clean, x0_pred, schedule), x0_pred)


def test_dpm_solver_step_treats_a_clean_target_image_by_image():
    """A batch whose t_prev mixes -1 and 5: only the -1 rows return x0_pred (it used to be all rows)."""
    schedule = cosine_schedule()
    generator = torch.Generator().manual_seed(0)
    x_t, x0_pred = (torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    t, t_prev = torch.tensor([40, 40]), torch.tensor([-1, 5])
    mixed = dpm_solver_step(x_t, t, t_prev, x0_pred, schedule)
    assert torch.equal(mixed[0], x0_pred[0])
    torch.testing.assert_close(mixed[1:], dpm_solver_step(x_t[1:], t[1:], t_prev[1:], x0_pred[1:], schedule))
    assert not torch.allclose(mixed[1], x0_pred[1])
    previous = (x0_pred.flip(0), torch.tensor([60, 60]))      # second order too
    second = dpm_solver_step(x_t, t, t_prev, x0_pred, schedule, previous)
    assert torch.equal(second[0], x0_pred[0]) and bool(torch.isfinite(second).all())


@pytest.mark.parametrize("eta", [-1.0, float("nan"), float("inf"), True])
def test_ddim_step_rejects_bad_eta(eta):
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        ddim_step(x, torch.tensor([5, 5]), torch.tensor([3, 3]), x, linear_schedule(), eta=eta)


@pytest.mark.parametrize("t_prev", [torch.tensor([5, 5]), torch.tensor([6, 3]), torch.tensor([-2, 3]),
                                    torch.tensor([3])])
def test_ddim_step_rejects_bad_t_prev(t_prev):
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="t_prev"):
        ddim_step(x, torch.tensor([5, 5]), t_prev, x, linear_schedule())


def test_ddim_step_on_an_empty_batch_returns_an_empty_batch():
    empty = torch.zeros(0, 1, 2, 2)
    none = torch.zeros(0, dtype=torch.long)
    assert ddim_step(empty, none, none, empty, linear_schedule()).shape == (0, 1, 2, 2)


# --- determinism and randomness ----------------------------------------------------------------

def test_ddim_eta_zero_is_deterministic(tiny_unet):
    schedule = linear_schedule()
    x_T = start_noise(shape=(2, 1, 8, 8))
    first = run_sampler("ddim", tiny_unet, x_T, schedule, 5, generator=torch.Generator().manual_seed(0))
    second = run_sampler("ddim", tiny_unet, x_T, schedule, 5, generator=torch.Generator().manual_seed(1))
    third = run_sampler("ddim", tiny_unet, x_T, schedule, 5)
    assert torch.equal(first, second) and torch.equal(first, third)


@pytest.mark.parametrize("name, kwargs", [("ddim", {"sampling_steps": 5, "eta": 0.5}), ("ddpm", {"t_start": 15})])
def test_stochastic_samplers_follow_the_seed(tiny_unet, name, kwargs):
    schedule = linear_schedule()
    x_T = start_noise(shape=(2, 1, 8, 8))

    def run(seed):
        return run_sampler(name, tiny_unet, x_T, schedule, generator=torch.Generator().manual_seed(seed), **kwargs)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3


def test_dpm_solver_ignores_the_generator(tiny_unet):
    schedule = cosine_schedule()
    x_T = start_noise(shape=(2, 1, 8, 8))
    assert torch.equal(run_sampler("dpm", tiny_unet, x_T, schedule, 4, generator=torch.Generator().manual_seed(0)),
                       run_sampler("dpm", tiny_unet, x_T, schedule, 4, generator=torch.Generator().manual_seed(9)))


def test_samplers_pass_the_condition(tiny_cond_unet):
    schedule = linear_schedule()
    x_T = start_noise(shape=(2, 1, 8, 8))
    a = run_sampler("ddim", tiny_cond_unet, x_T, schedule, 3, cond=torch.tensor([1, 1]))
    b = run_sampler("ddim", tiny_cond_unet, x_T, schedule, 3, cond=torch.tensor([7, 7]))
    assert (a - b).abs().max() > 1e-4


# --- callback and the timesteps to visit ------------------------------------------------------

@pytest.mark.parametrize("name, num_steps", [("ddpm", None), ("ddim", 4), ("dpm", 4)])
def test_callback_gets_one_consistent_record_per_step_and_can_replace_x_prev(name, num_steps):
    schedule = linear_schedule()
    x0 = make_x0(torch.float64)
    oracle = KnownX0Oracle(x0, schedule)
    records = []
    replacement = torch.full_like(x0, 0.25)

    def callback(step):
        records.append(step)
        return replacement if step.i == 1 else None

    timesteps = timestep_grid(name, schedule, num_steps, t_start=9)
    out = SAMPLE_FUNCTIONS[name](oracle, start_noise(torch.float64), schedule, timesteps,
                                 callback=callback, generator=torch.Generator().manual_seed(0))
    assert all(isinstance(r, SamplerStep) for r in records)
    assert [r.i for r in records] == list(range(len(timesteps)))
    # t is where x_t (what the model saw) is; t_prev where x_prev (the step's result) is, -1 once clean.
    assert [r.t for r in records] == timesteps
    assert [r.t_prev for r in records] == timesteps[1:] + [-1]
    assert all(isinstance(r.t, int) and isinstance(r.t_prev, int) for r in records)
    for r, (x_seen, t_seen) in zip(records, oracle.calls):    # x_t and t are what the model got
        assert torch.equal(r.x_t, x_seen) and int(t_seen[0]) == r.t
        torch.testing.assert_close(r.x0_pred, x0, rtol=0, atol=1e-8)   # the oracle's guess is x0 itself
    # The tensor returned at step i = 1 is what the model sees at step i = 2.
    assert torch.equal(oracle.calls[2][0], replacement) and torch.equal(records[2].x_t, replacement)
    torch.testing.assert_close(out, records[-1].x_prev)          # the last x_prev is the output
    torch.testing.assert_close(out, x0, rtol=0, atol=oracle_tolerance(name))


def test_callback_result_on_the_last_step_is_the_output():
    schedule = linear_schedule()
    x0 = make_x0()
    marker = torch.full_like(x0, -0.5)
    out = ddim_sample(KnownX0Oracle(x0, schedule), start_noise(), schedule, [999, 500, 0],
                      callback=lambda step: marker if step.i == 2 else None)
    assert torch.equal(out, marker)


@pytest.mark.parametrize("name, num_steps", [("ddpm", None), ("ddim", 6), ("dpm", 6)])
def test_timesteps_starting_partway(name, num_steps):
    """img2img's case: the grid starts at t_start; the samplers need no t_start of their own."""
    schedule = cosine_schedule()
    x0 = make_x0(torch.float64)
    t_start = 300
    x_start = q_sample(x0, torch.full((3,), t_start), schedule, start_noise(torch.float64))
    oracle = KnownX0Oracle(x0, schedule)
    out = run_sampler(name, oracle, x_start, schedule, num_steps, t_start=t_start,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(oracle.calls[0][1], torch.full((3,), t_start))
    assert len(oracle.calls) == (num_steps or t_start + 1)
    assert int(oracle.calls[-1][1][0]) == 0
    torch.testing.assert_close(out, x0, rtol=0, atol=oracle_tolerance(name))


@pytest.mark.parametrize("t_start", [-1, 1000, 2.5, True])
def test_t_start_out_of_range_rejected(t_start):
    with pytest.raises(ValueError, match=r"t_start must be an integer in \[0, 1000\)"):
        timestep_grid("ddim", linear_schedule(), 5, t_start=t_start)


@pytest.mark.parametrize("timesteps", [[], [5, 5, 0], [3, 7, 0], [1000, 0], [5, -1], [5.0, 0], "50", 20])
def test_bad_timesteps_rejected(timesteps):
    with pytest.raises(ValueError, match="timesteps must be a non-empty, strictly decreasing list"):
        ddim_sample(lambda x, t, c: x, start_noise(), linear_schedule(), timesteps)


def test_ddpm_cannot_skip_steps():
    with pytest.raises(ValueError, match="DDPM takes every step down to 0"):
        ddpm_sample(lambda x, t, c: x, start_noise(), linear_schedule(), [10, 5, 0])


def test_x_T_must_be_a_batch_of_images():
    schedule = linear_schedule()
    with pytest.raises(ValueError, match=r"x_T must be a \(B, C, H, W\) tensor"):
        ddim_sample(lambda x, t, c: x, torch.zeros(1, 6, 6), schedule)


# --- sample() and timestep_sequence ----------------------------------------------------------

def test_sample_dispatches_to_each_sampler():
    schedule = linear_schedule()
    x0 = make_x0(torch.float64)
    for name, num_steps in [("ddim", 7), ("dpm", 7), ("ddpm", None), ("ddpm", 1000)]:
        oracle = KnownX0Oracle(x0, schedule)
        out = sample(oracle, start_noise(torch.float64), schedule, sampler=name, sampling_steps=num_steps)
        assert len(oracle.calls) == (num_steps or 1000)
        torch.testing.assert_close(out, x0, rtol=0, atol=oracle_tolerance(name))
    assert set(sampling.SAMPLERS) == {"ddpm", "ddim", "dpm"}


def test_sample_rejects_unknown_sampler():
    with pytest.raises(ValueError, match=r"Unknown sampler 'euler'; expected one of \['ddim', 'ddpm', 'dpm'\]"):
        sample(lambda x, t, c: x, start_noise(), linear_schedule(), sampler="euler")


def test_sample_rejects_a_ddpm_step_count_that_is_not_every_step():
    with pytest.raises(ValueError, match=r"DDPM takes every step \(1000 here\); use sampler 'ddim' or 'dpm'"):
        sample(lambda x, t, c: x, start_noise(), linear_schedule(), sampler="ddpm", sampling_steps=50)
    with pytest.raises(ValueError, match=r"DDPM takes every step \(11 here\)"):
        sample(lambda x, t, c: x, start_noise(), linear_schedule(), sampler="ddpm", sampling_steps=10, t_start=10)


@pytest.mark.parametrize("spacing", ["linear", "quadratic"])
@pytest.mark.parametrize("num_steps, t_start", [(2, 999), (10, 999), (20, 999), (50, 999), (1000, 999),
                                                (5, 4), (6, 300), (20, 25), (3, 2)])
def test_timestep_sequence_is_strictly_decreasing_from_t_start_to_zero(spacing, num_steps, t_start):
    steps = timestep_sequence(num_steps, t_start, spacing)
    assert len(steps) == num_steps
    assert steps[0] == t_start and steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert all(isinstance(s, int) for s in steps)


def test_timestep_sequence_spacing():
    assert timestep_sequence(10, 999) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timestep_sequence(5, 100, "quadratic") == [100, 56, 25, 6, 0]     # round(100 (1 - i/4)^2)
    assert timestep_sequence(1, 7) == [7]
    gaps = [a - b for a, b in zip(timestep_sequence(20, 999, "quadratic"), timestep_sequence(20, 999, "quadratic")[1:])]
    assert gaps == sorted(gaps, reverse=True)          # quadratic: denser near t = 0


@pytest.mark.parametrize("num_steps", [0, 12, 2.0, True])
def test_timestep_sequence_rejects_bad_counts(num_steps):
    with pytest.raises(ValueError, match=r"the number of sampling steps must be an integer from 1 to 11"):
        timestep_sequence(num_steps, 10)


# --- golden number ----------------------------------------------------------------------------

@pytest.mark.parametrize("clip_x0, golden_sum, golden_mean_abs", [
    (1.0, 6.90809, 0.967383),       # the default: x0_pred clamped to [-1, 1] at every step
    (None, 3936.3806, 142.54103),  # raw: the untrained model's noise guesses are amplified by up to
                                    # 1 / sqrt(alpha_bar) ~ 156 at t = 999, hence the large values
])
def test_golden_ddim_loop(tiny_unet, clip_x0, golden_sum, golden_mean_abs):
    """One full sampling loop, pinned so silent drift in the U-Net, the schedule or DDIM shows.

    Setup: conftest's tiny U-Net (UNetConfig(base_channels=8, channel_mults=(1, 2), image_size=8),
    weights from torch.manual_seed(0), conv_out redrawn as 0.1 * randn from Generator seed 1),
    the default linear schedule, x_T = randn((2, 1, 8, 8)) from Generator seed 0, DDIM with
    10 steps and eta = 0. The numbers were obtained by running exactly this code once
    (torch 2.14.1, CPU; one and two threads agree to 3e-7 relative) and are checked to 1e-4 relative.
    If a deliberate change to the U-Net, the schedules or the sampler moves them, recompute them the
    same way and say why in the commit.
    """
    schedule = linear_schedule()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = ddim_sample(tiny_unet, x_T, schedule, timestep_sequence(10, 999), clip_x0=clip_x0,
                      generator=torch.Generator().manual_seed(0))
    assert out.sum().item() == pytest.approx(golden_sum, rel=1e-4)
    assert out.abs().mean().item() == pytest.approx(golden_mean_abs, rel=1e-4)


@pytest.mark.parametrize("returned", [True, 0.5, torch.zeros(1, 1, 6, 6)])
def test_a_callback_that_returns_something_else_than_none_or_a_sample_is_refused(returned):
    """tqdm's update() returns True when it redraws: a callback that passes it on used to replace the sample."""
    schedule = linear_schedule()
    with pytest.raises(ValueError, match="returns None or a tensor of shape"):
        ddim_sample(KnownX0Oracle(make_x0(), schedule), start_noise(), schedule, [999, 0],
                    callback=lambda step: returned)
