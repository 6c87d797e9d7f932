"""Consistency training from scratch: CM's CT (CM Algorithm 3, the adaptive curriculum of CM
Appendix C) and the improved iCT (Song & Dhariwal 2023: pseudo-Huber, λ = 1/Δt, lognormal n,
doubling N, no target EMA), as the methods ``ct`` and ``ict``."""

from __future__ import annotations

import dataclasses

from consistency_jax import config as config_lib
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


def no_settings(c, args) -> None:
    """The method's defaults as they are."""


def ct_toy(c, args) -> None:
    """CM's CT (l2, adaptive N and μ) needs more data than iCT/CD to reach 2× the noise floor at one
    step: 20k steps at batch 256 gave 2.4×, 40k at batch 512 gave 1.6× (bench/RESULTS.md)."""
    c.data.batch_size = 512
    c.train.update(num_steps=40_000, eval_every=20_000)
    c.checkpoint.every = 20_000


def ct_digits(c, args) -> None:
    """CM's CT curriculum is tuned for 800k steps: with s1 = 150 its target EMA (μ → 0.9986) barely
    moves in a 3000-step run (digits-FD 870); s1 = 40 keeps μ ≤ 0.995 (digits-FD 56 / 47)."""
    c.loss.distance = "l2"
    c.curriculum.update(s0=2, s1=40, mu0=0.9)


def ct_cifar10(c, args) -> None:
    """CM Appendix C: RAdam 4e-4, batch 512, 800k steps, EMA 0.9999, s0 = 2, s1 = 150, μ0 = 0.9;
    args["metric"] is the distance."""
    c.loss.distance = args.get("metric", "lpips")
    config_lib.paper_schedule(c, optimizer="radam", lr=4e-4, num_steps=800_000, ema_rates=(0.9999,))
    c.curriculum.update(s0=2, s1=150, mu0=0.9)


def ct_imagenet64(c, args) -> None:
    """cm's ImageNet 64 CT: LPIPS, s0 = 2, s1 = 200, μ0 = 0.95, Adam 1e-4, 800k steps."""
    c.loss.distance = "lpips"
    c.curriculum.update(kind="cm", s0=2, s1=200, mu0=0.95)
    config_lib.paper_schedule(
        c, optimizer="adam", lr=1e-4, num_steps=800_000, ema_rates=config_lib.CM_IMAGENET64_EMAS
    )
    c.eval.two_step_indices = (0, 106, 200)


def ct_lsun256(c, args) -> None:
    """cm's LSUN 256 CT: LPIPS, s0 = 2, s1 = 150, μ0 = 0.95, Adam 5e-5, 1M steps; 2-step indices by
    category (args["category"])."""
    c.loss.distance = "lpips"
    c.curriculum.update(kind="cm", s0=2, s1=150, mu0=0.95)
    config_lib.paper_schedule(
        c, optimizer="adam", lr=5e-5, num_steps=1_000_000, ema_rates=config_lib.CM_LSUN256_EMAS
    )
    bedroom = args.get("category", "bedroom") == "bedroom"
    c.eval.two_step_indices = (0, 67, 150) if bedroom else (0, 62, 150)


def ict_digits(c, args) -> None:
    c.curriculum.update(s0=10, s1=320)


def ict_cifar10(c, args) -> None:
    """iCT §3–4: pseudo-Huber, no target EMA, N from 10 doubling to 1280, lognormal n, λ = 1/Δt,
    dropout 0.3, eval EMA 0.99993. Batch, lr and length are iCT's values as we read them (batch 1024,
    400k steps, RAdam 1e-4); check against the paper before relying on them."""
    c.model.kwargs = config_lib.ncsnpp_cifar10(dropout=0.3)
    c.data.batch_size = 1024
    config_lib.paper_schedule(
        c, optimizer="radam", lr=1e-4, num_steps=400_000, ema_rates=(0.99993,)
    )


register(
    MethodSpec(
        name="ct",
        summary="consistency training (CM Algorithm 3)",
        family="consistency",
        defaults=ct_defaults,
        check=discrete.check,
        build=build,
        fields=discrete.fields,
        presets={
            "toy": ct_toy,
            "digits": ct_digits,
            "cifar10": ct_cifar10,
            "imagenet64": ct_imagenet64,
            "lsun256": ct_lsun256,
        },
        grid_size=discrete.grid_size,
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
        fields=discrete.fields,
        presets={"toy": no_settings, "digits": ict_digits, "cifar10": ict_cifar10},
        grid_size=discrete.grid_size,
    )
)
