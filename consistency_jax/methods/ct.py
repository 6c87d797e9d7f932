"""Consistency training from scratch: CM's CT (CM Algorithm 3, the adaptive curriculum of CM
Appendix C) and the improved iCT (Song & Dhariwal 2023: pseudo-Huber, λ = 1/Δt, lognormal n,
doubling N, no target EMA), as the methods ``ct`` and ``ict``."""

from __future__ import annotations

import dataclasses

from consistency_jax.methods import discrete
from consistency_jax.methods.base import Frozen, MethodSpec, register


@dataclasses.dataclass(frozen=True)
class ConsistencyTraining(discrete.DiscreteConsistency):
    """CT: the target is evaluated at x̂_{t_n} = x + t_n·z with the same z (CM Eq. 12–16), the clean
    sample standing in for the teacher's denoiser."""

    name = "ct"

    def target_point(self, frozen: Frozen, x0, x_hi, z, t_hi, t_lo, labels):
        return x0 + t_lo.reshape(t_lo.shape + (1,) * (x0.ndim - 1)) * z


def build(ctx) -> ConsistencyTraining:
    return ConsistencyTraining(
        apply_fn=ctx.apply_fn,
        sigmas=ctx.sigmas,
        curriculum=discrete.curriculum_from_config(ctx.config),
        loss_cfg=discrete.loss_config_from(ctx.config),
        distance=ctx.distance,
    )


def ct_defaults(c) -> None:
    """CM's CT: adaptive N(k) and μ(k) with s0 = 2, s1 = 150, μ0 = 0.9 (the official code's μ form)."""
    c.curriculum.update(kind="cm", s0=2, s1=150, mu0=0.9, mu_form="code")
    c.loss.update(weighting="uniform", index_sampling="uniform")


def ict_defaults(c) -> None:
    """iCT: N doubling from 10 to 1280 (iCT Eq. 7), μ = 0, pseudo-Huber (§3.3), λ = 1/Δt (§3.2),
    lognormal n (§3.5)."""
    c.curriculum.update(kind="ict", s0=10, s1=1280, mu0=0.0)
    c.loss.update(distance="pseudo_huber", weighting="ict", index_sampling="lognormal")


register(
    MethodSpec(
        name="ct",
        summary="consistency training (CM Algorithm 3)",
        family="consistency",
        defaults=ct_defaults,
        check=discrete.check,
        build=build,
    )
)
register(
    MethodSpec(
        name="ict",
        summary="improved consistency training (iCT)",
        family="consistency",
        defaults=ict_defaults,
        check=discrete.check,
        build=build,
    )
)
