"""Ring 2: measuring generated images with a small classifier per dataset (lessons 03-05, `evaluate`).

- accuracy: how often the dataset's classifier recognises a sample as the class that was asked for.
- Frechet distance (as in FID, Heusel et al. 2017, but in this classifier's 128-d feature space
  instead of Inception's): fit a Gaussian to the features of each set and compare
      FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}).
  Lower is better. It is biased at small sample counts (a 128-d covariance from 20 samples is
  mostly noise), so it is always printed beside the distance between two real sets of the same size.
- Kernel distance (KID, Binkowski et al. 2018): the unbiased estimate of the squared maximum mean
  discrepancy with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3. Its expectation is 0 when
  both sets come from one distribution, whatever the sample count, so it is sound for small counts.
- Precision and recall (Kynkaanniemi et al. 2019): the fraction of generated samples inside the
  real images' k-nearest-neighbour manifold (fidelity), and of real images inside the generated
  samples' manifold (variety), k = 3.
- `bootstrap_interval`: an uncertainty for any of these statistics.

Classifiers: `CLASSIFIERS` says per dataset where the shipped weights live and how to train them.
MNIST's and CIFAR-10's ship with the package; the others are trained with `train_classifier` (the CLI's
`diffusion-course train-classifier --dataset ...`). Weights carry SHA-256 checksums in their
config.json, and loading verifies them.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import checkpoints, data

PRETRAINED = Path(__file__).parent / "pretrained"


@dataclass(frozen=True)
class ClassifierSpec:
    """Where a dataset's classifier ships and how it is built and trained."""
    folder: Path                  # the shipped weights (model.safetensors + config.json), if any
    channels: tuple[int, ...]     # conv widths per stage; a 2x2 max-pool ends each stage
    epochs: int                   # default training epochs
    flip: bool                    # random horizontal flips while training (not for digits)
    blocks: int = 1               # conv layers per stage (each conv, [batch norm], ReLU)
    batch_norm: bool = False      # batch norm after each conv (then the conv has no bias)
    recipe: str = "adam"          # "adam" or "sgd": see _RECIPES


class _Recipe(NamedTuple):
    """How a classifier is trained: "adam" (the digits' classifiers: Adam at 1e-3, batches of 128, each
    batch shifted as a whole by up to 2 pixels) or "sgd" (CIFAR-10: SGD with Nesterov momentum 0.9,
    weight decay 5e-4, a one-cycle learning rate with linear warm-up to 0.2 over a quarter of the steps
    and linear decay, label smoothing 0.1, batches of 256, each image randomly cropped from its
    4-pixel zero-padded copy)."""
    batch_size: int
    crop_pad: int | None          # per-image random crops from a zero-padded copy (None: whole-batch roll)
    label_smoothing: float


_RECIPES = {"adam": _Recipe(128, None, 0.0), "sgd": _Recipe(256, 4, 0.1)}

CLASSIFIERS: dict[str, ClassifierSpec] = {
    "mnist": ClassifierSpec(PRETRAINED / "mnist_classifier", (32, 64), 2, False),
    "fashion_mnist": ClassifierSpec(PRETRAINED / "fashion_mnist_classifier", (32, 64), 5, True),
    "cifar10": ClassifierSpec(PRETRAINED / "cifar10_classifier", (32, 64, 128), 20, True,
                              blocks=2, batch_norm=True, recipe="sgd"),
}


class Classifier(nn.Module):
    """Stages of conv layers (each conv followed by batch norm if asked, and ReLU; a 2x2 max-pool
    ends each stage) and two linear layers; `features` is the `hidden`-d layer before the logits.
    The defaults are the shipped MNIST classifier (one conv per stage, no batch norm)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, *,
                 channels: tuple[int, ...] = (32, 64), hidden: int = 128, blocks: int = 1,
                 batch_norm: bool = False):
        super().__init__()
        if image_size % 2 ** len(channels):
            raise ValueError(f"image_size {image_size} must be divisible by 2^{len(channels)} "
                             f"(one 2x2 pooling per conv stage {tuple(channels)}).")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks (conv layers per stage) must be a positive int, got {blocks!r}.")
        layers, previous = [], in_channels
        for width in channels:
            for _ in range(blocks):
                layers.append(nn.Conv2d(previous, width, 3, padding=1, bias=not batch_norm))
                layers += [nn.BatchNorm2d(width), nn.ReLU()] if batch_norm else [nn.ReLU()]
                previous = width
            layers.append(nn.MaxPool2d(2))
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.hidden = nn.Linear(previous * (image_size // 2 ** len(channels)) ** 2, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.hidden(self.conv(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def dataset_for(images: Tensor) -> str:
    """The first dataset with a classifier whose image shape fits (N, C, H, W) images: MNIST for
    1 x 28 x 28 (Fashion-MNIST has the same shape: name it explicitly), CIFAR-10 for 3 x 32 x 32."""
    fits = [name for name in CLASSIFIERS if data.dataset_info(name).shape == tuple(images.shape[1:])]
    if not fits:
        shapes = {name: data.dataset_info(name).shape for name in CLASSIFIERS}
        raise ValueError(f"No classifier takes images of shape {tuple(images.shape[1:])}; expected one of {shapes}.")
    return fits[0]


def classifier_spec(dataset: str) -> ClassifierSpec:
    data.dataset_info(dataset)
    if dataset not in CLASSIFIERS:
        raise ValueError(f"No classifier is registered for {dataset!r}; expected one of {sorted(CLASSIFIERS)}.")
    return CLASSIFIERS[dataset]


def user_classifier_dir(dataset: str) -> Path:
    """Where `train-classifier` writes by default: ~/.cache/diffusion-course/classifiers/<dataset>."""
    return Path.home() / ".cache" / "diffusion-course" / "classifiers" / dataset


def build_classifier(dataset: str) -> Classifier:
    """A freshly initialised classifier for the dataset's image shape and classes."""
    info, spec = data.dataset_info(dataset), classifier_spec(dataset)
    channels, size, _ = info.shape
    return Classifier(channels, size, info.num_classes, channels=spec.channels, blocks=spec.blocks,
                      batch_norm=spec.batch_norm)


# ----------------------------------------------------------------------------------------------
# Loading (checksums verified) and training

def load_classifier(dataset: str = "mnist", *, path: str | Path | None = None) -> Classifier:
    """The dataset's classifier, in eval mode, its weights checked against config.json's SHA-256.

    Looks in `path` if given, else the shipped folder (CLASSIFIERS), else user_classifier_dir.
    """
    spec = classifier_spec(dataset)
    folders = [Path(path)] if path is not None else [spec.folder, user_classifier_dir(dataset)]
    for folder in folders:
        file = folder / "model.safetensors"
        if file.is_file():
            stat = file.stat()
            return _load_verified(str(folder), dataset, stat.st_mtime_ns, stat.st_size)
    raise FileNotFoundError(
        f"No {dataset} classifier (looked for model.safetensors in {', '.join(map(str, folders))}). "
        f"Train one with `diffusion-course train-classifier --dataset {dataset}` or "
        f"metrics.train_classifier({dataset!r}, out) (it writes to {user_classifier_dir(dataset)} by default).")


@functools.lru_cache(maxsize=4)
def _load_verified(folder: str, dataset: str, mtime_ns: int, size: int) -> Classifier:
    """Load a classifier folder once per version of its weights file (mtime and size key the cache)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        expected = config["sha256"]["model.safetensors"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{folder / 'config.json'} has no readable SHA-256 for model.safetensors "
                         f"({type(error).__name__}: {error}); the weights cannot be verified.") from None
    actual = checkpoints.sha256(folder / "model.safetensors")
    if actual != expected:
        raise ValueError(f"The classifier weights {folder / 'model.safetensors'} are damaged: SHA-256 {actual}, "
                         f"expected {expected}. Reinstall the package or retrain with train-classifier.")
    if config.get("dataset", dataset) != dataset:
        raise ValueError(f"{folder} holds a {config['dataset']} classifier, not a {dataset} one.")
    model = build_classifier(dataset)
    try:
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except RuntimeError as error:
        raise ValueError(f"{folder} does not fit the {dataset} classifier: {error}") from None
    return model.eval()


def train_classifier(dataset: str, out: str | Path, *, epochs: int | None = None, seed: int = 0,
                     overwrite: bool = False, limit: int | None = None, checkpoint_dir: str | Path | None = None,
                     resume: bool = False, bfloat16: bool = False,
                     progress: Callable[[dict], None] | None = None) -> float:
    """Train the dataset's classifier on its training split, save it with checksums, return test accuracy.

    Args:
        dataset: a key of CLASSIFIERS.
        out: the folder to write model.safetensors and config.json to (e.g. user_classifier_dir(dataset)).
        epochs: passes over the training split (>= 1; default: the registry's).
        seed: seeds the initialisation, the order and the augmentation.
        overwrite: allow replacing existing weights, including the ones shipped in the package.
        limit: train and test on the first `limit` images of each split only (quick tests).
        checkpoint_dir: a folder for the run's state after every epoch (run.pt: weights, optimizer,
            learning-rate schedule, random state), so that `resume` loses at most one epoch.
        resume: continue from checkpoint_dir/run.pt (same dataset, epochs, seed and limit).
        bfloat16: train under bfloat16 autocast (about 3x faster on CPUs with AVX512-BF16; float32 weights).
        progress: called after every epoch with {"epoch", "epochs", "seconds", "images_per_second"}.
    """
    spec = classifier_spec(dataset)
    epochs = spec.epochs if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}.")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to continue.")
    out = _check_classifier_out(out, overwrite)
    torch.manual_seed(seed)
    train = data.load_dataset(dataset, train=True, limit=limit)
    test = data.load_dataset(dataset, train=False, limit=limit)
    facts = {"dataset": dataset, "epochs": epochs, "seed": seed, "limit": limit}
    run = _ClassifierRun(build_classifier(dataset), spec, epochs, len(train.images))
    start = run.load(Path(checkpoint_dir), facts) if resume else 0
    for epoch in range(start, epochs):
        run.epoch(train, facts, epoch, checkpoint_dir=checkpoint_dir, bfloat16=bfloat16, progress=progress)
    accuracy = float((predict(test.images, dataset, model=run.model) == test.labels).float().mean())
    config = {**facts, "test_accuracy": accuracy, "test_images": len(test.images), "channels": list(spec.channels),
              "blocks": spec.blocks, "batch_norm": spec.batch_norm, "recipe": spec.recipe, "bfloat16": bfloat16}
    _save_classifier(run.model, out, config)
    return accuracy


def _one_cycle(step: int, *, warm_up: int, steps: int) -> float:
    """The learning rate's factor at `step`: linear from 1/warm_up up to 1, then linear down towards 0."""
    if step < warm_up:
        return (step + 1) / warm_up
    return max(steps - step, 1) / max(steps - warm_up, 1)


class _ClassifierRun:
    """A classifier, its optimizer and learning-rate schedule per the spec's recipe, and their checkpoints."""

    def __init__(self, model: Classifier, spec: ClassifierSpec, epochs: int, num_train: int):
        self.model, self.spec, self.recipe = model, spec, _RECIPES[spec.recipe]
        if spec.recipe == "adam":
            self.optimizer, self.scheduler = torch.optim.Adam(model.parameters(), lr=1e-3), None
        else:
            self.optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True,
                                             weight_decay=5e-4)
            steps = epochs * -(-num_train // self.recipe.batch_size)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
                _one_cycle, warm_up=max(1, steps // 4), steps=steps))

    def epoch(self, train: data.Dataset, facts: dict, epoch: int, *, checkpoint_dir: str | Path | None,
              bfloat16: bool, progress: Callable[[dict], None] | None) -> None:
        """Train epoch number `epoch` (from 0), then save the run's state and report progress."""
        started = time.perf_counter()
        _train_epoch(self.model, self.optimizer, train, flip=self.spec.flip, recipe=self.recipe,
                     scheduler=self.scheduler, autocast_dtype=torch.bfloat16 if bfloat16 else None)
        seconds = time.perf_counter() - started
        if checkpoint_dir is not None:
            self.save(Path(checkpoint_dir), facts, epoch + 1)
        if progress is not None:
            progress({"epoch": epoch + 1, "epochs": facts["epochs"], "seconds": seconds,
                      "images_per_second": len(train.images) / seconds})

    def save(self, folder: Path, facts: dict, epoch: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {"facts": facts, "epoch": epoch, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}
        os.replace(_write_temporary(folder / "run.pt", lambda name: torch.save(state, name)), folder / "run.pt")

    def load(self, folder: Path, facts: dict) -> int:
        """Restore run.pt and return the number of epochs it had finished."""
        file = folder / "run.pt"
        if not file.is_file():
            raise FileNotFoundError(f"Nothing to resume: {file} does not exist.")
        state = torch.load(file, weights_only=True)
        if state["facts"] != facts:
            raise ValueError(f"{file} belongs to another run ({state['facts']}), not {facts}.")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        return int(state["epoch"])


def _check_classifier_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"The classifier output {out} is a file; expected a folder.")
    if not overwrite and out.resolve().is_relative_to(PRETRAINED.resolve()):
        raise ValueError(f"{out} is inside the package's shipped weights ({PRETRAINED}); write elsewhere "
                         "(default: a user folder) or pass overwrite=True (--overwrite) to replace them.")
    if not overwrite and (out / "model.safetensors").exists():
        raise FileExistsError(f"{out / 'model.safetensors'} exists already; choose another --out or pass "
                              "overwrite=True (--overwrite).")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"Cannot write to {out}.")
    return out


def _train_epoch(model: Classifier, optimizer, train: data.Dataset, *, flip: bool, recipe: _Recipe = _RECIPES["adam"],
                 scheduler=None, autocast_dtype: torch.dtype | None = None) -> None:
    """One pass in random order, augmented per the recipe (and flipped if asked); eval mode after."""
    model.train()
    for index in torch.randperm(len(train.images)).split(recipe.batch_size):
        x = _augment(train.images[index], flip=flip, crop_pad=recipe.crop_pad)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), train.labels[index], label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    model.eval()


def _augment(x: Tensor, *, flip: bool, crop_pad: int | None) -> Tensor:
    """Random crops of each image from its zero-padded copy (crop_pad), or the whole batch shifted by
    up to 2 pixels (None); then each image flipped left-right with probability 1/2 if `flip`."""
    if crop_pad is None:
        shift = [int(v) for v in torch.randint(-2, 3, (2,))]
        x = torch.roll(x, shifts=shift, dims=(2, 3))
    else:
        n, c, h, w = x.shape
        padded = F.pad(x, (crop_pad,) * 4).flatten(2)
        dy, dx = torch.randint(0, 2 * crop_pad + 1, (2, n, 1, 1))
        rows = dy + torch.arange(h).view(1, h, 1)
        cols = dx + torch.arange(w).view(1, 1, w)
        index = (rows * (w + 2 * crop_pad) + cols).view(n, 1, h * w).expand(n, c, h * w)
        x = padded.gather(2, index).view(n, c, h, w)
    if flip:
        x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(3), x)
    return x


def _save_classifier(model: Classifier, out: Path, config: dict) -> None:
    """Write the weights, then config.json with their SHA-256, each to a temporary name first."""
    weights = _write_temporary(out / "model.safetensors", lambda name: save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, name))
    config = {**config, "sha256": {"model.safetensors": checkpoints.sha256(weights)}}
    settings = _write_temporary(out / "config.json", lambda name: Path(name).write_text(json.dumps(config, indent=2)))
    os.replace(weights, out / "model.safetensors")
    os.replace(settings, out / "config.json")


def _write_temporary(final: Path, write: Callable[[str], None]) -> Path:
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(name)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


# ----------------------------------------------------------------------------------------------
# Classifier outputs

@torch.no_grad()
def predict(images: Tensor, dataset: str = "mnist", *, model: Classifier | None = None) -> Tensor:
    """(N, C, H, W) images in [-1, 1] of the dataset's shape -> (N,) int64 predicted classes."""
    images = _check_images(images, dataset)
    model = model or load_classifier(dataset)
    return torch.cat([model(x.cpu().float()).argmax(1) for x in images.split(500)])


@torch.no_grad()
def features(images: Tensor, dataset: str = "mnist", *, model: Classifier | None = None) -> Tensor:
    """(N, C, H, W) images in [-1, 1] of the dataset's shape -> (N, 128) classifier features."""
    images = _check_images(images, dataset)
    model = model or load_classifier(dataset)
    return torch.cat([model.features(x.cpu().float()) for x in images.split(500)])


def within_class_spread(images: Tensor, dataset: str = "mnist") -> float:
    """Mean distance of each image's classifier features from the set's mean feature: a simple
    diversity measure for images of one class (0 when every image is the same)."""
    f = features(images, dataset)
    return float((f - f.mean(0)).norm(dim=1).mean())


def _check_images(images: Tensor, dataset: str) -> Tensor:
    return data.check_model_range(images, shape=data.dataset_info(dataset).shape)


# ----------------------------------------------------------------------------------------------
# Distances between feature sets

def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (computed in float64)."""
    a, b = _check_features(features_a, features_b, minimum=2)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    sqrt_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(sqrt_a @ cov_b @ sqrt_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross))


def kernel_distance(features_a: Tensor, features_b: Tensor) -> float:
    """KID: the unbiased estimate of MMD^2 between two (N, D) feature sets (Binkowski et al. 2018,
    Eq. 2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3). Its mean is 0 for two sets
    drawn from one distribution, so single values may be slightly negative."""
    a, b = _check_features(features_a, features_b, minimum=2)
    m, n = len(a), len(b)
    within_a = (_kernel_sum(a, a) - _polynomial_kernel_diagonal(a).sum()) / (m * (m - 1))
    within_b = (_kernel_sum(b, b) - _polynomial_kernel_diagonal(b).sum()) / (n * (n - 1))
    return float(within_a + within_b - 2 * _kernel_sum(a, b) / (m * n))


class PrecisionRecall(NamedTuple):
    precision: float   # fraction of generated samples inside the real manifold (fidelity)
    recall: float      # fraction of real samples inside the generated manifold (variety)


def precision_recall(real_features: Tensor, fake_features: Tensor, *, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-3). Each set's manifold is the
    union of balls around its points, of radius the distance to the point's k-th nearest neighbour."""
    real, fake = _check_features(real_features, fake_features, minimum=k + 1)
    precision = _inside_manifold(real, _knn_radii(real, k), fake)
    recall = _inside_manifold(fake, _knn_radii(fake, k), real)
    return PrecisionRecall(precision, recall)


class Interval(NamedTuple):
    low: float
    high: float


def bootstrap_interval(statistic_fn: Callable[..., float], *samples: Tensor, num: int = 200,
                       level: float = 0.9, seed: int = 0) -> Interval:
    """A percentile bootstrap interval for statistic_fn(*samples): each sample (rows along dim 0)
    is resampled with replacement, independently, `num` times. Resampling repeats points, which
    biases KID and precision/recall up a little; the interval shows the spread, not the bias."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"num must be an int >= 2 (bootstrap resamples), got {num!r}.")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}.")
    if not samples or any(len(s) < 1 for s in samples):
        raise ValueError("Give at least one non-empty sample to resample.")
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([float(statistic_fn(*(s[torch.randint(len(s), (len(s),), generator=generator)]
                                                for s in samples))) for _ in range(num)], dtype=torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError("The statistic was not finite on some resamples; no interval can be given.")
    tail = (1 - level) / 2
    return Interval(float(values.quantile(tail)), float(values.quantile(1 - tail)))


def _check_features(features_a: Tensor, features_b: Tensor, *, minimum: int) -> tuple[Tensor, Tensor]:
    for name, f in (("features_a", features_a), ("features_b", features_b)):
        if not isinstance(f, Tensor) or f.ndim != 2 or len(f) < minimum:
            got = f"shape {tuple(f.shape)}" if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{name} must be an (N, D) tensor with N >= {minimum}, got {got}.")
        if not torch.isfinite(f).all():
            raise ValueError(f"{name} contains NaN or infinite values.")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"The feature sets differ in dimension: {features_a.shape[1]} and {features_b.shape[1]}.")
    return features_a.double(), features_b.double()


def _kernel_sum(x: Tensor, y: Tensor, chunk: int = 1024) -> Tensor:
    """Sum of k(x_i, y_j) over all pairs, in row blocks so memory stays at chunk x len(y)."""
    return sum(((block @ y.T / x.shape[1] + 1) ** 3).sum() for block in x.split(chunk))


def _polynomial_kernel_diagonal(x: Tensor) -> Tensor:
    return (x.square().sum(1) / x.shape[1] + 1) ** 3


def _knn_radii(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance from each row to its k-th nearest other row (the row itself is its 0th neighbour)."""
    return torch.cat([torch.cdist(block, x).topk(k + 1, dim=1, largest=False).values[:, k]
                      for block in x.split(chunk)])


def _inside_manifold(points: Tensor, radii: Tensor, queries: Tensor, chunk: int = 1024) -> float:
    """Fraction of queries within radii[i] of some points[i]."""
    inside = torch.cat([(torch.cdist(block, points) <= radii[None]).any(1) for block in queries.split(chunk)])
    return float(inside.double().mean())


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


# ----------------------------------------------------------------------------------------------
# The evaluation report

def evaluate_samples(images: Tensor, labels: Tensor | None, *, dataset: str = "mnist", seed: int = 0) -> dict:
    """Accuracy (for labelled samples), distances to real test images, and their real-vs-real
    baselines at the same sample count, plus how often each class was produced.

    Args:
        images: (N, C, H, W) finite floats in [-1, 1] of the dataset's shape (load_samples gives these).
        labels: (N,) integer labels in [-1, num_classes) (-1 = unlabelled), or None (all unlabelled).
        dataset: a key of CLASSIFIERS; the test split supplies the real images.
        seed: picks the two real sets (each of N images, disjoint).
    """
    info = data.dataset_info(dataset)
    images = _check_images(images, dataset)
    labels = _check_labels(labels, len(images), info.num_classes)
    test = data.load_dataset(dataset, train=False)
    if not 2 <= len(images) <= len(test.images) // 2:
        raise ValueError(f"Give between 2 and {len(test.images) // 2} samples to compare with the "
                         f"{dataset} test set, got {len(images)}.")
    model = load_classifier(dataset)
    order = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(seed))
    real_a, real_b = (test.images[order[i * len(images):(i + 1) * len(images)]] for i in (0, 1))
    predicted = predict(images, dataset, model=model)
    labelled = labels >= 0
    report = {
        "dataset": dataset,
        "num_samples": len(images),
        "accuracy": float((predicted[labelled] == labels[labelled]).float().mean()) if labelled.any() else None,
        **_distances(*(features(x, dataset, model=model) for x in (images, real_a, real_b))),
        "predicted_counts": torch.bincount(predicted, minlength=info.num_classes).tolist(),
    }
    return report


def _distances(fake: Tensor, real_a: Tensor, real_b: Tensor) -> dict:
    """Each distance of the samples to real_a, and of real_b to real_a (the baseline). KID uses the
    features divided by real_a's root-mean-square value, so the cubic kernel sees values of about 1
    (as with Inception features) whatever the classifier's scale; FD uses them as they are."""
    enough, scale = len(fake) > 3, float(real_a.square().mean().sqrt()) or 1.0
    fake_pr = precision_recall(real_a, fake) if enough else PrecisionRecall(None, None)
    real_pr = precision_recall(real_a, real_b) if enough else PrecisionRecall(None, None)
    return {"frechet": frechet_distance(fake, real_a), "frechet_real_baseline": frechet_distance(real_b, real_a),
            "kid": kernel_distance(fake / scale, real_a / scale),
            "kid_real_baseline": kernel_distance(real_b / scale, real_a / scale),
            "precision": fake_pr.precision, "recall": fake_pr.recall,
            "precision_real_baseline": real_pr.precision, "recall_real_baseline": real_pr.recall}


def _check_labels(labels: Tensor | None, num: int, num_classes: int) -> Tensor:
    if labels is None:
        return torch.full((num,), -1, dtype=torch.long)
    if not isinstance(labels, Tensor) or labels.dtype == torch.bool or labels.is_floating_point() \
            or labels.is_complex() or labels.shape != (num,):
        got = f"{labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape ({num},), one per image, got {got}.")
    if num and (int(labels.min()) < -1 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [-1, {num_classes}) (-1 = unlabelled), got values from "
                         f"{int(labels.min())} to {int(labels.max())}.")
    return labels.long()


def format_report(report: dict) -> str:
    """The report of evaluate_samples as aligned lines, each distance beside its real-vs-real baseline."""
    names = data.class_names(report.get("dataset", "mnist"))
    lines = [f"samples:                {report['num_samples']}"]
    if report["accuracy"] is not None:
        lines.append(f"class accuracy:         {report['accuracy']:.1%}  (recognised as the requested class)")
    lines += [f"Frechet distance:       {report['frechet']:.2f}  (to real test images; lower is better)",
              f"real-vs-real baseline:  {report['frechet_real_baseline']:.2f}  (two real sets of the same size)",
              f"kernel distance (KID):  {report['kid']:.4f}  (unbiased: about 0 for real images; "
              f"real-vs-real {report['kid_real_baseline']:.4f})"]
    if report["precision"] is not None:
        lines += [f"precision / recall:     {report['precision']:.2f} / {report['recall']:.2f}  "
                  f"(k = 3; real-vs-real {report['precision_real_baseline']:.2f} / {report['recall_real_baseline']:.2f})"]
    lines.append("predicted class counts: " + " ".join(f"{n}:{c}" for n, c in zip(names, report["predicted_counts"])))
    return "\n".join(lines)
