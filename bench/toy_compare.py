"""Figures of toy runs' models averaged over several sampling keys (one draw's sliced W2 moves by
~15 % between keys at the noise floor): sliced W2 and energy distance at 1 and 2 steps and the
one-step error against the exact PF-ODE map (deterministic points), read through
``loading.load_model_params`` (a TCM run: the combined model).

  python bench/toy_compare.py runs/toy_ect runs/toy_tcm [--keys=8]
"""

import argparse

import jax
import numpy as np

from consistency_jax import loading, methods, networks
from consistency_jax import parameterization as P
from consistency_jax.evaluators.toy import ToyEvaluator


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdirs", nargs="+")
    ap.add_argument("--keys", type=int, default=8)
    args = ap.parse_args()
    for wd in args.workdirs:
        config, params, step = loading.load_model_params(wd)
        spec = methods.get(config.method)
        sig = P.SigmaConfig(**config.sigmas.to_dict())
        ev = ToyEvaluator(
            config,
            spec.family,
            sig,
            exact_map=True,
            consistency_fn=spec.consistency_fn,
            grid_size=spec.grid_size(config),
        )
        apply_fn = networks.make_apply_fn(methods.network(config))
        rows = [ev(apply_fn, params, jax.random.key(1000 + k))[0] for k in range(args.keys)]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        std = {k: float(np.std([r[k] for r in rows])) for k in rows[0]}
        names = ("sw2_ratio_1step", "sw2_ratio_2step", "ed_1step", "ed_2step", "ed_floor")
        figures = ", ".join(f"{k} {mean[k]:.4g} ± {std[k]:.2g}" for k in names)
        print(
            f"{wd} (method={config.method}, step {step}): {figures}, map_error/σ_d "
            f"{mean['map_error_over_sigma_data']:.4f}"
        )


if __name__ == "__main__":
    main()
