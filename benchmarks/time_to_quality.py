"""Time to quality: train from scratch with the default settings, evaluate the model at marks.

    python -m benchmarks.time_to_quality             (12 minutes of training + about 12 of evaluation)
    python -m benchmarks.time_to_quality --minutes 1,2,5 --images 20000,50000 --num 500
    python -m benchmarks.time_to_quality --quick      (seconds; checks that it runs)

The model is the one `diffusion-course train --dataset mnist` builds (class-conditional U-Net,
UNetConfig defaults, cosine schedule) trained by `runs.train_diffusion` with the default TrainConfig (Min-SNR gamma 5).
Training runs in pieces up to each wall-time mark, resuming from the checkpoint saved at the
previous one (budgets are totals, and saving and loading are not counted), so the evaluation, done
after all training, never counts against the training clock. A second run from scratch stops at
each --images mark instead (training images seen, batch size times steps: a budget that does not
depend on the machine or on how busy it is). Each checkpoint (its EMA weights)
then draws `--num` digits, labels 0-9 in turn, with guidance 3 and DPM-Solver++ 20 steps, scored
by the metrics classifier: class accuracy, and the Frechet distance next to the real-vs-real
baseline at the same sample count.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):      # run as `python benchmarks/time_to_quality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from diffusion_course import checkpoints, cli, data, metrics, runs, schedules
from diffusion_course.generate import generate
from diffusion_course.unet import UNet, UNetConfig

DEFAULT_MARKS = "1,2,5,10"
DEFAULT_IMAGE_MARKS = "20000"     # the sample-efficiency target is set at 20,000 training images


def parse_marks(text: str, option: str = "--minutes") -> list[float]:
    try:
        marks = [float(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, e.g. 1,2,5,10; got {text!r}.") from None
    if not marks or any(m <= 0 for m in marks) or marks != sorted(set(marks)):
        raise ValueError(f"{option} must be positive and increasing, got {text!r}.")
    return marks


def mark_key(mark: float, unit: str = "min") -> str:
    return f"{mark:g}_{unit}"


def budget(config: runs.TrainConfig, mark: float, unit: str) -> runs.TrainConfig:
    """The training budget up to a mark: minutes of training, or images seen (whole steps, rounded up)."""
    if unit == "min":
        return replace(config, minutes=mark)
    return replace(config, steps=math.ceil(mark / config.batch_size), minutes=None)


def train_to_marks(marks: list[float], run_dir: Path, config: runs.TrainConfig, seed: int,
                   base_channels: int, limit: int | None = None, min_snr_gamma: float | None = 5.0,
                   unit: str = "min", objective: str = "eps") -> list[Path]:
    """Train once, stopping at each mark (minutes, or images with unit "images") to save a
    checkpoint; returns one folder per mark."""
    dataset = data.load_dataset("mnist", limit=limit)
    folders = []
    for i, mark in enumerate(marks):
        torch.manual_seed(seed)     # the same initial weights as a single uninterrupted run
        model = UNet(UNetConfig(base_channels=base_channels, num_classes=10))
        result = runs.train_diffusion(model, dataset, schedules.cosine_schedule(), min_snr_gamma=min_snr_gamma,
                                      config=budget(config, mark, unit), out_dir=run_dir, resume=i > 0,
                                      objective=objective)
        folders.append(checkpoints.latest_checkpoint(run_dir))
        common.log(f"mark {mark:g} {unit}: step {result.step}, {result.seconds:.0f} s of training, "
                   f"loss (last 50 steps) {sum(result.losses[-50:]) / max(1, len(result.losses[-50:])):.4f}")
    return folders


def evaluate(folder: Path, args) -> dict:
    """A checkpoint's EMA weights draw args.num digits (labels 0-9 in turn): accuracy and Frechet distance."""
    checkpoint = checkpoints.load_checkpoint(folder)
    labels = torch.arange(args.num) % 10
    sampler, steps = common.evaluation_sampler(checkpoint.schedule is None, args.steps)
    images = generate(checkpoint.model, checkpoint.schedule, num=args.num, shape=(1, 28, 28), cond=labels,
                      guidance_scale=args.guidance, sampler=sampler, sampling_steps=steps, seed=args.seed)
    report = metrics.evaluate_samples(images, labels, seed=args.seed)
    entry = {"step": checkpoint.info["step"], "train_seconds": round(checkpoint.info["seconds"], 1),
             "images_seen": checkpoint.info["step"] * args.batch_size,
             "accuracy": round(report["accuracy"], 4), "frechet": round(report["frechet"], 3),
             "frechet_real_baseline": round(report["frechet_real_baseline"], 3)}
    entry["frechet_over_baseline"] = round(entry["frechet"] / entry["frechet_real_baseline"], 2)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--minutes", default=DEFAULT_MARKS, help=f"wall-time marks (default {DEFAULT_MARKS})")
    parser.add_argument("--images", default=DEFAULT_IMAGE_MARKS,
                        help=f"training-image marks of a second run (default {DEFAULT_IMAGE_MARKS}; 'none': no second run)")
    parser.add_argument("--num", type=int, help="samples per evaluation (default 1000; 20 with --quick)")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps for the evaluation")
    parser.add_argument("--run-dir", help="keep the checkpoints here (default: a temporary folder, deleted)")
    parser.add_argument("--seed", type=int, default=0)
    recipe = parser.add_argument_group("recipe (defaults: TrainConfig's and UNetConfig's)")
    recipe.add_argument("--batch-size", type=int, default=runs.TrainConfig.batch_size)
    recipe.add_argument("--lr", type=float, default=runs.TrainConfig.lr)
    recipe.add_argument("--warmup-steps", type=int, default=runs.TrainConfig.warmup_steps)
    recipe.add_argument("--ema-decay", type=float, default=runs.TrainConfig.ema_decay)
    recipe.add_argument("--min-snr-gamma", type=cli.gamma_or_off, default=5.0,
                        help="0 turns the Min-SNR loss weighting off")
    recipe.add_argument("--base-channels", type=int, default=UNetConfig.base_channels)
    recipe.add_argument("--objective", choices=runs.OBJECTIVES, default="eps",
                        help="flow: flow matching (lesson 10), evaluated with Heun at half the --steps (the same network calls)")
    args = parser.parse_args(argv)
    limit = None
    if args.quick:
        args.minutes, args.steps, args.batch_size, limit = "0.02,0.04", 5, 16, 2000
        args.images = "32" if args.images == DEFAULT_IMAGE_MARKS else args.images
    args.num = (20 if args.quick else 1000) if args.num is None else args.num
    try:
        marks = parse_marks(args.minutes)
        image_marks = [] if args.images.strip().lower() == "none" else parse_marks(args.images, "--images")
    except ValueError as error:
        parser.error(str(error))
    if args.num < 2:
        parser.error("--num must be at least 2 (a Frechet distance needs a spread).")

    # One checkpoint per mark and no others (checkpoint_minutes=None), so none of the marks is pruned.
    config = runs.TrainConfig(minutes=marks[-1], batch_size=args.batch_size, lr=args.lr,
                              warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, checkpoint_minutes=None,
                              keep_checkpoints=len(marks) + len(image_marks) + 1, seed=args.seed, progress=not args.quick)
    info = common.machine_info()
    common.log(f"time_to_quality: marks {marks} min and {image_marks} images, {args.num} samples each; "
               f"load average {info['load_average']}")
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="time_to_quality-"))
    if checkpoints.latest_checkpoint(run_dir) is not None or checkpoints.latest_checkpoint(run_dir / "images"):
        parser.error(f"{run_dir} already holds checkpoints; choose an empty --run-dir.")
    try:
        start = time.perf_counter()
        common_args = (config, args.seed, args.base_channels, limit, args.min_snr_gamma)
        done = [(m, "min", f) for m, f in zip(marks, train_to_marks(marks, run_dir, *common_args,
                                                                     objective=args.objective))]
        if image_marks:
            done += [(m, "images", f) for m, f in zip(image_marks, train_to_marks(
                image_marks, run_dir / "images", *common_args, unit="images", objective=args.objective))]
        train_load = [round(x, 2) for x in os.getloadavg()]
        common.log(f"training done in {time.perf_counter() - start:.0f} s; evaluating ...")
        rows, per_mark = [], {}
        for mark, unit, folder in done:
            entry = evaluate(folder, args)
            entry = {"minutes": mark if unit == "min" else None, **entry}
            per_mark[mark_key(mark, unit)] = entry
            rows.append(entry)
            common.log(f"{mark:g} {unit}: accuracy {entry['accuracy']:.1%}, FD {entry['frechet']:.2f} "
                       f"(real baseline {entry['frechet_real_baseline']:.2f})")
    finally:
        if not args.run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)

    print(common.format_table(rows, ["minutes", "step", "train_seconds", "images_seen", "accuracy", "frechet",
                                     "frechet_real_baseline", "frechet_over_baseline"]))
    print()
    sampler, steps = common.evaluation_sampler(args.objective == "flow", args.steps)
    how = f"{'DPM-Solver++' if sampler == 'dpm' else 'Heun'} {steps} steps"
    print(f"{args.num} samples per mark, guidance {args.guidance}, {how}; "
          f"load average at the start {info['load_average']}, after training {train_load}")
    results = {f"accuracy_at_{mark_key(m)}": per_mark[mark_key(m)]["accuracy"] for m in marks}
    results |= {f"frechet_at_{mark_key(m)}": per_mark[mark_key(m)]["frechet"] for m in marks}
    for m in image_marks:       # e.g. accuracy_at_20000_images, frechet_over_baseline_at_20000_images
        results |= {f"{key}_at_{mark_key(m, 'images')}": per_mark[mark_key(m, "images")][key]
                    for key in ("accuracy", "frechet_over_baseline")}
    results["frechet_real_baseline"] = rows[0]["frechet_real_baseline"]
    results |= {"marks": per_mark, "num_samples": args.num, "guidance": args.guidance, "sampler_steps": args.steps,
                "train_config": asdict(config), "base_channels": args.base_channels, "objective": args.objective,
                "quick": args.quick,
                "machine": info, "load_average_after_training": train_load}
    path = common.write_results("time_to_quality", results, args.out_dir)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
