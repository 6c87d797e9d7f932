"""The one training-state pytree shared by every method, and the EMA update (CM Eq. 8, Algorithms 2–3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any


def ema_update(ema: PyTree, new: PyTree, rate: Array | float) -> PyTree:
    """ema ← rate·ema + (1 − rate)·new, leaf by leaf, under stop_gradient (CM Eq. 8 / Alg. 2–3)."""
    rate = jnp.asarray(rate, jnp.float32)
    return jax.tree.map(
        lambda e, p: jax.lax.stop_gradient((rate * e + (1.0 - rate) * p).astype(e.dtype)), ema, new
    )


def check_ema_rate(rate: float, name: str = "EMA rate") -> float:
    """Returns ``rate`` as a float after checking 0 ≤ rate < 1 (the one range check of every EMA rate:
    a rate of 1 would never move)."""
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {rate!r}.") from None
    if not 0.0 <= r < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {rate}.")
    return r


def ema_key(rate: float) -> str:
    """The key under which the eval EMA of ``rate`` is stored ("0.9999")."""
    return repr(float(rate))


class TrainState(flax.struct.PyTreeNode):
    """Everything a train step reads and writes.

    Attributes:
      step: the optimizer step k (int32 scalar).
      params: θ, the online parameters.
      target_params: θ⁻, the stop-gradient target of the consistency loss, or None when the curriculum
        keeps θ⁻ = stopgrad θ (μ = 0, e.g. CM's CD on CIFAR-10 and iCT), which saves a parameter copy.
      ema_params: the evaluation EMAs {ema_key(rate): tree}; samples and metrics use these.
      opt_state: the optax state.
      teacher_params: CD's teacher φ, read-only: never updated here and never written into a
        checkpoint of the student (``checkpoint.py`` drops it); None for methods without a teacher.
      distance: a distance that carries weights (a callable pytree such as
        ``metrics.lpips.LPIPSDistance``), read-only and never checkpointed like the teacher. Held
        here so that its weights are inputs of the compiled step rather than constants baked into
        it; None when the loss's distance has no weights (l2, l1, pseudo-Huber).
    """

    step: Array
    params: PyTree
    target_params: PyTree | None
    ema_params: Mapping[str, PyTree]
    opt_state: optax.OptState
    teacher_params: PyTree | None = None
    distance: PyTree | None = None

    @classmethod
    def create(
        cls,
        params: PyTree,
        tx: optax.GradientTransformation,
        *,
        ema_rates: Sequence[float] = (),
        use_target: bool = True,
        teacher_params: PyTree | None = None,
        distance: PyTree | None = None,
    ) -> TrainState:
        """θ⁻ and every EMA start as copies of θ (jcm, cm). Under ``jax.jit`` with ``out_shardings``
        the whole state is created directly on the mesh (``build.init_state``)."""
        for r in ema_rates:
            check_ema_rate(r, "Every EMA rate (ema_rates)")
        copy = lambda t: jax.tree.map(jnp.array, t)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            target_params=copy(params) if use_target else None,
            ema_params={ema_key(r): copy(params) for r in ema_rates},
            opt_state=tx.init(params),
            teacher_params=teacher_params,
            distance=distance,
        )

    def eval_params(self, rate: float | None = None) -> PyTree:
        """The parameters to sample with: the EMA of ``rate`` (default: the slowest), else θ."""
        if rate is not None:
            return self.ema_params[ema_key(rate)]
        if self.ema_params:
            return self.ema_params[max(self.ema_params, key=float)]
        return self.params
