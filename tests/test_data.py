"""Data: real MNIST through the offline archives, the range conversions, and clear errors offline."""

import os

import pytest
import torch
import torchvision

from diffusion_course import data


def test_mnist_loads_from_the_archives(mnist_train, data_root):
    assert os.environ.get("DIFFUSION_COURSE_DATA") == str(data_root)
    images, labels = mnist_train.images, mnist_train.labels
    assert mnist_train.name == "mnist"
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert labels.tolist()[:10] == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]      # the official first training labels
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert torch.bincount(labels).min() > 5000                          # every digit well represented
    # Digits are mostly background (-1) with bright strokes: the mean pixel is about 0.13 * 2 - 1.
    assert images.mean().item() == pytest.approx(0.1307 * 2 - 1, abs=0.01)
    # The archives were copied into the (temporary) data folder, not read in place.
    if os.environ.get("DIFFUSION_COURSE_ARCHIVES"):
        assert (data_root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()


def test_test_split_and_limit(data_root):
    test = data.load_dataset("mnist", train=False, limit=100)
    assert test.images.shape == (100, 1, 28, 28)
    assert test.labels.tolist()[:10] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]    # the official first test labels
    assert data.data_root() == data_root


def test_range_round_trip_on_uint8():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = data.to_model_range(pixels)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert x.flatten()[128].item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    back = data.to_image_range(x)
    assert back.dtype == torch.uint8 and torch.equal(back, pixels)
    # Model outputs outside [-1, 1] are clamped, not wrapped around.
    assert data.to_image_range(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255]


def test_data_root_default(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFUSION_COURSE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.data_root() == tmp_path / ".cache" / "diffusion-course" / "data"


def test_offline_without_archives_names_the_missing_file(monkeypatch, tmp_path):
    empty_archives, empty_root = tmp_path / "archives", tmp_path / "data"
    empty_archives.mkdir()
    monkeypatch.setenv("DIFFUSION_COURSE_ARCHIVES", str(empty_archives))
    monkeypatch.setenv("DIFFUSION_COURSE_DATA", str(empty_root))
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])   # nothing listens
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset("mnist")
    message = str(error.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert str(empty_root) in message
    assert "DIFFUSION_COURSE_ARCHIVES" in message


def test_unknown_dataset_rejected():
    with pytest.raises(ValueError, match=r"Unknown dataset 'mnsit'; expected one of \['cifar10', 'fashion_mnist', 'mnist'\]"):
        data.load_dataset("mnsit")
