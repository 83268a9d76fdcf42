"""Wall time of each lesson notebook (solutions/*.ipynb), in quick mode and in full mode.

    python -m benchmarks.notebooks                          (every lesson, both modes: about 25 minutes)
    python -m benchmarks.notebooks --mode quick             (every lesson, quick mode: a few minutes)
    python -m benchmarks.notebooks --lessons 00,03 --mode full

Quick mode sets DIFFUSION_COURSE_QUICK=1 (what the notebook tests use), full mode sets it to 0
(what a learner gets). Each notebook runs top to bottom in a fresh kernel through nbclient, in a
temporary working folder (so run folders the lessons write land there, not in solutions/);
nothing is written back to the notebook. A notebook that raises is reported as failed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):      # run as `python benchmarks/notebooks.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

SOLUTIONS = Path(__file__).resolve().parent.parent / "solutions"
MODES = {"quick": "1", "full": "0"}


def find_lessons(selection: str | None, folder: Path = SOLUTIONS) -> list[Path]:
    """The notebooks whose names start with one of the comma-separated prefixes (all when None)."""
    notebooks = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise ValueError(f"No lesson notebooks (NN_*.ipynb) in {folder}.")
    if selection is None:
        return notebooks
    wanted = [w.strip() for w in selection.split(",") if w.strip()]
    chosen = [nb for nb in notebooks if any(nb.name.startswith(w) for w in wanted)]
    missing = [w for w in wanted if not any(nb.name.startswith(w) for nb in notebooks)]
    if missing or not chosen:
        raise ValueError(f"No lesson matches {missing or wanted}; lessons are "
                         f"{[nb.name for nb in notebooks]}.")
    return chosen


def run_notebook(path: Path, mode: str, timeout: int, workdir: Path) -> tuple[float, str | None]:
    """Execute the notebook in a fresh kernel; return (seconds, error message or None)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    previous = os.environ.get("DIFFUSION_COURSE_QUICK")
    os.environ["DIFFUSION_COURSE_QUICK"] = MODES[mode]       # the kernel inherits the environment
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as failure:
        error = str(failure).strip().splitlines()[-1][:200]
    finally:
        if previous is None:
            os.environ.pop("DIFFUSION_COURSE_QUICK", None)
        else:
            os.environ["DIFFUSION_COURSE_QUICK"] = previous
    return time.perf_counter() - start, error


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--lessons", help="comma-separated lesson prefixes, e.g. 00,03 (default: all)")
    parser.add_argument("--mode", choices=["quick", "full", "both"], default="both")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--solutions", default=str(SOLUTIONS), help="folder of the lesson notebooks")
    args = parser.parse_args(argv)
    if args.quick:                  # the cheapest real run: lesson 00 in quick mode
        args.lessons, args.mode = args.lessons or "00", "quick"
    try:
        lessons = find_lessons(args.lessons, Path(args.solutions))
    except ValueError as error:
        parser.error(str(error))
    modes = ["quick", "full"] if args.mode == "both" else [args.mode]

    info = common.machine_info()
    common.log(f"notebooks: {len(lessons)} lessons x {modes}; load average {info['load_average']}")
    rows, results = [], {}
    for path in lessons:
        entry = {}
        for mode in modes:
            common.log(f"{path.name} ({mode}) ...")
            with tempfile.TemporaryDirectory(prefix="lesson-") as workdir:
                seconds, error = run_notebook(path, mode, args.timeout, Path(workdir))
            load = [round(x, 2) for x in os.getloadavg()]
            common.log(f"{path.name} ({mode}): {seconds:.0f} s" + (f", FAILED: {error}" if error else ""))
            entry[mode] = {"seconds": round(seconds, 1), "ok": error is None, "error": error, "load_average": load}
        results[path.stem] = entry
        rows.append({"lesson": path.stem, **{f"{m} s": entry[m]["seconds"] for m in modes},
                     **{f"{m} ok": "yes" if entry[m]["ok"] else "FAILED" for m in modes},
                     "load average (1 min)": entry[modes[-1]]["load_average"][0]})
    print(common.format_table(rows, ["lesson"] + [f"{m} s" for m in modes] + [f"{m} ok" for m in modes]
                              + ["load average (1 min)"]))
    totals = {m: round(sum(e[m]["seconds"] for e in results.values()), 1) for m in modes}
    print("\ntotal: " + ", ".join(f"{m} {s:.0f} s" for m, s in totals.items()))
    path = common.write_results("notebooks", {"lessons": results, "total_seconds": totals, "modes": modes,
                                              "machine": info}, args.out_dir)
    common.log(f"wrote {path}")
    return 0 if all(e[m]["ok"] for e in results.values() for m in modes) else 1


if __name__ == "__main__":
    sys.exit(main())
