"""An EDM diffusion model, the teacher of consistency distillation (Karras et al. 2022, Eq. 2 and
Table 1): ln σ ~ N(P_mean, P_std²), λ(σ) = (σ² + σ_d²)/(σ·σ_d)²,
loss = E[λ(σ)·mean((D_θ(x + σz, σ) − x)²)].

A class-conditional teacher for guided distillation (``config.teacher.guidance`` of its students)
drops each label to the network's last label, "no class", with probability
``loss.edm_class_dropout`` (classifier-free guidance's training, ``guidance.drop_labels``), so that the
one network is also the unconditional D(x|∅)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from consistency_jax import config as config_lib
from consistency_jax import guidance, losses
from consistency_jax import parameterization as param_lib
from consistency_jax.methods import fields as fields_lib
from consistency_jax.methods.base import Frozen, Method, MethodSpec, register


@dataclasses.dataclass(frozen=True)
class EDMDenoiser(Method):
    """Trains the EDM denoiser D_θ; reads no frozen tree and keeps no target."""

    apply_fn: Callable
    sigmas: Any
    p_mean: float = -1.2
    p_std: float = 1.2
    class_dropout: float = 0.0
    null_label: int | None = None

    name = "edm"

    def __post_init__(self):
        if not self.p_std > 0:
            raise ValueError(f"EDM's lognormal p_std must be positive, got {self.p_std}.")

    def loss(self, params, frozen: Frozen, batch, rng, step):
        del frozen, step
        x0 = param_lib.as_compute_dtype(batch["image"])
        b = x0.shape[0]
        rng_s, rng_z, rng_drop = jax.random.split(rng, 3)
        sigma = jnp.exp(self.p_mean + self.p_std * jax.random.normal(rng_s, (b,), x0.dtype))
        z = jax.random.normal(rng_z, x0.shape, x0.dtype)
        x_noisy = x0 + sigma.reshape((b,) + (1,) * (x0.ndim - 1)) * z
        labels = batch.get("label")
        if self.class_dropout > 0 and labels is not None:  # its own key: nothing else changes
            labels = guidance.drop_labels(
                jax.random.fold_in(rng, 1), labels, self.class_dropout, self.null_label
            )
        denoised = param_lib.denoiser_fn(
            self.apply_fn,
            params,
            x_noisy,
            sigma,
            self.sigmas,
            labels=labels,
            train=True,
            rng=rng_drop,
        )
        sd = self.sigmas.sigma_data
        lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
        per_example = lam * losses.l2_distance(denoised, x0)
        return jnp.mean(per_example), {"mean_t": jnp.mean(sigma), "distance": jnp.mean(per_example)}


def build(ctx) -> EDMDenoiser:
    num_classes = ctx.config.model.kwargs.get("num_classes")
    return EDMDenoiser(
        apply_fn=ctx.apply_fn,
        sigmas=ctx.sigmas,
        p_mean=ctx.config.loss.edm_p_mean,
        p_std=ctx.config.loss.edm_p_std,
        class_dropout=float(ctx.config.loss.edm_class_dropout),
        null_label=int(num_classes) - 1 if num_classes else None,
    )


def check(config) -> None:
    if not config.loss.edm_p_std > 0:
        raise ValueError(f"config.loss.edm_p_std must be positive, got {config.loss.edm_p_std}.")
    p = config.loss.edm_class_dropout
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
        raise ValueError(f"config.loss.edm_class_dropout must be in [0, 1), got {p!r}.")
    if p > 0 and not (config.data.use_labels and config.model.kwargs.get("num_classes")):
        raise ValueError(
            "config.loss.edm_class_dropout > 0 trains the unconditional model of a class-conditional "
            "run: set config.data.use_labels=True and config.model.kwargs.num_classes to the number "
            "of classes + 1 (the last label is 'no class')."
        )


def fields(c) -> None:
    """EDM's training distribution ln σ ~ N(edm_p_mean, edm_p_std²) (EDM Table 1); the label
    dropout of a teacher for guided distillation (0: none)."""
    fields_lib.declare(c, "loss", edm_p_mean=-1.2, edm_p_std=1.2, edm_class_dropout=0.0)


def defaults(c) -> None:
    """EDM's training distribution ln σ ~ N(−1.2, 1.2²)."""
    c.loss.update(edm_p_mean=-1.2, edm_p_std=1.2)


def no_settings(c, args) -> None:
    """The method's defaults as they are."""


def cifar10(c, args) -> None:
    """jcm configs/cifar10_k_ve.py: Adam 1e-3, dropout 0.13, 400k steps, EMA half-life 0.5M images,
    a warm-up of 10M images."""
    batch = c.data.batch_size
    c.model.kwargs = config_lib.ncsnpp_cifar10(dropout=0.13)
    ema = math.exp(math.log(0.5) / (0.5e6 / batch))
    config_lib.paper_schedule(
        c,
        optimizer="adam",
        lr=1e-3,
        num_steps=400_000,
        ema_rates=(ema,),
        warmup_steps=10_000_000 // batch,
    )


def imagenet64(c, args) -> None:
    """cm's ImageNet 64 teacher: lr 1e-4, batch 4096, dropout 0.1; Heun with 40 steps (79 NFE)."""
    c.model.kwargs = config_lib.adm_imagenet64(dropout=0.1)
    c.data.batch_size = 4096
    config_lib.paper_schedule(
        c, optimizer="adam", lr=1e-4, num_steps=600_000, ema_rates=config_lib.CM_IMAGENET64_EMAS
    )
    c.eval.edm_steps = 40


def lsun256(c, args) -> None:
    """cm's LSUN teachers (its launch script): Adam 1e-4, batch 256, dropout 0.1, lognormal σ, Karras
    weighting, the ImageNet EMA rates; sampled with Heun, 40 steps. The number of steps is not stated
    (unconfirmed: 600k, as CD)."""
    c.model.kwargs = config_lib.adm_lsun256(dropout=0.1)
    config_lib.paper_schedule(
        c, optimizer="adam", lr=1e-4, num_steps=600_000, ema_rates=config_lib.CM_IMAGENET64_EMAS
    )
    c.eval.edm_steps = 40


register(
    MethodSpec(
        name="edm",
        summary="an EDM diffusion model (a CD teacher)",
        family="denoiser",
        defaults=defaults,
        check=check,
        build=build,
        fields=fields,
        presets={
            "toy": no_settings,
            "digits": no_settings,
            "cifar10": cifar10,
            "imagenet64": imagenet64,
            "lsun256": lsun256,
        },
        uses_distance=False,
    )
)
