"""The real TFDS ``cifar10`` builder, prepared offline from real photographs (test helper).

TFDS's own ``Cifar10`` builder (its feature spec, example generation and file writing) is run on a
small archive in CIFAR-10's binary format made from scikit-image's bundled photographs: 32x32
patches of astronaut, coffee, chelsea, rocket, ... with the photograph's index as the label. Only
the download step is replaced (the builder is handed the local directory instead of fetching
cs.toronto.edu), so the data set that results is a genuine ``cifar10`` TFDS data set, read by name
like the real one.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds

_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
    "cell",
)
_CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _photo_patches(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random 32x32 RGB patches of the bundled photographs (downscaled 4x) and labels."""
    import skimage.data  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top

    photos = []
    for name in _PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        image = (
            np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
        )  # gray, RGBA
        small = Image.fromarray(image).resize((image.shape[1] // 4, image.shape[0] // 4), Image.BOX)
        photos.append(np.asarray(small))
    images, labels = [], []
    for i in range(count):
        label = i % len(photos)
        photo = photos[label]
        top = rng.integers(0, photo.shape[0] - 32 + 1)
        left = rng.integers(0, photo.shape[1] - 32 + 1)
        images.append(photo[top : top + 32, left : left + 32])
        labels.append(label)
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.uint8)


def write_cifar10_binaries(
    root: str, num_train: int = 60, num_test: int = 12, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes ``root/cifar-10-batches-bin`` in CIFAR-10's binary format; returns what it wrote.

    Each record is one label byte followed by the 32x32 red, green and blue planes (row major).

    Returns:
      {"train": (images (N, 32, 32, 3) uint8, labels (N,)), "test": (...)} in file order.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "batches.meta.txt"), "w") as f:
        f.write("\n".join(_CLASS_NAMES) + "\n")
    written = {}
    for split, count, files in (
        ("train", num_train, [f"data_batch_{i}.bin" for i in range(1, 6)]),
        ("test", num_test, ["test_batch.bin"]),
    ):
        images, labels = _photo_patches(count, rng)
        written[split] = (images, labels)
        for part, name in zip(np.array_split(np.arange(count), len(files)), files):
            planes = images[part].transpose(0, 3, 1, 2).reshape(len(part), 3072)
            records = np.concatenate([labels[part, None], planes], axis=1).astype(np.uint8)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(records.tobytes())
    return written


def prepare_cifar10(data_dir: str, source_dir: str, file_format: str) -> tfds.core.DatasetBuilder:
    """Runs TFDS's ``cifar10`` builder on ``source_dir`` (from ``write_cifar10_binaries``)."""
    builder = tfds.builder("cifar10", data_dir=data_dir)
    if not builder.is_prepared():
        with mock.patch.object(
            tfds.download.DownloadManager, "download_and_extract", lambda self, url: source_dir
        ):
            builder.download_and_prepare(
                file_format=file_format,
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
    return builder
