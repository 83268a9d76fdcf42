"""Editing (img2img, inpainting, outpainting, slerp), checked with small oracles and tiny U-Nets."""

import math

import pytest
import torch

from diffusion_course import editing
from diffusion_course.guidance import ClassifierFreeGuidance
from diffusion_course.schedules import cosine_schedule, linear_schedule, q_sample
from test_sampling import KnownX0Oracle   # the perfect denoiser: every sampler returns its x0

SAMPLERS = [("ddpm", None), ("ddim", 8), ("dpm", 8)]


def images(batch=2, size=8, seed=1):
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def half_mask(size=8):
    mask = torch.zeros(1, 1, size, size)
    mask[..., :, size // 2:] = 1
    return mask


# --- img2img ---------------------------------------------------------------------------------

def test_img2img_start_noises_to_the_step_set_by_strength():
    schedule = linear_schedule(50)
    x0, noise = images(), torch.randn(2, 1, 8, 8)
    for strength, t_start in [(0.5, 24), (0.13, 6), (0.02, 0), (1e-6, 0), (0.9, 44), (1.0, 49)]:
        start = editing.img2img_start(x0, strength, schedule, noise)
        assert start.t_start == t_start
        expected = noise if strength == 1 else q_sample(x0, torch.full((2,), t_start), schedule, noise)
        torch.testing.assert_close(start.x_t, expected)


@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_img2img_strength_zero_returns_the_input(tiny_unet, sampler, steps):
    x0 = images()
    out = editing.img2img(tiny_unet, x0, cosine_schedule(40), strength=0.0, sampler=sampler, sampling_steps=steps)
    assert torch.equal(out, x0) and out is not x0


@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_img2img_strength_one_ignores_the_input(tiny_unet, sampler, steps):
    schedule = cosine_schedule(40)
    run = lambda x0: editing.img2img(tiny_unet, x0, schedule, strength=1.0, sampler=sampler, sampling_steps=steps,
                                     generator=torch.Generator().manual_seed(3))
    first, second = run(images(seed=1)), run(images(seed=2))
    torch.testing.assert_close(first, second)
    assert (first - images(seed=1)).abs().max() > 0.1       # it did generate something new


@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_img2img_with_the_oracle_returns_the_image_and_starts_at_t_start(sampler, steps):
    """The oracle knows x0, so any strength must give x0 back; and the first call is at t_start."""
    schedule = linear_schedule(50)
    x0 = images()
    oracle = KnownX0Oracle(x0, schedule)
    out = editing.img2img(oracle, x0, schedule, strength=0.5, sampler=sampler, sampling_steps=steps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert oracle.calls[0][1].tolist() == [24, 24]
    expected_calls = 25 if sampler == "ddpm" else round(steps * 0.5)
    assert len(oracle.calls) == expected_calls


def test_img2img_small_strength_stays_close_and_large_strength_moves_away(tiny_unet):
    schedule = cosine_schedule(40)
    x0 = images()
    change = {s: (editing.img2img(tiny_unet, x0, schedule, strength=s, sampler="ddim", sampling_steps=10,
                                  generator=torch.Generator().manual_seed(0)) - x0).abs().mean().item()
              for s in (0.05, 0.9)}
    assert change[0.05] < change[0.9] / 3


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5", None])
def test_img2img_rejects_bad_strengths(tiny_unet, strength):
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        editing.img2img(tiny_unet, images(), cosine_schedule(40), strength=strength, sampler="ddim", sampling_steps=4)


def test_img2img_start_rejects_zero_strength():
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
        editing.img2img_start(images(), 0.0, linear_schedule(50))


def test_img2img_rejects_images_that_are_not_a_float_batch(tiny_unet):
    with pytest.raises(ValueError, match=r"float \(B, C, H, W\)"):
        editing.img2img(tiny_unet, images()[0], cosine_schedule(40), strength=0.5)
    with pytest.raises(ValueError, match=r"float \(B, C, H, W\)"):
        editing.img2img(tiny_unet, (images() * 127).to(torch.uint8), cosine_schedule(40), strength=0.5)


# --- inpainting ------------------------------------------------------------------------------

def test_inpaint_step_keeps_generated_pixels_and_noises_the_known_ones():
    schedule = linear_schedule(50)
    x_t, known, noise = torch.randn(3, 2, 1, 8, 8)
    mask = half_mask()
    out = editing.inpaint_step(x_t, torch.full((2,), 20), known, mask, schedule, noise)
    noised = q_sample(known, torch.full((2,), 20), schedule, noise)
    assert torch.equal(out[..., 4:], x_t[..., 4:])
    torch.testing.assert_close(out[..., :4], noised[..., :4])
    final = editing.inpaint_step(x_t, torch.full((2,), -1), known, mask, schedule, noise)
    assert torch.equal(final[..., :4], known[..., :4])
    mixed = editing.inpaint_step(x_t, torch.tensor([-1, 20]), known, mask, schedule, noise)   # image by image
    assert torch.equal(mixed[0], final[0]) and torch.equal(mixed[1], out[1])
    with pytest.raises(ValueError, match=r"t must be a \(B,\) int64 tensor"):
        editing.inpaint_step(x_t, 20, known, mask, schedule, noise)


@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_inpaint_leaves_the_known_pixels_exactly_unchanged(tiny_unet, sampler, steps):
    schedule = cosine_schedule(40)
    image, mask = images(), half_mask()
    seen = []
    model = lambda x_t, t, cond=None: (seen.append(x_t.clone()), tiny_unet(x_t, t, cond))[1]
    out = editing.inpaint(model, image, mask, schedule, sampler=sampler, sampling_steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == image.shape
    assert torch.equal(out[..., :4], image[..., :4])          # exactly, after the final replacement
    assert (out[..., 4:] - image[..., 4:]).abs().max() > 0.1   # the masked half was regenerated
    # Before the end, the model saw the known pixels noised, not clean (to within the noise level).
    assert (seen[len(seen) // 2][..., :4] - image[..., :4]).abs().max() > 0.05


@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_inpaint_with_the_oracle_fills_in_the_hidden_region(sampler, steps):
    """An oracle that knows the whole image must reconstruct the masked half too."""
    schedule = linear_schedule(50)
    image, mask = images(), half_mask()
    oracle = KnownX0Oracle(image, schedule)
    damaged = image.clone()
    damaged[..., 4:] = 0.0                                     # what is under the mask is ignored
    out = editing.inpaint(oracle, damaged, mask, schedule, sampler=sampler, sampling_steps=steps,
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[..., 4:], image[..., 4:], atol=1e-4, rtol=0)
    assert torch.equal(out[..., :4], image[..., :4])


def test_inpaint_with_a_full_or_empty_mask(tiny_unet):
    schedule = cosine_schedule(40)
    image = images()
    kept = editing.inpaint(tiny_unet, image, torch.zeros(1, 1, 8, 8), schedule, sampler="ddim", sampling_steps=4)
    assert torch.equal(kept, image)
    generator = lambda: torch.Generator().manual_seed(5)
    everything = editing.inpaint(tiny_unet, image, torch.ones(1, 1, 8, 8), schedule, sampler="ddim", sampling_steps=4, generator=generator())
    other_image = editing.inpaint(tiny_unet, images(seed=9), torch.ones(1, 1, 8, 8), schedule, sampler="ddim", sampling_steps=4,
                                  generator=generator())
    torch.testing.assert_close(everything, other_image)        # nothing known: the image does not matter


def test_inpaint_per_image_masks_and_bool_masks(tiny_unet):
    schedule = cosine_schedule(40)
    image = images()
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, :4] = True
    mask[1, :, :, :4] = True
    out = editing.inpaint(tiny_unet, image, mask, schedule, sampler="ddim", sampling_steps=4)
    assert torch.equal(out[0, :, 4:], image[0, :, 4:]) and torch.equal(out[1, :, :, 4:], image[1, :, :, 4:])


def test_inpaint_with_guidance(tiny_cond_unet):
    schedule = cosine_schedule(40)
    image, mask = images(), half_mask()
    cond = torch.tensor([3, 7])
    run = lambda model: editing.inpaint(model, image, mask, schedule, sampler="dpm", sampling_steps=5, cond=cond,
                                        generator=torch.Generator().manual_seed(0))
    plain, guided = run(tiny_cond_unet), run(ClassifierFreeGuidance(tiny_cond_unet, 4.0))
    assert torch.equal(guided[..., :4], image[..., :4])
    assert (guided - plain).abs().max() > 1e-3


def test_img2img_with_guidance_towards_a_class(tiny_cond_unet):
    schedule = cosine_schedule(40)
    x0 = images()
    run = lambda model, cond: editing.img2img(model, x0, schedule, strength=0.7, sampler="ddim", sampling_steps=6, cond=cond,
                                              generator=torch.Generator().manual_seed(0))
    guided = run(ClassifierFreeGuidance(tiny_cond_unet, 3.0), torch.tensor([1, 1]))
    other = run(ClassifierFreeGuidance(tiny_cond_unet, 3.0), torch.tensor([8, 8]))
    assert guided.shape == x0.shape and bool(torch.isfinite(guided).all())
    assert (guided - other).abs().max() > 1e-3


@pytest.mark.parametrize("mask, message", [
    (torch.zeros(1, 1, 4, 4), r"mask must have shape \(1 or 2, 1 or 1, 8, 8\)"),
    (torch.zeros(3, 1, 8, 8), r"mask must have shape"),
    (torch.zeros(8, 8), r"mask must have shape"),
    (torch.full((1, 1, 8, 8), 0.5), r"mask must hold only 0 \(keep\) and 1 \(generate\)"),
    ([[0, 1]], r"mask must be a tensor"),
])
def test_inpaint_rejects_bad_masks(tiny_unet, mask, message):
    with pytest.raises(ValueError, match=message):
        editing.inpaint(tiny_unet, images(), mask, cosine_schedule(40), sampler="ddim", sampling_steps=4)


# --- outpainting -----------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_outpaint_grows_the_canvas_and_keeps_the_original(tiny_unet, sampler, steps):
    image = images()
    out = editing.outpaint(tiny_unet, image, cosine_schedule(40), left=4, right=4, top=0, bottom=8,
                           sampler=sampler, sampling_steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 16, 16)
    assert torch.equal(out[..., :8, 4:12], image)
    assert (out[..., 8:, :] + 1).abs().max() > 0.1          # the new border is filled, not left black


def test_outpaint_rejects_bad_padding_and_sizes_the_unet_cannot_take(tiny_unet):
    with pytest.raises(ValueError, match="non-negative numbers of pixels"):
        editing.outpaint(tiny_unet, images(), cosine_schedule(40), left=-4)
    with pytest.raises(ValueError, match="non-negative numbers of pixels"):
        editing.outpaint(tiny_unet, images(), cosine_schedule(40), left=2.5)
    with pytest.raises(ValueError, match="divisible by 2"):       # the tiny U-Net halves the size once
        editing.outpaint(tiny_unet, images(), cosine_schedule(40), right=3, sampling_steps=2)


def test_outpaint_fill_never_reaches_the_output(tiny_unet):
    """Inpainting ignores the pixels under the mask, so the border's starting value (fill: -1 is
    black for [-1, 1] images, 0 for latents) changes nothing; a non-finite fill is refused."""
    image = images()
    run = lambda fill: editing.outpaint(tiny_unet, image, cosine_schedule(40), right=8, fill=fill, sampler="ddim",
                                        sampling_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(-1.0), run(0.5))
    with pytest.raises(ValueError, match="fill must be a finite number"):
        run(float("nan"))


@pytest.mark.parametrize("steps", [0, -5, 2.5])
def test_img2img_rejects_bad_step_counts_and_takes_none(tiny_unet, steps):
    with pytest.raises(ValueError, match="sampling_steps must be a whole number of at least 1"):
        editing.img2img(tiny_unet, images(), cosine_schedule(40), strength=0.5, sampling_steps=steps)


def test_img2img_with_the_sampler_default_steps(tiny_unet):
    out = editing.img2img(tiny_unet, images(), cosine_schedule(40), strength=0.5, sampler="dpm", sampling_steps=None)
    assert out.shape == images().shape and bool(torch.isfinite(out).all())


def test_make_mask_regions_and_unknown_names():
    assert editing.make_mask("left", 8)[0, 0, :, :4].eq(1).all() and editing.make_mask("left", 8)[0, 0, :, 4:].eq(0).all()
    assert int(editing.make_mask("center", 8).sum()) == 16
    with pytest.raises(ValueError, match="Unknown mask 'middle'"):
        editing.make_mask("middle", 8)


# --- slerp -----------------------------------------------------------------------------------

def test_slerp_ends_and_norm():
    a, b = torch.randn(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(editing.slerp(a, b, 0.0), a)
    torch.testing.assert_close(editing.slerp(a, b, 1.0), b)
    middle = editing.slerp(a, b, 0.5)
    # Two independent draws are nearly orthogonal: slerp keeps the norm, a straight line loses ~1/sqrt(2).
    norms = middle.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    assert ((norms - 1).abs() < 0.1).all()
    assert (((0.5 * a + 0.5 * b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)) < 0.8).all()
    with pytest.raises(ValueError, match="same shape"):
        editing.slerp(a, b[:, :, :8], 0.5)


def test_slerp_of_a_noise_with_itself_is_that_noise():
    a = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(editing.slerp(a, a, 0.3), a)


def test_slerp_mixes_parallel_and_independent_rows_in_one_batch():
    """Each image chooses on its own: a row whose two noises are the same stays that noise (no
    division by sin 0), while the other rows still follow the sphere."""
    a, b = torch.randn(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    b[0] = a[0]
    mixed = editing.slerp(a, b, 0.4)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[0], a[0])
    torch.testing.assert_close(mixed[1:], editing.slerp(a[1:], b[1:], 0.4))
    assert not torch.allclose(mixed[1:], 0.6 * a[1:] + 0.4 * b[1:])     # an arc, not a straight line


def test_img2img_start_t_start_formula():
    schedule = cosine_schedule(1000)
    for strength in (0.001, 0.25, 0.6, 0.999, 1.0):
        assert editing.img2img_start(images(), strength, schedule).t_start == math.ceil(strength * 1000) - 1


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "0.5"])
def test_slerp_rejects_a_weight_that_is_not_a_finite_number(weight):
    a, b = torch.randn(2, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        editing.slerp(a, b, weight)
