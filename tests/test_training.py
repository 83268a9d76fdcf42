"""Lesson 03's maths (training.py): the loss against a hand computation, one step with a loss
function, t and noise passed in, EMA, and precision. The loop around them is tested in test_runs.py."""

import copy
import functools

import pytest
import torch

from diffusion_course.guidance import drop_labels
from diffusion_course.schedules import cosine_schedule, linear_schedule
from diffusion_course.training import EMA, diffusion_loss, train_step


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the loss and one step ------------------------------------------------------------------------

def batch_and_errors_by_hand(model, schedule, t: torch.Tensor, seed: int):
    """A batch of 4 (x0, noise, labels incl. the null class) and each image's squared error of the
    noise prediction, with x_t made by hand from the closed form (no q_sample)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=generator)
    cond = torch.tensor([1, 2, 3, 10])
    ab = schedule.alpha_bar[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        per_image = ((model(x_t, t, cond) - noise) ** 2).mean((1, 2, 3))
    return x0, noise, cond, per_image


def test_diffusion_loss_is_the_mse_of_the_noise(tiny_cond_unet):
    schedule = cosine_schedule()
    t = torch.tensor([0, 250, 500, 999])
    x0, noise, cond, per_image = batch_and_errors_by_hand(tiny_cond_unet, schedule, t, seed=0)
    loss = diffusion_loss(tiny_cond_unet, x0, schedule, cond=cond, t=t, noise=noise)
    assert loss.shape == ()
    assert loss.requires_grad
    torch.testing.assert_close(loss.detach(), per_image.mean(), rtol=1e-5, atol=1e-7)
    # zero-initialised output layer: the prediction is 0, so the loss is the mean of noise^2
    torch.manual_seed(0)
    zero_model = type(tiny_cond_unet)(tiny_cond_unet.config)
    torch.testing.assert_close(diffusion_loss(zero_model, x0, schedule, cond=cond, t=t, noise=noise).detach(),
                               noise.square().mean())


def test_min_snr_weighting_by_hand(tiny_cond_unet):
    schedule = cosine_schedule()
    t = torch.tensor([0, 100, 500, 999])
    x0, noise, cond, per_image = batch_and_errors_by_hand(tiny_cond_unet, schedule, t, seed=1)
    snr = schedule.alpha_bar[t] / (1 - schedule.alpha_bar[t])
    assert snr[0] > 5 > snr[3]                       # the batch has clean and noisy images
    weights = torch.minimum(snr, torch.tensor(5.0)) / snr
    loss = diffusion_loss(tiny_cond_unet, x0, schedule, cond=cond, t=t, noise=noise, min_snr_gamma=5.0)
    torch.testing.assert_close(loss.detach(), (weights * per_image).mean(), rtol=1e-5, atol=1e-7)
    assert weights[3] == 1 and weights[0] < 1e-3     # noisy images keep weight 1; clean ones count little
    # a gamma above every SNR changes nothing: the plain loss
    torch.testing.assert_close(diffusion_loss(tiny_cond_unet, x0, schedule, cond=cond, t=t, noise=noise, min_snr_gamma=1e9),
                               diffusion_loss(tiny_cond_unet, x0, schedule, cond=cond, t=t, noise=noise))


def test_train_step_updates_the_weights_and_returns_a_float(tiny_unet):
    model = tiny_unet.train()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = functools.partial(diffusion_loss, schedule=linear_schedule())
    loss = train_step(model, optimizer, torch.rand(8, 1, 8, 8) * 2 - 1, loss_fn, generator=torch.Generator().manual_seed(0))
    assert isinstance(loss, float) and loss > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "conv_in.weight" in changed and "conv_out.weight" in changed


def test_train_step_passes_t_and_noise_to_the_loss(tiny_cond_unet):
    """train_step(model, optimizer, x0, loss_fn, cond=..., t=..., noise=...) returns the loss of exactly that
    t and noise (computed by hand before the step), and the step moves the weights by the gradient of it."""
    schedule = cosine_schedule()
    t = torch.tensor([0, 250, 500, 999])
    x0, noise, cond, per_image = batch_and_errors_by_hand(tiny_cond_unet, schedule, t, seed=2)
    model = copy.deepcopy(tiny_cond_unet).train()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = train_step(model, optimizer, x0, functools.partial(diffusion_loss, schedule=schedule), cond=cond,
                      grad_clip=0, t=t, noise=noise)
    assert loss == pytest.approx(per_image.mean().item(), rel=1e-5)
    diffusion_loss(reference, x0, schedule, cond=cond, t=t, noise=noise).backward()
    for (name, p), p0 in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * p0.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_diffusion_loss_draws_t_then_noise_from_the_generator(tiny_unet):
    schedule = linear_schedule()
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    generator = torch.Generator().manual_seed(3)
    t = torch.randint(0, schedule.num_steps, (4,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    with torch.no_grad():
        drawn = diffusion_loss(tiny_unet, x0, schedule, generator=torch.Generator().manual_seed(3))
        given = diffusion_loss(tiny_unet, x0, schedule, t=t, noise=noise)
    assert torch.equal(drawn, given)


@pytest.mark.parametrize("gamma", [0, -1.0, float("nan")])
def test_min_snr_gamma_must_be_positive(tiny_unet, gamma):
    with pytest.raises(ValueError, match="min_snr_gamma must be a positive number"):
        diffusion_loss(tiny_unet, torch.zeros(2, 1, 8, 8), linear_schedule(), min_snr_gamma=gamma)


@pytest.mark.parametrize("grad_clip", [-1.0, float("nan"), float("inf")])
def test_train_step_rejects_a_bad_grad_clip(tiny_unet, grad_clip):
    """grad_clip=-1 once turned training into gradient ascent (issue 12, item 3)."""
    optimizer = torch.optim.SGD(tiny_unet.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"grad_clip must be a finite number >= 0"):
        train_step(tiny_unet, optimizer, torch.zeros(2, 1, 8, 8),
                   functools.partial(diffusion_loss, schedule=linear_schedule()), grad_clip=grad_clip)


# --- label dropout and EMA -------------------------------------------------------------------------

def test_drop_labels_replaces_about_p_of_the_labels():
    labels = torch.arange(20000) % 10
    out = drop_labels(labels, null_class=10, p=0.3, generator=torch.Generator().manual_seed(0))
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.3) < 0.015          # 4.6 standard errors
    assert torch.equal(out[~dropped], labels[~dropped])              # the rest are untouched
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert torch.equal(drop_labels(labels, 10, 0.0), labels)
    assert bool((drop_labels(labels, 10, 1.0) == 10).all())
    again = drop_labels(labels, 10, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_ema_after_one_update_lies_between_old_and_new(tiny_unet):
    ema = EMA(tiny_unet, decay=0.999)
    old = copy.deepcopy(tiny_unet.state_dict())
    assert same_weights(ema.model, tiny_unet)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        for p in tiny_unet.parameters():
            p.add_(1.0)
    ema.update(tiny_unet)
    decay = 2 / 11      # early on the decay is (1 + n) / (10 + n) with n = 1 update
    for name, value in ema.model.named_parameters():
        new = dict(tiny_unet.named_parameters())[name]
        assert bool((value > old[name]).all() and (value < new).all()), name
        torch.testing.assert_close(value, decay * old[name] + (1 - decay) * new, rtol=1e-6, atol=1e-6)
    # Later the full decay applies: one more update moves the average by (1 - 0.999) of the gap.
    ema.num_updates = 100000
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    ema.update(tiny_unet)
    for name, value in ema.model.named_parameters():
        new = dict(tiny_unet.named_parameters())[name]
        torch.testing.assert_close(value, before[name] + 0.001 * (new - before[name]), rtol=1e-6, atol=1e-6)


def test_ema_update_matches_foreach_lerp(make_tiny_unet):
    """The readable per-parameter lerp_ gives exactly the numbers of the fused torch._foreach_lerp_."""
    ema, model = EMA(make_tiny_unet(seed=0)), make_tiny_unet(seed=1)
    reference = [p.clone() for p in ema.model.parameters()]
    for _ in range(3):
        ema.update(model)
        decay = min(ema.decay, (1 + ema.num_updates) / (10 + ema.num_updates))
        torch._foreach_lerp_(reference, [p.detach() for p in model.parameters()], 1 - decay)
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), reference))


# --- precision ---------------------------------------------------------------------------------------

def test_bfloat16_and_float32_steps_agree(tiny_unet):
    """One train step under bfloat16 autocast and one in float32, from the same weights and seed.
    bfloat16 keeps ~3 significant digits; measured difference 0.07 %, allowed 2 %."""
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    losses, dtypes = {}, {}
    for name, autocast_dtype in [("float32", None), ("bfloat16", torch.bfloat16)]:
        model = copy.deepcopy(tiny_unet).train()
        seen = []
        model.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = train_step(model, optimizer, x0, functools.partial(diffusion_loss, schedule=linear_schedule()),
                                  autocast_dtype=autocast_dtype, generator=torch.Generator().manual_seed(0))
        dtypes[name] = seen
        assert all(p.dtype == torch.float32 for p in model.parameters())   # weights stay float32
    assert dtypes == {"float32": [torch.float32], "bfloat16": [torch.bfloat16]}
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)


@pytest.mark.parametrize("decay", [1.5, 1.0, -0.1, float("nan"), True])
def test_ema_rejects_a_decay_outside_0_1(tiny_unet, decay):
    """EMA(model, 1.5) used to be accepted (the TrainConfig check did not cover the class itself)."""
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\)"):
        EMA(tiny_unet, decay)
