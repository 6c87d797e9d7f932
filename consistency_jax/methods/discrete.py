"""What the discrete-time consistency methods (CD and CT, CM Algorithms 2–3) share: the method object
around ``losses.consistency_loss`` with its curriculum N(k), μ(k), and their config blocks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from consistency_jax import losses, schedules
from consistency_jax.methods import fields as fields_lib
from consistency_jax.methods.base import Frozen, Method

Array = jax.Array


def has_weights(tree: Any) -> bool:
    """True when a distance carries arrays (LPIPS): it then travels as ``Frozen.distance``."""
    return any(hasattr(leaf, "shape") for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class DiscreteConsistency(Method):
    """The consistency loss on the Karras grid of N(k) points, with target θ⁻ (CM Eq. 7–10).

    Subclasses define ``target_point``: where the target f_{θ⁻} is evaluated (CT: x + t_n·z; CD: one
    teacher ODE step from x_{t_{n+1}}).

    Attributes:
      apply_fn: the raw network.
      sigmas: the noise configuration.
      curriculum: N(k) and μ(k) (``schedules.Curriculum``).
      loss_cfg: distance, weighting, choice of n, solver.
      distance: d(a, b) -> (B,); a distance with weights (LPIPS) is read from ``Frozen.distance``
        when one is given there (an input of the compiled step rather than a baked-in constant).
    """

    apply_fn: Callable
    sigmas: Any
    curriculum: schedules.Curriculum
    loss_cfg: losses.LossConfig
    distance: Callable

    @property
    def frozen_trees(self) -> tuple[str, ...]:
        return ("target",) + (("distance",) if has_weights(self.distance) else ())

    @property
    def keeps_target(self) -> bool:
        return self.curriculum.uses_target_ema

    def target_rate(self, step: Array) -> Array:
        return self.curriculum(step)[1]

    def schedule(self, step: Array) -> dict[str, Array]:
        n, mu = self.curriculum(step)
        return {"num_scales": n, "mu": mu}

    def target_point(self, frozen: Frozen, x0, x_hi, z, t_hi, t_lo, labels) -> Array:
        raise NotImplementedError

    def loss(self, params, frozen: Frozen, batch, rng, step):
        num_scales, _ = self.curriculum(step)
        distance = frozen.distance if frozen.distance is not None else self.distance
        point = lambda *args: self.target_point(frozen, *args)
        return losses.consistency_loss(
            self.apply_fn,
            self.sigmas,
            self.loss_cfg,
            self.curriculum.max_scales,
            params,
            frozen.target,
            batch,
            rng,
            num_scales,
            distance,
            point,
        )


# ----------------------------------------------------------------------------------------------------
# Config blocks


def fields(c) -> None:
    """The config blocks of the discrete consistency methods: ``config.loss`` (distance, weighting
    λ(t_n), choice of n, the ODE solver of CD) and ``config.curriculum`` (N(k), μ(k): CM Appendix C,
    iCT Eq. 7)."""
    fields_lib.distance_fields(c)
    fields_lib.declare(c, "loss", weighting="uniform", index_sampling="uniform", solver="heun")
    fields_lib.lognormal_fields(c)  # iCT's lognormal choice of n (index_sampling = lognormal)
    fields_lib.declare(
        c,
        "curriculum",
        kind="constant",
        num_scales=18,
        mu0=0.0,
        s0=2,
        s1=150,
        mu_form="code",  # "code": what jcm/cm ran (μ(0) = 0.81); "paper": the paper's form
        total_steps=0,  # K; 0 -> train.num_steps
    )


def curriculum_from_config(config) -> schedules.Curriculum:
    """``config.curriculum`` as a ``schedules.Curriculum`` (K defaults to train.num_steps).

    Raises:
      ValueError: naming config.curriculum when a value is out of range.
    """
    cur = config.curriculum
    try:
        return schedules.Curriculum(
            kind=cur.kind,
            num_scales=cur.num_scales,
            mu0=cur.mu0,
            s0=cur.s0,
            s1=cur.s1,
            total_steps=cur.total_steps or config.train.num_steps,
            mu_form=cur.mu_form,
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.curriculum: {e}") from e


def loss_config_from(config) -> losses.LossConfig:
    """``config.loss`` as a ``losses.LossConfig``.

    Raises:
      ValueError: naming config.loss when a value is out of range.
    """
    lc = config.loss
    try:
        return losses.LossConfig(
            distance=lc.distance,
            weighting=lc.weighting,
            index_sampling=lc.index_sampling,
            solver=lc.solver,
            huber_c=lc.huber_c,
            p_mean=lc.p_mean,
            p_std=lc.p_std,
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.loss: {e}") from e


def check(config) -> None:
    """The checks of a discrete consistency method's config (curriculum and loss blocks)."""
    curriculum_from_config(config)
    loss_config_from(config)


def grid_size(config) -> int | None:
    """The number of points of the final Karras grid (for sampling times given as grid indices)."""
    return curriculum_from_config(config).max_scales
