"""Samplers against step count with the shipped model: Frechet distance, class accuracy and time.

    python -m benchmarks.samplers                    (1000 samples, DDPM on 200: about an hour on 2 cores)
    python -m benchmarks.samplers --num 200 --num-ddpm 100
    python -m benchmarks.samplers --only ddim_20,dpm_20
    python -m benchmarks.samplers --quick            (seconds; checks that it runs)

Every sampler draws the same digits (labels 0-9 in turn) from the same starting noise, with
classifier-free guidance 3, through `generate.generate` (what `diffusion-course sample` runs). The
Frechet distance is in the metrics classifier's feature space, next to the distance between two
real test sets of the same size (it depends on the sample count, so DDPM, which runs on fewer
samples, has its own baseline). seconds_per_100 is the sampling time only, scaled to 100 digits.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):      # run as `python benchmarks/samplers.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from diffusion_course import checkpoints, cli, metrics
from diffusion_course.generate import generate

# (sampler, model calls): DDPM takes every one of the schedule's 1000 steps.
CONFIGS = [("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100),
           ("dpm", 10), ("dpm", 15), ("dpm", 20)]
QUICK_CONFIGS = ["ddim_10", "dpm_10"]


def config_name(sampler: str, steps: int) -> str:
    return f"{sampler}_{steps}"


def choose(only: str | None) -> list[tuple[str, int]]:
    if only is None:
        return CONFIGS
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {config_name(*c): c for c in CONFIGS}
    unknown = [w for w in wanted if w not in known]
    if unknown or not wanted:
        raise ValueError(f"Unknown samplers {unknown or wanted}; choose from {sorted(known)}.")
    return [known[w] for w in wanted]


def time_100_digits(model, schedule, guidance: float, steps: int) -> float:
    """Seconds for one call that draws 100 digits with DPM-Solver++ (the issue's '100 digits' figure)."""
    labels = torch.arange(100) % 10
    start = time.perf_counter()
    generate(model, schedule, num=100, shape=(1, 28, 28), cond=labels, guidance_scale=guidance, sampler="dpm",
             sampling_steps=steps, seed=1)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, help="samples per sampler (default 1000; 20 with --quick)")
    parser.add_argument("--num-ddpm", type=int, help="samples for DDPM-1000, the slow one (default 200; 20 with --quick)")
    parser.add_argument("--only", help="comma-separated samplers, e.g. ddim_20,dpm_20 (default: all)")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=100, help="samples per sampler call")
    parser.add_argument("--checkpoint", default="mnist", help="'mnist' (shipped) or a checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.only = args.only or ",".join(QUICK_CONFIGS)
    args.num = (20 if args.quick else 1000) if args.num is None else args.num
    args.num_ddpm = (20 if args.quick else 200) if args.num_ddpm is None else args.num_ddpm
    if args.num < 2 or args.num_ddpm < 2 or args.batch_size < 1:
        parser.error("--num and --num-ddpm must be at least 2 (a Frechet distance needs a spread), "
                     "--batch-size at least 1.")
    try:
        configs = choose(args.only)
    except ValueError as error:
        parser.error(str(error))

    info = common.machine_info()
    checkpoint = checkpoints.load_checkpoint(args.checkpoint)
    model, schedule = checkpoint.model, checkpoint.schedule
    common.log(f"samplers: {checkpoint.path}, guidance {args.guidance}, {args.num} samples "
               f"({args.num_ddpm} for DDPM); load average {info['load_average']}")
    results, rows = {}, []
    for sampler, steps in configs:
        num = args.num_ddpm if sampler == "ddpm" else args.num
        labels = torch.arange(num) % 10
        common.log(f"{config_name(sampler, steps)}: sampling {num} ...")
        start = time.perf_counter()
        images = generate(model, schedule, num=num, shape=(1, 28, 28), cond=labels, guidance_scale=args.guidance,
                          sampler=sampler, sampling_steps=steps, seed=args.seed, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        report = metrics.evaluate_samples(images, labels, seed=args.seed)
        entry = {"sampler": sampler, "steps": steps, "num_samples": num,
                 "frechet": round(report["frechet"], 3), "accuracy": round(report["accuracy"], 4),
                 "seconds_per_100": round(seconds / num * 100, 2),
                 "frechet_real_baseline": round(report["frechet_real_baseline"], 3),
                 "load_average": [round(x, 2) for x in os.getloadavg()]}
        results[config_name(sampler, steps)] = entry
        rows.append({**entry, "sampler": config_name(sampler, steps)})   # the name says the step count
        common.log(f"{config_name(sampler, steps)}: FD {entry['frechet']:.2f}, accuracy {entry['accuracy']:.1%}, "
                   f"{entry['seconds_per_100']:.1f} s per 100")
    print(common.format_table(rows, ["sampler", "num_samples", "frechet", "frechet_real_baseline",
                                     "accuracy", "seconds_per_100"]))
    print()
    steps_100 = 10 if args.quick else 20
    seconds_100 = time_100_digits(model, schedule, args.guidance, steps_100)
    print(f"100 digits with DPM-Solver++ {steps_100} steps, guidance {args.guidance}: {seconds_100:.1f} s "
          f"(torch threads {torch.get_num_threads()}); load average {info['load_average']}")
    if "ddpm_1000" in results and "dpm_20" in results:
        ratio = results["dpm_20"]["frechet"] / results["ddpm_1000"]["frechet"]
        counts = (results["dpm_20"]["num_samples"], results["ddpm_1000"]["num_samples"])
        caveat = "" if counts[0] == counts[1] else f" (not comparable: {counts[0]} vs {counts[1]} samples)"
        print(f"DPM-Solver++ 20 / DDPM-1000 Frechet distance: {ratio:.2f}{caveat}")
    extra = {"guidance": args.guidance, "num": args.num, "num_ddpm": args.num_ddpm, "seed": args.seed,
             "checkpoint": str(checkpoint.path), f"seconds_100_digits_dpm_{steps_100}": round(seconds_100, 2),
             "machine": info, "quick": args.quick}
    path = common.write_results("samplers", {**results, **extra}, args.out_dir)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
