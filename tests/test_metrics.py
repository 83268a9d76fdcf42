"""Metrics: the classifier per dataset (checksums, training guards), the distances against closed
forms and reference implementations, and evaluate_samples' input checks (issue 12, findings 1 and 4)."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from diffusion_course import data, metrics

SHIPPED = metrics.CLASSIFIERS["mnist"].folder
SHIPPED_CIFAR = metrics.CLASSIFIERS["cifar10"].folder


def _gaussian(num, dim=4, seed=0, shift=0.0):
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# ----------------------------------------------------------------------------------------------
# Classifiers

def test_shipped_mnist_classifier_loads_unchanged_and_verified(data_root):
    config = json.loads((SHIPPED / "config.json").read_text())
    digest = hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest()
    assert config["sha256"]["model.safetensors"] == digest
    assert digest == "8117ccfaf8e225c5a3cb3f0099737c1e817d1f5874d93d8b2a83b6fb42a5df52"   # the weights as shipped
    model = metrics.load_classifier("mnist")
    assert isinstance(model, metrics.Classifier) and not model.training
    test = data.load_dataset("mnist", train=False, limit=1000)
    assert float((metrics.predict(test.images) == test.labels).float().mean()) > 0.97
    assert metrics.features(test.images[:5], "mnist").shape == (5, 128)


def test_ten_flipped_bits_are_reported_as_damage(tmp_path):
    # Finding 1: ten flipped bits went unnoticed (48% accuracy, no warning).
    folder = tmp_path / "classifier"
    shutil.copytree(SHIPPED, folder)
    weights = bytearray((folder / "model.safetensors").read_bytes())
    for position in torch.randint(1000, len(weights), (10,), generator=torch.Generator().manual_seed(0)).tolist():
        weights[position] ^= 1 << 6
    (folder / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ValueError, match="are damaged: SHA-256"):
        metrics.load_classifier("mnist", path=folder)


def test_a_classifier_without_checksum_is_refused(tmp_path):
    folder = tmp_path / "classifier"
    shutil.copytree(SHIPPED, folder)
    (folder / "config.json").write_text(json.dumps({"dataset": "mnist"}))
    with pytest.raises(ValueError, match="cannot be verified"):
        metrics.load_classifier("mnist", path=folder)


def test_shipped_cifar10_classifier_loads_verified_and_recognises_test_images(data_root):
    config = json.loads((SHIPPED_CIFAR / "config.json").read_text())
    digest = hashlib.sha256((SHIPPED_CIFAR / "model.safetensors").read_bytes()).hexdigest()
    assert config["sha256"]["model.safetensors"] == digest
    assert config["dataset"] == "cifar10" and config["limit"] is None and config["test_images"] == 10000
    assert config["test_accuracy"] >= 0.85        # issue 14's aim, measured on all 10,000 test images
    model = metrics.load_classifier("cifar10")
    assert isinstance(model, metrics.Classifier) and not model.training
    test = data.load_dataset("cifar10", train=False, limit=1000)
    assert float((metrics.predict(test.images, "cifar10") == test.labels).float().mean()) >= 0.80
    assert metrics.features(test.images[:5], "cifar10").shape == (5, 128)


def test_missing_classifier_says_how_to_train_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"No fashion_mnist classifier.*train-classifier --dataset fashion_mnist"):
        metrics.load_classifier("fashion_mnist")
    with pytest.raises(ValueError, match="Unknown dataset"):
        metrics.load_classifier("svhn")


def test_classifier_shapes_per_dataset():
    grey, colour = metrics.build_classifier("mnist"), metrics.build_classifier("cifar10")
    assert grey(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert colour(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert colour.features(torch.zeros(2, 3, 32, 32)).shape == (2, 128)
    assert sorted(metrics.Classifier().state_dict()) == sorted(metrics.load_classifier("mnist").state_dict())
    with pytest.raises(ValueError, match="must be divisible by 2"):
        metrics.Classifier(1, 30, 10, channels=(8, 8))


@pytest.mark.parametrize("epochs", [0, -1, 1.5, True])
def test_train_classifier_refuses_bad_epochs(tmp_path, epochs):
    # Finding 1: --epochs 0 and -1 were accepted ("test accuracy 8.46%").
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        metrics.train_classifier("mnist", tmp_path / "out", epochs=epochs)
    assert not (tmp_path / "out").exists()


def test_train_classifier_never_replaces_the_shipped_weights_silently():
    # Finding 1: train-classifier's default output was the classifier inside the package.
    before = {folder: (folder / "model.safetensors").read_bytes() for folder in (SHIPPED, SHIPPED_CIFAR)}
    for out in (SHIPPED, SHIPPED_CIFAR, SHIPPED.parent / "fashion_mnist_classifier"):
        with pytest.raises(ValueError, match="inside the package's shipped weights"):
            metrics.train_classifier("mnist", out, epochs=1)
    assert {folder: (folder / "model.safetensors").read_bytes() for folder in before} == before
    assert not (SHIPPED.parent / "fashion_mnist_classifier").exists()


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_train_classifier_resumes_to_the_same_weights(data_root, tmp_path, dataset):
    # A run stopped after epoch 1 and resumed from its checkpoint ends where an unbroken run ends.
    whole = tmp_path / "whole"
    metrics.train_classifier(dataset, whole, epochs=2, seed=0, limit=300)

    def stop_after_first_epoch(progress):
        if progress["epoch"] == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        metrics.train_classifier(dataset, tmp_path / "broken", epochs=2, seed=0, limit=300,
                                 checkpoint_dir=tmp_path / "run", progress=stop_after_first_epoch)
    assert not (tmp_path / "broken" / "model.safetensors").exists()
    metrics.train_classifier(dataset, tmp_path / "broken", epochs=2, seed=0, limit=300,
                             checkpoint_dir=tmp_path / "run", resume=True)
    assert (tmp_path / "broken" / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="belongs to another run"):
        metrics.train_classifier(dataset, tmp_path / "other", epochs=3, seed=0, limit=300,
                                 checkpoint_dir=tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="needs the checkpoint_dir"):
        metrics.train_classifier(dataset, tmp_path / "other", epochs=2, resume=True)


def test_random_crops_are_windows_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(metrics._augment(x, flip=False, crop_pad=0), x)
    torch.manual_seed(0)
    crops, padded = metrics._augment(x, flip=False, crop_pad=2), torch.nn.functional.pad(x, (2,) * 4)
    for image, crop in zip(padded, crops):
        windows = [image[:, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(crop, window) for window in windows)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_train_classifier_writes_verified_weights(data_root, tmp_path, dataset):
    out = tmp_path / dataset
    accuracy = metrics.train_classifier(dataset, out, epochs=1, seed=0, limit=256)
    assert 0.0 <= accuracy <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == dataset and config["epochs"] == 1 and config["limit"] == 256
    assert config["sha256"]["model.safetensors"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    model = metrics.load_classifier(dataset, path=out)
    assert metrics.predict(torch.zeros(3, *data.DATASETS[dataset].shape), dataset, model=model).shape == (3,)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="exists already"):
        metrics.train_classifier(dataset, out, epochs=1)


def test_predict_checks_the_dataset_shape_and_range():
    with pytest.raises(ValueError, match=r"\(C, H, W\) = \(1, 28, 28\)"):
        metrics.predict(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"must be scaled to \[-1, 1\]"):
        metrics.features(torch.full((2, 1, 28, 28), 255.0))


# ----------------------------------------------------------------------------------------------
# Distances: closed forms and reference implementations

def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    a = _gaussian(500, dim=4)
    delta = torch.tensor([3.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(a, a + delta) == pytest.approx(float(delta.square().sum()), rel=1e-8)
    # Scaling by s: |mu - s mu|^2 + tr(S + s^2 S - 2 s S) = (1 - s)^2 (|mu|^2 + tr(S)).
    expected = 4 * (float(a.mean(0).square().sum()) + float(torch.cov(a.T).trace()))
    assert metrics.frechet_distance(a, 3 * a) == pytest.approx(expected, rel=1e-8)
    # Two independent draws: close to |mu_1 - mu_2|^2 = 10.25 for large N.
    assert metrics.frechet_distance(_gaussian(20000, seed=1), _gaussian(20000, seed=2) + delta) == pytest.approx(10.25, abs=0.1)


def _kid_reference(x, y):
    """The unbiased MMD^2 of Binkowski et al. (2018), Eq. 2, written with explicit pair loops."""
    k = lambda u, v: (float(u @ v) / len(u) + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kernel_distance_matches_the_pairwise_formula():
    x, y = _gaussian(12, seed=3), _gaussian(9, seed=4, shift=0.5)
    assert metrics.kernel_distance(x, y) == pytest.approx(_kid_reference(x, y), rel=1e-10)
    assert metrics.kernel_distance(x, x) == pytest.approx(_kid_reference(x, x), rel=1e-10)
    # Row blocks give the same sums as one block.
    assert float(metrics._kernel_sum(x, y, chunk=5)) == pytest.approx(float(metrics._kernel_sum(x, y)), rel=1e-12)


def test_kernel_distance_is_unbiased_and_sees_a_shift():
    values = torch.tensor([metrics.kernel_distance(_gaussian(15, seed=2 * s), _gaussian(15, seed=2 * s + 1))
                           for s in range(300)])
    assert abs(float(values.mean())) < 3 * float(values.std()) / 300 ** 0.5     # mean 0 within its error
    assert (values < 0).any()                                                    # single values can be negative
    # The biased (V-statistic) estimate has a clearly positive mean at this size: that bias is what KID removes.
    biased = [float(metrics._kernel_sum(a, a) / 225 + metrics._kernel_sum(b, b) / 225 - 2 * metrics._kernel_sum(a, b) / 225)
              for a, b in ((_gaussian(15, seed=2 * s), _gaussian(15, seed=2 * s + 1)) for s in range(100))]
    assert np.mean(biased) > 10 * float(values.mean().abs())
    assert metrics.kernel_distance(_gaussian(200, seed=1), _gaussian(200, seed=2, shift=2.0)) > 10 * float(values.std())
    # Identical sets: the unbiased estimate is 2 / (m - 1) * (mean of all k(x_i, x_j) - mean of k(x_i, x_i)),
    # a small negative number that vanishes as 1 / m.
    for m in (50, 400):
        x = _gaussian(m, seed=1)
        kernel = (x @ x.T / 4 + 1) ** 3
        closed_form = 2 / (m - 1) * float(kernel.mean() - kernel.diagonal().mean())
        assert metrics.kernel_distance(x, x) == pytest.approx(closed_form, rel=1e-9)
    assert abs(closed_form) < 0.2 * float(values.std())     # small beside the spread at m = 15


def _precision_reference(real, fake, k):
    """Kynkaanniemi et al. (2019), Eq. 1-2, written with explicit loops."""
    radii = [sorted(float((r - s).norm()) for s in real)[k] for r in real]
    return np.mean([any(float((f - r).norm()) <= radius for r, radius in zip(real, radii)) for f in fake])


def test_precision_and_recall_known_cases():
    real = _gaussian(60, seed=5)
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    assert metrics.precision_recall(real, _gaussian(60, seed=6, shift=100.0)) == (0.0, 0.0)
    fake = _gaussian(50, seed=7, shift=0.7)
    result = metrics.precision_recall(real, fake, k=3)
    assert result.precision == pytest.approx(_precision_reference(real, fake, 3))
    assert result.recall == pytest.approx(_precision_reference(fake, real, 3))
    with pytest.raises(ValueError, match="N >= 4"):
        metrics.precision_recall(real, fake[:3])


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory():
    x = _gaussian(400, dim=1, seed=8)
    low, high = metrics.bootstrap_interval(lambda s: float(s.mean()), x, num=400, level=0.9, seed=0)
    mean, half_width = float(x.mean()), 1.645 * float(x.std()) / 400 ** 0.5
    assert low < mean < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.2)
    assert metrics.bootstrap_interval(lambda s: float(s.mean()), x, num=50) == \
        metrics.bootstrap_interval(lambda s: float(s.mean()), x, num=50)         # seeded
    interval = metrics.bootstrap_interval(metrics.kernel_distance, _gaussian(30, seed=1), _gaussian(30, seed=2), num=20)
    assert interval.low <= interval.high
    for kwargs, message in (({"num": 1}, "num must be an int >= 2"), ({"level": 1.0}, r"level must lie in \(0, 1\)")):
        with pytest.raises(ValueError, match=message):
            metrics.bootstrap_interval(lambda s: 0.0, x, **kwargs)


def test_distances_refuse_bad_features():
    with pytest.raises(ValueError, match="differ in dimension"):
        metrics.frechet_distance(_gaussian(5, dim=3), _gaussian(5, dim=4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.kernel_distance(_gaussian(5) * float("nan"), _gaussian(5))
    with pytest.raises(ValueError, match=r"\(N, D\) tensor with N >= 2"):
        metrics.frechet_distance(_gaussian(1), _gaussian(5))


# ----------------------------------------------------------------------------------------------
# evaluate_samples (finding 4)

def test_evaluate_real_digits_against_their_baselines(data_root):
    test = data.load_dataset("mnist", train=True, limit=200)      # real digits the test split never saw
    report = metrics.evaluate_samples(test.images, test.labels, dataset="mnist", seed=0)
    assert report["dataset"] == "mnist" and report["num_samples"] == 200
    assert report["accuracy"] > 0.95
    assert abs(report["kid"]) < 0.05 and abs(report["kid_real_baseline"]) < 0.05     # about 0 for real digits
    # Real digits sit inside the real manifold about as often as a second real set does.
    assert report["precision"] == pytest.approx(report["precision_real_baseline"], abs=0.1)
    assert report["recall"] == pytest.approx(report["recall_real_baseline"], abs=0.1)
    assert sum(report["predicted_counts"]) == 200
    unlabelled = metrics.evaluate_samples(test.images[:20], None)
    assert unlabelled["accuracy"] is None and sum(unlabelled["predicted_counts"]) == 20
    printed = metrics.format_report(report)
    for line in ("samples:                200", "class accuracy:", "Frechet distance:", "real-vs-real baseline:",
                 "kernel distance (KID):", "precision / recall:", "predicted class counts: 0:"):
        assert line in printed


def test_evaluate_refuses_nan_images_instead_of_reporting_100_percent(data_root):
    # Finding 4: all-NaN images labelled 0 reported "class accuracy: 100.0%".
    with pytest.raises(ValueError, match="NaN or infinite values"):
        metrics.evaluate_samples(torch.full((10, 1, 28, 28), float("nan")), torch.zeros(10, dtype=torch.long))


@pytest.mark.parametrize("labels, message", [
    (torch.arange(10, 20), r"labels must lie in \[-1, 10\).*from 10 to 19"),           # labels 10-19 scored 0%
    (torch.zeros(9, dtype=torch.long), r"shape \(10,\), one per image"),                # wrong label count
    (torch.zeros(10), "integer tensor"),
])
def test_evaluate_refuses_bad_labels(data_root, labels, message):
    with pytest.raises(ValueError, match=message):
        metrics.evaluate_samples(torch.zeros(10, 1, 28, 28), labels)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(10, 1, 28, 28, dtype=torch.uint8), "scale uint8 pixels"),
    (torch.zeros(10, 28, 28), r"shape \(10, 28, 28\)"),
    (torch.zeros(10, 3, 32, 32), r"\(C, H, W\) = \(1, 28, 28\)"),
    (torch.full((10, 1, 28, 28), 200.0), r"must be scaled to \[-1, 1\]"),
])
def test_evaluate_refuses_bad_images(data_root, images, message):
    with pytest.raises(ValueError, match=message):
        metrics.evaluate_samples(images, torch.zeros(10, dtype=torch.long))


def test_float_images_in_a_samples_file_are_refused_before_evaluation(tmp_path):
    # Finding 4: float images in [0, 1] scored 14%; they are not a samples file.
    np.savez(tmp_path / "f.npz", images=np.random.rand(10, 28, 28).astype(np.float32), labels=np.zeros(10, np.int64))
    with pytest.raises(ValueError, match="float images are not a samples file"):
        data.load_samples(tmp_path / "f.npz")


def test_evaluate_needs_two_samples_and_at_most_half_the_test_set(data_root):
    with pytest.raises(ValueError, match="between 2 and 5000 samples"):
        metrics.evaluate_samples(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long))
