"""Into how many parts should a batch be cut? Training steps and sampling runs, idle and beside a
busy process.

    python scripts/measure_batch_split.py        (about 6 minutes on 2 cores)

The experiment behind `threads.workers()` and `threads.training_workers()` (issue 17), on the
workloads of benchmarks/threads.py: one step of `runs.train` (the default U-Net, 64 MNIST digits)
and one 50-digit `generate` batch (DPM-Solver++, 20 steps). Each is timed whole on 1 and on 2
threads, and cut into 2, 3 and 4 parts of one thread each (here the training step is cut into
exactly that many parts, not one more as `threads.training_workers()` would). Three rounds, each
idle and then beside a busy process started here; medians of 7 steps / 2 batches per round. At the
end, per layout: the median idle time and the median loaded time over the best idle time of all
layouts (benchmarks/threads.py's target measure).
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import threads as benchmark  # noqa: E402  (the workloads, time_calls, busy_process)
from diffusion_course import threads  # noqa: E402

LAYOUTS = {"whole, 1 thread": (1, 1, 1), "whole, 2 threads": (2, 1, 1), "2 parts": (1, 2, 1),
           "3 parts": (1, 3, 1), "4 parts": (1, 4, 1)}   # (threads for one call, parts, threads per part)


def main() -> None:
    threads._training_parts = lambda workers, each: workers    # exactly the parts asked for
    workloads = {"train step": (benchmark.training_steps(64), 7, 1),
                 "sample batch": (benchmark.sampling_batches(50, 20), 2, 0)}
    times = {}
    for phase in ("idle", "loaded") * 3:
        busy = benchmark.busy_process() if phase == "loaded" else None
        if busy:
            busy.__enter__()
        cells = []
        for workload, (run, repeats, warmup) in workloads.items():
            for name, layout in LAYOUTS.items():
                seconds = statistics.median(benchmark.time_calls(run, layout, repeats, warmup))
                times.setdefault((workload, name, phase), []).append(seconds)
                cells.append(f"{workload}, {name}: {seconds:.3f} s")
        if busy:
            busy.__exit__(None, None, None)
        print(f"{phase}: " + " | ".join(cells), flush=True)
    for workload in workloads:
        best_idle = min(statistics.median(times[(workload, name, "idle")]) for name in LAYOUTS)
        for name in LAYOUTS:
            idle, loaded = (statistics.median(times[(workload, name, phase)]) for phase in ("idle", "loaded"))
            print(f"{workload}, {name}: idle {idle:.3f} s, loaded {loaded:.3f} s, "
                  f"loaded / best idle {loaded / best_idle:.2f}")


if __name__ == "__main__":
    main()
