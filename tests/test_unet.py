"""The U-Net: shapes, gradients, the null class, input checks, the time embedding, the config."""

import math

import pytest
import torch

from diffusion_course.unet import UNet, UNetConfig, count_parameters, timestep_embedding


def small_config(**overrides) -> UNetConfig:
    settings = dict(base_channels=8, channel_mults=(1, 2))
    settings.update(overrides)
    return UNetConfig(**settings)


def perturb_conv_out(model: UNet, seed: int = 1) -> UNet:
    """conv_out starts at zero; give it random weights so the output depends on every layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.conv_out.weight.copy_(0.1 * torch.randn(model.conv_out.weight.shape, generator=generator))
        model.conv_out.bias.copy_(0.1 * torch.randn(model.conv_out.bias.shape, generator=generator))
    return model


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_output_shape_equals_input_shape(channels, size, num_classes):
    torch.manual_seed(0)
    model = perturb_conv_out(UNet(small_config(in_channels=channels, image_size=size, num_classes=num_classes)))
    x = torch.randn(2, channels, size, size)
    t = torch.tensor([0, 999])
    cond = None if num_classes is None else torch.tensor([3, 10])
    out = model(x, t, cond)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    assert out.abs().sum() > 0


def test_default_config_shapes():
    torch.manual_seed(0)
    model = UNet()          # the course's default: 1 x 28 x 28, three levels
    x = torch.randn(2, 1, 28, 28)
    assert model(x, torch.tensor([5, 6])).shape == x.shape
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0


def test_zero_initialised_output_layer_predicts_zero():
    torch.manual_seed(0)
    model = UNet(small_config(image_size=8))
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = perturb_conv_out(UNet(small_config(image_size=8, num_classes=10)))
    model.train()
    x = torch.randn(4, 1, 8, 8)
    loss = model(x, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])).square().mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} got a zero gradient"
        assert bool(torch.isfinite(parameter.grad).all()), f"{name} has a non-finite gradient"


def test_time_and_class_change_the_output(tiny_cond_unet):
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([100, 100])
    base = tiny_cond_unet(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(base, tiny_cond_unet(x, torch.tensor([700, 700]), torch.tensor([1, 1])))
    assert not torch.allclose(base, tiny_cond_unet(x, t, torch.tensor([2, 2])))


def test_no_condition_equals_the_null_class(tiny_cond_unet):
    assert tiny_cond_unet.null_class == 10
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([1, 400, 999])
    null = torch.full((3,), tiny_cond_unet.null_class, dtype=torch.long)
    assert torch.equal(tiny_cond_unet(x, t), tiny_cond_unet(x, t, null))


def test_unconditional_model_has_no_null_class(tiny_unet):
    assert tiny_unet.null_class is None
    assert tiny_unet.class_emb is None


def test_batch_items_are_independent(tiny_cond_unet):
    """GroupNorm and attention act per image: a batch gives the same result as single images."""
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([1, 400, 999])
    cond = torch.tensor([0, 5, 10])
    batched = tiny_cond_unet(x, t, cond)
    for b in range(3):
        single = tiny_cond_unet(x[b:b + 1], t[b:b + 1], cond[b:b + 1])
        torch.testing.assert_close(batched[b:b + 1], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 3, 8, 8), (2, 1, 8, 7), (2, 1, 9, 8), (1, 2, 1, 8, 8)])
def test_wrong_input_shape_rejected(tiny_unet, shape):
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 1, H, W\) with H and W divisible by 2"):
        tiny_unet(torch.zeros(shape), torch.zeros(shape[0], dtype=torch.long))


def test_larger_canvas_runs():
    """The network is fully convolutional: any size that divides by 2**(levels - 1) runs (outpainting)."""
    torch.manual_seed(0)
    model = perturb_conv_out(UNet(small_config(image_size=8)))
    x = torch.randn(2, 1, 16, 12)
    out = model(x, torch.tensor([3, 700]))
    assert out.shape == x.shape
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("t", [torch.tensor([[1], [2]]), torch.tensor([1, 2, 3]),
                               torch.tensor([1, 2], dtype=torch.int32)])
def test_wrong_timesteps_rejected(tiny_unet, t):
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \(2,\), int64 steps or floats"):
        tiny_unet(torch.zeros(2, 1, 8, 8), t)


def test_float_timesteps_are_accepted_and_non_finite_ones_refused(tiny_unet):
    """Continuous time (flow matching) passes float t; the embedding of 3.0 equals that of step 3."""
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(tiny_unet(x, torch.tensor([3.0, 700.0])), tiny_unet(x, torch.tensor([3, 700])))
        assert not torch.allclose(tiny_unet(x, torch.tensor([3.5, 700.0])), tiny_unet(x, torch.tensor([3.0, 700.0])))
    with pytest.raises(ValueError, match="t holds NaN or infinite values"):
        tiny_unet(x, torch.tensor([float("nan"), 1.0]))


def test_null_cond_is_the_null_label(tiny_unet, tiny_cond_unet):
    assert tiny_unet.null_cond(3) is None
    assert torch.equal(tiny_cond_unet.null_cond(3), torch.full((3,), 10))


def test_wrong_image_dtype_rejected(tiny_unet):
    with pytest.raises(ValueError, match="x_t"):
        tiny_unet(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([1, 2]))


@pytest.mark.parametrize("cond, message", [
    (torch.tensor([0, 11]), r"cond labels must lie in \[0, 10\]"),
    (torch.tensor([-1, 3]), r"cond labels must lie in \[0, 10\]"),
    (torch.tensor([1.0, 2.0]), "cond must be an int64 tensor"),
    (torch.tensor([1, 2, 3]), r"cond must be an int64 tensor of shape \(2,\)"),
])
def test_bad_condition_rejected(tiny_cond_unet, cond, message):
    with pytest.raises(ValueError, match=message):
        tiny_cond_unet(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), cond)


def test_condition_for_unconditional_model_rejected(tiny_unet):
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2]))


def test_image_size_must_divide_by_the_downsampling():
    with pytest.raises(ValueError, match=r"image_size 28 must be divisible by 2\*\*3"):
        UNet(UNetConfig(image_size=28, channel_mults=(1, 2, 4, 8)))
    with pytest.raises(ValueError, match="divisible"):
        UNet(small_config(image_size=9))


def test_timestep_embedding_against_the_formula():
    dim, t = 16, torch.tensor([0, 1, 7, 500, 999])
    emb = timestep_embedding(t, dim)
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    half = dim // 2
    for b, step in enumerate(t.tolist()):
        for i in range(half):
            frequency = 10000.0 ** (-i / half)     # f_i = max_period ** (-i / (dim / 2))
            assert emb[b, i].item() == pytest.approx(math.sin(step * frequency), abs=5e-4)
            assert emb[b, half + i].item() == pytest.approx(math.cos(step * frequency), abs=5e-4)
    # t = 0: all sines are 0 and all cosines are 1.
    assert torch.equal(emb[0], torch.cat([torch.zeros(half), torch.ones(half)]))


def test_timestep_embedding_other_max_period_and_float_t():
    emb = timestep_embedding(torch.tensor([2.5]), 4, max_period=100.0)
    expected = [math.sin(2.5), math.sin(2.5 / 10), math.cos(2.5), math.cos(2.5 / 10)]
    torch.testing.assert_close(emb[0].double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_config_round_trip():
    config = UNetConfig(in_channels=3, image_size=32, base_channels=24, channel_mults=(1, 2, 2),
                        num_res_blocks=2, num_classes=10, dropout=0.1)
    d = config.to_dict()
    assert d["channel_mults"] == [1, 2, 2]           # JSON-friendly
    assert UNetConfig.from_dict(d) == config
    assert UNetConfig.from_dict(UNetConfig().to_dict()) == UNetConfig()
    assert UNetConfig.from_dict({}) == UNetConfig()


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"Unknown UNetConfig fields \['base_chanels'\]"):
        UNetConfig.from_dict({"base_chanels": 8})


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 0, "num_classes must be a whole number of at least 1 .or None"),
    ("num_classes", 2.5, "num_classes must be a whole number"),
    ("base_channels", 0, "base_channels must be a whole number of at least 1"),
    ("in_channels", True, "in_channels must be a whole number"),
    ("channel_mults", (), "channel_mults must be a non-empty list"),
    ("channel_mults", (1, 0), "channel_mults must be a non-empty list"),
    ("dropout", 1.0, r"dropout must lie in \[0, 1\)"),
])
def test_config_rejects_inconsistent_values(field, value, message):
    """UNetConfig(num_classes=0) used to build a model whose only label was the null class."""
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{field: value})


def test_config_is_frozen():
    with pytest.raises(Exception):
        UNetConfig().base_channels = 32
