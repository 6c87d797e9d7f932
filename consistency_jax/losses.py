"""Consistency distillation / training losses and the EDM denoiser loss (REFERENCE §3; CM Eq. 7–10).

    L(θ, θ⁻) = E[ λ(t_n) · d( f_θ(x + t_{n+1}·z, t_{n+1}), sg f_{θ⁻}(x̂_{t_n}, t_n) ) ]

with x̂_{t_n} one teacher ODE step from t_{n+1} (CD, Algorithm 2) or x + t_n·z (CT, Algorithm 3).
Indices are 0-based on the ascending grid of ``schedules.karras_time``: the pair is (t_i, t_{i+1}),
i ∈ {0, …, N−2}.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from consistency_jax import parameterization as param_lib
from consistency_jax import schedules, solvers

Array = jax.Array
Distance = Callable[[Array, Array], Array]

METHODS = ("cd", "ct", "edm")
DISTANCES = ("l2", "l1", "pseudo_huber", "lpips")
WEIGHTINGS = ("uniform", "ict", "snr", "snr+1", "truncated_snr")
INDEX_SAMPLINGS = ("uniform", "lognormal")


# ----------------------------------------------------------------------------------------------------
# Distances d(a, b) -> (B,)


def _flat(x: Array) -> Array:
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


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
    """√(‖a − b‖² + c²) − c (iCT Eq. 8)."""
    sq = jnp.sum((_flat(a) - _flat(b)) ** 2, axis=-1)
    return jnp.sqrt(sq + c * c) - c


def make_distance(name: str, data_shape: tuple[int, ...], *, huber_c: Optional[float] = None,
                  lpips_fn: Optional[Distance] = None) -> Distance:
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
            raise ValueError("distance='lpips' needs LPIPS weights: set config.loss.lpips_weights to a "
                             ".safetensors file (see tools/convert_lpips_weights.py).")
        return lpips_fn
    raise ValueError(f"Unknown distance {name!r}; choose one of {DISTANCES}.")


# ----------------------------------------------------------------------------------------------------
# Weightings λ(t_n, t_{n+1}) and the choice of n


def weighting(name: str, t_lo: Array, t_hi: Array) -> Array:
    """λ for the pair (t_n, t_{n+1}) = (t_lo, t_hi) (REFERENCE §3).

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


def lognormal_index_logits(num_scales: Array, max_scales: int, sigmas: param_lib.SigmaConfig,
                           p_mean: float = -1.1, p_std: float = 2.0) -> Array:
    """Log-probabilities of iCT's discrete lognormal choice of n (iCT §3.5; REFERENCE §4).

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


def sample_index(rng: Array, batch: int, num_scales: Array, max_scales: int, kind: str,
                 sigmas: param_lib.SigmaConfig, p_mean: float = -1.1, p_std: float = 2.0) -> Array:
    """Draws the lower grid index i ∈ {0, …, N−2} of each example's pair (t_i, t_{i+1})."""
    if kind == "uniform":
        return jax.random.randint(rng, (batch,), 0, num_scales - 1)
    if kind == "lognormal":
        logits = lognormal_index_logits(num_scales, max_scales, sigmas, p_mean, p_std)
        return jax.random.categorical(rng, logits, shape=(batch,))
    raise ValueError(f"Unknown index sampling {kind!r}; choose one of {INDEX_SAMPLINGS}.")


# ----------------------------------------------------------------------------------------------------
# The losses


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What a loss needs; built from ``config.loss`` by ``train.loss_config_from``.

    Attributes:
      method: "cd" (distillation), "ct" (training from scratch) or "edm" (train a teacher denoiser).
      distance: l2, l1, pseudo_huber or lpips.
      weighting: λ, see ``weighting``.
      index_sampling: "uniform" (CM) or "lognormal" (iCT) choice of n.
      solver: teacher ODE step for CD: "euler" or "heun".
      huber_c: pseudo-Huber c (None: 0.00054·√dim).
      p_mean, p_std: iCT's lognormal index sampling parameters.
      edm_p_mean, edm_p_std: EDM's lognormal σ for teacher training (ln σ ~ N(−1.2, 1.2²)).
    """

    method: str = "ct"
    distance: str = "l2"
    weighting: str = "uniform"
    index_sampling: str = "uniform"
    solver: str = "heun"
    huber_c: Optional[float] = None
    p_mean: float = -1.1
    p_std: float = 2.0
    edm_p_mean: float = -1.2
    edm_p_std: float = 1.2

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {METHODS}.")
        if self.distance not in DISTANCES:
            raise ValueError(f"Unknown distance {self.distance!r}; choose one of {DISTANCES}.")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown weighting {self.weighting!r}; choose one of {WEIGHTINGS}.")
        if self.index_sampling not in INDEX_SAMPLINGS:
            raise ValueError(f"Unknown index sampling {self.index_sampling!r}; "
                             f"choose one of {INDEX_SAMPLINGS}.")
        solvers.get_solver(self.solver)
        if self.p_std <= 0 or self.edm_p_std <= 0:
            raise ValueError("Lognormal standard deviations (p_std, edm_p_std) must be positive.")


# (teacher_params, x, t, labels) -> D(x, t)
TeacherDenoise = Callable[[Any, Array, Array, Optional[Array]], Array]


def network_teacher(apply_fn: param_lib.ApplyFn, sigmas: param_lib.SigmaConfig) -> TeacherDenoise:
    """A teacher D_φ from a raw EDM-preconditioned network, evaluated without dropout."""

    def denoise(teacher_params, x, t, labels=None):
        return param_lib.denoiser_fn(apply_fn, teacher_params, x, t, sigmas, labels=labels,
                                     train=False, rng=None)

    return denoise


LossFn = Callable[..., tuple[Array, dict[str, Array]]]


def make_consistency_loss(cfg: LossConfig, apply_fn: param_lib.ApplyFn,
                          sigmas: param_lib.SigmaConfig, curriculum: schedules.Curriculum,
                          distance: Distance, teacher: Optional[TeacherDenoise] = None) -> LossFn:
    """Builds the CD / CT loss of CM Algorithms 2 and 3 (REFERENCE §3).

    Returns:
      loss_fn(params, target_params, teacher_params, batch, rng, num_scales, distance=None)
      -> (loss, aux), where ``batch`` holds "image" (B, ...) and optionally "label" (B,),
      ``target_params`` are θ⁻ (they are put under stop_gradient here), ``num_scales`` is N(k) of the
      step, and ``distance`` optionally replaces the built-in one by a distance passed at call time
      (``TrainState.distance``: a weighted metric such as LPIPS, as an input of the compiled step).
    """
    if cfg.method not in ("cd", "ct"):
        raise ValueError(f"make_consistency_loss builds cd or ct losses, not {cfg.method!r}.")
    if cfg.method == "cd" and teacher is None:
        raise ValueError("Consistency distillation (method='cd') needs a teacher denoiser.")
    solver = solvers.get_solver(cfg.solver)

    def loss_fn(params, target_params, teacher_params, batch, rng, num_scales, distance=distance):
        x0 = jnp.asarray(batch["image"], jnp.float32)
        labels = batch.get("label")
        b = x0.shape[0]
        rng_n, rng_z, rng_drop = jax.random.split(rng, 3)
        i = sample_index(rng_n, b, num_scales, curriculum.max_scales, cfg.index_sampling, sigmas,
                         cfg.p_mean, cfg.p_std)
        t_lo = schedules.karras_time(i, num_scales, sigmas)
        t_hi = schedules.karras_time(i + 1, num_scales, sigmas)
        z = jax.random.normal(rng_z, x0.shape, jnp.float32)
        bc = lambda t: t.reshape((b,) + (1,) * (x0.ndim - 1))
        x_hi = x0 + bc(t_hi) * z
        if cfg.method == "ct":
            x_lo = x0 + bc(t_lo) * z  # Eq. 12–16: the clean x0 stands in for the teacher's denoiser.
        else:
            denoise = lambda x, t: teacher(teacher_params, x, t, labels)
            x_lo = jax.lax.stop_gradient(solver(denoise, x_hi, t_hi, t_lo))
        # jcm evaluates online and target networks with one shared dropout key.
        kw = dict(labels=labels, train=True, rng=rng_drop)
        online = param_lib.consistency_fn(apply_fn, params, x_hi, t_hi, sigmas, **kw)
        target = param_lib.consistency_fn(apply_fn, jax.lax.stop_gradient(target_params), x_lo, t_lo,
                                          sigmas, **kw)
        target = jax.lax.stop_gradient(target)
        per_example = weighting(cfg.weighting, t_lo, t_hi) * distance(online, target)
        loss = jnp.mean(per_example)
        aux = {"mean_t": jnp.mean(t_hi), "distance": jnp.mean(distance(online, target))}
        return loss, aux

    return loss_fn


def make_edm_loss(cfg: LossConfig, apply_fn: param_lib.ApplyFn,
                  sigmas: param_lib.SigmaConfig) -> LossFn:
    """The EDM denoiser loss (EDM Eq. 2, Table 1; REFERENCE §2): ln σ ~ N(P_mean, P_std²),
    λ(σ) = (σ² + σ_d²)/(σ·σ_d)², loss = E[λ(σ)·mean((D_θ(x + σz, σ) − x)²)].

    Same signature as the consistency losses; ``target_params``, ``teacher_params`` and
    ``num_scales`` are unused.
    """

    def loss_fn(params, target_params, teacher_params, batch, rng, num_scales, distance=None):
        del target_params, teacher_params, num_scales, distance
        x0 = jnp.asarray(batch["image"], jnp.float32)
        b = x0.shape[0]
        rng_s, rng_z, rng_drop = jax.random.split(rng, 3)
        sigma = jnp.exp(cfg.edm_p_mean + cfg.edm_p_std * jax.random.normal(rng_s, (b,)))
        z = jax.random.normal(rng_z, x0.shape, jnp.float32)
        x_noisy = x0 + sigma.reshape((b,) + (1,) * (x0.ndim - 1)) * z
        denoised = param_lib.denoiser_fn(apply_fn, params, x_noisy, sigma, sigmas,
                                         labels=batch.get("label"), train=True, rng=rng_drop)
        lam = (sigma**2 + sigmas.sigma_data**2) / (sigma * sigmas.sigma_data) ** 2
        per_example = lam * l2_distance(denoised, x0)
        return jnp.mean(per_example), {"mean_t": jnp.mean(sigma), "distance": jnp.mean(per_example)}

    return loss_fn
