"""Save and load models as a folder: weights in safetensors, everything else in JSON.

A checkpoint folder holds:

    model.safetensors            the weights to sample with (the EMA weights when training)
    config.json                  model config, schedule, step, data set, and a SHA-256 of each file
    training_state.safetensors   optional: raw weights, optimizer moments and RNG state, for resuming

safetensors stores plain tensors, so loading never unpickles anything (a pickle can run code).
Writes are atomic: the folder is written under a temporary name and renamed into place, so a
crash mid-save leaves the previous checkpoint as it was. A training run keeps its checkpoints
as step_00001000/, step_00002000/, ... inside one run folder; loading a run folder picks the latest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .schedules import NoiseSchedule, schedule_from_config
from .unet import UNet, UNetConfig

FORMAT = "diffusion-course-checkpoint"
VERSION = 1
PRETRAINED_DIR = Path(__file__).parent / "pretrained"


class Checkpoint(NamedTuple):
    model: UNet              # in eval mode, on the requested device
    schedule: NoiseSchedule  # the schedule the model was trained with
    info: dict               # the parsed config.json (step, dataset, training config, ...)
    path: Path               # the checkpoint folder that was loaded


def save_checkpoint(path: str | Path, model: UNet, schedule: NoiseSchedule, step: int = 0,
                    dataset: str | None = None, extra: dict | None = None,
                    training_state: dict[str, Tensor] | None = None) -> Path:
    """Write `model` (and optionally a training state) to the folder `path`, atomically.

    Args:
        extra: JSON-serialisable facts to record (training config, elapsed time, ...).
        training_state: flat dict of tensors needed to resume training.
    Returns:
        The checkpoint folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {"model.safetensors": _state_on_cpu(model.state_dict())}
        if training_state is not None:
            files["training_state.safetensors"] = _state_on_cpu(training_state)
        hashes = {}
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name))
            hashes[name] = _sha256(tmp / name)
        info = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(),
                "schedule": schedule.to_config(), "step": int(step), "dataset": dataset,
                "sha256": hashes, **(extra or {})}
        _write_synced(tmp / "config.json", json.dumps(info, indent=2).encode())
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
    config = UNetConfig.from_dict(info["model"])
    model = UNet(config)
    state = _load_verified(folder, "model.safetensors", info)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"The weights in {folder} do not match the model config in its config.json: "
                         f"{str(error).splitlines()[0]}") from None
    model.to(device).eval()
    return Checkpoint(model, schedule_from_config(info["schedule"]), info, folder)


def load_training_state(folder: str | Path) -> dict[str, Tensor]:
    """The tensors saved with `training_state=` (raises if the checkpoint has none)."""
    folder = Path(folder)
    info = read_info(folder)
    if "training_state.safetensors" not in info["sha256"]:
        raise FileNotFoundError(f"{folder} has no training state to resume from.")
    return _load_verified(folder, "training_state.safetensors", info)


def resolve_checkpoint(path: str | Path) -> Path:
    """Turn "mnist", a checkpoint folder or a run folder into one checkpoint folder."""
    if str(path) == "mnist":
        path = PRETRAINED_DIR / "mnist"
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"No checkpoint at {path}: expected a folder with config.json and "
                                "model.safetensors, a training run folder with step_* checkpoints, "
                                "or 'mnist' for the course's pretrained model.")
    return latest


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step_* checkpoint with the highest step in a run folder, or None."""
    folders = sorted(p for p in Path(run_dir).glob("step_*") if (p / "config.json").is_file())
    return folders[-1] if folders else None


def read_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / 'config.json'} is missing or not valid JSON ({error}).") from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ValueError(f"{folder} is not a diffusion-course checkpoint (version {VERSION}): "
                         f"format={info.get('format')!r}, version={info.get('version')!r}.")
    return info


def _load_verified(folder: Path, name: str, info: dict) -> dict[str, Tensor]:
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; the checkpoint is incomplete.")
    expected = info["sha256"].get(name)
    if expected != _sha256(file):
        raise ValueError(f"{file} is damaged or truncated: its SHA-256 does not match the one recorded "
                         "in config.json. Use another checkpoint or retrain.")
    try:
        return load_file(str(file))
    except SafetensorError as error:
        raise ValueError(f"{file} is not a readable safetensors file ({error}).") from None


def _state_on_cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}


def _sha256(file: Path) -> str:
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
