"""The `diffusion-course` command (ring 3): argument parsing and printing only.

    diffusion-course train --dataset mnist --out runs/mnist --minutes 5
    diffusion-course sample --checkpoint mnist --num 100 --labels all --guidance 3 --out s.npz
    diffusion-course evaluate s.npz

Every expected failure (a bad value, a missing or existing file, a full disk, a missing GPU)
ends in a one-line `error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch

from . import checkpoints, data, editing, metrics, runs, sampling, schedules, training
from .generate import generate_batches, image_shape
from .guidance import guided
from .threads import use_best_threads
from .unet import UNet, UNetConfig

EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, KeyError, TypeError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_device(args)
        use_best_threads(verbose=False)
        return args.run(args)
    except KeyboardInterrupt as error:
        print(f"interrupted{_notes(error)}", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}{_notes(error)}",
              file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-course", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_train(commands.add_parser("train", help="train a diffusion model from scratch (or resume)"))
    _add_sample(commands.add_parser("sample", help="generate images into an .npz file and a PNG grid"))
    _add_edit(commands.add_parser("edit", help="image-to-image (--strength) or inpainting (--mask) of an image"))
    evaluate = commands.add_parser("evaluate", help="class accuracy, Frechet and kernel distance of an .npz of samples")
    evaluate.add_argument("file", help="an .npz written by `sample`")
    evaluate.add_argument("--dataset", choices=sorted(metrics.CLASSIFIERS), help="default: the one its shape fits")
    evaluate.set_defaults(run=run_evaluate, device="cpu")
    classifier = commands.add_parser("train-classifier", help="train the classifier that evaluate uses")
    classifier.add_argument("--dataset", choices=sorted(metrics.CLASSIFIERS), default="mnist")
    classifier.add_argument("--out", help="default: a folder in your user cache (never the shipped classifier)")
    classifier.add_argument("--epochs", type=whole(1), help="default: the dataset's usual count")
    classifier.add_argument("--seed", type=whole(0), default=0)
    classifier.add_argument("--overwrite", action="store_true", help="replace existing weights at --out")
    classifier.set_defaults(run=run_train_classifier, device="cpu")
    return parser


def _add_train(p) -> None:
    p.add_argument("--dataset", choices=sorted(data.DATASETS), default="mnist")
    p.add_argument("--out", required=True, help="run folder for checkpoints")
    p.add_argument("--minutes", type=number(0, exclusive=True), help="wall-time budget (total, across resumes)")
    p.add_argument("--steps", type=whole(1), help="step budget (total, across resumes)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--unconditional", action="store_true", help="train without class labels")
    p.add_argument("--base-channels", type=whole(1), default=UNetConfig.base_channels)
    p.add_argument("--schedule", choices=sorted(schedules.SCHEDULES), default="cosine")
    p.add_argument("--batch-size", type=whole(1), default=runs.TrainConfig.batch_size)
    p.add_argument("--lr", type=number(0, exclusive=True), default=runs.TrainConfig.lr)
    p.add_argument("--warmup-steps", type=whole(0), default=runs.TrainConfig.warmup_steps)
    p.add_argument("--min-snr-gamma", type=gamma_or_off, default=5.0,
                   help="weight the loss by min(SNR, gamma) / SNR (default %(default)s; 0 turns it off)")
    p.add_argument("--checkpoint-every", type=whole(0), default=500, help="steps between checkpoints (0: by time only)")
    p.add_argument("--checkpoint-minutes", type=number(0, exclusive=True), default=runs.TrainConfig.checkpoint_minutes,
                   help="also save when this much training time passed since the last save")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--seed", type=whole(0), default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    p.set_defaults(run=run_train)


def _add_sample(p) -> None:
    p.add_argument("--checkpoint", default="mnist", help="'mnist' (shipped) or a checkpoint/run folder")
    p.add_argument("--num", type=whole(1), default=100)
    p.add_argument("--labels", default="all", help="'all' (spread over the classes), 'none', or e.g. 3,7")
    p.add_argument("--guidance", type=number(), default=3.0, help="guidance scale w (1: none)")
    p.add_argument("--negative", type=whole(0), help="a class to steer away from (negative condition)")
    p.add_argument("--sampler", choices=sorted(sampling.SAMPLERS), default="dpm")
    p.add_argument("--steps", type=whole(1), default=20, help="model calls (ignored by ddpm, which takes all)")
    p.add_argument("--seed", type=whole(0), default=0)
    p.add_argument("--batch-size", type=whole(1), default=100,
                   help="samples drawn together (benchmarks/sample_speed.py measures the best)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="samples.npz")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its PNG)")
    p.set_defaults(run=run_sample)


def _add_edit(p) -> None:
    p.add_argument("--checkpoint", default="mnist")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="a PNG/JPEG image (resized to the model's size; grey for MNIST)")
    source.add_argument("--test-digit", "--test-image", dest="test_image", type=whole(0),
                        help="index of an image of the checkpoint's test set")
    p.add_argument("--strength", type=number(0, 1), help="img2img: 0 keeps the image, 1 ignores it (default 0.6)")
    p.add_argument("--mask", choices=sorted(editing.MASKS), help="inpaint this region (regenerate it) instead of img2img")
    p.add_argument("--label", type=whole(0), help="class to steer towards (default: unconditional)")
    p.add_argument("--num", type=whole(1), default=8, help="how many variations")
    p.add_argument("--guidance", type=number(), default=3.0)
    p.add_argument("--sampler", choices=sorted(sampling.SAMPLERS), default="ddim")
    p.add_argument("--steps", type=whole(1), default=50)
    p.add_argument("--seed", type=whole(0), default=0)
    p.add_argument("--out", default="edited.npz")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run_edit, device="cpu")


def whole(low: int):
    """An argparse type: a whole number >= low, with a message that says what was given."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {value}")
        return value
    return parse


def number(low: float = -math.inf, high: float = math.inf, exclusive: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] with exclusive)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value > high or value < low or (exclusive and value == low):
            bounds = f"{'>' if exclusive else '>='} {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number{'' if low == -math.inf else ' ' + bounds}, got {text!r}")
        return value
    return parse


def gamma_or_off(text: str) -> float | None:
    """--min-snr-gamma's value: a positive number, with 0 meaning "no Min-SNR weighting" (None)."""
    value = number(0)(text) if text.strip() not in ("0", "0.0") else 0.0
    return value or None


def run_train(args) -> int:
    if args.minutes is None and args.steps is None:
        raise ValueError("Give a budget: --minutes M, --steps N, or both.")
    dataset = data.load_dataset(args.dataset)
    num_classes = None if args.unconditional else data.dataset_info(args.dataset).num_classes
    config = UNetConfig(in_channels=dataset.images.shape[1], image_size=dataset.images.shape[2],
                        base_channels=args.base_channels, num_classes=num_classes)
    torch.manual_seed(args.seed)
    model = UNet(config).to(args.device)
    schedule = schedules.SCHEDULES[args.schedule]()
    loss_fn = functools.partial(training.diffusion_loss, schedule=schedule, min_snr_gamma=args.min_snr_gamma)
    train_config = runs.TrainConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                                    warmup_steps=args.warmup_steps, checkpoint_every=args.checkpoint_every,
                                    checkpoint_minutes=args.checkpoint_minutes, precision=args.precision, seed=args.seed)
    info = {"dataset": args.dataset, "schedule": schedule.to_config(), "min_snr_gamma": args.min_snr_gamma}
    result = runs.train(model, dataset.images.to(args.device), loss_fn, config=train_config,
                        labels=None if num_classes is None else dataset.labels.to(args.device),
                        out_dir=args.out, resume=args.resume, info=info)
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
    checkpoint = checkpoints.load_checkpoint(args.checkpoint, args.device)
    model, shape = checkpoint.model, image_shape(checkpoint.model)
    labels = parse_labels(args.labels, args.num, model.null_class)
    start = time.perf_counter()
    with data.SampleWriter(args.out, args.num, shape, overwrite=args.overwrite) as writer:
        for first, images in generate_batches(model, checkpoint.schedule, num=args.num, shape=shape, cond=labels,
                                              guidance_scale=args.guidance, negative=args.negative,
                                              sampler=args.sampler, sampling_steps=args.steps, seed=args.seed,
                                              batch_size=args.batch_size, device=args.device, progress=args.num > 100):
            writer.write(images, None if labels is None else labels[first:first + len(images)])
    print(f"wrote {args.num} samples to {writer.path} (and {writer.path.with_suffix('.png')}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def run_edit(args) -> int:
    if args.mask is not None and args.strength is not None:
        raise ValueError("Give --strength (image-to-image) or --mask (inpainting), not both.")
    checkpoint = checkpoints.load_checkpoint(args.checkpoint)
    model, (channels, size, _) = checkpoint.model, image_shape(checkpoint.model)
    if args.label is not None and model.null_class is None:
        raise ValueError("This checkpoint is unconditional: leave out --label.")
    if args.label is not None and args.label >= model.null_class:
        raise ValueError(f"--label must lie in [0, {model.null_class}), got {args.label}.")
    image = _edit_source(args, checkpoint, channels, size)
    images = image.expand(args.num, -1, -1, -1).contiguous()
    labels = None if args.label is None else torch.full((args.num,), args.label, dtype=torch.long)
    options = dict(sampler=args.sampler, sampling_steps=args.steps, cond=labels,
                   generator=torch.Generator().manual_seed(args.seed))
    model = model if labels is None else guided(model, args.guidance)
    if args.mask is not None:
        out = editing.inpaint(model, images, editing.make_mask(args.mask, size), checkpoint.schedule, **options)
    else:
        out = editing.img2img(model, images, checkpoint.schedule, strength=args.strength or 0.6, **options)
    shown = torch.full((args.num + 1,), -1) if labels is None else torch.cat([torch.tensor([-1]), labels])
    path = data.save_samples(args.out, torch.cat([image, out.clamp(-1, 1)]), shown, overwrite=args.overwrite)
    print(f"wrote the original and {args.num} edits to {path} (and {path.with_suffix('.png')})")
    return 0


def _edit_source(args, checkpoint, channels: int, size: int) -> torch.Tensor:
    data.check_free(args.out, args.overwrite)            # before any work: never overwrite without asking
    if args.image is not None:
        return data.load_image(args.image, channels, size)
    test = data.load_dataset(checkpoint.info.get("dataset") or "mnist", train=False)
    if args.test_image >= len(test.images):
        raise ValueError(f"--test-digit must lie in [0, {len(test.images)}), got {args.test_image}.")
    return test.images[args.test_image:args.test_image + 1]


def run_evaluate(args) -> int:
    samples = data.load_samples(args.file)
    fits = [name for name in sorted(metrics.CLASSIFIERS) if data.dataset_info(name).shape == samples.images.shape[1:]]
    dataset = args.dataset or (fits[0] if fits else "mnist")     # no fit: evaluate's error names the shape
    report = metrics.evaluate_samples(samples.images, samples.labels, dataset=dataset)
    print(metrics.format_report(report))
    return 0


def run_train_classifier(args) -> int:
    out = args.out or metrics.user_classifier_dir(args.dataset)
    accuracy = metrics.train_classifier(args.dataset, out, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite)
    print(f"saved the {args.dataset} classifier to {out}; test accuracy {accuracy:.2%}")
    return 0


def _check_device(args) -> None:
    device = torch.device(args.device)               # a malformed name raises RuntimeError: exit 2
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is available here (use --device cpu).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {args.device}: Apple's MPS is not available here (use --device cpu).")


def _notes(error: BaseException) -> str:
    return "".join(f"\n{note}" for note in getattr(error, "__notes__", []))


if __name__ == "__main__":
    sys.exit(main())
