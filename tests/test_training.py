"""Training: the loss against a hand computation, a real (tiny) overfit on MNIST digits, label dropout,
EMA, budgets, checkpoints, exact resumption, input checks and precision."""

import copy
import time

import pytest
import torch
import torch.nn.functional as F

from diffusion_course import checkpoints, training
from diffusion_course.schedules import cosine_schedule, linear_schedule
from diffusion_course.training import EMA, TrainConfig, diffusion_loss, drop_labels, train, train_step


@pytest.fixture(scope="module")
def digits8(mnist_subset):
    """The 64 real MNIST digits, cropped to 24 x 24 and averaged down to 8 x 8 (still in [-1, 1])."""
    images = F.avg_pool2d(mnist_subset.images[:, :, 2:26, 2:26], 3)
    assert images.shape == (64, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    return images, mnist_subset.labels


def quick_config(**overrides) -> TrainConfig:
    settings = dict(steps=4, minutes=None, batch_size=16, warmup_steps=2, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


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
    loss = diffusion_loss(tiny_cond_unet, x0, schedule, cond, t, noise)
    assert loss.shape == ()
    assert loss.requires_grad
    torch.testing.assert_close(loss.detach(), per_image.mean(), rtol=1e-5, atol=1e-7)
    # zero-initialised output layer: the prediction is 0, so the loss is the mean of noise^2
    torch.manual_seed(0)
    zero_model = type(tiny_cond_unet)(tiny_cond_unet.config)
    torch.testing.assert_close(diffusion_loss(zero_model, x0, schedule, cond, t, noise).detach(),
                               noise.square().mean())


def test_min_snr_weighting_by_hand(tiny_cond_unet):
    schedule = cosine_schedule()
    t = torch.tensor([0, 100, 500, 999])
    x0, noise, cond, per_image = batch_and_errors_by_hand(tiny_cond_unet, schedule, t, seed=1)
    snr = schedule.alpha_bar[t] / (1 - schedule.alpha_bar[t])
    assert snr[0] > 5 > snr[3]                       # the batch has clean and noisy images
    weights = torch.minimum(snr, torch.tensor(5.0)) / snr
    loss = diffusion_loss(tiny_cond_unet, x0, schedule, cond, t, noise, min_snr_gamma=5.0)
    torch.testing.assert_close(loss.detach(), (weights * per_image).mean(), rtol=1e-5, atol=1e-7)
    assert weights[3] == 1 and weights[0] < 1e-3     # noisy images keep weight 1; clean ones count little
    # a gamma above every SNR changes nothing: the plain loss
    torch.testing.assert_close(diffusion_loss(tiny_cond_unet, x0, schedule, cond, t, noise, min_snr_gamma=1e9),
                               diffusion_loss(tiny_cond_unet, x0, schedule, cond, t, noise))


def test_train_step_updates_the_weights_and_returns_a_float(tiny_unet):
    model = tiny_unet.train()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = train_step(model, optimizer, torch.rand(8, 1, 8, 8) * 2 - 1, linear_schedule(),
                      generator=torch.Generator().manual_seed(0))
    assert isinstance(loss, float) and loss > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "conv_in.weight" in changed and "conv_out.weight" in changed


def test_short_overfit_on_real_digits(mnist_subset):
    """A tiny U-Net on 64 real MNIST digits: the loss must fall clearly within 40 steps.
    Measured: first 10 steps 0.89, last 10 steps 0.21 (ratio 0.23)."""
    torch.manual_seed(0)
    from diffusion_course.unet import UNet, UNetConfig
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), image_size=28))
    config = TrainConfig(steps=40, minutes=None, batch_size=8, lr=3e-3, warmup_steps=5, progress=False)
    result = train(model, mnist_subset.images, cosine_schedule(), config)
    losses = result.losses
    assert len(losses) == 40 and result.step == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert 0.6 < first < 1.3, f"an untrained model's loss should be about 1, got {first:.3f}"
    assert last < 0.5 * first, f"the loss did not fall clearly: first 10 steps {first:.3f}, last 10 {last:.3f}"


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


# --- budgets, checkpoints, resumption -------------------------------------------------------------

def test_step_budget_and_callback(make_tiny_unet, digits8):
    images, _ = digits8
    calls = []
    result = train(make_tiny_unet(perturb=False), images, linear_schedule(), quick_config(steps=5),
                   callback=lambda step, loss: calls.append((step, loss)))
    assert result.step == 5 and len(result.losses) == 5
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5]
    assert [c[1] for c in calls] == result.losses
    assert not result.model.training
    assert not same_weights(result.model, result.ema_model)


def test_minutes_budget_is_respected(make_tiny_unet, digits8):
    images, _ = digits8
    stamps = [time.perf_counter()]
    result = train(make_tiny_unet(perturb=False), images, linear_schedule(),
                   quick_config(steps=None, minutes=0.02, batch_size=4),
                   callback=lambda step, loss: stamps.append(time.perf_counter()))
    longest_step = max(b - a for a, b in zip(stamps, stamps[1:]))
    assert result.step >= 2 and len(result.losses) == result.step
    # It stops after the step that crosses 0.02 minutes = 1.2 s: at most one step (plus a little) later.
    assert 1.2 <= result.seconds <= 1.2 + longest_step + 0.3
    assert stamps[-1] - stamps[0] <= 1.2 + longest_step + 0.3


def test_checkpoint_every_and_keep_checkpoints(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    run = tmp_path / "run"
    result = train(make_tiny_unet(perturb=False), images, linear_schedule(),
                   quick_config(steps=5, checkpoint_every=2, keep_checkpoints=2), out_dir=run, dataset="mnist8")
    assert sorted(p.name for p in run.iterdir()) == ["step_00000004", "step_00000005"]   # 2, 4, final 5
    latest = checkpoints.load_checkpoint(run)
    assert latest.path.name == "step_00000005"
    assert latest.info["step"] == 5 and latest.info["dataset"] == "mnist8"
    assert same_weights(latest.model, result.ema_model)       # checkpoints hold the EMA weights
    assert "train_config" in latest.info and latest.info["train_config"]["steps"] == 5
    assert checkpoints.load_checkpoint(run / "step_00000004").info["step"] == 4


def test_existing_run_folder_needs_resume(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    train(make_tiny_unet(perturb=False), images, linear_schedule(), quick_config(steps=2), out_dir=tmp_path)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(make_tiny_unet(perturb=False), images, linear_schedule(), quick_config(steps=4), out_dir=tmp_path)


def run_in_two_parts(make_tiny_unet, digits8, tmp_path, first_part: int, total: int = 8):
    """Train `total` steps in one go, and again as `first_part` steps plus a resumed run; return both."""
    images, labels = digits8
    schedule = linear_schedule()
    whole = train(make_tiny_unet(num_classes=10, perturb=False), images, schedule, quick_config(steps=total),
                  labels=labels)
    train(make_tiny_unet(num_classes=10, perturb=False), images, schedule, quick_config(steps=first_part),
          labels=labels, out_dir=tmp_path)
    # A different initialisation: everything must come from the checkpoint.
    resumed = train(make_tiny_unet(num_classes=10, seed=123), images, schedule, quick_config(steps=total),
                    labels=labels, out_dir=tmp_path, resume=True)
    return whole, resumed


def test_resume_reproduces_an_uninterrupted_run(make_tiny_unet, digits8, tmp_path):
    # 64 images in batches of 16: the interruption after step 4 falls at the end of a pass over the data.
    whole, resumed = run_in_two_parts(make_tiny_unet, digits8, tmp_path, first_part=4)
    assert resumed.step == 8 and len(resumed.losses) == 4
    assert resumed.losses == whole.losses[4:]
    assert same_weights(resumed.model, whole.model)
    assert same_weights(resumed.ema_model, whole.ema_model)
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_00000008"


def test_resume_mid_pass_reproduces_an_uninterrupted_run(make_tiny_unet, digits8, tmp_path):
    whole, resumed = run_in_two_parts(make_tiny_unet, digits8, tmp_path, first_part=3)
    assert resumed.losses == whole.losses[3:]
    assert same_weights(resumed.model, whole.model)


def test_resume_with_budget_already_reached_does_nothing(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    first = train(make_tiny_unet(perturb=False), images, linear_schedule(), quick_config(steps=3), out_dir=tmp_path)
    again = train(make_tiny_unet(seed=7), images, linear_schedule(), quick_config(steps=3), out_dir=tmp_path,
                  resume=True)
    assert again.step == 3 and again.losses == []
    assert same_weights(again.model, first.model)


# --- input checks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("images, message", [
    (torch.full((8, 1, 8, 8), 2.0), r"scaled to \[-1, 1\]"),
    (torch.full((8, 1, 8, 8), -1.5), r"scaled to \[-1, 1\]"),
    (torch.zeros(8, 1, 8, 8, dtype=torch.uint8), "float"),
    (torch.zeros(8, 8, 8), r"\(N, C, H, W\)"),
])
def test_bad_images_rejected(tiny_unet, images, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_unet, images, linear_schedule(), quick_config())


def test_uint8_pixels_scaled_to_0_255_rejected(tiny_unet):
    with pytest.raises(ValueError, match="to_model_range"):
        train(tiny_unet, torch.full((8, 1, 8, 8), 255.0), linear_schedule(), quick_config())


def test_labels_for_an_unconditional_model_rejected(tiny_unet, digits8):
    images, labels = digits8
    with pytest.raises(ValueError, match="the model is unconditional"):
        train(tiny_unet, images, linear_schedule(), quick_config(), labels=labels)


def test_labels_of_the_wrong_length_rejected(tiny_cond_unet, digits8):
    images, labels = digits8
    with pytest.raises(ValueError, match=r"labels must have shape \(64,\)"):
        train(tiny_cond_unet, images, linear_schedule(), quick_config(), labels=labels[:10])


def test_train_config_checks():
    with pytest.raises(ValueError, match="Give a budget"):
        TrainConfig(steps=None, minutes=None)
    with pytest.raises(ValueError, match="precision must be"):
        TrainConfig(precision="float16")
    with pytest.raises(ValueError, match="label_dropout"):
        TrainConfig(label_dropout=1.5)
    with pytest.raises(ValueError, match="min_snr_gamma must be a positive number"):
        TrainConfig(min_snr_gamma=0)


# --- precision ---------------------------------------------------------------------------------------

def test_pick_autocast_dtype_on_cpu():
    cpu = torch.device("cpu")
    assert training.pick_autocast_dtype(cpu, "float32") is None
    assert training.pick_autocast_dtype(cpu, "bfloat16") is torch.bfloat16
    expected = torch.bfloat16 if training.cpu_has_fast_bfloat16() else None
    assert training.pick_autocast_dtype(cpu, "auto") is expected
    assert training.pick_autocast_dtype(cpu) is expected
    assert isinstance(training.cpu_has_fast_bfloat16(), bool)


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
        losses[name] = train_step(model, optimizer, x0, linear_schedule(), autocast_dtype=autocast_dtype,
                                  generator=torch.Generator().manual_seed(0))
        dtypes[name] = seen
        assert all(p.dtype == torch.float32 for p in model.parameters())   # weights stay float32
    assert dtypes == {"float32": [torch.float32], "bfloat16": [torch.bfloat16]}
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)
