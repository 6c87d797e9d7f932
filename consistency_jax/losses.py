"""The discrete-time consistency loss and its parts: distances, weightings, the choice of n (CM Eq. 7–10).

    L(θ, θ⁻) = E[ λ(t_n) · d( f_θ(x + t_{n+1}·z, t_{n+1}), sg f_{θ⁻}(x̂_{t_n}, t_n) ) ]

with x̂_{t_n} one teacher ODE step from t_{n+1} (CD, CM Algorithm 2) or x + t_n·z (CT, CM Algorithm 3);
the methods that use it are ``methods.cd`` and ``methods.ct``. Indices are 0-based on the ascending
grid of ``schedules.karras_time``: the pair is (t_i, t_{i+1}), i ∈ {0, …, N−2}.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from consistency_jax import parameterization as param_lib
from consistency_jax import schedules, solvers

Array = jax.Array
Distance = Callable[[Array, Array], Array]

DISTANCES = ("l2", "l1", "pseudo_huber", "lpips")
WEIGHTINGS = ("uniform", "ict", "snr", "snr+1", "truncated_snr")
INDEX_SAMPLINGS = ("uniform", "lognormal")


# ----------------------------------------------------------------------------------------------------
# Distances d(a, b) -> (B,)


def _flat(x: Array) -> Array:
    """(B, ...) -> (B, D) in float32, or float64 for float64 inputs."""
    return param_lib.as_compute_dtype(x.reshape(x.shape[0], -1))


def l2_distance(a: Array, b: Array) -> Array:
    """Mean over dimensions of (a − b)² (jcm's l2)."""
    return jnp.mean((_flat(a) - _flat(b)) ** 2, axis=-1)


def l1_distance(a: Array, b: Array) -> Array:
    """Mean over dimensions of |a − b|."""
    return jnp.mean(jnp.abs(_flat(a) - _flat(b)), axis=-1)


def default_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054·√dim (iCT §3.3)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber_distance(a: Array, b: Array, c: float) -> Array:
    """√(‖a − b‖² + c²) − c (iCT Eq. 8).

    c = 0 gives the l2 norm ‖a − b‖ (ECT's CIFAR-10 setting), with a zero gradient where a = b
    (instead of the NaN of √ at 0).
    """
    sq = jnp.sum((_flat(a) - _flat(b)) ** 2, axis=-1)
    if c == 0:
        positive = sq > 0
        return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return jnp.sqrt(sq + c * c) - c


def make_distance(
    name: str,
    data_shape: tuple[int, ...],
    *,
    huber_c: float | None = None,
    lpips_fn: Distance | None = None,
) -> Distance:
    """Builds d(a, b) -> (B,).

    Args:
      name: one of l2, l1, pseudo_huber, lpips.
      data_shape: shape of one example (without batch), for the default pseudo-Huber c.
      huber_c: pseudo-Huber c; default 0.00054·√dim.
      lpips_fn: for "lpips", a callable d(a, b) -> (B,) on images in [−1, 1]
        (``consistency_jax.metrics.lpips.make_lpips_distance``).
    """
    if name == "l2":
        return l2_distance
    if name == "l1":
        return l1_distance
    if name == "pseudo_huber":
        c = default_huber_c(math.prod(data_shape)) if huber_c is None else float(huber_c)
        if c <= 0:
            raise ValueError(f"The pseudo-Huber constant c must be positive, got {c}.")
        return lambda a, b: pseudo_huber_distance(a, b, c)
    if name == "lpips":
        if lpips_fn is None:
            raise ValueError(
                "distance='lpips' needs LPIPS weights: set config.loss.lpips_weights to a "
                ".safetensors file (see tools/convert_lpips_weights.py)."
            )
        return lpips_fn
    raise ValueError(f"Unknown distance {name!r}; choose one of {DISTANCES}.")


# ----------------------------------------------------------------------------------------------------
# Weightings λ(t_n, t_{n+1}) and the choice of n


def weighting(name: str, t_lo: Array, t_hi: Array) -> Array:
    """λ for the pair (t_n, t_{n+1}) = (t_lo, t_hi) (CM Eq. 7; iCT §3.2).

    uniform: 1 (CM); ict: 1/(t_{n+1} − t_n) (iCT §3.2); snr: 1/t_n²; snr+1: 1/t_n² + 1;
    truncated_snr: max(1/t_n², 1) (jcm's extra options, evaluated at the target time t_n).
    """
    if name == "uniform":
        return jnp.ones_like(t_hi)
    if name == "ict":
        return 1.0 / (t_hi - t_lo)
    snr = 1.0 / t_lo**2
    if name == "snr":
        return snr
    if name == "snr+1":
        return snr + 1.0
    if name == "truncated_snr":
        return jnp.maximum(snr, 1.0)
    raise ValueError(f"Unknown weighting {name!r}; choose one of {WEIGHTINGS}.")


def lognormal_index_logits(
    num_scales: Array,
    max_scales: int,
    sigmas: param_lib.SigmaConfig,
    p_mean: float = -1.1,
    p_std: float = 2.0,
) -> Array:
    """Log-probabilities of iCT's discrete lognormal choice of n (iCT §3.5).

    p(i) ∝ erf((ln t_{i+1} − P_m)/(√2 P_s)) − erf((ln t_i − P_m)/(√2 P_s)) for i ∈ {0, …, N−2};
    computed over a static length ``max_scales − 1`` with indices ≥ N − 1 masked out.
    """
    i = jnp.arange(max_scales - 1)
    t_lo = schedules.karras_time(i, num_scales, sigmas)
    t_hi = schedules.karras_time(i + 1, num_scales, sigmas)
    cdf = lambda t: jax.scipy.special.erf((jnp.log(t) - p_mean) / (math.sqrt(2.0) * p_std))
    p = cdf(t_hi) - cdf(t_lo)
    valid = i < num_scales - 1
    return jnp.where(valid & (p > 0), jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)


def sample_index(
    rng: Array,
    batch: int,
    num_scales: Array,
    max_scales: int,
    kind: str,
    sigmas: param_lib.SigmaConfig,
    p_mean: float = -1.1,
    p_std: float = 2.0,
) -> Array:
    """Draws the lower grid index i ∈ {0, …, N−2} of each example's pair (t_i, t_{i+1})."""
    if kind == "uniform":
        return jax.random.randint(rng, (batch,), 0, num_scales - 1)
    if kind == "lognormal":
        logits = lognormal_index_logits(num_scales, max_scales, sigmas, p_mean, p_std)
        return jax.random.categorical(rng, logits, shape=(batch,))
    raise ValueError(f"Unknown index sampling {kind!r}; choose one of {INDEX_SAMPLINGS}.")


# ----------------------------------------------------------------------------------------------------
# The loss


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The choices of the discrete-time consistency loss (``config.loss``).

    Attributes:
      distance: l2, l1, pseudo_huber or lpips.
      weighting: λ, see ``weighting``.
      index_sampling: "uniform" (CM) or "lognormal" (iCT §3.5) choice of n.
      solver: the teacher's ODE step for CD: "euler" or "heun" (CM Algorithm 2).
      huber_c: pseudo-Huber c (None: 0.00054·√dim, iCT §3.3).
      p_mean, p_std: iCT's lognormal index sampling parameters (P_mean = −1.1, P_std = 2.0).
    """

    distance: str = "l2"
    weighting: str = "uniform"
    index_sampling: str = "uniform"
    solver: str = "heun"
    huber_c: float | None = None
    p_mean: float = -1.1
    p_std: float = 2.0

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise ValueError(f"Unknown distance {self.distance!r}; choose one of {DISTANCES}.")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown weighting {self.weighting!r}; choose one of {WEIGHTINGS}.")
        if self.index_sampling not in INDEX_SAMPLINGS:
            raise ValueError(
                f"Unknown index sampling {self.index_sampling!r}; choose one of {INDEX_SAMPLINGS}."
            )
        solvers.get_solver(self.solver)
        if not self.p_std > 0:
            raise ValueError(f"The lognormal p_std must be positive, got {self.p_std}.")
        if self.huber_c is not None and not self.huber_c > 0:
            raise ValueError(
                f"The pseudo-Huber constant huber_c must be positive, got {self.huber_c}."
            )


# x_hat(x0, x_hi, z, t_hi, t_lo, labels) -> the point x̂_{t_n} at which the target is evaluated
TargetPoint = Callable[[Array, Array, Array, Array, Array, Array | None], Array]


def consistency_loss(
    apply_fn: param_lib.ApplyFn,
    sigmas: param_lib.SigmaConfig,
    cfg: LossConfig,
    max_scales: int,
    params: Any,
    target_params: Any,
    batch: dict,
    rng: Array,
    num_scales: Array,
    distance: Distance,
    target_point: TargetPoint,
) -> tuple[Array, dict[str, Array]]:
    """The consistency loss of one batch (CM Eq. 7–10, Algorithms 2–3).

    Args:
      apply_fn: the raw network.
      sigmas: the noise configuration.
      cfg: the loss choices.
      max_scales: the largest N of the curriculum (a static bound for index sampling).
      params: θ (differentiated).
      target_params: θ⁻ (put under stop_gradient here).
      batch: "image" (B, ...) and optionally "label" (B,).
      rng: the key of this batch.
      num_scales: N(k) of the step.
      distance: d(a, b) -> (B,).
      target_point: x̂_{t_n} from (x0, x_{t_{n+1}}, z, t_{n+1}, t_n, labels) (CT: x0 + t_n·z; CD: one
        teacher ODE step), per example times of shape (B,).

    Returns:
      (loss, aux) with aux "mean_t" (mean t_{n+1}) and "distance" (mean unweighted distance).
    """
    x0 = param_lib.as_compute_dtype(batch["image"])
    labels = batch.get("label")
    b = x0.shape[0]
    rng_n, rng_z, rng_drop = jax.random.split(rng, 3)
    i = sample_index(
        rng_n, b, num_scales, max_scales, cfg.index_sampling, sigmas, cfg.p_mean, cfg.p_std
    )
    t_lo = schedules.karras_time(i, num_scales, sigmas)
    t_hi = schedules.karras_time(i + 1, num_scales, sigmas)
    z = jax.random.normal(rng_z, x0.shape, x0.dtype)
    x_hi = x0 + t_hi.reshape((b,) + (1,) * (x0.ndim - 1)) * z
    x_lo = jax.lax.stop_gradient(target_point(x0, x_hi, z, t_hi, t_lo, labels))
    # jcm evaluates online and target networks with one shared dropout key.
    kw = dict(labels=labels, train=True, rng=rng_drop)
    online = param_lib.consistency_fn(apply_fn, params, x_hi, t_hi, sigmas, **kw)
    target = param_lib.consistency_fn(
        apply_fn, jax.lax.stop_gradient(target_params), x_lo, t_lo, sigmas, **kw
    )
    target = jax.lax.stop_gradient(target)
    per_example = weighting(cfg.weighting, t_lo, t_hi) * distance(online, target)
    loss = jnp.mean(per_example)
    aux = {"mean_t": jnp.mean(t_hi), "distance": jnp.mean(distance(online, target))}
    return loss, aux
