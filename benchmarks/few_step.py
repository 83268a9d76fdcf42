"""Few-step generation: the distilled `mnist-fast` against `mnist` with DPM-Solver++ 20 and guidance.

    python -m benchmarks.few_step                    (1000 samples per configuration: a few minutes on 2 cores)
    python -m benchmarks.few_step --teacher none     (without the undistilled teacher, mnist-flow)
    python -m benchmarks.few_step --quick            (seconds; checks that it runs)

Every configuration draws the same labels (0-9 in turn) through `generate.generate`, what
`diffusion-course sample` runs. evaluations_per_image is counted, not assumed: a hook adds up the
images that go through the network (guidance sends each image through twice, in one batch of 2B).
seconds_per_100_images is the median of --repeats calls that each draw 100 digits, after one
warm-up call, at the thread count threads.use_best_threads picks (or DIFFUSION_COURSE_THREADS);
speedup_vs_dpm20_guided divides the DPM-Solver++ 20 figure by it, both measured in this run. Accuracy and the Frechet distance (in the metrics classifier's feature space, beside the
real-vs-real baseline at the same count) come from --num samples.

The top-level keys describe `mnist-fast` with the sampling it was distilled for (its config.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):      # run as `python benchmarks/few_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from diffusion_course import generate, metrics, threads


def count_evaluations(model) -> tuple[list[int], object]:
    """(a one-element list that counts the images (rows) every forward pass of `model` sees, the
    hook's handle: .remove() stops the counting)."""
    seen = [0]
    handle = model.register_forward_hook(lambda module, args, output: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    return seen, handle


def measure(name: str, pipeline, sampler: str, steps: int, guidance: float, args) -> dict:
    seen, handle = count_evaluations(pipeline.model)
    options = dict(shape=pipeline.shape, guidance_scale=guidance, sampler=sampler, sampling_steps=steps)
    labels = torch.arange(args.num) % 10
    images = generate.generate(pipeline.model, pipeline.schedule, num=args.num, cond=labels, seed=args.seed, **options)
    evaluations = seen[0] / args.num
    handle.remove()
    report = metrics.evaluate_samples(images, labels, seed=args.seed)
    hundred = torch.arange(100) % 10
    seconds = common.median_seconds(lambda: generate.generate(pipeline.model, pipeline.schedule, num=100, cond=hundred,
                                                              seed=args.seed + 1, **options), args.repeats)
    entry = {"name": name, "checkpoint": str(pipeline.path), "sampler": sampler, "steps": steps, "guidance": guidance,
             "evaluations_per_image": round(evaluations, 2), "accuracy": round(report["accuracy"], 4),
             "frechet": round(report["frechet"], 3), "frechet_real_baseline": round(report["frechet_real_baseline"], 3),
             "recall": round(report["recall"], 3), "precision": round(report["precision"], 3),
             "seconds_per_100_images": round(seconds, 3), "num_samples": args.num}
    common.log(f"{name}: {entry['evaluations_per_image']} evaluations per image, accuracy {entry['accuracy']:.1%}, "
               f"FD {entry['frechet']:.2f} (real {entry['frechet_real_baseline']:.2f}), {seconds:.2f} s per 100")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, help="samples per configuration (default 1000; 20 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed calls of 100 digits (default 5; 1 with --quick)")
    parser.add_argument("--steps", default="1,2,4", help="mnist-fast's Euler step counts to measure")
    parser.add_argument("--teacher", help="the undistilled flow-matching checkpoint to measure beside it (default "
                        "mnist-flow, its teacher; 'none' in quick mode)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.num = (20 if args.quick else 1000) if args.num is None else args.num
    args.repeats = (1 if args.quick else 5) if args.repeats is None else args.repeats
    args.teacher = ("none" if args.quick else "mnist-flow") if args.teacher is None else args.teacher
    if args.num < 2 or args.repeats < 1:
        parser.error("--num must be at least 2 (a Frechet distance needs a spread), --repeats at least 1.")
    steps = [int(k) for k in args.steps.split(",")]
    threads.use_best_threads(verbose=False)   # as the lessons do (logged below); DIFFUSION_COURSE_THREADS=N fixes it
    info = common.machine_info()
    common.log(f"few_step: {args.num} samples each; {info['cpu']}, {info['torch_threads']} threads, "
               f"load average {info['load_average']}")

    base = generate.load_pipeline("mnist")
    dpm_steps = 10 if args.quick else 20
    rows = [measure(f"mnist dpm {dpm_steps}, w 3", base, "dpm", dpm_steps, 3.0, args)]
    fast = generate.load_pipeline("mnist-fast")
    default = fast.sampling
    for k in steps:
        rows.append(measure(f"mnist-fast euler {k}", fast, "euler", k, default["guidance"], args))
    if args.teacher.lower() != "none":
        teacher = generate.load_pipeline(args.teacher)
        for sampler, k, w in (("euler", 2, 2.0), ("euler", 4, 2.0), ("heun", 8, 2.0)):
            rows.append(measure(f"teacher {sampler} {k}, w {w:g}", teacher, sampler, k, w, args))
    for row in rows:
        row["speedup_vs_dpm20_guided"] = round(rows[0]["seconds_per_100_images"] / row["seconds_per_100_images"], 1)
    print(common.format_table(rows, ["name", "evaluations_per_image", "accuracy", "frechet", "frechet_real_baseline",
                                     "recall", "seconds_per_100_images", "speedup_vs_dpm20_guided"]))
    shipped = next((r for r in rows if r["name"] == f"mnist-fast euler {default['steps']}"), None)
    if shipped is None:
        shipped = rows[1]
    headline = {key: shipped[key] for key in ("evaluations_per_image", "accuracy", "seconds_per_100_images",
                                              "speedup_vs_dpm20_guided", "frechet", "frechet_real_baseline")}
    print(f"\nmnist-fast as shipped ({shipped['name']}): {headline}")
    path = common.write_results("few_step", {**headline, "shipped": shipped["name"], "rows": rows, "num": args.num,
                                             "repeats": args.repeats, "machine": info, "quick": args.quick},
                                args.out_dir)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
