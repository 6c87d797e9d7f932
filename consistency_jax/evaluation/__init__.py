"""Evaluation during training: the samples to look at and the figures computed from them.

  samples.py  which samplers evaluate a method family (1/2-step consistency, EDM Heun)
  toy.py      the 2-D toy: sliced W2 / energy distance beside the noise floor, the exact-map error
  images.py   images: PNG grids and, on the digits, digits-FD
  inception_metrics.py  paper-comparable FID/IS/KID/PR on the FID Inception-v3 (``InceptionMetrics``;
                used by ``python -m consistency_jax.evaluate``, not yet by the training loop)

``build_evaluator`` picks one for a run; an evaluator is called as
``evaluator(apply_fn, params, rng) -> (figures, samples)`` and draws them with ``plot``.
"""

from __future__ import annotations

from consistency_jax.toy_data import TOY_DATASETS


def build_evaluator(config, spec, sigmas, example_shape):
    """The evaluator of a run: the toy's for toy data, else the image evaluator.

    Args:
      config: the validated run config.
      spec: the method's plug-in (``methods.MethodSpec``): its family picks the samplers.
      sigmas: the noise configuration.
      example_shape: one example's shape.
    """
    if config.data.name in TOY_DATASETS:
        from consistency_jax.evaluation.toy import ToyEvaluator

        return ToyEvaluator(
            config,
            spec.family,
            sigmas,
            exact_map=spec.needs_teacher and spec.family == "consistency",
            consistency_fn=spec.consistency_fn,
        )
    from consistency_jax.evaluation.images import ImageEvaluator

    return ImageEvaluator(
        config, spec.family, sigmas, example_shape, consistency_fn=spec.consistency_fn
    )
