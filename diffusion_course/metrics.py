"""Measuring generated digits: class accuracy and a Frechet distance, with a small MNIST classifier.

- accuracy: how often the classifier recognises a sample as the class that was asked for.
- Frechet distance (as in FID, Heusel et al. 2017, but in this classifier's 128-d feature
  space instead of Inception's): fit a Gaussian to the features of each set and compare
      FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}).
  Lower is better. It depends on the sample count, so it is always printed beside the
  distance between two real sets of the same size (the best a model can hope for).

The classifier is trained by `diffusion-course train-classifier` (about a minute on a CPU) and
ships with the package.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CLASSIFIER_PATH = Path(__file__).parent / "pretrained" / "mnist_classifier"


class Classifier(nn.Module):
    """Two conv layers and two linear layers; `features` is the 128-d layer before the logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.hidden = nn.Linear(64 * 7 * 7, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.hidden(self.conv(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_classifier(out: str | Path = CLASSIFIER_PATH, epochs: int = 2, seed: int = 0) -> float:
    """Train on MNIST's training split (with small random shifts), save, return test accuracy."""
    from . import data

    torch.manual_seed(seed)
    train, test = data.load_dataset("mnist", train=True), data.load_dataset("mnist", train=False)
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(train.images)).split(128):
            shift = [int(v) for v in torch.randint(-2, 3, (2,))]
            x = torch.roll(train.images[index], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), train.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    accuracy = float((predict(test.images, model) == test.labels).float().mean())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"test_accuracy": accuracy, "epochs": epochs, "seed": seed}))
    return accuracy


@functools.lru_cache(maxsize=2)
def load_classifier(path: str | Path = CLASSIFIER_PATH) -> Classifier:
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"No classifier at {file}; train one with `diffusion-course train-classifier`.")
    model = Classifier()
    model.load_state_dict(load_file(str(file)))
    return model.eval()


@torch.no_grad()
def predict(images: Tensor, model: Classifier | None = None) -> Tensor:
    """(N, 1, 28, 28) images in [-1, 1] -> (N,) predicted digits."""
    model = model or load_classifier()
    model.eval()
    return torch.cat([model(x.cpu().float()).argmax(1) for x in _check_digits(images).split(500)])


@torch.no_grad()
def features(images: Tensor, model: Classifier | None = None) -> Tensor:
    """(N, 1, 28, 28) images in [-1, 1] -> (N, 128) classifier features."""
    model = model or load_classifier()
    return torch.cat([model.features(x.cpu().float()) for x in _check_digits(images).split(500)])


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (computed in float64)."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    sqrt_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(sqrt_a @ cov_b @ sqrt_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross))


def within_class_spread(images: Tensor) -> float:
    """Mean distance of each image's classifier features from the set's mean feature: a simple
    diversity measure for images of one class (0 when every image is the same)."""
    f = features(images)
    return float((f - f.mean(0)).norm(dim=1).mean())


def evaluate_samples(images: Tensor, labels: Tensor, seed: int = 0) -> dict:
    """Accuracy (for labelled samples), Frechet distance to real test digits, and the real-vs-real
    Frechet distance at the same sample count, plus how often each digit was produced."""
    from . import data

    num = len(images)
    test = data.load_dataset("mnist", train=False)
    if num > len(test.images) // 2:
        raise ValueError(f"At most {len(test.images) // 2} samples can be compared with the test set, got {num}.")
    order = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(seed))
    real_a, real_b = test.images[order[:num]], test.images[order[num:2 * num]]
    predicted = predict(images)
    labelled = labels >= 0
    report = {
        "num_samples": num,
        "accuracy": float((predicted[labelled] == labels[labelled]).float().mean()) if labelled.any() else None,
        "frechet": frechet_distance(features(images), features(real_a)),
        "frechet_real_baseline": frechet_distance(features(real_b), features(real_a)),
        "predicted_counts": torch.bincount(predicted, minlength=10).tolist(),
    }
    return report


def format_report(report: dict) -> str:
    lines = [f"samples:                {report['num_samples']}"]
    if report["accuracy"] is not None:
        lines.append(f"class accuracy:         {report['accuracy']:.1%}  (recognised as the requested digit)")
    lines += [f"Frechet distance:       {report['frechet']:.2f}  (to real test digits; lower is better)",
              f"real-vs-real baseline:  {report['frechet_real_baseline']:.2f}  (two real sets of the same size)",
              "predicted digit counts: " + " ".join(f"{d}:{c}" for d, c in enumerate(report["predicted_counts"]))]
    return "\n".join(lines)


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def _check_digits(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1:] != (1, 28, 28):
        raise ValueError(f"The metrics classifier takes MNIST-shaped images (N, 1, 28, 28) in [-1, 1], "
                         f"got shape {tuple(images.shape)}.")
    return images
