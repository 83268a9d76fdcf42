"""Count how diffusion-course answers bad inputs: clear error, traceback, silent wrong, data lost.

Issue 12 ("Nothing a learner saved is lost, and no bad number passes silently") asks for before
and after counts of the same kinds of cases. This script runs a fixed list of cases (a command
line for `python -m diffusion_course.cli ...`, or a short Python snippet calling the library),
each in a fresh temporary folder, against the package found at --repo, and classifies each
outcome as exactly one of:

    data lost     a file or folder that existed before is gone or changed, or a run's work is
                  lost (training failed only after its steps, an interrupt saved nothing);
                  checked first, whatever the exit status
    silent wrong  exit 0 / no exception although the input is bad, a wrong result, or a hang
    traceback     any other exception or uncaught traceback, or exit status 1
    clear error   the CLI exits with status 2 and a one-line `error: ...` message and no
                  traceback; a snippet raises ValueError, FileExistsError, FileNotFoundError,
                  FloatingPointError or KeyboardInterrupt with a message
    correct       a valid input (a control) that must succeed did, with a right result

A snippet whose function does not exist in the version under test counts as "traceback", with a
note: the cases are the same for every version.

Usage (offline data; at most 2 processes at once):

    DIFFUSION_COURSE_ARCHIVES=/work/shared/data python scripts/bad_inputs.py --repo /work/wt-old --json old.json
    python scripts/bad_inputs.py --repo . --only sample-guidance-nan evaluate-nan-images

The package is copied into a temporary folder first (cases that could overwrite the shipped
classifier get a copy of their own), so the repository under test is never changed. HOME and
DIFFUSION_COURSE_DATA point into the temporary folder too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

OUTCOMES = ("clear error", "traceback", "silent wrong", "data lost", "correct")
CLEAR_EXCEPTIONS = {"ValueError", "FileExistsError", "FileNotFoundError", "FloatingPointError", "KeyboardInterrupt"}
MARKER = "@@BAD_INPUTS "
TRAIN = ["train", "--steps", "2", "--base-channels", "8", "--batch-size", "8"]
SAMPLE = ["sample", "--num", "2", "--steps", "2"]
EDIT = ["edit", "--num", "2", "--steps", "2"]
NOBODY = 65534


# ----------------------------------------------------------------------------------------------
# What a case is, what came out, and how that is classified

@dataclass
class Case:
    name: str
    finding: str = ""                   # the item of issue 12 it comes from ("" : our own)
    argv: list[str] | None = None       # CLI arguments after `python -m diffusion_course.cli`
    code: str | None = None             # or a Python snippet (see PRELUDE for its helpers)
    setup: Callable | None = None       # setup(folder: Path, ctx: Context) before the run
    expect: str = "error"               # "error": bad input; "ok": must succeed; "either"
    watch: tuple[str, ...] = ()         # paths (relative; "{pkg}/..." = the package copy) to keep
    check: Callable | None = None       # check(observed, ctx) -> (outcome, detail) or None
    timeout: float = 120.0
    env: dict = field(default_factory=dict)
    own_package: bool = False           # a writable package copy of its own (shipped files at risk)
    as_user: bool = False               # run as an unprivileged user (root ignores read-only folders)
    late_failure_loses_work: bool = False   # train: failing after its steps loses the run's work
    file_size_limit: int | None = None  # bytes per written file (RLIMIT_FSIZE): a full disk
    runner: Callable | None = None      # runner(case, ctx) -> Observed, for two processes or signals


@dataclass
class Observed:
    kind: str                           # "cli" or "python"
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    lost: list[str] = field(default_factory=list)   # watched paths gone or changed
    work_lost: str = ""                 # why a run's work is lost ("" if it is not)
    marker: dict | None = None          # a snippet's report
    seconds: float = 0.0


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def error_line(stderr: str) -> str | None:
    """The `error: ...` line of a clear CLI error (ours or argparse's `prog: error: ...`); a progress
    bar left unfinished on the same line is not part of it."""
    for line in re.split(r"[\r\n]", stderr):
        found = re.search(r"(^|[\]\s])((\S+( [\w-]+)?: )?error: \S.*)$", line.strip())
        if found and (found.group(1) == "" or (found.group(1) == "]" and found.group(3) is None)):
            return found.group(2)[:200]
    return None


def classify(obs: Observed, expect: str) -> tuple[str, str]:
    """Exactly one outcome and a one-line detail for an observed run of a case."""
    if obs.lost:
        return "data lost", "gone or changed: " + ", ".join(obs.lost)[:180]
    if obs.work_lost:
        return "data lost", obs.work_lost
    if obs.timed_out:
        return "silent wrong", f"still running after {obs.seconds:.0f} s (a hang)"
    if obs.kind == "python":
        return _classify_snippet(obs, expect)
    if "Traceback (most recent call last)" in obs.stderr:
        return "traceback", last_line(obs.stderr)
    line = error_line(obs.stderr)
    if obs.rc == 2 and line:
        return "clear error", line
    if obs.rc == 0:
        if expect == "error":
            return "silent wrong", "exit 0 on a bad input: " + (last_line(obs.stdout) or "(no output)")
        return "correct", "exit 0: " + (last_line(obs.stdout) or "(no output)")
    return "traceback", f"exit {obs.rc}: " + (last_line(obs.stderr) or "(no message)")


def _classify_snippet(obs: Observed, expect: str) -> tuple[str, str]:
    marker = obs.marker
    if marker is None:
        return "traceback", f"exit {obs.rc}, no report: " + last_line(obs.stderr)
    if marker["kind"] == "exception":
        kind, message = marker["type"], marker["message"].strip()
        one_line = f"{kind}: {last_line(message)}"
        if kind == "MissingAPI":
            return "traceback", "not in this version: " + last_line(message)
        if kind in CLEAR_EXCEPTIONS and message:
            return "clear error", one_line
        return "traceback", one_line
    if marker["kind"] == "wrong":
        return "silent wrong", marker["detail"]
    if marker["kind"] == "right":
        return "correct", marker["detail"]
    if expect == "error":
        return "silent wrong", "no error on a bad input" + (f": {marker['detail']}" if marker.get("detail") else "")
    return "correct", "returned" + (f": {marker['detail']}" if marker.get("detail") else "")


# ----------------------------------------------------------------------------------------------
# The snippets' helpers: find a function in whichever version, report right/wrong answers

PRELUDE = r'''
import importlib, inspect, json, math, sys, traceback
import numpy as np
import torch

def _report(kind, **kw):
    print("@@BAD_INPUTS " + json.dumps(dict(kind=kind, **kw)), flush=True)

class MissingAPI(Exception):
    pass

def wrong(detail):
    _report("wrong", detail=detail)
    sys.exit(0)

def right(detail="right answer"):
    _report("right", detail=detail)
    sys.exit(0)

def find(*names):
    """The first of "module.attr" (inside diffusion_course) that exists in this version."""
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module("diffusion_course." + module), attr)
        except (ImportError, AttributeError):
            pass
    raise MissingAPI("none of " + ", ".join(names) + " exists")

def kw(fn, value, *names):
    """{the first of names that fn accepts: value}: the same option under its old or new name."""
    params = inspect.signature(fn).parameters
    for name in names:
        if name in params:
            return {name: value}
    raise MissingAPI(f"{fn.__name__} takes none of {names}")

def schedule(name="cosine"):
    return find("schedules.SCHEDULES")[name]()

def tiny_unet(num_classes=None):
    UNet, UNetConfig = find("unet.UNet"), find("unet.UNetConfig")
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=8, num_classes=num_classes)).eval()

class ZeroEps(torch.nn.Module):
    """A stand-in network that predicts zero noise (cheap; enough for the samplers' arithmetic)."""
    null_class = None
    def forward(self, x_t, t, cond=None):
        return torch.zeros_like(x_t)

def finite(x, what="result"):
    if not torch.isfinite(torch.as_tensor(x)).all():
        wrong(f"{what} has non-finite values")
'''

SNIPPET_WRAPPER = '''
try:
    exec(compile(BODY, "case", "exec"), globals())
except SystemExit:
    raise
except BaseException as error:
    _report("exception", type=type(error).__name__, message=str(error))
    traceback.print_exc()
    sys.exit(1)
else:
    _report("returned", detail=str(globals().get("DETAIL", "")))
'''


# ----------------------------------------------------------------------------------------------
# Running a case

@dataclass
class Context:
    repo: Path
    python: str
    base: Path          # the run's temporary folder
    pkg: Path           # the shared copy of the package (its parent is on PYTHONPATH)
    fixtures: Path
    data: Path
    archives: str

    def env(self, case: Case, folder: Path, pkg: Path) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFUSION_COURSE")}
        env.update(PYTHONPATH=str(pkg.parent), HOME=str(folder / "home"), OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", DIFFUSION_COURSE_DATA=str(self.data),
                   DIFFUSION_COURSE_ARCHIVES=self.archives, TQDM_MININTERVAL="0.5",
                   XDG_CACHE_HOME=str(folder / "home" / ".cache"), PYTHONDONTWRITEBYTECODE="1")
        env.update({k: v.format(case=folder) for k, v in case.env.items()})
        return env

    def cli_command(self, argv: list[str]) -> list[str]:
        return [self.python, "-m", "diffusion_course.cli", *argv]

    def run(self, command, folder, env, *, timeout, as_user=False, file_size_limit=None):
        """(rc, stdout, stderr, timed_out, seconds) of one process, killed with its group on timeout."""
        prefix = user_prefix() if as_user else []
        start = time.monotonic()
        process = subprocess.Popen(prefix + command, cwd=folder, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True,
                                   preexec_fn=_limit_file_size(file_size_limit))
        try:
            stdout, stderr = process.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            timed_out = True
        return process.returncode, stdout, stderr, timed_out, time.monotonic() - start

    def cli(self, folder: Path, argv: list[str], timeout: float = 120) -> tuple[int, str, str]:
        """Run the CLI in a case's folder (for checks that compare with a second command)."""
        dummy = Case(name="helper")
        rc, out, err, _, _ = self.run(self.cli_command(argv), folder, self.env(dummy, folder, self.pkg),
                                      timeout=timeout)
        return rc, out, err


def user_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def _limit_file_size(limit):
    if limit is None:
        return None

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def snapshot(paths: list[Path]) -> dict[str, str]:
    """path -> sha256 (files) or "dir" for everything under the watched paths."""
    found = {}
    for root in paths:
        if root.is_file():
            found[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        elif root.is_dir():
            found[str(root)] = "dir"
            for path in sorted(root.rglob("*")):
                found[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def changed(before: dict[str, str], base: Path) -> list[str]:
    lost = []
    for path, digest in before.items():
        now = snapshot([Path(path)]).get(path)
        if now is None:
            lost.append(_short(path, base) + " (gone)")
        elif digest != "dir" and now != digest:
            lost.append(_short(path, base) + " (changed)")
    return lost


def _short(path: str, base: Path) -> str:
    return os.path.relpath(path, base)


def run_case(case: Case, ctx: Context) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="case-", dir=ctx.base))
    (folder / "home").mkdir()
    pkg = ctx.pkg
    if case.own_package:
        pkg = folder / "pkg" / "diffusion_course"
        shutil.copytree(ctx.pkg, pkg)
    try:
        if case.setup is not None:
            case.setup(folder, ctx)
        watched = [Path(p.replace("{pkg}", str(pkg))) if p.startswith("{pkg}") else folder / p for p in case.watch]
        before = snapshot(watched)
        if case.as_user and os.geteuid() == 0:
            _give_to_user(folder)
        if case.runner is not None:
            obs = case.runner(case, ctx, folder, pkg)
        else:
            obs = _run_plain(case, ctx, folder, pkg)
        obs.lost = changed(before, folder)
        if case.late_failure_loses_work and obs.rc not in (0, None) and _trained(obs):
            obs.work_lost = "failed only after training (the steps' work is lost): " + (
                error_line(obs.stderr) or last_line(obs.stderr))
        outcome, detail = classify(obs, case.expect)
        if case.check is not None and outcome not in ("data lost",):
            override = case.check(obs, ctx, folder, outcome)
            if override is not None:
                outcome, detail = override
    except Exception as error:  # the harness itself (a setup that needs a missing fixture)
        outcome, detail, obs = "traceback", f"setup failed: {type(error).__name__}: {error}", None
    finally:
        _cleanup(folder)
    return {"case": case.name, "finding": case.finding, "outcome": outcome, "detail": " ".join(detail.split()),
            "seconds": round(obs.seconds, 1) if obs else 0.0}


def _run_plain(case: Case, ctx: Context, folder: Path, pkg: Path) -> Observed:
    env = ctx.env(case, folder, pkg)
    if case.argv is not None:
        command, kind = ctx.cli_command(case.argv), "cli"
    else:
        script = folder / "snippet.py"
        script.write_text(PRELUDE + f"\nBODY = {textwrap.dedent(case.code)!r}\n" + SNIPPET_WRAPPER)
        if case.as_user and os.geteuid() == 0:
            os.chown(script, NOBODY, NOBODY)
        command, kind = [ctx.python, str(script)], "python"
    rc, out, err, timed_out, seconds = ctx.run(command, folder, env, timeout=case.timeout, as_user=case.as_user,
                                               file_size_limit=case.file_size_limit)
    return Observed(kind, rc, out, err, timed_out, marker=_marker(out), seconds=seconds)


def _marker(stdout: str) -> dict | None:
    reports = [line[len(MARKER):] for line in stdout.splitlines() if line.startswith(MARKER)]
    return json.loads(reports[-1]) if reports else None


def _trained(obs: Observed) -> bool:
    """Whether the output shows training steps (the progress bar's loss, or the final report)."""
    return bool(re.search(r"loss=\s*[-\d.naif]|trained \d+ steps", obs.stdout + obs.stderr))


def _give_to_user(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chown(path, NOBODY, NOBODY)


def _cleanup(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Set-up helpers (files in the wrong place, damaged files, the user's own files)

def in_case(*steps):
    """Chain setup steps into one setup(folder, ctx)."""
    def setup(folder, ctx):
        for step in steps:
            step(folder, ctx)
    return setup


def write(rel: str, content: str | bytes = "the user's own work\n"):
    def step(folder, ctx):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return step


def mkdir(rel: str, mode: int | None = None):
    def step(folder, ctx):
        (folder / rel).mkdir(parents=True, exist_ok=True)
        if mode is not None:
            (folder / rel).chmod(mode)
    return step


def fixture(name: str, rel: str):
    """Copy a fixture built once per run (the run folder `run2`, `samples.npz`, ...)."""
    def step(folder, ctx):
        source = ctx.fixtures / name
        if not source.exists():
            raise FileNotFoundError(f"fixture {name} missing (it could not be built with this version)")
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, folder / rel)
        else:
            shutil.copy2(source, folder / rel)
    return step


def checkpoint_copy(rel: str = "ck"):
    """A single checkpoint folder (the fixture run's step_00000002)."""
    def step(folder, ctx):
        steps = sorted((ctx.fixtures / "run2").glob("step_*"))
        if not steps:
            raise FileNotFoundError("fixture run2 missing (it could not be built with this version)")
        shutil.copytree(steps[-1], folder / rel)
    return step


def edit_config(rel: str, change: Callable[[dict], None]):
    def step(folder, ctx):
        path = folder / rel / "config.json"
        info = json.loads(path.read_text())
        change(info)
        path.write_text(json.dumps(info, indent=2))
    return step


def _drop_model_key(info: dict) -> None:
    for key in ("model", "schedule"):
        if key in info:
            del info[key]
            return
    raise KeyError("config.json has neither 'model' nor 'schedule'")


def _base_channels_as_text(info: dict) -> None:
    def visit(d):
        if isinstance(d, dict):
            if "base_channels" in d:
                d["base_channels"] = "eight"
                return True
            return any(visit(v) for v in d.values())
        return False
    if not visit(info):
        raise KeyError("config.json has no base_channels")


def flip_bytes(rel_glob: str, count: int = 10):
    """Flip `count` bits spread over the first file matching rel_glob (relative, or {pkg}/...)."""
    def step(folder, ctx):
        pattern = rel_glob
        root = folder
        if pattern.startswith("{pkg}/"):
            root, pattern = folder / "pkg" / "diffusion_course", pattern[len("{pkg}/"):]
        files = sorted(root.glob(pattern))
        if not files:
            raise FileNotFoundError(f"nothing matches {rel_glob}")
        raw = bytearray(files[0].read_bytes())
        for i in range(count):
            position = len(raw) // 2 + i * 997
            raw[position] ^= 1 << (i % 7)
        files[0].write_bytes(bytes(raw))
    return step


def npz(rel: str, **make):
    """An .npz built from the real test digits: make maps array name -> f(images, labels)."""
    def step(folder, ctx):
        import numpy as np
        images, labels = mnist_test(ctx)
        arrays = {name: f(images, labels) for name, f in make.items()}
        np.savez(folder / rel, **arrays)
    return step


def npy(rel: str):
    def step(folder, ctx):
        import numpy as np
        images, _ = mnist_test(ctx)
        np.save(folder / rel, images)
    return step


def huge_png(rel: str, side: int = 15000):
    def step(folder, ctx):
        from PIL import Image
        Image.new("L", (side, side)).save(folder / rel)
    return step


_MNIST_CACHE: dict = {}


def mnist_test(ctx: Context, num: int = 50):
    """The first `num` real MNIST test digits (uint8 (N, 28, 28)) and labels, from the archives."""
    import gzip

    import numpy as np
    if "test" not in _MNIST_CACHE:
        raw = Path(ctx.archives) / "MNIST" / "raw"
        with gzip.open(raw / "t10k-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
        _MNIST_CACHE["test"] = images[:num].copy(), labels[:num].copy()
    return _MNIST_CACHE["test"]


# ----------------------------------------------------------------------------------------------
# Checks on the results (controls and cases where exit 0 can be right)

def output_ok(rel: str):
    """A control's output must exist and hold finite, not all-black images."""
    def check(obs, ctx, folder, outcome):
        if outcome != "correct":
            return None
        import numpy as np
        try:
            with np.load(folder / rel) as f:
                images = f["images"]
        except Exception as error:
            return "silent wrong", f"exit 0 but {rel} is unreadable: {error}"
        if images.size == 0 or images.max() == images.min():
            return "silent wrong", f"exit 0 but {rel} holds blank images"
        return "correct", f"wrote {rel}: {images.shape} {images.dtype}"
    return check


def has_checkpoint(run_rel: str, step_name: str | None = None):
    def check(obs, ctx, folder, outcome):
        if outcome != "correct":
            return None
        steps = [p.name for p in (folder / run_rel).glob("step_*") if (p / "config.json").is_file()]
        if step_name is not None and step_name not in steps:
            return "silent wrong", f"exit 0 but no {step_name} in {run_rel} (found {sorted(steps)})"
        if not steps:
            return "silent wrong", f"exit 0 but no checkpoint in {run_rel}"
        return "correct", f"checkpoints {sorted(steps)}"
    return check


def no_leftovers(obs, ctx, folder, outcome):
    """On a full disk: a clear error is right only if no partial file is left behind."""
    left = [str(p.relative_to(folder)) for p in folder.rglob("*") if "partial" in p.name and "home" not in p.parts]
    if left and outcome in ("clear error", "correct"):
        return "silent wrong", f"{outcome}, but left partial files behind: {', '.join(left)[:150]}"
    return None


def local_mnist_used(obs, ctx, folder, outcome):
    """`--checkpoint mnist` with a ./mnist run folder: report the clash, or use the local one."""
    if outcome != "correct":
        return None
    import numpy as np
    rc, _, err = ctx.cli(folder, [*SAMPLE, "--checkpoint", "./mnist/", "--out", "local.npz"])
    if rc != 0:
        return "silent wrong", "exit 0; could not sample ./mnist/ to compare: " + last_line(err)
    with np.load(folder / "s.npz") as a, np.load(folder / "local.npz") as b:
        same = a["images"].shape == b["images"].shape and (a["images"] == b["images"]).all()
    if same:
        return "correct", "the local ./mnist run folder was used"
    return "silent wrong", "exit 0 with the shipped model: the local ./mnist folder was ignored without a word"


def clean_output(obs, ctx, folder, outcome):
    """An evaluation that succeeds must not report NaN or a perfect score for garbage."""
    if outcome == "correct" and re.search(r"\bnan\b", obs.stdout, re.I):
        return "silent wrong", "exit 0 with NaN in the report"
    return None


# ----------------------------------------------------------------------------------------------
# Special runners: two processes on one folder, interrupts

def _start(ctx, case, folder, pkg, argv, log):
    return subprocess.Popen(ctx.cli_command(argv), cwd=folder, env=ctx.env(case, folder, pkg),
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, start_new_session=True)


def _wait_for(path: Path, pattern: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return True
        time.sleep(0.25)
    return False


def two_trains(case, ctx, folder, pkg) -> Observed:
    """A long train on --out run, then a second on the same folder while the first runs."""
    start = time.monotonic()
    first = _start(ctx, case, folder, pkg, ["train", "--out", "run", "--steps", "3000", "--base-channels", "8",
                                            "--batch-size", "8"], folder / "first.log")
    try:
        if not _wait_for(folder / "first.log", r"loss=|\d+/3000", 90):
            return Observed("cli", None, "", "first run never started: " + (folder / "first.log").read_text()[-300:],
                            seconds=time.monotonic() - start)
        rc, out, err, timed_out, _ = ctx.run(ctx.cli_command([*TRAIN, "--out", "run"]), folder,
                                             ctx.env(case, folder, pkg), timeout=case.timeout)
        first_running = first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    obs = Observed("cli", rc, out, err, timed_out, seconds=time.monotonic() - start)
    if rc == 0 and first_running:
        obs.stdout += "\nthe second run trained and saved into the folder the first run was still writing"
    return obs


def interrupted(sig):
    """Train with the default checkpoint interval, send `sig` after some steps, look for a checkpoint."""
    def runner(case, ctx, folder, pkg) -> Observed:
        start = time.monotonic()
        log = folder / "train.log"
        process = _start(ctx, case, folder, pkg, ["train", "--out", "run", "--steps", "100000", "--base-channels", "8"],
                           log)
        try:
            started = _wait_for(log, r"loss=|\b[1-9]\d*/100000", 90)
            time.sleep(4)
            os.killpg(process.pid, sig)
            out, _ = process.communicate(timeout=60)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            timed_out = True
        err = log.read_text(errors="replace")
        obs = Observed("cli", process.returncode, out, err, timed_out, seconds=time.monotonic() - start)
        saved = [p.name for p in (folder / "run").glob("step_*") if (p / "config.json").is_file()]
        if started and not saved:
            obs.work_lost = f"{signal.Signals(sig).name} after some training steps left no checkpoint: the run is lost"
        elif not started:
            obs.stderr += "\ntraining never started"
        else:
            obs.stdout += f"\nsaved {sorted(saved)} on {signal.Signals(sig).name}"
        return obs
    return runner


def interrupt_check(obs, ctx, folder, outcome):
    """After an interrupt: a saved checkpoint and no traceback is right, whatever the exit status."""
    if "Traceback (most recent call last)" in obs.stderr:
        return "traceback", last_line(obs.stderr)
    if "saved [" in obs.stdout:
        return "correct", last_line(obs.stdout) + f" (exit {obs.rc})"
    return None


# ----------------------------------------------------------------------------------------------
# The cases

def cli_cases() -> list[Case]:
    return train_cases() + sample_cases() + edit_cases() + evaluate_cases() + classifier_cases()


def train_cases() -> list[Case]:
    bad = lambda name, *extra, finding="", **kw: Case(  # noqa: E731
        f"train-{name}", finding, [*TRAIN, "--out", "run", *extra], late_failure_loses_work=True, **kw)
    return [
        Case("train-control", "", [*TRAIN, "--out", "run"], expect="ok", check=has_checkpoint("run")),
        bad("lr-inf", "--lr", "inf", finding="3"),
        bad("lr-nan", "--lr", "nan"),
        bad("lr-0", "--lr", "0"),
        bad("lr-negative", "--lr=-1e-3"),
        bad("batch-size-0", "--batch-size", "0", finding="3"),
        bad("batch-size-negative", "--batch-size=-8"),
        Case("train-minutes-nan", "3", ["train", "--out", "run", "--minutes", "nan", "--base-channels", "8",
                                       "--batch-size", "8"], timeout=45),
        Case("train-minutes-inf", "", ["train", "--out", "run", "--minutes", "inf", "--base-channels", "8",
                                      "--batch-size", "8"], timeout=45),
        Case("train-minutes-0", "", ["train", "--out", "run", "--minutes", "0", "--base-channels", "8"]),
        Case("train-minutes-negative", "", ["train", "--out", "run", "--minutes=-1", "--base-channels", "8"]),
        bad("steps-0", "--steps", "0"),
        bad("steps-negative", "--steps=-1"),
        bad("steps-fraction", "--steps", "2.5"),
        Case("train-no-budget", "", ["train", "--out", "run"]),
        bad("base-channels-0", "--base-channels", "0"),
        bad("base-channels-negative", "--base-channels=-8"),
        bad("base-channels-7", "--base-channels", "7"),
        bad("warmup-negative", "--warmup-steps=-1"),
        bad("min-snr-gamma-negative", "--min-snr-gamma=-1"),
        bad("min-snr-gamma-nan", "--min-snr-gamma", "nan"),
        bad("checkpoint-every-negative", "--checkpoint-every=-1"),
        bad("checkpoint-minutes-0", "--checkpoint-minutes", "0"),
        bad("seed-negative", "--seed=-1"),
        bad("device-cuda-no-gpu", "--device", "cuda", finding="10"),
        bad("device-banana", "--device", "banana"),
        bad("dataset-unknown", "--dataset", "imagenet"),
        Case("train-out-is-file", "9", [*TRAIN, "--out", "taken"], setup=write("taken"), watch=("taken",),
             late_failure_loses_work=True),
        Case("train-out-under-file", "9", [*TRAIN, "--out", "taken/run"], setup=write("taken"), watch=("taken",),
             late_failure_loses_work=True),
        Case("train-out-read-only", "9", [*TRAIN, "--out", "locked/run"], setup=mkdir("locked", 0o555),
             as_user=True, late_failure_loses_work=True),
        Case("train-data-root-is-file", "", [*TRAIN, "--out", "run"], setup=write("datafile"),
             env={"DIFFUSION_COURSE_DATA": "{case}/datafile"}, watch=("datafile",)),
        Case("train-full-disk", "10", [*TRAIN, "--out", "run"], file_size_limit=60_000, check=no_leftovers),
        Case("train-same-out-again", "6", [*TRAIN, "--out", "run"], setup=fixture("run2", "run"),
             watch=("run",)),
        Case("train-two-at-once", "6", runner=two_trains, timeout=120),
        Case("train-resume-keeps-user-folder", "5",
             ["train", "--out", "run", "--resume", "--steps", "12", "--checkpoint-every", "2", "--base-channels", "8",
              "--batch-size", "8"],
             setup=in_case(fixture("run2", "run"), write("run/step_00000002_best/notes.txt", "my best samples\n")),
             watch=("run/step_00000002_best",), expect="ok", check=has_checkpoint("run", "step_00000012")),
        Case("train-resume-control", "", [*TRAIN[:2], "4", *TRAIN[3:], "--out", "run", "--resume"],
             setup=fixture("run2", "run"), expect="ok", check=has_checkpoint("run", "step_00000004")),
        *[Case(f"train-resume-other-{what}", "8",
               _resume_argv(extra),
               setup=fixture("run2", "run"), watch=("run/step_00000002",), late_failure_loses_work=True)
          for what, extra in [("lr", ["--lr", "1e-3"]), ("batch-size", ["--batch-size", "16"]),
                              ("schedule", ["--schedule", "linear"]), ("base-channels", ["--base-channels", "16"]),
                              ("unconditional", ["--unconditional"]), ("min-snr-gamma", ["--min-snr-gamma", "0"])]],
        Case("train-ctrl-c-keeps-work", "2", runner=interrupted(signal.SIGINT), expect="ok", check=interrupt_check),
        Case("train-sigterm-keeps-work", "2", runner=interrupted(signal.SIGTERM), expect="ok", check=interrupt_check),
    ]


def _resume_argv(extra: list[str]) -> list[str]:
    """--resume of the fixture run (2 steps, base 8, batch 8, cosine) to 4 steps with one option changed."""
    options = {"--base-channels": "8", "--batch-size": "8"}
    flags = []
    i = 0
    while i < len(extra):
        if extra[i].startswith("--") and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            options[extra[i]] = extra[i + 1]
            i += 2
        else:
            flags.append(extra[i])
            i += 1
    argv = ["train", "--out", "run", "--resume", "--steps", "4", *flags]
    for key, value in options.items():
        argv += [key, value]
    return argv


def sample_cases() -> list[Case]:
    bad = lambda name, *extra, finding="", **kw: Case(f"sample-{name}", finding, [*SAMPLE, *extra], **kw)  # noqa: E731
    return [
        Case("sample-control", "", [*SAMPLE, "--out", "s.npz"], expect="ok", check=output_ok("s.npz")),
        bad("guidance-nan", "--guidance", "nan", finding="3"),
        bad("guidance-inf", "--guidance", "inf"),
        bad("num-0", "--num", "0"),
        bad("num-negative", "--num=-3"),
        bad("num-text", "--num", "ten"),
        bad("steps-0", "--steps", "0"),
        bad("steps-negative", "--steps=-2"),
        bad("batch-size-0", "--batch-size", "0"),
        bad("batch-size-negative", "--batch-size=-1"),
        bad("seed-negative", "--seed=-1"),
        bad("negative-class-10", "--negative", "10"),
        bad("negative-class-minus-1", "--negative=-1"),
        bad("labels-10", "--labels", "10"),
        bad("labels-negative", "--labels=-1"),
        bad("labels-text", "--labels", "seven"),
        bad("labels-empty-item", "--labels", "3,,7"),
        bad("out-png", "--out", "s.png"),
        bad("out-is-folder", "--out", "folder.npz", setup=mkdir("folder.npz"), watch=("folder.npz",)),
        bad("out-under-file", "--out", "taken/s.npz", setup=write("taken"), watch=("taken",)),
        bad("out-read-only", "--out", "locked/s.npz", setup=mkdir("locked", 0o555), as_user=True),
        bad("overwrites-output", "--out", "samples.npz", finding="10",
            setup=in_case(fixture("samples.npz", "samples.npz"), write("samples.png", b"my grid")),
            watch=("samples.npz", "samples.png")),
        bad("full-disk", "--out", "s.npz", finding="10", file_size_limit=400, check=no_leftovers),
        bad("device-cuda-no-gpu", "--device", "cuda", finding="10"),
        bad("checkpoint-missing", "--checkpoint", "nowhere"),
        bad("checkpoint-is-file", "--checkpoint", "notes.txt", setup=write("notes.txt")),
        bad("checkpoint-empty-folder", "--checkpoint", "empty", setup=mkdir("empty")),
        bad("config-missing-key", "--checkpoint", "ck", finding="10",
            setup=in_case(checkpoint_copy("ck"), edit_config("ck", _drop_model_key))),
        bad("config-wrong-type", "--checkpoint", "ck", finding="10",
            setup=in_case(checkpoint_copy("ck"), edit_config("ck", _base_channels_as_text))),
        bad("config-not-json", "--checkpoint", "ck", setup=in_case(checkpoint_copy("ck"), write("ck/config.json", "{"))),
        bad("weights-flipped-bits", "--checkpoint", "ck",
            setup=in_case(checkpoint_copy("ck"), flip_bytes("ck/model.safetensors"))),
        bad("weights-missing", "--checkpoint", "ck",
            setup=in_case(checkpoint_copy("ck"), lambda f, c: (f / "ck" / "model.safetensors").unlink())),
        Case("sample-local-mnist-folder", "7", [*SAMPLE, "--checkpoint", "mnist", "--out", "s.npz"],
             setup=fixture("run2", "mnist"), expect="either", check=local_mnist_used, watch=("mnist",)),
    ]


def edit_cases() -> list[Case]:
    bad = lambda name, *extra, finding="", **kw: Case(  # noqa: E731
        f"edit-{name}", finding, [*EDIT, *(extra if "--image" in extra else ("--test-digit", "0", *extra))], **kw)
    return [
        Case("edit-control", "", [*EDIT, "--test-digit", "0", "--out", "e.npz"], expect="ok", check=output_ok("e.npz")),
        bad("strength-negative", "--strength=-0.1"),
        bad("strength-above-1", "--strength", "1.5"),
        bad("strength-nan", "--strength", "nan"),
        bad("num-0", "--num", "0"),
        bad("steps-0", "--steps", "0"),
        bad("steps-negative", "--steps=-5"),
        bad("label-10", "--label", "10"),
        bad("label-negative", "--label=-1"),
        bad("guidance-nan", "--label", "3", "--guidance", "nan"),
        bad("test-digit-negative", "--test-digit=-1"),
        bad("test-digit-too-big", "--test-digit", "10000"),
        bad("mask-and-strength", "--mask", "left", "--strength", "0.5"),
        bad("image-missing", "--image", "nowhere.png"),
        bad("image-not-an-image", "--image", "notes.png", setup=write("notes.png", "not a picture")),
        bad("image-is-folder", "--image", "pictures", setup=mkdir("pictures")),
        bad("image-huge", "--image", "huge.png", finding="10", setup=huge_png("huge.png"), timeout=90),
        bad("overwrites-output", "--out", "edited.npz", finding="10",
            setup=in_case(fixture("samples.npz", "edited.npz"), write("edited.png", b"my grid")),
            watch=("edited.npz", "edited.png")),
    ]


def evaluate_cases() -> list[Case]:
    def ev(name, finding="", expect="error", **kw):
        return Case(f"evaluate-{name}", finding, ["evaluate", "s.npz"], expect=expect, check=clean_output, **kw)
    import numpy as np
    return [
        ev("control", expect="ok", setup=npz("s.npz", images=lambda i, l: i, labels=lambda i, l: l)),
        ev("nan-images", "4", setup=npz("s.npz", images=lambda i, l: np.full(i.shape, np.nan, np.float32),
                                        labels=lambda i, l: np.zeros_like(l))),
        ev("float-0-1-images", "4", setup=npz("s.npz", images=lambda i, l: i.astype(np.float32) / 255,
                                              labels=lambda i, l: l)),
        ev("labels-10-19", "4", setup=npz("s.npz", images=lambda i, l: i, labels=lambda i, l: l + 10)),
        ev("label-count", "4", setup=npz("s.npz", images=lambda i, l: i, labels=lambda i, l: l[:-3])),
        ev("2d-images", "4", setup=npz("s.npz", images=lambda i, l: i.reshape(len(i), -1), labels=lambda i, l: l)),
        ev("float-labels", "", setup=npz("s.npz", images=lambda i, l: i, labels=lambda i, l: l + 0.5)),
        ev("empty", "", setup=npz("s.npz", images=lambda i, l: i[:0], labels=lambda i, l: l[:0])),
        # Colour 32 x 32 samples are CIFAR-10's shape: since the CIFAR-10 classifier ships, a valid input.
        ev("rgb-32-images", "", expect="ok", setup=npz("s.npz", images=lambda i, l: np.zeros((len(i), 32, 32, 3), np.uint8),
                                                         labels=lambda i, l: l)),
        ev("no-labels-key", "", expect="either", setup=npz("s.npz", images=lambda i, l: i)),
        ev("object-array", "", setup=npz("s.npz", images=lambda i, l: np.array([None, "x"], dtype=object),
                                         labels=lambda i, l: l)),
        Case("evaluate-npy", "4", ["evaluate", "s.npy"], setup=npy("s.npy")),
        Case("evaluate-missing-file", "", ["evaluate", "nothing.npz"]),
        Case("evaluate-text-file", "", ["evaluate", "s.npz"], setup=write("s.npz", "hello")),
        Case("evaluate-folder", "", ["evaluate", "folder"], setup=mkdir("folder")),
        Case("evaluate-damaged-classifier", "1", ["evaluate", "s.npz"], own_package=True,
             setup=in_case(npz("s.npz", images=lambda i, l: i, labels=lambda i, l: l),
                           flip_bytes("{pkg}/pretrained/mnist_classifier/*.safetensors"))),
    ]


def classifier_cases() -> list[Case]:
    shipped = ("{pkg}/pretrained/mnist_classifier",)
    return [
        Case("train-classifier-epochs-0", "1", ["train-classifier", "--epochs", "0"], own_package=True,
             watch=shipped, timeout=180),
        Case("train-classifier-epochs-negative", "1", ["train-classifier", "--epochs=-1"], own_package=True,
             watch=shipped, timeout=180),
        Case("train-classifier-epochs-text", "", ["train-classifier", "--epochs", "two"], own_package=True,
             watch=shipped),
        Case("train-classifier-out-is-file", "", ["train-classifier", "--epochs", "0", "--out", "taken"],
             setup=write("taken"), watch=("taken",), own_package=True, timeout=180),
        Case("train-classifier-seed-negative", "", ["train-classifier", "--epochs", "0", "--seed=-1",
                                                    "--out", "mine"], own_package=True, watch=shipped, timeout=180),
    ]


def library_cases() -> list[Case]:
    def lib(name, code, finding="", expect="error", **kw):
        return Case(f"lib-{name}", finding, code=code, expect=expect, **kw)
    train_config = 'TrainConfig = find("runs.TrainConfig", "training.TrainConfig")\n'
    return [
        lib("trainconfig-grad-clip-negative", train_config + "TrainConfig(steps=2, grad_clip=-1)", "3"),
        lib("trainconfig-lr-nan", train_config + "TrainConfig(steps=2, lr=float('nan'))"),
        lib("trainconfig-batch-size-0", train_config + "TrainConfig(steps=2, batch_size=0)"),
        lib("trainconfig-steps-fraction", train_config + "TrainConfig(steps=2.5)"),
        lib("trainconfig-ema-decay-above-1", train_config + "TrainConfig(steps=2, ema_decay=1.5)"),
        lib("dpm-solver-step-mixed-t-prev", DPM_MIXED, "11", expect="ok"),
        lib("predict-x0-t-minus-1", """
            s = schedule(); x = torch.randn(1, 1, 28, 28)
            out = find("sampling.predict_x0")(x, torch.tensor([-1]), torch.zeros_like(x), s)
            DETAIL = "used the last step's alpha_bar for t = -1"
        """, "11"),
        lib("ddim-eta-negative", DDIM_ETA.format(eta="-1.0"), "11"),
        lib("ddim-eta-nan", DDIM_ETA.format(eta="float('nan')"), "11"),
        lib("img2img-steps-none", IMG2IMG.format(steps="None") + "finite(out); right('img2img ran with None steps')",
            "11", expect="ok"),
        lib("img2img-steps-0", IMG2IMG.format(steps="0"), "11"),
        lib("img2img-steps-negative", IMG2IMG.format(steps="-5"), "11"),
        lib("img2img-strength-nan", IMG2IMG.format(steps="10").replace("strength=0.5", "strength=float('nan')")),
        lib("save-checkpoint-onto-user-folder", """
            save = find("checkpoints.save_checkpoint")
            save("mine", tiny_unet(), schedule())
        """, "11", setup=write("mine/notes.txt"), watch=("mine",)),
        lib("latest-checkpoint-step-final", LATEST_FINAL, "11", expect="ok"),
        lib("load-dataset-limit-negative", """
            d = find("data.load_dataset")("mnist", train=False, limit=-5)
            DETAIL = f"{len(d.images)} images"
        """, "11", timeout=120),
        lib("load-dataset-limit-0", """
            d = find("data.load_dataset")("mnist", train=False, limit=0)
            DETAIL = f"{len(d.images)} images"
        """, timeout=120),
        lib("unetconfig-num-classes-0", "tiny_unet(num_classes=0)", "11"),
        lib("unetconfig-base-channels-0", 'find("unet.UNetConfig")(base_channels=0)'),
        lib("negative-label-3.7", NEGATIVE.format(value="3.7"), "11"),
        lib("negative-label-true", NEGATIVE.format(value="True"), "11"),
        lib("q-sample-t-out-of-range", """
            s = schedule(); x = torch.zeros(1, 1, 28, 28)
            out = find("schedules.q_sample")(x, torch.tensor([s.num_steps]), s)
        """),
        lib("schedule-0-steps", 'find("schedules.linear_schedule")(0)'),
        lib("img2img-start-strength-above-1", """
            s = schedule(); find("editing.img2img_start")(torch.zeros(1, 1, 28, 28), 1.5, s)
        """),
        lib("slerp-weight-nan", """
            out = find("editing.slerp")(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), float('nan'))
            finite(out, "slerp")
        """),
        lib("drop-labels-p-above-1", """
            drop = find("guidance.drop_labels", "training.drop_labels")
            drop(torch.tensor([1, 2, 3]), 10, 1.5)
        """),
        lib("ema-decay-above-1", """
            find("training.EMA")(tiny_unet(), 1.5)
        """),
        lib("timestep-sequence-0", 'find("sampling.timestep_sequence")(0, 999)'),
        lib("evaluate-samples-nan", """
            evaluate = find("metrics.evaluate_samples")
            images = torch.full((20, 1, 28, 28), float('nan'))
            report = evaluate(images, torch.zeros(20, dtype=torch.long))
            DETAIL = str(report)[:120]
        """, "4"),
        lib("train-classifier-epochs-0", """
            train = find("metrics.train_classifier")
            import inspect
            if "dataset" in inspect.signature(train).parameters:
                train("mnist", "mine", epochs=0)
            else:
                train("mine", epochs=0)
        """, "1", timeout=180),
        lib("load-checkpoint-pickle", """
            import pickle, os
            os.makedirs("ck", exist_ok=True)
            with open("ck/model.safetensors", "wb") as f:
                pickle.dump({"x": 1}, f)
            with open("ck/config.json", "w") as f:
                f.write("{}")
            find("checkpoints.load_checkpoint")("ck")
        """),
        lib("generate-num-0", """
            g = find("generate.generate")
            g(ZeroEps(), schedule(), num=0, shape=(1, 28, 28))
        """),
        lib("generate-guidance-nan", """
            g = find("generate.generate")
            out = g(tiny_unet(10), schedule(), num=2, shape=(1, 28, 28), cond=torch.tensor([1, 2]),
                    guidance_scale=float('nan'), sampling_steps=2)
            finite(out, "images")
        """, "3"),
    ]


DPM_MIXED = """
step = find("sampling.dpm_solver_step")
s = schedule()
torch.manual_seed(0)
x, x0 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8).clamp(-1, 1)
t, t_prev = torch.tensor([10, 10]), torch.tensor([-1, 5])
both = step(x, t, t_prev, x0, s)
alone = step(x[1:], t[1:], t_prev[1:], x0[1:], s)
if not torch.allclose(both[0], x0[0]):
    wrong("the t_prev = -1 image is not its x0 prediction")
if not torch.allclose(both[1:], alone, atol=1e-5):
    wrong("the t_prev = 5 image got x0 instead of its own step (the whole batch took the last step)")
right("each image took its own step")
"""

DDIM_ETA = """
sample = find("sampling.ddim_sample")
x = torch.randn(2, 1, 8, 8)
out = sample(ZeroEps(), x, schedule(), eta={eta}, generator=torch.Generator().manual_seed(0))
finite(out, "samples")
"""

IMG2IMG = """
img2img = find("editing.img2img")
x0 = torch.zeros(2, 1, 8, 8)
out = img2img(ZeroEps(), x0, schedule(), strength=0.5, sampler="ddim",
              **kw(img2img, {steps}, "sampling_steps", "num_steps"))
"""

LATEST_FINAL = """
save, latest = find("checkpoints.save_checkpoint"), find("checkpoints.latest_checkpoint")
model, s = tiny_unet(), schedule()
save("run/step_00000002", model, s, step=2)
save("run/step_final", model, s, step=1)
found = latest("run")
if found is not None and found.name == "step_00000002":
    right("step_00000002 (the highest step)")
wrong(f"latest_checkpoint returned {found}")
"""

NEGATIVE = """
CFG = find("guidance.ClassifierFreeGuidance")
model = tiny_unet(10)
guided = CFG(model, 3.0, {value})
x, t = torch.randn(2, 1, 28, 28), torch.tensor([500, 500])
out = guided(x, t, torch.tensor([1, 2]))
DETAIL = "the label was truncated to an integer"
"""


def all_cases() -> list[Case]:
    return cli_cases() + library_cases()


# ----------------------------------------------------------------------------------------------
# Fixtures, the report

def build_fixtures(ctx: Context) -> list[str]:
    """A 2-step run folder and a samples file, made with the version under test (once)."""
    import numpy as np
    notes = []
    folder = ctx.fixtures
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "home").mkdir(exist_ok=True)
    rc, out, err, _, _ = ctx.run(ctx.cli_command([*TRAIN, "--out", "run2"]), folder,
                                 ctx.env(Case("fixture"), folder, ctx.pkg), timeout=300)
    if rc != 0:
        shutil.rmtree(folder / "run2", ignore_errors=True)
        notes.append("fixture run2 (train --steps 2) failed: " + last_line(err))
    images, labels = mnist_test(ctx, 50)
    np.savez(folder / "samples.npz", images=images[:20], labels=labels[:20])
    return notes


def prepare(repo: Path, base: Path, python: str, archives: str) -> Context:
    base.chmod(0o755)
    pkg = base / "pkg" / "diffusion_course"
    shutil.copytree(repo / "diffusion_course", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    data = base / "data"
    data.mkdir()
    ctx = Context(repo, python, base, pkg, base / "fixtures", data, archives)
    # Fill the data folder once (both splits), so that cases only read it.
    warm = "from diffusion_course import data\nfor train in (True, False): data.load_dataset('mnist', train=train)\n"
    ctx.run([python, "-c", warm], base, ctx.env(Case("warm"), base, pkg), timeout=300)
    for path in [data, *data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return ctx


def report(results: list[dict], notes: list[str], repo: Path) -> str:
    width = max(len(r["case"]) for r in results)
    lines = [f"{'case':<{width}}  {'outcome':<12}  detail"]
    for r in results:
        lines.append(f"{r['case']:<{width}}  {r['outcome']:<12}  {r['detail'][:160]}")
    lines.append("")
    lines.append(f"{len(results)} cases against {repo}:")
    for outcome in OUTCOMES:
        lines.append(f"  {outcome:<12} {sum(r['outcome'] == outcome for r in results)}")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def counts(results: list[dict]) -> dict[str, int]:
    return {outcome: sum(r["outcome"] == outcome for r in results) for outcome in OUTCOMES}


def git_commit(repo: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_all(repo: Path, cases: list[Case], *, jobs: int = 2, python: str = sys.executable,
            archives: str | None = None, keep: bool = False, fixtures: bool = True) -> tuple[list[dict], list[str]]:
    """Run `cases` against the package in `repo` (copied first); results in the cases' order, and notes.
    fixtures=False skips building the 2-step run folder (for cases that do not use it)."""
    archives = archives or os.environ.get("DIFFUSION_COURSE_ARCHIVES", "/work/shared/data")
    base = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    try:
        ctx = prepare(repo.resolve(), base, python, archives)
        notes = build_fixtures(ctx) if fixtures else []
        shipped_before = snapshot([ctx.pkg / "pretrained"])
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda case: run_case(case, ctx), cases))
        damaged = changed(shipped_before, ctx.pkg)
        if damaged:
            notes.append("the shared package copy's pretrained files changed during the run: " + ", ".join(damaged))
    finally:
        if not keep:
            _cleanup(base)
    return results, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="a checkout holding diffusion_course/ (default: here)")
    parser.add_argument("--json", help="write the results and counts to this file")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--only", nargs="+", help="run only these cases (names or name prefixes)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--python", default=sys.executable, help="the Python with torch (default: this one)")
    args = parser.parse_args(argv)
    cases = all_cases()
    if args.list:
        for case in cases:
            print(f"{case.name:<40} {('issue item ' + case.finding) if case.finding else ''}")
        print(f"{len(cases)} cases")
        return 0
    if args.only:
        cases = [c for c in cases if any(c.name == o or c.name.startswith(o) for o in args.only)]
    repo = Path(args.repo).resolve()
    commit = git_commit(repo)   # before the run: the package is copied at its start
    results, notes = run_all(repo, cases, jobs=args.jobs, python=args.python)
    print(report(results, notes, repo))
    if args.json:
        Path(args.json).write_text(json.dumps({"repo": str(repo), "commit": commit, "counts": counts(results),
                                               "notes": notes, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
