"""Save and load models as a folder: weights in safetensors, everything else in JSON.

Ring 2. A checkpoint folder holds:

    model.safetensors            the weights to sample with (the EMA weights when training)
    config.json                  model type and config, schedule, step, the caller's facts (data set,
                                 loss options, ...), and a SHA-256 of each file
    training_state.safetensors   optional: raw weights, optimizer moments, RNG state and data order,
                                 for resuming (see save_run_state)

config.json's "type" names the model class in MODELS (files without it are "unet"), so any
registered model can be saved and loaded; the schedule is optional (flow-matching models have none).

safetensors stores plain tensors, so loading never unpickles anything (a pickle can run code).
Writes are atomic: the folder is written under a temporary name and renamed into place, so a
crash mid-save leaves the previous checkpoint as it was. A training run keeps its checkpoints
as step_00001000/, step_00002000/, ... inside one run folder (exactly "step_" and 8 digits; a
user's step_final/ is not one of them); loading a run folder picks the latest. Pruning and
clean-up touch only those folders and this package's own temporary ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .autoencoder import Autoencoder, AutoencoderConfig
from .schedules import NoiseSchedule, schedule_from_config
from .text import CLIPConfig, MiniCLIP, TextUNet, TextUNetConfig
from .unet import UNet, UNetConfig

FORMAT = "diffusion-course-checkpoint"
VERSION = 1
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
# config.json "type" -> (model class, config class with to/from_dict); model_type takes the first
# isinstance match, so a UNet subclass (TextUNet) comes before "unet".
MODELS = {"text_unet": (TextUNet, TextUNetConfig), "mini_clip": (MiniCLIP, CLIPConfig), "unet": (UNet, UNetConfig),
          "autoencoder": (Autoencoder, AutoencoderConfig)}
RESERVED_KEYS = ("format", "version", "type", "model", "step", "sha256", "optimizer_param_groups")
LOCK_FILE = ".lock"

_STEP_NAME = re.compile(r"step_\d{8}")
_LEFTOVER_NAME = re.compile(r"\.(step_\d{8})\.(partial|old)-(\d+)|\.deleting-(step_\d{8})-(\d+)")


class Checkpoint(NamedTuple):
    model: nn.Module                # in eval mode, on the requested device
    schedule: NoiseSchedule | None  # the schedule the model was trained with (None if it has none)
    info: dict                      # the parsed config.json (step, dataset, training config, ...)
    path: Path                      # the checkpoint folder that was loaded


class RunState(NamedTuple):
    step: int      # optimizer steps taken so far
    order: Tensor  # (K,) int64: the image indices left in the current pass over the data
    info: dict     # the parsed config.json


def model_type(model: nn.Module) -> str:
    """The MODELS name of the model's class (raises a clear error for an unregistered model)."""
    for name, (model_class, _) in MODELS.items():
        if isinstance(model, model_class):
            return name
    raise ValueError(f"Cannot save a {type(model).__name__}: checkpoints know the model types "
                     f"{sorted(MODELS)} (add it to checkpoints.MODELS).")


def save_checkpoint(path: str | Path, model: nn.Module, schedule: NoiseSchedule | None = None, *,
                    step: int = 0, info: dict | None = None,
                    training_state: dict[str, Tensor] | None = None) -> Path:
    """Write `model` (and optionally a training state) to the folder `path`, atomically.

    Args:
        schedule: recorded as config.json's "schedule"; None records none (unless info has one).
        info: JSON-serialisable facts to record at the top level of config.json (dataset, training
            config, loss options, ...); it may not use the keys in RESERVED_KEYS.
        training_state: flat dict of tensors needed to resume training.
    Returns:
        The checkpoint folder.
    Raises:
        FileExistsError: `path` exists and is not an empty folder or a checkpoint of this package.
    """
    path = Path(path)
    config = _config_json(model, schedule, step, info)
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {"model.safetensors": _state_on_cpu(model.state_dict())}
        if training_state is not None:
            files["training_state.safetensors"] = _state_on_cpu(training_state)
        for name, tensors in files.items():
            try:
                save_file(tensors, str(tmp / name))
            except SafetensorError as error:     # e.g. a full disk, reported by the Rust writer
                raise OSError(f"Could not write the checkpoint {path} ({error}); is the disk full?") from None
            config["sha256"][name] = sha256(tmp / name)
        _write_synced(tmp / "config.json", json.dumps(config, indent=2).encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # the previous checkpoint, if any, is untouched
        raise
    _replace_dir(tmp, path)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder, a training run folder (its latest checkpoint), or "mnist"
    (the model shipped with the course). Raises a clear error for anything else."""
    folder = resolve_checkpoint(path)
    info = read_info(folder)
    model = build_model(info, folder)
    _load_weights(model, _load_verified(folder, "model.safetensors", info), folder)
    model.to(device).eval()
    schedule = None if info.get("schedule") is None else schedule_from_config(info["schedule"])
    return Checkpoint(model, schedule, info, folder)


def build_model(info: dict, folder: Path | str = "config.json") -> nn.Module:
    """A fresh model of the type and config recorded in a parsed config.json ("unet" when no type)."""
    name = info.get("type", "unet")
    if name not in MODELS:
        raise ValueError(f"{folder}: unknown model type {name!r}; expected one of {sorted(MODELS)}.")
    model_class, config_class = MODELS[name]
    return model_class(config_class.from_dict(info["model"]))


def load_training_state(folder: str | Path) -> dict[str, Tensor]:
    """The tensors saved with `training_state=` (raises if the checkpoint has none)."""
    folder = Path(folder)
    info = read_info(folder)
    if "training_state.safetensors" not in info["sha256"]:
        raise FileNotFoundError(f"{folder} has no training state to resume from.")
    return _load_verified(folder, "training_state.safetensors", info)


def save_run_state(path: str | Path, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer,
                   *, generator: torch.Generator, order: Tensor, step: int, info: dict | None = None) -> Path:
    """Save a training run's checkpoint: `ema_model` to sample with, plus what resuming needs (the
    raw weights of `model`, the optimizer's state_dict, the generator's state and the data order)."""
    optimizer_state = optimizer.state_dict()
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    for index, param_state in optimizer_state["state"].items():
        for key, value in param_state.items():
            state[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
    state["rng"] = generator.get_state()
    state["order"] = order.cpu()
    facts = {**(info or {}), "optimizer_param_groups": optimizer_state["param_groups"]}
    return save_checkpoint(path, ema_model, None, step=step, info=facts, training_state=state)


def load_run_state(folder: str | Path, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer,
                   *, generator: torch.Generator) -> RunState:
    """Restore what save_run_state saved into `model`, `ema_model`, `optimizer` and `generator`."""
    folder = Path(folder)
    info = read_info(folder)
    state = load_training_state(folder)
    _load_weights(model, {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, folder)
    _load_weights(ema_model, _load_verified(folder, "model.safetensors", info), folder)
    optimizer_state = optimizer.state_dict()
    groups = info.get("optimizer_param_groups", optimizer_state["param_groups"])   # JSON made tuples lists:
    optimizer_state["param_groups"] = [{key: tuple(value) if isinstance(fresh.get(key), tuple) else value
                                        for key, value in group.items()}
                                       for group, fresh in zip(groups, optimizer_state["param_groups"])]
    for key, value in state.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(optimizer_state)
    generator.set_state(state["rng"])
    return RunState(info["step"], state.get("order", torch.empty(0, dtype=torch.long)), info)


def resolve_checkpoint(path: str | Path) -> Path:
    """Turn a checkpoint folder, a run folder or a shipped model's name ("mnist", or "pretrained:mnist")
    into one checkpoint folder. A folder of yours named like a shipped model wins over it; a folder of
    that name holding no checkpoint is a clash, reported with how to choose."""
    name = str(path).removeprefix("pretrained:")
    shipped = PRETRAINED_DIR / name
    if str(path).startswith("pretrained:") or (name in shipped_models() and not Path(path).exists()):
        if name not in shipped_models():
            raise FileNotFoundError(f"No shipped model called {name!r}; the course ships {shipped_models()}.")
        return shipped
    path = Path(path)
    if name in shipped_models() and path.is_dir() and not (path / "config.json").is_file() \
            and latest_checkpoint(path) is None:
        raise ValueError(f"{name!r} is both a shipped model and the folder ./{path}, which holds no checkpoint: "
                         f"say 'pretrained:{name}' for the shipped model, or train into ./{path} first.")
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"No checkpoint at {path}: expected a folder with config.json and "
                                "model.safetensors, a training run folder with step_* checkpoints, "
                                f"or a shipped model's name ({', '.join(shipped_models())}).")
    return latest


def shipped_models() -> list[str]:
    """The names of the models shipped inside the package ("mnist", ...)."""
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file() and "classifier" not in p.name)


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run folder's own checkpoints (step_ + 8 digits, with a config.json of this package), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _STEP_NAME.fullmatch(p.name) and _is_ours(p))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step_* checkpoint with the highest step in a run folder, or None."""
    folders = run_checkpoints(run_dir)
    return folders[-1] if folders else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` of the run folder's own checkpoints (those whose config.json
    this package wrote). Each is first renamed to a hidden .deleting-* name, so a crash midway
    never leaves a step_* folder with config.json but no weights."""
    ours = run_checkpoints(run_dir)
    for folder in ours[:max(0, len(ours) - keep)]:
        doomed = folder.with_name(f".deleting-{folder.name}-{os.getpid()}")
        os.rename(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(run_dir: str | Path) -> None:
    """Remove what killed saves and prunes of dead processes (or earlier ones of this process) left
    in a run folder: .step_N.partial-PID and .deleting-step_N-PID folders; a .step_N.old-PID folder
    is moved back to step_N when the save that moved it aside never put the new one in place."""
    for leftover in Path(run_dir).iterdir():
        match = _LEFTOVER_NAME.fullmatch(leftover.name)
        if match is None or not leftover.is_dir():
            continue
        name, kind, pid = match.group(1) or match.group(4), match.group(2), int(match.group(3) or match.group(5))
        if pid != os.getpid() and pid_alive(pid):
            continue
        target = leftover.with_name(name)
        if kind == "old" and not target.exists() and _is_ours(leftover):
            os.rename(leftover, target)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def lock_run_folder(run_dir: str | Path) -> Iterator[Path]:
    """Check that run_dir can hold a run (a writable folder, created if missing) and hold it with a
    lock file (created atomically, holding this PID) while the block runs. A lock of a process
    that is no longer alive is taken over; a live one raises FileExistsError."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"The run folder {run_dir} is a file, not a folder. Choose another path.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _create_lock(run_dir / LOCK_FILE)
    except PermissionError:
        raise PermissionError(f"Cannot write to the run folder {run_dir}: permission denied. "
                              "Choose a writable folder.") from None
    try:
        yield run_dir
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(os.getpid()):
                lock.unlink()


def pid_alive(pid: int) -> bool:
    """True when a process with this id runs (or might: on Windows, and when we may not ask)."""
    if os.name == "nt":
        return True                            # os.kill(pid, 0) would end the process there
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)                        # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_info(folder: Path) -> dict:
    try:
        info = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{Path(folder) / 'config.json'} is missing or not valid JSON ({error}).") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        got = info if not isinstance(info, dict) else f"format={info.get('format')!r}, version={info.get('version')!r}"
        raise ValueError(f"{folder} is not a diffusion-course checkpoint (version {VERSION}): {got}.")
    for key, kind in (("model", dict), ("sha256", dict), ("step", int)):
        if not isinstance(info.get(key), kind):
            raise ValueError(f"{Path(folder) / 'config.json'} is damaged: {key!r} should be a {kind.__name__}, "
                             f"got {info.get(key, 'nothing')!r}.")
    if info.get("schedule") is not None and not isinstance(info["schedule"], dict):
        raise ValueError(f"{Path(folder) / 'config.json'} is damaged: 'schedule' should be a dict, got {info['schedule']!r}.")
    return info


def _config_json(model: nn.Module, schedule: NoiseSchedule | None, step: int, info: dict | None) -> dict:
    info = dict(info or {})
    reserved = [key for key in info if key in RESERVED_KEYS and key != "optimizer_param_groups"]
    if reserved:
        raise ValueError(f"info may not set {reserved}: checkpoints write these keys themselves.")
    if schedule is not None:
        if info.get("schedule", schedule.to_config()) != schedule.to_config():
            raise ValueError(f"info['schedule'] {info['schedule']} differs from the schedule given, "
                             f"{schedule.to_config()}.")
        info["schedule"] = schedule.to_config()
    config = {"format": FORMAT, "version": VERSION, "type": model_type(model), "model": model.config.to_dict(),
              "schedule": None, "step": int(step), "sha256": {}, **info}
    json.dumps(config)                         # fail before writing anything when info is not JSON
    return config


def _check_replaceable(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and (not any(path.iterdir()) or _is_ours(path)):
        return
    raise FileExistsError(f"Refusing to replace {path}: it exists and is not a diffusion-course checkpoint "
                          "(no config.json of ours in it). Choose another path, or move it away yourself.")


def _is_ours(folder: Path) -> bool:
    try:
        read_info(folder)
    except ValueError:
        return False
    return True


def _create_lock(lock: Path) -> Path:
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and owner != os.getpid() and pid_alive(owner):
                raise FileExistsError(f"{lock.parent} is in use by another training run (process {owner}, lock "
                                      f"file {lock}). Wait for it to finish or choose another folder; if no such "
                                      "run is alive, delete the lock file.") from None
            lock.unlink(missing_ok=True)       # a stale lock: its process is gone
            continue
        with os.fdopen(descriptor, "w") as f:
            f.write(f"{os.getpid()}\n")
        return lock
    raise FileExistsError(f"Could not take the lock file {lock}: another process keeps creating it.")


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _load_weights(model: nn.Module, state: dict[str, Tensor], folder: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"The weights in {folder} do not match the model config in its config.json: "
                         f"{str(error).splitlines()[0]}") from None


def _load_verified(folder: Path, name: str, info: dict) -> dict[str, Tensor]:
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; the checkpoint is incomplete.")
    expected = info["sha256"].get(name)
    if expected != sha256(file):
        raise ValueError(f"{file} is damaged or truncated: its SHA-256 does not match the one recorded "
                         "in config.json. Use another checkpoint or retrain.")
    try:
        return load_file(str(file))
    except SafetensorError as error:
        raise ValueError(f"{file} is not a readable safetensors file ({error}).") from None


def _state_on_cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}


def sha256(file: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MB blocks (checkpoints and shipped classifiers record it)."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder tmp to path. If path exists it is moved aside first and deleted
    only after the new folder is in place."""
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
