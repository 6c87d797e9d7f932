"""Evaluation on the 2-D toy: distances of samples to fresh data beside the noise floor, and (for
distillation from the exact teacher) the error of the one-step map against the exact PF-ODE map."""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np

from consistency_jax import fs, toy
from consistency_jax import parameterization as param_lib
from consistency_jax.evaluators.samples import SampleGenerator
from consistency_jax.metrics import energy_distance, sliced_wasserstein2


class ToyEvaluator:
    """Sliced-W2 and energy distance of samples to fresh data, beside the noise floor of two
    independent data sets of the same size; for CD also the error of the one-step map against the
    exact PF-ODE map x_T -> x_ε."""

    def __init__(
        self,
        config,
        family: str,
        sigmas: param_lib.SigmaConfig,
        *,
        exact_map: bool = False,
        num_map_points: int = 500,
        consistency_fn=param_lib.consistency_fn,
        grid_size: int | None = None,
    ):
        self.ed, self.sw2 = energy_distance, sliced_wasserstein2
        self.sigmas = sigmas
        self.mixture = toy.ring_mixture()
        n = config.eval.num_samples
        rng = np.random.default_rng([config.seed, 12345])
        self.data = self.mixture.sample(rng, n)
        # The noise floor: the same figures between independent data sets of the same size, averaged
        # over several pairs (one pair's value fluctuates by tens of percent with the mode counts).
        pairs = [(self.mixture.sample(rng, n), self.mixture.sample(rng, n)) for _ in range(8)]
        self.floor = {
            "sw2_floor": float(np.mean([self.sw2(a, b) for a, b in pairs])),
            "ed_floor": float(np.mean([self.ed(a, b) for a, b in pairs])),
        }
        self.consistency_fn = consistency_fn
        self.generate = SampleGenerator(
            family, sigmas, config, (n, 2), consistency_fn=consistency_fn, grid_size=grid_size
        )
        self.map_points = None
        if exact_map:
            t_max, t_min = sigmas.sigma_max, sigmas.sigma_min
            self.map_points = t_max * rng.standard_normal((num_map_points, 2))
            self.map_truth = toy.ode_map(self.mixture, self.map_points, t_max, t_min)

    def __call__(self, apply_fn, params, rng) -> tuple[dict, dict]:
        samples = self.generate(apply_fn, params, rng)
        figures = dict(self.floor)
        for name, x in samples.items():
            figures[f"sw2_{name}"] = self.sw2(x, self.data)
            figures[f"ed_{name}"] = self.ed(x, self.data)
            figures[f"sw2_ratio_{name}"] = figures[f"sw2_{name}"] / self.floor["sw2_floor"]
        if self.map_points is not None:
            t = jnp.full((len(self.map_points),), self.sigmas.sigma_max)
            x1 = self.consistency_fn(
                apply_fn, params, jnp.asarray(self.map_points, jnp.float32), t, self.sigmas
            )
            err = np.linalg.norm(np.asarray(x1, np.float64) - self.map_truth, axis=1)
            figures["map_error"] = float(err.mean())
            figures["map_error_over_sigma_data"] = float(err.mean() / self.sigmas.sigma_data)
        return figures, samples

    def plot(self, samples: dict, path: str, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4), squeeze=False)
        for ax, (name, x) in zip(axes[0], samples.items()):
            ax.scatter(self.data[:, 0], self.data[:, 1], s=2, c="tab:gray", alpha=0.4, label="data")
            ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:red", alpha=0.6, label=name)
            ax.set_xlim(-1.2, 1.2)
            ax.set_ylim(-1.2, 1.2)
            ax.set_aspect("equal")
            ax.set_title(f"{name}")
            ax.legend(loc="upper right", markerscale=4, fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        fs.write_bytes(path, buf.getvalue())  # a local path or gs://
