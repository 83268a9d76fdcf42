"""Training speed of the course's default MNIST model on this machine, in images per second.

    python -m benchmarks.train_speed              (about 5 minutes on 2 cores)
    python -m benchmarks.train_speed --compile    (adds torch.compile: about 100 s more to compile)
    python -m benchmarks.train_speed --quick      (seconds; checks that it runs)

One run measures, side by side: the naive float32 eager baseline, the path `runs.train`
actually takes (timed through its callback), and variants (memory layout, optimizer
implementation, threads, batch size, optionally torch.compile). Each variant runs `--rounds`
times, interleaved with the others so that a burst of load from elsewhere hits them all alike;
the best round counts.

It also counts the model's FLOPs per training step (forward and backward, with
torch.utils.flop_counter: convolutions and matmuls only) and compares the FLOP rate the
train path reaches with the measured peak of a large matmul, in float32 and in bfloat16;
fraction_of_matmul_peak is the one for the dtype runs.train computes in (bfloat16 only where
the CPU has native bfloat16 units, runs.pick_autocast_dtype). Where the rest of the time goes:
torch.profiler over a few training steps, each operator's own CPU time summed into groups
(convolutions, matrix products, normalisation, activations, the optimizer, the rest).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):      # run as `python benchmarks/train_speed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common
from diffusion_course import guidance, runs, schedules, training
from diffusion_course.unet import UNet, UNetConfig, count_parameters

MODEL_CONFIG = UNetConfig(num_classes=10)      # what `diffusion-course train --dataset mnist` builds
BATCH_SIZE = runs.TrainConfig.batch_size
BASELINE = "fp32 eager (baseline)"
TRAIN_PATH = "runs.train (the course's path)"


@dataclass(frozen=True)
class Variant:
    name: str
    batch_size: int = BATCH_SIZE
    channels_last: bool = False     # NHWC memory layout of weights and activations
    optimizer: str = "for-loop"     # AdamW implementation: "for-loop", "foreach" or "fused"
    threads: int | None = None      # torch.set_num_threads (None: leave as it is)
    compile: bool = False           # torch.compile the model


def variants(args) -> list[Variant]:
    """The baseline first, then one change at a time (and one combination)."""
    base = Variant(BASELINE, batch_size=args.batch_size)     # plain NCHW layout, for-loop AdamW
    found = [base,
             replace(base, name="channels_last", channels_last=True),
             replace(base, name="foreach AdamW", optimizer="foreach"),
             replace(base, name="fused AdamW", optimizer="fused"),
             replace(base, name="channels_last + foreach AdamW", channels_last=True, optimizer="foreach"),
             replace(base, name="1 thread", threads=1),
             replace(base, name=f"batch {args.batch_size // 2}", batch_size=args.batch_size // 2),
             replace(base, name=f"batch {args.batch_size * 2}", batch_size=args.batch_size * 2)]
    if args.compile:
        found.append(replace(base, name="torch.compile", compile=True))
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        unknown = [w for w in wanted if w not in {v.name for v in found}]
        if unknown:
            raise ValueError(f"Unknown variants {unknown}; choose from {[v.name for v in found]}.")
        found = [base] + [v for v in found[1:] if v.name in wanted]
    return found


def make_data(num: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [-1, 1] and labels: the speed does not depend on what the pixels show."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(num, 1, 28, 28, generator=generator) * 2 - 1,
            torch.randint(0, 10, (num,), generator=generator))


def time_variant(variant: Variant, images, labels, steps: int, warmup: int) -> float:
    """Images per second of `steps` training steps (after `warmup` untimed ones), run the way
    `runs.train` runs them (train_step, then the EMA update) but with the variant's settings."""
    threads = torch.get_num_threads()
    if variant.threads is not None:
        torch.set_num_threads(variant.threads)
    try:
        torch.manual_seed(0)
        model = UNet(MODEL_CONFIG).train()
        if variant.channels_last:
            model = model.to(memory_format=torch.channels_last)
        options = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **options[variant.optimizer])
        ema = training.EMA(model)
        step_model = torch.compile(model) if variant.compile else model
        loss_fn = functools.partial(training.diffusion_loss, schedule=schedules.cosine_schedule(), min_snr_gamma=5.0)
        generator = torch.Generator().manual_seed(0)
        start = None
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            index = torch.randint(0, len(images), (variant.batch_size,), generator=generator)
            cond = guidance.drop_labels(labels[index], model.null_class, 0.1, generator)
            x0 = images[index]
            if variant.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            training.train_step(step_model, optimizer, x0, loss_fn, cond=cond, generator=generator)
            ema.update(model)
        return steps * variant.batch_size / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def time_train_path(images, labels, steps: int, warmup: int, batch_size: int) -> float:
    """Images per second of `runs.train` itself with the default TrainConfig (but a step
    budget and the given batch size), timed from the end of the warm-up steps to the end of the last step."""
    stamps = {}

    def callback(step: int, loss: float) -> None:
        stamps[step] = time.perf_counter()

    torch.manual_seed(0)
    model = UNet(MODEL_CONFIG)
    config = runs.TrainConfig(steps=warmup + steps, minutes=None, batch_size=batch_size, progress=False)
    loss_fn = functools.partial(training.diffusion_loss, schedule=schedules.cosine_schedule(), min_snr_gamma=5.0)
    runs.train(model, images, loss_fn, config=config, labels=labels, callback=callback)
    return steps * config.batch_size / (stamps[warmup + steps] - stamps[warmup])


def flops_per_step(batch_size: int) -> int:
    """FLOPs of one forward and backward pass of the model (convolutions and matmuls)."""
    torch.manual_seed(0)
    model = UNet(MODEL_CONFIG).train()
    images, labels = make_data(batch_size)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = training.diffusion_loss(model, images, schedules.cosine_schedule(), cond=labels)
        loss.backward()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, size: int, repeats: int) -> float:
    """FLOP/s of the best of `repeats` (size x size) @ (size x size) matmuls in `dtype`."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b                                            # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# Operator-name fragments -> group, first match wins (profiler names such as aten::convolution_backward).
OP_GROUPS = [("convolutions", ("conv",)), ("matrix products", ("mm", "matmul", "linear", "bmm", "baddbmm")),
             ("normalisation", ("group_norm", "layer_norm", "norm")), ("activations", ("silu", "gelu", "softmax")),
             ("optimizer (AdamW, EMA, clipping)", ("foreach", "adam", "lerp", "clip"))]


def time_breakdown(images, labels, batch_size: int, steps: int) -> dict[str, float]:
    """The share of the CPU time of `steps` training steps (after one warm-up step) spent in each group
    of OP_GROUPS, from each operator's self time under torch.profiler."""
    torch.manual_seed(0)
    model = UNet(MODEL_CONFIG).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = functools.partial(training.diffusion_loss, schedule=schedules.cosine_schedule(), min_snr_gamma=5.0)
    step = lambda: training.train_step(model, optimizer, images[:batch_size], loss_fn, cond=labels[:batch_size])
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(steps):
            step()
    totals = {name: 0.0 for name, _ in OP_GROUPS} | {"everything else": 0.0}
    for event in profile.key_averages():
        name = event.key.lower()
        group = next((g for g, fragments in OP_GROUPS if any(f in name for f in fragments)), "everything else")
        totals[group] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {group: round(t / whole, 3) for group, t in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all variants; the best counts")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per step (default: TrainConfig's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--only", help="comma-separated variant names to time besides the baseline")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds, args.batch_size = 1, 1, 1, 8
    if min(args.steps, args.warmup, args.rounds) < 1 or args.batch_size < 2:
        parser.error("--steps, --warmup and --rounds must be at least 1, --batch-size at least 2.")
    try:
        all_variants = variants(args)
    except ValueError as error:
        parser.error(str(error))

    info = common.machine_info()
    common.log(f"train_speed: {info['cpu']}, {info['cores']} cores, flags {info['cpu_flags']}, "
               f"torch {info['torch']}, load average {info['load_average']}")
    images, labels = make_data()
    autocast = runs.pick_autocast_dtype(torch.device("cpu"))
    common.log(f"runs.pick_autocast_dtype(cpu) -> {autocast}")

    speeds: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        common.log(f"round {round_index + 1}/{args.rounds}: runs.train ...")
        speeds.setdefault(TRAIN_PATH, []).append(
            time_train_path(images, labels, args.steps, args.warmup, args.batch_size))
        for variant in all_variants:
            common.log(f"round {round_index + 1}/{args.rounds}: {variant.name} ...")
            speeds.setdefault(variant.name, []).append(
                time_variant(variant, images, labels, args.steps, args.warmup))
    best = {name: max(values) for name, values in speeds.items()}
    baseline, train_path = best[BASELINE], best[TRAIN_PATH]

    common.log("matmul peaks ...")
    peak_fp32 = matmul_peak(torch.float32, 512 if args.quick else 2048, 1 if args.quick else 5)
    peak_bf16 = matmul_peak(torch.bfloat16, 256 if args.quick else 1024, 1 if args.quick else 3)
    flops = flops_per_step(args.batch_size)
    achieved = flops / args.batch_size * train_path
    peak_used = peak_bf16 if autocast == torch.bfloat16 else peak_fp32      # the dtype runs.train computes in
    common.log("where the time goes (profiler) ...")
    breakdown = time_breakdown(images, labels, args.batch_size, 2 if args.quick else 5)

    rows = [{"variant": name, "images/s": best[name], "vs baseline": best[name] / baseline,
             "rounds": " ".join(f"{v:.0f}" for v in speeds[name])} for name in best]
    print(common.format_table(rows, ["variant", "images/s", "vs baseline", "rounds"]))
    print()
    print(f"model: {count_parameters(UNet(MODEL_CONFIG)):,} parameters, {flops / 1e9:.2f} GFLOP per step "
          f"of {args.batch_size} images (forward + backward, convolutions and matmuls)")
    print(f"runs.train: {achieved / 1e9:.1f} GFLOP/s = {achieved / peak_fp32:.1%} of the float32 matmul "
          f"peak ({peak_fp32 / 1e9:.0f} GFLOP/s); the bfloat16 matmul peak is {peak_bf16 / 1e9:.1f} GFLOP/s "
          f"(fraction {achieved / peak_bf16:.3g}: above 1 where this CPU has no native bfloat16 units and "
          f"float32 wins)")
    print(f"fraction_of_matmul_peak ({'bfloat16' if autocast == torch.bfloat16 else 'float32'}, the dtype "
          f"runs.train computes in here): {achieved / peak_used:.1%}")
    print("where the time of a training step goes (torch.profiler, operators' own CPU time): "
          + ", ".join(f"{group} {share:.0%}" for group, share in breakdown.items()))
    if autocast is None:
        print("runs.train picks plain float32 here, so it runs the same operations as the baseline: "
              "the difference between those two rows is run-to-run noise (rerun on a quiet machine)")
    print(f"autocast dtype picked by runs.train: {autocast}; peak resident memory "
          f"{common.peak_memory_mib():.0f} MiB; load average {info['load_average']}")

    results = {
        "images_per_second": round(train_path, 1),
        "speedup_vs_fp32_eager": round(train_path / baseline, 3),
        "fraction_of_matmul_peak": round(achieved / peak_used, 4),
        "time_breakdown": breakdown,
        "fraction_of_bf16_matmul_peak": round(achieved / peak_bf16, 4),
        "fraction_of_fp32_matmul_peak": round(achieved / peak_fp32, 4),
        "matmul_peak_gflops": {"float32": round(peak_fp32 / 1e9, 1), "bfloat16": round(peak_bf16 / 1e9, 1)},
        "model_gflop_per_step": round(flops / 1e9, 3),
        "achieved_gflops": round(achieved / 1e9, 2),
        "batch_size": args.batch_size,
        "parameters": count_parameters(UNet(MODEL_CONFIG)),
        "autocast_dtype": str(autocast),
        "note": ("runs.train runs the same float32 operations as the baseline here, so "
                 "speedup_vs_fp32_eager differs from 1 by noise only") if autocast is None else None,
        "variants": {name: {"images_per_second": round(best[name], 1), "vs_baseline": round(best[name] / baseline, 3),
                            "rounds": [round(v, 1) for v in speeds[name]]} for name in best},
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "quick": args.quick,
        "peak_resident_memory_mib": round(common.peak_memory_mib(), 1),
        "machine": info,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    path = common.write_results("train_speed", results, args.out_dir)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
