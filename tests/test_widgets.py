"""The lesson 05 and 06 explorers, driven from code with tiny models (the browser tests drive
the lesson 05 one in Chromium)."""

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
