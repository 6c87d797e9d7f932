"""Consistency distillation from a diffusion teacher (CM Algorithm 2): the target is evaluated one
teacher ODE step (Euler or Heun) below x_{t_{n+1}}."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

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


register(
    MethodSpec(
        name="cd",
        summary="consistency distillation (CM Algorithm 2)",
        family="consistency",
        defaults=defaults,
        check=discrete.check,
        build=build,
        needs_teacher=True,
    )
)
