"""Distances between two samples of points, in NumPy float64 (evaluation code, not jitted)."""

from __future__ import annotations

import numpy as np


def _pairwise_mean_dist(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> float:
    total = 0.0
    for s in range(0, len(a), chunk):
        d = a[s : s + chunk, None, :] - b[None, :, :]
        total += np.sqrt(np.sum(d * d, axis=-1)).sum()
    return total / (len(a) * len(b))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """The (V-statistic) energy distance 2·E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ (Székely & Rizzo).

    The V-statistic includes the zero diagonal terms, so two independent samples of one law give a
    small positive "noise floor" of order 1/n rather than a value that can be negative.
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    return 2 * _pairwise_mean_dist(x, y) - _pairwise_mean_dist(x, x) - _pairwise_mean_dist(y, y)


def sliced_wasserstein2(
    x: np.ndarray, y: np.ndarray, num_projections: int = 256, seed: int = 0
) -> float:
    """Sliced Wasserstein-2 distance √(E_θ W2²(θᵀX, θᵀY)) over directions θ on the unit sphere.

    In 2-D the directions are evenly spaced angles in [0, π); otherwise seeded Gaussian directions.
    x and y must have the same number of points (1-D W2 is then a matching of sorted projections).
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if x.shape != y.shape:
        raise ValueError(
            f"sliced_wasserstein2 needs equal-size samples, got {x.shape} and {y.shape}."
        )
    if x.shape[1] == 2:
        ang = np.pi * np.arange(num_projections) / num_projections
        dirs = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    else:
        dirs = np.random.default_rng(seed).standard_normal((num_projections, x.shape[1]))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    px = np.sort(x @ dirs.T, axis=0)
    py = np.sort(y @ dirs.T, axis=0)
    return float(np.sqrt(np.mean((px - py) ** 2)))
