"""Classifier-free guidance, checked against separate calls of the conditional and null-class model."""

import pytest
import torch

from diffusion_course.guidance import ClassifierFreeGuidance, drop_cond, guided, guided_eps
from diffusion_course.sampling import ddim_sample
from diffusion_course.schedules import linear_schedule


def inputs(batch=3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 8, 8, generator=generator)
    t = torch.tensor([5, 400, 999, 50, 700][:batch])
    cond = torch.tensor([1, 7, 3, 0, 9][:batch])
    return x, t, cond


def branches(model, x, t, cond, uncond_label=None):
    """The two predictions, each from its own model call."""
    label = model.null_class if uncond_label is None else uncond_label
    with torch.no_grad():
        eps_cond = model(x, t, cond)
        eps_uncond = model(x, t, torch.full_like(t, label))
    assert (eps_cond - eps_uncond).abs().max() > 1e-3, "the test needs a model whose condition matters"
    return eps_cond, eps_uncond


def test_guided_eps_formula():
    eps_cond, eps_uncond = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(guided_eps(eps_cond, eps_uncond, 3.0), torch.tensor([2.0, -8.0]))
    assert torch.equal(guided_eps(eps_cond, eps_uncond, 1.0), eps_cond)
    assert torch.equal(guided_eps(eps_cond, eps_uncond, 0.0), eps_uncond)


def test_scale_one_is_the_conditional_model(tiny_cond_unet):
    x, t, cond = inputs()
    eps_cond, _ = branches(tiny_cond_unet, x, t, cond)
    with torch.no_grad():
        assert torch.equal(ClassifierFreeGuidance(tiny_cond_unet, 1.0)(x, t, cond), eps_cond)


def test_scale_zero_is_the_null_class_model(tiny_cond_unet):
    x, t, cond = inputs()
    _, eps_uncond = branches(tiny_cond_unet, x, t, cond)
    with torch.no_grad():
        assert torch.equal(ClassifierFreeGuidance(tiny_cond_unet, 0.0)(x, t, cond), eps_uncond)
        # no condition at all: the null class in both branches
        torch.testing.assert_close(ClassifierFreeGuidance(tiny_cond_unet, 3.0)(x, t), eps_uncond,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [3.0, 0.5, 7.5, -1.0])
def test_scale_w_extrapolates_from_the_unconditional_prediction(tiny_cond_unet, scale):
    x, t, cond = inputs()
    eps_cond, eps_uncond = branches(tiny_cond_unet, x, t, cond)
    with torch.no_grad():
        guided = ClassifierFreeGuidance(tiny_cond_unet, scale)(x, t, cond)
    torch.testing.assert_close(guided, eps_uncond + scale * (eps_cond - eps_uncond), rtol=1e-5, atol=1e-5)


def test_negative_condition_replaces_only_the_unconditional_branch(tiny_cond_unet):
    x, t, cond = inputs()
    negative = 4
    eps_cond, eps_negative = branches(tiny_cond_unet, x, t, cond, uncond_label=negative)
    with torch.no_grad():
        at_zero = ClassifierFreeGuidance(tiny_cond_unet, 0.0, negative=negative)(x, t, cond)
        at_one = ClassifierFreeGuidance(tiny_cond_unet, 1.0, negative=negative)(x, t, cond)
        at_three = ClassifierFreeGuidance(tiny_cond_unet, 3.0, negative=negative)(x, t, cond)
        per_image = ClassifierFreeGuidance(tiny_cond_unet, 0.0, negative=torch.tensor([4, 4, 4]))(x, t, cond)
        one_row = ClassifierFreeGuidance(tiny_cond_unet, 0.0, negative=torch.tensor([4]))(x, t, cond)
    assert torch.equal(one_row, eps_negative)   # one row stands for the whole batch
    assert torch.equal(at_zero, eps_negative)
    assert torch.equal(per_image, eps_negative)
    assert torch.equal(at_one, eps_cond)
    torch.testing.assert_close(at_three, eps_negative + 3 * (eps_cond - eps_negative), rtol=1e-5, atol=1e-5)


def test_negative_labels_per_image(tiny_cond_unet):
    x, t, cond = inputs()
    negative = torch.tensor([2, 8, 5])
    with torch.no_grad():
        expected = tiny_cond_unet(x, t, negative)
        assert torch.equal(ClassifierFreeGuidance(tiny_cond_unet, 0.0, negative=negative)(x, t, cond), expected)
    with pytest.raises(ValueError, match=r"negative labels must have shape \(3,\)"):
        ClassifierFreeGuidance(tiny_cond_unet, 2.0, negative=torch.tensor([1, 2]))(x, t, cond)


def test_guided_model_keeps_the_contract_and_samples(tiny_cond_unet):
    guided = ClassifierFreeGuidance(tiny_cond_unet, 3.0)
    assert guided.null_class == tiny_cond_unet.null_class == 10
    x_T, _, _ = inputs(2)
    cond = torch.tensor([2, 6])
    out = ddim_sample(guided, x_T, linear_schedule(), [999, 500, 0], cond=cond)
    plain = ddim_sample(tiny_cond_unet, x_T, linear_schedule(), [999, 500, 0], cond=cond)
    assert out.shape == x_T.shape and bool(torch.isfinite(out).all())
    assert (out - plain).abs().max() > 1e-4


def test_unconditional_model_rejected(tiny_unet):
    with pytest.raises(ValueError, match="needs a conditional model with a null condition"):
        ClassifierFreeGuidance(tiny_unet, 3.0)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "3", True])
def test_non_finite_guidance_scale_rejected(tiny_cond_unet, scale):
    """`sample --guidance nan` used to write all-black images and exit 0."""
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        ClassifierFreeGuidance(tiny_cond_unet, scale)


def test_guided_wraps_only_when_there_is_something_to_do(tiny_unet, tiny_cond_unet):
    assert guided(tiny_unet, 3.0) is tiny_unet                       # unconditional: nothing to guide
    assert guided(tiny_cond_unet, 1.0) is tiny_cond_unet             # w = 1: the conditional model itself
    assert isinstance(guided(tiny_cond_unet, 3.0), ClassifierFreeGuidance)
    assert isinstance(guided(tiny_cond_unet, 1.0, negative=2), ClassifierFreeGuidance)
    with pytest.raises(ValueError, match="negative condition needs a conditional model"):
        guided(tiny_unet, 3.0, negative=2)


def test_drop_cond_replaces_whole_rows_of_any_condition():
    """Labels (B,) or embeddings (B, L, D): a dropped row is the null row, entirely."""
    generator = torch.Generator().manual_seed(0)
    cond, null = torch.randn(4000, 3, 2), torch.zeros(4000, 3, 2)
    out = drop_cond(cond, null, 0.25, generator)
    dropped = (out == 0).flatten(1).all(1)
    kept = (out == cond).flatten(1).all(1)
    assert bool((dropped ^ kept).all())                               # each row all dropped or all kept
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\]"):
        drop_cond(cond, null, 1.5)
    with pytest.raises(ValueError, match="null_cond must have the shape of cond"):
        drop_cond(cond, null[:2], 0.5)


@pytest.mark.parametrize("negative", [10, -1, 11])
def test_negative_out_of_range_rejected(tiny_cond_unet, negative):
    with pytest.raises(ValueError, match=r"negative must be a class label in \[0, 10\)"):
        ClassifierFreeGuidance(tiny_cond_unet, 3.0, negative=negative)


class LabelRecorder(torch.nn.Module):
    """Wraps a model and records the labels of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.null_class, self.labels = model, model.null_class, []

    def null_cond(self, batch_size, device=None):
        return self.model.null_cond(batch_size, device)

    def forward(self, x_t, t, cond=None):
        self.labels.append(None if cond is None else cond.tolist())
        return self.model(x_t, t, cond)


def test_negative_condition_changes_only_the_labels_of_the_unconditional_branch(tiny_cond_unet):
    x, t, cond = inputs()
    plain, steered = LabelRecorder(tiny_cond_unet), LabelRecorder(tiny_cond_unet)
    with torch.no_grad():
        ClassifierFreeGuidance(plain, 3.0)(x, t, cond)
        ClassifierFreeGuidance(steered, 3.0, negative=4)(x, t, cond)
    assert plain.labels == [[1, 7, 3, 10, 10, 10]]        # one batched call: conditional, then null
    assert steered.labels == [[1, 7, 3, 4, 4, 4]]         # the negative label replaces only the null


def test_no_label_and_no_negative_takes_one_call(tiny_cond_unet):
    """Unconditional sampling through the wrapper: both branches would be the null class, so the
    wrapper calls the model once, and the result is exactly the null-class prediction."""
    x, t, _ = inputs()
    recorder = LabelRecorder(tiny_cond_unet)
    with torch.no_grad():
        out = ClassifierFreeGuidance(recorder, 5.0)(x, t)
        expected = tiny_cond_unet(x, t, torch.full_like(t, 10))
    assert recorder.labels == [[10, 10, 10]]
    assert torch.equal(out, expected)
