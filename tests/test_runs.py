"""The training loop (runs.py): a real (tiny) overfit on MNIST digits, budgets, checkpoints by steps and
by time, exact resumption, saving on Ctrl-C and SIGTERM, the lock, resume checks, input and config checks."""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from diffusion_course import checkpoints, runs
from diffusion_course.runs import TrainConfig, train
from diffusion_course.schedules import cosine_schedule, linear_schedule
from diffusion_course.training import diffusion_loss

LOSS = functools.partial(diffusion_loss, schedule=linear_schedule())
INFO = {"dataset": "mnist8", "schedule": linear_schedule().to_config()}


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


def test_short_overfit_on_real_digits(mnist_subset):
    """A tiny U-Net on 64 real MNIST digits: the loss must fall clearly within 40 steps.
    Measured: first 10 steps 0.89, last 10 steps 0.21 (ratio 0.23)."""
    torch.manual_seed(0)
    from diffusion_course.unet import UNet, UNetConfig
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), image_size=28))
    config = TrainConfig(steps=40, minutes=None, batch_size=8, lr=3e-3, warmup_steps=5, progress=False)
    loss_fn = functools.partial(diffusion_loss, schedule=cosine_schedule(), min_snr_gamma=5.0)
    result = train(model, mnist_subset.images, loss_fn, config=config)
    losses = result.losses
    assert len(losses) == 40 and result.step == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert 0.6 < first < 1.3, f"an untrained model's loss should be about 1, got {first:.3f}"
    assert last < 0.5 * first, f"the loss did not fall clearly: first 10 steps {first:.3f}, last 10 {last:.3f}"


# --- budgets, checkpoints, resumption -------------------------------------------------------------

def test_step_budget_and_callback(make_tiny_unet, digits8):
    images, _ = digits8
    calls = []
    result = train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=5),
                   callback=lambda step, loss: calls.append((step, loss)))
    assert result.step == 5 and len(result.losses) == 5
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5]
    assert [c[1] for c in calls] == result.losses
    assert not result.model.training
    assert not same_weights(result.model, result.ema_model)


def test_minutes_budget_is_respected(make_tiny_unet, digits8):
    images, _ = digits8
    stamps = [time.perf_counter()]
    result = train(make_tiny_unet(perturb=False), images, LOSS,
                   config=quick_config(steps=None, minutes=0.02, batch_size=4),
                   callback=lambda step, loss: stamps.append(time.perf_counter()))
    longest_step = max(b - a for a, b in zip(stamps, stamps[1:]))
    assert result.step >= 2 and len(result.losses) == result.step
    # It stops after the step that crosses 0.02 minutes = 1.2 s: at most one step (plus a little) later.
    assert 1.2 <= result.seconds <= 1.2 + longest_step + 0.3
    assert stamps[-1] - stamps[0] <= 1.2 + longest_step + 0.3


def test_checkpoint_every_and_keep_checkpoints(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    run = tmp_path / "run"
    result = train(make_tiny_unet(perturb=False), images, LOSS,
                   config=quick_config(steps=5, checkpoint_every=2, keep_checkpoints=2), out_dir=run, info=INFO)
    assert sorted(p.name for p in run.iterdir()) == ["step_00000004", "step_00000005"]   # 2, 4, final 5
    latest = checkpoints.load_checkpoint(run)
    assert latest.path.name == "step_00000005"
    assert latest.info["step"] == 5 and latest.info["dataset"] == "mnist8"
    assert latest.info["type"] == "unet"
    assert torch.equal(latest.schedule.alpha_bar, linear_schedule().alpha_bar)   # the schedule given in info
    assert same_weights(latest.model, result.ema_model)       # checkpoints hold the EMA weights
    assert "train_config" in latest.info and latest.info["train_config"]["steps"] == 5
    assert checkpoints.load_checkpoint(run / "step_00000004").info["step"] == 4


def test_existing_run_folder_needs_resume(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=2), out_dir=tmp_path)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=4), out_dir=tmp_path)


def run_in_two_parts(make_tiny_unet, digits8, tmp_path, first_part: int, total: int = 8):
    """Train `total` steps in one go, and again as `first_part` steps plus a resumed run; return both."""
    images, labels = digits8
    whole = train(make_tiny_unet(num_classes=10, perturb=False), images, LOSS, config=quick_config(steps=total),
                  labels=labels)
    train(make_tiny_unet(num_classes=10, perturb=False), images, LOSS, config=quick_config(steps=first_part),
          labels=labels, out_dir=tmp_path, info=INFO)
    # A different initialisation: everything must come from the checkpoint.
    resumed = train(make_tiny_unet(num_classes=10, seed=123), images, LOSS, config=quick_config(steps=total),
                    labels=labels, out_dir=tmp_path, resume=True, info=INFO)
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
    first = train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=3), out_dir=tmp_path)
    again = train(make_tiny_unet(seed=7), images, LOSS, config=quick_config(steps=3), out_dir=tmp_path, resume=True)
    assert again.step == 3 and again.losses == []
    assert same_weights(again.model, first.model)


# --- input checks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("images, message", [
    (torch.zeros(8, 1, 8, 8, dtype=torch.uint8), "float"),
    (torch.zeros(8, 8, 8), r"\(N, C, H, W\)"),
    (torch.full((8, 1, 8, 8), float("nan")), "finite"),
    (torch.zeros(0, 1, 8, 8), "empty"),
])
def test_bad_images_rejected(tiny_unet, images, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_unet, images, LOSS, config=quick_config())


def test_labels_for_an_unconditional_model_rejected(tiny_unet, digits8):
    images, labels = digits8
    with pytest.raises(ValueError, match="the model is unconditional"):
        train(tiny_unet, images, LOSS, config=quick_config(), labels=labels)


def test_labels_of_the_wrong_length_rejected(tiny_cond_unet, digits8):
    images, labels = digits8
    with pytest.raises(ValueError, match=r"labels must have shape \(64,\)"):
        train(tiny_cond_unet, images, LOSS, config=quick_config(), labels=labels[:10])


def test_train_config_checks():
    with pytest.raises(ValueError, match="Give a budget"):
        TrainConfig(steps=None, minutes=None)
    with pytest.raises(ValueError, match="precision must be"):
        TrainConfig(precision="float16")
    with pytest.raises(ValueError, match="label_dropout"):
        TrainConfig(label_dropout=1.5)


# --- precision ---------------------------------------------------------------------------------------

def test_pick_autocast_dtype_on_cpu():
    cpu = torch.device("cpu")
    assert runs.pick_autocast_dtype(cpu, "float32") is None
    assert runs.pick_autocast_dtype(cpu, "bfloat16") is torch.bfloat16
    expected = torch.bfloat16 if runs.cpu_has_fast_bfloat16() else None
    assert runs.pick_autocast_dtype(cpu, "auto") is expected
    assert runs.pick_autocast_dtype(cpu) is expected
    assert isinstance(runs.cpu_has_fast_bfloat16(), bool)
