"""How many CPU threads PyTorch should use on this machine, right now, and how to lay them out.

Used by the lessons and the command line (issue 17). PyTorch starts one thread per core and
splits every operation between them. That is fast on an idle machine, but when anything else
keeps a core busy, each operation waits for the thread that shares its core, and a training step
can take twice as long (or ten times, at a load of 4) as with fewer threads. So this module runs
a small convolution (the U-Net's main work) for a fraction of a second at a few thread counts and
keeps the fastest for single calls; on a tie it keeps fewer threads, which leaves a core for
everything else.

Batches have a second way to use the cores: cut into parts, each run start to finish in its own
thread with one PyTorch thread ("workers"). The parts meet only at the end (of a sampling run,
or of a training step's backward pass), so a part slowed by other work holds up nobody for long.
On 2 CPUs beside one busy process a training step and a sampling run took about 1.5x their idle
time this way, and 1.7-1.8x as one call on the best thread count (benchmarks/threads.py, README
"Threads"); on an idle machine they are as fast. `generate` cuts each batch into `workers()` parts, `runs.train` into
`training_workers()`.

    threads.use_best_threads()   # measures, sets torch.set_num_threads and the workers, prints why
    threads.map_parts(fn, threads.batch_parts(len(x)))   # fn on each part, side by side

Set the environment variable DIFFUSION_COURSE_THREADS=N to choose N threads yourself (no
measurement, batches not split).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

ENV_VARIABLE = "DIFFUSION_COURSE_THREADS"
TIE = 0.10        # within 10% of the fastest counts as just as fast
MIN_PART = 4      # images per part at least: smaller parts are not worth a thread
MAX_WORKERS = 4   # parts per batch at most (measured on 2 CPUs only; on a big machine each part gets several threads)


class ThreadChoice(NamedTuple):
    threads: int     # PyTorch threads for one call (torch.set_num_threads)
    workers: int     # parts a batch is cut into, run side by side (1: not split)
    threads_each: int  # PyTorch threads in each part
    reason: str      # one line for the learner: what was chosen and why


class _Layout:
    """What use_best_threads chose for batches: how many parts, and PyTorch threads in each."""
    workers = 1
    threads_each = 1


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_in_part = threading.local()      # .active is True inside a part's thread


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


def workers() -> int:
    """Into how many parts `generate` and `runs.train` cut a batch on a CPU (1 until use_best_threads
    chooses, or set_workers sets it)."""
    return _Layout.workers


def threads_each() -> int:
    """PyTorch threads in each part of a batch that is cut into parts (see set_workers)."""
    return _Layout.threads_each


def training_workers() -> int:
    """Parts per batch in runs.train: twice workers() (at most MAX_WORKERS) when each part has one
    thread. A training step waits for all its parts, every 0.1-0.2 s; beside one busy program on 2
    cores, Linux gives 4 threads of ours 4 of the 5 shares of the cores, 2 threads only 2 of 3 (a
    step took 1.4x its best idle time with 4 parts, 1.8x with 2; idle, the same time: README
    "Threads", scripts/measure_batch_split.py)."""
    return _training_parts(_Layout.workers, _Layout.threads_each)


def _training_parts(workers: int, each: int) -> int:
    return min(2 * workers, MAX_WORKERS) if workers > 1 and each == 1 else workers


def set_workers(count: int, threads_each: int = 1) -> int:
    """Cut batches into `count` parts of `threads_each` PyTorch threads each (1: do not split).
    Returns the previous count."""
    for name, value in (("count", count), ("threads_each", threads_each)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}.")
    previous, _Layout.workers, _Layout.threads_each = _Layout.workers, count, threads_each
    return previous


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch.set_num_threads(count) for the `with` block, then back to what it was. A loop that cuts
    its batches into parts runs its own small work (the optimizer step, the EMA) this way too: on
    one thread such work takes a few milliseconds, while on two threads beside a busy process each
    operation can wait for a core."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def batch_parts(size: int, count: int | None = None) -> list[slice]:
    """A batch of `size` images cut into `count` (default: workers()) nearly equal consecutive parts,
    fewer when a part would hold less than MIN_PART images; one part (the whole) when not split."""
    count = workers() if count is None else count
    count = max(1, min(count, size // MIN_PART))
    bounds = [round(i * size / count) for i in range(count + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def map_parts(fn: Callable, parts: Sequence, *, threads_each: int | None = None,
              cancel: threading.Event | None = None) -> list:
    """[fn(part) for part in parts], each call in its own thread with `threads_each` (default: the
    chosen number) PyTorch threads and the caller's gradient mode; results in the order of parts.

    A single part runs here, in the calling thread, as it is; so do the parts of a call made from
    inside a part (one after the other: the pool's threads are busy). When a call raises (or the
    caller is interrupted), `cancel` is set so that the others can stop early (e.g. a sampler's
    callback checks it), all are waited for, and the first error is raised.
    """
    parts = list(parts)
    if len(parts) == 1 or getattr(_in_part, "active", False):
        return [fn(part) for part in parts]
    each = _Layout.threads_each if threads_each is None else threads_each
    grad_enabled = torch.is_grad_enabled()

    def work(part):
        torch.set_num_threads(each)          # this thread's own count (OpenMP keeps one per thread)
        _in_part.active = True
        try:
            with torch.set_grad_enabled(grad_enabled):
                return fn(part)
        finally:
            _in_part.active = False

    saved = torch.get_num_threads()
    futures = [_executor(len(parts)).submit(work, part) for part in parts]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [future for future in futures if future in done and future.exception() is not None]
        if failed:
            raise failed[0].exception()
        return [future.result() for future in futures]
    except BaseException:
        if cancel is not None:
            cancel.set()
        for future in futures:
            future.cancel()
        wait(futures)
        raise
    finally:
        torch.set_num_threads(saved)         # set_num_threads also set the process-wide count


def _executor(size: int) -> ThreadPoolExecutor:
    """One pool of worker threads for the process, grown when more parts are asked for."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(size, thread_name_prefix="diffusion-course"), size
        return _pool


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
    """The thread count that runs one call fastest now, and the batch layout, with the reason in words.

    DIFFUSION_COURSE_THREADS wins when set (and batches are not split). Otherwise each count in
    `candidates(max_threads)` (at most the CPUs available, which is also the default) runs a small
    convolution for about `seconds`, and the smallest count within 10% of the fastest is chosen.
    Batches are cut into `split_workers(max_threads)` parts, by rule rather than by measurement:
    a short convolution could not tell the layouts apart reliably on a busy machine, while whole
    training steps and sampling runs could (benchmarks/threads.py). The reason quotes the load
    average: how many processes wanted a CPU, on average over the last minute.
    """
    override = threads_from_env()
    if override is not None:
        return ThreadChoice(override, 1, 1, f"{ENV_VARIABLE}={override}: using {_plural(override, 'thread')}, "
                                            "batches not split")
    if max_threads is not None and max_threads < 1:
        raise ValueError(f"max_threads={max_threads}: expected at least 1 (or None: all CPUs).")
    cpus = available_cpus()
    max_threads = cpus if max_threads is None else min(max_threads, cpus)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    situation = f"{_plural(cpus, 'CPU')}, load average {load:.1f}"
    if max_threads == 1:
        return ThreadChoice(1, 1, 1, f"{situation}: using 1 thread")
    times = measure(candidates(max_threads), seconds=seconds)
    fastest = min(times.values())
    threads = min(count for count, t in times.items() if t <= fastest * (1 + TIE))
    other = min(times) if threads == max(times) else max(times)    # the count to compare with
    speedup = times[other] / times[threads]
    why = (f"{speedup:.1f}x faster than {other} right now" if speedup >= 1.05 else
           f"as fast as {other} right now, and fewer")
    workers = split_workers(max_threads)
    each = max_threads // workers
    batches = (f"batches cut into {workers} parts side by side ({_training_parts(workers, each)} when training), "
               f"{_plural(each, 'thread')} each")
    return ThreadChoice(threads, workers, each, f"{situation}: using {_plural(threads, 'thread')} ({why}); {batches}")


def split_workers(cpus: int) -> int:
    """Parts per batch on `cpus` CPUs: one per CPU, at most MAX_WORKERS (each then gets several threads)."""
    return max(1, min(cpus, MAX_WORKERS))


def pick_threads(max_threads: int | None = None, *, seconds: float = 0.3) -> int:
    """The number of threads for one call that is fastest now (see choose_threads)."""
    return choose_threads(max_threads, seconds=seconds).threads


def use_best_threads(verbose: bool = True, *, max_threads: int | None = None, seconds: float = 0.3) -> int:
    """Set torch.set_num_threads and the batch layout (workers) to what is fastest now; print why
    when verbose. Returns the number of threads for one call."""
    choice = choose_threads(max_threads, seconds=seconds)
    torch.set_num_threads(choice.threads)
    set_workers(choice.workers, choice.threads_each)
    if verbose:
        print(f"Threads: {choice.reason}.")
    return choice.threads


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")
