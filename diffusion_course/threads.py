"""How many CPU threads PyTorch should use on this machine, right now.

Used by the lessons and the command line (issue 17). PyTorch starts one thread per core. That is
fastest on an idle machine, but when anything else keeps a core busy, the threads of every
convolution wait for the one that shares its core, and a training step can take twice as long
(or ten times, at a load of 4) as with fewer threads. So instead of guessing, this module runs a
small convolution (the U-Net's main work) for a fraction of a second at a few thread counts,
and keeps the fastest; on a tie it keeps fewer threads, which leaves a core for everything else.

    threads.use_best_threads()   # measures, sets torch.set_num_threads, prints one line why

Set the environment variable DIFFUSION_COURSE_THREADS=N to choose N yourself (no measurement).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

ENV_VARIABLE = "DIFFUSION_COURSE_THREADS"
TIE = 0.10      # a smaller thread count within 10% of the fastest counts as just as fast


class ThreadChoice(NamedTuple):
    threads: int     # the number of threads to use
    reason: str      # one line for the learner: what was chosen and why


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under a container's limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:              # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def threads_from_env() -> int | None:
    """DIFFUSION_COURSE_THREADS as a positive integer, None when it is not set."""
    text = os.environ.get(ENV_VARIABLE, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{ENV_VARIABLE}={text!r}: expected a positive whole number of threads "
                         f"(e.g. {ENV_VARIABLE}=1), or leave it unset to measure.")
    return int(text)


def candidates(max_threads: int) -> list[int]:
    """1, 2, 4, 8, ... up to max_threads, and max_threads itself: every count on a small machine,
    a few on a big one (so the measurement stays short)."""
    counts = {max_threads}
    count = 1
    while count < max_threads:
        counts.add(count)
        count *= 2
    return sorted(counts)


def _workload() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 28x28 feature maps and a 3x3 convolution, like one layer of the course's U-Net."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(32, 32, 28, 28, generator=generator), torch.randn(32, 32, 3, 3, generator=generator)


def measure(counts: list[int], *, seconds: float = 0.3, rounds: int = 3) -> dict[int, float]:
    """Seconds per convolution at each thread count: the median of `rounds` turns of about
    seconds / rounds each, interleaved so that a burst of other work hits every count alike
    and spoils at most one turn. Leaves the thread count as it was."""
    x, weight = _workload()
    saved = torch.get_num_threads()
    turns = {count: [] for count in counts}
    try:
        with torch.no_grad():
            for count in counts:                 # warm up: start the threads, pick the kernels
                torch.set_num_threads(count)
                for _ in range(3):
                    F.conv2d(x, weight, padding=1)
            for _ in range(rounds):
                for count in counts:
                    torch.set_num_threads(count)
                    calls, start = 0, time.perf_counter()
                    while time.perf_counter() - start < seconds / rounds:
                        F.conv2d(x, weight, padding=1)
                        calls += 1
                    turns[count].append((time.perf_counter() - start) / calls)
    finally:
        torch.set_num_threads(saved)
    return {count: statistics.median(times) for count, times in turns.items()}


def choose_threads(max_threads: int | None = None, *, seconds: float = 0.3) -> ThreadChoice:
    """The thread count that runs fastest now, with the reason in words.

    DIFFUSION_COURSE_THREADS wins when set. Otherwise each count in `candidates(max_threads)`
    (at most the CPUs available, which is also the default) runs a small convolution for about
    `seconds`, and the smallest count within 10% of the fastest is chosen. The reason quotes the
    load average: how many processes wanted a CPU, on average over the last minute.
    """
    override = threads_from_env()
    if override is not None:
        return ThreadChoice(override, f"{ENV_VARIABLE}={override}: using {_plural(override, 'thread')}")
    if max_threads is not None and max_threads < 1:
        raise ValueError(f"max_threads={max_threads}: expected at least 1 (or None: all CPUs).")
    cpus = available_cpus()
    max_threads = cpus if max_threads is None else min(max_threads, cpus)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    situation = f"{_plural(cpus, 'CPU')}, load average {load:.1f}"
    if max_threads == 1:
        return ThreadChoice(1, f"{situation}: using 1 thread")
    times = measure(candidates(max_threads), seconds=seconds)
    fastest = min(times.values())
    threads = min(count for count, t in times.items() if t <= fastest * (1 + TIE))
    other = min(times) if threads == max(times) else max(times)    # the count to compare with
    speedup = times[other] / times[threads]
    why = (f"{speedup:.1f}x faster than {other} right now" if speedup >= 1.05 else
           f"as fast as {other} right now, and fewer")
    return ThreadChoice(threads, f"{situation}: using {_plural(threads, 'thread')} ({why})")


def pick_threads(max_threads: int | None = None, *, seconds: float = 0.3) -> int:
    """The number of threads that is fastest now (see choose_threads): from 1 to the CPUs available."""
    return choose_threads(max_threads, seconds=seconds).threads


def use_best_threads(verbose: bool = True, *, max_threads: int | None = None, seconds: float = 0.3) -> int:
    """Set torch.set_num_threads to the count that is fastest now; print why when verbose."""
    choice = choose_threads(max_threads, seconds=seconds)
    torch.set_num_threads(choice.threads)
    if verbose:
        print(f"Threads: {choice.reason}.")
    return choice.threads


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")
