"""TCM, truncated consistency models (Lee, Xu, Geffner, Fanti, Kreis, Vahdat, Nie; ICLR 2025), as the
method ``tcm``: the second training stage, from a finished consistency run.

Stage 1 is any consistency run over the whole noise range (ECT in the paper). Stage 2 trains a new
model f_s, initialised from stage 1, only on σ ≥ t′ (t′ = 1 in EDM units); below t′ the frozen
stage-1 model f_1 answers. The model used for sampling, and for the targets, is the combined one
(TCM Eq. 8)

    f(x, σ) = f_s(x, σ)  for σ ≥ t′,      f(x, σ) = f_1(x, σ)  for σ < t′.

Pairs (t, r) follow ECT (ECT Eq. 19, the sigmoid Δt shrinking by stages), with t drawn in [t′, T]
from a truncated, very heavy-tailed Student-t law of ln t (the official settings: location 0, scale
0.2, 0.01 degrees of freedom, truncated to [ln t′, ln T]); the target is sg f(x_r, r) of the
COMBINED model, so that pairs with r < t′ are anchored by the frozen f_1 and the student learns to
agree with it at the boundary. A fraction of the batch (0.25) sits exactly at t = t′: their loss is
the boundary loss, averaged separately and weighted by w_b = 0.1 (TCM §4, Eq. 9–10):

    L = mean_{t > t′} d(f_s(x_t, t), sg f(x_r, r))/(t − r) + w_b·mean_{t = t′} d(...)/(t − r).

f_1's parameters are a frozen tree (read once from the stage-1 run, like a CD teacher: never
differentiated, never written into this run's checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from consistency_jax import losses

Array = jax.Array
# f(params, x_σ, σ) -> the consistency function of a model at EDM points.
ConsistencyFn = Callable[[Any, Array, Array], Array]


def truncated_student_t_table(
    loc: float, scale: float, df: float, lower: float, upper: float, size: int = 4097
) -> np.ndarray:
    """The inverse CDF of loc + scale·T_df truncated to [lower, upper], tabulated at ``size`` equally
    spaced probabilities q ∈ [0, 1] (float64, computed once on the host with SciPy); sampling
    interpolates it (``sample_from_table``). Ends are exactly ``lower`` and ``upper``."""
    from scipy import stats

    if not lower < upper:
        raise ValueError(f"The truncation interval must be non-empty, got [{lower}, {upper}].")
    a, b = stats.t.cdf((lower - loc) / scale, df), stats.t.cdf((upper - loc) / scale, df)
    q = np.linspace(0.0, 1.0, size)
    x = loc + scale * stats.t.ppf(a + q * (b - a), df)
    x[0], x[-1] = lower, upper
    return np.clip(x, lower, upper)


def sample_from_table(rng: Array, batch: int, table: np.ndarray, dtype=jnp.float32) -> Array:
    """Draws from the law whose inverse CDF ``table`` holds (linear interpolation between knots)."""
    q = jax.random.uniform(rng, (batch,), jnp.float32)
    knots = jnp.linspace(0.0, 1.0, table.shape[0], dtype=jnp.float32)
    return jnp.interp(q, knots, jnp.asarray(table, jnp.float32)).astype(dtype)


def boundary_mask(batch: int, fraction: float) -> Array:
    """The examples placed at t = t′: the first round(batch·fraction) of the batch (the batch is in
    random order, so which rows is immaterial)."""
    return jnp.arange(batch) < int(round(batch * fraction))


def combined(f_student: Array, f_stage1: Array, sigma: Array, t_prime: float) -> Array:
    """The combined model's output: the student's at σ ≥ t′, the frozen stage-1 model's below."""
    s = sigma.reshape(sigma.shape + (1,) * (f_student.ndim - sigma.ndim))
    return jnp.where(s >= t_prime, f_student, f_stage1)


def combined_consistency_fn(f: ConsistencyFn, t_prime: float) -> Callable:
    """f((θ_s, θ_1), x, σ) of the combined model (TCM Eq. 8) from one consistency function f."""

    def fn(params, x, sigma):
        student, stage1 = params
        return combined(f(student, x, sigma), f(stage1, x, sigma), sigma, t_prime)

    return fn


def tcm_loss(
    f: ConsistencyFn,
    params: Any,
    target_params: Any,
    stage1_params: Any,
    x0: Array,
    z: Array,
    t: Array,
    r: Array,
    boundary: Array,
    *,
    t_prime: float,
    boundary_weight: float,
    huber_c: float = 0.0,
    sigma_min: float = 0.002,
) -> tuple[Array, dict[str, Array]]:
    """TCM's stage-2 loss (module docstring) at given pairs.

    Args:
      f: the consistency function f(params, x_σ, σ) of student and stage-1 model alike.
      params: θ_s, differentiated through f_s(x_t, t) only.
      target_params: θ_s⁻ (θ_s itself: ECT's stop-gradient target), under stop_gradient.
      stage1_params: θ_1, frozen (under stop_gradient).
      x0, z: clean data and one noise draw; x_t = x0 + t·z, x_r = x0 + r·z.
      t, r: pairs with t ≥ t′ > 0 and 0 ≤ r < t; r below σ_min takes x0 as the target.
      boundary: (B,) bool, the examples at t = t′, whose mean loss is weighted by ``boundary_weight``.
      huber_c: c of d(a, b) = √(‖a − b‖² + c²) − c (0: the l2 norm).
    """
    b = x0.shape[0]
    bc = lambda v: v.reshape((b,) + (1,) * (x0.ndim - 1))
    x_t, x_r = x0 + bc(t) * z, x0 + bc(r) * z
    online = f(params, x_t, t)
    sg = jax.lax.stop_gradient
    target = combined(f(sg(target_params), x_r, r), f(sg(stage1_params), x_r, r), r, t_prime)
    target = sg(jnp.where(bc(r) >= sigma_min, target, x0.astype(target.dtype)))
    dist = losses.pseudo_huber_distance(online, target, huber_c)
    per = dist / (t - r)
    nb = jnp.sum(boundary)
    inner = jnp.sum(jnp.where(boundary, 0.0, per)) / jnp.maximum(b - nb, 1)
    edge = jnp.sum(jnp.where(boundary, per, 0.0)) / jnp.maximum(nb, 1)
    return inner + boundary_weight * edge, {
        "interior_loss": inner,
        "boundary_loss": edge,
        "frac_r_below_t_prime": jnp.mean((r < t_prime).astype(t.dtype)),
        "mean_t": jnp.mean(t),
    }
