"""Consistency distillation from a diffusion teacher (CM Algorithm 2): the target is evaluated one
teacher ODE step (Euler or Heun) below x_{t_{n+1}}."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from consistency_jax import config as config_lib
from consistency_jax import solvers
from consistency_jax.methods import discrete
from consistency_jax.methods.base import Frozen, MethodSpec, register


@dataclasses.dataclass(frozen=True)
class ConsistencyDistillation(discrete.DiscreteConsistency):
    """CD. ``teacher(φ, x, t, labels) -> D_φ(x, t)`` is the teacher denoiser (EDM preconditioned,
    e.g. ``parameterization.network_denoiser``); φ is read from ``Frozen.teacher``."""

    teacher: Callable = None

    name = "cd"

    def __post_init__(self):
        if self.teacher is None:
            raise ValueError("Consistency distillation needs a teacher denoiser.")

    @property
    def frozen_trees(self) -> tuple[str, ...]:
        return super().frozen_trees + ("teacher",)

    def target_point(self, frozen: Frozen, x0, x_hi, z, t_hi, t_lo, labels):
        denoise = lambda x, t: self.teacher(frozen.teacher, x, t, labels)
        return solvers.get_solver(self.loss_cfg.solver)(denoise, x_hi, t_hi, t_lo)


def build(ctx) -> ConsistencyDistillation:
    return ConsistencyDistillation(
        apply_fn=ctx.apply_fn,
        sigmas=ctx.sigmas,
        curriculum=discrete.curriculum_from_config(ctx.config),
        loss_cfg=discrete.loss_config_from(ctx.config),
        distance=ctx.distance,
        teacher=ctx.teacher,
    )


def defaults(c) -> None:
    """CM's CD: N = 18, Heun, μ = 0 (the CIFAR-10 setting), λ = 1, uniform n."""
    c.curriculum.update(kind="constant", num_scales=18, mu0=0.0)
    c.loss.update(solver="heun", weighting="uniform", index_sampling="uniform")


def toy(c, args) -> None:
    """iCT's pseudo-Huber distance and λ = 1/Δt also help CD here: with l2 / uniform weighting the
    one-step map error after 20k steps was 0.065 against 0.019 (bench/RESULTS.md)."""
    c.loss.update(distance="pseudo_huber", weighting="ict")


def digits(c, args) -> None:
    """CM's CD (N = 18, Heun, μ = 0) with iCT's pseudo-Huber distance and λ = 1/Δt, which reached
    the teacher's digits-FD far sooner than l2 / λ = 1 (bench/RESULTS.md §2)."""
    c.curriculum.update(num_scales=18, mu0=0.0)
    c.loss.update(distance="pseudo_huber", weighting="ict")
    c.train.update(num_steps=4000, eval_every=2000)


def cifar10(c, args) -> None:
    """CM Appendix C: RAdam (lr 4e-4; 2e-4 for l1), batch 512, 800k steps, a warm-up of 10M images,
    EMA 0.9999, N = 18, μ = 0; args["metric"] (lpips, l2, l1) is the distance."""
    metric = args.get("metric", "lpips")
    lr = {"lpips": 4e-4, "l1": 2e-4, "l2": 4e-4}[metric]
    c.loss.distance = metric
    config_lib.paper_schedule(
        c,
        optimizer="radam",
        lr=lr,
        num_steps=800_000,
        ema_rates=(0.9999,),
        warmup_steps=10_000_000 // c.data.batch_size,
    )
    c.curriculum.update(num_scales=18, mu0=0.0)


def imagenet64(c, args) -> None:
    """cm's ImageNet 64 CD: N = 40, μ = 0.95, Adam 8e-6, 600k steps, 2-step indices (0, 22, 39)."""
    c.loss.distance = args.get("metric", "lpips")
    c.curriculum.update(kind="constant", num_scales=40, mu0=0.95)
    config_lib.paper_schedule(
        c, optimizer="adam", lr=8e-6, num_steps=600_000, ema_rates=config_lib.CM_IMAGENET64_EMAS
    )
    c.eval.two_step_indices = (0, 22, 39)


def lsun256(c, args) -> None:
    """cm's LSUN 256 CD: N = 40, μ = 0.95, Adam 1e-5, 600k steps; its 2-step indices by metric."""
    metric = args.get("metric", "lpips")
    c.loss.distance = metric
    c.curriculum.update(kind="constant", num_scales=40, mu0=0.95)
    config_lib.paper_schedule(
        c, optimizer="adam", lr=1e-5, num_steps=600_000, ema_rates=config_lib.CM_LSUN256_EMAS
    )
    c.eval.two_step_indices = (0, 17, 39) if metric == "lpips" else (0, 18, 39)


register(
    MethodSpec(
        name="cd",
        summary="consistency distillation (CM Algorithm 2)",
        family="consistency",
        defaults=defaults,
        check=discrete.check,
        build=build,
        fields=discrete.fields,
        presets={
            "toy": toy,
            "digits": digits,
            "cifar10": cifar10,
            "imagenet64": imagenet64,
            "lsun256": lsun256,
        },
        needs_teacher=True,
        grid_size=discrete.grid_size,
    )
)
