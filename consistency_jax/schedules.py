"""The Karras σ grid (EDM, Karras et al. 2022, Eq. 5) and the discretisation / target-EMA curricula
(CM, Song et al. 2023, Appendix C and Table 3; iCT, Song & Dhariwal 2023, §3.4).

Every function is pure and jittable in the training step ``k`` (a traced int), so curricula live inside
the compiled train step with no host round-trip. There is exactly ONE implementation of the grid:
``karras_time``; ``karras_sigmas`` is its vectorised form for a static N.

Dtypes: the grid is computed in the default float dtype for integer inputs (float64 when
``jax_enable_x64`` is on, float32 otherwise); N(k) is an int32 and μ(k) a float32 scalar.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from consistency_jax.parameterization import SigmaConfig

Array = jax.Array


def _grid_dtype(*args: Array):
    """The default float dtype (float64 under x64, else float32) for integer inputs; float inputs
    promote with float32 (so bfloat16 / float16 compute in float32)."""
    floats = [a for a in args if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.result_type(*floats, jnp.float32) if floats else jnp.result_type(float)


def karras_time(i: Array, num_scales: Array, sigmas: SigmaConfig) -> Array:
    """t_i of the ascending Karras grid (EDM Eq. 5; CM §3 / Appendix C), 0-based: t_0 = ε, t_{N−1} = T.

    t_i = (ε^{1/ρ} + i/(N−1)·(T^{1/ρ} − ε^{1/ρ}))^ρ. ``i`` and ``num_scales`` may be traced integers
    (CT grows N during training). The end points are returned exactly (ε and T), so that the consistency
    boundary condition f(x, ε) = x is hit exactly when t_0 is used. The result is in the default float
    dtype for integer inputs: float64 under ``jax_enable_x64``, float32 otherwise.
    """
    i = jnp.asarray(i)
    n = jnp.asarray(num_scales)
    dtype = _grid_dtype(i, n)
    lo = sigmas.sigma_min ** (1.0 / sigmas.rho)
    hi = sigmas.sigma_max ** (1.0 / sigmas.rho)
    frac = i.astype(dtype) / (n - 1).astype(dtype)
    t = (lo + frac * (hi - lo)) ** sigmas.rho
    t = jnp.where(i <= 0, jnp.asarray(sigmas.sigma_min, dtype), t)
    return jnp.where(i >= n - 1, jnp.asarray(sigmas.sigma_max, dtype), t)


def karras_sigmas(num_scales: int, sigmas: SigmaConfig) -> Array:
    """The whole ascending grid t_0 = ε < … < t_{N−1} = T for a static N, shape (N,), in the default
    float dtype (float64 under x64, else float32)."""
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
      - "cm": the adaptive CT curriculum of CM (Appendix C, Table 3; the official code's
          ``get_ema_scales_fn``), evaluated exactly in integer arithmetic (see ``cm_num_scales``):
          N(k) = ⌈√(k/K·((s1 + 1)² − s0²) + s0²) − 1⌉ + 1, at most s1 + 1,
          μ(k) = exp(s0·ln μ0 / (N(k) − 1)) with mu_form="code" (what jcm/cm compute and what the
          published CIFAR-10 CT numbers used; μ(0) = 0.81 for s0 = 2, μ0 = 0.9), or
          μ(k) = exp(s0·ln μ0 / N(k)) with mu_form="paper" (the paper's formula; μ(0) = 0.9).
      - "ict": iCT's doubling curriculum (iCT §3.4, Eq. 7) N(k) = min(s0·2^⌊k/K'⌋, s1) + 1,
          K' = max(⌊K / (log2⌊s1/s0⌋ + 1)⌋, 1) (the floor is inside the logarithm, so log2 may be
          non-integer: s1/s0 = 75 gives K/(log2 75 + 1)), with μ = 0 (θ⁻ = stopgrad θ).
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
        if self.kind == "cm" and self.s0 < 2:
            raise ValueError(
                f"Need s0 >= 2 for kind='cm' (N(0) = s0 grid points, and a grid needs "
                f"at least 2), got s0={self.s0}."
            )
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


def _cm_thresholds(total_steps: int, s0: int, s1: int) -> list[int]:
    """T_j = ⌊(j² − s0²)·K / D⌋ for j = s0 … s1 + 1, D = (s1 + 1)² − s0², in exact Python integers.

    N(k) = ⌈√a − 1⌉ + 1 = ⌈√a⌉ with a = k·D/K + s0², and for an integer j ≥ 0: ⌈√a⌉ ≤ j ⟺ a ≤ j²
    ⟺ k·D ≤ (j² − s0²)·K ⟺ k ≤ T_j (k an integer). So N(k) is the smallest j ≥ s0 with k ≤ T_j.
    """
    K, s0, s1 = int(total_steps), int(s0), int(s1)
    d = (s1 + 1) ** 2 - s0**2
    if K < 1 or d <= 0:
        raise ValueError(f"Need K >= 1 and s1 + 1 > s0, got K={K}, s0={s0}, s1={s1}.")
    return [(j * j - s0 * s0) * K // d for j in range(s0, s1 + 2)]


def cm_num_scales(step: Array, total_steps: int, s0: int, s1: int) -> Array:
    """CM's CT discretisation curriculum N(k) = ⌈√(k/K·((s1 + 1)² − s0²) + s0²) − 1⌉ + 1 (CM
    Appendix C / Table 3; the official code's ``get_ema_scales_fn``), exact at every integer step k.

    The official code evaluates the formula in float32, which comes out one too small at a few steps
    (K = 800k, s0 = 2, s1 = 150: k = 202553 gives 76 instead of 77). Here the integer thresholds of
    ``_cm_thresholds`` are found with ``searchsorted``, so N(k) is exact and still jittable in a traced
    int ``step`` (any shape). It is clamped to s1 + 1 (= ``Curriculum.max_scales``, the static bound
    index sampling relies on), which only matters for k > K. Returns int32.
    """
    thresholds = _cm_thresholds(total_steps, s0, s1)
    k = jnp.asarray(step)
    if not jnp.issubdtype(k.dtype, jnp.integer):
        raise TypeError(f"The step k must be an integer, got dtype {k.dtype}.")
    t_dtype = jnp.int32 if thresholds[-1] <= jnp.iinfo(jnp.int32).max else jnp.int64
    t = jnp.asarray(thresholds, t_dtype)
    # A scalar step (the train step) compares against all ~s1 thresholds at once: no while loop.
    method = "compare_all" if k.ndim == 0 else "scan"
    idx = jnp.searchsorted(
        t, k.astype(jnp.promote_types(k.dtype, t_dtype)), side="left", method=method
    )
    return jnp.minimum(s0 + idx, s1 + 1).astype(jnp.int32)


def cm_target_mu(num_scales: Array, s0: int, mu0: float, form: str = "code") -> Array:
    """CM's adaptive target EMA rate μ(k) given N(k) (CM Appendix C / Table 3 and the official code's
    ``get_ema_scales_fn``; see ``Curriculum`` for the "code" and "paper" forms)."""
    if mu0 == 0.0:
        return jnp.float32(0.0)
    n = jnp.asarray(num_scales, jnp.float32)
    denom = n - 1.0 if form == "code" else n
    return jnp.exp(s0 * math.log(mu0) / denom)


def _ict_k_prime(total_steps: int, s0: int, s1: int) -> int:
    """iCT's K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ (iCT §3.4, Eq. 7), at least 1.

    The floor is inside the logarithm; log2 of the integer ⌊s1/s0⌋ need not be an integer (the
    readings ⌊K / (⌊log2(s1/s0)⌋ + 1)⌋ and this one agree when s1/s0 is a power of two).
    """
    ratio = int(s1) // int(s0)
    return max(int(math.floor(int(total_steps) / (math.log2(ratio) + 1.0))), 1)


def ict_num_scales(step: Array, total_steps: int, s0: int = 10, s1: int = 1280) -> Array:
    """iCT's doubling curriculum N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 with K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋
    (iCT §3.4, Eq. 7). Returns int32."""
    k_prime = _ict_k_prime(total_steps, s0, s1)
    # Beyond this many doublings s0·2^d >= s1 anyway; the cap keeps the shift from overflowing int32.
    cap = int(math.ceil(math.log2(s1 / s0))) + 1
    doublings = jnp.minimum(jnp.asarray(step, jnp.int32) // k_prime, cap)
    return jnp.minimum(s0 * jnp.left_shift(jnp.int32(1), doublings), s1).astype(jnp.int32) + 1
