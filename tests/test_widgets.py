"""The lesson 05 and 06 explorers and lesson 09's studio, driven from code with tiny models (the
browser tests drive them in Chromium)."""

import base64

import pytest
import torch

from diffusion_course import checkpoints, editing, widgets
from diffusion_course.schedules import cosine_schedule


@pytest.fixture(autouse=True)
def _agg(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")


def test_guidance_explorer_redraws_for_each_setting_and_caches(tiny_cond_unet):
    explorer = widgets.guidance_explorer(tiny_cond_unet, cosine_schedule(40), digit=3, num_steps=4,
                                         num_images=4, fallback=False)
    assert "guidance" in explorer.slider.description and explorer.slider.readout
    shown = {}
    for value in (3.0, 8.0, 0.0, 1.5):
        explorer.slider.value = value
        shown[value] = (explorer.image.value, explorer.images.clone())
        assert explorer.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert len({png for png, _ in shown.values()}) == 4                   # every scale a new picture
    assert not torch.equal(shown[8.0][1], shown[0.0][1])
    explorer.digit.value = 5
    assert not torch.equal(explorer.images, shown[1.5][1])
    explorer.digit.value = 3
    assert explorer.image.value == shown[1.5][0]                          # back to a cached setting
    explorer.seed.value = 1
    assert not torch.equal(explorer.images, shown[1.5][1])
    assert explorer.images.shape == (4, 1, 8, 8)


def test_guidance_explorer_needs_a_conditional_model(tiny_unet, tiny_cond_unet):
    with pytest.raises(ValueError, match="class-conditional"):
        widgets.guidance_explorer(tiny_unet, cosine_schedule(40), fallback=False)
    with pytest.raises(ValueError, match=r"digit must lie in \[0, 10\)"):
        widgets.guidance_explorer(tiny_cond_unet, cosine_schedule(40), digit=10, fallback=False)


def test_guidance_explorer_names_the_classes_when_given(tiny_cond_unet):
    """Lesson 07 shows CIFAR-10's class names on the buttons, in the status line and the title."""
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    explorer = widgets.guidance_explorer(tiny_cond_unet, cosine_schedule(40), digit=7, num_steps=2, num_images=2,
                                         fallback=False, class_names=names)
    assert explorer.digit.description == "class" and explorer.digit.options[7] == ("horse", 7)
    assert "of class horse at w = 3.0" in explorer.status.value
    explorer.digit.value = 8
    assert "of class ship" in explorer.status.value
    with pytest.raises(ValueError, match="name the model's 10 classes, got 3"):
        widgets.guidance_explorer(tiny_cond_unet, cosine_schedule(40), class_names=names[:3], fallback=False)


def test_eta_explorer_adds_noise_only_above_zero_and_caches(tiny_cond_unet):
    """Lesson 10's eta slider: eta = 0 is plain DDIM (the ODE: the seed of the added noise does not matter),
    eta > 0 adds noise (a different picture from the same start); settings seen before are cached."""
    from diffusion_course import guidance, sampling
    explorer = widgets.eta_explorer(tiny_cond_unet, cosine_schedule(40), labels=[1, 2, 3], num_steps=4, fallback=False)
    assert explorer.slider.description == "eta" and explorer.images.shape == (3, 1, 8, 8)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ddim = sampling.sample(guidance.guided(tiny_cond_unet, 2.0), x_T, cosine_schedule(40), sampler="ddim",
                           sampling_steps=4, cond=torch.tensor([1, 2, 3]), clip_x0=1.0).clamp(-1, 1)
    assert torch.allclose(explorer.images, ddim, atol=1e-6)
    first = explorer.image.value
    explorer.slider.value = 1.0
    assert "eta = 1.0" in explorer.status.value and not torch.allclose(explorer.images, ddim, atol=1e-3)
    explorer.slider.value = 0.0
    assert explorer.image.value == first


def test_strength_explorer(tiny_cond_unet):
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    explorer = widgets.strength_explorer(tiny_cond_unet, cosine_schedule(40), images, strength=0.5, num_steps=4,
                                         fallback=False)
    explorer.slider.value = 0.0
    assert torch.equal(explorer.edits, images)
    before = explorer.image.value
    explorer.slider.value = 1.0
    assert explorer.image.value != before and not torch.equal(explorer.edits, images)
    plain = explorer.edits.clone()
    explorer.target.value = 7
    assert not torch.equal(explorer.edits, plain) and "towards a 7" in explorer.status.value
    with pytest.raises(ValueError, match="target must be -1"):
        widgets.strength_explorer(tiny_cond_unet, cosine_schedule(40), images, target=10, fallback=False)


def test_reverse_process_frames_pair_each_x_t_with_its_own_t_and_guess(tiny_cond_unet):
    """Each frame is what the model saw (x_t at t) and its guess of x0 from it; the last is the sample."""
    from diffusion_course import sampling

    schedule = cosine_schedule(40)
    explorer = widgets.reverse_process_explorer(tiny_cond_unet, schedule, labels=[1, 2], shape=(1, 8, 8),
                                                sampler="ddim", num_steps=4, seed=0, fallback=False)
    timesteps = sampling.timestep_grid("ddim", schedule, 4)
    assert [f.t for f in explorer.frames] == timesteps + [-1]
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(explorer.frames[0].x_t, x_T)                    # the first frame is the starting noise
    guided = widgets.guided(tiny_cond_unet, 3.0)
    eps = guided(x_T, torch.full((2,), timesteps[0]), torch.tensor([1, 2])).detach()
    _, x0 = sampling.denoise(lambda *a: eps, x_T, torch.full((2,), timesteps[0]), schedule)
    torch.testing.assert_close(explorer.frames[0].x0_pred, x0)
    assert torch.equal(explorer.frames[-1].x_t, explorer.frames[-1].x0_pred)


def test_static_copy_travels_with_the_widget_only_when_asked(tiny_cond_unet):
    make = lambda fallback: widgets.guidance_explorer(tiny_cond_unet, cosine_schedule(40), digit=3, num_steps=2,
                                                      num_images=2, fallback=fallback)
    with_copy, without = make(True)._repr_mimebundle_(), make(False)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in with_copy and "image/png" in with_copy
    assert base64.b64decode(with_copy["image/png"]).startswith(b"\x89PNG")
    assert "image/png" not in without


def test_timestep_explorer_shows_alpha_bar_and_snr():
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    explorer = widgets.timestep_explorer(images, t=500, fallback=False)
    titles = [text.get_text() for text in explorer._artists["titles"].values()]
    assert all("SNR =" in title for title in titles)
    cosine = cosine_schedule()
    expected = float(cosine.alpha_bar[500] / (1 - cosine.alpha_bar[500]))
    assert f"SNR = {expected:.3g}" in explorer._artists["titles"]["cosine"].get_text()


# --- Lesson 09's studio, with a tiny random text-to-image latent pipeline -----------------------

@pytest.fixture(scope="module")
def tiny_text_pipeline(tmp_path_factory):
    """A tiny random pipeline like "prompted-digits", saved and loaded like the real one."""
    from browser_helpers import make_tiny_text_pipeline
    from diffusion_course import generate

    return generate.load_pipeline(make_tiny_text_pipeline(tmp_path_factory.mktemp("tiny-prompted-digits")))


@pytest.fixture(scope="module")
def canvases():
    return torch.rand(3, 3, 32, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def make_studio(pipeline, canvases=None, **options):
    options = {"num_steps": 3, "num_images": 2, "progress": False, "fallback": False, **options}
    return widgets.studio(pipeline, canvases, **options)


def test_studio_generates_what_generate_makes(tiny_text_pipeline):
    """Text to image: the panel's images are generate.generate's for the same setting."""
    from diffusion_course import generate

    pipe = tiny_text_pipeline
    studio = make_studio(pipe, prompt="a red 3 on the left", negative_prompt="blue", guidance_scale=2.0, seed=5)
    assert studio.images.shape == (2, 3, 32, 64) and studio.prompts == ["a red 3 on the left"] * 2
    assert studio.image.value[:8] == b"\x89PNG\r\n\x1a\n" and studio.message.value == ""
    assert studio.status.value.startswith('2 images for "a red 3 on the left" made in')
    ids = generate.prompt_ids(pipe.model, ["a red 3 on the left"], 2)
    expected = generate.generate(pipe.model, pipe.schedule, num=2, shape=pipe.shape, cond=ids, guidance_scale=2.0,
                                 negative=pipe.model.tokenizer.encode(["blue"]), sampler="dpm", sampling_steps=3,
                                 seed=5, decode=pipe.decode, clip_x0=None)
    torch.testing.assert_close(studio.images, expected)
    assert studio.images.abs().max() <= 1


def test_studio_generate_button_follows_each_control(tiny_text_pipeline):
    studio = make_studio(tiny_text_pipeline, prompt="a red 3")
    first, png = studio.images.clone(), studio.image.value
    studio.button.click()                                    # the same setting: the same images
    assert torch.equal(studio.images, first)
    changes = [("prompt", "a green 7 on the right"), ("negative_prompt", "green"), ("guidance", 6.0),
               ("seed", 3), ("steps", 5), ("sampler", "ddim")]
    for name, value in changes:
        before = studio.images.clone()
        getattr(studio, name).value = value
        assert torch.equal(studio.images, before), f"changing {name} alone must not generate"
        studio.button.click()
        assert not torch.equal(studio.images, before), f"{name} = {value!r} changed nothing"
    assert studio.image.value != png and studio.prompts[0] == "a green 7 on the right"
    studio.num_images.value = 3
    studio.button.click()
    assert studio.images.shape == (3, 3, 32, 64) and len(studio.prompts) == 3
    assert studio.shown.sampler == "ddim" and studio.button.description == "Generate" and not studio.button.disabled


def test_studio_shows_a_bad_prompt_as_a_message(tiny_text_pipeline):
    studio = make_studio(tiny_text_pipeline, prompt="a red 3")
    before, png = studio.images.clone(), studio.image.value
    studio.prompt.value = "a purple 3"
    studio.generate()
    assert "Unknown word &#x27;purple&#x27;" in studio.message.value and "Nothing generated" in studio.message.value
    assert torch.equal(studio.images, before) and studio.image.value == png     # the last images stay
    studio.prompt.value, studio.negative_prompt.value = "a red 3", "ugly"
    studio.generate()
    assert "ugly" in studio.message.value
    studio.negative_prompt.value = ""
    studio.generate()
    assert studio.message.value == "" and torch.equal(studio.images, before)
    bad = make_studio(tiny_text_pipeline, prompt="a purple cat")                  # even the first press
    assert bad.images is None and "purple" in bad.message.value and "image/png" not in bad._repr_mimebundle_()


def test_studio_edits_start_images_in_the_latent_space(tiny_text_pipeline, canvases):
    """Image to image and inpainting: editing.img2img / editing.inpaint on the autoencoder's latents."""
    from diffusion_course import guidance

    pipe = tiny_text_pipeline
    studio = make_studio(pipe, canvases, prompt="a red 3", guidance_scale=2.0, seed=1)
    assert studio.mask.disabled and studio.strength.disabled                   # text to image: no edit controls
    studio.start.value = 2
    assert not studio.mask.disabled and not studio.strength.disabled
    studio.strength.value = 0.5
    studio.button.click()
    assert studio.images.shape == (2, 3, 32, 64) and "strength 0.5" in studio.figure.get_suptitle()
    ae = checkpoints.load_checkpoint(pipe.info["autoencoder"]).model
    latents = ae.encode_latents(canvases[2:3]).expand(2, -1, -1, -1).contiguous()
    model = guidance.guided(pipe.model, 2.0)
    options = dict(sampler="dpm", sampling_steps=3, cond=widgets.prompt_ids(pipe.model, ["a red 3"], 2), clip_x0=None)
    with torch.no_grad():
        expected = editing.img2img(model, latents, pipe.schedule, strength=0.5,
                                   generator=torch.Generator().manual_seed(1), **options)
        torch.testing.assert_close(studio.images, pipe.decode(expected))
        studio.mask.value = "right"
        assert studio.strength.disabled                                        # inpainting has no strength
        studio.button.click()
        expected = editing.inpaint(model, latents, widgets.mask_of("right", (8, 16)), pipe.schedule,
                                   generator=torch.Generator().manual_seed(1), **options)
        torch.testing.assert_close(studio.images, pipe.decode(expected))
    assert "inpainting the right of test canvas 2" in studio.figure.get_suptitle().replace("\n", " ")
    studio.start.value, studio.mask.value = "previous", "none"
    previous = studio.images[:1].clone()
    studio.button.click()
    assert "image to image from the previous result" in studio.figure.get_suptitle().replace("\n", " ")
    assert not torch.equal(previous, studio.images[:1])


def test_studio_checks_its_inputs(tiny_text_pipeline, tiny_unet):
    from diffusion_course import generate

    plain = generate.Pipeline(tiny_unet, cosine_schedule(40), (1, 8, 8), None, (1, 8, 8), {}, None)
    with pytest.raises(ValueError, match="text-to-image pipeline"):
        widgets.studio(plain, fallback=False)
    with pytest.raises(ValueError, match=r"start images must have shape \(N, 3, 32, 64\)"):
        make_studio(tiny_text_pipeline, torch.zeros(2, 1, 28, 28))
    studio = make_studio(tiny_text_pipeline, fallback=True)
    bundle = studio._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "image/png" in bundle
    assert studio.start.options[1][1] == "previous" and len(studio.start.options) == 2     # no canvases given


def test_mask_of_fits_any_latent_shape():
    left = widgets.mask_of("left", (8, 16))
    assert left.shape == (1, 1, 8, 16) and left[..., :8].eq(1).all() and left[..., 8:].eq(0).all()
    centre = widgets.mask_of("center", (8, 16))
    assert centre[0, 0, 2:6, 4:12].eq(1).all() and centre.sum() == 4 * 8
    assert torch.equal(widgets.mask_of("top", (8, 8)), editing.make_mask("top", 8))
