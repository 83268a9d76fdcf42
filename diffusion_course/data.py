"""Datasets as in-memory tensors in [-1, 1], and the conversions to and from image range.

Where the data lives: the folder in the environment variable DIFFUSION_COURSE_DATA, else
~/.cache/diffusion-course/data. torchvision downloads into it the first time.

Offline: point the environment variable DIFFUSION_COURSE_ARCHIVES at a folder that holds the
official archives in torchvision's layout (for MNIST: MNIST/raw/train-images-idx3-ubyte.gz and
its three siblings). They are copied into the data folder, where torchvision checks their MD5
sums and extracts them without touching the network. The folder itself may be read-only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

# torchvision class, the folder it keeps files in, and the archives it needs.
DATASETS = {
    "mnist": ("MNIST", "MNIST/raw", ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                     "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw",
                      ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    "cifar10": ("CIFAR10", ".", ["cifar-10-python.tar.gz"]),
}
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt",
                      "sneaker", "bag", "ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


class Dataset(NamedTuple):
    images: Tensor   # (N, C, H, W) float32 in [-1, 1]
    labels: Tensor   # (N,) int64 class labels
    name: str        # "mnist", "fashion_mnist" or "cifar10"


def data_root() -> Path:
    """The folder datasets are kept in (DIFFUSION_COURSE_DATA, else ~/.cache/diffusion-course/data)."""
    root = os.environ.get("DIFFUSION_COURSE_DATA")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "diffusion-course" / "data"


def to_model_range(images: Tensor) -> Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_image_range(x: Tensor) -> Tensor:
    """Model outputs (about [-1, 1]) -> uint8 pixels in [0, 255], clamped."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_dataset(name: str = "mnist", train: bool = True, root: str | Path | None = None,
                 limit: int | None = None) -> Dataset:
    """Load a whole dataset as tensors (MNIST: 60,000 x 1 x 28 x 28; CIFAR-10: 50,000 x 3 x 32 x 32).

    Args:
        name: "mnist", "fashion_mnist" or "cifar10".
        train: the training split, else the test split.
        limit: keep only the first `limit` images (for quick experiments).
    """
    import torchvision  # imported here: it is slow to import and only needed for data

    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}.")
    root = Path(root) if root is not None else data_root()
    class_name, raw_dir, archives = DATASETS[name]
    copy_offline_archives(name, root)
    try:
        dataset = getattr(torchvision.datasets, class_name)(str(root), train=train, download=True)
    except Exception as error:  # torchvision raises URLError, RuntimeError, ... when offline
        missing = [a for a in archives if not (root / raw_dir / a).is_file()]
        raise FileNotFoundError(
            f"Could not download or find the {name} dataset in {root} ({type(error).__name__}: {error}).\n"
            f"Missing: {', '.join(str(root / raw_dir / a) for a in missing) or 'none (an archive may be corrupt)'}.\n"
            "Fix: connect to the internet and run again, or put the official archives in a folder "
            f"as <folder>/{raw_dir}/<archive> and set DIFFUSION_COURSE_ARCHIVES=<folder>."
        ) from None
    images = torch.as_tensor(dataset.data)
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)   # to (N, C, H, W)
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return Dataset(to_model_range(images.contiguous()), labels, name)


def copy_offline_archives(name: str, root: Path) -> list[Path]:
    """Copy the dataset's archives from DIFFUSION_COURSE_ARCHIVES (if set) into root.
    Returns the files copied (none if they are already there or the variable is not set)."""
    source = os.environ.get("DIFFUSION_COURSE_ARCHIVES")
    if not source:
        return []
    _, raw_dir, archives = DATASETS[name]
    source_dir = Path(source).expanduser() / raw_dir
    copied = []
    for archive in archives:
        src, dst = source_dir / archive, root / raw_dir / archive
        if src.is_file() and not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".partial")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
            copied.append(dst)
    return copied
