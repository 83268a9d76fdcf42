"""What every benchmark shares: command-line options, a description of the machine, a plain
text table, and writing the figures to benchmarks/results/NAME.json.

Each benchmark runs as `python -m benchmarks.NAME` or `python benchmarks/NAME.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"

# The CPU features that decide how fast matmuls and convolutions run here.
INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni",
                     "amx_bf16", "amx_tile", "amx_int8")


def make_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: --quick and --out-dir."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny budget (seconds): checks that the script runs, measures nothing useful")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR),
                        help=f"folder for NAME.json (default {RESULTS_DIR})")
    return parser


def machine_info() -> dict:
    """Cores, CPU model and flags, torch version and threads, load average, peak memory so far."""
    flags, model = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in INTERESTING_FLAGS if f in flags],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table with one line per row; floats get 3 significant digits."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "-" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_results(name: str, results: dict, out_dir: str | Path, command: list[str] | None = None) -> Path:
    """Write results (plus the command and the date) to out_dir/name.json and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name,
              "command": " ".join(command if command is not None else [f"python -m benchmarks.{name}"] + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), **results}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def median_seconds(action, repeats: int) -> float:
    """Median wall time of `action()` over `repeats` calls, after one warm-up call."""
    action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluation_sampler(flow_model: bool, dpm_steps: int) -> tuple[str, int]:
    """(sampler, steps) that scores a checkpoint: DPM-Solver++ with `dpm_steps` for a noise-prediction
    model, Heun with half as many for a flow-matching one: the same network calls."""
    return ("heun", max(1, dpm_steps // 2)) if flow_model else ("dpm", dpm_steps)


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds just the table."""
    print(message, file=sys.stderr, flush=True)
