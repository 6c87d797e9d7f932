"""Sample-quality metrics.

- ``sample_distances``: energy distance and sliced Wasserstein-2 between point clouds (the toy).
- ``lpips``: the LPIPS perceptual distance (a training metric for CD/CT on images).
- ``inception_v3``: the FID Inception-v3 (2015-12-05) in Flax, its weights and a sharded extractor.
- ``fid``: FID, KID, Inception Score, precision/recall and streaming feature statistics.

The names of ``inception_v3`` and ``fid`` are exported lazily: ``import consistency_jax.metrics``
does not build or import the Inception network.
"""

from __future__ import annotations

import importlib

from consistency_jax.metrics.sample_distances import energy_distance, sliced_wasserstein2

_LAZY = {
    "GaussianStats": "fid",
    "frechet_distance": "fid",
    "inception_score": "fid",
    "kernel_inception_distance": "fid",
    "load_statistics": "fid",
    "precision_recall": "fid",
    "save_statistics": "fid",
    "InceptionFeatureExtractor": "inception_v3",
    "InceptionOutput": "inception_v3",
    "InceptionV3": "inception_v3",
    "inception_outputs": "inception_v3",
    "load_inception_params": "inception_v3",
}

__all__ = ["energy_distance", "sliced_wasserstein2", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"consistency_jax.metrics.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
