"""The data section of a run config, checked (``ImageDataConfig``), and what a batch must look like.

``ImageDataConfig.reader`` names one of the two readers (``READERS``; see ``consistency_jax.data``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from consistency_jax.config import READERS  # the schema's values, one home


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
    """Typed boundary of the data section of a config.

    Attributes:
      name: TFDS name with config, e.g. "cifar10", "downsampled_imagenet/64x64", "lsun/bedroom",
        "sklearn_digits/8" (a bare "sklearn_digits" picks the config of ``image_size``).
      data_dir: TFDS data directory (None: the TFDS default, ``~/tensorflow_datasets``).
      split: TFDS split string, e.g. "train", "test", "train[:90%]".
      image_size: side S of the square (S, S) images the network sees.
      num_channels: channels C the network sees (3 for RGB, 1 for digits).
      random_flip: random horizontal flips (right for natural images, wrong for digits).
      use_labels: also yield integer class labels (the data set must have a "label" feature).
      resize: allow resizing fixed-size images whose stored size differs from ``image_size``
        (variable-size images, e.g. LSUN, are always centre-cropped and resized).
      download: let TFDS download and prepare a missing data set (never needed for digits).
      num_threads: threads decoding examples ahead of the consumer (0: decode synchronously).
      prefetch_batches: how many local batches of decoded examples are kept ready.
      in_memory: decode this host's share once and keep it in memory (small data sets; then read
        without threads, as grain recommends for in-memory data). None: only for the digits.
        ``data_source`` reader only.
      reader: how examples are read. "data_source": ``tfds.data_source`` over ``array_record``
        files through grain (no TensorFlow). "tfds_load": ``tfds.load`` (tf.data) over
        ``tfrecord`` files (needs TensorFlow). "auto": by the format the data set is prepared in
        (array_record -> data_source, tfrecord -> tfds_load); a data set prepared here with
        ``download=True`` is written as tfrecord when TensorFlow is installed, else as
        array_record. The digits are always built as array_record unless reader="tfds_load".
      shuffle_buffer: tfds_load reader only: examples in the tf.data shuffle buffer (0: this host's
        whole share, a uniform permutation per epoch, as the data_source reader; the buffer holds
        undecoded records).
    """

    name: str
    data_dir: str | None = None
    split: str = "train"
    image_size: int = 32
    num_channels: int = 3
    random_flip: bool = True
    use_labels: bool = False
    resize: bool = False
    download: bool = False
    num_threads: int = 8
    prefetch_batches: int = 2
    in_memory: bool | None = None
    reader: str = "auto"
    shuffle_buffer: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(
                f"ImageDataConfig.name must be a non-empty TFDS name, got {self.name!r}."
            )
        for field in ("image_size", "num_channels"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"ImageDataConfig.{field} must be a positive integer, got {value!r}."
                )
        if self.num_threads < 0 or self.prefetch_batches < 0:
            raise ValueError(
                "ImageDataConfig.num_threads and prefetch_batches must be >= 0, got "
                f"{self.num_threads} and {self.prefetch_batches}."
            )
        if self.reader not in READERS:
            raise ValueError(
                f"ImageDataConfig.reader must be one of {READERS}, got {self.reader!r}."
            )
        if (
            not isinstance(self.shuffle_buffer, (int, np.integer))
            or isinstance(self.shuffle_buffer, bool)
            or self.shuffle_buffer < 0
        ):
            raise ValueError(
                "ImageDataConfig.shuffle_buffer must be a non-negative integer (0: the whole share), got "
                f"{self.shuffle_buffer!r}."
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ImageDataConfig:
        """Builds the config from a mapping (e.g. ``config.data`` of a ConfigDict).

        Args:
          values: field values; unknown keys raise a ValueError naming them.

        Returns:
          The frozen config.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown image data config keys {unknown}; known keys: {sorted(known)}."
            )
        return cls(**dict(values))


def validate_image_batch(
    batch: Mapping[str, Any] | np.ndarray | jax.Array, image_size: int, num_channels: int
) -> None:
    """Checks that a batch holds (B, S, S, C) numeric images (and (B,) integer labels).

    Called on the first batch when an iterator is created and available to the trainer so that a
    mismatch between data, config and network fails before anything compiles.

    Args:
      batch: a dict with "image" (and optionally "label"), or the image array itself.
      image_size: the expected side S.
      num_channels: the expected channel count C.

    Raises:
      ValueError: naming the problem (missing key, non-numeric dtype, rank, spatial size, channels,
        label shape or dtype).
    """
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(f"Image batch has no 'image' entry; keys: {sorted(batch)}.")
        image, label = batch["image"], batch.get("label")
    else:
        image, label = batch, None
    dtype = np.dtype(getattr(image, "dtype", np.asarray(image).dtype))
    if dtype == np.bool_ or not np.issubdtype(dtype, np.number):
        raise ValueError(f"Images must have a numeric dtype, got {dtype}.")
    shape = tuple(np.shape(image))
    if len(shape) != 4:
        raise ValueError(
            f"Images must have rank 4 (batch, height, width, channels) in NHWC order, got shape {shape}."
        )
    if shape[1:3] != (image_size, image_size):
        raise ValueError(
            f"Image spatial size {shape[1]}x{shape[2]} does not match the configured image_size "
            f"{image_size}x{image_size} (shape {shape}, NHWC expected)."
        )
    if shape[3] != num_channels:
        raise ValueError(
            f"Images have {shape[3]} channels but the config/network expects {num_channels} "
            f"(shape {shape}, NHWC expected)."
        )
    if label is not None:
        label_dtype = np.dtype(getattr(label, "dtype", np.asarray(label).dtype))
        if not np.issubdtype(label_dtype, np.integer):
            raise ValueError(f"Labels must have an integer dtype, got {label_dtype}.")
        if tuple(np.shape(label)) != (shape[0],):
            raise ValueError(f"Labels must have shape ({shape[0]},), got {tuple(np.shape(label))}.")
