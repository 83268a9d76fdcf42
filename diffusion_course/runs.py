"""Running a training loop: budget, data order, warm-up, label dropout, EMA, checkpoints, resume.

Ring 2. One step is lesson 03's `training.train_step`; `train` runs it for a budget of steps
and/or minutes on any loss function with the contract

    loss_fn(model, x0, *, cond=None, generator=None) -> scalar tensor

e.g. `functools.partial(training.diffusion_loss, schedule=schedule, min_snr_gamma=5.0)`, so eps,
x0 or v prediction, flow matching and latent models share this one loop.

Nothing a run has learned is lost: with an out_dir the folder is checked and locked before the
first step; a checkpoint is written every `checkpoint_every` steps, every `checkpoint_minutes`
of training, at the end, on Ctrl-C and on SIGTERM; a loss that stops being a finite number ends
the run with a clear error and leaves the last good checkpoint as it was; `resume=True`
continues bit-exactly where the latest checkpoint left off, and refuses settings that differ.

The same loop runs on several processes started by `torchrun --nproc_per_node=N` (one per GPU, or
several on a CPU), with PyTorch's DistributedDataParallel: `batch_size` stays the global batch,
every process draws the same data order and random numbers from the same seed and trains on its
slice of each batch, the gradients are averaged, and rank 0 alone locks the folder, writes the
checkpoints and shows progress. Without torchrun nothing of this happens.

On a CPU, one process cuts each batch into `threads.training_workers()` parts (from what
`threads.use_best_threads` chose; 1 until then) whose forward and backward passes run side by
side in threads, when the loss is one of PER_IMAGE_LOSSES: the same step up to float rounding,
and much faster on a busy machine (README "Threads"). A run resumes bit-exactly with the same
number of parts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoints, threads
from .autoencoder import autoencoder_loss
from .data import random_hflip
from .distill import reflow_loss
from .flow import flow_matching_loss
from .guidance import drop_cond, has_null_cond
from .schedules import NoiseSchedule
from .training import EMA, diffusion_loss, train_step

# TrainConfig fields that may change when a run is resumed: budgets (that is how a run is
# extended) and bookkeeping. Every other field changes the numbers, so it must match.
MAY_CHANGE_ON_RESUME = ("steps", "minutes", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "progress")
# config.json keys written by checkpoints and by this loop; the rest are the caller's `info`.
RUN_KEYS = ("train_config", "seconds", "ema_updates")
OBJECTIVES = ("eps", "flow")   # what train_diffusion trains: noise prediction (lesson 03) or flow matching (lesson 10)
# Losses that are means of one term per image, so that a batch cut into parts (threads.map_parts)
# takes the same step. Any other loss, e.g. lesson 09's contrastive CLIP loss, which compares the
# images of a batch with each other, always sees the whole batch.
PER_IMAGE_LOSSES = (diffusion_loss, flow_matching_loss, reflow_loss, autoencoder_loss)


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _field_checks(c: "TrainConfig") -> list[tuple[str, bool, str]]:
    """(field, is it valid, what is expected) for every TrainConfig field."""
    return [
        ("steps", c.steps is None or (_whole(c.steps) and c.steps >= 1), "a whole number >= 1, or None (no step limit)"),
        ("minutes", c.minutes is None or (_finite(c.minutes) and c.minutes > 0),
         "a finite number of minutes > 0, or None (no time limit)"),
        ("batch_size", _whole(c.batch_size) and c.batch_size >= 1, "a whole number >= 1"),
        ("lr", _finite(c.lr) and c.lr > 0, "a finite number > 0 (4e-3 is usual)"),
        ("warmup_steps", _whole(c.warmup_steps) and c.warmup_steps >= 0, "a whole number >= 0"),
        ("weight_decay", _finite(c.weight_decay) and c.weight_decay >= 0, "a finite number >= 0"),
        ("grad_clip", _finite(c.grad_clip) and c.grad_clip >= 0, "a finite number >= 0 (0: no clipping)"),
        ("ema_decay", _finite(c.ema_decay) and 0 <= c.ema_decay < 1, "a number in [0, 1) (0.999 is usual)"),
        ("label_dropout", _finite(c.label_dropout) and 0 <= c.label_dropout <= 1, "a probability in [0, 1]"),
        ("checkpoint_every", _whole(c.checkpoint_every) and c.checkpoint_every >= 0,
         "a whole number >= 0 (0: not by steps)"),
        ("checkpoint_minutes", c.checkpoint_minutes is None or (_finite(c.checkpoint_minutes) and c.checkpoint_minutes > 0),
         "a finite number of minutes > 0, or None (not by time)"),
        ("keep_checkpoints", _whole(c.keep_checkpoints) and c.keep_checkpoints >= 1, "a whole number >= 1"),
        ("precision", c.precision in ("auto", "float32", "bfloat16"), "'auto', 'float32' or 'bfloat16'"),
        ("hflip", isinstance(c.hflip, bool), "True or False"),
        ("seed", _whole(c.seed), "a whole number"),
        ("progress", isinstance(c.progress, bool), "True or False"),
    ]


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = None        # stop after this many optimizer steps in total (None: no step limit)
    minutes: float | None = 5.0     # stop after this much training wall time in total (None: no time limit)
    batch_size: int = 128           # images per step (under torchrun: in all processes together)
    lr: float = 4e-3                # AdamW learning rate after warm-up
    warmup_steps: int = 100         # the learning rate ramps up linearly over these first steps
    weight_decay: float = 0.0       # AdamW weight decay
    grad_clip: float = 1.0          # clip the gradient norm to this value (0: no clipping)
    ema_decay: float = 0.999        # EMA of the weights: ema = decay * ema + (1 - decay) * weights
    label_dropout: float = 0.1      # probability of replacing a label by the model's null condition
    hflip: bool = False             # flip each image left-right with probability 1/2 (colour photos; not digits)
    checkpoint_every: int = 0       # save a checkpoint every N steps (0: not by steps)
    checkpoint_minutes: float | None = 1.0   # save when this much training time passed since the last save
    keep_checkpoints: int = 5       # how many step_* checkpoints to keep in the run folder
    precision: str = "auto"         # "auto", "float32" or "bfloat16" (see pick_autocast_dtype)
    seed: int = 0                   # seeds batches, timesteps, noise and label dropout
    progress: bool = True           # show a tqdm progress bar

    def __post_init__(self):
        if self.steps is None and self.minutes is None:
            raise ValueError("Give a budget: steps=..., minutes=..., or both.")
        for name, ok, expected in _field_checks(self):
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}.")
        for name, value in asdict(self).items():   # plain Python numbers (e.g. from numpy), so they go to JSON
            if _whole(value):
                object.__setattr__(self, name, int(value))
            elif _finite(value):
                object.__setattr__(self, name, float(value))


class TrainResult(NamedTuple):
    model: nn.Module       # the raw weights after the last step
    ema_model: nn.Module   # the EMA weights: use these to sample
    losses: list           # the loss of every step of this run
    step: int              # total optimizer steps so far (including resumed ones)
    seconds: float         # total training wall time so far (including resumed ones)


def train(model: nn.Module, images: Tensor, loss_fn: Callable[..., Tensor], *, config: TrainConfig = TrainConfig(),
          labels: Tensor | None = None, out_dir: str | Path | None = None, resume: bool = False,
          info: dict | None = None, callback: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `model` on `images`, a (N, C, H, W) float tensor kept in memory (in the model's data
    range: the loader checks it), with `loss_fn(model, x0, cond=..., generator=...)`.

    Args:
        labels: (N, ...) conditions for a conditional model (e.g. (N,) int64 class labels), else None.
        out_dir: run folder for step_* checkpoints; None saves nothing.
        resume: continue from the latest checkpoint in out_dir (budgets are totals, so the same
            command finishes an interrupted run, and a larger budget extends it).
        info: JSON facts recorded in every checkpoint, e.g. {"dataset": "mnist", "schedule":
            schedule.to_config(), "min_snr_gamma": 5.0}; the "schedule" is what load_checkpoint
            returns with the model. On resume they must equal the stored ones.
        callback: called as callback(step, loss) after every step (for live plots; under torchrun
            on rank 0 alone, with the loss of the whole batch).
    Raises:
        KeyboardInterrupt on Ctrl-C, SystemExit(143) on SIGTERM, each after saving a checkpoint;
        FloatingPointError when the loss is not finite (no checkpoint is written for it).
    """
    _check_training_data(model, images, labels)
    facts = _run_facts(info)
    with contextlib.ExitStack() as stack:
        ranks = stack.enter_context(_process_group(images.device, config.batch_size))
        folder = _run_folder(stack, out_dir, ranks.rank)
        run = _start(model, images, labels, loss_fn, config, folder, resume, facts, ranks)
        stop = stack.enter_context(_stop_requests())
        try:
            _run_steps(run, callback, stop)
        except KeyboardInterrupt:
            _save_unless_saved(run)            # a Ctrl-C between steps: keep what was learned
            raise
        finally:
            model.eval()
        _save_unless_saved(run)
        _barrier(run.ranks)                    # the others return once rank 0 has saved
        if stop.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if stop.signum == signal.SIGTERM:
            raise SystemExit(128 + signal.SIGTERM)
    return TrainResult(model, run.ema.model, run.losses, run.step, run.seconds())


def train_diffusion(model: nn.Module, dataset, schedule: NoiseSchedule | None, *, min_snr_gamma: float | None = 5.0,
                    conditional: bool = True, device: str | torch.device = "cpu", objective: str = "eps",
                    **train_options) -> TrainResult:
    """`train` with the course's objective on a loaded data.Dataset: lesson 03's noise-prediction loss
    on `schedule`, each image weighted by min(SNR, gamma) / SNR (Min-SNR; None: off), or with
    objective="flow" lesson 10's flow matching (no schedule; sampled with Euler or Heun). What
    `diffusion-course train`, the benchmarks and lesson 03 run; the objective, the schedule, the
    dataset's name and gamma are recorded in every checkpoint. train_options go to `train` (config,
    out_dir, ...). Under torchrun, device "cuda" means this process's own GPU (see process_device)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} (eps: noise prediction, lesson 03; flow: flow "
                         f"matching, lesson 10), got {objective!r}.")
    device = process_device(device)
    model.to(device)
    if objective == "flow":
        loss_fn, info = flow_matching_loss, {"dataset": dataset.name, "objective": "flow"}
    else:
        loss_fn = functools.partial(diffusion_loss, schedule=schedule, min_snr_gamma=min_snr_gamma)
        info = {"dataset": dataset.name, "schedule": schedule.to_config(), "min_snr_gamma": min_snr_gamma}
    labels = dataset.labels.to(device) if conditional else None
    return train(model, dataset.images.to(device), loss_fn, labels=labels, info=info, **train_options)


def check_device(name: str | torch.device) -> torch.device:
    """The torch.device called `name`, or a clear error when this machine does not have it."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"Unknown device {str(name)!r} ({error}); expected cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {name}: no CUDA GPU is available here (use cpu).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"Device {name}: Apple's MPS is not available here (use cpu).")
    return device


class Ranks(NamedTuple):
    rank: int          # this process's number, 0 .. world_size - 1 (rank 0 writes)
    world_size: int    # how many processes train together (1: no torchrun)


def launched_world_size() -> int:
    """How many processes train together: torchrun's WORLD_SIZE (or that of a process group the
    caller started), 1 for a plain `python` or a notebook."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0, the process that writes and prints, and always without torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def process_device(name: str | torch.device) -> torch.device:
    """The device this process trains on. Under torchrun "cuda" means the process's own GPU,
    cuda:LOCAL_RANK, which also becomes the current CUDA device; otherwise the device called `name`."""
    device = torch.device(name)
    if device.type == "cuda" and launched_world_size() > 1:
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def _process_group(device: torch.device, batch_size: int) -> Iterator[Ranks]:
    """This process's Ranks. Under torchrun the process group of the run (gloo on CPUs, NCCL on
    GPUs) starts here, unless the caller started one, and ends with the run. (To train several
    times in one process, start it yourself with dist.init_process_group: a second group started
    after the first ended can find the first one's stale addresses and hang.)"""
    world_size = launched_world_size()
    if world_size == 1:
        yield Ranks(0, 1)
        return
    if batch_size % world_size:
        raise ValueError(f"TrainConfig.batch_size is the global batch, split evenly over the {world_size} "
                         f"processes torchrun started; {batch_size} does not divide by {world_size}. Use a "
                         f"multiple of {world_size}, e.g. {world_size * math.ceil(batch_size / world_size)}.")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size())
    finally:
        if started:
            dist.destroy_process_group()


def _run_folder(stack: contextlib.ExitStack, out_dir: str | Path | None, rank: int) -> Path | None:
    """The run folder, checked and locked by rank 0 alone (the others only read it, to resume)."""
    if out_dir is None:
        return None
    if rank == 0:
        return stack.enter_context(checkpoints.lock_run_folder(out_dir))
    return Path(out_dir)


def _barrier(ranks: Ranks) -> None:
    """Wait until every process got here (nothing to wait for without torchrun)."""
    if ranks.world_size > 1:
        dist.barrier()


def cpu_has_fast_bfloat16() -> bool:
    """True when this CPU has native bfloat16 matrix units (Intel AMX), where bfloat16 autocast
    trains small U-Nets 1.5-2x faster. Without them bfloat16 is emulated and often slower."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if is_amx is not None:
        return bool(is_amx())
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def pick_autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast to, or None for plain float32.

    "auto": bfloat16 on a CUDA GPU that supports it and on a CPU with AMX; float32 elsewhere.
    """
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_fast_bfloat16():
        return torch.bfloat16
    return None


@dataclass
class _Run:
    """Everything the loop carries from step to step."""
    model: nn.Module
    images: Tensor
    labels: Tensor | None
    loss_fn: Callable[..., Tensor]
    config: TrainConfig
    folder: Path | None
    facts: dict                 # the caller's info, as JSON
    optimizer: torch.optim.Optimizer
    ema: EMA
    generator: torch.Generator
    autocast_dtype: torch.dtype | None
    order: Tensor               # the rest of the current pass over the data
    step: int = 0
    start: float = 0.0          # perf_counter() at which this run's training time would be 0
    saved_step: int = 0
    saved_at: float = 0.0       # perf_counter() at the last save (or the start)
    in_step: bool = False       # True while a step is half done (its state is not worth saving)
    losses: list = field(default_factory=list)
    ranks: Ranks = Ranks(0, 1)  # this process among those torchrun started
    net: nn.Module | None = None  # what the optimizer steps run: the model, or its DistributedDataParallel wrapper
    workers: int = 1            # parts of each batch trained side by side (threads.training_workers() on a CPU)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


class _StopRequest:
    """A signal handler that asks the loop to stop after the current step. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


@contextlib.contextmanager
def _stop_requests() -> Iterator[_StopRequest]:
    """Route SIGINT and SIGTERM to a _StopRequest while the block runs, then restore the old handlers
    (only in the main thread, the one where Python runs signal handlers)."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def _start(model, images, labels, loss_fn, config, folder, resume, facts, ranks) -> _Run:
    device = images.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    run = _Run(model, images, labels, loss_fn, config, folder, facts, optimizer, EMA(model, config.ema_decay),
               torch.Generator(device).manual_seed(config.seed), pick_autocast_dtype(device, config.precision),
               torch.empty(0, dtype=torch.long, device=device), ranks=ranks, net=model)
    seconds = 0.0
    if folder is not None:
        checkpoints.model_type(model)          # an unsaveable model fails now, not after the training
        if ranks.rank == 0:
            checkpoints.clean_leftovers(folder)
        _barrier(ranks)                        # every process reads the folder rank 0 has locked and tidied
        latest = checkpoints.latest_checkpoint(folder)
        if latest is not None and not resume:
            raise FileExistsError(f"{folder} already holds checkpoints of a training run. Pass resume=True "
                                  "(--resume) to continue it, or choose another folder.")
        if latest is not None:
            seconds = _resume(run, latest)
    if ranks.world_size > 1:                   # averages the gradients of all processes in backward()
        _check_same_step(run)
        run.net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    loss = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
    if device.type == "cpu" and ranks.world_size == 1 and loss in PER_IMAGE_LOSSES:
        run.workers = threads.training_workers()
    run.saved_step = run.step
    run.start = time.perf_counter() - seconds
    run.saved_at = time.perf_counter()
    return run


def _resume(run: _Run, folder: Path) -> float:
    """Load the run state of `folder` into `run`; returns the training seconds it had already taken."""
    _check_same_run(checkpoints.read_info(folder), run, folder)
    state = checkpoints.load_run_state(folder, run.model, run.ema.model, run.optimizer, generator=run.generator)
    run.step, run.order = state.step, state.order.to(run.images.device)
    run.ema.num_updates = state.info.get("ema_updates", 0)
    return state.info["seconds"]


def _check_same_run(stored: dict, run: _Run, folder: Path) -> None:
    """Refuse to resume with a model, training config or info that differs from the stored one."""
    differences = _differences("model", {"type": stored.get("type", "unet"), **stored.get("model", {})},
                               _as_json({"type": checkpoints.model_type(run.model),
                                         **run.model.config.to_dict()}, "model config"))
    stored_config, config = stored.get("train_config", {}), asdict(run.config)
    differences += _differences("train_config", {k: v for k, v in stored_config.items() if k in config},
                                {k: v for k, v in config.items() if k in stored_config}, MAY_CHANGE_ON_RESUME)
    stored_facts = {k: v for k, v in stored.items() if k not in checkpoints.RESERVED_KEYS + RUN_KEYS}
    differences += _differences("info", stored_facts, run.facts)
    if differences:
        raise ValueError(f"Cannot resume the run in {folder.parent}: this run differs from the stored one in "
                         + "; ".join(differences) + ". Use the stored settings, or start a new run in another folder.")


def _check_same_step(run: _Run) -> None:
    """Under torchrun, refuse to go on when the processes start from different steps (on several
    machines, those that cannot see rank 0's run folder would start from scratch)."""
    steps = torch.tensor([run.step, -run.step], device=run.images.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if steps[0] != -steps[1]:
        raise ValueError(f"The {run.ranks.world_size} processes found different checkpoints in {run.folder} "
                         f"(steps {-int(steps[1])} to {int(steps[0])}): every process must see the same run "
                         "folder (on several machines, a folder they share).")


def _differences(where: str, stored: dict, new: dict, ignore: tuple = ()) -> list[str]:
    missing = "(not set)"
    return [f"{where}.{key} (stored {stored.get(key, missing)!r}, now {new.get(key, missing)!r})"
            for key in sorted(set(stored) | set(new)) if key not in ignore and stored.get(key) != new.get(key)]


def _run_steps(run: _Run, callback, stop: _StopRequest) -> None:
    config = run.config
    main = run.ranks.rank == 0
    bar = tqdm(total=config.steps, initial=run.step, disable=not (config.progress and main), desc="training",
               unit="step")
    run.model.train()
    # With batches cut into parts, the loop's own small work runs at the parts' thread count too.
    small_work = threads.torch_threads(threads.threads_each()) if run.workers > 1 else contextlib.nullcontext()
    with bar, small_work:
        while not _should_stop(run, stop):
            loss = _one_step(run)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", minutes=f"{run.seconds() / 60:.1f}", refresh=False)
            if callback is not None and main:
                callback(run.step, loss)
            if _checkpoint_due(run):
                _save(run)


def _one_step(run: _Run) -> float:
    """One batch: the next images of the data order, label dropout, warm-up, train_step, EMA."""
    config, device = run.config, run.images.device
    run.in_step = True
    if run.order.numel() < config.batch_size:    # a new pass over the data in a new random order
        run.order = torch.randperm(run.images.shape[0], device=device, generator=run.generator)
    index, run.order = run.order[:config.batch_size], run.order[config.batch_size:]
    cond = None
    if run.labels is not None:
        null_cond = run.model.null_cond(len(index), device)
        cond = drop_cond(run.labels[index], null_cond, config.label_dropout, run.generator)
    images = random_hflip(run.images[index], run.generator) if config.hflip else run.images[index]
    x0, cond, draws = _share_of_batch(run, images, cond)
    for group in run.optimizer.param_groups:     # linear warm-up
        group["lr"] = config.lr * min(1.0, (run.step + 1) / max(1, config.warmup_steps))
    parts = threads.batch_parts(len(x0), run.workers)
    if len(parts) > 1:
        loss = _step_in_parts(run, x0, cond, parts)
    else:
        loss = train_step(run.net, run.optimizer, x0, run.loss_fn, cond=cond,
                          grad_clip=config.grad_clip, autocast_dtype=run.autocast_dtype, **draws)
    loss = _mean_over_processes(run, loss)
    if not math.isfinite(loss):
        kept = "" if run.folder is None else f" The last good checkpoint stays in {run.folder}."
        raise FloatingPointError(f"The loss became {loss} at step {run.step + 1}: training diverged (try a "
                                 f"smaller lr than {config.lr}, or grad_clip). No checkpoint was written for it.{kept}")
    run.ema.update(run.model)
    run.step += 1
    run.losses.append(loss)
    run.in_step = False
    return loss


def _share_of_batch(run: _Run, x0: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None, dict]:
    """This process's share of the global batch (x0, cond) and the random draws for its loss.

    One process: all of it; the loss draws t and noise from the run's generator. Under torchrun
    every process has drawn the same batch from the same generator and takes its own slice, with
    its slice's draws (see _draws).
    """
    if run.ranks.world_size == 1:
        return x0, cond, {"generator": run.generator}
    size = x0.shape[0] // run.ranks.world_size
    slices = [slice(rank * size, (rank + 1) * size) for rank in range(run.ranks.world_size)]
    mine = slices[run.ranks.rank]
    return x0[mine], None if cond is None else cond[mine], _draws(run, x0, slices)[run.ranks.rank]


def _draws(run: _Run, x0: Tensor, slices: list[slice]) -> list[dict]:
    """The random numbers of the loss for each slice of the batch x0 (a process's, or a thread's).

    For diffusion_loss, its t and noise are drawn for the whole batch, in its own order, and
    sliced: the slices together use exactly the numbers one call on the whole batch would. Another
    loss function gets a generator for each slice, seeded from the run's (reproducible, but not
    those numbers).
    """
    if isinstance(run.loss_fn, functools.partial) and run.loss_fn.func is diffusion_loss:
        t = torch.randint(0, run.loss_fn.keywords["schedule"].num_steps, (x0.shape[0],), device=x0.device,
                          generator=run.generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=run.generator)
        return [{"t": t[part], "noise": noise[part]} for part in slices]
    seed = int(torch.randint(2**62, (1,), device=x0.device, generator=run.generator))
    return [{"generator": torch.Generator(x0.device).manual_seed(seed + index)} for index in range(len(slices))]


def _step_in_parts(run: _Run, x0: Tensor, cond: Tensor | None, parts: list[slice]) -> float:
    """train_step with the batch cut into parts whose forward and backward passes run side by side,
    each in its own thread (threads.map_parts). Each part's loss is weighted by its share of the
    batch and its gradients are added up in part order, so the step is the whole batch's up to
    float rounding, and the same from run to run."""
    draws = _draws(run, x0, parts)
    params = [p for p in run.model.parameters() if p.requires_grad]
    device_type = x0.device.type

    def loss_and_gradients(index: int) -> tuple[float, tuple]:
        part = parts[index]
        share = (part.stop - part.start) / x0.shape[0]
        with torch.autocast(device_type, dtype=run.autocast_dtype or torch.float32,
                            enabled=run.autocast_dtype is not None):
            loss = run.loss_fn(run.net, x0[part], cond=None if cond is None else cond[part], **draws[index])
        return loss.item() * share, torch.autograd.grad(loss * share, params, allow_unused=True)

    results = threads.map_parts(loss_and_gradients, range(len(parts)))
    run.optimizer.zero_grad(set_to_none=True)
    for param, gradients in zip(params, zip(*(gradients for _, gradients in results))):
        present = [g for g in gradients if g is not None]
        param.grad = functools.reduce(torch.add, present) if present else None
    if run.config.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    run.optimizer.step()
    return sum(loss for loss, _ in results)


def _mean_over_processes(run: _Run, loss: float) -> float:
    """The loss of the whole batch: the mean of the processes' losses on their equal slices."""
    if run.ranks.world_size == 1:
        return loss
    total = torch.tensor([loss], dtype=torch.float64, device=run.images.device)
    dist.all_reduce(total)
    return total.item() / run.ranks.world_size


def _should_stop(run: _Run, stop: _StopRequest) -> bool:
    """Stop on a signal or a spent budget. Under torchrun the processes vote, and all stop when any
    says so: their clocks differ a little, and a process that stopped alone would leave the others
    waiting for it forever."""
    wants_to = stop.signum is not None or _budget_spent(run.config, run.step, run.seconds())
    if run.ranks.world_size == 1:
        return wants_to
    vote = torch.tensor([float(wants_to)], device=run.images.device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


def _budget_spent(config: TrainConfig, step: int, seconds: float) -> bool:
    if config.steps is not None and step >= config.steps:
        return True
    return config.minutes is not None and seconds >= 60 * config.minutes


def _checkpoint_due(run: _Run) -> bool:
    config = run.config
    if run.folder is None or run.ranks.rank != 0:
        return False
    if config.checkpoint_every and run.step % config.checkpoint_every == 0:
        return True
    return config.checkpoint_minutes is not None and time.perf_counter() - run.saved_at >= 60 * config.checkpoint_minutes


def _save_unless_saved(run: _Run) -> None:
    if run.folder is not None and run.ranks.rank == 0 and run.saved_step != run.step and not run.in_step:
        _save(run)


def _save(run: _Run) -> None:
    """Write step_{step:08d} (EMA weights + run state), then prune the oldest checkpoints."""
    for name, tensor in list(run.model.state_dict().items()) + list(run.ema.model.state_dict().items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FloatingPointError(f"The weights ({name}) are no longer finite after step {run.step}: training "
                                     f"diverged. No checkpoint was written; the last good one stays in {run.folder}.")
    facts = {**run.facts, "train_config": asdict(run.config), "seconds": run.seconds(),
             "ema_updates": run.ema.num_updates}
    checkpoints.save_run_state(run.folder / f"step_{run.step:08d}", run.model, run.ema.model, run.optimizer,
                               generator=run.generator, order=run.order, step=run.step, info=facts)
    checkpoints.prune_checkpoints(run.folder, run.config.keep_checkpoints)
    run.saved_step, run.saved_at = run.step, time.perf_counter()


def _check_training_data(model: nn.Module, images: Tensor, labels: Tensor | None) -> None:
    """Shape, dtype and finiteness (the data range is checked where the data is loaded)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float (N, C, H, W) tensor, got {got}.")
    if images.shape[0] == 0:
        raise ValueError("images is empty: there is nothing to train on.")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"images must be finite numbers, got {int((~torch.isfinite(images)).sum())} NaN or "
                         "infinite values.")
    if labels is not None and not has_null_cond(model):
        raise ValueError("labels were given but the model is unconditional (it has no null condition).")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape[:1] != images.shape[:1]):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape ({images.shape[0]},) (one per image), got {got}.")


def _run_facts(info: dict | None) -> dict:
    """The caller's info as JSON, checked before the first step (not at the first save)."""
    facts = _as_json(info or {}, "info")
    clash = sorted(set(facts) & set(checkpoints.RESERVED_KEYS + RUN_KEYS))
    if clash:
        raise ValueError(f"info may not set {clash}: the checkpoints and the loop write these keys themselves.")
    return facts


def _as_json(facts: dict, what: str) -> dict:
    """facts as they read back from config.json (tuples become lists); a clear error if not JSON."""
    try:
        return json.loads(json.dumps(facts))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must hold JSON values (numbers, strings, lists, dicts): {error}.") from None
