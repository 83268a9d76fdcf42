"""The `diffusion-course` command end to end on real MNIST, with tiny budgets."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_course import checkpoints, cli, metrics
from diffusion_course.schedules import cosine_schedule


@pytest.fixture(scope="module")
def run_dir(data_root, tmp_path_factory):
    """A 3-step training run on real MNIST, made once through the CLI (in process)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    code = cli.main(["train", "--dataset", "mnist", "--out", str(out), "--steps", "3", "--base-channels", "8",
                     "--batch-size", "16"])
    assert code == 0
    return out


def sample_args(run_dir, out, *extra):
    return ["sample", "--checkpoint", str(run_dir), "--num", "6", "--sampler", "ddim", "--steps", "3",
            "--out", str(out), *extra]


def read_npz(path):
    with np.load(path) as f:
        return f["images"], f["labels"]


def test_console_script_help():
    script = Path(sys.executable).with_name("diffusion-course")
    command = [str(script)] if script.exists() else [shutil.which("diffusion-course") or "diffusion-course"]
    result = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for word in ("train", "sample", "evaluate"):
        assert word in result.stdout


def test_train_writes_a_checkpoint(run_dir, capsys):
    latest = checkpoints.latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step_00000003"
    loaded = checkpoints.load_checkpoint(run_dir)
    assert loaded.info["step"] == 3 and loaded.info["dataset"] == "mnist"
    config = loaded.model.config
    assert (config.in_channels, config.image_size, config.base_channels, config.num_classes) == (1, 28, 8, 10)
    assert loaded.schedule.name == "cosine" and loaded.schedule.num_steps == 1000
    recipe = loaded.info["train_config"]
    assert (loaded.info["min_snr_gamma"], recipe["lr"], recipe["warmup_steps"]) == (5.0, 4e-3, 100)   # the defaults
    assert recipe["hflip"] is False


def test_a_flow_matching_run_samples_with_euler_and_refuses_what_needs_a_schedule(data_root, tmp_path, capsys):
    """train --objective flow: no schedule in the checkpoint; sample defaults to Euler (guidance 3) and
    takes heun; the noise-prediction samplers and edit refuse it with a clear error."""
    out = tmp_path / "flow"
    assert cli.main(["train", "--dataset", "mnist", "--out", str(out), "--steps", "2", "--base-channels", "8",
                     "--batch-size", "16", "--objective", "flow"]) == 0
    loaded = checkpoints.load_checkpoint(out)
    assert loaded.schedule is None and loaded.info["objective"] == "flow" and "min_snr_gamma" not in loaded.info
    assert cli.main(["sample", "--checkpoint", str(out), "--num", "4", "--steps", "2", "--out", str(tmp_path / "e.npz")]) == 0
    assert read_npz(tmp_path / "e.npz")[0].shape == (4, 28, 28)     # (generate.Pipeline.sampling: euler)
    assert cli.main(["sample", "--checkpoint", str(out), "--num", "4", "--sampler", "heun", "--steps", "2",
                     "--out", str(tmp_path / "h.npz")]) == 0
    capsys.readouterr()
    assert cli.main(["sample", "--checkpoint", str(out), "--num", "4", "--sampler", "dpm", "--out", str(tmp_path / "d.npz")]) == 2
    assert "is sampled with ['euler', 'heun'], got 'dpm'" in capsys.readouterr().err
    assert cli.main(["edit", "--checkpoint", str(out), "--test-digit", "0", "--num", "2", "--out", str(tmp_path / "x.npz")]) == 2
    assert "pixel model with a noise schedule" in capsys.readouterr().err


def test_train_recipe_flags_reach_the_checkpoint(data_root, tmp_path, capsys):
    out = tmp_path / "plain"
    assert cli.main(["train", "--dataset", "mnist", "--out", str(out), "--steps", "1", "--base-channels", "8",
                     "--batch-size", "8", "--min-snr-gamma", "0", "--lr", "2e-3", "--warmup-steps", "200", "--hflip"]) == 0
    info = checkpoints.load_checkpoint(out).info
    recipe = info["train_config"]
    assert (info["min_snr_gamma"], recipe["lr"], recipe["warmup_steps"]) == (None, 2e-3, 200)   # 0 turns it off
    assert recipe["hflip"] is True


def test_train_rejects_a_gamma_that_is_not_a_number(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--min-snr-gamma", "five"]) == 2
    assert "argument --min-snr-gamma: must be a finite number in [0, inf), got 'five'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_into_an_existing_run_without_resume_fails(run_dir, capsys):
    code = cli.main(["train", "--dataset", "mnist", "--out", str(run_dir), "--steps", "4", "--base-channels", "8"])
    assert code == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert checkpoints.latest_checkpoint(run_dir).name == "step_00000003"


def test_sample_all_labels(run_dir, tmp_path, capsys):
    out = tmp_path / "X.npz"
    assert cli.main(sample_args(run_dir, out, "--labels", "all")) == 0
    assert "wrote 6 samples" in capsys.readouterr().out
    images, labels = read_npz(out)
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4, 5]
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.partial*"))


def test_sample_without_labels(run_dir, tmp_path):
    out = tmp_path / "none.npz"
    assert cli.main(sample_args(run_dir, out, "--labels", "none")) == 0
    images, labels = read_npz(out)
    assert images.shape == (6, 28, 28)
    assert labels.tolist() == [-1] * 6


def test_sample_listed_labels_and_seed(run_dir, tmp_path):
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    assert cli.main(sample_args(run_dir, first, "--labels", "3,7")) == 0
    assert cli.main(sample_args(run_dir, second, "--labels", "3,7", "--batch-size", "4")) == 0
    images, labels = read_npz(first)
    assert labels.tolist() == [3, 7, 3, 7, 3, 7]
    assert np.array_equal(images, read_npz(second)[0])      # same seed, other batch size: same images


def test_sample_with_a_negative_label(run_dir, tmp_path):
    steered = tmp_path / "steered.npz"
    assert cli.main(sample_args(run_dir, steered, "--labels", "3", "--negative", "1")) == 0
    assert read_npz(steered)[1].tolist() == [3] * 6


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/no_such_run"], "No checkpoint at"),
    (["--labels", "3,10"], r"--labels must lie in [0, 10)"),
    (["--labels", "three"], "comma-separated integers"),
    (["--out", "{tmp}/samples.png"], "must end in .npz"),
    (["--num", "0"], "argument --num: must be a whole number >= 1, got '0'"),
    (["--negative", "10"], "negative must be a class label in [0, 10)"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number"),
])
def test_sample_errors(run_dir, tmp_path, capsys, args, message):
    argv = sample_args(run_dir, tmp_path / "x.npz") + [a.format(tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert message in captured.err
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "samples.png").exists()


def test_train_without_a_budget_fails(tmp_path, capsys):
    assert cli.main(["train", "--dataset", "mnist", "--out", str(tmp_path / "run")]) == 2
    assert "Give a budget" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluate_prints_accuracy_and_frechet(run_dir, tmp_path, capsys):
    if not (metrics.CLASSIFIERS["mnist"].folder / "model.safetensors").is_file():
        pytest.skip("the classifier diffusion_course/pretrained/mnist_classifier does not exist yet")
    out = tmp_path / "e.npz"
    assert cli.main(sample_args(run_dir, out, "--labels", "all")) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "samples:                6" in printed
    assert "class accuracy:" in printed
    assert "Frechet distance:" in printed and "real-vs-real baseline:" in printed


def test_the_shipped_cifar10_model_samples_colour_photos_that_evaluate_scores(data_root, tmp_path, capsys):
    """Issue 14's command, small: `sample --checkpoint cifar10 --labels all` writes uint8 (N, 32, 32, 3) photos
    and their labels; `evaluate` picks the CIFAR-10 classifier by the shape and reports accuracy and distances."""
    out = tmp_path / "c.npz"
    assert cli.main(["sample", "--checkpoint", "cifar10", "--num", "10", "--labels", "all", "--guidance", "3",
                     "--steps", "4", "--out", str(out)]) == 0
    images, labels = read_npz(out)
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == list(range(10)) and images.std() > 10          # ten classes, not blank pictures
    capsys.readouterr()
    assert cli.main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "class accuracy:" in printed and "real-vs-real baseline:" in printed
    assert checkpoints.load_checkpoint("cifar10").info["train_config"]["hflip"] is True


def test_the_shipped_few_step_model_samples_with_its_own_defaults(data_root, tmp_path, capsys):
    """Issue 16's command: `sample --checkpoint mnist-fast --num N --labels all --steps K` uses the sampler and
    guidance it was distilled for (Euler, none); its teacher mnist-flow is sampled with Heun and guidance 2."""
    for name, steps in (("mnist-fast", "1"), ("mnist-flow", "2")):
        out = tmp_path / f"{name}.npz"
        assert cli.main(["sample", "--checkpoint", name, "--num", "20", "--labels", "all", "--steps", steps,
                         "--out", str(out)]) == 0
        images, labels = read_npz(out)
        assert images.shape == (20, 28, 28) and labels.tolist() == [i % 10 for i in range(20)]
        predicted = metrics.predict(torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1), "mnist")
        assert (predicted == torch.from_numpy(labels)).float().mean() >= 0.8      # digits of the asked-for class
    fast = checkpoints.load_checkpoint("mnist-fast").info
    assert fast["sampling"] == {"sampler": "euler", "steps": 2, "guidance": 1.0} and fast["distilled"] == "reflow"


def test_evaluate_rejects_a_file_that_is_not_samples(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    assert cli.main(["evaluate", str(bad)]) == 2
    assert "has no 'images' or 'labels' array" in capsys.readouterr().err


def test_parse_labels():
    from diffusion_course import data
    assert data.parse_labels("all", 12, 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert data.parse_labels("none", 4, 10) is None
    assert data.parse_labels("5", 3, 10).tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="unconditional"):
        data.parse_labels("all", 4, None)


def edit_args(run_dir, out, *extra):
    return ["edit", "--checkpoint", str(run_dir), "--test-digit", "7", "--num", "2", "--sampler", "ddim",
            "--steps", "3", "--out", str(out), *extra]


def test_edit_img2img_on_a_test_digit(run_dir, tmp_path, capsys):
    from diffusion_course import data
    out = tmp_path / "edit.npz"
    assert cli.main(edit_args(run_dir, out, "--strength", "0.3")) == 0
    assert "wrote the original and 2 edits" in capsys.readouterr().out
    images, labels = read_npz(out)
    assert images.shape == (3, 28, 28) and labels.tolist() == [-1, -1, -1]
    digit = data.to_image_range(data.load_dataset("mnist", train=False).images[7:8])[0, 0].numpy()
    assert np.array_equal(images[0], digit)                       # the original comes first
    assert out.with_suffix(".png").is_file()
    kept = tmp_path / "kept.npz"                                  # strength 0: the edits are the original
    assert cli.main(edit_args(run_dir, kept, "--strength", "0")) == 0
    kept_images, _ = read_npz(kept)
    assert np.array_equal(kept_images[1], digit) and np.array_equal(kept_images[2], digit)


def test_edit_inpaint_keeps_the_pixels_outside_the_mask(run_dir, tmp_path):
    out = tmp_path / "inpaint.npz"
    assert cli.main(edit_args(run_dir, out, "--mask", "right", "--label", "3")) == 0
    images, labels = read_npz(out)
    assert labels.tolist() == [-1, 3, 3]
    assert np.array_equal(images[1:, :, :14], np.broadcast_to(images[0, :, :14], (2, 28, 14)))
    assert not np.array_equal(images[1, :, 14:], images[0, :, 14:])


def test_edit_an_image_file(run_dir, tmp_path):
    from PIL import Image
    path = tmp_path / "digit.png"
    Image.fromarray((np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)).save(path)
    out = tmp_path / "file.npz"
    assert cli.main(["edit", "--checkpoint", str(run_dir), "--image", str(path), "--num", "1", "--steps", "2",
                     "--strength", "0.5", "--out", str(out)]) == 0
    assert read_npz(out)[0].shape == (2, 28, 28)


@pytest.mark.parametrize("args, message", [
    (["--strength", "1.5"], "argument --strength: must be a finite number in [0, 1]"),
    (["--strength", "0.5", "--mask", "left"], "not both"),
    (["--num", "0"], "argument --num: must be a whole number >= 1"),
    (["--label", "10"], "--label must lie in [0, 10)"),
    (["--out", "{tmp}/edit.png"], "must end in .npz"),
    (["--test-digit", "10000"], "--test-digit must lie in [0, 10000)"),
])
def test_edit_errors(run_dir, tmp_path, capsys, args, message):
    argv = edit_args(run_dir, tmp_path / "x.npz") + [a.format(tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert not (tmp_path / "x.npz").exists()


def test_edit_rejects_an_unreadable_image(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert cli.main(["edit", "--checkpoint", str(run_dir), "--image", str(bad), "--out", str(tmp_path / "x.npz")]) == 2
    assert "Could not read the image" in capsys.readouterr().err


# --- Text to image -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory):
    """A tiny latent text-to-image pipeline with random weights (code paths only, not quality):
    an autoencoder checkpoint and a TextUNet whose config.json names it, as the shipped one does."""
    from diffusion_course import autoencoder, captions, text
    folder = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    ae = autoencoder.Autoencoder(autoencoder.AutoencoderConfig(base_channels=4, channel_mults=(1, 2, 2)))
    checkpoints.save_checkpoint(folder / "ae", ae)
    words = text.TextEncoderConfig(words=captions.VOCABULARY, dim=16, depth=1, heads=2)
    model = text.TextUNet(text.TextUNetConfig(base_channels=8, text=words, attention_heads=2))
    info = {"autoencoder": str(folder / "ae"), "latent_shape": [4, 8, 16]}
    return checkpoints.save_checkpoint(folder / "unet", model, cosine_schedule(100), info=info)


def test_sample_from_a_prompt_writes_colour_canvases_and_the_prompts(text_pipeline, tmp_path, capsys):
    out = tmp_path / "p.npz"
    argv = ["sample", "--checkpoint", str(text_pipeline), "--prompt", "a red 3 on the left", "--prompt",
            "a blue seven", "--negative-prompt", "green", "--num", "3", "--steps", "2", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    with np.load(out) as f:
        assert f["images"].shape == (3, 32, 64, 3) and f["images"].dtype == np.uint8
        assert f["prompts"].tolist() == ["a red 3 on the left", "a blue seven", "a red 3 on the left"]
        assert f["labels"].tolist() == [-1, -1, -1]


@pytest.mark.parametrize("args, message", [
    ([], "give --prompt"),
    (["--prompt", "a purple 3"], "purple"),
    (["--prompt", "a red 3", "--labels", "3"], "not --labels"),
])
def test_prompt_errors(text_pipeline, tmp_path, capsys, args, message):
    argv = ["sample", "--checkpoint", str(text_pipeline), "--num", "2", "--steps", "2",
            "--out", str(tmp_path / "x.npz"), *args]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_a_label_model_refuses_prompts(run_dir, tmp_path, capsys):
    assert cli.main(sample_args(run_dir, tmp_path / "x.npz", "--prompt", "a red 3")) == 2
    assert "not text-to-image" in capsys.readouterr().err


def test_evaluate_scores_prompt_adherence_of_text_samples(data_root, tmp_path, capsys):
    """Real canvases saved with their own captions as prompts score near the classifier's ceiling;
    the same canvases with each other's prompts score far lower."""
    from diffusion_course import captions, data
    canvases = captions.build_prompted_digits(40, train=False, seed=3)
    prompts = [captions.full_caption(scene) for scene in canvases.scenes]
    data.save_samples(tmp_path / "own.npz", canvases.images, None, prompts=prompts)
    data.save_samples(tmp_path / "shuffled.npz", canvases.images, None, prompts=prompts[1:] + prompts[:1])
    shares = []
    for name in ("own", "shuffled"):
        assert cli.main(["evaluate", str(tmp_path / f"{name}.npz")]) == 0
        shares.append(float(capsys.readouterr().out.split("everything named right ")[1].rstrip("%\n")))
    assert shares[0] >= 80 and shares[1] <= 20, shares


@pytest.mark.parametrize("command", ["sample", "edit"])
@pytest.mark.parametrize("name", ["prompted-digits-autoencoder", "prompted-digits-clip"])
def test_parts_that_make_no_images_are_refused_clearly(name, command, tmp_path, capsys):
    argv = [command, "--checkpoint", name, "--num", "2", "--out", str(tmp_path / "x.npz")]
    assert cli.main(argv + (["--test-digit", "0"] if command == "edit" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ("not a diffusion model" in err or "edit takes" in err), err
