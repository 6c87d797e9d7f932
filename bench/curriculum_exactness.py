"""Where the float32 evaluation of CM's CT curriculum N(k) differs from the exact one.

  python bench/curriculum_exactness.py
  python bench/curriculum_exactness.py --configs=toy,digits

N(k) = ⌈√(k/K·((s1 + 1)² − s0²) + s0²) − 1⌉ + 1 (CM Appendix C / Table 3; the official code's
``get_ema_scales_fn``). The official code, and this library before it counted N(k) exactly, evaluated it
in float32 inside the jitted train step:

    (jnp.ceil(jnp.sqrt(k.astype(float32) / K * ((s1 + 1)**2 - s0**2) + s0**2) - 1.0) + 1.0).astype(int32)

For every step k in [0, K) of the repository's CT configs this prints how many steps that float32 formula
gets wrong and which ones, against an exact integer evaluation (N(k) = ⌈√⌈a⌉⌉ with
a = (k·D + s0²·K)/K, math.isqrt), for the formula compiled with jax.jit on one scalar step at a time
(as in a train step), compiled on the vector of all steps, and run eagerly op by op on that vector
(the rounding differs between these: XLA rewrites the compiled arithmetic, e.g. the division by K).
It also checks that ``schedules.cm_num_scales`` equals the exact value at every step. The rounding of
the compiled formula can depend on the backend (CPU / GPU / TPU): the device used is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from consistency_jax import schedules  # noqa: E402

# name: (K = train.num_steps of the CT config, s0, s1), from configs/*.py with method=ct.
CONFIGS = {
    "toy": (40_000, 2, 150),
    "digits": (3000, 2, 40),
    "cifar10": (800_000, 2, 150),
    "imagenet64": (800_000, 2, 200),
    "lsun256": (1_000_000, 2, 150),
    # Earlier CT runs reported in bench/RESULTS.md: the toy at 20k steps, digits with CM's s1 = 150.
    "toy_20k": (20_000, 2, 150),
    "digits_s1_150": (3000, 2, 150),
}


def old_float32(k, K, s0, s1):
    """The float32 formula this library (and jcm's get_ema_scales_fn) used."""
    return (
        jnp.ceil(jnp.sqrt(k.astype(jnp.float32) / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1.0) + 1.0
    ).astype(jnp.int32)


def exact(ks: np.ndarray, K: int, s0: int, s1: int) -> np.ndarray:
    """N(k) = ⌈√a⌉ = ⌈√⌈a⌉⌉ with a = (k·D + s0²·K)/K, in Python integers."""
    D = (s1 + 1) ** 2 - s0**2
    out = np.empty(len(ks), np.int64)
    for n, k in enumerate(ks.tolist()):
        m = -((-(k * D + s0 * s0 * K)) // K)  # ⌈a⌉
        r = math.isqrt(m)
        out[n] = r + (r * r < m)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)}",
    )
    args = parser.parse_args()
    print(
        f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    )
    for name in args.configs.split(","):
        K, s0, s1 = CONFIGS[name]
        ks = np.arange(K, dtype=np.int32)
        want = exact(ks, K, s0, s1)
        lib = np.asarray(jax.jit(lambda k: schedules.cm_num_scales(k, K, s0, s1))(ks))
        assert np.array_equal(lib, want), f"{name}: schedules.cm_num_scales is not exact"
        print(
            f"\n{name}: K={K}, s0={s0}, s1={s1}; N runs {want[0]}..{want[-1]}; "
            f"schedules.cm_num_scales == exact at all {K} steps"
        )
        modes = (
            # One scalar step at a time inside jit, as in the compiled train step.
            (
                "jit, scalar k",
                jax.jit(lambda k: jax.lax.map(lambda s: old_float32(s, K, s0, s1), k)),
            ),
            ("jit, vector of k", jax.jit(lambda k: old_float32(k, K, s0, s1))),
            ("eager, vector of k", lambda k: old_float32(k, K, s0, s1)),
        )
        for mode, fn in modes:
            old = np.asarray(fn(jnp.asarray(ks)))
            bad = np.nonzero(old != want)[0]
            print(f"  old float32 formula ({mode}): {len(bad)} of {K} steps differ")
            for k in bad:
                print(f"    k={k}: old N={old[k]}, exact N={want[k]}")


if __name__ == "__main__":
    main()
