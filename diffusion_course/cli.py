"""The `diffusion-course` command (ring 3): argument parsing and printing only. Every expected
failure (a bad value, a missing or existing file, a full disk, a missing GPU) ends in a one-line
`error: ...` and exit status 2, never a traceback.

    diffusion-course train --dataset mnist --out runs/mnist --minutes 5
    diffusion-course sample --checkpoint mnist --num 100 --labels all --guidance 3 --out s.npz
    diffusion-course sample --checkpoint prompted-digits --prompt "a red 3 on the left" --out p.npz
    diffusion-course evaluate s.npz
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from . import captions, checkpoints, data, editing, flow, metrics, runs, sampling, schedules
from .generate import DEFAULT_SAMPLING, generate_to_file, image_shape, load_pipeline, prompt_ids
from .guidance import guided
from .threads import use_best_threads
from .unet import UNet, UNetConfig

class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises ValueError: main prints it as one line like any other error."""

    def error(self, message: str):
        raise ValueError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        runs.check_device(args.device)
        use_best_threads(verbose=False)
        return args.run(args)
    except KeyboardInterrupt as error:                  # after saving: runs.train and the sample writer keep the work
        print("\n".join(["interrupted", *getattr(error, "__notes__", [])]), file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError, KeyError, TypeError, RuntimeError) as error:
        message = (str(error) or type(error).__name__).splitlines()[0]
        print("\n".join([f"error: {message}", *getattr(error, "__notes__", [])]), file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion-course", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_train(commands.add_parser("train", help="train a diffusion model from scratch (or resume)"))
    _add_sample(commands.add_parser("sample", help="generate images into an .npz file and a PNG grid"))
    _add_edit(commands.add_parser("edit", help="image-to-image (--strength) or inpainting (--mask) of an image"))
    evaluate = commands.add_parser("evaluate", help="class accuracy, Frechet and kernel distance (or prompt adherence) of samples")
    evaluate.add_argument("file", help="an .npz written by `sample`")
    evaluate.add_argument("--dataset", choices=list(metrics.CLASSIFIERS), help="default: the first whose shape fits")
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
    p.add_argument("--objective", choices=runs.OBJECTIVES, default="eps", help="eps: noise prediction; flow: flow matching")
    p.add_argument("--schedule", choices=sorted(schedules.SCHEDULES), default="cosine", help="eps only")
    p.add_argument("--batch-size", type=whole(1), default=runs.TrainConfig.batch_size)
    p.add_argument("--lr", type=number(0, exclusive=True), default=runs.TrainConfig.lr)
    p.add_argument("--warmup-steps", type=whole(0), default=runs.TrainConfig.warmup_steps)
    p.add_argument("--min-snr-gamma", type=gamma_or_off, default=5.0, help="Min-SNR loss weighting; 0: off")
    p.add_argument("--hflip", action="store_true", help="flip each image left-right at random (photos, not digits)")
    p.add_argument("--checkpoint-every", type=whole(0), default=500, help="steps between checkpoints (0: by time only)")
    p.add_argument("--checkpoint-minutes", type=number(0, exclusive=True), default=1.0, help="and after this much time")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--seed", type=whole(0), default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    p.set_defaults(run=run_train)


def _add_generation(p, *, num: int, sampler: str | None, steps: int | None, out: str) -> None:
    """The options `sample` and `edit` share (None: the checkpoint's own, generate.Pipeline.sampling)."""
    p.add_argument("--checkpoint", default="mnist", help="'mnist', 'mnist-fast', 'cifar10' (shipped) or a checkpoint/run folder")
    p.add_argument("--num", type=whole(1), default=num, help="how many images")
    p.add_argument("--guidance", type=number(), help="guidance scale w (1: none; default: the checkpoint's, else 3)")
    p.add_argument("--sampler", choices=[*sampling.SAMPLERS, *flow.SAMPLERS], default=sampler, help="euler, heun: flow models")
    p.add_argument("--steps", type=whole(1), default=steps, help="sampler steps (ignored by ddpm, which takes all)")
    p.add_argument("--seed", type=whole(0), default=0)
    p.add_argument("--out", default=out)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its PNG)")


def _add_sample(p) -> None:
    _add_generation(p, num=100, sampler=None, steps=None, out="samples.npz")
    p.add_argument("--labels", help="'all' (spread over the classes; the default), 'none', or e.g. 3,7")
    p.add_argument("--negative", type=whole(0), help="a class to steer away from (negative condition)")
    p.add_argument("--prompt", action="append", help="text-to-image checkpoints: what to draw (repeat for several)")
    p.add_argument("--negative-prompt", help="text-to-image checkpoints: what to steer away from")
    p.add_argument("--batch-size", type=whole(1), default=100, help="samples drawn together")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=run_sample)


def _add_edit(p) -> None:
    _add_generation(p, num=8, sampler="ddim", steps=50, out="edited.npz")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="a PNG/JPEG image (resized to the model's size; grey for MNIST)")
    source.add_argument("--test-digit", "--test-image", dest="test_image", type=whole(0), help="a test-set image's index")
    p.add_argument("--strength", type=number(0, 1), help="img2img: 0 keeps the image, 1 ignores it (default 0.6)")
    p.add_argument("--mask", choices=sorted(editing.MASKS), help="inpaint this region (regenerate it) instead of img2img")
    p.add_argument("--label", type=whole(0), help="class to steer towards (default: unconditional)")
    p.set_defaults(run=run_edit, device="cpu")


def whole(low: int):
    """An argparse type: a whole number >= low, with a message that says what was given."""
    def parse(text: str) -> int:
        if not text.strip().lstrip("+-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}")
        return int(text)
    return parse


def number(low: float = -math.inf, high: float = math.inf, exclusive: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] with exclusive)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high or not math.isfinite(value) or (exclusive and value == low):
            where = f"{'(' if exclusive else '['}{low:g}, {high:g}]".replace("inf]", "inf)")
            raise argparse.ArgumentTypeError(f"must be a finite number in {where}, got {text!r}")
        return value
    return parse


def gamma_or_off(text: str) -> float | None:
    """--min-snr-gamma's value: a positive number, with 0 meaning "no Min-SNR weighting" (None)."""
    return number(0)(text) or None


def run_train(args) -> int:
    options = "steps minutes batch_size lr warmup_steps checkpoint_every checkpoint_minutes precision seed hflip"
    train_config = runs.TrainConfig(**{name: getattr(args, name) for name in options.split()})
    dataset = data.load_dataset(args.dataset)           # the config above is checked before this slow load
    num_classes = None if args.unconditional else data.dataset_info(args.dataset).num_classes
    torch.manual_seed(args.seed)
    device = runs.process_device(args.device)             # under torchrun: this process's own GPU
    model = UNet(UNetConfig(*dataset.images.shape[1:3], args.base_channels, num_classes=num_classes)).to(device)
    result = runs.train_diffusion(model, dataset, schedules.SCHEDULES[args.schedule](), min_snr_gamma=args.min_snr_gamma,
                                  conditional=num_classes is not None, device=device, config=train_config,
                                  out_dir=args.out, resume=args.resume, objective=args.objective)
    if runs.is_main_process():                            # under torchrun, rank 0 speaks for all
        print(f"trained {result.step} steps in {result.seconds / 60:.1f} minutes; "
              f"latest checkpoint: {checkpoints.latest_checkpoint(args.out)}")
    return 0


def run_sample(args) -> int:
    pipeline = load_pipeline(args.checkpoint, args.device)
    cond, negative, prompts = _conditions(args, pipeline.model)
    how = {k: pipeline.sampling[k] if getattr(args, k) is None else getattr(args, k) for k in ("sampler", "steps", "guidance")}
    start = time.perf_counter()
    path = generate_to_file(args.out, pipeline.model, pipeline.schedule, num=args.num, shape=pipeline.shape, cond=cond,
                            overwrite=args.overwrite, guidance_scale=how["guidance"], negative=negative, prompts=prompts,
                            sampler=how["sampler"], sampling_steps=how["steps"], seed=args.seed, decode=pipeline.decode,
                            images_shape=pipeline.images_shape, clip_x0=None if pipeline.decode else 1.0,
                            batch_size=args.batch_size, device=args.device, progress=args.num > 100)
    print(f"wrote {args.num} samples of {pipeline.path} to {path} (and its PNG) in {time.perf_counter() - start:.1f} s")
    return 0


def _conditions(args, model) -> tuple:
    """(cond, negative, prompts) for `sample`: token ids of --prompt for a text model, else --labels."""
    if getattr(model, "tokenizer", None) is None:
        if args.prompt or args.negative_prompt is not None:
            raise ValueError("This checkpoint is not text-to-image: use --labels (and --negative), not --prompt.")
        return data.parse_labels(args.labels or "all", args.num, model.null_class), args.negative, None
    if args.labels is not None or args.negative is not None or not args.prompt:
        raise ValueError('This checkpoint draws from text: give --prompt "..." (and --negative-prompt), not --labels.')
    negative = None if args.negative_prompt is None else model.tokenizer.encode([args.negative_prompt])
    return prompt_ids(model, args.prompt, args.num), negative, [args.prompt[i % len(args.prompt)] for i in range(args.num)]


def run_edit(args) -> int:
    if args.mask is not None and args.strength is not None:
        raise ValueError("Give --strength (image-to-image) or --mask (inpainting), not both.")
    checkpoint = checkpoints.load_checkpoint(args.checkpoint)
    if not isinstance(checkpoint.model, UNet) or hasattr(checkpoint.model, "tokenizer") or checkpoint.schedule is None:
        raise ValueError("edit takes a class-conditional pixel model with a noise schedule, such as 'mnist' (text-to-image editing: lesson 09).")
    model, (channels, size, _) = checkpoint.model, image_shape(checkpoint.model)
    labels = data.parse_labels("none" if args.label is None else str(args.label), args.num, model.null_class, "--label")
    data.check_free(args.out, args.overwrite)            # before any work: never overwrite without asking
    image = data.load_image(args.image, channels, size) if args.image is not None else \
        data.load_dataset(checkpoint.info.get("dataset") or "mnist", train=False).image(args.test_image, "--test-digit")
    images = image.expand(args.num, -1, -1, -1).contiguous()
    options = dict(sampler=args.sampler, sampling_steps=args.steps, cond=labels,
                   generator=torch.Generator().manual_seed(args.seed))
    model = model if labels is None else guided(model, DEFAULT_SAMPLING["guidance"] if args.guidance is None else args.guidance)
    if args.mask is not None:
        out = editing.inpaint(model, images, editing.make_mask(args.mask, size), checkpoint.schedule, **options)
    else:
        strength = 0.6 if args.strength is None else args.strength
        out = editing.img2img(model, images, checkpoint.schedule, strength=strength, **options)
    shown = torch.full((args.num + 1,), -1) if labels is None else torch.cat([torch.tensor([-1]), labels])
    path = data.save_samples(args.out, torch.cat([image, out.clamp(-1, 1)]), shown, overwrite=args.overwrite)
    print(f"wrote the original and {args.num} edits to {path} (and {path.with_suffix('.png')})")
    return 0


def run_evaluate(args) -> int:
    samples = data.load_samples(args.file)
    if samples.prompts is not None:       # text-to-image samples: does each image show what its prompt asks?
        print(captions.format_adherence(captions.adherence(samples.images, samples.prompts)))
        return 0
    dataset = args.dataset or metrics.dataset_for(samples.images)
    print(metrics.format_report(metrics.evaluate_samples(samples.images, samples.labels, dataset=dataset)))
    return 0


def run_train_classifier(args) -> int:
    out = args.out or metrics.user_classifier_dir(args.dataset)
    accuracy = metrics.train_classifier(args.dataset, out, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite)
    print(f"saved the {args.dataset} classifier to {out}; test accuracy {accuracy:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
