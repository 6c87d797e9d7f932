"""Samplers: one-step and multistep consistency sampling (CM Algorithm 1) and the EDM Heun sampler
(EDM Algorithm 1) for teachers.

All samplers are pure functions of (params, rng) that jit; ``make_sampler`` returns a jitted one for a
fixed shape. Randomness comes only from ``rng``, so a key gives the same samples every time.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from consistency_jax import parameterization as param_lib
from consistency_jax import schedules

Array = jax.Array


def times_from_indices(
    indices: Sequence[int], num_scales: int, sigmas: param_lib.SigmaConfig
) -> tuple[float, ...]:
    """Converts grid indices counted from T (the cm/jcm convention: 0 is T, N−1 is ε) to times.

    E.g. ImageNet-64 CD 2-step uses indices (0, 22, 39) on the N = 40 grid (cm's launch scripts): the sampler
    evaluates f at T and at t(22); the last index (ε) only marks the end.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size < 1 or np.any(idx < 0) or np.any(idx > num_scales - 1):
        raise ValueError(f"Indices must lie in [0, {num_scales - 1}], got {list(indices)}.")
    if np.any(np.diff(idx) <= 0):
        raise ValueError(
            f"Indices must be strictly increasing (from T towards ε), got {list(indices)}."
        )
    grid = np.asarray(schedules.karras_sigmas(num_scales, sigmas))[::-1]
    return tuple(float(grid[i]) for i in idx)


def check_times(ts: Sequence[float], sigmas: param_lib.SigmaConfig) -> tuple[float, ...]:
    """The sampling times as floats after checking them: strictly decreasing, within [ε, T]."""
    ts = tuple(float(t) for t in ts)
    if not ts:
        raise ValueError("A consistency sampler needs at least one time.")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"Sampling times must be strictly decreasing, got {ts}.")
    if ts[-1] < sigmas.sigma_min or ts[0] > sigmas.sigma_max:
        raise ValueError(f"Sampling times must lie in [sigma_min, sigma_max], got {ts}.")
    return ts


def multistep_sample(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    rng: Array,
    shape: Sequence[int],
    ts: Sequence[float],
    sigmas: param_lib.SigmaConfig,
    *,
    labels: Array | None = None,
    clip: float | None = None,
    x_init: Array | None = None,
    consistency_fn=param_lib.consistency_fn,
    project: Callable[[Array], Array] | None = None,
) -> Array:
    """Multistep consistency sampling (CM Algorithm 1).

    x ← f(τ_0·z, τ_0); for τ in τ_1 > … : x ← f(x + √(τ² − ε²)·z, τ). One step when ``ts`` = (T,).
    A trailing ε in ``ts`` (the cm convention) is dropped: f(·, ε) is the identity.

    Args:
      apply_fn, params: the raw network and the parameters to sample with.
      rng: key; the samples are a deterministic function of it.
      shape: output shape (B, ...).
      ts: decreasing times, ts[0] usually T = σ_max.
      sigmas: the noise configuration.
      labels: class labels (B,) for a conditional network.
      clip: if set, clamp each x0 estimate to [−clip, clip] (images: 1.0).
      x_init: the initial noisy point x_{τ_0} instead of τ_0·z (for editing / interpolation).
      consistency_fn: f(apply_fn, params, x_σ, σ, sigmas, **kw), CM's by default; a TrigFlow model's
        ``trigflow.consistency_fn_sigma`` makes this sCM's sampler (sCM §3) in EDM units.
      project: if set, applied to each x0 estimate after clipping, before the next noise: the
        projection onto the known part of zero-shot editing (CM Algorithm 4, ``editing.edit``).
    """
    keys = jax.random.split(rng, len(_sampler_times(ts, sigmas)))
    noise = lambda j: jax.random.normal(keys[j], tuple(shape), jnp.float32)
    return _multistep(
        apply_fn, params, noise, ts, sigmas, labels, clip, x_init, consistency_fn, project
    )


def _sampler_times(ts, sigmas) -> tuple[float, ...]:
    """The checked times without a trailing ε (f(·, ε) is the identity)."""
    ts = check_times(ts, sigmas)
    return ts[:-1] if len(ts) > 1 and ts[-1] == sigmas.sigma_min else ts


def _multistep(
    apply_fn, params, noise, ts, sigmas, labels, clip, x_init, consistency_fn, project=None
) -> Array:
    """CM Algorithm 1 with the j-th Gaussian draw ``noise(j)`` (j = 0: the initial noise)."""
    ts = _sampler_times(ts, sigmas)
    x = ts[0] * noise(0) if x_init is None else x_init
    f = functools.partial(
        consistency_fn, apply_fn, params, sigmas=sigmas, labels=labels, train=False, rng=None
    )
    for j, t in enumerate(ts):
        if j > 0:
            noise_std = np.sqrt(t * t - sigmas.sigma_min**2)
            x = x + noise_std * noise(j)
        x = f(x=x, t=jnp.full(x.shape[:1], t, jnp.float32))
        if clip is not None:
            x = jnp.clip(x, -clip, clip)
        if project is not None:
            x = project(x)
    return x


# Streams of the per-example keys: draw j of the sampler uses stream j; the label uses its own.
LABEL_STREAM = 0x1AB


def example_keys(key: Array, indices: Array) -> Array:
    """One key per example: ``fold_in(key, i)`` for every global example index i."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(indices, jnp.uint32))


def example_noise(keys: Array, stream: int, example_shape: Sequence[int]) -> Array:
    """Standard normal draws (B, *example_shape), row b from ``fold_in(keys[b], stream)`` alone."""
    draw = lambda k: jax.random.normal(
        jax.random.fold_in(k, stream), tuple(example_shape), jnp.float32
    )
    return jax.vmap(draw)(keys)


def example_labels(keys: Array, num_classes: int) -> Array:
    """Uniform class labels, label b from ``keys[b]`` alone (its own stream)."""
    draw = lambda k: jax.random.randint(jax.random.fold_in(k, LABEL_STREAM), (), 0, num_classes)
    return jax.vmap(draw)(keys).astype(jnp.int32)


def indexed_sample(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    key: Array,
    indices: Array,
    example_shape: Sequence[int],
    ts: Sequence[float],
    sigmas: param_lib.SigmaConfig,
    *,
    labels: Array | None = None,
    clip: float | None = None,
    consistency_fn=param_lib.consistency_fn,
) -> Array:
    """CM Algorithm 1 where example i is a function of (key, i) alone.

    Every Gaussian draw of example i comes from ``fold_in(fold_in(key, i), j)`` (j the step), so the
    samples do not depend on the batch an example falls in, on the batch size, or on how the batch
    is split over devices and hosts: the sampling command's datasets are the same on any mesh.

    Args:
      indices: (B,) global example indices.
      example_shape: the shape of one example (H, W, C).
      Others: as ``multistep_sample``.
    """
    keys = example_keys(key, indices)
    noise = lambda j: example_noise(keys, j, example_shape)
    return _multistep(apply_fn, params, noise, ts, sigmas, labels, clip, None, consistency_fn)


def indexed_heun_sample(
    denoise,
    key: Array,
    indices: Array,
    example_shape: Sequence[int],
    sigmas: param_lib.SigmaConfig,
    num_steps: int = 18,
) -> Array:
    """EDM's Heun sampler (``edm_heun_sample``) from the initial noise of ``indexed_sample``: example
    i is a function of (key, i) alone."""
    keys = example_keys(key, indices)
    x_init = sigmas.sigma_max * example_noise(keys, 0, example_shape)
    return edm_heun_sample(denoise, key, x_init.shape, sigmas, num_steps, x_init=x_init)


def onestep_sample(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    rng: Array,
    shape: Sequence[int],
    sigmas: param_lib.SigmaConfig,
    **kwargs: Any,
) -> Array:
    """One-step generation x = f_θ(T·z, T) (CM Algorithm 1 with one step)."""
    return multistep_sample(apply_fn, params, rng, shape, (sigmas.sigma_max,), sigmas, **kwargs)


def edm_heun_sample(
    denoise,
    rng: Array,
    shape: Sequence[int],
    sigmas: param_lib.SigmaConfig,
    num_steps: int = 18,
    *,
    x_init: Array | None = None,
    t_max: float | None = None,
    project: Callable[[Array, Array], Array] | None = None,
) -> Array:
    """EDM's deterministic Heun sampler (EDM Algorithm 1) on the Karras grid, 2·num_steps − 1 NFE.

    ``denoise(x, t)`` is the teacher D(x, t) with t of shape (B,). The times are the Karras grid from T
    down to ε followed by t = 0 (EDM Eq. 5); every step is Heun except the last one into t = 0, which is
    Euler, so 18 steps cost 35 network evaluations (the CIFAR-10 teacher's NFE in EDM Table 2).

    ``t_max`` starts the grid at another time than T (SDEdit, denoising: ``x_init`` is then the point
    at t_max). ``project(x, t)``, if set, is applied to x after every step, at the step's end time t
    (diffusion-based zero-shot editing, ``editing.edm_edit``).
    """
    if t_max is not None:
        sigmas = dataclasses.replace(sigmas, sigma_max=float(t_max))
    grid = schedules.karras_sigmas(num_steps, sigmas)[::-1]
    ts = jnp.concatenate([grid, jnp.zeros((1,), jnp.float32)])
    x = ts[0] * jax.random.normal(rng, tuple(shape), jnp.float32) if x_init is None else x_init
    b = x.shape[0]
    bc = lambda t: jnp.full((b,), t, jnp.float32)

    def body(i, x):
        t_cur, t_next = ts[i], ts[i + 1]
        d = (x - denoise(x, bc(t_cur))) / t_cur
        x_next = x + (t_next - t_cur) * d

        def correct(_):
            d2 = (x_next - denoise(x_next, bc(t_next))) / t_next
            return x + (t_next - t_cur) * 0.5 * (d + d2)

        x = jax.lax.cond(t_next > 0, correct, lambda _: x_next, None)
        return x if project is None else project(x, t_next)

    return jax.lax.fori_loop(0, num_steps, body, x)


def make_sampler(
    apply_fn: param_lib.ApplyFn,
    sigmas: param_lib.SigmaConfig,
    ts: Sequence[float],
    shape: Sequence[int],
    *,
    clip: float | None = None,
    consistency_fn=param_lib.consistency_fn,
):
    """A jitted ``sample(params, rng, labels=None) -> x`` for a fixed shape and fixed times."""
    ts = check_times(ts, sigmas)

    @jax.jit
    def sample(params, rng, labels=None):
        return multistep_sample(
            apply_fn,
            params,
            rng,
            shape,
            ts,
            sigmas,
            labels=labels,
            clip=clip,
            consistency_fn=consistency_fn,
        )

    return sample
