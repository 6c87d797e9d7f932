"""TrigFlow: the diffusion process and consistency function of sCM (Lu & Song 2024, §2–3).

The TrigFlow process interpolates data and noise on a quarter circle,

    x_t = cos t·x_0 + sin t·z,   z ~ N(0, σ_d² I),   t ∈ [0, π/2],

and its consistency function is (sCM Eq. 6 with c_skip = cos t, c_out = −σ_d·sin t)

    f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, c_noise(t)),      f_θ(x, 0) = x exactly,

where F_θ predicts the PF-ODE velocity in units of σ_d: dx_t/dt = σ_d·F(x_t/σ_d, t) for a diffusion
model (the "v-prediction" of TrigFlow).

Relation to the KVE / EDM process x_σ = x_0 + σ·z' (z' ~ N(0, I)) used by the rest of the library:
t = arctan(σ/σ_d) and x_t = cos t·x_σ. Written in σ, the TrigFlow consistency function is EDM's
preconditioning with ε = 0 (c_skip = σ_d²/(σ² + σ_d²), c_out = −σ·σ_d/√(σ² + σ_d²), c_in =
1/√(σ² + σ_d²)) with the network seeing the angle t instead of 0.25·ln σ. ``consistency_fn_sigma``
gives it with the signature of ``parameterization.consistency_fn``, so the library's samplers,
evaluators and editing functions use TrigFlow models unchanged: CM Algorithm 1 with x_σ = x_0 + σ·z is
the TrigFlow sampler x_t = cos t·x_0 + sin t·z of sCM §3 after the change of variable.

The time input of the network follows the run's ``sigmas.c_noise`` convention: "jcm" gives the angle t
itself (sCM §4.1, "identity time transformation", for networks whose embeddings expect inputs of order
one: NCSN++ / DDPM++ / the MLP), "cm" gives 1000·t (the ADM UNet's positional embedding expects DDPM
timesteps in [0, 1000]).

``sigmas.trigflow_time = "edm"`` instead makes the network an EDM one: it sees the EDM time input
c_noise(σ) of σ = σ_d·tan t and F_θ = −F_net. With EDM's scalings at σ = σ_d·tan t (c_in·x_σ = x_t/σ_d,
c_skip = cos²t, c_out = σ_d·sin t) the velocity below becomes exactly σ_d·F_teacher = −σ_d·F_φ(x_t/σ_d,
c_noise(σ_d·tan t)): an EDM run's parameters are, unchanged, the same model in TrigFlow, so sCD's
student can start as its teacher (as sCM fine-tunes pretrained diffusion models; ``config.init``). In the
rearranged jvp the time tangent cos t·sin t meets dc_noise/dt = 0.25/(cos t·sin t) ("jcm"): the product
is the constant 0.25, as well scaled as the angle's.

An EDM denoiser D(x_σ, σ) is a TrigFlow diffusion model (sCM §3, used for sCD):

    σ_d·F_teacher(x_t/σ_d, t) = (cos t·x_t − D(x_t/cos t, σ_d·tan t)) / sin t      (``edm_velocity``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from consistency_jax import parameterization as param_lib

Array = jax.Array
HALF_PI = 0.5 * math.pi
# How the network sees the angle t, by the run's sigmas.c_noise convention (module docstring).
_TIME_INPUT = {"jcm": 1.0, "cm": 1000.0}


def time_input(t: Array, kind: str = "jcm") -> Array:
    """c_noise(t) of a TrigFlow network: t ("jcm" networks) or 1000·t ("cm": the ADM UNet)."""
    if kind not in _TIME_INPUT:
        raise ValueError(f"Unknown c_noise {kind!r} for TrigFlow; one of {sorted(_TIME_INPUT)}.")
    return _TIME_INPUT[kind] * t


def network_time(t: Array, sigmas: param_lib.SigmaConfig) -> Array:
    """The network's time input at angles t: c_noise(t) by ``time_input`` ("angle" networks), or the
    EDM input c_noise(σ_d·tan t) ("edm" networks; σ is kept >= the smallest normal float, so t = 0 gives
    a finite input)."""
    if sigmas.trigflow_time == "edm":
        sigma = sigma_from_t(t, sigmas.sigma_data)
        sigma = jnp.maximum(sigma, jnp.finfo(jnp.result_type(sigma)).tiny)
        return param_lib.c_noise(sigma, sigmas.c_noise)
    return time_input(t, sigmas.c_noise)


def t_from_sigma(sigma: Array, sigma_data: float) -> Array:
    """The TrigFlow angle of the EDM noise level σ: t = arctan(σ/σ_d)."""
    return jnp.arctan(sigma / sigma_data)


def sigma_from_t(t: Array, sigma_data: float) -> Array:
    """The EDM noise level of the TrigFlow angle t: σ = σ_d·tan t."""
    return sigma_data * jnp.tan(t)


def raw_output(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    x_t: Array,
    t: Array,
    sigmas: param_lib.SigmaConfig,
    **kwargs: Any,
) -> Array:
    """F_θ(x_t/σ_d, c_noise(t)) in the compute dtype of x_t and t (float32, float64 under x64); for an
    "edm" network (``sigmas.trigflow_time``) −F_net(x_t/σ_d, c_noise(σ_d·tan t)) (module docstring).

    Args:
      apply_fn, params: the raw network and its parameters.
      x_t: TrigFlow points (B, ...).
      t: angles, a scalar or (B,).
      sigmas: σ_d and the network's time convention (``sigmas.c_noise``).
      **kwargs: passed to apply_fn (labels, train, rng).
    """
    dtype = param_lib.compute_dtype(x_t, t)
    x_t = jnp.asarray(x_t, dtype)
    tb = param_lib.broadcast_times(t, x_t, dtype)
    out = apply_fn(
        params, x_t / sigmas.sigma_data, network_time(tb.reshape(x_t.shape[:1]), sigmas), **kwargs
    )
    if out.shape != x_t.shape:
        raise ValueError(
            f"The network returned shape {out.shape} for an input of shape {x_t.shape}."
        )
    out = out.astype(dtype)
    return -out if sigmas.trigflow_time == "edm" else out


def consistency_fn(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    x_t: Array,
    t: Array,
    sigmas: param_lib.SigmaConfig,
    **kwargs: Any,
) -> Array:
    """The TrigFlow consistency function f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ (sCM Eq. 6).

    f_θ(x, 0) == x bit for bit, whatever the network returns (also a non-finite value).
    """
    dtype = param_lib.compute_dtype(x_t, t)
    x_t = jnp.asarray(x_t, dtype)
    tb = param_lib.broadcast_times(t, x_t, dtype)
    out = raw_output(apply_fn, params, x_t, t, sigmas, **kwargs)
    f = jnp.cos(tb) * x_t - jnp.sin(tb) * sigmas.sigma_data * out
    return jnp.where(tb <= 0, x_t, f)


def consistency_fn_sigma(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    x: Array,
    t: Array,
    sigmas: param_lib.SigmaConfig,
    **kwargs: Any,
) -> Array:
    """The TrigFlow consistency function at the EDM point (x_σ, σ = ``t``): f_θ(cos s·x_σ, s) with the
    angle s = arctan(σ/σ_d).

    Same signature (``t`` is the EDM time σ, as everywhere else in the library) and dtype rules as
    ``parameterization.consistency_fn``, so every sampler of the library samples a TrigFlow model
    (CM Algorithm 1 in σ is sCM's TrigFlow sampler).
    """
    dtype = param_lib.compute_dtype(x, t)
    x = jnp.asarray(x, dtype)
    sb = param_lib.broadcast_times(t, x, dtype)
    t = t_from_sigma(sb, sigmas.sigma_data)
    return consistency_fn(
        apply_fn, params, jnp.cos(t) * x, t.reshape(x.shape[:1]), sigmas, **kwargs
    )


def edm_velocity(
    denoise: param_lib.TeacherDenoise, sigma_data: float
) -> Callable[[Any, Array, Array, Any], Array]:
    """An EDM denoiser as a TrigFlow diffusion model: (φ, x_t, t, labels) -> dx_t/dt = σ_d·F_φ.

    dx_t/dt = (cos t·x_t − D_φ(x_t/cos t, σ_d·tan t))/sin t, the exact TrigFlow PF-ODE of the same
    model (x_t = cos t·x_σ); t must lie in (0, π/2).
    """

    def velocity(phi, x_t, t, labels=None):
        tb = param_lib.broadcast_times(t, x_t)
        cos, sin = jnp.cos(tb), jnp.sin(tb)
        x0 = denoise(phi, x_t / cos, sigma_from_t(t, sigma_data), labels)
        return (cos * x_t - x0.astype(x_t.dtype)) / sin

    return velocity


def denoised_from_velocity(x_t: Array, t: Array, velocity: Array) -> Array:
    """x̂_0 = cos t·x_t − sin t·dx_t/dt: the clean estimate of a TrigFlow diffusion model."""
    tb = param_lib.broadcast_times(t, x_t)
    return jnp.cos(tb) * x_t - jnp.sin(tb) * velocity
