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

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from consistency_jax import config as config_lib
from consistency_jax import parameterization as param_lib
from consistency_jax.methods import fields as fields_lib
from consistency_jax.methods.base import Frozen, Method, MethodSpec, register

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


# ----------------------------------------------------------------------------------------------------
# The method: the network F(params, z, c_noise = t, c_noise_2 = t − r) is u_θ itself.


def average_velocity(apply_fn: param_lib.ApplyFn, params: Any, **kwargs: Any) -> AverageVelocityFn:
    """u_θ(z, r, t) = F_θ(z, t, c_noise_2 = t − r) of a network built with ``second_time=True``: the
    network sees (t, t − r) (MeanFlow Table 1c) and its output is the average velocity."""

    def u(z, r, t):
        return apply_fn(params, z, t, c_noise_2=t - r, **kwargs)

    return u


def model_consistency_fn(
    apply_fn: param_lib.ApplyFn, params: Any, x: Array, t: Array, sigmas: Any, **kwargs: Any
) -> Array:
    """The consistency function of a MeanFlow model at EDM points (x_σ, σ = ``t``), with the signature
    of ``parameterization.consistency_fn``; exact at σ_min (f(x, σ_min) = x), so every consistency
    sampler, editor and evaluation runs MeanFlow models."""
    sigma = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    f = consistency_fn_sigma(average_velocity(apply_fn, params, **kwargs), x, sigma)
    return jnp.where(_b(sigma, x) <= sigmas.sigma_min, x, f)


@dataclasses.dataclass(frozen=True)
class MeanFlow(Method):
    """MeanFlow (module docstring), θ⁻ = stopgrad θ for the guidance velocities only.

    Attributes:
      apply_fn: the raw network, built with ``second_time=True``.
      p_mean, p_std: the logit-normal law of t and r.
      fraction_distinct: the fraction of the batch with r ≠ t.
      weight_p, weight_c: the adaptive weight 1/(‖Δ‖² + c)^p.
      omega, kappa, class_dropout: guidance in training (class-conditional runs); omega = 1, kappa = 0,
        class_dropout = 0 is unguided.
      null_label: the network's "no class" label (its last), used when guiding.
    """

    apply_fn: Callable
    p_mean: float = -0.4
    p_std: float = 1.0
    fraction_distinct: float = 0.25
    weight_p: float = 1.0
    weight_c: float = 1e-3
    omega: float = 1.0
    kappa: float = 0.0
    class_dropout: float = 0.0
    null_label: int | None = None

    name = "meanflow"

    @property
    def guided(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0 or self.class_dropout > 0.0

    @property
    def frozen_trees(self) -> tuple[str, ...]:
        return ("target",) if self.guided else ()

    def loss(self, params, frozen: Frozen, batch, rng, step):
        x0 = param_lib.as_compute_dtype(batch["image"])
        labels = batch.get("label")
        rng_t, rng_e, rng_drop, rng_cls = jax.random.split(rng, 4)
        t, r = sample_times(
            rng_t, x0.shape[0], self.p_mean, self.p_std, self.fraction_distinct, x0.dtype
        )
        z, v = flow_point(x0, jax.random.normal(rng_e, x0.shape, x0.dtype), t)
        if self.guided and labels is not None:
            # ṽ from the model's own velocities u(z_t, t, t | ·) at θ⁻ = sg θ, without dropout; the
            # examples whose class is dropped keep v and see the null label.
            velocity = lambda y: average_velocity(self.apply_fn, frozen.target, labels=y)(z, t, t)
            null = jnp.full_like(labels, self.null_label)
            v_cond = velocity(labels) if self.kappa else None
            guided = guided_velocity(v, velocity(null), v_cond, self.omega, self.kappa)
            drop = jax.random.uniform(rng_cls, labels.shape) < self.class_dropout
            labels = jnp.where(drop, null, labels)
            v = jnp.where(_b(drop, v), v, guided)
        u = average_velocity(self.apply_fn, params, labels=labels, train=True, rng=rng_drop)
        return meanflow_loss(u, z, r, t, v, p=self.weight_p, c=self.weight_c)


def build(ctx) -> MeanFlow:
    m = ctx.config.meanflow
    kwargs = ctx.config.model.kwargs
    return MeanFlow(
        apply_fn=ctx.apply_fn,
        p_mean=float(m.p_mean),
        p_std=float(m.p_std),
        fraction_distinct=float(m.fraction_distinct),
        weight_p=float(m.weight_p),
        weight_c=float(m.weight_c),
        omega=float(m.omega),
        kappa=float(m.kappa),
        class_dropout=float(m.class_dropout),
        null_label=(int(kwargs.num_classes) - 1) if kwargs.get("num_classes") else None,
    )


def fields(c) -> None:
    """``config.meanflow``: the logit-normal (t, r) proposal and the fraction with r ≠ t, the adaptive
    weight 1/(‖Δ‖² + c)^p, guidance in training (ω, κ, class dropout; class-conditional runs, whose
    network has one label more than the data: the last is "no class"). Schema defaults: MeanFlow's
    ImageNet-256 choices (MeanFlow Table 1)."""
    fields_lib.declare(
        c,
        "meanflow",
        p_mean=-0.4,
        p_std=1.0,
        fraction_distinct=0.25,
        weight_p=1.0,
        weight_c=1e-3,
        omega=1.0,
        kappa=0.0,
        class_dropout=0.0,
    )


def defaults(c) -> None:
    """MeanFlow's best ablation settings (MeanFlow Table 1): lognorm(−0.4, 1.0), 25 % of r ≠ t, p = 1,
    c = 1e-3; no guidance; the network sees (t, t − r) (``model.kwargs.second_time``)."""
    c.meanflow.update(p_mean=-0.4, p_std=1.0, fraction_distinct=0.25, weight_p=1.0, weight_c=1e-3)
    c.meanflow.update(omega=1.0, kappa=0.0, class_dropout=0.0)
    c.model.kwargs.second_time = True


def check(config) -> None:
    """The ``config.meanflow`` block, and a network that takes the second time."""
    m = config.meanflow
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for name, ok, need in (
        ("p_mean", lambda v: True, "a number"),
        ("p_std", lambda v: v > 0, "> 0"),
        ("fraction_distinct", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("weight_p", lambda v: v >= 0, ">= 0 (0: no adaptive weight)"),
        ("weight_c", lambda v: v > 0, "> 0"),
        ("omega", lambda v: v >= 0, ">= 0 (1: no guidance)"),
        ("kappa", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("class_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ):
        if not number(m[name]) or not ok(m[name]):
            raise ValueError(f"config.meanflow.{name} must be {need}, got {m[name]!r}.")
    if not config.model.kwargs.get("second_time", False):
        raise ValueError(
            "method=meanflow needs a network that sees (t, t − r): set "
            "config.model.kwargs.second_time=True."
        )
    guided = m.omega != 1.0 or m.kappa != 0.0 or m.class_dropout > 0.0
    if guided and not (config.data.use_labels and config.model.kwargs.get("num_classes")):
        raise ValueError(
            "config.meanflow.omega / kappa / class_dropout guide a class-conditional run: set "
            "config.data.use_labels=True and config.model.kwargs.num_classes to the number of "
            "classes + 1 (the last label is 'no class')."
        )
    if guided and not m.class_dropout > 0:
        raise ValueError(
            "Guidance in training (config.meanflow.omega != 1 or kappa != 0) needs the unconditional "
            "model: set config.meanflow.class_dropout > 0 (MeanFlow uses 0.1)."
        )


def network_kind(config) -> str:
    return "a flow-map network u(z, r, t) seeing (t, t − r)"


def toy(c, args) -> None:
    """From scratch on the 2-D toy: 40k steps at batch 512, as CM's CT needed to reach 2× the noise
    floor at one step. One-step sampling needs the large-gap average velocities (MeanFlow §4.3):
    a wider logit-normal (std 1.6) gives them (with the paper's std 1.0 the one-step sliced W2
    stayed at 2.3× the floor); half the batch with r ≠ t then helps two-step sampling
    (bench/RESULTS.md §12, §14)."""
    c.meanflow.update(fraction_distinct=0.5, p_std=1.6)
    c.data.batch_size = 512
    c.train.update(num_steps=40_000, eval_every=20_000)
    c.checkpoint.every = 20_000


def digits(c, args) -> None:
    """The digits budget of iCT / sCT / ECT (3000 steps at batch 64); MeanFlow's defaults."""


def cifar10(c, args) -> None:
    """MeanFlow on unconditional CIFAR-10 (its 1-NFE FID 2.92 U-Net run). Unconfirmed beyond the
    defaults (which are MeanFlow's ImageNet ablation values): the NCSN++ network of method=edm with
    positional embeddings (MeanFlow uses a U-Net of its own), batch 1024, Adam 6e-4, dropout 0.2, eval
    EMA 0.99995, 800k steps; the (t, r) law and r ≠ t fraction of its CIFAR-10 run."""
    c.model.kwargs = dict(
        config_lib.ncsnpp_cifar10(dropout=0.2), embedding_type="positional", second_time=True
    )
    c.data.batch_size = 1024
    config_lib.paper_schedule(c, optimizer="adam", lr=6e-4, num_steps=800_000, ema_rates=(0.99995,))


def imagenet64(c, args) -> None:
    """MeanFlow reports no ImageNet-64 run: everything here is unconfirmed — its ImageNet-256 (latent)
    defaults on the class-conditional ADM network of CM's ImageNet-64 runs, with guidance in training
    ω = 2.0 and class dropout 0.1 (its 1-NFE FID 3.43 setting at 256 used ω with κ), Adam 1e-4,
    batch 256, 1.2M steps."""
    c.model.kwargs = dict(
        config_lib.adm_imagenet64(dropout=0.0), second_time=True, num_classes=1001
    )
    c.data.batch_size = 256
    c.meanflow.update(omega=2.0, class_dropout=0.1)
    config_lib.paper_schedule(
        c, optimizer="adam", lr=1e-4, num_steps=1_200_000, ema_rates=(0.9999,)
    )


register(
    MethodSpec(
        name="meanflow",
        summary="MeanFlow: average-velocity flow maps (Geng et al. 2025)",
        family="consistency",
        defaults=defaults,
        check=check,
        build=build,
        fields=fields,
        presets={"toy": toy, "digits": digits, "cifar10": cifar10, "imagenet64": imagenet64},
        uses_distance=False,
        consistency_fn=model_consistency_fn,
        network_kind=network_kind,
    )
)
