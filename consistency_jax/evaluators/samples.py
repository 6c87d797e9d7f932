"""The samples an evaluation looks at, by method family: 1-step and 2-step consistency sampling (CM
Algorithm 1) for consistency models, EDM's Heun sampler (EDM Algorithm 1) for denoisers."""

from __future__ import annotations

import jax
import numpy as np

from consistency_jax import parameterization as param_lib
from consistency_jax import samplers


def two_step_times(config, sigmas: param_lib.SigmaConfig) -> tuple[float, ...]:
    """The times of 2-step sampling: grid indices from T on the curriculum's final grid (the official
    code's convention, e.g. (0, 22, 39) for ImageNet-64 CD), else (T, config.eval.two_step_time).

    Raises:
      ValueError: indices off the grid or not increasing, or a time outside [σ_min, σ_max).
    """
    if config.eval.two_step_indices:
        from consistency_jax.methods import discrete  # the grid of the discrete curricula

        return samplers.times_from_indices(
            tuple(config.eval.two_step_indices), discrete.grid_size(config), sigmas
        )
    ts = (sigmas.sigma_max, float(config.eval.two_step_time))
    samplers.check_times(ts, sigmas)
    return ts


class SampleGenerator:
    """Generates the samples of one evaluation from the parameters to evaluate.

    The samplers are jitted once, on the first call, with the parameters as an argument, and reused at
    every evaluation of the run (``apply_fn`` is fixed for a run).

    Args:
      family: the method family (``methods.MethodSpec.family``): "consistency" or "denoiser".
      sigmas: the noise configuration.
      config: the run config (``eval.edm_steps``, the 2-step times).
      shape: the shape of the generated batch (N, ...).
      labels: class labels (N,) for a conditional network.
      consistency_fn: the consistency function of the model (``MethodSpec.consistency_fn``).
    """

    def __init__(
        self,
        family: str,
        sigmas: param_lib.SigmaConfig,
        config,
        shape,
        labels: jax.Array | None = None,
        consistency_fn=param_lib.consistency_fn,
    ):
        self.family, self.sigmas, self.shape, self.labels = family, sigmas, tuple(shape), labels
        self.consistency_fn = consistency_fn
        self.edm_steps = int(config.eval.edm_steps)
        self.two_step = two_step_times(config, sigmas) if family == "consistency" else None
        self._samplers = None

    def _build(self, apply_fn) -> dict:
        sigmas, shape = self.sigmas, self.shape
        if self.family == "denoiser":
            n = self.edm_steps

            def heun(params, rng, labels):
                denoise = lambda x, t: param_lib.denoiser_fn(
                    apply_fn, params, x, t, sigmas, labels=labels
                )
                return samplers.edm_heun_sample(denoise, rng, shape, sigmas, n)

            return {f"heun_{2 * n - 1}nfe": jax.jit(heun)}
        if self.family != "consistency":
            raise ValueError(f"No evaluation samplers for the method family {self.family!r}.")
        clip = 1.0 if len(shape) == 4 else None
        return {
            name: samplers.make_sampler(
                apply_fn, sigmas, ts, shape, clip=clip, consistency_fn=self.consistency_fn
            )
            for name, ts in (("1step", (sigmas.sigma_max,)), ("2step", self.two_step))
        }

    def __call__(self, apply_fn, params, rng) -> dict[str, np.ndarray]:
        if self._samplers is None:
            self._samplers = self._build(apply_fn)
        return {
            name: np.asarray(fn(params, rng, self.labels)) for name, fn in self._samplers.items()
        }
