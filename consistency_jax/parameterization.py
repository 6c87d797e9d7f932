"""The consistency function f_θ and the EDM denoiser D_φ (CM, Song et al. 2023, Eq. 5–6 and
Appendix C; EDM, Karras et al. 2022, Table 1).

Both wrap a raw network F(params, x_in, c_noise, **kwargs) with the preconditioning

    f_θ(x, t) = c_skip(t)·x + c_out(t)·F_θ(c_in(t)·x, c_noise(t))

The consistency scalings are shifted by ε = σ_min so that f_θ(x, ε) = x holds exactly (CM Eq. 5–6,
Appendix C): c_skip(ε) = 1 and c_out(ε) = 0. To make the boundary condition exact for *any* network
output (also a non-finite one, or a bfloat16 one), ``consistency_fn`` additionally selects x where t == ε.

Dtypes: the maths follows the inputs x and t, promoted with float32: float64 when ``jax_enable_x64`` is
on and an input is float64, float32 otherwise (bfloat16 / float16 / integer inputs compute in float32).
The network's output is cast to that dtype before the skip connection is added.

Everything here is a pure function of arrays; ``apply_fn`` is any callable, so users can bring their own
network (Flax, Haiku, Equinox or plain jnp).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array


class ApplyFn(Protocol):
    """A raw network: F(params, x_in, c_noise, **kwargs) -> array shaped like x_in."""

    def __call__(self, params: Any, x: Array, c_noise: Array, **kwargs: Any) -> Array: ...


# How a TrigFlow network sees its time (SigmaConfig.trigflow_time).
TRIGFLOW_TIMES = ("angle", "edm")


@dataclasses.dataclass(frozen=True)
class SigmaConfig:
    """Noise levels of the KVE / EDM process x_t = x_0 + t·z (CM §2; EDM with σ(t) = t).

    Attributes:
      sigma_min: ε, the smallest time; f_θ(x, ε) = x.
      sigma_max: T, the largest time.
      sigma_data: σ_data, the data standard deviation used by the scalings.
      rho: ρ of the Karras grid.
      c_noise: how the network sees t: "jcm" (0.25·ln t, the official JAX code) or "cm"
        (1000·0.25·ln(t + 1e-44), the PyTorch code that feeds an ADM UNet).
      trigflow_time: TrigFlow models only (sCT / sCD; ``trigflow.raw_output``): "angle" (the network
        sees the angle t, sCM §4.1) or "edm" (it sees c_noise(σ_d·tan t) and predicts −F: an EDM
        network, so that an EDM run's parameters are an exact TrigFlow model to start from).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    c_noise: str = "jcm"
    trigflow_time: str = "angle"

    def __post_init__(self):
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"Need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}."
            )
        if self.sigma_data <= 0.0:
            raise ValueError(f"sigma_data must be positive, got {self.sigma_data}.")
        if self.rho <= 0.0:
            raise ValueError(f"rho must be positive, got {self.rho}.")
        if self.c_noise not in _C_NOISE:
            raise ValueError(f"Unknown c_noise {self.c_noise!r}; choose one of {sorted(_C_NOISE)}.")
        if self.trigflow_time not in TRIGFLOW_TIMES:
            raise ValueError(
                f"Unknown trigflow_time {self.trigflow_time!r}; choose one of "
                f"{list(TRIGFLOW_TIMES)}."
            )


def _c_noise_jcm(t: Array) -> Array:
    return 0.25 * jnp.log(t)


def _c_noise_cm(t: Array) -> Array:
    return 1000.0 * 0.25 * jnp.log(t + 1e-44)


_C_NOISE: dict[str, Callable[[Array], Array]] = {"jcm": _c_noise_jcm, "cm": _c_noise_cm}


def c_noise(t: Array, kind: str = "jcm") -> Array:
    """The network's noise-level input c_noise(t): 0.25·ln t (EDM Table 1, as in CM's official JAX
    code), or 1000·0.25·ln(t + 1e-44) (CM's official PyTorch code, for an ADM UNet)."""
    return _C_NOISE[kind](t)


def consistency_scalings(
    t: Array, sigma_min: float, sigma_data: float
) -> tuple[Array, Array, Array]:
    """c_skip, c_out, c_in of the consistency model (CM Eq. 5–6 and Appendix C).

    c_skip(t) = σ_d² / ((t − ε)² + σ_d²),  c_out(t) = σ_d·(t − ε)/√(σ_d² + t²),  c_in(t) = 1/√(σ_d² + t²).
    """
    c_skip = sigma_data**2 / ((t - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (t - sigma_min) / jnp.sqrt(sigma_data**2 + t**2)
    c_in = 1.0 / jnp.sqrt(sigma_data**2 + t**2)
    return c_skip, c_out, c_in


def edm_scalings(t: Array, sigma_data: float) -> tuple[Array, Array, Array]:
    """c_skip, c_out, c_in of the EDM denoiser (EDM Table 1): the consistency form with ε = 0."""
    return consistency_scalings(t, 0.0, sigma_data)


def as_compute_dtype(x: Any) -> Array:
    """``x`` as an array in the dtype of the core maths: promoted with float32 (float64 stays float64
    under x64; bfloat16, float16 and integers become float32)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def compute_dtype(x: Array, t: Array):
    """The dtype of the core maths: x and t promoted with float32 (float64 only under x64).

    A Python-scalar t is weakly typed and does not widen x; bfloat16, float16 and integers give float32.
    """
    as_typed = lambda v: (
        v if hasattr(v, "dtype") or isinstance(v, (bool, int, float)) else jnp.asarray(v)
    )
    return jnp.result_type(as_typed(x), as_typed(t), jnp.float32)


def broadcast_times(t: Array, x: Array, dtype=None) -> Array:
    """Reshapes per-example times (B,) or a scalar to broadcast against x (B, ...), in ``dtype``
    (default: x and t promoted with float32)."""
    t = jnp.asarray(t, dtype=compute_dtype(x, t) if dtype is None else dtype)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, x.shape[:1])
    if t.shape != x.shape[:1]:
        raise ValueError(f"Times must be a scalar or have shape {x.shape[:1]}, got {t.shape}.")
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


def _precond(
    apply_fn: ApplyFn, params: Any, x: Array, t: Array, scalings, kind: str, **kwargs: Any
) -> tuple[Array, Array, Array]:
    dtype = compute_dtype(x, t)
    x = jnp.asarray(x, dtype)
    tb = broadcast_times(t, x, dtype)
    c_skip, c_out, c_in = scalings(tb)
    out = apply_fn(params, c_in * x, c_noise(tb.reshape(x.shape[:1]), kind), **kwargs)
    if out.shape != x.shape:
        raise ValueError(f"The network returned shape {out.shape} for an input of shape {x.shape}.")
    # The skip connection is combined in the compute dtype (float32 unless x64) whatever the network's.
    return c_skip * x + c_out * out.astype(dtype), tb, x


def consistency_fn(
    apply_fn: ApplyFn, params: Any, x: Array, t: Array, sigmas: SigmaConfig, **kwargs: Any
) -> Array:
    """The consistency function f_θ(x, t) (CM Eq. 5–6), exact at the boundary t = ε.

    Args:
      apply_fn: the raw network F(params, x_in, c_noise, **kwargs).
      params: its parameters (θ, θ⁻ or an EMA).
      x: noisy inputs (B, ...).
      t: times, a scalar or (B,).
      sigmas: the noise configuration (ε, σ_data, c_noise kind).
      **kwargs: passed to apply_fn (labels, train flag, rngs, ...).

    Returns:
      f_θ(x, t) in x and t's dtype promoted with float32 (float64 under x64 for float64 inputs, else
      float32), with f_θ(x, ε) == x bit for bit.
    """
    scalings = lambda tb: consistency_scalings(tb, sigmas.sigma_min, sigmas.sigma_data)
    f, tb, x = _precond(apply_fn, params, x, t, scalings, sigmas.c_noise, **kwargs)
    return jnp.where(tb <= sigmas.sigma_min, x, f)


def denoiser_fn(
    apply_fn: ApplyFn, params: Any, x: Array, t: Array, sigmas: SigmaConfig, **kwargs: Any
) -> Array:
    """The EDM denoiser D_φ(x, t) = c_skip·x + c_out·F_φ(c_in·x, c_noise) (EDM Eq. 7, Table 1), in the
    same dtype as ``consistency_fn``."""
    scalings = lambda tb: edm_scalings(tb, sigmas.sigma_data)
    return _precond(apply_fn, params, x, t, scalings, sigmas.c_noise, **kwargs)[0]


def denoiser_to_score(denoised: Array, x: Array, t: Array) -> Array:
    """Score ∇ log p_t(x) = (D(x, t) − x)/t² of the KVE process (EDM Eq. 3)."""
    tb = broadcast_times(t, x)
    return (denoised - x) / tb**2


# (teacher_params, x, t, labels) -> D(x, t): a teacher denoiser for consistency distillation.
TeacherDenoise = Callable[[Any, Array, Array, Any], Array]


def network_teacher(apply_fn: ApplyFn, sigmas: SigmaConfig) -> TeacherDenoise:
    """A CD teacher D_φ(x, t) from a raw EDM-preconditioned network (EDM Eq. 7), without dropout."""

    def denoise(teacher_params, x, t, labels=None):
        return denoiser_fn(
            apply_fn, teacher_params, x, t, sigmas, labels=labels, train=False, rng=None
        )

    return denoise
