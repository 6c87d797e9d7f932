"""The training loop's evaluators: the samples to look at and the figures computed from them.

(The command that scores sample files, ``python -m consistency_jax.evaluate``, is ``evaluate.py``.)

  samples.py  which samplers evaluate a method family (1/2-step consistency, EDM Heun)
  toy.py      the 2-D toy: sliced W2 / energy distance beside the noise floor, the exact-map error
  images.py   images: PNG grids and, on the digits, digits-FD
  digits.py   the digits-FD: a fixed classifier of the bundled digits and the Fréchet distance in its features
  inception_metrics.py  paper-comparable FID/IS/KID/PR on the FID Inception-v3 (``InceptionMetrics``;
                used by ``python -m consistency_jax.evaluate``, not yet by the training loop)

``build_evaluator`` picks one for a run; an evaluator is called as
``evaluator(apply_fn, params, rng) -> (figures, samples)`` and draws them with ``plot``.
"""

from __future__ import annotations

from consistency_jax.toy import TOY_DATASETS


def build_evaluator(config, spec, sigmas, example_shape):
    """The evaluator of a run: the toy's for toy data, else the image evaluator.

    Args:
      config: the validated run config.
      spec: the method's plug-in (``methods.MethodSpec``): its family picks the samplers.
      sigmas: the noise configuration.
      example_shape: one example's shape.
    """
    if config.data.name in TOY_DATASETS:
        from consistency_jax.evaluators.toy import ToyEvaluator

        return ToyEvaluator(
            config,
            spec.family,
            sigmas,
            exact_map=spec.needs_teacher and spec.family == "consistency",
            consistency_fn=spec.consistency_fn,
            grid_size=spec.grid_size(config),
        )
    from consistency_jax.evaluators.images import ImageEvaluator

    return ImageEvaluator(
        config,
        spec.family,
        sigmas,
        example_shape,
        consistency_fn=spec.consistency_fn,
        grid_size=spec.grid_size(config),
    )
