"""Sampling speed of the shipped model on this machine: the cost of one guided model call per
100 digits against memory layout, batch size and threads, and two end-to-end timings.

    python -m benchmarks.sample_speed          (about 3 minutes on 2 cores)
    python -m benchmarks.sample_speed --quick  (seconds; checks that it runs)

End to end: the README's command (issue 2's target: under a minute)

    diffusion-course sample --checkpoint mnist --num 200 --labels all --guidance 3 --sampler ddim --steps 50 --seed 0 --out s.npz

run through `cli.main`, and 100 digits with DPM-Solver++ 20 steps (the issue's target: under 5 s).
A lower bound for the latter is printed beside it: the model's FLOPs for those calls divided by
the measured float32 matmul peak.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):      # run as `python benchmarks/sample_speed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common
from benchmarks.train_speed import matmul_peak
from diffusion_course import checkpoints, cli
from diffusion_course.generate import generate
from diffusion_course.guidance import ClassifierFreeGuidance
from diffusion_course.unet import UNet

CLI_COMMAND = ("sample --checkpoint mnist --num 200 --labels all --guidance 3 --sampler ddim --steps 50 "
               "--seed 0 --out {out}")


def seconds_per_100(model, batch_size: int, memory_format, threads: int | None, repeats: int) -> float:
    """Best time of one guided call (both branches in one batch) on `batch_size` digits, per 100 digits."""
    guided = ClassifierFreeGuidance(model, 3.0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 1, 28, 28, generator=generator)
    t, cond = torch.full((batch_size,), 500), torch.arange(batch_size) % 10
    saved_threads = torch.get_num_threads()
    guided.to(memory_format=memory_format)            # what generate does on a CPU (channels-last)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        best = float("inf")
        with torch.no_grad():
            guided(x, t, cond)                       # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                guided(x, t, cond)
                best = min(best, time.perf_counter() - start)
    finally:
        guided.to(memory_format=torch.contiguous_format)
        torch.set_num_threads(saved_threads)
    return best / batch_size * 100


def forward_flops_per_digit(model) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(10, 1, 28, 28), torch.full((10,), 500), torch.arange(10))
    return counter.get_total_flops() / 10


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting; the best counts")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the two end-to-end timings")
    args = parser.parse_args(argv)
    batch_sizes = [50, 100, 250]
    if args.quick:
        args.repeats, batch_sizes = 1, [4, 8]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1.")
    info = common.machine_info()
    common.log(f"sample_speed: load average {info['load_average']}")
    model = checkpoints.load_checkpoint("mnist").model

    settings = [(b, name, fmt, None) for b in batch_sizes
                for name, fmt in (("plain NCHW", torch.contiguous_format), ("channels_last", torch.channels_last))]
    settings.append((batch_sizes[1], "channels_last, 1 thread", torch.channels_last, 1))
    rows, variants = [], {}
    for batch_size, name, fmt, threads in settings:
        seconds = seconds_per_100(model, batch_size, fmt, threads, args.repeats)
        key = f"batch {batch_size}, {name}"
        variants[key] = round(seconds, 4)
        rows.append({"batch": batch_size, "layout / threads": name, "s per 100 digits per step": seconds})
        common.log(f"{key}: {seconds:.3f} s per 100 digits per guided call")
    print(common.format_table(rows, ["batch", "layout / threads", "s per 100 digits per step"]))

    flops = forward_flops_per_digit(model)
    peak = matmul_peak(torch.float32, 512 if args.quick else 2048, 1 if args.quick else 5)
    steps = 2 if args.quick else 20
    bound = 100 * 2 * steps * flops / peak
    results = {"seconds_per_100_digits_per_call": variants, "forward_gflop_per_digit": round(flops / 1e9, 4),
               "matmul_peak_gflops_float32": round(peak / 1e9, 1),
               f"lower_bound_seconds_100_digits_dpm_{steps}": round(bound, 2)}
    print(f"\nforward pass: {flops / 1e9:.3f} GFLOP per digit; a guided step costs two; float32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s, so 100 digits in {steps} steps need at least {bound:.1f} s")
    if not args.no_end_to_end:
        labels = torch.arange(100) % 10
        start = time.perf_counter()
        generate(model, checkpoints.load_checkpoint("mnist").schedule, num=100, shape=(1, 28, 28), cond=labels,
                 guidance_scale=3.0, sampler="dpm", sampling_steps=steps, seed=0)
        results[f"seconds_100_digits_dpm_{steps}"] = round(time.perf_counter() - start, 2)
        print(f"100 digits, DPM-Solver++ {steps} steps, guidance 3: {results[f'seconds_100_digits_dpm_{steps}']:.1f} s")
        with tempfile.TemporaryDirectory() as folder:
            command = CLI_COMMAND.format(out=Path(folder) / "s.npz")
            if args.quick:
                command = command.replace("--num 200", "--num 4").replace("--steps 50", "--steps 2")
            start = time.perf_counter()
            status = cli.main(command.split())
            seconds = time.perf_counter() - start
        if status != 0:
            raise RuntimeError(f"`diffusion-course {command}` failed with status {status}.")
        results["cli_command"] = "diffusion-course " + CLI_COMMAND.format(out="s.npz")
        results["cli_seconds"] = round(seconds, 3)
        print(f"diffusion-course {command.rsplit(' --out', 1)[0]}: {seconds:.1f} s (loading included)")
    results |= {"machine": info, "load_average_end": [round(x, 2) for x in os.getloadavg()], "quick": args.quick}
    path = common.write_results("sample_speed", results, args.out_dir)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
