"""sCM: continuous-time consistency training and distillation in TrigFlow (Lu & Song 2024), as the
methods ``sct`` and ``scd``.

With θ⁻ = stopgrad θ and F⁻ = F_θ⁻(x_t/σ_d, t), the gradient of the continuous-time consistency
objective is that of (sCM Eq. 7–8, Algorithm 1)

    L(θ, φ) = E_t[ exp(w_φ(t))/D · ‖F_θ(x_t/σ_d, t) − F⁻ − g‖² − w_φ(t) ],

with the tangent g = cos t·df_θ⁻/dt written through the network's time derivative,

    g = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + σ_d·dF⁻/dt),

where

  - x_t = cos t·x_0 + sin t·z, z ~ N(0, σ_d² I), and t = arctan(e^τ/σ_d) with τ ~ N(P_mean, P_std²)
    (the lognormal proposal; e^τ is the EDM noise level, clipped to [σ_min, σ_max]);
  - dx_t/dt is cos t·z − sin t·x_0 for sCT, and the teacher's σ_d·F_teacher(x_t/σ_d, t) for sCD (an
    EDM denoiser converted exactly to TrigFlow by ``trigflow.edm_velocity``);
  - cos t·sin t·dF⁻/dt is ONE ``jax.jvp`` through the network with the tangents
    (cos t·sin t·dx_t/dt, cos t·sin t) for (x_t, t) — the "JVP rearrangement" of sCM §4.2, which keeps
    the product well scaled in low precision — with the same dropout key as the value of F_θ;
  - r = min(1, step / warmup) is the tangent warm-up (sCM §4.2); g is normalised per example,
    g ← g/(‖g‖₂ + c) with c = 0.1 (tangent normalisation, sCM §4.2);
  - w_φ(t) is the learned log-variance head (``networks.logvar.WithLogVar``, ``config.model.logvar_head``),
    trained jointly with θ (adaptive weighting, sCM §4.2).

The network sees the angle t, or, for an EDM network (``sigmas.trigflow_time="edm"``: an EDM run's
parameters are then exactly the same TrigFlow model, so sCD's student can start as its teacher through
``config.init``), c_noise(σ_d·tan t) with F_θ = −F_net (``trigflow.network_time``, ``trigflow.raw_output``).

Forward-mode through attention: the library's attention is written with ``jnp.einsum`` and
``jax.nn.softmax`` (no fused kernel with a custom VJP), which JAX differentiates forward-mode exactly.

The trained model's consistency function is ``trigflow.consistency_fn`` (sCM Eq. 6); the method plug-ins
give samplers its EDM-unit form ``trigflow.consistency_fn_sigma``.
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
from consistency_jax import trigflow
from consistency_jax.methods import fields as fields_lib
from consistency_jax.methods.base import Frozen, Method, MethodSpec, NetworkAddition, register

Array = jax.Array


def sample_time(
    rng: Array,
    batch: int,
    p_mean: float,
    p_std: float,
    sigmas: param_lib.SigmaConfig,
    dtype=jnp.float32,
) -> Array:
    """The angles t = arctan(σ/σ_d) with ln σ ~ N(p_mean, p_std²), σ clipped to [σ_min, σ_max]."""
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch,), dtype))
    sigma = jnp.clip(sigma, sigmas.sigma_min, sigmas.sigma_max)
    return trigflow.t_from_sigma(sigma, sigmas.sigma_data)


def tangent_warmup(step: Array, warmup_steps: int) -> Array:
    """r = min(1, step / warmup_steps) (1 when warmup_steps = 0)."""
    if warmup_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def tangent(
    apply_fn: param_lib.ApplyFn,
    sigmas: param_lib.SigmaConfig,
    target_params: Any,
    x_t: Array,
    t: Array,
    velocity: Array,
    r: Array,
    **kwargs: Any,
) -> tuple[Array, Array]:
    """(F⁻, g): the target network's output and the unnormalised tangent g (module docstring).

    g equals cos t·df_θ⁻/dt along dx_t/dt = ``velocity`` when r = 1. ``kwargs`` (labels, train, rng)
    go to the network: pass the dropout key of the online pass.
    """
    tb = param_lib.broadcast_times(t, x_t)
    cos, sin = jnp.cos(tb), jnp.sin(tb)
    cs = cos * sin
    sd = sigmas.sigma_data
    fn = lambda x, tt: trigflow.raw_output(apply_fn, target_params, x, tt, sigmas, **kwargs)
    f_minus, cs_dfdt = jax.jvp(fn, (x_t, t), (cs * velocity, cs.reshape(t.shape)))
    g = -cos * cos * (sd * f_minus - velocity) - r * (cs * x_t + sd * cs_dfdt)
    return f_minus, g


def per_example_norm(a: Array) -> Array:
    """‖a_i‖₂ over all but the first axis, shaped to broadcast against a."""
    return jnp.sqrt(jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=-1)).reshape(
        (a.shape[0],) + (1,) * (a.ndim - 1)
    )


def scm_loss(
    apply_fn: param_lib.ApplyFn,
    logvar_fn: Callable | None,
    sigmas: param_lib.SigmaConfig,
    params: Any,
    target_params: Any,
    x_t: Array,
    t: Array,
    velocity: Array,
    r: Array,
    *,
    tangent_c: float,
    labels: Array | None = None,
    rng: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The sCM objective of one batch at given TrigFlow points (module docstring).

    Args:
      apply_fn: the raw network (with the log-variance head when ``logvar_fn`` is given).
      logvar_fn: (params, c_noise) -> w_φ (B,), or None for unit weighting (w ≡ 0).
      sigmas: σ_d and the network's time convention.
      params: θ (and φ), differentiated.
      target_params: θ⁻ = stopgrad θ.
      x_t, t: TrigFlow points (B, ...) and angles (B,).
      velocity: dx_t/dt at x_t (put under stop_gradient here).
      r: the tangent warm-up factor.
      tangent_c: c of the tangent normalisation g/(‖g‖ + c).
      labels, rng: class labels and the dropout key (train mode when rng is given), shared by both
        passes.
    """
    kwargs = dict(labels=labels, train=rng is not None, rng=rng)
    velocity = jax.lax.stop_gradient(velocity)
    f_minus, g = tangent(
        apply_fn, sigmas, jax.lax.stop_gradient(target_params), x_t, t, velocity, r, **kwargs
    )
    g_norm = per_example_norm(g)
    g = jax.lax.stop_gradient(g / (g_norm + tangent_c))
    f_minus = jax.lax.stop_gradient(f_minus)
    out = trigflow.raw_output(apply_fn, params, x_t, t, sigmas, **kwargs)
    dim = math.prod(x_t.shape[1:])
    sq = jnp.sum((out - f_minus - g).reshape(x_t.shape[0], -1) ** 2, axis=-1)
    if logvar_fn is None:
        w = jnp.zeros_like(t)
    else:
        w = logvar_fn(params, trigflow.network_time(t, sigmas)).astype(sq.dtype)
    per_example = jnp.exp(w) / dim * sq - w
    return jnp.mean(per_example), {
        "mean_t": jnp.mean(t),
        "tangent_norm": jnp.mean(g_norm),
        "logvar": jnp.mean(w),
        "mse": jnp.mean(sq) / dim,
    }


@dataclasses.dataclass(frozen=True)
class SCM(Method):
    """sCT (no teacher) or sCD (with ``teacher``), θ⁻ = stopgrad θ: no target copy is kept.

    Attributes:
      apply_fn: the raw network.
      logvar_fn: the adaptive weighting head w_φ, or None.
      sigmas: σ_d, the clipping range of the proposal, the network's time convention.
      p_mean, p_std: the lognormal proposal of the noise level (sCM §4.3).
      warmup_steps: the tangent warm-up length.
      tangent_c: c of the tangent normalisation.
      teacher: D_φ(φ, x_σ, σ, labels), an EDM denoiser (converted to TrigFlow); None for sCT.
    """

    apply_fn: Callable
    logvar_fn: Callable | None
    sigmas: Any
    p_mean: float = -1.0
    p_std: float = 1.4
    warmup_steps: int = 10_000
    tangent_c: float = 0.1
    teacher: Callable | None = None

    name = "scm"

    @property
    def frozen_trees(self) -> tuple[str, ...]:
        return ("target",) + (("teacher",) if self.teacher is not None else ())

    def schedule(self, step: Array) -> dict[str, Array]:
        return {"tangent_warmup": tangent_warmup(step, self.warmup_steps)}

    def velocity(self, frozen: Frozen, x0, z, x_t, t, labels) -> Array:
        """dx_t/dt: cos t·z − sin t·x_0 (sCT) or the converted teacher's velocity (sCD)."""
        if self.teacher is None:
            tb = param_lib.broadcast_times(t, x0)
            return jnp.cos(tb) * z - jnp.sin(tb) * x0
        return trigflow.edm_velocity(self.teacher, self.sigmas.sigma_data)(
            frozen.teacher, x_t, t, labels
        )

    def loss(self, params, frozen: Frozen, batch, rng, step):
        x0 = param_lib.as_compute_dtype(batch["image"])
        labels = batch.get("label")
        b = x0.shape[0]
        rng_t, rng_z, rng_drop = jax.random.split(rng, 3)
        t = sample_time(rng_t, b, self.p_mean, self.p_std, self.sigmas, x0.dtype)
        z = self.sigmas.sigma_data * jax.random.normal(rng_z, x0.shape, x0.dtype)
        tb = param_lib.broadcast_times(t, x0)
        x_t = jnp.cos(tb) * x0 + jnp.sin(tb) * z
        v = self.velocity(frozen, x0, z, x_t, t, labels)
        return scm_loss(
            self.apply_fn,
            self.logvar_fn,
            self.sigmas,
            params,
            frozen.target,
            x_t,
            t,
            v,
            tangent_warmup(step, self.warmup_steps),
            tangent_c=self.tangent_c,
            labels=labels,
            rng=rng_drop,
        )


def check(config) -> None:
    """sCM's fields: the proposal, the warm-up, the normalisation constant, the weighting head."""
    lc = config.loss
    if not lc.p_std > 0:
        raise ValueError(f"config.loss.p_std must be positive, got {lc.p_std}.")
    if not isinstance(lc.tangent_warmup, int) or lc.tangent_warmup < 0:
        raise ValueError(
            f"config.loss.tangent_warmup must be an integer >= 0, got {lc.tangent_warmup!r}."
        )
    if not lc.tangent_c > 0:
        raise ValueError(f"config.loss.tangent_c must be positive, got {lc.tangent_c}.")
    if not config.model.logvar_head:
        raise ValueError(
            "method=sct/scd train the adaptive weighting w_φ(t) jointly: set "
            "config.model.logvar_head=True (the method's default)."
        )


def _build(with_teacher: bool):
    def build(ctx) -> SCM:
        from consistency_jax import networks
        from consistency_jax.networks.logvar import make_logvar_fn

        lc = ctx.config.loss
        module = LOGVAR_HEAD.wrap(networks.from_config(ctx.config.model))
        return SCM(
            apply_fn=ctx.apply_fn,
            logvar_fn=make_logvar_fn(module),
            sigmas=ctx.sigmas,
            p_mean=float(lc.p_mean),
            p_std=float(lc.p_std),
            warmup_steps=int(lc.tangent_warmup),
            tangent_c=float(lc.tangent_c),
            teacher=ctx.teacher if with_teacher else None,
        )

    return build


def fields(c) -> None:
    """sCM's fields: the lognormal proposal (``config.loss.p_mean/p_std``), the tangent warm-up
    r = min(1, step / tangent_warmup) and normalisation g / (‖g‖ + tangent_c) (sCM §4.2), the weighting
    head (``config.model.logvar_head``) and how the network sees its time (``sigmas.trigflow_time``:
    "angle", sCM; "edm": c_noise(σ_d·tan t), output −F, so that an EDM run is an exact start through
    ``config.init``)."""
    fields_lib.lognormal_fields(c)
    fields_lib.declare(c, "loss", tangent_warmup=10_000, tangent_c=0.1)
    fields_lib.declare(c, "model", logvar_head=False)
    fields_lib.declare(c, "sigmas", trigflow_time="angle")


def defaults(c) -> None:
    """sCM's CIFAR-10 choices: (P_mean, P_std) = (−1.0, 1.4), 10k warm-up steps, c = 0.1, the
    weighting head; no curriculum, no target EMA."""
    c.loss.update(p_mean=-1.0, p_std=1.4, tangent_warmup=10_000, tangent_c=0.1)
    c.model.logvar_head = True


def network_kind(config) -> str:
    """A TrigFlow network seeing the angle t, or an EDM network (``sigmas.trigflow_time="edm"``: an EDM
    run's parameters are then exactly the same TrigFlow model, ``trigflow`` module docstring)."""
    if config.sigmas.get("trigflow_time", "angle") == "edm":
        return "an EDM network"
    return "a TrigFlow network seeing the angle t (sigmas.trigflow_time=angle)"


def wrap_logvar_head(net):
    from consistency_jax.networks.logvar import WithLogVar

    return WithLogVar(net=net)


# sCM's adaptive weighting w_φ(t), trained jointly with θ (sCM §4.2); a config.init source without it
# gives the "net" part, the head starts fresh (w_φ ≡ 0).
LOGVAR_HEAD = NetworkAddition(field="logvar_head", wrap=wrap_logvar_head, inner="net")


def sct_toy(c, args) -> None:
    """From scratch the tangent warm-up must be long: with r < 1 the objective is mostly flow
    matching, and F first learns the (teacher's) velocity. With a 2k warm-up of 20k steps sCD's F never
    learned it at small t (f ≈ identity for σ ≤ 0.2, one-step map error 0.30·σ_d); half the run as
    warm-up, 40k steps and lr 5e-4 give 0.050·σ_d, and sCT's one-step sw2 0.76× the floor instead of
    1.81× (bench/RESULTS.md §6)."""
    c.train.update(num_steps=40_000, eval_every=20_000)
    c.checkpoint.every = 20_000
    c.optim.lr = 5e-4
    c.loss.tangent_warmup = 20_000


def scd_toy(c, args) -> None:
    """sCT's toy settings at batch 512: the one-step map error over seeds 0 / 1 was 0.049 / 0.041·σ_d,
    against 0.050 / 0.056 at batch 256 (bench/RESULTS.md §6)."""
    sct_toy(c, args)
    c.data.batch_size = 512


def sct_digits(c, args) -> None:
    """sCM's defaults (P_mean −1.0, P_std 1.4, c = 0.1, the weighting head). sCM's 10k warm-up is for
    fine-tuning a diffusion model; from scratch half the run (1500 of 3000 steps) gave digits-FD 26.9 /
    24.1 (sCT) and 30.5 / 26.3 (sCD) against 30.4 / 27.3 and 31.1 / 28.2 with 500 (bench/RESULTS.md
    §6)."""
    c.loss.tangent_warmup = 1500


def scd_digits(c, args) -> None:
    """The student is an EDM network (sigmas.trigflow_time = "edm"), so that it can start as its
    teacher, as sCM fine-tunes a diffusion model: with --config.init.workdir=runs/digits_edm (the
    teacher run) and a fine-tuning lr of 2e-4, 3000 steps gave digits-FD 18.0 / 16.2 and 19.4 / 17.7
    (seeds 0, 1: 1.14x and 1.24x the teacher's 14.28 at two steps; lr 1e-3: 1.23x, 1.33x) against
    30.5 / 26.3 from scratch (bench/RESULTS.md §6)."""
    sct_digits(c, args)
    c.sigmas.trigflow_time = "edm"
    c.optim.lr = 2e-4


def cifar10(c, args) -> None:
    """sCM on CIFAR-10: TrigFlow with σ_d = 0.5, (P_mean, P_std) = (−1.0, 1.4), tangent normalisation
    c = 0.1, 10k warm-up steps, the adaptive weighting head (the defaults), positional time embedding
    (sCM §4.1), 2-step intermediate angle 1.1, i.e. σ = 0.5·tan(1.1). Unconfirmed: batch 512, Adam 1e-4
    with β2 = 0.99, dropout 0.2, eval EMA 0.9999 (sCM uses power-function EMAs), 400k steps; sCM's
    network is a DDPM++-type network with its own changes, here the NCSN++ of method=edm with
    positional embeddings."""
    c.model.kwargs = dict(config_lib.ncsnpp_cifar10(dropout=0.2), embedding_type="positional")
    config_lib.paper_schedule(c, optimizer="adam", lr=1e-4, num_steps=400_000, ema_rates=(0.9999,))
    c.optim.b2 = 0.99
    c.eval.two_step_time = 0.5 * math.tan(1.1)


def imagenet64(c, args) -> None:
    """sCM: TrigFlow, the weighting head, c = 0.1, 10k warm-up, the ADM UNet with RMS-normalised AdaGN
    scale/shift (sCM §4.1) and time input 1000·t (sigmas.c_noise = "cm"); 2-step intermediate angle
    1.1. Unconfirmed: (P_mean, P_std) = (−0.8, 1.6) (sCM's value for its large ImageNet models), Adam
    1e-4 with β2 = 0.99, batch 2048, dropout 0.1, 400k steps, the EMA rates (sCM uses power-function
    EMAs); sCM's ImageNet networks are EDM2-style, not ADM."""
    c.model.kwargs = dict(config_lib.adm_imagenet64(dropout=0.1), normalize_scale_shift=True)
    c.loss.update(p_mean=-0.8, p_std=1.6)
    config_lib.paper_schedule(
        c, optimizer="adam", lr=1e-4, num_steps=400_000, ema_rates=config_lib.CM_IMAGENET64_EMAS
    )
    c.optim.b2 = 0.99
    c.eval.two_step_time = 0.5 * math.tan(1.1)


_COMMON = dict(
    family="consistency",
    defaults=defaults,
    check=check,
    fields=fields,
    uses_distance=False,
    consistency_fn=trigflow.consistency_fn_sigma,
    network_kind=network_kind,
    network_addition=LOGVAR_HEAD,
)
register(
    MethodSpec(
        name="sct",
        summary="sCM consistency training in TrigFlow (Lu & Song 2024)",
        build=_build(False),
        presets={
            "toy": sct_toy,
            "digits": sct_digits,
            "cifar10": cifar10,
            "imagenet64": imagenet64,
        },
        **_COMMON,
    )
)
register(
    MethodSpec(
        name="scd",
        summary="sCM consistency distillation from an EDM teacher",
        build=_build(True),
        presets={
            "toy": scd_toy,
            "digits": scd_digits,
            "cifar10": cifar10,
            "imagenet64": imagenet64,
        },
        needs_teacher=True,
        **_COMMON,
    )
)
