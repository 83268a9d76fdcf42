"""Lesson 08 (autoencoder.py): shapes and 4x compression, the KL closed form against a Monte-Carlo
estimate and torch.distributions, the loss by hand, the scale factor, checkpoints and runs.train.
Random tensors here are inputs to code, never a stand-in for a dataset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusion_course import autoencoder as ae
from diffusion_course import checkpoints, runs

TINY = ae.AutoencoderConfig(base_channels=8, channel_mults=(1, 2, 2))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return ae.Autoencoder(TINY).eval()


def canvases(num=4, seed=0):
    return torch.rand(num, 3, 32, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_and_4x_compression_per_side(tiny):
    x = canvases()
    posterior = tiny.encode(x)
    assert isinstance(posterior, ae.Posterior)
    assert posterior.mean.shape == posterior.logvar.shape == (4, 4, 8, 16)
    assert tiny.decode(posterior.mean).shape == tiny(x).shape == x.shape
    assert TINY.downsampling == 4 and tiny.latent_shape((3, 32, 64)) == (4, 8, 16)
    two_levels = ae.Autoencoder(ae.AutoencoderConfig(base_channels=8, channel_mults=(1, 2)))
    assert two_levels.encode(x).mean.shape == (4, 4, 16, 32)


def test_the_default_model_is_small():
    model = ae.Autoencoder()
    count = sum(p.numel() for p in model.parameters())
    assert 100_000 < count < 1_000_000, count          # 453,451: 1.8 MB in float32
    assert model.encode(canvases(1)).mean.shape == (1, 4, 8, 16)


def test_logvar_is_clamped(tiny):
    with torch.no_grad():
        tiny.encoder.conv_out.bias[4:] = 100.0         # the log-variance half of the output
    assert tiny.encode(canvases(1)).logvar.max().item() == ae.LOGVAR_RANGE[1]


def test_kl_closed_form_by_hand_and_against_torch_distributions():
    mean = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.5, -1.0]])
    by_hand = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(1)
    assert torch.allclose(ae.kl_divergence(mean, logvar), by_hand)
    assert ae.kl_divergence(mean, logvar)[0].item() == pytest.approx(0.5)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    reference = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(ae.kl_divergence(mean, logvar), reference, atol=1e-6)


def test_kl_closed_form_matches_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    posterior = ae.Posterior(mean, logvar)
    samples = torch.stack([ae.sample_posterior(posterior, generator=g) for _ in range(20_000)])
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    log_ratio = q.log_prob(samples) - torch.distributions.Normal(0.0, 1.0).log_prob(samples)   # E_q[log q - log p]
    estimate = log_ratio.flatten(2).sum(2).mean(0)
    assert torch.allclose(estimate, ae.kl_divergence(mean, logvar), rtol=0.05), (estimate, ae.kl_divergence(mean, logvar))


def test_sample_posterior_is_the_reparameterisation():
    mean, logvar, noise = torch.tensor([[1.0]]), torch.tensor([[2 * 0.693147]]), torch.tensor([[-1.5]])
    assert ae.sample_posterior(ae.Posterior(mean, logvar), noise=noise).item() == pytest.approx(1.0 - 2.0 * 1.5, abs=1e-5)
    a = ae.sample_posterior(ae.Posterior(mean, logvar), generator=torch.Generator().manual_seed(1))
    b = ae.sample_posterior(ae.Posterior(mean, logvar), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        ae.sample_posterior(ae.Posterior(mean, logvar), noise=torch.zeros(2))


def test_loss_equals_a_hand_computation(tiny):
    x = canvases(2)
    noise = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(2))
    posterior = tiny.encode(x)
    reconstruction = tiny.decode(posterior.mean + (0.5 * posterior.logvar).exp() * noise)
    kl = 0.5 * (posterior.mean ** 2 + posterior.logvar.exp() - 1 - posterior.logvar).mean()   # per element
    for weight in (0.0, 1e-6, 0.5):
        expected = F.mse_loss(reconstruction, x) + weight * kl
        assert ae.autoencoder_loss(tiny, x, kl_weight=weight, noise=noise).item() == pytest.approx(expected.item(), rel=1e-5)
    default = ae.autoencoder_loss(tiny, x, noise=noise).item()        # config.kl_weight = 1e-6
    assert default == pytest.approx((F.mse_loss(reconstruction, x) + 1e-6 * kl).item(), rel=1e-5)
    a = ae.autoencoder_loss(tiny, x, generator=torch.Generator().manual_seed(3))
    assert a.item() == ae.autoencoder_loss(tiny, x, generator=torch.Generator().manual_seed(3)).item()


def test_scale_factor_gives_unit_std_and_round_trips(tiny):
    x = canvases(8)
    scale = ae.measure_scale_factor(tiny, x, batch_size=3)
    assert scale == pytest.approx(1 / tiny.encode(x).mean.std().item(), rel=1e-4)
    assert ae.with_scale_factor(tiny, scale) is tiny and tiny.config.scale_factor == scale
    z_scaled = tiny.encode_latents(x)
    assert z_scaled.std().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(tiny.decode_latents(z_scaled), tiny(x).clamp(-1, 1), atol=1e-5)
    assert tiny.decode_latents(z_scaled * 50).abs().max().item() <= 1.0


def test_encode_latents_can_sample(tiny):
    x = canvases(2)
    ae.with_scale_factor(tiny, 2.0)
    a = tiny.encode_latents(x, generator=torch.Generator().manual_seed(0), sample=True)
    b = tiny.encode_latents(x, generator=torch.Generator().manual_seed(0), sample=True)
    assert torch.equal(a, b) and not torch.allclose(a, tiny.encode_latents(x))
    noise = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    expected = 2.0 * ae.sample_posterior(tiny.encode(x), noise=noise)
    assert torch.allclose(a, expected, atol=1e-6)


def test_checkpoint_round_trip(tiny, tmp_path):
    ae.with_scale_factor(tiny, 0.25)
    folder = checkpoints.save_checkpoint(tmp_path / "vae", tiny, info={"dataset": "prompted_digits"})
    loaded = checkpoints.load_checkpoint(folder)
    assert loaded.info["type"] == "autoencoder" and loaded.schedule is None
    assert isinstance(loaded.model, ae.Autoencoder) and loaded.model.config == tiny.config
    x = canvases(2)
    assert torch.equal(loaded.model.encode_latents(x), tiny.encode_latents(x))


def test_runs_train_takes_the_loss():
    torch.manual_seed(0)
    model = ae.Autoencoder(TINY)
    result = runs.train(model, canvases(6), ae.autoencoder_loss,
                        config=runs.TrainConfig(steps=3, minutes=None, batch_size=4, progress=False))
    assert result.step == 3 and len(result.losses) == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_config_round_trips_and_rejects_bad_values():
    config = ae.AutoencoderConfig(scale_factor=0.2, channel_mults=(1, 2))
    assert ae.AutoencoderConfig.from_dict(config.to_dict()) == config
    for bad in ({"latent_channels": 0}, {"channel_mults": ()}, {"channel_mults": (1, 0)}, {"kl_weight": -1.0},
                {"scale_factor": 0.0}, {"scale_factor": float("nan")}, {"base_channels": True}):
        with pytest.raises(ValueError):
            ae.AutoencoderConfig(**bad)
    with pytest.raises(ValueError, match="Unknown"):
        ae.AutoencoderConfig.from_dict({"image_size": 32})


def test_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) with H and W divisible by 4"):
        tiny.encode(torch.zeros(1, 3, 30, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode(torch.zeros(1, 1, 32, 64))
    with pytest.raises(ValueError, match="to_model_range"):
        tiny.encode(torch.zeros(1, 3, 32, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4, H, W\)"):
        tiny.decode(torch.zeros(1, 3, 8, 16))
    with pytest.raises(ValueError, match="no condition"):
        ae.autoencoder_loss(tiny, canvases(1), cond=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="kl_weight"):
        ae.autoencoder_loss(tiny, canvases(1), kl_weight=-1.0)
    with pytest.raises(ValueError, match="scale factor"):
        ae.with_scale_factor(tiny, -2.0)
    with pytest.raises(ValueError, match="standard deviation"):
        ae.measure_scale_factor(_constant_model(), canvases(2))
    with pytest.raises(ValueError, match="batch_size"):
        ae.measure_scale_factor(tiny, canvases(2), batch_size=0)


def _constant_model() -> ae.Autoencoder:
    model = ae.Autoencoder(TINY)
    with torch.no_grad():
        model.encoder.conv_out.weight.zero_()          # every latent is 0: no spread
        model.encoder.conv_out.bias.zero_()
    return model
