"""Paper-comparable evaluation: FID, IS, KID and precision/recall on the FID Inception-v3.

``InceptionMetrics(weights_path)`` binds the network (``metrics.inception_v3``) to the formulas
(``metrics.fid``): ``features(images_uint8)`` gives pool features and logits, ``statistics(...)``
their streaming float64 mean and covariance, ``score(...)`` the figures against reference
statistics. ``reference_statistics(name)`` computes (and caches as ``.npz``) the statistics of a
whole TFDS split; ``read_reference(path)`` reads the official reference files (``.npz`` with images
under ``arr_0``, or with ``mu``/``sigma``). ``python -m consistency_jax.evaluate`` is the command.

Numbers are comparable with the papers only with the real weights (``pt_inception-2015-12-05``),
50 000 samples, and the statistics of the full training set (CIFAR-10: its 50 000 train images).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from consistency_jax.metrics import fid as fid_lib
from consistency_jax.metrics import inception_v3 as inception_lib

__all__ = [
    "InceptionMetrics",
    "METRICS",
    "read_reference",
    "reference_statistics",
    "reference_cache_path",
]

METRICS = ("fid", "is", "kid", "pr")


class InceptionMetrics:
    """The FID Inception-v3 and the metrics on its features.

    Args:
        weights_path: the ``.safetensors`` weights (None: ``$INCEPTION_WEIGHTS``); or already loaded
            variables.
        batch_size: images per compiled batch (split over the local devices).
        mesh: optional 1-D device mesh (default: all local devices).
    """

    def __init__(self, weights_path: Any = None, *, batch_size: int = 200, mesh=None):
        self.extractor = inception_lib.InceptionFeatureExtractor(
            weights_path, batch_size=batch_size, mesh=mesh
        )

    def features(self, images: np.ndarray | Iterable[np.ndarray]) -> inception_lib.InceptionOutput:
        """Pool features (N, 2048) and bias-free logits (N, 1008) of uint8 images, float32 NumPy."""
        return self.extractor(images)

    def statistics(
        self, images: np.ndarray | Iterable[np.ndarray], *, keep: bool = False
    ) -> tuple[fid_lib.GaussianStats, inception_lib.InceptionOutput | None]:
        """Streaming float64 statistics of the pool features of many images (all hosts merged).

        Args:
            images: a uint8 array or an iterable of uint8 batches (this host's share).
            keep: also return every feature and logit (for IS, KID, precision/recall).

        Returns:
            ``(stats, outputs)``; ``outputs`` is None unless ``keep``.
        """
        return self.accumulate(self.extractor.iter_outputs(images), keep=keep)

    @staticmethod
    def accumulate(
        pairs: Iterable[tuple[np.ndarray, np.ndarray]], *, keep: bool = False
    ) -> tuple[fid_lib.GaussianStats, inception_lib.InceptionOutput | None]:
        """``statistics`` of outputs already computed: ``(pool, logits)`` pairs, e.g. read back
        from a cache of finished shards (``python -m consistency_jax.evaluate --samples=run:DIR``).
        """
        stats = fid_lib.GaussianStats()
        pools, logits = [], []
        for pool, logit in pairs:
            stats.update(pool)
            if keep:
                pools.append(pool)
                logits.append(logit)
        if stats.count == 0:
            raise ValueError("No images were given.")
        outputs = None
        if keep:
            outputs = inception_lib.InceptionOutput(
                pool=np.concatenate(pools), logits=np.concatenate(logits)
            )
        return stats.allgather(), outputs

    @staticmethod
    def score(
        samples: Any,
        ref_stats: tuple[np.ndarray, np.ndarray],
        *,
        ref_features: np.ndarray | None = None,
        metrics: Iterable[str] = ("fid",),
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ) -> dict[str, float]:
        """The figures of samples against a reference.

        Args:
            samples: an ``InceptionOutput`` (pool features and logits), a ``GaussianStats``, or a
                (mu, sigma) pair. IS, KID and precision/recall need an ``InceptionOutput``.
            ref_stats: (mu, sigma) of the reference features.
            ref_features: reference pool features (N, 2048), needed by KID and precision/recall.
            metrics: any of "fid", "is", "kid", "pr".
            kid_subsets, kid_subset_size: see ``metrics.fid.kernel_inception_distance``.

        Returns:
            {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"}: those asked for.
        """
        metrics = tuple(metrics)
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"Unknown metrics {unknown}; known: {list(METRICS)}.")
        outputs = samples if isinstance(samples, inception_lib.InceptionOutput) else None
        if outputs is None and set(metrics) - {"fid"}:
            raise ValueError(
                f"Metrics {sorted(set(metrics) - {'fid'})} need the sample features, not only statistics."
            )
        if ref_features is None and set(metrics) & {"kid", "pr"}:
            raise ValueError(
                "KID and precision/recall need the reference features (a TFDS data set or an "
                "official reference batch with images), not only mu/sigma."
            )
        out: dict[str, float] = {}
        if "fid" in metrics:
            if isinstance(samples, fid_lib.GaussianStats):
                mu, sigma = samples.mu, samples.sigma
            elif outputs is not None:
                mu, sigma = fid_lib.gaussian_stats(outputs.pool)
            else:
                mu, sigma = samples
            out["fid"] = fid_lib.frechet_distance(mu, sigma, *ref_stats)
        if "is" in metrics:
            out["is_mean"], out["is_std"] = fid_lib.inception_score(
                outputs.logits, splits=min(10, len(outputs.logits))
            )
        if "kid" in metrics:
            out["kid_mean"], out["kid_std"] = fid_lib.kernel_inception_distance(
                outputs.pool, ref_features, num_subsets=kid_subsets, subset_size=kid_subset_size
            )
        if "pr" in metrics:
            out["precision"], out["recall"] = fid_lib.precision_recall(outputs.pool, ref_features)
        return out


def reference_cache_path(
    cache_dir: str, dataset_name: str, split: str, features: bool = False
) -> str:
    """``{cache_dir}/inception_{name}_{split}.npz`` with '/' and other odd characters as '_'."""
    tag = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{dataset_name}_{split}")
    return os.path.join(cache_dir, f"inception_{tag}{'_features' if features else ''}.npz")


def reference_statistics(
    dataset_name: str,
    split: str = "train",
    data_dir: str | None = None,
    *,
    metrics: InceptionMetrics | None = None,
    weights_path: Any = None,
    cache_dir: str | None = None,
    keep_features: bool = False,
    batch_size: int = 500,
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """Inception statistics of a whole TFDS split (papers: the train split, all of it).

    Each host reads its block of the split (``data.iterate_stored_images``), extracts features on
    its devices, and the float64 statistics of all hosts are merged. The result is cached in
    ``cache_dir`` (default ``$data_dir/inception_stats`` or ``~/.cache/consistency_jax``) as an
    ``.npz`` of ``mu``, ``sigma``, ``num_examples``; a cached file is read, not recomputed. With
    ``keep_features`` the pool features are kept and cached too (``…_features.npz``; single host),
    for KID and precision/recall. The cache does not record which weights made it: use one cache
    directory per weight file (the evaluate command names it after the file).

    Args:
        dataset_name: TFDS name with config; must be prepared (the digits are built on demand).
        split: TFDS split.
        data_dir: TFDS data directory.
        metrics: an ``InceptionMetrics`` (else one is made from ``weights_path``).
        weights_path: see ``InceptionMetrics``.
        cache_dir: where the ``.npz`` lives.
        keep_features: also return the pool features.
        batch_size: examples read per batch.

    Returns:
        ``(mu, sigma, num_examples, features or None)``.
    """
    import jax

    from consistency_jax import data as data_lib

    if cache_dir is None:
        cache_dir = (
            os.path.join(data_dir, "inception_stats")
            if data_dir
            else os.path.expanduser("~/.cache/consistency_jax/inception_stats")
        )
    stats_path = reference_cache_path(cache_dir, dataset_name, split)
    features_path = reference_cache_path(cache_dir, dataset_name, split, features=True)
    if os.path.isfile(stats_path) and (not keep_features or os.path.isfile(features_path)):
        mu, sigma, count = fid_lib.load_statistics(stats_path)
        features = None
        if keep_features:
            with np.load(features_path, allow_pickle=False) as f:
                features = f["pool"]
        return mu, sigma, count, features
    if keep_features and jax.process_count() > 1:
        raise ValueError(
            "keep_features reads every feature into one process; use it on a single host."
        )
    metrics = metrics or InceptionMetrics(weights_path)
    batches = (
        b["image"]
        for b in data_lib.iterate_stored_images(
            dataset_name,
            split,
            data_dir,
            batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )
    stats, outputs = metrics.statistics(batches, keep=keep_features)
    if jax.process_index() == 0:
        fid_lib.save_statistics(stats_path, stats.mu, stats.sigma, stats.count)
        if keep_features:
            np.savez(features_path, pool=outputs.pool)
    return stats.mu, stats.sigma, stats.count, outputs.pool if keep_features else None


def check_uint8_images(array: np.ndarray, origin: str) -> np.ndarray:
    """``array`` if it holds uint8 NHWC images (1 or 3 channels, N > 0); else a ValueError naming
    ``origin``."""
    if (
        array.dtype != np.uint8
        or array.ndim != 4
        or array.shape[-1] not in (1, 3)
        or array.shape[0] == 0
    ):
        raise ValueError(
            f"{origin} must hold uint8 images (N, H, W, 3) or (N, H, W, 1), N > 0; got "
            f"{array.dtype} {array.shape}."
        )
    return array


def read_npz_images(path: str) -> np.ndarray:
    """uint8 NHWC images under ``arr_0`` of an ``.npz`` (the layout of the official sample and
    reference-batch files; labels, if any, are under ``arr_1``). Read with ``allow_pickle=False``."""
    if not os.path.isfile(path):
        raise ValueError(f"File {path!r} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path!r} has no images under 'arr_0' (it has {sorted(data)}).")
            images = data["arr_0"]
    except (OSError, EOFError) as err:
        raise ValueError(f"{path!r} is not a readable .npz: {err}") from err
    return check_uint8_images(images, f"'arr_0' of {path!r}")


def read_reference(
    path: str, metrics: InceptionMetrics | None = None, *, keep_features: bool = False
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """Reference statistics from an ``.npz``: ``mu``/``sigma`` (ours, or the official statistics
    files), or images under ``arr_0`` (the official reference batches), whose features are
    computed here (also when the file has both and ``keep_features`` asks for the features).

    Returns:
        ``(mu, sigma, num_examples (-1 if unknown), pool features or None)``.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Reference file {path!r} does not exist.")
    with np.load(path, allow_pickle=False) as data:
        keys = set(data)
    if {"mu", "sigma"} <= keys and not (keep_features and "arr_0" in keys):
        mu, sigma, count = fid_lib.load_statistics(path)
        return mu, sigma, count, None
    if "arr_0" not in keys:
        raise ValueError(
            f"Reference file {path!r} holds neither 'mu'/'sigma' nor images under 'arr_0' "
            f"(it has {sorted(keys)})."
        )
    images = read_npz_images(path)
    if metrics is None:
        raise ValueError("Reading a reference batch of images needs the Inception weights.")
    stats, outputs = metrics.statistics(_batches(images, 500), keep=keep_features)
    return stats.mu, stats.sigma, stats.count, outputs.pool if keep_features else None


def _batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, images.shape[0], size):
        yield images[start : start + size]
