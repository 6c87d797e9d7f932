"""Tests of the Fréchet distance and the digits classifier metrics."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import scipy.linalg

from consistency_jax import data as data_lib
from consistency_jax.evaluators import digits as digits_metric


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, digits_data_dir) -> dict[str, str]:
    return {
        "data_dir": digits_data_dir,  # the session's digits (conftest), read only
        "cache_dir": str(tmp_path_factory.mktemp("cache")),
    }


@pytest.fixture(scope="module")
def splits(dirs) -> dict[str, dict[str, np.ndarray]]:
    def load(split):
        cfg = data_lib.ImageDataConfig(
            name="sklearn_digits/8",
            data_dir=dirs["data_dir"],
            split=split,
            image_size=8,
            num_channels=1,
            random_flip=False,
            use_labels=True,
        )
        return data_lib.load_image_arrays(cfg)

    return {"train": load("train"), "test": load("test")}


@pytest.fixture(scope="module")
def extractor(dirs, splits) -> digits_metric.DigitsFeatureExtractor:
    del splits  # Builds the data set first.
    return digits_metric.get_digits_extractor(8, dirs["data_dir"], dirs["cache_dir"])


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    fd = digits_metric.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]])
    assert fd == pytest.approx(9.0 + 1.0, rel=1e-12)
    # Diagonal (commuting) covariances: sum of (sqrt a_i - sqrt b_i)^2.
    a, b = np.array([1.0, 2.0, 5.0]), np.array([3.0, 0.5, 5.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    fd = digits_metric.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert fd == pytest.approx(
        np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12
    )
    # Non-commuting 2x2: for M with positive eigenvalues, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.3], [0.3, 1.0]])
    s2 = np.array([[1.0, -0.6], [-0.6, 3.0]])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    want = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert digits_metric.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(
        want, rel=1e-12
    )


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for dim in (5, 32):
        s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
        assert digits_metric.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            want, rel=1e-9, abs=1e-9
        )
    with pytest.raises(ValueError, match="covariances"):
        digits_metric.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


def test_gaussian_stats_float64():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    mu, sigma = digits_metric.gaussian_stats(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, (x64 - x64.mean(0)).T @ (x64 - x64.mean(0)) / 49, rtol=1e-10)
    with pytest.raises(ValueError, match="N >= 2"):
        digits_metric.gaussian_stats(x[:1])


def test_classifier_accuracy(extractor, splits):
    logits, features = extractor.logits_and_features(splits["test"]["image"])
    accuracy = np.mean(logits.argmax(axis=-1) == splits["test"]["label"])
    assert accuracy > 0.9
    assert features.shape == (297, digits_metric.FEATURE_DIM)


def test_fd_identical_small_and_large(extractor, dirs, splits):
    kwargs = dict(data_dir=dirs["data_dir"], cache_dir=dirs["cache_dir"])
    assert abs(digits_metric.digits_fd(splits["test"]["image"], **kwargs)) < 1e-6
    fd_train = digits_metric.digits_fd(splits["train"]["image"][:297], **kwargs)
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, size=(297, 8, 8, 1)).astype(np.float32)
    fd_noise = digits_metric.digits_fd(noise, **kwargs)
    assert 0 < fd_train < 0.1 * fd_noise
    # The reference statistics are those of the test features, computed independently here.
    mu, sigma = digits_metric.gaussian_stats(extractor.features(splits["test"]["image"]))
    mu_n, sigma_n = digits_metric.gaussian_stats(extractor.features(noise))
    covmean = scipy.linalg.sqrtm(sigma @ sigma_n).real
    want = np.sum((mu - mu_n) ** 2) + np.trace(sigma + sigma_n - 2 * covmean)
    assert fd_noise == pytest.approx(want, rel=1e-6)


def test_cache_is_reused_with_identical_features(extractor, dirs, splits, monkeypatch):
    path = digits_metric.DigitsFeatureExtractor.cache_path(dirs["cache_dir"], 8)
    assert os.path.exists(path)
    with np.load(path, allow_pickle=False) as f:  # Loadable without pickle.
        assert set(f.files) >= {"Dense_0/kernel", "Dense_2/bias"}

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache exists")

    monkeypatch.setattr(digits_metric, "_train_classifier", no_training)
    reloaded = digits_metric.DigitsFeatureExtractor.load_or_train(
        8, data_dir=dirs["data_dir"], cache_dir=dirs["cache_dir"]
    )
    images = splits["test"]["image"][:600]
    np.testing.assert_array_equal(reloaded.features(images), extractor.features(images))


def test_classifier_stats(extractor, dirs, splits):
    kwargs = dict(data_dir=dirs["data_dir"], cache_dir=dirs["cache_dir"])
    test = splits["test"]
    stats = digits_metric.digits_classifier_stats(test["image"], test["label"], **kwargs)
    logits, _ = extractor.logits_and_features(test["image"])
    predicted = logits.argmax(axis=-1)
    hist = np.bincount(predicted, minlength=10) / len(predicted)
    np.testing.assert_allclose(stats["class_histogram"], hist)
    assert stats["class_entropy"] == pytest.approx(-np.sum(hist[hist > 0] * np.log(hist[hist > 0])))
    assert stats["normalized_class_entropy"] > 0.95
    assert stats["label_accuracy"] == pytest.approx(np.mean(predicted == test["label"]))
    assert stats["confident_fraction"] > 0.8
    assert stats["confident_accuracy"] <= stats["label_accuracy"]
    assert (
        digits_metric.digits_confident_accuracy(test["image"], test["label"], **kwargs)
        == stats["confident_accuracy"]
    )

    # Mode collapse: only zeros -> one class, entropy 0.
    zeros = splits["train"]["image"][splits["train"]["label"] == 0]
    collapsed = digits_metric.digits_classifier_stats(zeros, **kwargs)
    assert collapsed["class_entropy"] < 0.3 and collapsed["class_histogram"][0] > 0.9
    assert "label_accuracy" not in collapsed
    # Noise is rarely classified confidently.
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, size=(200, 8, 8, 1)).astype(np.float32)
    assert digits_metric.digits_confident_accuracy(noise, **kwargs) < 0.5


def test_bad_samples_raise(extractor, dirs):
    kwargs = dict(data_dir=dirs["data_dir"], cache_dir=dirs["cache_dir"])
    with pytest.raises(ValueError, match="channels"):
        digits_metric.digits_fd(np.zeros((4, 8, 8, 3), np.float32), **kwargs)
    with pytest.raises(ValueError, match="S in"):
        digits_metric.digits_fd(np.zeros((4, 12, 12, 1), np.float32), **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        digits_metric.digits_fd(np.full((4, 8, 8, 1), np.nan, np.float32), **kwargs)
    with pytest.raises(ValueError, match="labels"):
        digits_metric.digits_classifier_stats(
            np.zeros((4, 8, 8, 1), np.float32), np.zeros(3, np.int32), **kwargs
        )
