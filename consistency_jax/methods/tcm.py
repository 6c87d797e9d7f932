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

As a method of this library (``method=tcm``): ``config.init.workdir`` names the stage-1 run. θ_s
starts from its eval EMA (``config.init``, as every run that starts from another), and f_1 is that
same EMA, frozen (the ``teacher`` tree, ``MethodSpec.teacher``). The stage-1 run may be any
consistency run whose models are CM's f_θ on an EDM network (ect, ict, ct, cd, cm_continuous_*);
TrigFlow (sct, scd) and MeanFlow models have another consistency function and are refused. The
Δt schedule continues ECT's stages where stage 1 ended (``tcm.start_stage``; the official code
resumes the stage-1 counter) with Δt/t floored at 1 − ``tcm.ratio_limit``. A TCM run's model, for
its evaluation and the sampling command, is the combined one: its ``consistency_fn`` reads
{"student": θ_s, "stage1": θ_1, "t_prime": t′} (``model_params``), evaluating only f_s (or f_1)
when every example of a call is at or above (below) t′. The stage-1 run must stay readable where
``config.init.workdir`` says for a TCM run to be resumed or sampled.

Config: the ``config.tcm`` block, checked by ``check``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from consistency_jax import config as config_lib
from consistency_jax import losses
from consistency_jax import parameterization as param_lib
from consistency_jax.methods import fields as fields_lib
from consistency_jax.methods.base import Frozen, Method, MethodSpec, TeacherSource, register

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


# ---------------------------------------------------------------------------------------------------
# The method of the library


def tcm_gap_scale(step: Array, *, q: float, stage_steps: int, start_stage: int, ratio_limit: float):
    """Δt/t before the sigmoid factor at optimizer step ``step``: q^{−(s+1)} at stage
    s = start_stage + ⌊step / stage_steps⌋, floored at 1 − ratio_limit (the official code caps the
    ratio r/t ≈ 1 − q^{−(s+1)} at ``ratio_limit``)."""
    s = jnp.asarray(step, jnp.int32) // stage_steps + start_stage
    return jnp.maximum(
        jnp.float32(q) ** (-(s.astype(jnp.float32) + 1.0)), jnp.float32(1.0 - ratio_limit)
    )


def tcm_pairs(
    rng: Array,
    batch: int,
    step: Array,
    *,
    table: np.ndarray,
    t_prime: float,
    q: float,
    k: float,
    b: float,
    stage_steps: int,
    start_stage: int,
    ratio_limit: float,
    boundary_fraction: float,
    sigma_min: float,
    dtype=jnp.float32,
) -> tuple[Array, Array, Array]:
    """(t, r, boundary) of stage 2 at optimizer step ``step``: ln t from the truncated Student-t law
    of ``table`` (``truncated_student_t_table`` on [ln t′, ln T]), the first ``boundary_mask`` rows at
    t = t′ exactly; r = t − Δt with ECT's sigmoid gap Δt = t·scale·(1 + k·sigmoid(−b·t)) (scale:
    ``tcm_gap_scale``), set to 0 below σ_min (the target is then x_0)."""
    t = jnp.exp(sample_from_table(rng, batch, np.asarray(table), dtype))
    boundary = boundary_mask(batch, boundary_fraction)
    t = jnp.where(boundary, jnp.asarray(t_prime, dtype), t)
    scale = tcm_gap_scale(
        step, q=q, stage_steps=stage_steps, start_stage=start_stage, ratio_limit=ratio_limit
    ).astype(dtype)
    r = t - t * scale * (1.0 + k * jax.nn.sigmoid(-b * t))
    return t, jnp.where(r < sigma_min, jnp.zeros_like(r), r), boundary


@dataclasses.dataclass(frozen=True)
class TruncatedConsistency(Method):
    """TCM's stage 2 (module docstring): θ⁻ = stopgrad θ_s (no target copy, as ECT), the frozen
    stage-1 θ_1 as the ``teacher`` tree.

    Attributes:
      apply_fn, sigmas: the raw network (student and stage-1 model alike) and the noise config.
      table: the inverse CDF of ln t (``truncated_student_t_table``), a tuple of floats.
      t_prime: t′, the truncation time.
      q, k, b, stage_steps, start_stage, ratio_limit: the gap Δt (``tcm_pairs``).
      boundary_fraction, boundary_weight: the rows at t = t′ and their loss's weight w_b.
      huber_c: c of the pseudo-Huber distance (0: the l2 norm).
    """

    apply_fn: Callable
    sigmas: Any
    table: tuple[float, ...]
    t_prime: float = 1.0
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    stage_steps: int = 25_000
    start_stage: int = 10
    ratio_limit: float = 0.999
    boundary_fraction: float = 0.25
    boundary_weight: float = 0.1
    huber_c: float = 0.0

    name = "tcm"
    frozen_trees = ("target", "teacher")  # θ⁻ = stopgrad θ_s; the teacher is θ_1

    def schedule(self, step: Array) -> dict[str, Array]:
        """The stage s and Δt/t before the sigmoid factor (``tcm_gap_scale``)."""
        kw = dict(q=self.q, stage_steps=self.stage_steps, start_stage=self.start_stage)
        s = jnp.asarray(step, jnp.int32) // self.stage_steps + self.start_stage
        return {"stage": s, "dt_scale": tcm_gap_scale(step, ratio_limit=self.ratio_limit, **kw)}

    def loss(self, params, frozen: Frozen, batch, rng, step):
        x0 = param_lib.as_compute_dtype(batch["image"])
        rng_t, rng_z, rng_drop = jax.random.split(rng, 3)
        t, r, boundary = tcm_pairs(
            rng_t,
            x0.shape[0],
            step,
            table=np.asarray(self.table),
            t_prime=self.t_prime,
            q=self.q,
            k=self.k,
            b=self.b,
            stage_steps=self.stage_steps,
            start_stage=self.start_stage,
            ratio_limit=self.ratio_limit,
            boundary_fraction=self.boundary_fraction,
            sigma_min=self.sigmas.sigma_min,
            dtype=x0.dtype,
        )
        z = jax.random.normal(rng_z, x0.shape, x0.dtype)
        # One dropout key for the student, its target and the stage-1 model (as ECT's two calls).
        kw = dict(labels=batch.get("label"), train=True, rng=rng_drop)
        f = lambda p, x, sigma: param_lib.consistency_fn(
            self.apply_fn, p, x, sigma, self.sigmas, **kw
        )
        return tcm_loss(
            f,
            params,
            frozen.target,
            frozen.teacher,
            x0,
            z,
            t,
            r,
            boundary,
            t_prime=self.t_prime,
            boundary_weight=self.boundary_weight,
            huber_c=self.huber_c,
            sigma_min=self.sigmas.sigma_min,
        )


def model_consistency_fn(apply_fn, params, x, t, sigmas, **kw):
    """The combined model's consistency function (TCM Eq. 8) with the signature of
    ``parameterization.consistency_fn`` (t: the EDM noise level σ); ``params`` is ``model_params``'
    {"student", "stage1", "t_prime"}. When every example of the call is at or above t′ (below t′)
    only f_s (f_1) runs."""
    f = lambda p: param_lib.consistency_fn(apply_fn, p, x, t, sigmas, **kw)
    t_prime = params["t_prime"]
    s = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    above = s >= t_prime
    both = lambda: combined(f(params["student"]), f(params["stage1"]), s, t_prime)
    mixed = lambda: jax.lax.cond(jnp.any(above), both, lambda: f(params["stage1"]))
    return jax.lax.cond(jnp.all(above), lambda: f(params["student"]), mixed)


def model_params(config, params, stage1) -> dict:
    """The combined model's parameters (``model_consistency_fn``): θ_s, the frozen θ_1, t′."""
    return {"student": params, "stage1": stage1, "t_prime": np.float32(config.tcm.t_prime)}


def _accepts(spec) -> str | None:
    """Stage-1 runs: consistency models whose consistency function is CM's f_θ (EDM networks)."""
    if spec.family != "consistency":
        return "stage 1 must be a consistency model (ect, ict, ct, cd, ...), not a denoiser."
    if spec.consistency_fn is not param_lib.consistency_fn or spec.model_params is not None:
        return (
            "its models are not CM's f_θ on an EDM network (TrigFlow, MeanFlow and TCM models "
            "have another consistency function); train stage 1 with ect, ict, ct or cd."
        )
    return None


def build(ctx) -> TruncatedConsistency:
    m, sig = ctx.config.tcm, ctx.sigmas
    table = truncated_student_t_table(
        float(m.t_loc),
        float(m.t_scale),
        float(m.t_df),
        float(np.log(m.t_prime)),
        float(np.log(sig.sigma_max)),
    )
    return TruncatedConsistency(
        apply_fn=ctx.apply_fn,
        sigmas=sig,
        table=tuple(float(v) for v in table),
        t_prime=float(m.t_prime),
        q=float(m.q),
        k=float(m.k),
        b=float(m.b),
        stage_steps=int(m.stage_steps),
        start_stage=int(m.start_stage),
        ratio_limit=float(m.ratio_limit),
        boundary_fraction=float(m.boundary_fraction),
        boundary_weight=float(m.boundary_weight),
        huber_c=float(m.huber_c),
    )


def check(config) -> None:
    """The ``config.tcm`` block; t′ inside (σ_min, σ_max); the stage-1 run in config.init.workdir
    (config.teacher.workdir is not read)."""
    m = config.tcm
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for name, ok, need in (
        ("t_prime", lambda v: v > 0, "> 0"),
        ("q", lambda v: v > 1, "> 1"),
        ("k", lambda v: v >= 0, ">= 0"),
        ("b", lambda v: v >= 0, ">= 0"),
        ("ratio_limit", lambda v: 0 < v < 1, "in (0, 1)"),
        ("t_loc", lambda v: True, "a number"),
        ("t_scale", lambda v: v > 0, "> 0"),
        ("t_df", lambda v: v > 0, "> 0"),
        ("boundary_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("boundary_weight", lambda v: v >= 0, ">= 0"),
        ("huber_c", lambda v: v >= 0, ">= 0 (0: the l2 norm)"),
    ):
        if not number(m[name]) or not ok(m[name]):
            raise ValueError(f"config.tcm.{name} must be {need}, got {m[name]!r}.")
    for name, low in (("stage_steps", 1), ("start_stage", 0)):
        v = m[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"config.tcm.{name} must be an integer >= {low}, got {v!r}.")
    lo, hi = config.sigmas.sigma_min, config.sigmas.sigma_max
    if not lo < m.t_prime < hi:
        raise ValueError(
            f"config.tcm.t_prime={m.t_prime} must lie inside (sigma_min, sigma_max) = ({lo}, {hi})."
        )
    if config.teacher.workdir:
        raise ValueError(
            f"config.teacher.workdir={config.teacher.workdir!r} is not read by method='tcm': its "
            "frozen stage-1 model is config.init.workdir's (the run θ_s starts from); clear it."
        )
    if not config.init.workdir:
        raise ValueError(
            "method='tcm' is the second stage of a consistency run: set config.init.workdir to the "
            "stage-1 run (θ_s starts from its EMA; f_1 below t′ is that EMA, frozen)."
        )


def fields(c) -> None:
    """``config.tcm``: t′; the truncated Student-t law of ln t on [ln t′, ln T] (loc, scale, df);
    the boundary rows at t = t′ and their weight; ECT's gap Δt (q, k, b, a stage every stage_steps
    from start_stage, Δt/t ≥ 1 − ratio_limit); pseudo-Huber c. Schema defaults: TCM's CIFAR-10
    stage 2 (the official command)."""
    fields_lib.declare(
        c,
        "tcm",
        t_prime=1.0,
        t_loc=0.0,
        t_scale=0.2,
        t_df=0.01,
        boundary_fraction=0.25,
        boundary_weight=0.1,
        q=2.0,
        k=8.0,
        b=1.0,
        stage_steps=25_000,
        start_stage=10,  # where stage 1 ended; with q = 2 the ratio cap binds from stage 9 on
        ratio_limit=0.999,
        huber_c=0.0,
    )


def defaults(c) -> None:
    """TCM's CIFAR-10 stage-2 values (the official command): t′ = 1, ln t ~ Student-t(loc 0, scale
    0.2, df 0.01) truncated to [0, ln T], 25 % of the batch at t′ with w_b = 0.1, q = 2 with the ratio
    capped at 0.999 (start_stage 10: stage 1's counter continues), c = 0 (the official 1e-8 is the
    l2 norm in float32)."""
    c.tcm.update(t_prime=1.0, t_loc=0.0, t_scale=0.2, t_df=0.01)
    c.tcm.update(boundary_fraction=0.25, boundary_weight=0.1, huber_c=0.0)
    c.tcm.update(q=2.0, k=8.0, b=1.0, stage_steps=25_000, start_stage=10, ratio_limit=0.999)


def toy(c, args) -> None:
    """Stage 2 of the toy's ECT run (configs/toy.py:method=ect: 20k steps, a stage every 2.5k, so it
    ends in stage 7): 10k steps continuing from stage 8, at a tenth of stage 1's peak learning rate
    (1e-4, cosine decay). Half of it (TCM halves ECT's on CIFAR-10) overshot on the toy: stage 1's lr
    had decayed to ~0, and 5e-4 left the 1-step model worse than stage 1's (bench/RESULTS.md §13)."""
    c.tcm.update(stage_steps=2500, start_stage=8)
    c.optim.update(lr=1e-4, warmup_steps=0)
    c.train.update(num_steps=10_000, eval_every=5000)
    c.checkpoint.every = 5000


def digits(c, args) -> None:
    """Stage 2 of the digits ECT run (configs/digits.py:method=ect: 3000 steps, a stage every 500,
    ending in stage 5): 1500 steps from stage 6, at a tenth of its learning rate (2e-5, cosine decay;
    the toy's choice, not tuned on the digits)."""
    c.tcm.update(stage_steps=500, start_stage=6)
    c.optim.update(lr=2e-5, warmup_steps=0)
    c.train.update(num_steps=1500, eval_every=750)


def cifar10(c, args) -> None:
    """TCM's CIFAR-10 stage 2 (the official command): batch 1024, RAdam 5e-5, dropout 0.2, EMA
    0.9999, the defaults above. Differences and unconfirmed values: the official stage 1 is ECT from
    EDM's DDPM++; here the network is method=edm's NCSN++ (so that the ECT preset's runs chain);
    400k steps (the official command's duration is a bound, not the run reported: unconfirmed);
    constant lr, no warm-up; the 2-step time is the library's eval.two_step_time."""
    c.model.kwargs = config_lib.ncsnpp_cifar10(dropout=0.2)
    c.data.batch_size = 1024
    config_lib.paper_schedule(c, optimizer="radam", lr=5e-5, num_steps=400_000, ema_rates=(0.9999,))


def imagenet64(c, args) -> None:
    """TCM's ImageNet-64 stage 2 as far as it carries over: q = 4 with the ratio capped at 0.9961,
    pseudo-Huber c = 0.06, dropout 0.4, batch 1024, Adam 5e-4 (β2 0.99), t′ = 1 and the Student-t
    law above. Differs: the official network is EDM2-S with its power EMA, inverse-sqrt lr decay after
    8k steps and c_out² weighting; here the ADM network of CM's ImageNet-64 runs, weight 1/(t − r), a
    constant lr, CM's EMA rates; 800k steps and start_stage 10 are unconfirmed."""
    c.model.kwargs = config_lib.adm_imagenet64(dropout=0.4)
    c.data.batch_size = 1024
    c.tcm.update(q=4.0, ratio_limit=0.9961, huber_c=0.06, stage_steps=10_000, start_stage=10)
    config_lib.paper_schedule(
        c, optimizer="adam", lr=5e-4, num_steps=800_000, ema_rates=config_lib.CM_IMAGENET64_EMAS
    )
    c.optim.b2 = 0.99


register(
    MethodSpec(
        name="tcm",
        summary="truncated consistency models, stage 2 (TCM, Lee et al. 2025)",
        family="consistency",
        defaults=defaults,
        check=check,
        build=build,
        fields=fields,
        presets={"toy": toy, "digits": digits, "cifar10": cifar10, "imagenet64": imagenet64},
        needs_teacher=True,
        uses_distance=False,
        consistency_fn=model_consistency_fn,
        teacher=TeacherSource(workdir="init.workdir", ema_rate="init.ema_rate", accepts=_accepts),
        model_params=model_params,
    )
)
