"""Shared pytest fixtures for the library's unit tests (fixtures only)."""

from __future__ import annotations

import pytest
import torch

from diffusion_course import data, threads
from diffusion_course.unet import UNet, UNetConfig


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A fresh, session-wide DIFFUSION_COURSE_DATA folder.

    The MNIST archives are copied into it from DIFFUSION_COURSE_ARCHIVES (set by the test
    environment). Without that variable and without network access, loading MNIST fails with
    the library's own FileNotFoundError: the data tests then fail, they are never skipped.
    """
    root = tmp_path_factory.mktemp("diffusion_course_data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFUSION_COURSE_DATA", str(root))
        yield root


@pytest.fixture(scope="session")
def mnist_train(data_root):
    """The whole MNIST training split, loaded once per session (images in [-1, 1])."""
    return data.load_dataset("mnist", train=True)


@pytest.fixture(scope="session")
def mnist_subset(mnist_train):
    """The first 64 MNIST training digits and their labels."""
    return data.Dataset(mnist_train.images[:64].clone(), mnist_train.labels[:64].clone(), "mnist")


def _tiny_config(num_classes: int | None = None, image_size: int = 8, in_channels: int = 1) -> UNetConfig:
    """The smallest sensible U-Net: 8 base channels, two levels."""
    return UNetConfig(in_channels=in_channels, image_size=image_size, base_channels=8,
                      channel_mults=(1, 2), num_classes=num_classes)


def _build_tiny_unet(num_classes: int | None = None, image_size: int = 8, in_channels: int = 1,
                    seed: int = 0, perturb: bool = True) -> UNet:
    """A tiny UNet initialised under torch.manual_seed(seed).

    conv_out starts at zero (the model predicts zero noise), which hides most bugs; with
    perturb=True its weights are redrawn (seeded by seed + 1) so every output depends on every layer.
    """
    torch.manual_seed(seed)
    model = UNet(_tiny_config(num_classes, image_size, in_channels))
    if perturb:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            model.conv_out.weight.copy_(0.1 * torch.randn(model.conv_out.weight.shape, generator=generator))
            model.conv_out.bias.copy_(0.1 * torch.randn(model.conv_out.bias.shape, generator=generator))
    return model.eval()


@pytest.fixture
def make_tiny_unet():
    """Factory fixture: make_tiny_unet(num_classes=None, image_size=8, in_channels=1, seed=0, perturb=True)."""
    return _build_tiny_unet


@pytest.fixture
def tiny_unet():
    """An unconditional tiny UNet for 1 x 8 x 8 images, with a perturbed conv_out."""
    return _build_tiny_unet()


@pytest.fixture
def tiny_cond_unet():
    """A class-conditional (10 classes + null) tiny UNet for 1 x 8 x 8 images, perturbed conv_out."""
    return _build_tiny_unet(num_classes=10)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Run the tests on one thread: the models are tiny, and on a small machine that is busy with
    other work, two OpenMP threads fighting for the cores make each step 10-30x slower. (Also the
    same thread count for every in-process run: tests/test_distributed.py compares weights from
    one-thread torchrun workers with an in-process run, and summation order depends on threads.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:   # the CLI's threads.use_best_threads() keeps it at 1
        patch.setenv("DIFFUSION_COURSE_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def split_into():
    """split_into(n): cut batches into n parts of one thread each for the rest of the test
    (threads.set_workers; runs.train then uses min(2 n, 4) parts when n > 1), restored afterwards."""
    saved = threads.workers(), threads.threads_each()
    yield lambda count: threads.set_workers(count)
    threads.set_workers(*saved)
