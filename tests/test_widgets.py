"""The lesson 05 and 06 explorers, driven from code with tiny models (the browser tests drive
the lesson 05 one in Chromium)."""

import base64

import pytest
import torch

from diffusion_course import widgets
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
