"""Sample-quality metrics.

- ``sample_distances``: energy distance and sliced Wasserstein-2 between point clouds (the toy).
- ``digits``: a fixed feature extractor for 8×8 digits and the digits Fréchet distance.
- ``lpips``: the LPIPS perceptual distance (a training metric for CD/CT on images).
"""
from consistency_jax.metrics.sample_distances import energy_distance, sliced_wasserstein2

__all__ = ["energy_distance", "sliced_wasserstein2"]
