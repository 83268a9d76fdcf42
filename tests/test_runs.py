"""The training loop (runs.py): a real (tiny) overfit on MNIST digits, budgets, checkpoints by steps and
by time, exact resumption, saving on Ctrl-C and SIGTERM, the lock, resume checks, input and config checks."""

import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from diffusion_course import checkpoints, flow, runs, threads
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


# --- issue 12 (2): nothing lost on a crash, Ctrl-C or SIGTERM -----------------------------------------

def test_checkpoints_by_time_as_well_as_by_steps(make_tiny_unet, digits8, tmp_path):
    """`train --minutes 5` used to write its only checkpoint at the end. Now a checkpoint is written
    whenever checkpoint_minutes of training passed since the last one (1 minute by default)."""
    assert TrainConfig().checkpoint_minutes == 1.0
    images, _ = digits8
    config = quick_config(steps=4, checkpoint_minutes=0.0005, keep_checkpoints=10)     # every 30 ms
    train(make_tiny_unet(perturb=False), images, LOSS, config=config, out_dir=tmp_path,
          callback=lambda step, loss: time.sleep(0.05))
    assert [p.name for p in checkpoints.run_checkpoints(tmp_path)] == [f"step_{s:08d}" for s in (1, 2, 3, 4)]
    train(make_tiny_unet(perturb=False), images, LOSS, out_dir=tmp_path / "by_steps_only",
          config=quick_config(steps=4, checkpoint_minutes=None, keep_checkpoints=10))
    assert [p.name for p in checkpoints.run_checkpoints(tmp_path / "by_steps_only")] == ["step_00000004"]


def interrupt_at(step: int, how):
    def callback(current, loss):
        if current == step:
            how()
    return callback


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


def test_ctrl_c_saves_a_checkpoint_and_resume_is_still_exact(make_tiny_unet, digits8, tmp_path):
    images, labels = digits8
    whole = train(make_tiny_unet(num_classes=10, perturb=False), images, LOSS, config=quick_config(steps=8),
                  labels=labels)
    with pytest.raises(KeyboardInterrupt):
        train(make_tiny_unet(num_classes=10, perturb=False), images, LOSS, config=quick_config(steps=8),
              labels=labels, out_dir=tmp_path, callback=interrupt_at(3, raise_keyboard_interrupt))
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_00000003"
    assert not (tmp_path / checkpoints.LOCK_FILE).exists()
    resumed = train(make_tiny_unet(num_classes=10, seed=9), images, LOSS, config=quick_config(steps=8),
                    labels=labels, out_dir=tmp_path, resume=True)
    assert resumed.losses == whole.losses[3:]
    assert same_weights(resumed.model, whole.model) and same_weights(resumed.ema_model, whole.ema_model)


@pytest.mark.parametrize("signum, exception", [(signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_stops_after_the_step_saves_and_restores_the_handler(make_tiny_unet, digits8, tmp_path,
                                                                        signum, exception):
    images, _ = digits8
    before = signal.getsignal(signum)
    steps = []
    with pytest.raises(exception) as raised:
        train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=8), out_dir=tmp_path,
              callback=lambda step, loss: (steps.append(step), step == 2 and os.kill(os.getpid(), signum)))
    assert steps == [1, 2]                              # it stopped right after the step it was in
    if exception is SystemExit:
        assert raised.value.code == 128 + signal.SIGTERM
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_00000002"
    assert signal.getsignal(signum) is before
    assert not (tmp_path / checkpoints.LOCK_FILE).exists()


def test_ctrl_c_in_the_middle_of_a_step_keeps_the_last_whole_checkpoint(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    calls = []

    def loss_fn(model, x0, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt          # half way through step 3: nothing of it may be saved
        return LOSS(model, x0, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        train(make_tiny_unet(perturb=False), images, loss_fn, config=quick_config(steps=8, checkpoint_minutes=None),
              out_dir=tmp_path)
    assert [p.name for p in checkpoints.run_checkpoints(tmp_path)] == []     # nothing whole to keep
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        train(make_tiny_unet(perturb=False), images, loss_fn, config=quick_config(steps=8, checkpoint_every=2),
              out_dir=tmp_path / "b")
    assert [p.name for p in checkpoints.run_checkpoints(tmp_path / "b")] == ["step_00000002"]


# --- issue 12 (3): no bad number passes silently -------------------------------------------------------

nan, inf = float("nan"), float("inf")


@pytest.mark.parametrize("name, value", [
    ("lr", inf), ("lr", nan), ("lr", 0.0), ("lr", -1e-3),
    ("batch_size", 0), ("batch_size", -4), ("batch_size", 2.5),
    ("minutes", nan), ("minutes", inf), ("minutes", 0), ("minutes", -1.0),
    ("steps", 0), ("steps", -3), ("steps", True),
    ("grad_clip", -1.0), ("grad_clip", nan), ("grad_clip", inf),
    ("ema_decay", 1.0), ("ema_decay", -0.1), ("ema_decay", nan),
    ("warmup_steps", -1), ("checkpoint_every", -1), ("checkpoint_minutes", 0), ("checkpoint_minutes", nan),
    ("label_dropout", -0.1), ("label_dropout", 1.5), ("label_dropout", nan),
    ("weight_decay", -0.1), ("keep_checkpoints", 0), ("precision", "float16"), ("seed", 1.5),
])
def test_train_config_rejects_bad_numbers_naming_the_field(name, value):
    with pytest.raises(ValueError) as raised:
        TrainConfig(**{"steps": 10, name: value})
    message = str(raised.value)
    assert f"TrainConfig.{name} must be" in message and f"got {value!r}" in message


def test_train_config_takes_numpy_numbers_as_plain_ones():
    import numpy as np
    config = TrainConfig(steps=np.int64(3), lr=np.float32(1e-3))
    assert type(config.steps) is int and type(config.lr) is float and json.dumps(dataclasses.asdict(config))


def test_train_config_accepts_the_edges():
    TrainConfig(steps=1, minutes=None, warmup_steps=0, grad_clip=0, ema_decay=0.0, label_dropout=1.0,
                checkpoint_every=0, checkpoint_minutes=None, keep_checkpoints=1)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    calls = []

    def loss_fn(model, x0, **kwargs):
        calls.append(1)
        loss = LOSS(model, x0, **kwargs)
        return loss * nan if len(calls) == 4 else loss

    with pytest.raises(FloatingPointError, match="The loss became nan at step 4"):
        train(make_tiny_unet(perturb=False), images, loss_fn, config=quick_config(steps=8, checkpoint_every=1),
              out_dir=tmp_path)
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_00000003"
    model = checkpoints.load_checkpoint(tmp_path).model
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_exploding_weights_never_reach_a_checkpoint(make_tiny_unet, digits8, tmp_path):
    """`train --lr inf` used to save a checkpoint of NaNs; lr = 1e30 is finite but blows the weights up."""
    images, _ = digits8
    with pytest.raises(FloatingPointError, match="no longer finite|The loss became"):
        train(make_tiny_unet(perturb=False), images, LOSS, out_dir=tmp_path,
              config=quick_config(steps=6, lr=1e30, warmup_steps=0, grad_clip=0, checkpoint_every=1))
    for folder in checkpoints.run_checkpoints(tmp_path):
        model = checkpoints.load_checkpoint(folder).model
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), folder


# --- issue 12 (5): pruning touches only the loop's own checkpoints, crash-safely -------------------------

def test_pruning_spares_a_users_folders(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    best = tmp_path / "step_00000002_best"
    best.mkdir()
    (best / "notes.txt").write_text("my best run")
    final = checkpoints.save_checkpoint(tmp_path / "step_final", make_tiny_unet(), linear_schedule())
    foreign = tmp_path / "step_00000009"              # the exact pattern, but not this package's config.json
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"format": "something-else"}))
    train(make_tiny_unet(perturb=False), images, LOSS, out_dir=tmp_path, resume=True,
          config=quick_config(steps=4, checkpoint_every=1, keep_checkpoints=1))
    assert (best / "notes.txt").read_text() == "my best run"
    assert (final / "model.safetensors").is_file() and (foreign / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002_best", "step_00000004", "step_00000009",
                                                          "step_final"]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_crash_while_pruning_leaves_no_half_checkpoint(make_tiny_unet, tmp_path, monkeypatch):
    for step in (1, 2, 3):
        checkpoints.save_checkpoint(tmp_path / f"step_{step:08d}", make_tiny_unet(), linear_schedule(), step=step)

    def killed_midway(folder, *args, **kwargs):
        (folder / "model.safetensors").unlink()       # the weights are gone, config.json is not yet
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.prune_checkpoints(tmp_path, keep=1)
    monkeypatch.undo()
    for folder in checkpoints.run_checkpoints(tmp_path):       # every step_* folder left is whole
        checkpoints.load_checkpoint(folder)
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_00000003"
    checkpoints.clean_leftovers(tmp_path)                      # the half-deleted folder is ours: removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


def test_leftovers_of_dead_processes_are_cleaned_up(make_tiny_unet, digits8, tmp_path):
    """Killed saves used to leave .step_N.partial-PID folders forever (11 folders after 30 kills)."""
    images, _ = digits8
    train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=4), out_dir=tmp_path)
    dead, alive = dead_pid(), os.getppid()
    # killed between moving the old step_4 aside and putting the new one in place
    os.rename(tmp_path / "step_00000004", tmp_path / f".step_00000004.old-{dead}")
    for name in (f".step_00000005.partial-{dead}", f".step_00000006.partial-{alive}", f".notes.partial-{dead}"):
        (tmp_path / name).mkdir()
    result = train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=5), out_dir=tmp_path,
                   resume=True)
    assert result.step == 5 and len(result.losses) == 1      # resumed from the step_4 that was moved back
    # the dead process's partial save is gone; the live process's and the user's hidden folder stay.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".notes.partial-{dead}", f".step_00000006.partial-{alive}",
                                                          "step_00000004", "step_00000005"]


# --- issue 12 (6): one run per folder ----------------------------------------------------------------

def test_a_second_run_on_the_same_folder_fails_fast(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    (tmp_path / checkpoints.LOCK_FILE).write_text(f"{os.getppid()}\n")      # a live process holds it
    calls = []
    with pytest.raises(FileExistsError, match="in use by another training run"):
        train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(), out_dir=tmp_path,
              callback=lambda step, loss: calls.append(step))
    assert calls == [] and list(tmp_path.iterdir()) == [tmp_path / checkpoints.LOCK_FILE]


def test_a_stale_lock_is_taken_over(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    (tmp_path / checkpoints.LOCK_FILE).write_text(f"{dead_pid()}\n")
    result = train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=2), out_dir=tmp_path)
    assert result.step == 2 and not (tmp_path / checkpoints.LOCK_FILE).exists()


def test_the_lock_is_held_during_the_run(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    seen = []
    train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=1), out_dir=tmp_path,
          callback=lambda step, loss: seen.append((tmp_path / checkpoints.LOCK_FILE).read_text().strip()))
    assert seen == [str(os.getpid())]


# --- issue 12 (8): resume refuses other settings --------------------------------------------------------

def test_resume_refuses_other_settings_naming_each(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=2), out_dir=tmp_path, info=INFO)
    other_info = {**INFO, "schedule": cosine_schedule().to_config()}
    with pytest.raises(ValueError) as raised:
        train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=4, lr=1e-3, batch_size=8),
              out_dir=tmp_path, resume=True, info=other_info)
    message = str(raised.value)
    for key in ("train_config.lr", "train_config.batch_size", "info.schedule"):
        assert key in message, message
    assert "train_config.steps" not in message                  # budgets may grow: that extends a run
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_00000002"


def test_resume_with_another_model_config_is_a_clear_error(make_tiny_unet, digits8, tmp_path):
    from diffusion_course.unet import UNet, UNetConfig
    images, _ = digits8
    train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=2), out_dir=tmp_path)
    wider = UNet(UNetConfig(in_channels=1, image_size=8, base_channels=16, channel_mults=(1, 2)))
    with pytest.raises(ValueError, match=r"model\.base_channels \(stored 8, now 16\)"):
        train(wider, images, LOSS, config=quick_config(steps=4), out_dir=tmp_path, resume=True)


# --- issue 12 (9): the output folder is checked before the first step -----------------------------------

def test_an_out_dir_that_is_a_file_fails_before_training(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    (tmp_path / "out").write_text("not a folder")
    calls = []
    with pytest.raises(NotADirectoryError, match="is a file"):
        train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(), out_dir=tmp_path / "out",
              callback=lambda step, loss: calls.append(step))
    assert calls == []


def test_an_unwritable_out_dir_fails_before_training(make_tiny_unet, digits8, tmp_path, monkeypatch):
    images, _ = digits8
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(checkpoints.os, "open", read_only)      # as root, chmod would not stop us
    calls = []
    with pytest.raises(PermissionError, match="Cannot write to the run folder"):
        train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(), out_dir=tmp_path,
              callback=lambda step, loss: calls.append(step))
    assert calls == []


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="file permissions do not bind root")
def test_a_read_only_out_dir_fails_before_training(make_tiny_unet, digits8, tmp_path):
    images, _ = digits8
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="Cannot write to the run folder"):
            train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(), out_dir=tmp_path / "run")
    finally:
        tmp_path.chmod(0o700)


def test_an_unsaveable_model_fails_before_training(digits8, tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_t, t, cond=None):
            return self.scale * x_t

    images, _ = digits8
    with pytest.raises(ValueError, match="Cannot save a Tiny"):
        train(Tiny(), images, LOSS, config=quick_config(), out_dir=tmp_path)
    assert train(Tiny(), images, LOSS, config=quick_config(steps=2)).step == 2      # no out_dir: fine


def test_info_must_be_json(tiny_unet, digits8):
    images, _ = digits8
    with pytest.raises(ValueError, match="info must hold JSON values"):
        train(tiny_unet, images, LOSS, config=quick_config(), info={"schedule": linear_schedule()})
    with pytest.raises(ValueError, match=r"info may not set \['seconds', 'step'\]"):
        train(tiny_unet, images, LOSS, config=quick_config(), info={"step": 3, "seconds": 1.0})


def test_hflip_is_off_by_default_and_must_be_a_bool():
    """The augmentation option for colour photos (issue 14; the flip itself: test_data); digits must not be mirrored."""
    assert runs.TrainConfig().hflip is False
    with pytest.raises(ValueError, match="hflip"):
        runs.TrainConfig(hflip="yes")


def test_a_run_with_hflip_trains_and_differs_from_one_without(make_tiny_unet, digits8):
    images, _ = digits8
    plain = train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=3)).losses
    flipped = train(make_tiny_unet(perturb=False), images, LOSS, config=quick_config(steps=3, hflip=True)).losses
    assert len(flipped) == 3 and all(math.isfinite(loss) for loss in flipped) and flipped != plain


def test_a_batch_cut_into_parts_takes_the_same_steps(make_tiny_unet, digits8, split_into):
    images, labels = digits8
    run = lambda: train(make_tiny_unet(num_classes=10), images, LOSS, config=quick_config(), labels=labels)
    whole = run()
    split_into(3)                 # one thread per part: 4 parts when training (16 images: 4 each)
    assert threads.training_workers() == 4 and len(threads.batch_parts(16, 4)) == 4
    parts = run()
    # The same t and noise, sliced: the losses agree to float rounding, and so do the weights.
    assert parts.losses == pytest.approx(whole.losses, rel=1e-5)
    for a, b in zip(whole.model.parameters(), parts.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    again = run()                 # the gradients of the parts are added in order: the same every time
    assert again.losses == parts.losses and same_weights(again.model, parts.model)


def test_a_run_in_parts_resumes_exactly(make_tiny_unet, digits8, tmp_path, split_into):
    split_into(2)
    whole, resumed = run_in_two_parts(make_tiny_unet, digits8, tmp_path, first_part=3)
    assert resumed.losses == whole.losses[3:]
    assert same_weights(resumed.model, whole.model) and same_weights(resumed.ema_model, whole.ema_model)


def test_a_loss_without_t_and_noise_in_parts_gets_a_generator_per_part(make_tiny_unet, digits8, split_into,
                                                                         monkeypatch):
    images, labels = digits8
    calls = []

    def flow_loss(model, x0, **options):
        calls.append((len(x0), threading.current_thread() is threading.main_thread(), options["generator"]))
        return flow.flow_matching_loss(model, x0, **options)
    monkeypatch.setattr(runs, "PER_IMAGE_LOSSES", runs.PER_IMAGE_LOSSES + (flow_loss,))
    run = lambda: train(make_tiny_unet(num_classes=10), images, flow_loss, config=quick_config(steps=2), labels=labels)
    split_into(2)
    first, second = run(), run()
    assert first.losses == second.losses and same_weights(first.model, second.model)
    assert sorted((size, main) for size, main, _ in calls[:4]) == [(4, False)] * 4
    assert len({id(generator) for _, _, generator in calls[:4]}) == 4


def test_a_loss_that_compares_the_images_of_a_batch_is_never_cut(make_tiny_unet, digits8, split_into):
    images, labels = digits8
    sizes = []

    def batch_loss(model, x0, *, cond=None, generator=None):
        sizes.append(len(x0))
        out = model(x0, torch.full((len(x0),), 5), cond).flatten(1)
        return (out - out.mean(0)).pow(2).mean()     # each image against the batch's mean
    split_into(2)
    train(make_tiny_unet(num_classes=10), images, batch_loss, config=quick_config(steps=2), labels=labels)
    assert sizes == [16, 16]
