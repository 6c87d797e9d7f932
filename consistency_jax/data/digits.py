"""``sklearn_digits``: scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset.

The 1797 real digits of ``sklearn.datasets.load_digits`` (the test part of UCI "optdigits", written
by 13 people; 4x4 pixel counts of 32x32 bitmaps, values 0..16) ship inside
scikit-learn, so this builder never touches the network.
It gives the library a
real, tiny image data set on which a consistency model trains in minutes on a CPU and whose sample
quality is measured by ``consistency_jax.evaluators.digits``.

Configs (one ``BuilderConfig`` per image size):

* ``sklearn_digits/8``: the original 8x8 grid, values rescaled to 0..255 (``round(v * 255 / 16)``).
* ``sklearn_digits/16``: the same digits bilinearly upsampled to 16x16 (PIL, on the rescaled 0..255
  image). Bilinear keeps the strokes smooth and recognisable; nearest neighbour would give 2x2 blocks
  and zero padding would leave the digit at 8x8 resolution.

Splits are deterministic: the last 297 digits of scikit-learn's order (27..33 per class) are
``test``; the first 1500 are ``train``. This split is harder than a random one (logistic regression:
91 % on it against 97-98 % on random 297-digit splits), which suggests the file is ordered by writer;
a held-out set of unseen hands is the honest reference for a sample-quality metric. Within a split
TFDS stores the records in its own
deterministic (key-hash) order, not in scikit-learn's. Features: ``image`` uint8 (H, W, 1), ``label``
ClassLabel(10).

Without TensorFlow, prepare with ``file_format="array_record"`` and read with ``as_data_source``;
``consistency_jax.data.ensure_digits_dataset`` does both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TEST = 297
NUM_TRAIN = NUM_EXAMPLES - NUM_TEST
IMAGE_SIZES = (8, 16)


class SklearnDigitsConfig(tfds.core.BuilderConfig):
    """Builder config carrying the stored image size."""

    def __init__(self, *, image_size: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.image_size = image_size


def digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 (N, S, S, 1) images in 0..255 and int64 labels (N,).

    Args:
      image_size: 8 (the original grid) or 16 (bilinear upsampling of the 8x8 grid).

    Returns:
      ``(images, labels)`` in the order of ``sklearn.datasets.load_digits``.
    """
    if image_size not in IMAGE_SIZES:
        raise ValueError(
            f"sklearn_digits image_size must be one of {IMAGE_SIZES}, got {image_size}."
        )
    # Imported here: scikit-learn is only needed while the data set is being prepared.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    if image_size != 8:
        from PIL import Image  # pylint: disable=g-import-not-at-top

        images = np.stack(
            [
                np.asarray(
                    Image.fromarray(im, mode="L").resize((image_size, image_size), Image.BILINEAR)
                )
                for im in images
            ]
        )
    return images[..., None], digits.target.astype(np.int64)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 1797 8x8 handwritten digits (optdigits), with 8x8 and 16x16 configs."""

    name = "sklearn_digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: last 297 digits are the test split."}
    BUILDER_CONFIGS = [
        SklearnDigitsConfig(name=str(size), image_size=size, description=f"{size}x{size} digits")
        for size in IMAGE_SIZES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(size, size, 1), dtype=np.uint8, encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # The data ship with scikit-learn: nothing is downloaded.
        images, labels = digits_images(self.builder_config.image_size)
        return {
            "train": self._generate_examples(images[:NUM_TRAIN], labels[:NUM_TRAIN], 0),
            "test": self._generate_examples(images[NUM_TRAIN:], labels[NUM_TRAIN:], NUM_TRAIN),
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, offset: int
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        # PIL images are PNG-encoded by tfds with Pillow; NumPy arrays would need TensorFlow.
        from PIL import Image  # pylint: disable=g-import-not-at-top

        for i, (image, label) in enumerate(zip(images, labels)):
            yield (
                offset + i,
                {"image": Image.fromarray(image[..., 0], mode="L"), "label": int(label)},
            )
