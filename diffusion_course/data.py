"""Ring 2 and Lesson 07: datasets as records, loaded as tensors in [-1, 1], and the samples files.

Used by lessons 00-10 (`load_dataset`), the training loop and the CLI; lesson 07 (colour images)
has its learner write `pixels_to_model` and `random_hflip`. What is here:

- `DATASETS`: one `DatasetInfo` per dataset (shape, class names, where its files come from).
- `load_dataset(name, train, root, limit)`: a whole split as (N, C, H, W) float32 in [-1, 1].
- `to_model_range` / `to_image_range` / `check_model_range`: the one place the [-1, 1] convention
  is written down and checked, where data enters; `pixels_to_model`: stored uint8 images (channels
  last) to the model's (N, C, H, W) in [-1, 1].
- `random_hflip`: left-right flips, the training loop's augmentation for photos.
- `load_image`: one image file as a (1, C, size, size) tensor (the CLI's `edit --image`).
- `save_samples` / `load_samples` / `SampleWriter`: the samples file (.npz with uint8 `images`
  (N, H, W) or (N, H, W, 3) and int64 `labels`, -1 = unlabelled, and for text-to-image samples
  a unicode `prompts` array (N,)), written atomically, never over an existing file unless asked,
  and checked where it is read.

Where the data lives: the folder in the environment variable DIFFUSION_COURSE_DATA, else
~/.cache/diffusion-course/data. torchvision downloads into it the first time.

Offline: point the environment variable DIFFUSION_COURSE_ARCHIVES at a folder that holds
- the official archives in torchvision's layout (for MNIST: MNIST/raw/train-images-idx3-ubyte.gz
  and its three siblings). They are copied into the data folder, where torchvision checks their
  MD5 sums and extracts them without touching the network. The folder itself may be read-only.
- for CIFAR-10, the arrays CIFAR10/cifar10_train.npz and CIFAR10/cifar10_test.npz (`images`
  uint8 (N, 32, 32, 3), `labels` int64 (N,)). They are read in place with allow_pickle=False and
  their pixels and labels are checked against the SHA-256 of the original dataset, so no other
  images can pass for CIFAR-10. Without them, torchvision downloads the official archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

_MNIST_ARCHIVES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                   "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@dataclass(frozen=True)
class OfflineArrays:
    """A split stored as an .npz of `images` (N, H, W, C) uint8 and `labels` (N,) int64."""
    file: str      # path under DIFFUSION_COURSE_ARCHIVES
    count: int     # number of images in the split
    sha256: str    # SHA-256 of the images' bytes followed by the labels' bytes (not of the file)


@dataclass(frozen=True)
class DatasetInfo:
    """Everything the package knows about one dataset."""
    name: str                          # the key in DATASETS, e.g. "mnist"
    shape: tuple[int, int, int]        # (C, H, W) of one image
    class_names: tuple[str, ...]       # the name of label i
    torchvision_class: str             # the torchvision.datasets class that downloads it
    raw_folder: str                    # where torchvision keeps the archives, under the data root
    archives: tuple[str, ...]          # the official archives (copied from DIFFUSION_COURSE_ARCHIVES)
    offline_arrays: dict[bool, OfflineArrays] | None = None   # train=True/False -> arrays, if any

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), tuple(str(i) for i in range(10)),
                         "MNIST", "MNIST/raw", _MNIST_ARCHIVES),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", (1, 28, 28),
        ("T-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"),
        "FashionMNIST", "FashionMNIST/raw", _MNIST_ARCHIVES),
    "cifar10": DatasetInfo(
        "cifar10", (3, 32, 32),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        "CIFAR10", ".", ("cifar-10-python.tar.gz",),
        {True: OfflineArrays("CIFAR10/cifar10_train.npz", 50000,
                             "67e12c2a5906880a4fe5595fe6d768185ad7ca587f35d3a7ece3c3b8b85035d2"),
         False: OfflineArrays("CIFAR10/cifar10_test.npz", 10000,
                              "e54a434ec35094516eacbaac0f2f9550358d985e9d1f71b47d41d333c15ba304")}),
}


def parse_labels(text: str, num: int, num_classes: int | None, flag: str = "--labels") -> Tensor | None:
    """Labels from the command line's spec: 'all' -> num labels spread evenly over the classes,
    'none' -> None, '3,7' -> those labels, cycled to num. `flag` names the option in errors."""
    if text == "none":
        return None
    if num_classes is None:
        raise ValueError(f"This checkpoint is unconditional: leave out {flag} (or use --labels none).")
    if text == "all":
        return torch.arange(num) % num_classes
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be 'all', 'none' or comma-separated integers, got {text!r}.") from None
    if any(not 0 <= v < num_classes for v in values):
        raise ValueError(f"{flag} must lie in [0, {num_classes}), got {text!r}.")
    return torch.tensor(values)[torch.arange(num) % len(values)]


class Dataset(NamedTuple):
    images: Tensor   # (N, C, H, W) float32 in [-1, 1]
    labels: Tensor   # (N,) int64 class labels
    name: str        # a key of DATASETS

    def image(self, index: int, what: str = "index") -> Tensor:
        """Image `index` as a (1, C, H, W) batch, with a clear error when there is no such image."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.images):
            raise ValueError(f"{what} must lie in [0, {len(self.images)}), got {index!r}.")
        return self.images[index:index + 1]


def dataset_info(name: str) -> DatasetInfo:
    """The record of a dataset by name; a clear ValueError for an unknown name."""
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}.")
    return DATASETS[name]


def class_names(name: str) -> tuple[str, ...]:
    """The class names of a dataset, label 0 first."""
    return dataset_info(name).class_names


def data_root() -> Path:
    """The folder datasets are kept in (DIFFUSION_COURSE_DATA, else ~/.cache/diffusion-course/data)."""
    root = os.environ.get("DIFFUSION_COURSE_DATA")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "diffusion-course" / "data"


# ----------------------------------------------------------------------------------------------
# The [-1, 1] convention

def to_model_range(images: Tensor) -> Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def pixels_to_model(pixels) -> Tensor:
    """Images as datasets and image files store them -> the model's layout and range (lesson 07).

    pixels: uint8 (N, H, W) grey or (N, H, W, C) colour, channels last, as a tensor or numpy array.
    Returns float32 (N, C, H, W) in [-1, 1], channels first. The channels are moved with permute
    (each pixel keeps its colour values); a reshape would cut the image into wrong strips.
    """
    pixels = torch.as_tensor(pixels)
    if pixels.dtype != torch.uint8 or pixels.ndim not in (3, 4):
        raise ValueError(f"pixels must be uint8 (N, H, W) or (N, H, W, C) as stored, got {pixels.dtype} "
                         f"of shape {tuple(pixels.shape)}.")
    images = pixels[:, None] if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    return to_model_range(images.contiguous())


def random_hflip(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each image of (N, C, H, W) mirrored left-right with probability 1/2, drawn from `generator`
    (augmentation, lesson 07: a mirrored photo of a horse is as likely a photo; a mirrored 2 is no digit)."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def to_image_range(x: Tensor) -> Tensor:
    """Model outputs (about [-1, 1]) -> uint8 pixels in [0, 255], clamped."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def check_model_range(images: Tensor, *, shape: tuple[int, ...] | None = None,
                      what: str = "images") -> Tensor:
    """Check that images are a finite float (N, C, H, W) tensor in [-1, 1] and return them.

    Args:
        images: the tensor to check.
        shape: the expected (C, H, W) of one image, or None for any.
        what: how error messages name the tensor.
    Raises:
        ValueError saying what was given and what was expected.
    """
    expected = f"a float (N, C, H, W) tensor in [-1, 1]" + (f" with (C, H, W) = {tuple(shape)}" if shape else "")
    if not isinstance(images, Tensor):
        raise ValueError(f"{what} must be {expected}, got {type(images).__name__}.")
    if images.ndim != 4 or not images.is_floating_point() or (shape and tuple(images.shape[1:]) != tuple(shape)):
        raise ValueError(f"{what} must be {expected}, got {images.dtype} of shape {tuple(images.shape)}"
                         + (" (scale uint8 pixels with data.to_model_range)." if not images.is_floating_point() else "."))
    finite = torch.isfinite(images).flatten(1).all(1)
    if not finite.all():
        raise ValueError(f"{what} contain NaN or infinite values ({int((~finite).sum())} of {len(images)} "
                         "images); expected finite values in [-1, 1].")
    if images.numel() and (float(images.min()) < -1.001 or float(images.max()) > 1.001):
        raise ValueError(f"{what} must be scaled to [-1, 1] (see data.to_model_range), got values from "
                         f"{float(images.min()):.3g} to {float(images.max()):.3g}.")
    return images


# ----------------------------------------------------------------------------------------------
# Loading datasets

def load_dataset(name: str = "mnist", train: bool = True, root: str | Path | None = None,
                 limit: int | None = None) -> Dataset:
    """Load a whole dataset as tensors (MNIST: 60,000 x 1 x 28 x 28; CIFAR-10: 50,000 x 3 x 32 x 32).

    Args:
        name: a key of DATASETS: "mnist", "fashion_mnist" or "cifar10".
        train: the training split, else the test split.
        root: the data folder (default: data_root()).
        limit: keep only the first `limit` images (a positive int, for quick experiments), or None.
    """
    info = dataset_info(name)
    if not isinstance(train, bool):
        raise ValueError(f"train must be True (training split) or False (test split), got {train!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int (keep the first `limit` images) or None, got {limit!r}.")
    arrays = offline_arrays_file(info, train)
    if arrays is not None:
        pixels, labels = _load_offline_arrays(info, train, arrays)
    else:
        pixels, labels = _load_with_torchvision(info, train, Path(root) if root is not None else data_root())
    if limit is not None:
        pixels, labels = pixels[:limit], labels[:limit]
    return Dataset(pixels_to_model(pixels), labels, name)


def offline_arrays_file(info: DatasetInfo, train: bool) -> Path | None:
    """The offline .npz of this split under DIFFUSION_COURSE_ARCHIVES, if the variable is set,
    the dataset has such a layout and the file is there; else None."""
    source = os.environ.get("DIFFUSION_COURSE_ARCHIVES")
    if not source or not info.offline_arrays:
        return None
    file = Path(source).expanduser() / info.offline_arrays[train].file
    return file if file.is_file() else None


def _load_offline_arrays(info: DatasetInfo, train: bool, file: Path) -> tuple[Tensor, Tensor]:
    """Read and verify an offline .npz split: (N, H, W, C) uint8 pixels and (N,) int64 labels."""
    spec, (channels, height, width) = info.offline_arrays[train], info.shape
    try:
        with np.load(file, allow_pickle=False) as arrays:
            pixels, labels = arrays["images"], arrays["labels"]
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{file} is not a {info.name} array file with 'images' and 'labels' ({error}).") from None
    expected = f"images uint8 ({spec.count}, {height}, {width}, {channels}), labels int64 ({spec.count},) in [0, {info.num_classes})"
    if (pixels.dtype != np.uint8 or pixels.shape != (spec.count, height, width, channels)
            or labels.dtype != np.int64 or labels.shape != (spec.count,)
            or labels.min() < 0 or labels.max() >= info.num_classes):
        raise ValueError(f"{file} does not hold the {info.name} {'training' if train else 'test'} split: "
                         f"expected {expected}, got images {pixels.dtype} {pixels.shape}, "
                         f"labels {labels.dtype} {labels.shape}.")
    digest = hashlib.sha256(np.ascontiguousarray(pixels).data)
    digest.update(np.ascontiguousarray(labels).data)
    if digest.hexdigest() != spec.sha256:
        raise ValueError(f"{file} has the right shapes but not the {info.name} images and labels "
                         f"(SHA-256 of the arrays {digest.hexdigest()}, expected {spec.sha256}). "
                         "Refusing to use other data in its place.")
    return torch.from_numpy(pixels), torch.from_numpy(labels)


def _load_with_torchvision(info: DatasetInfo, train: bool, root: Path) -> tuple[Tensor, Tensor]:
    """Download (or find) the official archives with torchvision; pixels as stored, labels int64."""
    import torchvision  # imported here: it is slow to import and only needed for data

    copy_offline_archives(info.name, root)
    try:
        dataset = getattr(torchvision.datasets, info.torchvision_class)(str(root), train=train, download=True)
    except Exception as error:  # torchvision raises URLError, RuntimeError, ... when offline
        raw = root / info.raw_folder
        missing = [str(raw / a) for a in info.archives if not (raw / a).is_file()]
        arrays = (f" (for {info.name}, the arrays {info.offline_arrays[train].file} work too)"
                  if info.offline_arrays else "")
        raise FileNotFoundError(
            f"Could not download or find the {info.name} dataset in {root} ({type(error).__name__}: {error}).\n"
            f"Missing: {', '.join(missing) or 'none (an archive may be corrupt)'}.\n"
            "Fix: connect to the internet and run again, or put the official archives in a folder "
            f"as <folder>/{info.raw_folder}/<archive>{arrays} and set DIFFUSION_COURSE_ARCHIVES=<folder>."
        ) from None
    return torch.as_tensor(dataset.data), torch.as_tensor(dataset.targets, dtype=torch.long)


def copy_offline_archives(name: str, root: Path) -> list[Path]:
    """Copy the dataset's archives from DIFFUSION_COURSE_ARCHIVES (if set) into root.
    Returns the files copied (none if they are already there or the variable is not set)."""
    source = os.environ.get("DIFFUSION_COURSE_ARCHIVES")
    if not source:
        return []
    info = dataset_info(name)
    source_dir = Path(source).expanduser() / info.raw_folder
    copied = []
    for archive in info.archives:
        src, dst = source_dir / archive, Path(root) / info.raw_folder / archive
        if src.is_file() and not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f"{dst.name}.partial-{os.getpid()}")   # per process: torchrun ranks copy at once
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
            copied.append(dst)
    return copied


# ----------------------------------------------------------------------------------------------
# Image files

MAX_IMAGE_PIXELS = 4096 * 4096   # larger images are refused before they are decoded


def load_image(path: str | Path, channels: int, size: int) -> Tensor:
    """Read an image file as a (1, channels, size, size) tensor in [-1, 1] (resized to size x size).

    Images over MAX_IMAGE_PIXELS pixels are refused from their header, before decoding.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}.")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}.")
    try:
        with Image.open(path) as image:      # reads the header only
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"The image {str(path)!r} is {image.width} x {image.height} pixels; "
                                 f"at most {MAX_IMAGE_PIXELS:,} pixels are accepted (resize it first).")
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size))
    except ValueError:
        raise
    except (OSError, Image.DecompressionBombError, SyntaxError) as error:
        raise ValueError(f"Could not read the image {str(path)!r} ({type(error).__name__}: {error}).") from None
    pixels = torch.from_numpy(np.array(image)).reshape(size, size, channels).permute(2, 0, 1)
    return to_model_range(pixels)[None]


# ----------------------------------------------------------------------------------------------
# Samples files: .npz with `images` uint8 (N, H, W) or (N, H, W, 3) and `labels` int64 (-1 = none)

class Samples(NamedTuple):
    images: Tensor   # (N, C, H, W) float32 in [-1, 1]
    labels: Tensor   # (N,) int64, -1 where a sample has no label
    prompts: list[str] | None = None   # the prompt of each sample (text-to-image), else None


def save_samples(path: str | Path, images: Tensor, labels: Tensor | None, *, overwrite: bool = False,
                 prompts: list[str] | None = None) -> Path:
    """Write images as uint8 pixels to an .npz, with a PNG grid of the first 200 beside it.

    Args:
        path: the .npz to write; the grid goes to the same path with .png.
        images: (N, C, H, W) float in [-1, 1] (clamped), C = 1 or 3; NaN or infinite values are refused.
        labels: (N,) integer labels (-1 = unlabelled), or None for all unlabelled.
        overwrite: replace an existing .npz or .png; otherwise FileExistsError.
        prompts: the prompt of each image (text-to-image samples), stored as a unicode array.
    Both files are written to temporary names and renamed, so a crash never leaves half a file.
    Returns the path of the .npz.
    """
    path = _samples_path(path)
    pixels, label_array = _to_sample_arrays(images, labels)
    prompts = _check_prompts(prompts, len(pixels))
    check_free(path, overwrite)
    _write_samples_files(path, pixels, label_array, overwrite=overwrite, prompts=prompts)
    return path


def load_samples(path: str | Path) -> Samples:
    """Read and check a samples .npz (as written by save_samples or `diffusion-course sample`).

    Returns images (N, C, H, W) float32 in [-1, 1], labels (N,) int64 and the prompts (a list of
    N strings) when the file has them, else None. A clear ValueError for
    anything else: a .npy, missing arrays, float or 2-D images, a wrong label count or type.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"No samples file at {path}.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a samples .npz ({type(error).__name__}: {error}).") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array (a .npy file); expected an .npz with arrays "
                         "'images' (uint8 (N, H, W) or (N, H, W, C)) and 'labels' (int64 (N,)), as save_samples writes.")
    with loaded:
        missing = [key for key in ("images", "labels") if key not in loaded.files]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(map(repr, missing))} array (it has {loaded.files}); "
                             "expected 'images' and 'labels', as save_samples writes.")
        try:
            pixels, labels = loaded["images"], loaded["labels"]
            prompts = loaded["prompts"] if "prompts" in loaded.files else None
        except (OSError, ValueError, zipfile.BadZipFile) as error:   # object arrays (pickle), a damaged zip
            raise ValueError(f"{path}: cannot read its arrays ({type(error).__name__}: {error}).") from None
    _check_sample_arrays(path, pixels, labels)
    if prompts is not None and (prompts.dtype.kind != "U" or prompts.shape != labels.shape):
        raise ValueError(f"{path}: 'prompts' must be a unicode array with one prompt per image ({len(labels)}), "
                         f"got {prompts.dtype} of shape {prompts.shape}.")
    images = torch.from_numpy(pixels)
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return Samples(to_model_range(images.contiguous()), torch.from_numpy(labels.astype(np.int64)),
                   None if prompts is None else prompts.tolist())


def _check_sample_arrays(path, pixels: np.ndarray, labels: np.ndarray) -> None:
    expected = "uint8 pixels of shape (N, H, W) or (N, H, W, C) with C = 1 or 3"
    if pixels.dtype != np.uint8:
        raise ValueError(f"{path}: 'images' must be {expected}, got {pixels.dtype}"
                         + (" (float images are not a samples file: save them with data.save_samples)."
                            if pixels.dtype.kind == "f" else "."))
    if pixels.ndim not in (3, 4) or (pixels.ndim == 4 and pixels.shape[-1] not in (1, 3)) or len(pixels) == 0:
        raise ValueError(f"{path}: 'images' must be {expected} and N >= 1, got shape {pixels.shape}.")
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise ValueError(f"{path}: 'labels' must be a 1-D integer array (-1 = unlabelled), "
                         f"got {labels.dtype} of shape {labels.shape}.")
    if len(labels) != len(pixels):
        raise ValueError(f"{path}: {len(pixels)} images but {len(labels)} labels; expected one label per image.")
    if len(labels) and labels.min() < -1:
        raise ValueError(f"{path}: labels must be -1 (unlabelled) or a class index >= 0, got {int(labels.min())}.")


def _samples_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"A samples file must end in .npz, got {path}.")
    return path


def _to_sample_arrays(images: Tensor, labels: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Check images and labels; return uint8 pixels (N, H, W) or (N, H, W, 3) and int64 labels."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3) \
            or not images.is_floating_point():
        got = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float (N, C, H, W) tensor in [-1, 1] with C = 1 or 3, got {got}.")
    bad = ~torch.isfinite(images).flatten(1).all(1)
    if bad.any():
        raise ValueError(f"the images contain NaN or infinite values ({int(bad.sum())} of {len(images)} images); "
                         "refusing to write them (they would be saved as black or white pixels).")
    pixels = to_image_range(images).permute(0, 2, 3, 1).cpu().numpy()
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    return pixels, _label_array(labels, len(images))


def _label_array(labels: Tensor | None, num: int) -> np.ndarray:
    if labels is None:
        return np.full(num, -1, dtype=np.int64)
    labels = torch.as_tensor(labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex() or labels.shape != (num,):
        raise ValueError(f"labels must be an integer tensor of shape ({num},) (-1 = unlabelled), "
                         f"got {labels.dtype} of shape {tuple(labels.shape)}.")
    if num and int(labels.min()) < -1:
        raise ValueError(f"labels must be -1 (unlabelled) or a class index >= 0, got {int(labels.min())}.")
    return labels.cpu().numpy().astype(np.int64)


def _check_prompts(prompts: list[str] | None, num: int) -> np.ndarray | None:
    """The prompts as a unicode array of length num (None stays None), or a clear error."""
    if prompts is None:
        return None
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or len(prompts) != num:
        raise ValueError(f"prompts must be a list of {num} strings (one per image), got {prompts!r:.80}.")
    return np.array(list(prompts), dtype=str) if num else np.zeros(0, dtype="U1")


def check_free(path: str | Path, overwrite: bool) -> None:
    """Refuse (FileExistsError) to replace an existing samples file or its PNG unless overwrite;
    a name that is not an .npz is refused too (ValueError). Call it before long work."""
    path = _samples_path(path)
    if overwrite:
        return
    for file in (path, path.with_suffix(".png")):
        if file.exists():
            raise FileExistsError(f"{file} exists already; choose another name or pass overwrite=True "
                                  "(--overwrite on the command line) to replace it.")


def _write_samples_files(path: Path, pixels: np.ndarray, labels: np.ndarray, *, overwrite: bool,
                         grid: bool = True, prompts: np.ndarray | None = None) -> None:
    """Write the .npz (and the PNG grid) under temporary names, then move them into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(images=pixels, labels=labels, **({} if prompts is None else {"prompts": prompts}))
    temporaries = []
    try:
        temporaries.append((_temporary(path, lambda f: np.savez_compressed(f, **arrays)), path))
        if grid:
            png = path.with_suffix(".png")
            temporaries.append((_temporary(png, lambda f: _save_grid(f, pixels[:200], labels[:200])), png))
        for tmp, final in temporaries:
            _publish(tmp, final, overwrite)
    finally:
        for tmp, _ in temporaries:
            tmp.unlink(missing_ok=True)


def _temporary(final: Path, write) -> Path:
    """Call write(file) on a new hidden temporary file beside `final`, synced to disk; return its path."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move tmp to final atomically; without overwrite, never replace a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)           # fails if final exists: no check-then-replace race
    except FileExistsError:
        raise FileExistsError(f"{final} exists already; pass overwrite=True (--overwrite) to replace it.") from None
    except OSError:                   # a file system without hard links
        if final.exists():
            raise FileExistsError(f"{final} exists already; pass overwrite=True (--overwrite) to replace it.") from None
        os.replace(tmp, final)
    tmp.unlink(missing_ok=True)


def _save_grid(file, pixels: np.ndarray, labels: np.ndarray) -> None:
    """A PNG grid of uint8 pixels (N, H, W[, 3]): 10 per row when labelled, else about square."""
    import torchvision.utils

    images = torch.from_numpy(np.ascontiguousarray(pixels))
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    nrow = 10 if (labels >= 0).any() else int(len(images) ** 0.5) or 1
    torchvision.utils.save_image(images.float() / 255, file, nrow=nrow, padding=1, format="png")


def partial_files(path: str | Path) -> dict[str, Path]:
    """Where a SampleWriter for `path` keeps its work: s.partial.{images.npy,labels.npy,json,npz}."""
    path = _samples_path(path)
    stem = path.with_suffix("")
    return {key: Path(f"{stem}.partial.{key}") for key in ("images.npy", "labels.npy", "json", "npz")}


class SampleWriter:
    """Stream samples into an .npz batch by batch, with bounded memory for any count.

        with data.SampleWriter("s.npz", total=10_000, shape=(1, 28, 28)) as writer:
            for start, images in generate.generate_batches(...):
                writer.write(images, labels[start:start + len(images)])

    While it runs, the samples written so far are in s.partial.images.npy and s.partial.labels.npy
    (memory-mapped, so they reach the disk even if the process is killed), and s.partial.json counts
    them. Closing turns them into s.npz and s.png, atomically. If the loop raises (Ctrl-C
    included), the samples done so far are saved as s.partial.npz (a samples file that
    load_samples reads) and the exception says so; after a kill -9, `recover_samples("s.npz")`
    does the same from what was left. A new writer refuses to start over such leftovers unless
    overwrite=True.
    """

    def __init__(self, path: str | Path, total: int, shape: tuple[int, int, int], *, overwrite: bool = False,
                 prompts: list[str] | None = None):
        self.path, self.total, self.overwrite = _samples_path(path), total, overwrite
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a positive int (the number of samples), got {total!r}.")
        self.prompts = _check_prompts(prompts, total)
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 1:
            raise ValueError(f"shape must be (C, H, W) with C = 1 or 3, got {shape!r}.")
        check_free(self.path, overwrite)
        self.files, self.done, self.partial_path, self._closed = partial_files(self.path), 0, None, False
        self._clear_leftovers(overwrite)
        channels, height, width = shape
        pixel_shape = (total, height, width) if channels == 1 else (total, height, width, channels)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._pixels = np.lib.format.open_memmap(self.files["images.npy"], "w+", np.uint8, pixel_shape)
            self._labels = np.lib.format.open_memmap(self.files["labels.npy"], "w+", np.int64, (total,))
            self._labels[:] = -1
            self._write_progress()
        except OSError as error:           # e.g. no room for total samples: leave nothing half-made behind
            self._finish()
            raise OSError(f"Could not make room for {total} samples beside {self.path} ({error}); "
                          "is the disk full?") from None

    def write(self, images: Tensor, labels: Tensor | None = None) -> int:
        """Append a batch: images (B, C, H, W) float in [-1, 1], labels (B,) or None. Returns the count so far."""
        if self._closed:
            raise ValueError(f"The writer for {self.path} is closed.")
        pixels, label_array = _to_sample_arrays(images, labels)
        if pixels.shape[1:] != self._pixels.shape[1:] or self.done + len(pixels) > self.total:
            raise ValueError(f"Expected at most {self.total - self.done} more images of shape "
                             f"{self._pixels.shape[1:]} (as uint8), got {pixels.shape}.")
        end = self.done + len(pixels)
        self._pixels[self.done:end], self._labels[self.done:end] = pixels, label_array
        self._pixels.flush()
        self._labels.flush()
        self.done = end
        self._write_progress()
        return self.done

    def close(self) -> Path:
        """Write s.npz and s.png from the finished samples and remove the partial files."""
        if self._closed:
            return self.path
        if self.done < self.total:
            partial = self.save_partial()
            raise ValueError(f"Only {self.done} of {self.total} samples were written"
                             + (f"; they are in {partial}." if partial else "."))
        _write_samples_files(self.path, self._pixels, self._labels, overwrite=self.overwrite, prompts=self.prompts)
        self._finish()
        return self.path

    def save_partial(self) -> Path | None:
        """Save the samples done so far as s.partial.npz (None if there are none); close the writer."""
        if self._closed:
            return self.partial_path
        if self.done:
            _write_samples_files(self.files["npz"], self._pixels[:self.done], self._labels[:self.done],
                                 overwrite=True, grid=False,
                                 prompts=None if self.prompts is None else self.prompts[:self.done])
            self.partial_path = self.files["npz"]
        self._finish()
        return self.partial_path

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None:
            self.close()
            return False
        partial = self.save_partial()
        if exc is not None:
            exc.add_note(f"{self.done} of {self.total} samples were saved to {partial}." if partial
                         else f"No sample was finished; nothing was written to {self.path}.")
        return False

    def _write_progress(self) -> None:
        progress = {"done": self.done, "total": self.total, "for": str(self.path),
                    "prompts": None if self.prompts is None else self.prompts.tolist()}
        tmp = _temporary(self.files["json"], lambda f: f.write(json.dumps(progress).encode()))
        os.replace(tmp, self.files["json"])

    def _clear_leftovers(self, overwrite: bool) -> None:
        leftovers = [file for file in self.files.values() if file.exists()]
        if leftovers and not overwrite:
            raise FileExistsError(
                f"An interrupted run left {', '.join(map(str, leftovers))}: recover its samples with "
                f"data.recover_samples({str(self.path)!r}) (or use the .partial.npz), or pass "
                "overwrite=True (--overwrite) to discard them.")
        for file in leftovers:
            file.unlink()

    def _finish(self) -> None:
        self._closed, self._pixels, self._labels = True, None, None   # drops the memory maps
        for key in ("images.npy", "labels.npy", "json"):
            self.files[key].unlink(missing_ok=True)


def recover_samples(path: str | Path) -> Path:
    """After a SampleWriter for `path` was killed, save its finished samples as s.partial.npz and
    remove the memory-mapped leftovers. Returns the path of s.partial.npz."""
    files = partial_files(path)
    if not files["json"].is_file():
        raise FileNotFoundError(f"No interrupted run to recover for {path} (no {files['json']}).")
    progress = json.loads(files["json"].read_text())
    done, prompts = int(progress["done"]), progress.get("prompts")
    if done < 1:
        for key in ("images.npy", "labels.npy", "json"):
            files[key].unlink(missing_ok=True)
        raise ValueError(f"The interrupted run for {path} had finished no sample; its leftovers were removed.")
    pixels = np.load(files["images.npy"], mmap_mode="r", allow_pickle=False)[:done]
    labels = np.load(files["labels.npy"], mmap_mode="r", allow_pickle=False)[:done]
    _write_samples_files(files["npz"], pixels, np.asarray(labels), overwrite=True, grid=False,
                         prompts=None if prompts is None else _check_prompts(prompts[:done], done))
    for key in ("images.npy", "labels.npy", "json"):
        files[key].unlink(missing_ok=True)
    return files["npz"]
