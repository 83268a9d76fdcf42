"""Training recipes compared at a fixed step budget: what each setting buys in class accuracy.

    python -m benchmarks.recipes                      (3 recipes x 350 steps: about 20 minutes)
    python -m benchmarks.recipes --steps 300 --recipe "gamma2:min_snr_gamma=2" --recipe "default:"
    python -m benchmarks.recipes --images 20000 --recipe "default:" --recipe "flow:objective=flow"
    python -m benchmarks.recipes --quick              (seconds; checks that it runs)

A recipe is NAME:KEY=VALUE,KEY=VALUE,... where KEY is a TrainConfig field (lr, warmup_steps,
min_snr_gamma, batch_size, ema_decay, label_dropout, ...), base_channels (the U-Net's width) or
objective, and VALUE is a number or "none" ("eps" or "flow" for objective); "default:" is
TrainConfig's and UNetConfig's defaults. Every recipe trains the same class-conditional MNIST U-Net
from the same seed for --steps optimizer steps, or for --images training images (steps = images /
batch size, rounded up: recipes with different batch sizes see the same data). Either budget is
machine-independent: a busy machine changes how long it takes but not the result. Then its EMA
weights draw --num digits (labels 0-9 in turn, guidance 3), scored by the metrics classifier: an
eps model (lesson 03's objective) with DPM-Solver++ 20 steps, a flow-matching model (objective=flow,
lesson 10) with Heun 10 steps; both are 20 evaluations of the guided model (40 network calls) per
digit. `images_per_second` tells how many steps a time budget buys.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):      # run as `python benchmarks/recipes.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from diffusion_course import data, metrics, runs, schedules
from diffusion_course.generate import generate
from diffusion_course.unet import UNet, UNetConfig

DEFAULT_RECIPES = ["before:min_snr_gamma=none,lr=0.002,warmup_steps=200",   # the defaults until Min-SNR came
                   "min-snr:lr=0.002,warmup_steps=200",
                   "default:"]
TRAIN_FIELDS = ({f.name for f in dataclasses.fields(runs.TrainConfig)} | {"min_snr_gamma"}) - {"steps", "minutes", "progress", "seed"}
OBJECTIVES = runs.OBJECTIVES      # lesson 03's noise prediction (Min-SNR weighted), lesson 10's flow matching


def parse_recipe(text: str) -> tuple[str, dict]:
    """'name:lr=0.004,min_snr_gamma=none' -> ('name', {'lr': 0.004, 'min_snr_gamma': None})."""
    name, sep, settings = text.partition(":")
    if not sep or not name:
        raise ValueError(f"a recipe is NAME:KEY=VALUE,... (e.g. 'fast:lr=0.004'), got {text!r}.")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in TRAIN_FIELDS | {"base_channels", "objective"}:
            raise ValueError(f"unknown setting {item!r} in recipe {name!r}; known: "
                             f"{', '.join(sorted(TRAIN_FIELDS | {'base_channels', 'objective'}))}.")
        if key == "objective":
            if value not in OBJECTIVES:
                raise ValueError(f"objective must be one of {OBJECTIVES}, got {value!r} in recipe {name!r}.")
            overrides[key] = value
            continue
        try:
            overrides[key] = None if value.lower() == "none" else float(value) if "." in value or "e" in value \
                else int(value)
        except ValueError:
            raise ValueError(f"{key} must be a number or 'none', got {value!r} in recipe {name!r}.") from None
    return name, overrides


def run_recipe(overrides: dict, steps: int | None, num: int, seed: int, dataset, images: int | None = None) -> dict:
    """Train one recipe for `steps` steps (or `images` training images) and evaluate its EMA weights
    on `num` samples."""
    overrides = dict(overrides)
    base_channels = overrides.pop("base_channels", UNetConfig.base_channels)
    min_snr_gamma = overrides.pop("min_snr_gamma", 5.0)
    objective = overrides.pop("objective", "eps")
    if images is not None:
        steps = math.ceil(images / overrides.get("batch_size", runs.TrainConfig.batch_size))
    config = runs.TrainConfig(steps=steps, minutes=None, seed=seed, progress=False, **overrides)
    torch.manual_seed(seed)
    model = UNet(UNetConfig(base_channels=base_channels, num_classes=10))
    start = time.perf_counter()
    schedule = schedules.cosine_schedule() if objective == "eps" else None
    result = runs.train_diffusion(model, dataset, schedule, min_snr_gamma=min_snr_gamma, config=config, objective=objective)
    seconds = time.perf_counter() - start
    labels = torch.arange(num) % 10
    sampler, sampling_steps = common.evaluation_sampler(objective == "flow", 20)
    samples = generate(result.ema_model, schedule, num=num, shape=(1, 28, 28), cond=labels, guidance_scale=3.0,
                       sampler=sampler, sampling_steps=sampling_steps, seed=seed)
    report = metrics.evaluate_samples(samples, labels, seed=seed)
    return {"steps": steps, "images_seen": steps * config.batch_size, "objective": objective,
            "train_seconds": round(seconds, 1),
            "images_per_second": round(steps * config.batch_size / seconds, 1),
            "final_loss": round(sum(result.losses[-50:]) / len(result.losses[-50:]), 4),
            "accuracy": round(report["accuracy"], 4), "frechet": round(report["frechet"], 2),
            "frechet_real_baseline": round(report["frechet_real_baseline"], 2),
            "train_config": {**dataclasses.asdict(config), "min_snr_gamma": None if objective == "flow" else min_snr_gamma},
            "base_channels": base_channels}


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", help="NAME:KEY=VALUE,... (repeat; default: "
                        + " ".join(DEFAULT_RECIPES) + ")")
    parser.add_argument("--steps", type=int, default=350, help="optimizer steps per recipe (default 350, "
                        "about what 5 minutes buy at batch 128 on a 2-core CPU)")
    parser.add_argument("--images", type=int, help="a budget in training images instead of --steps (steps = images / batch size)")
    parser.add_argument("--num", type=int, help="samples per evaluation (default 500; 10 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        recipes = [parse_recipe(text) for text in (args.recipe or DEFAULT_RECIPES)]
    except ValueError as error:
        parser.error(str(error))
    limit = None
    if args.quick:
        args.steps, limit, args.images = 3, 2000, None if args.images is None else 48
        recipes = [(name, {"batch_size": 16, **overrides}) for name, overrides in recipes]   # a recipe's own batch wins
    args.num = (10 if args.quick else 500) if args.num is None else args.num
    if args.steps < 1 or args.num < 2 or (args.images is not None and args.images < 1):
        parser.error("--steps and --images must be at least 1 and --num at least 2.")

    info = common.machine_info()
    budget = f"{args.steps} steps" if args.images is None else f"{args.images} training images"
    common.log(f"recipes: {len(recipes)} x {budget}, {args.num} samples each; "
               f"load average {info['load_average']}")
    dataset = data.load_dataset("mnist", limit=limit)
    rows, per_recipe = [], {}
    for name, overrides in recipes:
        entry = run_recipe(overrides, args.steps, args.num, args.seed, dataset, images=args.images)
        per_recipe[name] = entry
        rows.append({"recipe": name, "settings": ",".join(f"{k}={v}" for k, v in overrides.items()) or "-",
                     **entry})
        common.log(f"{name}: accuracy {entry['accuracy']:.1%}, FD {entry['frechet']:.1f} "
                   f"(real {entry['frechet_real_baseline']:.1f}), {entry['images_per_second']:.0f} img/s")
    print(common.format_table(rows, ["recipe", "settings", "steps", "images_seen", "images_per_second", "final_loss",
                                     "accuracy", "frechet", "frechet_real_baseline"]))
    print()
    print(f"{args.num} samples per recipe, guidance 3, DPM-Solver++ 20 steps (flow: Heun 10), seed {args.seed}")
    results = {"recipes": per_recipe, "steps": args.steps, "images": args.images, "num_samples": args.num, "seed": args.seed,
               "quick": args.quick, "machine": info}
    path = common.write_results("recipes", results, args.out_dir)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
