"""CM's continuous-time consistency distillation and training (CM Appendix B, Theorems 3–6).

As Δt → 0 with θ⁻ = θ the discrete consistency loss becomes a function of the total time derivative
of f_θ along the probability-flow ODE dx/dt = −t·s(x, t) = (x − D(x, t))/t:

    df_θ/dt = ∂f_θ/∂x · dx/dt + ∂f_θ/∂t,

one forward-mode product ``jax.jvp(f_θ, (x_t, t), (dx/dt, 1))`` (an exact derivative, no finite
differences). The teacher's denoiser D_φ gives dx/dt for CD; for CT the clean sample stands in for it
(the unbiased score −(x_t − x)/t², so dx/dt = z). t is drawn uniformly in t^{1/ρ} between ε^{1/ρ} and
T^{1/ρ}, and both the value and the tangent of f_θ use one dropout key.

Two objectives:

  - ``stopgrad=True`` (CM Thm. 6): the pseudo-objective Σ f_θ(x_t, t)·sg(G·df_θ/dt), where G is the
    Hessian of the distance in its first argument on the diagonal, G = ∂²d(a, b)/∂a² at a = b = f_θ.
    Its gradient is the limit of the discrete CD/CT gradient (θ⁻ = sg θ) divided by Δt
    (``tests/test_cm_continuous.py`` checks the first-order convergence). For l2, d(a, b) = mean((a −
    b)²) over the D dimensions and G = (2/D)·I in closed form; for pseudo-Huber and LPIPS, G·v is one
    Hessian-vector product (forward-over-reverse: ``jax.jvp`` of ``jax.grad`` of d), computed on the
    stop-gradient value. Its value is not a loss to read; the logged "dfdt_norm" is.
  - ``stopgrad=False`` (l2 only): the true objective ‖df_θ/dt‖₂ per example, differentiated through
    the jvp.

Methods ``cm_continuous_cd`` (needs an EDM teacher) and ``cm_continuous_ct``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from consistency_jax import config as config_lib
from consistency_jax import parameterization as param_lib
from consistency_jax.methods import fields as fields_lib
from consistency_jax.methods.base import Frozen, Method, MethodSpec, register

Array = jax.Array
DISTANCES = ("l2", "pseudo_huber", "lpips")  # l1's Hessian vanishes almost everywhere


def sample_time(rng: Array, batch: int, sigmas: param_lib.SigmaConfig, dtype=jnp.float32) -> Array:
    """t with t^{1/ρ} uniform on [ε^{1/ρ}, T^{1/ρ}] (the density of the Karras grid as N → ∞)."""
    lo, hi = sigmas.sigma_min ** (1.0 / sigmas.rho), sigmas.sigma_max ** (1.0 / sigmas.rho)
    return jax.random.uniform(rng, (batch,), dtype, lo, hi) ** sigmas.rho


def time_derivative(
    apply_fn: param_lib.ApplyFn,
    sigmas: param_lib.SigmaConfig,
    params: Any,
    x_t: Array,
    t: Array,
    velocity: Array,
    **kwargs: Any,
) -> tuple[Array, Array]:
    """(f_θ(x_t, t), df_θ/dt along dx/dt = ``velocity``) by one ``jax.jvp`` (CM Appendix B).

    ``kwargs`` (labels, train, rng) go to the network: one dropout key for value and tangent.
    """
    f = lambda x, tt: param_lib.consistency_fn(apply_fn, params, x, tt, sigmas, **kwargs)
    return jax.jvp(f, (x_t, t), (velocity, jnp.ones_like(t)))


def metric_hvp(distance: Callable, a: Array, v: Array) -> Array:
    """G·v with G = ∂²d(a', a)/∂a'² at a' = a, per example: forward-over-reverse (``jax.jvp`` of the
    gradient of Σ_i d(a'_i, a_i) in a'), one extra backward and forward pass of the distance."""
    a = jax.lax.stop_gradient(a)
    grad = lambda a2: jax.grad(lambda a3: jnp.sum(distance(a3, a)))(a2)
    return jax.jvp(grad, (a,), (v,))[1]


def continuous_loss(
    apply_fn: param_lib.ApplyFn,
    sigmas: param_lib.SigmaConfig,
    params: Any,
    x_t: Array,
    t: Array,
    velocity: Array,
    *,
    stopgrad: bool,
    labels: Array | None = None,
    rng: Array | None = None,
    distance: Callable | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The continuous-time objective of one batch at given noisy points (module docstring).

    Args:
      x_t, t: noisy data x0 + t·z (B, ...) and its times (B,).
      velocity: dx/dt at x_t (B, ...), put under stop_gradient here.
      stopgrad: the pseudo-objective of CM Thm. 6 (True) or the true objective ‖df/dt‖ (False).
      labels, rng: class labels and the dropout key of the network (train mode when rng is given).
      distance: d(a, b) -> (B,) for the pseudo-objective's metric G (by Hessian-vector product);
        None: l2 with its closed form G = (2/D)·I. The true objective supports l2 only.
    """
    b = x_t.shape[0]
    kwargs = dict(labels=labels, train=rng is not None, rng=rng)
    f_t, dfdt = time_derivative(
        apply_fn, sigmas, params, x_t, t, jax.lax.stop_gradient(velocity), **kwargs
    )
    flat = lambda a: a.reshape(b, -1)
    dim = math.prod(x_t.shape[1:])
    norm = jnp.sqrt(jnp.sum(flat(dfdt) ** 2, axis=-1))
    if stopgrad:
        dfdt_sg = jax.lax.stop_gradient(dfdt)
        g_dfdt = (2.0 / dim) * dfdt_sg if distance is None else metric_hvp(distance, f_t, dfdt_sg)
        per_example = jnp.sum(flat(jax.lax.stop_gradient(g_dfdt)) * flat(f_t), axis=-1)
    else:
        if distance is not None:
            raise ValueError(
                "The true continuous-time objective (stopgrad=False) is implemented for l2 only."
            )
        per_example = norm
    return jnp.mean(per_example), {
        "mean_t": jnp.mean(t),
        "dfdt_norm": jnp.mean(jax.lax.stop_gradient(norm)),
    }


@dataclasses.dataclass(frozen=True)
class ContinuousConsistency(Method):
    """CM's continuous-time CD (with ``teacher``) or CT (without), θ⁻ = θ: no target copy.

    Attributes:
      apply_fn: the raw network.
      sigmas: the noise configuration.
      stopgrad: pseudo-objective (True, CM Thm. 6) or true objective (False).
      teacher: D_φ(φ, x, t, labels) for CD (φ from ``Frozen.teacher``); None for CT.
      distance: the metric of the pseudo-objective (None: l2 in closed form); one with weights
        (LPIPS) is read from ``Frozen.distance``.
    """

    apply_fn: Callable
    sigmas: Any
    stopgrad: bool = True
    teacher: Callable | None = None
    distance: Callable | None = None

    name = "cm_continuous"

    @property
    def frozen_trees(self) -> tuple[str, ...]:
        from consistency_jax.methods.discrete import has_weights

        return (("teacher",) if self.teacher is not None else ()) + (
            ("distance",) if self.distance is not None and has_weights(self.distance) else ()
        )

    def velocity(self, frozen: Frozen, x0, z, x_t, t, labels) -> Array:
        """dx/dt = (x_t − D(x_t, t))/t: the teacher's D for CD, the clean x0 for CT (= z)."""
        if self.teacher is None:
            return z
        tb = t.reshape(t.shape + (1,) * (x_t.ndim - 1))
        return (x_t - self.teacher(frozen.teacher, x_t, t, labels)) / tb

    def loss(self, params, frozen: Frozen, batch, rng, step):
        del step
        x0 = param_lib.as_compute_dtype(batch["image"])
        labels = batch.get("label")
        b = x0.shape[0]
        rng_t, rng_z, rng_drop = jax.random.split(rng, 3)
        t = sample_time(rng_t, b, self.sigmas, x0.dtype)
        z = jax.random.normal(rng_z, x0.shape, x0.dtype)
        x_t = x0 + t.reshape((b,) + (1,) * (x0.ndim - 1)) * z
        v = self.velocity(frozen, x0, z, x_t, t, labels)
        distance = frozen.distance if frozen.distance is not None else self.distance
        return continuous_loss(
            self.apply_fn,
            self.sigmas,
            params,
            x_t,
            t,
            v,
            stopgrad=self.stopgrad,
            labels=labels,
            rng=rng_drop,
            distance=distance,
        )


def check(config) -> None:
    if config.loss.distance not in DISTANCES:
        raise ValueError(
            f"config.loss.distance={config.loss.distance!r}: the continuous-time CM "
            f"methods implement {DISTANCES} (l1's Hessian vanishes almost everywhere)."
        )
    if not config.loss.stopgrad and config.loss.distance != "l2":
        raise ValueError(
            f"config.loss.stopgrad=False (the true objective ‖df/dt‖) is implemented for "
            f"config.loss.distance='l2' only, got {config.loss.distance!r}."
        )


def _build(teacher_needed: bool):
    def build(ctx) -> ContinuousConsistency:
        l2 = ctx.config.loss.distance == "l2"  # closed-form G = (2/D)·I, no Hessian-vector product
        return ContinuousConsistency(
            apply_fn=ctx.apply_fn,
            sigmas=ctx.sigmas,
            stopgrad=bool(ctx.config.loss.stopgrad),
            teacher=ctx.teacher if teacher_needed else None,
            distance=None if l2 else ctx.distance,
        )

    return build


def fields(c) -> None:
    """``config.loss``: the distance of the pseudo-objective's metric G and ``stopgrad`` (True: the
    pseudo-objective of CM Thm. 6; False: the true objective ‖df/dt‖)."""
    fields_lib.distance_fields(c)
    fields_lib.declare(c, "loss", stopgrad=True)


def defaults(c) -> None:
    """l2 and the stop-gradient pseudo-objective (CM Thm. 6); θ⁻ = θ, no curriculum."""
    c.loss.update(distance="l2", stopgrad=True)  # the official code's continuous CT/CD defaults


def no_settings(c, args) -> None:
    """The method's defaults as they are."""


def ct_toy(c, args) -> None:
    """Like CM's CT, its continuous-time limit needs more data: 2.51× the noise floor at one step
    after 20k steps at batch 256, 1.89× after 40k at batch 512 (bench/RESULTS.md §6)."""
    c.data.batch_size = 512
    c.train.update(num_steps=40_000, eval_every=20_000)
    c.checkpoint.every = 20_000


def cd_toy(c, args) -> None:
    """The true objective ‖df/dt‖ (stopgrad=False): its gradient is normalised per example, like
    sCM's tangent normalisation. With the pseudo-objective f·sg(G·df/dt) the model stayed near the
    identity at small σ (one-step map error 0.240·σ_d); with ‖df/dt‖ 0.049·σ_d and ≤ 0.047·σ_d at
    every σ of a probe (bench/RESULTS.md §6)."""
    c.loss.stopgrad = False


def ct_cifar10(c, args) -> None:
    """CM Appendix B / Table 3 report continuous-time CD and CT with LPIPS; only l2 is implemented
    here. The schedule is the discrete runs' (RAdam 4e-4, batch 512, 800k steps, EMA 0.9999) --
    unconfirmed for the continuous variants."""
    config_lib.paper_schedule(
        c, optimizer="radam", lr=4e-4, num_steps=800_000, ema_rates=(0.9999,), warmup_steps=0
    )


def cd_cifar10(c, args) -> None:
    """As ``ct_cifar10``, with discrete CD's lr warm-up of 10M images."""
    config_lib.paper_schedule(
        c,
        optimizer="radam",
        lr=4e-4,
        num_steps=800_000,
        ema_rates=(0.9999,),
        warmup_steps=10_000_000 // c.data.batch_size,
    )


register(
    MethodSpec(
        name="cm_continuous_ct",
        summary="CM's continuous-time CT (Appendix B)",
        family="consistency",
        defaults=defaults,
        check=check,
        build=_build(False),
        fields=fields,
        presets={"toy": ct_toy, "digits": no_settings, "cifar10": ct_cifar10},
    )
)
register(
    MethodSpec(
        name="cm_continuous_cd",
        summary="CM's continuous-time CD (Appendix B)",
        family="consistency",
        defaults=defaults,
        check=check,
        build=_build(True),
        fields=fields,
        presets={"toy": cd_toy, "digits": no_settings, "cifar10": cd_cifar10},
        needs_teacher=True,
    )
)
