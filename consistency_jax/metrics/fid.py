"""FID, KID, Inception Score and precision/recall from network features, in float64.

The four figures the consistency-model papers report, as their definitions state them:

* **FID** (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium", Eq. 6): the Fréchet distance between Gaussians fitted to two feature sets,
  ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}); ``frechet_distance``.
* **KID** (Bińkowski et al. 2018, "Demystifying MMD GANs", §4): the unbiased estimate of the squared
  MMD with the cubic polynomial kernel k(a, b) = (aᵀb / d + 1)³, averaged over random subsets;
  ``kernel_inception_distance``.
* **IS** (Salimans et al. 2016, "Improved Techniques for Training GANs", §4):
  exp(E_x KL(p(y|x) ‖ p(y))), mean and standard deviation over 10 splits;
  ``inception_score``.
* **Precision and recall** (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", Eq. 1–2): the fraction of generated samples inside the k-NN balls
  (k = 3) of the real features, and of real samples inside those of the generated ones;
  ``precision_recall``.

Feature statistics (mean and covariance) are accumulated in float64 over batches with
``GaussianStats`` (Chan et al.'s pairwise update, exact to rounding whatever the batching), stored
as ``.npz`` (``mu``, ``sigma``, ``num_examples``; read with ``allow_pickle=False``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GaussianStats",
    "frechet_distance",
    "gaussian_stats",
    "inception_score",
    "kernel_inception_distance",
    "load_statistics",
    "precision_recall",
    "save_statistics",
]


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64.

    Args:
      features: (N, D) with N >= 2.

    Returns:
      ``(mu, sigma)``.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"Need (N, D) features with N >= 2, got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2): the FID's formula
    (Heusel et al. 2017, Eq. 6) on Inception pool features.

    d² = ||mu1 - mu2||² + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)). S1 S2 is not symmetric, but it is
    similar to the PSD matrix S1^(1/2) S2 S1^(1/2), so Tr((S1 S2)^(1/2)) is the sum of the square
    roots of that matrix's eigenvalues: two symmetric eigendecompositions in float64, no complex
    round-off as with a general ``sqrtm`` (and no failure on the singular covariances of fewer
    samples than dimensions).

    Args:
      mu1, mu2: means (D,).
      sigma1, sigma2: symmetric positive semi-definite covariances (D, D).

    Returns:
      The squared Fréchet distance as a Python float (>= 0 up to round-off).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if (
        mu1.ndim != 1
        or mu2.shape != (dim,)
        or sigma1.shape != (dim, dim)
        or sigma2.shape != (dim, dim)
    ):
        raise ValueError(
            f"Need means (D,) and covariances (D, D) of one D; got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}."
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


@dataclasses.dataclass
class GaussianStats:
    """Streaming mean and covariance of features, in float64.

    ``update`` adds a batch; ``merge`` combines two accumulators (batches, devices or hosts) with the
    pairwise update of Chan, Golub and LeVeque (1979): for counts n_a, n_b, means m_a, m_b and
    scatter matrices M_a, M_b (Σ (x − m)(x − m)ᵀ), δ = m_b − m_a,

        n = n_a + n_b,  m = m_a + δ n_b / n,  M = M_a + M_b + δδᵀ n_a n_b / n,

    which never subtracts two large sums (unlike Σ xxᵀ − n m mᵀ). ``sigma`` = M / (n − 1), as
    ``np.cov``.
    """

    count: int = 0
    mean: np.ndarray | None = None
    scatter: np.ndarray | None = None

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Adds ``other``'s examples into this accumulator (in place) and returns it."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.scatter = (
                other.count,
                other.mean.copy(),
                other.scatter.copy(),
            )
            return self
        if other.mean.shape != self.mean.shape:
            raise ValueError(
                f"Cannot merge statistics of {other.mean.shape[0]}-d features into "
                f"{self.mean.shape[0]}-d ones."
            )
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.scatter = (
            self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
        )
        self.count = n
        return self

    def update(self, features: Any) -> GaussianStats:
        """Adds a batch of (B, D) features; returns self."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"Features must be (B, D), got shape {x.shape}.")
        if x.shape[0] == 0:
            return self
        mean = x.mean(axis=0)
        centred = x - mean
        return self.merge(GaussianStats(x.shape[0], mean, centred.T @ centred))

    @property
    def mu(self) -> np.ndarray:
        self._need(1)
        return self.mean

    @property
    def sigma(self) -> np.ndarray:
        self._need(2)
        return self.scatter / (self.count - 1)

    def _need(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"Statistics of {self.count} example(s); need at least {n}.")

    def allgather(self) -> GaussianStats:
        """The statistics of every process's examples (a no-op with one process).

        Every process must call it (a collective); each gets the same merged result.
        """
        if jax.process_count() == 1:
            return self
        from jax.experimental import multihost_utils

        self._need(1)
        counts = np.asarray(multihost_utils.process_allgather(np.asarray(self.count)))
        means = np.asarray(multihost_utils.process_allgather(self.mean))
        scatters = np.asarray(multihost_utils.process_allgather(self.scatter))
        merged = GaussianStats()
        for c, m, s in zip(counts, means, scatters):
            merged.merge(
                GaussianStats(int(c), np.asarray(m, np.float64), np.asarray(s, np.float64))
            )
        return merged


def save_statistics(path: str | os.PathLike, mu: Any, sigma: Any, num_examples: int) -> None:
    """Writes ``mu``, ``sigma`` (float64) and ``num_examples`` to an ``.npz`` atomically."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(
        tmp,
        mu=np.asarray(mu, np.float64),
        sigma=np.asarray(sigma, np.float64),
        num_examples=np.asarray(num_examples, np.int64),
    )
    os.replace(tmp, path)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    """Reads ``(mu, sigma, num_examples)`` from an ``.npz`` with ``mu`` and ``sigma`` (no pickle).

    ``num_examples`` is -1 where the file does not say (e.g. the official reference files).

    Raises:
        ValueError: a missing or unreadable file, missing keys, or inconsistent shapes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Statistics file {path!r} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(
                    f"Statistics file {path!r} has no 'mu' and 'sigma' arrays (it has {sorted(data)})."
                )
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            count = int(data["num_examples"]) if "num_examples" in data else -1
    except (OSError, EOFError) as err:
        raise ValueError(f"Statistics file {path!r} is not a readable .npz: {err}") from err
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"Statistics file {path!r}: mu {mu.shape} and sigma {sigma.shape} do not fit."
        )
    return mu, sigma, count


def _features_2d(name: str, x: Any, min_rows: int = 1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name} must be (N, D) with N >= {min_rows}, got shape {x.shape}.")
    return x


def kernel_inception_distance(
    fake: Any, real: Any, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, §4): unbiased MMD² with k(a, b) = (aᵀb / d + 1)³, over subsets.

    For each subset, m fake features X and m real features Y drawn without replacement,

        MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (m(m−1)) − 2 Σ_{i,j} k(x_i, y_j) / m²,

    the estimator of the paper's reference code (and of torch-fidelity, and of the ADM/CM TF
    evaluator). m = min(subset_size, N_fake, N_real): with fewer samples than 1000 the subsets are
    smaller, and with m equal to both counts every subset is the whole set.

    Args:
        fake, real: (N, D) features.
        num_subsets: subsets averaged (papers: 100).
        subset_size: m (papers: 1000).
        seed: of the subset draws (``np.random.default_rng``).

    Returns:
        (mean, standard deviation) of MMD² over the subsets, in float64.
    """
    fake, real = _features_2d("fake", fake, 2), _features_2d("real", real, 2)
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"Features of different widths: {fake.shape} and {real.shape}.")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(
            f"Need num_subsets >= 1 and subset_size >= 2, got {num_subsets} and {subset_size}."
        )
    m = min(subset_size, fake.shape[0], real.shape[0])
    dim = fake.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = fake[rng.choice(fake.shape[0], m, replace=False)]
        y = real[rng.choice(real.shape[0], m, replace=False)]
        k_xx = (x @ x.T / dim + 1.0) ** 3
        k_yy = (y @ y.T / dim + 1.0) ** 3
        k_xy = (x @ y.T / dim + 1.0) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[i] = within - 2.0 * k_xy.sum() / (m * m)
    return float(values.mean()), float(values.std())


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """IS (Salimans et al. 2016, §4): exp(E_x KL(p(y|x) ‖ p(y))) per split, mean and std over splits.

    p(y|x) is the softmax over *all* the given logits: for the FID Inception these are its 1008
    classes (the 1000 ImageNet classes and 8 unused ones), as the original TF code, torch-fidelity
    and the ADM/CM evaluator compute it, from the bias-free logits (``InceptionOutput.logits``).
    Split i holds rows [i N / splits, (i + 1) N / splits) in the given order (no shuffling, as the
    original code); p(y) is the split's mean of p(y|x). The std is the population std (ddof 0).

    Args:
        logits: (N, C) logits, N >= splits.
        splits: number of splits (papers: 10).

    Returns:
        (mean, std) of the per-split scores, float64.
    """
    logits = _features_2d("logits", logits, max(int(splits), 1))
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}.")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0))
        scores.append(np.exp(np.mean(np.sum(p * (part - log_marginal), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_distances(rows: jax.Array, points: jax.Array) -> jax.Array:
    hi = jax.lax.Precision.HIGHEST
    d2 = (
        jnp.sum(rows * rows, axis=1)[:, None]
        + jnp.sum(points * points, axis=1)[None, :]
        - 2.0 * jnp.dot(rows, points.T, precision=hi)
    )
    return jnp.maximum(d2, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_sq(rows: jax.Array, points: jax.Array, k: int) -> jax.Array:
    # The (k+1)-th smallest distance counts the point itself (distance 0) as the first.
    return -jax.lax.top_k(-_sq_distances(rows, points), k + 1)[0][:, k]


@jax.jit
def _inside_any(rows: jax.Array, points: jax.Array, radii_sq: jax.Array) -> jax.Array:
    return jnp.any(_sq_distances(rows, points) <= radii_sq[None, :], axis=1)


def _batched_rows(fn, rows: np.ndarray, batch_size: int, *args) -> np.ndarray:
    """fn(row batch, *args) over row batches padded to ``batch_size`` (one compilation)."""
    out = []
    for start in range(0, rows.shape[0], batch_size):
        chunk = rows[start : start + batch_size]
        n = chunk.shape[0]
        if n < batch_size and rows.shape[0] > batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, chunk.shape[1]), chunk.dtype)])
        out.append(np.asarray(fn(chunk, *args))[:n])
    return np.concatenate(out)


def precision_recall(
    fake: Any, real: Any, k: int = 3, batch_size: int = 2048
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1–2) with k-NN manifolds.

    The manifold of a feature set is the union of balls around its points, each with radius the
    distance to its k-th nearest neighbour in the set (excluding itself). Precision is the fraction
    of ``fake`` points inside the manifold of ``real``; recall the fraction of ``real`` points inside
    the manifold of ``fake`` (a point on a ball's boundary counts as inside).

    Distances are computed in float32 (``Precision.HIGHEST``) on the default device, ``batch_size``
    rows against all points at a time, as the paper's code does.

    Args:
        fake, real: (N, D) features, N > k.
        k: neighbourhood size (paper: 3).
        batch_size: rows per distance block.

    Returns:
        (precision, recall) in [0, 1].
    """
    fake = _features_2d("fake", fake, k + 1).astype(np.float32)
    real = _features_2d("real", real, k + 1).astype(np.float32)
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"Features of different widths: {fake.shape} and {real.shape}.")
    fake_dev, real_dev = jnp.asarray(fake), jnp.asarray(real)
    radii_real = jnp.asarray(
        _batched_rows(functools.partial(_kth_neighbour_sq, k=k), real, batch_size, real_dev)
    )
    radii_fake = jnp.asarray(
        _batched_rows(functools.partial(_kth_neighbour_sq, k=k), fake, batch_size, fake_dev)
    )
    precision = _batched_rows(_inside_any, fake, batch_size, real_dev, radii_real).mean()
    recall = _batched_rows(_inside_any, real, batch_size, fake_dev, radii_fake).mean()
    return float(precision), float(recall)
