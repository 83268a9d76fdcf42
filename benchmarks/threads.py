"""Threads under load: a training step and a sampling batch, idle and beside one busy process,
at PyTorch's default thread count and in the layout `threads.choose_threads` chooses.

    python -m benchmarks.threads          (about 3 minutes on 2 cores)
    python -m benchmarks.threads --quick  (seconds; checks that it runs)

The workloads (issue 17), each run through the package's own code: one step of `runs.train`
(the course's default U-Net, a batch of 64 real MNIST digits, lesson 03's loss, AdamW, EMA),
timed between the loop's callbacks; and a batch of 50 digits from the shipped model with
`generate.generate`, DPM-Solver++ in 20 steps. "default" is PyTorch's thread count with batches
not split; "chosen" is the layout `threads.choose_threads` picks: threads for one call, and the
number of parts `runs` and `generate` cut a batch into. Each round measures them on the machine
as it is ("idle"), then again while a second Python process, started here, spins on arithmetic
("loaded"); in each phase `choose_threads` chooses afresh. Rounds interleave the two phases so that other work on the
machine hits both alike; the medians of all timed calls count. The issue's target: with one
busy process, the chosen threads take no more than 1.6x their idle time.
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):      # run as `python benchmarks/threads.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from diffusion_course import checkpoints, data, generate, runs, schedules, threads, training
from diffusion_course.unet import UNet, UNetConfig

TARGET = 1.6        # loaded / idle time with one busy process, at the chosen threads
SPIN = "x = 1\nwhile True:\n    x = (x * 1103515245 + 12345) % 2147483648\n"


@contextmanager
def busy_process(settle: float = 1.0):
    """A second Python process spinning on integer arithmetic (one busy core) for the `with` block."""
    process = subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL)
    try:
        time.sleep(settle)               # let it start and get scheduled
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def training_steps(batch_size: int) -> Callable[[int], list[float]]:
    """steps(n) -> the seconds of n more steps of `runs.train` on real MNIST digits (the default
    class-conditional U-Net, lesson 03's loss with Min-SNR, AdamW, EMA), one call of `train` per
    measurement: the time between the callbacks of consecutive steps."""
    mnist = data.load_dataset("mnist", limit=max(1024, 2 * batch_size))
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=10))
    loss_fn = functools.partial(training.diffusion_loss, schedule=schedules.cosine_schedule(), min_snr_gamma=5.0)

    def steps(count: int) -> list[float]:
        stamps = []
        config = runs.TrainConfig(steps=count + 1, minutes=None, batch_size=batch_size, progress=False,
                                  checkpoint_minutes=None)
        runs.train(model, mnist.images, loss_fn, config=config, labels=mnist.labels,
                   callback=lambda step, loss: stamps.append(time.perf_counter()))
        return [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    return steps


def sampling_batches(num: int, steps: int) -> Callable[[int], list[float]]:
    """batches(n) -> the seconds of each of n calls of `generate.generate`: `num` digits (labels 0-9
    in turn) from the shipped model, DPM-Solver++ in `steps` calls, one batch."""
    checkpoint = checkpoints.load_checkpoint("mnist")
    labels = torch.arange(num) % 10

    def batches(count: int) -> list[float]:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            generate.generate(checkpoint.model, checkpoint.schedule, num=num, shape=(1, 28, 28), cond=labels,
                              sampler="dpm", sampling_steps=steps, batch_size=num)
            times.append(time.perf_counter() - start)
        return times
    return batches


def time_calls(run: Callable[[int], list[float]], layout: tuple[int, int, int], repeats: int,
               warmup: int) -> list[float]:
    """Seconds of each of `repeats` calls in `layout` (threads for one call, parts per batch, threads
    per part), after `warmup` untimed ones."""
    num_threads, parts, each = layout
    saved = torch.get_num_threads(), threads.set_workers(parts, each)
    torch.set_num_threads(num_threads)
    try:
        if warmup:
            run(warmup)
        return run(repeats)
    finally:
        torch.set_num_threads(saved[0])
        threads.set_workers(saved[1])


def measure_phase(workloads: dict, default_threads: int, args, record: dict) -> None:
    """Choose the layout now, then time every workload at the default and in the chosen layout;
    append the times and the choice to `record` (one phase: "idle" or "loaded")."""
    choice = threads.choose_threads(seconds=args.pick_seconds)
    record["choices"].append({**choice._asdict(), "load_average": round(os.getloadavg()[0], 2)})
    common.log(f"  choice: {choice.reason}")
    chosen = (choice.threads, choice.workers, choice.threads_each)
    for name, (run, repeats, warmup) in workloads.items():
        for setting, layout in (("default", (default_threads, 1, 1)), ("chosen", chosen)):
            times = time_calls(run, layout, repeats, warmup)
            record[name][setting] += times
            common.log(f"  {name}, {setting} {layout}: {' '.join(f'{t:.3f}' for t in times)} s")


def summarise(phases: dict, workloads: dict) -> tuple[dict, list[dict]]:
    """Median seconds per phase and setting, the loaded / idle ratios, and the table rows.

    Two ratios per setting: against the idle time of the same setting, and against the best idle
    time (the faster of the two settings when idle). The target is judged on the latter, the
    stricter one: on a shared machine the "idle" phase may itself be slowed by other work, and
    the chosen threads adapt to that too.
    """
    summary, rows = {}, []
    for name in workloads:
        medians = {f"{phase}_{setting}_s": round(statistics.median(phases[phase][name][setting]), 4)
                   for phase in ("idle", "loaded") for setting in ("default", "chosen")}
        idle_best = min(medians["idle_default_s"], medians["idle_chosen_s"])
        entry = {**medians, "idle_best_s": idle_best}
        for setting in ("default", "chosen"):
            loaded = medians[f"loaded_{setting}_s"]
            entry[f"ratio_loaded_idle_{setting}"] = round(loaded / medians[f"idle_{setting}_s"], 2)
            entry[f"ratio_loaded_{setting}_vs_idle_best"] = round(loaded / idle_best, 2)
            rows.append({"workload": name, "threads": setting, "idle s": medians[f"idle_{setting}_s"],
                         "loaded s": loaded, "loaded/idle": loaded / medians[f"idle_{setting}_s"],
                         "loaded/best idle": loaded / idle_best})
        entry["target_met"] = entry["ratio_loaded_chosen_vs_idle_best"] <= TARGET
        entry["timed_calls_per_cell"] = len(phases["idle"][name]["default"])
        summary[name] = entry
    return summary, rows


def parse_args(argv):
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="idle + loaded rounds (default 4)")
    parser.add_argument("--train-repeats", type=int, default=3, help="timed training steps per setting and round")
    parser.add_argument("--sample-repeats", type=int, default=2, help="timed sampling batches per setting and round")
    parser.add_argument("--batch-size", type=int, default=64, help="digits per training step (default 64)")
    parser.add_argument("--num-samples", type=int, default=50, help="digits per sampling batch (default 50)")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps (default 20)")
    parser.add_argument("--pick-seconds", type=float, default=0.3, help="pick_threads' measuring time per count")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.train_repeats, args.sample_repeats = 1, 1, 1
        args.batch_size, args.num_samples, args.steps, args.pick_seconds = 8, 4, 2, 0.03
    if min(args.rounds, args.train_repeats, args.sample_repeats, args.steps) < 1 or args.batch_size < 2 \
            or args.num_samples < 1 or args.pick_seconds <= 0:
        parser.error("--rounds, --*-repeats, --steps and --num-samples must be at least 1, --batch-size at "
                     "least 2, --pick-seconds above 0.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    default_threads = torch.get_num_threads()
    info = common.machine_info()
    common.log(f"threads: {info['cpu']}, {threads.available_cpus()} CPUs available, torch default "
               f"{default_threads} threads, load average {info['load_average']}")
    if os.environ.get(threads.ENV_VARIABLE):
        common.log(f"note: {threads.ENV_VARIABLE} is set, so 'chosen' is that value, not a measurement")
    workloads = {"train_step": (training_steps(args.batch_size), args.train_repeats, 1),
                 "sample_batch": (sampling_batches(args.num_samples, args.steps), args.sample_repeats, 0)}
    phases = {phase: {"choices": [], **{name: {"default": [], "chosen": []} for name in workloads}}
              for phase in ("idle", "loaded")}
    for index in range(args.rounds):
        common.log(f"round {index + 1}/{args.rounds}, idle:")
        measure_phase(workloads, default_threads, args, phases["idle"])
        common.log(f"round {index + 1}/{args.rounds}, loaded (one busy process):")
        with busy_process(0.1 if args.quick else 1.0):
            measure_phase(workloads, default_threads, args, phases["loaded"])
    summary, rows = summarise(phases, workloads)
    print(common.format_table(rows, ["workload", "threads", "idle s", "loaded s", "loaded/idle", "loaded/best idle"]))
    print(f"\ndefault: {default_threads} threads, batches not split; chosen (threads, parts) when idle: "
          f"{[(c['threads'], c['workers']) for c in phases['idle']['choices']]}, loaded: "
          f"{[(c['threads'], c['workers']) for c in phases['loaded']['choices']]}; "
          f"target: chosen loaded / best idle <= {TARGET}")
    results = {"workloads": summary, "default_threads": default_threads,
               "available_cpus": threads.available_cpus(), "target_ratio": TARGET,
               "choices": {phase: phases[phase]["choices"] for phase in phases},
               "times_s": {phase: {name: {setting: [round(t, 4) for t in times] for setting, times in phases[phase][name].items()}
                                  for name in workloads} for phase in phases},
               "settings": {"batch_size": args.batch_size, "num_samples": args.num_samples,
                            "steps": args.steps, "rounds": args.rounds, "pick_seconds": args.pick_seconds},
               "machine": info, "load_average_end": [round(x, 2) for x in os.getloadavg()], "quick": args.quick}
    path = common.write_results("threads", results, args.out_dir)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
