"""A 2-D Gaussian-mixture toy problem with an exact answer.

Data: K isotropic Gaussians N(μ_k, s²I) with weights π_k (by default 8 on a ring of radius 0.7 with
s = 0.05, so each coordinate has standard deviation ≈ 0.5 = σ_data). Under the KVE process
x_t = x_0 + t·z the noised density is again a mixture, p_t = Σ π_k N(μ_k, (s² + t²)I), so

  - the exact score is ∇ log p_t(x) = Σ_k r_k(x, t)·(μ_k − x)/(s² + t²), r_k the responsibilities;
  - the exact denoiser is D(x, t) = E[x_0 | x_t = x] = Σ_k r_k(x, t)·(s²·x + t²·μ_k)/(s² + t²);
  - the exact PF-ODE map x_T → x_ε solves dx/dt = (x − D(x, t))/t (EDM Eq. 3), here integrated in
    u = ln t (dx/du = x − D) with SciPy's 8th-order Dormand–Prince at rtol = atol = 1e-10, float64.

``exact_denoiser`` is a jittable teacher for consistency distillation whose "parameters" are the
mixture itself (a pytree), so it slots into ``TrainState.teacher_params`` like a network's weights.

``ToyIterator`` is the toy's data iterator (``config.data.name`` in ``TOY_DATASETS``): exact mixture
samples, a pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The names of ``config.data.name`` served by this module instead of TFDS.
TOY_DATASETS = ("toy_ring",)


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """An isotropic Gaussian mixture in D dimensions (NumPy float64 arrays)."""

    means: np.ndarray  # (K, D)
    std: float
    weights: np.ndarray  # (K,), sums to 1

    def __post_init__(self):
        means = np.asarray(self.means, np.float64)
        weights = np.asarray(self.weights, np.float64)
        if means.ndim != 2 or weights.shape != means.shape[:1]:
            raise ValueError(
                f"means must be (K, D) and weights (K,), got {means.shape}, {weights.shape}."
            )
        if self.std <= 0 or np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
            raise ValueError("Need std > 0 and non-negative weights summing to 1.")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "weights", weights)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n exact samples, float64 (n, D)."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[k] + self.std * rng.standard_normal((n, self.dim))

    def as_params(self) -> dict[str, Array]:
        """The mixture as a float32 pytree for ``exact_denoiser`` / ``exact_score``."""
        return {
            "means": jnp.asarray(self.means, jnp.float32),
            "log_weights": jnp.asarray(np.log(np.maximum(self.weights, 1e-300)), jnp.float32),
            "var": jnp.asarray(self.std**2, jnp.float32),
        }


def ring_mixture(num_modes: int = 8, radius: float = 0.7, std: float = 0.05) -> GaussianMixture:
    """``num_modes`` equal Gaussians evenly spaced on a circle."""
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(means=means, std=std, weights=np.full(num_modes, 1.0 / num_modes))


# ----------------------------------------------------------------------------------------------------
# Exact score and denoiser (JAX, jittable; float32 under default JAX settings)


def _responsibilities(p: dict, x: Array, t: Array):
    var_t = p["var"] + t[:, None] ** 2  # (B, 1)
    sq = jnp.sum((x[:, None, :] - p["means"][None]) ** 2, axis=-1)  # (B, K)
    logits = p["log_weights"][None] - 0.5 * sq / var_t
    return jax.nn.softmax(logits, axis=-1), var_t


def exact_denoiser(params: dict, x: Array, t: Array, labels: Array | None = None) -> Array:
    """D(x, t) = E[x_0 | x_t = x] of the mixture; x (B, D), t (B,). Signature of a CD teacher."""
    del labels
    r, var_t = _responsibilities(params, x, t)
    post_mean = (
        params["var"] * x[:, None, :] + (t[:, None, None] ** 2) * params["means"][None]
    ) / var_t[..., None]
    return jnp.sum(r[..., None] * post_mean, axis=1)


def exact_score(params: dict, x: Array, t: Array) -> Array:
    """∇_x log p_t(x) of the noised mixture."""
    r, var_t = _responsibilities(params, x, t)
    return jnp.sum(r[..., None] * (params["means"][None] - x[:, None, :]), axis=1) / var_t


# ----------------------------------------------------------------------------------------------------
# Exact PF-ODE map (NumPy float64)


def exact_denoiser_np(gm: GaussianMixture, x: np.ndarray, t: float) -> np.ndarray:
    """``exact_denoiser`` in NumPy float64 for one time t: (N, D) -> (N, D) (the ODE's truth)."""
    var_t = gm.std**2 + t * t
    sq = np.sum((x[:, None, :] - gm.means[None]) ** 2, axis=-1)
    logits = np.log(np.maximum(gm.weights, 1e-300))[None] - 0.5 * sq / var_t
    logits -= logits.max(axis=1, keepdims=True)
    r = np.exp(logits)
    r /= r.sum(axis=1, keepdims=True)
    post = (gm.std**2 * x[:, None, :] + t * t * gm.means[None]) / var_t
    return np.sum(r[..., None] * post, axis=1)


def ode_map(
    gm: GaussianMixture,
    x_start: np.ndarray,
    t_start: float,
    t_end: float,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> np.ndarray:
    """Solves the exact PF-ODE dx/dt = (x − D(x, t))/t from t_start to t_end (float64).

    Integrated in u = ln t, where dx/du = x − D(x, e^u) is smooth, with SciPy's DOP853.
    """
    from scipy.integrate import solve_ivp  # local import: SciPy is only needed for the toy's truth.

    x_start = np.asarray(x_start, np.float64)
    shape = x_start.shape

    def rhs(u, y):
        x = y.reshape(shape)
        return (x - exact_denoiser_np(gm, x, math.exp(u))).ravel()

    sol = solve_ivp(
        rhs,
        (math.log(t_start), math.log(t_end)),
        x_start.ravel(),
        method="DOP853",
        rtol=rtol,
        atol=atol,
    )
    if not sol.success:
        raise RuntimeError(f"The exact ODE solve failed: {sol.message}")
    return sol.y[:, -1].reshape(shape)


class ToyIterator:
    """Yields {"image": float32 (B, 2)} batches of the ring mixture.

    The batch of step k depends only on (seed, k, process_index), so a resumed run sees exactly the
    batches an uninterrupted run would have seen; ``get_state``/``set_state`` carry the position.
    """

    def __init__(
        self,
        mixture: GaussianMixture,
        batch_size: int,
        seed: int,
        *,
        process_index: int = 0,
        start_step: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.mixture = mixture
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.step = start_step

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step, self.process_index])
        return {"image": self.mixture.sample(rng, self.batch_size).astype(np.float32)}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.batch(self.step)
        self.step += 1
        return b

    def get_state(self) -> dict:
        return {"step": int(self.step)}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
