"""generate: the one way to make images (seeds, batching, guidance, the DDPM rule, decode, layout)."""

import contextlib
import threading
import time

import pytest
import torch

from diffusion_course import checkpoints, flow, threads
from diffusion_course import generate as generate_module
from diffusion_course.generate import generate, generate_batches
from diffusion_course.schedules import cosine_schedule


def test_generate_uses_guidance_and_the_negative_label(tiny_cond_unet):
    schedule = cosine_schedule(100)
    labels = torch.tensor([3, 3])
    run = lambda **kw: generate(tiny_cond_unet, schedule, num=2, shape=(1, 8, 8), cond=labels, sampler="ddim",
                                sampling_steps=4, **kw)
    plain, guided, steered = run(guidance_scale=1.0), run(guidance_scale=3.0), run(guidance_scale=3.0, negative=1)
    assert plain.shape == (2, 1, 8, 8) and plain.min() >= -1 and plain.max() <= 1
    assert (plain - guided).abs().max() > 1e-3
    assert (guided - steered).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_deterministic_samplers_do_not_depend_on_batch_size(tiny_cond_unet, sampler):
    schedule = cosine_schedule(30)
    run = lambda batch: generate(tiny_cond_unet, schedule, num=6, shape=(1, 8, 8), cond=torch.arange(6),
                                 sampler=sampler, sampling_steps=5, batch_size=batch)
    torch.testing.assert_close(run(6), run(4))


def test_generate_batches_yields_each_batch_with_its_first_index(tiny_unet):
    batches = list(generate_batches(tiny_unet, cosine_schedule(30), num=5, shape=(1, 8, 8), sampler="ddim",
                                    sampling_steps=3, batch_size=2))
    assert [start for start, _ in batches] == [0, 2, 4]
    assert [len(images) for _, images in batches] == [2, 2, 1]


def test_ddpm_takes_every_step_whatever_sampling_steps_says(tiny_unet):
    calls = []
    model = lambda x, t, cond=None: (calls.append(int(t[0])), tiny_unet(x, t, cond))[1]
    generate(model, cosine_schedule(12), num=1, shape=(1, 8, 8), sampler="ddpm", sampling_steps=20)
    assert calls == list(range(11, -1, -1))


def test_decode_step_and_its_output_range(tiny_unet):
    decode = lambda latents: 5 * latents.repeat(1, 3, 1, 1)      # a stand-in decoder: 1 -> 3 channels
    out = generate(tiny_unet, cosine_schedule(30), num=2, shape=(1, 8, 8), sampler="ddim", sampling_steps=3,
                   decode=decode, clip_x0=None)
    assert out.shape == (2, 3, 8, 8) and out.abs().max() <= 1.0


def test_channels_last_layout_gives_the_same_images_and_is_undone():
    """The CPU speed-up changes nothing but speed: the shipped model, 10 guided DDIM steps, with and
    without channels-last, agree within a grey level (one 8-bit level is 0.0078 in [-1, 1]); the
    model's weights are back in the plain layout afterwards."""
    from diffusion_course import checkpoints

    checkpoint = checkpoints.load_checkpoint("mnist")
    run = lambda: generate(checkpoint.model, checkpoint.schedule, num=8, shape=(1, 28, 28), cond=torch.arange(8),
                           guidance_scale=3.0, sampler="ddim", sampling_steps=10)
    fast = run()
    assert all(p.is_contiguous() for p in checkpoint.model.parameters())
    original = generate_module._fast_layout
    generate_module._fast_layout = lambda model, device: contextlib.nullcontext()
    try:
        plain = run()
    finally:
        generate_module._fast_layout = original
    torch.testing.assert_close(fast, plain, rtol=0, atol=0.02)
    assert fast.abs().max() > 0.5                                   # real digits, not a blank


@pytest.mark.parametrize("options, message", [
    ({"num": 0}, "num must be a whole number of at least 1"),
    ({"num": 2.5}, "num must be a whole number"),
    ({"batch_size": 0}, "batch_size must be a whole number of at least 1"),
    ({"seed": -1}, "seed must be a whole number of at least 0"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"shape": (8, 8)}, r"shape must be \(C, H, W\)"),
    ({"cond": torch.tensor([1, 2, 3])}, "cond must be a tensor with one condition per image"),
    ({"sampler": "warp"}, "Unknown sampler 'warp'"),
    ({"sampler": "euler"}, "'euler' integrates a flow-matching model's ODE; this model predicts noise"),
])
def test_bad_options_rejected(tiny_cond_unet, options, message):
    kwargs = {"num": 2, "shape": (1, 8, 8), "sampler": "ddim", "sampling_steps": 2, **options}
    with pytest.raises(ValueError, match=message):
        generate(tiny_cond_unet, cosine_schedule(30), **kwargs)


def test_non_finite_samples_raise_instead_of_becoming_black_images(tiny_unet):
    broken = lambda x, t, cond=None: torch.full_like(x, float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        generate(broken, cosine_schedule(30), num=2, shape=(1, 8, 8), sampler="ddim", sampling_steps=2)


def test_progress_bar_ticks_once_per_sampler_step_of_each_batch(tiny_unet, capsys):
    generate(tiny_unet, cosine_schedule(30), num=3, shape=(1, 8, 8), sampler="ddim", sampling_steps=4,
             batch_size=2, progress=True)
    assert "8/8" in capsys.readouterr().err                       # 2 batches x 4 steps


def test_a_model_without_a_schedule_is_sampled_as_a_flow_model_with_euler_or_heun_only(tiny_unet):
    """schedule None means a flow-matching model (lesson 10): only the ODE samplers apply."""
    with pytest.raises(ValueError, match=r"flow-matching model \(no noise schedule\) is sampled with \['euler', 'heun'\]"):
        generate(tiny_unet, None, num=2, shape=(1, 8, 8), sampler="ddim", sampling_steps=2)
    with pytest.raises(ValueError, match="noise schedule the model was trained with"):
        generate(tiny_unet, "cosine", num=2, shape=(1, 8, 8), sampler="ddim", sampling_steps=2)


@pytest.mark.parametrize("sampler, calls_per_step", [("euler", 1), ("heun", 2)])
def test_flow_models_run_the_ode_samplers_over_an_even_time_grid(sampler, calls_per_step, capsys):
    """generate with schedule None is flow.euler_sample / heun_sample over flow_time_grid(steps), with
    the same seeded noise; the progress bar counts sampler steps."""
    times = []

    def model(x, t, cond=None):
        times.append(float(t[0]) / flow.TIME_SCALE)
        return 0.5 * x

    images = generate(model, None, num=3, shape=(1, 4, 4), sampler=sampler, sampling_steps=4, progress=True,
                      clip_x0=None)
    expected_times = [1.0, 0.75, 0.5, 0.25] if sampler == "euler" else [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0]
    assert times == pytest.approx(expected_times) and len(times) == 4 * calls_per_step
    assert "4/4" in capsys.readouterr().err
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    reference = flow.SAMPLERS[sampler](model, noise, flow.flow_time_grid(4))
    torch.testing.assert_close(images, reference)


def test_a_flow_checkpoint_loads_as_a_pipeline_with_its_own_sampling(tmp_path, tiny_cond_unet):
    checkpoints.save_checkpoint(tmp_path / "plain", tiny_cond_unet, None)
    with pytest.raises(ValueError, match="not a diffusion model with its noise schedule"):
        generate_module.load_pipeline(tmp_path / "plain")
    checkpoints.save_checkpoint(tmp_path / "fast", tiny_cond_unet, None,
                                info={"objective": "flow", "sampling": {"sampler": "euler", "steps": 2, "guidance": 1.0}})
    pipeline = generate_module.load_pipeline(tmp_path / "fast")
    assert pipeline.schedule is None and pipeline.sampling == {"sampler": "euler", "steps": 2, "guidance": 1.0}
    checkpoints.save_checkpoint(tmp_path / "flow", tiny_cond_unet, None, info={"objective": "flow"})
    assert generate_module.load_pipeline(tmp_path / "flow").sampling == {"sampler": "euler", "steps": 20, "guidance": 3.0}
    assert generate_module.load_pipeline("mnist").sampling == generate_module.DEFAULT_SAMPLING


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_a_batch_cut_into_parts_gives_the_same_images(tiny_cond_unet, sampler, split_into):
    run = lambda **kw: generate(tiny_cond_unet, cosine_schedule(30), num=10, shape=(1, 8, 8), cond=torch.arange(10),
                                sampler=sampler, sampling_steps=5, **kw)
    whole = run(workers=1)
    torch.testing.assert_close(run(workers=2), whole)
    split_into(3)                                   # the default: what threads.use_best_threads chose
    assert threads.batch_parts(10) == [slice(0, 5), slice(5, 10)]
    torch.testing.assert_close(run(), whole)
    torch.testing.assert_close(run(workers=2, batch_size=4), whole)


def test_ddpm_in_parts_is_reproducible_and_each_part_has_noise_of_its_own(tiny_unet):
    run = lambda workers: generate(tiny_unet, cosine_schedule(20), num=8, shape=(1, 8, 8), sampler="ddpm",
                                   workers=workers)
    two = run(2)
    torch.testing.assert_close(run(2), two, rtol=0, atol=0)
    assert (two - run(1)).abs().max() > 1e-3                  # other noise than the single call's
    assert (two[:4] - two[4:]).abs().max() > 1e-3             # not the same noise in both parts


def test_parts_are_decoded_in_their_threads_and_the_progress_bar_counts_every_part(tiny_unet, capsys):
    decoded_in = []

    def decode(x):
        decoded_in.append((len(x), threading.current_thread() is threading.main_thread()))
        return x * 0.5
    images = generate(tiny_unet, cosine_schedule(30), num=8, shape=(1, 8, 8), sampler="ddim", sampling_steps=3,
                      workers=2, decode=decode, progress=True)
    assert images.shape == (8, 1, 8, 8) and sorted(decoded_in) == [(4, False), (4, False)]
    assert "6/6" in capsys.readouterr().err                   # 2 parts x 3 steps


def test_a_failing_part_stops_the_others_and_its_error_is_raised():
    healthy_calls = []

    def model(x, t, cond=None):
        if cond[0] == 4:                                      # the second part: fails at once
            raise ValueError("this part is broken")
        healthy_calls.append(len(x))
        time.sleep(0.02)
        return torch.zeros_like(x)
    with pytest.raises(ValueError, match="this part is broken"):
        generate(model, cosine_schedule(100), num=8, shape=(1, 8, 8), cond=torch.arange(8), sampler="ddim",
                 sampling_steps=50, workers=2)
    assert 0 < len(healthy_calls) < 10                        # the first part stopped early, not after 50 steps


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_workers_must_be_a_positive_whole_number(tiny_unet, workers):
    with pytest.raises(ValueError, match="workers must be a whole number of at least 1"):
        generate(tiny_unet, cosine_schedule(30), num=8, shape=(1, 8, 8), sampler="ddim", sampling_steps=2,
                 workers=workers)
