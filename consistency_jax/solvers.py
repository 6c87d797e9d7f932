"""One step of the teacher's probability-flow ODE, for consistency distillation (CM, Song et al. 2023,
§4 Eq. 7 and Algorithm 2).

The empirical PF-ODE of the KVE process is dx/dt = (x − D(x, t))/t (CM §2; EDM, Karras et al. 2022,
Eq. 1 and 3 with σ(t) = t). A ``denoise`` argument is any callable D(x, t) -> x̂_0 with per-example
times t of shape (B,). Nothing here casts: the step is computed in the dtype that x, t and D(x, t)
promote to (float64 under x64 for float64 inputs, float32 otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Denoise = Callable[[Array, Array], Array]


def _bcast(t: Array, x: Array) -> Array:
    return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def ode_drift(denoise: Denoise, x: Array, t: Array) -> Array:
    """dx/dt = (x − D(x, t))/t."""
    return (x - denoise(x, t)) / _bcast(t, x)


def euler_step(denoise: Denoise, x: Array, t_cur: Array, t_next: Array) -> Array:
    """x̂ = x + (t_next − t_cur)·(x − D(x, t_cur))/t_cur (CM Eq. 7 with the Euler solver)."""
    return x + _bcast(t_next - t_cur, x) * ode_drift(denoise, x, t_cur)


def heun_step(denoise: Denoise, x: Array, t_cur: Array, t_next: Array) -> Array:
    """Heun's 2nd-order step (EDM Algorithm 1, one step; CM Algorithm 2 with the Heun solver).

    d = (x − D(x, t_cur))/t_cur; x' = x + (t_next − t_cur)·d; d' = (x' − D(x', t_next))/t_next;
    x̂ = x + (t_next − t_cur)·(d + d')/2. ``t_next`` must be positive (it is ε > 0 at the grid's end).
    """
    h = _bcast(t_next - t_cur, x)
    d = ode_drift(denoise, x, t_cur)
    x_euler = x + h * d
    d_next = ode_drift(denoise, x_euler, t_next)
    return x + h * 0.5 * (d + d_next)


SOLVERS: dict[str, Callable[[Denoise, Array, Array, Array], Array]] = {
    "euler": euler_step,
    "heun": heun_step,
}


def get_solver(name: str):
    if name not in SOLVERS:
        raise ValueError(f"Unknown ODE solver {name!r}; choose one of {sorted(SOLVERS)}.")
    return SOLVERS[name]
