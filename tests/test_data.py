"""Data: real MNIST through the offline archives, the range conversions, and clear errors offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from diffusion_course import data

REPO = Path(__file__).resolve().parents[1]


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


def test_pixels_to_model_moves_channels_first_and_scales():
    """Lesson 07's exercise reference: (N, H, W, C) uint8 as stored -> (N, C, H, W) in [-1, 1], each pixel's
    colour kept (a permute, not a reshape); grey (N, H, W) gains a channel; numpy arrays work too."""
    pixels = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    images = data.pixels_to_model(pixels)
    assert images.shape == (2, 3, 5, 7) and images.dtype == torch.float32
    assert torch.equal(images[1, :, 4, 6], pixels[1, 4, 6].float() / 127.5 - 1)     # pixel (4, 6)'s R, G, B
    assert torch.equal(data.pixels_to_model(pixels.numpy()), images)
    assert data.pixels_to_model(torch.full((1, 2, 2), 255, dtype=torch.uint8)).shape == (1, 1, 2, 2)
    assert data.pixels_to_model(torch.tensor([[[0, 255]]], dtype=torch.uint8)).tolist() == [[[[-1.0, 1.0]]]]


@pytest.mark.parametrize("pixels", [torch.zeros(2, 4, 4, 3), torch.zeros(4, 4, dtype=torch.uint8)])
def test_pixels_to_model_refuses_what_is_not_stored_pixels(pixels):
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W\) or \(N, H, W, C\)"):
        data.pixels_to_model(pixels)


def test_random_hflip_mirrors_about_half_the_images_reproducibly():
    """Each image is mirrored left-right (the last axis) with probability 1/2, from the given generator."""
    images = torch.arange(4000 * 4, dtype=torch.float32).view(4000, 1, 1, 4)
    flipped = data.random_hflip(images, torch.Generator().manual_seed(0))
    mirrored = (flipped == images.flip(-1)).all(-1).flatten()
    kept = (flipped == images).all(-1).flatten()
    assert bool((mirrored ^ kept).all()) and abs(mirrored.float().mean().item() - 0.5) < 0.03
    assert torch.equal(flipped, data.random_hflip(images, torch.Generator().manual_seed(0)))


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


# ----------------------------------------------------------------------------------------------
# Dataset records (issue 11: one record per dataset instead of tuples plus CLASS_NAMES)

def test_dataset_records_name_shape_and_classes():
    assert set(data.DATASETS) == {"mnist", "fashion_mnist", "cifar10"}
    assert data.DATASETS["mnist"].shape == (1, 28, 28) and data.DATASETS["cifar10"].shape == (3, 32, 32)
    assert data.class_names("cifar10")[:3] == ("airplane", "automobile", "bird")
    assert all(info.num_classes == 10 and info.name == name for name, info in data.DATASETS.items())
    assert not hasattr(data, "CLASS_NAMES")
    with pytest.raises(ValueError, match="Unknown dataset"):
        data.class_names("svhn")


@pytest.mark.parametrize("limit", [-5, 0, 2.5, True, "10"])
def test_load_dataset_refuses_a_bad_limit(limit, data_root):
    # Issue 12, finding 11: limit=-5 used to drop the last five images.
    with pytest.raises(ValueError, match=r"limit must be a positive int"):
        data.load_dataset("mnist", train=False, limit=limit)


def test_load_dataset_refuses_a_non_bool_split(data_root):
    with pytest.raises(ValueError, match="train must be True"):
        data.load_dataset("mnist", train="test")


# ----------------------------------------------------------------------------------------------
# CIFAR-10 from the offline arrays (issue 14)

def _archives():
    folder = os.environ.get("DIFFUSION_COURSE_ARCHIVES")
    if not folder or not (Path(folder) / "CIFAR10" / "cifar10_test.npz").is_file():
        pytest.fail("DIFFUSION_COURSE_ARCHIVES must point at a folder with CIFAR10/cifar10_test.npz "
                    "(see shared/data/README.md)")
    return Path(folder)


def test_cifar10_test_split_from_the_offline_arrays(data_root):
    _archives()
    test = data.load_dataset("cifar10", train=False)
    assert test.name == "cifar10"
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.float32
    assert test.labels.dtype == torch.int64
    assert test.labels.tolist()[:10] == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]     # the published first test labels
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.images.min().item() == -1.0 and test.images.max().item() == 1.0
    assert not any(data_root.rglob("*.npz"))                              # read in place, not copied


def test_cifar10_train_split_labels_and_channel_means(data_root):
    archives = _archives()
    train = data.load_dataset("cifar10", train=True, limit=10)
    assert train.images.shape == (10, 3, 32, 32)
    assert train.labels.tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]        # data_batch_1's first labels
    # The published per-channel means of all 50,000 training images (on the uint8 pixels, to spare memory).
    pixels, labels = data._load_offline_arrays(data.DATASETS["cifar10"], True, archives / "CIFAR10" / "cifar10_train.npz")
    sums = torch.stack([pixels[..., channel].sum(dtype=torch.int64) for channel in range(3)])
    means = sums.double() / (pixels[..., 0].numel() * 255)
    assert means.tolist() == pytest.approx([0.4914, 0.4822, 0.4465], abs=5e-5)
    assert torch.bincount(labels).tolist() == [5000] * 10


def _fake_cifar_archives(tmp_path, images, labels):
    folder = tmp_path / "archives"
    (folder / "CIFAR10").mkdir(parents=True)
    np.savez(folder / "CIFAR10" / "cifar10_test.npz", images=images, labels=labels)
    return folder


def test_cifar10_arrays_with_other_images_are_refused(monkeypatch, tmp_path):
    real = data._load_offline_arrays(data.DATASETS["cifar10"], False,
                                     _archives() / "CIFAR10" / "cifar10_test.npz")
    images, labels = real[0].numpy().copy(), real[1].numpy().copy()
    images[0, 0, 0, 0] ^= 1                                               # one pixel differs
    monkeypatch.setenv("DIFFUSION_COURSE_ARCHIVES", str(_fake_cifar_archives(tmp_path, images, labels)))
    with pytest.raises(ValueError, match="Refusing to use other data"):
        data.load_dataset("cifar10", train=False)


@pytest.mark.parametrize("images, labels, problem", [
    (np.zeros((10000, 32, 32, 3), np.float32), np.zeros(10000, np.int64), "float images"),
    (np.zeros((10000, 3, 32, 32), np.uint8), np.zeros(10000, np.int64), "channels first"),
    (np.zeros((100, 32, 32, 3), np.uint8), np.zeros(100, np.int64), "too few"),
    (np.zeros((10000, 32, 32, 3), np.uint8), np.full(10000, 10, np.int64), "label 10"),
])
def test_cifar10_arrays_of_the_wrong_layout_are_refused(monkeypatch, tmp_path, images, labels, problem):
    monkeypatch.setenv("DIFFUSION_COURSE_ARCHIVES", str(_fake_cifar_archives(tmp_path, images, labels)))
    with pytest.raises(ValueError, match=r"does not hold the cifar10 test split: expected images uint8 \(10000, 32, 32, 3\)"):
        data.load_dataset("cifar10", train=False)


def test_cifar10_without_arrays_or_network_names_both_ways(monkeypatch, tmp_path):
    (tmp_path / "archives").mkdir()
    monkeypatch.setenv("DIFFUSION_COURSE_ARCHIVES", str(tmp_path / "archives"))
    monkeypatch.setenv("DIFFUSION_COURSE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset("cifar10", train=False)
    assert "cifar-10-python.tar.gz" in str(error.value) and "CIFAR10/cifar10_test.npz" in str(error.value)


# ----------------------------------------------------------------------------------------------
# The [-1, 1] range, checked where data enters

def test_check_model_range_accepts_model_range_and_returns_it():
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    assert data.check_model_range(x, shape=(1, 4, 4)) is x


@pytest.mark.parametrize("images, message", [
    (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), "scale uint8 pixels with data.to_model_range"),
    (torch.rand(2, 1, 4, 4) * 255, r"must be scaled to \[-1, 1\]"),
    (torch.full((2, 1, 4, 4), float("nan")), "NaN or infinite"),
    (torch.zeros(2, 4, 4), r"got torch.float32 of shape \(2, 4, 4\)"),
    (torch.zeros(2, 3, 4, 4), r"with \(C, H, W\) = \(1, 4, 4\)"),
])
def test_check_model_range_refuses(images, message):
    with pytest.raises(ValueError, match=message):
        data.check_model_range(images, shape=(1, 4, 4))


# ----------------------------------------------------------------------------------------------
# Image files (moved from cli.py)

def test_load_image_grey_and_rgb(tmp_path):
    from PIL import Image

    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    grey = data.load_image(tmp_path / "grey.png", channels=1, size=8)
    assert grey.shape == (1, 1, 8, 8) and torch.equal(data.to_image_range(grey)[0, 0], torch.from_numpy(pixels))
    Image.fromarray(np.stack([pixels, 255 - pixels, pixels], -1)).save(tmp_path / "rgb.png")
    rgb = data.load_image(tmp_path / "rgb.png", channels=3, size=4)
    assert rgb.shape == (1, 3, 4, 4) and rgb.min() >= -1 and rgb.max() <= 1


def test_load_image_unreadable_and_missing_files(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="Could not read the image"):
        data.load_image(tmp_path / "notes.png", 1, 28)
    with pytest.raises(ValueError, match="Could not read the image"):
        data.load_image(tmp_path / "nowhere.png", 1, 28)
    with pytest.raises(ValueError, match="channels must be 1"):
        data.load_image(tmp_path / "notes.png", 2, 28)


def test_load_image_refuses_a_huge_image_before_decoding(tmp_path, monkeypatch):
    # Issue 12, finding 10: a huge --image ended in a traceback (or a decompression bomb).
    from PIL import Image

    Image.new("L", (5000, 4000)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the image was decoded"))
    with pytest.raises(ValueError, match=r"5000 x 4000 pixels; at most 16,777,216"):
        data.load_image(tmp_path / "huge.png", 1, 28)


# ----------------------------------------------------------------------------------------------
# Samples files (issue 12, findings 3, 4, 10, 12)

def _images(num=6, channels=1, size=8, seed=0):
    return torch.rand(num, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("channels", [1, 3])
def test_samples_round_trip(tmp_path, channels):
    images, labels = _images(channels=channels), torch.tensor([0, 1, 2, 3, 4, 5])
    assert data.save_samples(tmp_path / "s.npz", images, labels) == tmp_path / "s.npz"
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].dtype == np.uint8 and f["labels"].dtype == np.int64
        assert f["images"].shape == ((6, 8, 8) if channels == 1 else (6, 8, 8, 3))
    loaded = data.load_samples(tmp_path / "s.npz")
    assert torch.equal(data.to_image_range(loaded.images), data.to_image_range(images))
    assert loaded.labels.tolist() == labels.tolist()
    assert (tmp_path / "s.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"]   # no temporary left


def test_prompts_travel_with_the_samples(tmp_path):
    prompts = ["a red 3", "a blue seven on the right", "", "a green 4", "two digits: red 1, blue 2", "a 5"]
    data.save_samples(tmp_path / "s.npz", _images(channels=3), None, prompts=prompts)
    assert data.load_samples(tmp_path / "s.npz").prompts == prompts
    assert data.load_samples(data.save_samples(tmp_path / "n.npz", _images(), None)).prompts is None
    with pytest.raises(ValueError, match="6 strings"):
        data.save_samples(tmp_path / "bad.npz", _images(), None, prompts=prompts[:5])
    with data.SampleWriter(tmp_path / "w.npz", 6, (3, 8, 8), prompts=prompts) as writer:
        writer.write(_images(channels=3)[:4])
        writer.write(_images(channels=3)[4:])
    assert data.load_samples(tmp_path / "w.npz").prompts == prompts


def test_an_interrupted_writer_keeps_the_prompts_of_what_it_finished(tmp_path):
    prompts = [f"a red {i}" for i in range(6)]
    writer = data.SampleWriter(tmp_path / "w.npz", 6, (3, 8, 8), prompts=prompts)
    writer.write(_images(channels=3)[:4])
    del writer                                   # as after kill -9: only the partial files are left
    assert data.load_samples(data.recover_samples(tmp_path / "w.npz")).prompts == prompts[:4]


def test_unlabelled_samples_get_minus_one(tmp_path):
    data.save_samples(tmp_path / "s.npz", _images(), None)
    assert data.load_samples(tmp_path / "s.npz").labels.tolist() == [-1] * 6


def test_save_samples_refuses_nan_images(tmp_path):
    # Finding 3: `sample --guidance nan` wrote all-black images and exited 0.
    images = _images()
    images[2] = float("nan")
    with pytest.raises(ValueError, match=r"the images contain NaN or infinite values \(1 of 6 images\)"):
        data.save_samples(tmp_path / "s.npz", images, None)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("existing", ["s.npz", "s.png"])
def test_save_samples_never_overwrites_without_asking(tmp_path, existing):
    # Finding 10: `sample` silently overwrote an existing output and the PNG beside it.
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=f"{existing} exists already.*overwrite=True"):
        data.save_samples(tmp_path / "s.npz", _images(), None)
    assert (tmp_path / existing).read_bytes() == b"precious"
    data.save_samples(tmp_path / "s.npz", _images(), None, overwrite=True)
    assert data.load_samples(tmp_path / "s.npz").images.shape == (6, 1, 8, 8)


def test_save_samples_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    # Finding 10: a full disk left a truncated .partial.npz behind.
    def full_disk(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez_compressed", full_disk)
    with pytest.raises(OSError, match="No space left"):
        data.save_samples(tmp_path / "s.npz", _images(), None)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0.0, 1, 2, 3, 4, 5]), "integer tensor of shape"),
    (torch.tensor([0, 1, 2]), r"shape \(6,\)"),
    (torch.tensor([0, 1, 2, 3, 4, -2]), "got -2"),
])
def test_save_samples_refuses_bad_labels(tmp_path, labels, message):
    with pytest.raises(ValueError, match=message):
        data.save_samples(tmp_path / "s.npz", _images(), labels)


def test_load_samples_refuses_what_is_not_a_samples_file(tmp_path):
    # Finding 4: `evaluate` trusted any .npz, and a .npy, 2-D arrays or wrong label counts gave tracebacks.
    cases = {
        "a.npy": (lambda p: np.save(p, np.zeros((6, 8, 8), np.uint8)), "holds a single array"),
        "flat.npz": (lambda p: np.savez(p, images=np.zeros((6, 64), np.uint8), labels=np.zeros(6, np.int64)),
                     r"got shape \(6, 64\)"),
        "float.npz": (lambda p: np.savez(p, images=np.zeros((6, 8, 8), np.float32), labels=np.zeros(6, np.int64)),
                      "float images are not a samples file"),
        "nolabels.npz": (lambda p: np.savez(p, images=np.zeros((6, 8, 8), np.uint8)), "has no 'labels' array"),
        "count.npz": (lambda p: np.savez(p, images=np.zeros((6, 8, 8), np.uint8), labels=np.zeros(5, np.int64)),
                      "6 images but 5 labels"),
        "floatlabels.npz": (lambda p: np.savez(p, images=np.zeros((6, 8, 8), np.uint8), labels=np.zeros(6)),
                            "'labels' must be a 1-D integer array"),
        "text.npz": (lambda p: p.write_text("hello"), "is not a samples .npz"),
        "pickled.npz": (lambda p: np.savez(p, images=np.array([None] * 6), labels=np.zeros(6, np.int64)),
                        "cannot read its arrays"),
    }
    for name, (write, message) in cases.items():
        write(tmp_path / name)
        with pytest.raises(ValueError, match=message):
            data.load_samples(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="No samples file"):
        data.load_samples(tmp_path / "missing.npz")


def test_sample_writer_streams_to_the_same_file_as_save_samples(tmp_path):
    images, labels = _images(num=10), torch.arange(10)
    with data.SampleWriter(tmp_path / "w.npz", total=10, shape=(1, 8, 8)) as writer:
        for start in range(0, 10, 4):
            writer.write(images[start:start + 4], labels[start:start + 4])
            assert json.loads((tmp_path / "w.partial.json").read_text())["done"] == writer.done
    data.save_samples(tmp_path / "s.npz", images, labels)
    streamed, whole = data.load_samples(tmp_path / "w.npz"), data.load_samples(tmp_path / "s.npz")
    assert torch.equal(streamed.images, whole.images) and torch.equal(streamed.labels, whole.labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png", "w.npz", "w.png"]


def test_sample_writer_keeps_the_finished_samples_when_interrupted(tmp_path):
    # Finding 12: a kill after 12 s of a 10,000-sample run left nothing.
    images = _images(num=4)
    with pytest.raises(KeyboardInterrupt) as error:
        with data.SampleWriter(tmp_path / "w.npz", total=10, shape=(1, 8, 8)) as writer:
            writer.write(images, torch.arange(4))
            raise KeyboardInterrupt
    assert "4 of 10 samples were saved to" in "\n".join(error.value.__notes__)
    assert writer.partial_path == tmp_path / "w.partial.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.partial.npz"]
    partial = data.load_samples(tmp_path / "w.partial.npz")
    assert torch.equal(data.to_image_range(partial.images), data.to_image_range(images))
    # A new run on the same name does not silently discard them.
    with pytest.raises(FileExistsError, match="An interrupted run left"):
        data.SampleWriter(tmp_path / "w.npz", total=10, shape=(1, 8, 8))


def test_sample_writer_samples_survive_kill_9(tmp_path):
    script = (
        "import os, signal, torch\n"
        "from diffusion_course import data\n"
        f"writer = data.SampleWriter({str(tmp_path / 'w.npz')!r}, total=100, shape=(1, 8, 8))\n"
        "for i in range(3):\n"
        "    writer.write(torch.full((5, 1, 8, 8), i / 10), torch.full((5,), i))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == -9
    assert not (tmp_path / "w.npz").exists()
    with pytest.raises(FileExistsError, match=r"recover its samples with data.recover_samples"):
        data.SampleWriter(tmp_path / "w.npz", total=100, shape=(1, 8, 8))
    recovered = data.load_samples(data.recover_samples(tmp_path / "w.npz"))
    assert recovered.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.partial.npz"]


def test_sample_writer_refuses_misuse(tmp_path):
    with pytest.raises(ValueError, match="total must be a positive int"):
        data.SampleWriter(tmp_path / "w.npz", total=0, shape=(1, 8, 8))
    (tmp_path / "taken.npz").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="taken.npz exists already"):
        data.SampleWriter(tmp_path / "taken.npz", total=2, shape=(1, 8, 8))   # checked before any work
    writer = data.SampleWriter(tmp_path / "w.npz", total=2, shape=(1, 8, 8))
    with pytest.raises(ValueError, match="at most 2 more images"):
        writer.write(_images(num=3))
    with pytest.raises(ValueError, match="the images contain NaN"):
        writer.write(torch.full((1, 1, 8, 8), float("nan")))
    writer.write(_images(num=1))
    with pytest.raises(ValueError, match=r"Only 1 of 2 samples were written; they are in .*w.partial.npz"):
        writer.close()


def test_sample_writer_without_room_leaves_nothing_and_names_the_file(tmp_path, monkeypatch):
    """On a full disk the writer used to leave a truncated s.partial.images.npy and name no file."""
    def no_room(*args, **kwargs):
        raise OSError(27, "File too large")

    monkeypatch.setattr(data.np.lib.format, "open_memmap", no_room)
    with pytest.raises(OSError, match=r"Could not make room for 10 samples beside .*s\.npz.*disk full"):
        data.SampleWriter(tmp_path / "s.npz", 10, (1, 28, 28))
    assert list(tmp_path.iterdir()) == []
