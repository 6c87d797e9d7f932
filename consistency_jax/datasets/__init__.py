"""TFDS builders bundled with consistency_jax.

Importing this package registers the builders with ``tensorflow_datasets`` so that
``tfds.builder("sklearn_digits/8")`` resolves. Builders here never touch the network.
"""

from consistency_jax.datasets.digits import IMAGE_SIZES as DIGITS_IMAGE_SIZES
from consistency_jax.datasets.digits import SklearnDigits, digits_images

__all__ = ["DIGITS_IMAGE_SIZES", "SklearnDigits", "digits_images"]
