"""The Karras σ grid and the discretisation / target-EMA curricula (REFERENCE §1 and §4).

Every function is pure and jittable in the training step ``k`` (a traced int), so curricula live inside
the compiled train step with no host round-trip. There is exactly ONE implementation of the grid:
``karras_time``; ``karras_sigmas`` is its vectorised form for a static N.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from consistency_jax.parameterization import SigmaConfig

Array = jax.Array


def karras_time(i: Array, num_scales: Array, sigmas: SigmaConfig) -> Array:
    """t_i of the ascending Karras grid (REFERENCE §1; EDM Eq. 5), 0-based: t_0 = ε, t_{N−1} = T.

    t_i = (ε^{1/ρ} + i/(N−1)·(T^{1/ρ} − ε^{1/ρ}))^ρ. ``i`` and ``num_scales`` may be traced integers
    (CT grows N during training). The end points are returned exactly (ε and T), so that the consistency
    boundary condition f(x, ε) = x is hit exactly when t_0 is used.
    """
    i = jnp.asarray(i)
    n = jnp.asarray(num_scales)
    lo = sigmas.sigma_min ** (1.0 / sigmas.rho)
    hi = sigmas.sigma_max ** (1.0 / sigmas.rho)
    frac = i.astype(jnp.float32) / (n - 1).astype(jnp.float32)
    t = (lo + frac * (hi - lo)) ** sigmas.rho
    t = jnp.where(i <= 0, jnp.float32(sigmas.sigma_min), t)
    return jnp.where(i >= n - 1, jnp.float32(sigmas.sigma_max), t)


def karras_sigmas(num_scales: int, sigmas: SigmaConfig) -> Array:
    """The whole ascending grid t_0 = ε < … < t_{N−1} = T for a static N (float32, shape (N,))."""
    if int(num_scales) < 2:
        raise ValueError(f"The Karras grid needs at least 2 points, got N={num_scales}.")
    return karras_time(jnp.arange(num_scales), num_scales, sigmas)


# ----------------------------------------------------------------------------------------------------
# Curricula N(k), μ(k)


CURRICULA = ("constant", "cm", "ict")


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """How the number of discretisation steps N and the target EMA rate μ evolve with the step k.

    kinds:
      - "constant": N(k) = ``num_scales``, μ(k) = ``mu0`` (CD in CM: N = 18 or 40, μ = 0 or 0.95).
      - "cm": the adaptive CT curriculum of CM (REFERENCE §4):
          N(k) = ⌈√(k/K·((s1 + 1)² − s0²) + s0²) − 1⌉ + 1,
          μ(k) = exp(s0·ln μ0 / (N(k) − 1)) with mu_form="code" (what jcm/cm compute and what the
          published CIFAR-10 CT numbers used; μ(0) = 0.81 for s0 = 2, μ0 = 0.9), or
          μ(k) = exp(s0·ln μ0 / N(k)) with mu_form="paper" (the paper's formula; μ(0) = 0.9).
      - "ict": iCT's doubling curriculum N(k) = min(s0·2^⌊k/K'⌋, s1) + 1,
          K' = ⌊K / (⌊log2(s1/s0)⌋ + 1)⌋, with μ = 0 (θ⁻ = stopgrad θ).
    """

    kind: str = "constant"
    num_scales: int = 18
    mu0: float = 0.0
    s0: int = 2
    s1: int = 150
    total_steps: int = 800_000
    mu_form: str = "code"

    def __post_init__(self):
        if self.kind not in CURRICULA:
            raise ValueError(f"Unknown curriculum {self.kind!r}; choose one of {CURRICULA}.")
        if not 0.0 <= self.mu0 < 1.0:
            raise ValueError(f"The target EMA rate mu0 must be in [0, 1), got {self.mu0}.")
        if self.kind == "constant" and self.num_scales < 2:
            raise ValueError(f"num_scales (N) must be at least 2, got {self.num_scales}.")
        if self.kind in ("cm", "ict"):
            if not 1 <= self.s0 <= self.s1:
                raise ValueError(f"Need 1 <= s0 <= s1, got s0={self.s0}, s1={self.s1}.")
            if self.total_steps < 1:
                raise ValueError(f"total_steps (K) must be positive, got {self.total_steps}.")
        if self.kind == "cm" and self.s0 < 2 and self.mu0 > 0:
            raise ValueError("The cm curriculum needs s0 >= 2 (N(0) = s0 must be at least 2).")
        if self.mu_form not in ("code", "paper"):
            raise ValueError(f"mu_form must be 'code' or 'paper', got {self.mu_form!r}.")

    @property
    def max_scales(self) -> int:
        """The largest N the curriculum reaches (a static bound for index sampling)."""
        if self.kind == "constant":
            return self.num_scales
        return self.s1 + 1

    @property
    def uses_target_ema(self) -> bool:
        """False when θ⁻ = stopgrad θ at every step, so no separate target tree is needed."""
        return self.kind != "ict" and self.mu0 > 0.0

    def __call__(self, step: Array) -> tuple[Array, Array]:
        """Returns (N(k), μ(k)) as an int32 and a float32 scalar."""
        if self.kind == "constant":
            return cm_constant(step, self.num_scales, self.mu0)
        if self.kind == "cm":
            n = cm_num_scales(step, self.total_steps, self.s0, self.s1)
            return n, cm_target_mu(n, self.s0, self.mu0, self.mu_form)
        n = ict_num_scales(step, self.total_steps, self.s0, self.s1)
        return n, jnp.float32(0.0)


def cm_constant(step: Array, num_scales: int, mu: float) -> tuple[Array, Array]:
    del step
    return jnp.int32(num_scales), jnp.float32(mu)


def cm_num_scales(step: Array, total_steps: int, s0: int, s1: int) -> Array:
    """CM's CT discretisation curriculum N(k) (REFERENCE §4, jcm ``get_ema_scales_fn``)."""
    k = jnp.asarray(step, jnp.float32)
    a = k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2
    return (jnp.ceil(jnp.sqrt(a) - 1.0) + 1.0).astype(jnp.int32)


def cm_target_mu(num_scales: Array, s0: int, mu0: float, form: str = "code") -> Array:
    """CM's adaptive target EMA rate μ(k) given N(k) (REFERENCE §4; see ``Curriculum`` for the forms)."""
    if mu0 == 0.0:
        return jnp.float32(0.0)
    n = jnp.asarray(num_scales, jnp.float32)
    denom = n - 1.0 if form == "code" else n
    return jnp.exp(s0 * math.log(mu0) / denom)


def ict_num_scales(step: Array, total_steps: int, s0: int = 10, s1: int = 1280) -> Array:
    """iCT's doubling curriculum N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 (REFERENCE §4; iCT Eq. 7)."""
    k_prime = total_steps // (int(math.floor(math.log2(s1 / s0))) + 1)
    k_prime = max(k_prime, 1)
    # Beyond this many doublings s0·2^d >= s1 anyway; the cap keeps the shift from overflowing int32.
    cap = int(math.ceil(math.log2(s1 / s0))) + 1
    doublings = jnp.minimum(jnp.asarray(step, jnp.int32) // k_prime, cap)
    return jnp.minimum(s0 * jnp.left_shift(jnp.int32(1), doublings), s1).astype(jnp.int32) + 1
