"""The `diffusion-course` command: train, sample, evaluate, and train the metrics classifier.

    diffusion-course train --dataset mnist --out runs/mnist --minutes 5
    diffusion-course sample --checkpoint mnist --num 100 --labels all --guidance 3 --out s.npz
    diffusion-course evaluate s.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoints, data, editing, metrics, sampling, schedules, training
from .generate import generate
from .guidance import guided
from .unet import UNet, UNetConfig


def image_shape(model) -> tuple:
    """(C, H, W) of the images a checkpoint's U-Net makes."""
    return (model.config.in_channels, model.config.image_size, model.config.image_size)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-course", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a diffusion model from scratch (or resume)")
    train.add_argument("--dataset", choices=sorted(data.DATASETS), default="mnist")
    train.add_argument("--out", required=True, help="run folder for checkpoints")
    train.add_argument("--minutes", type=float, help="wall-time budget in minutes (total, across resumes)")
    train.add_argument("--steps", type=int, help="step budget (total, across resumes)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.add_argument("--unconditional", action="store_true", help="train without class labels")
    train.add_argument("--base-channels", type=int, default=UNetConfig.base_channels)
    train.add_argument("--schedule", choices=sorted(schedules.SCHEDULES), default="cosine")
    train.add_argument("--batch-size", type=int, default=training.TrainConfig.batch_size)
    train.add_argument("--lr", type=float, default=training.TrainConfig.lr)
    train.add_argument("--warmup-steps", type=int, default=training.TrainConfig.warmup_steps)
    train.add_argument("--min-snr-gamma", type=gamma_or_off, default=training.TrainConfig.min_snr_gamma,
                       help="weight the loss by min(SNR, gamma) / SNR (default %(default)s; 0 turns it off)")
    train.add_argument("--checkpoint-every", type=int, default=500)
    train.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    train.set_defaults(run=run_train)

    sample = commands.add_parser("sample", help="generate images into an .npz file and a PNG grid")
    sample.add_argument("--checkpoint", default="mnist", help="'mnist' (shipped) or a checkpoint/run folder")
    sample.add_argument("--num", type=int, default=100)
    sample.add_argument("--labels", default="all", help="'all' (spread over the classes), 'none', or e.g. 3,7")
    sample.add_argument("--guidance", type=float, default=3.0, help="guidance scale w (1: none)")
    sample.add_argument("--negative", type=int, help="a class to steer away from (negative condition)")
    sample.add_argument("--sampler", choices=sorted(sampling.SAMPLERS), default="dpm")
    sample.add_argument("--steps", type=int, default=20, help="model calls (ignored by ddpm, which takes all)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=100,
                        help="samples drawn together (100 was the fastest per sample on a 2-core CPU: benchmarks/sample_speed.py)")
    sample.add_argument("--device", default="cpu")
    sample.add_argument("--out", default="samples.npz")
    sample.set_defaults(run=run_sample)

    edit = commands.add_parser("edit", help="image-to-image (--strength) or inpainting (--mask) of an image")
    edit.add_argument("--checkpoint", default="mnist")
    source = edit.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="a PNG/JPEG image (resized to the model's size; grey for MNIST)")
    source.add_argument("--test-digit", type=int, help="index of an MNIST test-set digit")
    edit.add_argument("--strength", type=float, help="img2img: 0 keeps the image, 1 ignores it (default 0.6)")
    edit.add_argument("--mask", choices=sorted(editing.MASKS), help="inpaint this region (regenerate it) instead of img2img")
    edit.add_argument("--label", type=int, help="class to steer towards (default: unconditional)")
    edit.add_argument("--num", type=int, default=8, help="how many variations")
    edit.add_argument("--guidance", type=float, default=3.0)
    edit.add_argument("--sampler", choices=sorted(sampling.SAMPLERS), default="ddim")
    edit.add_argument("--steps", type=int, default=50)
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--out", default="edited.npz")
    edit.set_defaults(run=run_edit)

    evaluate = commands.add_parser("evaluate", help="accuracy and Frechet distance of an .npz of samples")
    evaluate.add_argument("file", help="an .npz written by `sample`")
    evaluate.set_defaults(run=run_evaluate)

    classifier = commands.add_parser("train-classifier", help="train the MNIST classifier used by evaluate")
    classifier.add_argument("--out", default=str(metrics.CLASSIFIER_PATH))
    classifier.add_argument("--epochs", type=int, default=2)
    classifier.add_argument("--seed", type=int, default=0)
    classifier.set_defaults(run=run_train_classifier)
    return parser


def gamma_or_off(text: str) -> float | None:
    """--min-snr-gamma's value: a number, with 0 meaning "no Min-SNR weighting" (None)."""
    try:
        return float(text) or None
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number such as 5 (0 turns the weighting off), got {text!r}") from None


def run_train(args) -> int:
    if args.minutes is None and args.steps is None:
        raise ValueError("Give a budget: --minutes M, --steps N, or both.")
    if not args.resume and checkpoints.latest_checkpoint(args.out) is not None:
        raise FileExistsError(f"{args.out} already holds checkpoints of a training run. Add --resume to "
                              "continue it, or choose another --out folder.")
    dataset = data.load_dataset(args.dataset)
    num_classes = None if args.unconditional else len(data.CLASS_NAMES[args.dataset])
    config = UNetConfig(in_channels=dataset.images.shape[1], image_size=dataset.images.shape[2],
                        base_channels=args.base_channels, num_classes=num_classes)
    torch.manual_seed(args.seed)
    model = UNet(config).to(args.device)
    schedule = schedules.SCHEDULES[args.schedule]()
    train_config = training.TrainConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
                                        lr=args.lr, warmup_steps=args.warmup_steps,
                                        min_snr_gamma=args.min_snr_gamma,
                                        checkpoint_every=args.checkpoint_every,
                                        precision=args.precision, seed=args.seed)
    labels = None if num_classes is None else dataset.labels.to(args.device)
    result = training.train(model, dataset.images.to(args.device), schedule, train_config, labels,
                            out_dir=args.out, resume=args.resume, dataset=args.dataset)
    print(f"trained {result.step} steps in {result.seconds / 60:.1f} minutes; "
          f"latest checkpoint: {checkpoints.latest_checkpoint(args.out)}")
    return 0


def parse_labels(text: str, num: int, num_classes: int | None) -> torch.Tensor | None:
    """'all' -> num labels spread evenly over the classes; 'none' -> None; '3,7' -> cycled."""
    if text == "none":
        return None
    if num_classes is None:
        raise ValueError("This checkpoint is unconditional: use --labels none.")
    if text == "all":
        return torch.arange(num) % num_classes
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--labels must be 'all', 'none' or comma-separated integers, got {text!r}.") from None
    if any(not 0 <= v < num_classes for v in values):
        raise ValueError(f"--labels must lie in [0, {num_classes}), got {text!r}.")
    return torch.tensor(values)[torch.arange(num) % len(values)]


def run_sample(args) -> int:
    if Path(args.out).suffix != ".npz":
        raise ValueError(f"--out must end in .npz, got {args.out}.")
    checkpoint = checkpoints.load_checkpoint(args.checkpoint, args.device)
    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}.")
    labels = parse_labels(args.labels, args.num, checkpoint.model.null_class)
    start = time.perf_counter()
    model = checkpoint.model
    images = generate(model, checkpoint.schedule, num=args.num, shape=image_shape(model), cond=labels,
                      guidance_scale=args.guidance, negative=args.negative, sampler=args.sampler,
                      sampling_steps=args.steps, seed=args.seed, batch_size=args.batch_size, device=args.device)
    seconds = time.perf_counter() - start
    save_samples(args.out, images, labels)
    print(f"wrote {args.num} samples to {args.out} (and {Path(args.out).with_suffix('.png')}) "
          f"in {seconds:.1f} s")
    return 0


def save_samples(path: str | Path, images: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Write images (N, C, H, W in [-1, 1]) as uint8 to an .npz, with a PNG grid beside it."""
    import torchvision.utils

    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"--out must end in .npz, got {path}.")
    pixels = data.to_image_range(images).permute(0, 2, 3, 1).cpu().numpy()
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    label_array = np.full(len(images), -1, dtype=np.int64) if labels is None else labels.cpu().numpy().astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.npz")
    np.savez_compressed(tmp, images=pixels, labels=label_array)
    tmp.replace(path)
    nrow = 10 if labels is not None else int(len(images) ** 0.5) or 1
    torchvision.utils.save_image((images[:200] + 1) / 2, path.with_suffix(".png"), nrow=nrow, padding=1)


def load_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an .npz written by `sample`: (N, C, H, W) floats in [-1, 1] and (N,) labels."""
    try:
        with np.load(path) as f:
            pixels, labels = f["images"], f["labels"]
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path} is not a samples file with 'images' and 'labels' arrays ({error}).") from None
    images = torch.from_numpy(pixels)
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return data.to_model_range(images), torch.from_numpy(labels)


def load_image(path: str, channels: int, size: int) -> torch.Tensor:
    """Read an image file as a (1, channels, size, size) tensor in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path).convert("L" if channels == 1 else "RGB").resize((size, size))
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"Could not read the image {path!r} ({error}).") from None
    pixels = torch.from_numpy(np.array(image)).reshape(size, size, channels).permute(2, 0, 1)
    return data.to_model_range(pixels)[None]


def run_edit(args) -> int:
    if Path(args.out).suffix != ".npz":
        raise ValueError(f"--out must end in .npz, got {args.out}.")
    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}.")
    if args.mask is not None and args.strength is not None:
        raise ValueError("Give --strength (image-to-image) or --mask (inpainting), not both.")
    strength = 0.6 if args.strength is None else args.strength
    if not 0 <= strength <= 1:
        raise ValueError(f"--strength must lie in [0, 1], got {strength}.")
    checkpoint = checkpoints.load_checkpoint(args.checkpoint)
    model, config = checkpoint.model, checkpoint.model.config
    if args.label is not None and model.null_class is None:
        raise ValueError("This checkpoint is unconditional: leave out --label.")
    if args.label is not None and not 0 <= args.label < model.null_class:
        raise ValueError(f"--label must lie in [0, {model.null_class}), got {args.label}.")
    if args.image is not None:
        image = load_image(args.image, config.in_channels, config.image_size)
    else:
        test = data.load_dataset(checkpoint.info.get("dataset") or "mnist", train=False)
        if not 0 <= args.test_digit < len(test.images):
            raise ValueError(f"--test-digit must lie in [0, {len(test.images)}), got {args.test_digit}.")
        image = test.images[args.test_digit:args.test_digit + 1]
    images = image.expand(args.num, -1, -1, -1).contiguous()
    labels = None if args.label is None else torch.full((args.num,), args.label, dtype=torch.long)
    if labels is not None:
        model = guided(model, args.guidance)
    options = dict(sampler=args.sampler, sampling_steps=args.steps, cond=labels,
                   generator=torch.Generator().manual_seed(args.seed))
    if args.mask is not None:
        mask = editing.make_mask(args.mask, config.image_size)
        out = editing.inpaint(model, images, mask, checkpoint.schedule, **options)
    else:
        out = editing.img2img(model, images, checkpoint.schedule, strength=strength, **options)
    save_samples(args.out, torch.cat([image, out.clamp(-1, 1)]),
                 torch.cat([torch.tensor([-1]), labels if labels is not None else torch.full((args.num,), -1)]))
    print(f"wrote the original and {args.num} edits to {args.out} (and {Path(args.out).with_suffix('.png')})")
    return 0


def run_evaluate(args) -> int:
    images, labels = load_samples(args.file)
    report = metrics.evaluate_samples(images, labels)
    print(metrics.format_report(report))
    return 0


def run_train_classifier(args) -> int:
    accuracy = metrics.train_classifier(args.out, epochs=args.epochs, seed=args.seed)
    print(f"saved the classifier to {args.out}; test accuracy {accuracy:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
