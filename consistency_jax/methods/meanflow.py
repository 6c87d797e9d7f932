"""MeanFlow: average-velocity flow maps trained from the MeanFlow identity (Geng, Deng, Bai, Kolter, He
2025), as the method ``meanflow``.

On the flow-matching path z_t = (1 − t)·x + t·ε, t ∈ [0, 1], ε ~ N(0, I), with conditional velocity
v = ε − x (MeanFlow Eq. 1–2), the network models the average velocity over [r, t] (Eq. 3)

    u(z_t, r, t) = 1/(t − r)·∫_r^t v(z_τ, τ) dτ,          u(z, t, t) = v(z, t),

so one step of the flow map is z_r = z_t − (t − r)·u(z_t, r, t) (Eq. 5) and a one-step sample is
x = ε − u(ε, 0, 1). Differentiating (t − r)·u = ∫_r^t v dτ in t gives the MeanFlow identity (Eq. 6)

    u(z_t, r, t) = v(z_t, t) − (t − r)·d/dt u(z_t, r, t),   d/dt u = v·∂_z u + ∂_t u,

whose total derivative is ONE forward-mode product of u_θ with the tangents (v, 0, 1) for (z, r, t)
(Eq. 8). The loss regresses u_θ onto u_tgt = v − (t − r)·sg(d/dt u_θ) (Eq. 9) with the adaptive
weight w = sg(1/(‖Δ‖² + c)^p) (p = 1, §4.3); with r = t it is flow matching. (t, r) are two
logit-normal draws sorted so that t ≥ r, and all but a fraction of the batch set r = t (§4.3, Table
1a: 25 % with r ≠ t). The network sees (t, t − r) (Table 1c).

Guidance in training (§4.2, Eq. 13–19): for class-conditional models the velocity is replaced by
ṽ = ω·v + κ·u_θ(z_t, t, t | c) + (1 − ω − κ)·u_θ(z_t, t, t | ∅) (the model's own velocities, no
gradient), and the class is dropped (set to the null label) with probability ``class_dropout``, whose
examples keep v. Sampling is then one network evaluation per step, with no guidance at sampling time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
# u_fn(z, r, t) -> u: the average velocity at (z, r, t), r and t of shape (B,).
AverageVelocityFn = Callable[[Array, Array, Array], Array]


def _b(t: Array, x: Array) -> Array:
    """Per-example times shaped to broadcast against x."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def flow_point(x0: Array, eps: Array, t: Array) -> tuple[Array, Array]:
    """(z_t, v): the flow-matching point z_t = (1 − t)·x0 + t·ε and its velocity v = ε − x0."""
    tb = _b(t, x0)
    return (1.0 - tb) * x0 + tb * eps, eps - x0


def sample_times(
    rng: Array,
    batch: int,
    p_mean: float = -0.4,
    p_std: float = 1.0,
    fraction_distinct: float = 0.25,
    dtype=jnp.float32,
) -> tuple[Array, Array]:
    """(t, r) of a batch: two logit-normal draws sigmoid(N(p_mean, p_std²)), sorted so that t ≥ r;
    the first round(B·(1 − fraction_distinct)) examples set r = t (flow matching), the rest keep
    r ≤ t (MeanFlow §4.3)."""
    a, b = jax.random.split(rng)
    s = jax.nn.sigmoid(p_mean + p_std * jax.random.normal(a, (batch,), dtype))
    u = jax.nn.sigmoid(p_mean + p_std * jax.random.normal(b, (batch,), dtype))
    t, r = jnp.maximum(s, u), jnp.minimum(s, u)
    equal = jnp.arange(batch) < int(round(batch * (1.0 - fraction_distinct)))
    return t, jnp.where(equal, t, r)


def total_derivative(u_fn: AverageVelocityFn, z: Array, r: Array, t: Array, v: Array):
    """(u, du/dt): u_θ(z, r, t) and its total derivative along dz/dt = v, dr/dt = 0, dt/dt = 1,
    one ``jax.jvp`` (MeanFlow Eq. 8)."""
    return jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))


def meanflow_target(u_fn: AverageVelocityFn, z: Array, r: Array, t: Array, v: Array):
    """(u, u_tgt): the prediction and the target v − (t − r)·du/dt under stop-gradient (Eq. 9)."""
    u, dudt = total_derivative(u_fn, z, r, t, v)
    return u, jax.lax.stop_gradient(v - _b(t - r, z) * dudt)


def adaptive_weight(sq_error: Array, p: float = 1.0, c: float = 1e-3) -> Array:
    """w = sg(1/(‖Δ‖² + c)^p) (MeanFlow §4.3); p = 0 gives w = 1 (the plain squared error)."""
    return jax.lax.stop_gradient(1.0 / (sq_error + c) ** p)


def meanflow_loss(
    u_fn: AverageVelocityFn,
    z: Array,
    r: Array,
    t: Array,
    v: Array,
    *,
    p: float = 1.0,
    c: float = 1e-3,
) -> tuple[Array, dict[str, Array]]:
    """The MeanFlow loss of one batch at given points: mean_i w_i·‖u_θ − u_tgt‖²_i with v (possibly
    guided) the velocity along which the target is differentiated."""
    v = jax.lax.stop_gradient(v)
    u, target = meanflow_target(u_fn, z, r, t, v)
    sq = jnp.sum(((u - target) ** 2).reshape(z.shape[0], -1), axis=-1)
    w = adaptive_weight(sq, p, c)
    velocity_error = jnp.sum(((u - v) ** 2).reshape(z.shape[0], -1), axis=-1)
    return jnp.mean(w * sq), {
        "mse": jnp.mean(sq),
        "velocity_mse": jnp.mean(velocity_error),
        "mean_t_minus_r": jnp.mean(t - r),
    }


def guided_velocity(
    v: Array, v_uncond: Array, v_cond: Array | None, omega: float, kappa: float = 0.0
) -> Array:
    """ṽ = ω·v + κ·v_cond + (1 − ω − κ)·v_uncond (MeanFlow Eq. 13–19): ω = 1, κ = 0 returns v itself."""
    if omega == 1.0 and kappa == 0.0:
        return v
    out = omega * v + (1.0 - omega - kappa) * v_uncond
    return out + kappa * v_cond if kappa else out


def sample(u_fn: AverageVelocityFn, eps: Array, times) -> Array:
    """The flow map from t = times[0] down the grid: z_r = z_t − (t − r)·u(z_t, r, t) (Eq. 5);
    ``times`` = (1, 0) is the one-step sampler x = ε − u(ε, 0, 1), (1, 0.5, 0) the two-step one."""
    z = eps
    ones = jnp.ones((eps.shape[0],), eps.dtype)
    for t, r in zip(times[:-1], times[1:]):
        z = z - (t - r) * u_fn(z, r * ones, t * ones)
    return z


def sigma_to_time(sigma: Array) -> Array:
    """The flow-matching time of an EDM noise level: x_σ = x + σ·ε is z_t/(1 − t) at t = σ/(1 + σ)."""
    return sigma / (1.0 + sigma)


def consistency_fn_sigma(u_fn: AverageVelocityFn, x_sigma: Array, sigma: Array) -> Array:
    """The model's consistency function at an EDM point (x_σ, σ): the flow map from t = σ/(1 + σ) to
    0, z_0 = z_t − t·u(z_t, 0, t) with z_t = (1 − t)·x_σ. It lets every consistency-model sampler and
    editor (CM Algorithms 1 and 4) run a MeanFlow model."""
    t = sigma_to_time(sigma)
    z = _b(1.0 - t, x_sigma) * x_sigma
    return z - _b(t, z) * u_fn(z, jnp.zeros_like(t), t)
