"""The samples an evaluation looks at, by method family: 1-step and 2-step consistency sampling (CM
Algorithm 1) for consistency models, EDM's Heun sampler (EDM Algorithm 1) for denoisers."""

from __future__ import annotations

import os

import jax
import numpy as np

from consistency_jax import parameterization as param_lib
from consistency_jax import samplers


def two_step_times(
    config, sigmas: param_lib.SigmaConfig, grid_size: int | None = None
) -> tuple[float, ...]:
    """The times of 2-step sampling: grid indices from T on the model's final grid of ``grid_size``
    points (the official code's convention, e.g. (0, 22, 39) for ImageNet-64 CD; the method says its
    grid, ``MethodSpec.grid_size``), else (T, config.eval.two_step_time).

    Raises:
      ValueError: indices without a grid, off the grid or not increasing, or a time outside
        [σ_min, σ_max).
    """
    if config.eval.two_step_indices:
        if not grid_size:
            raise ValueError(
                f"config.eval.two_step_indices={tuple(config.eval.two_step_indices)} are indices "
                f"on a discrete time grid, and method={config.method!r} trains in continuous time: "
                "give the time as config.eval.two_step_time."
            )
        return samplers.times_from_indices(
            tuple(config.eval.two_step_indices), int(grid_size), sigmas
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
      grid_size: the model's discrete time grid (``MethodSpec.grid_size``) for
        ``config.eval.two_step_indices``; None in continuous time.
    """

    def __init__(
        self,
        family: str,
        sigmas: param_lib.SigmaConfig,
        config,
        shape,
        labels: jax.Array | None = None,
        consistency_fn=param_lib.consistency_fn,
        grid_size: int | None = None,
    ):
        self.family, self.sigmas, self.shape, self.labels = family, sigmas, tuple(shape), labels
        self.consistency_fn = consistency_fn
        self.edm_steps = int(config.eval.edm_steps)
        self.two_step = (
            two_step_times(config, sigmas, grid_size) if family == "consistency" else None
        )
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


def check_config(config, spec, sigmas, ema_rates, toy_data: bool) -> None:
    """The evaluation's slice of a run config (``config.eval``), before anything compiles.

    Args:
      config: the run config.
      spec: the run's method plug-in (its family and time grid pick the samplers).
      sigmas: the checked noise configuration.
      ema_rates: the eval EMA rates the run keeps.
      toy_data: the run is on the 2-D toy (no image metrics).

    Raises:
      ValueError: naming the field.
    """
    e = config.eval
    for name in ("num_samples", "edm_steps"):
        v = e[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"config.eval.{name} must be an integer >= 1, got {v!r}.")
    if e.ema_rate and float(e.ema_rate) not in ema_rates:
        raise ValueError(
            f"config.eval.ema_rate={e.ema_rate} is not one of the EMA rates kept "
            f"(config.train.ema_rates={ema_rates}); 0 picks the slowest."
        )
    from consistency_jax.evaluators.inception_metrics import METRICS

    bad = sorted(set(e.fid_metrics) - set(METRICS))
    if bad or not e.fid_metrics:
        raise ValueError(f"config.eval.fid_metrics={tuple(e.fid_metrics)}: choose from {METRICS}.")
    if e.inception_weights:
        if toy_data:
            raise ValueError("config.eval.inception_weights is for image runs, not the 2-D toy.")
        if not os.path.isfile(e.inception_weights):
            raise ValueError(
                f"config.eval.inception_weights={e.inception_weights!r} is not a file; make it "
                "with tools/convert_inception_weights.py (README, 'Evaluating like the papers')."
            )
        if e.fid_reference and not os.path.isfile(e.fid_reference):
            raise ValueError(
                f"config.eval.fid_reference={e.fid_reference!r} is not a file (a statistics "
                "or reference-batch .npz; empty: the train split of config.data.name)."
            )
    if spec.family != "consistency":
        return
    try:
        two_step_times(config, sigmas, spec.grid_size(config))
    except ValueError as e_:
        raise ValueError(f"config.eval.two_step_time / two_step_indices: {e_}") from e_
