"""Per-host image pipelines over TFDS data sets, with exact resume; with or without TensorFlow.

Any TFDS image data set (``cifar10``, ``downsampled_imagenet/64x64``, ``imagenet_resized/64x64``,
``lsun/bedroom``, the bundled ``sklearn_digits/8`` and ``sklearn_digits/16``) is read by one of two
readers, picked by the format the data set is prepared in (``ImageDataConfig.reader``):

* ``data_source`` (array_record files, no TensorFlow; ``grain_reader``): ``tfds.data_source``
  gives random access to decoded examples, and a ``grain.MapDataset`` chain turns it into an
  infinite stream of batches.
* ``tfds_load`` (tfrecord files, the TFDS default when TensorFlow is installed; ``tfds_reader``):
  ``tfds.load`` of the host's sub-split, shuffled per epoch with seeds from
  ``(seed, process_index, epoch)``, repeated, decoded and batched by tf.data (deterministic);
  starting at step ``k`` skips the undecoded records of the current epoch before it.

With either reader the batch at step ``k`` is a pure function of
``(seed, k, process_index, process_count)``, so the whole iterator state is the step counter.
Small data sets (the digits by default, others with ``in_memory=True``) are decoded once into
NumPy arrays and then read without threads (measured on a loaded 2-core CPU, 8x8 digits with
flips: about 13k examples/s against 6k/s when every PNG is decoded on the fly).

The data set must already be prepared under ``data_dir`` (or ``download=True``). The bundled digits
are built on demand (``ensure_digits_dataset``), offline.

  spec.py          ``ImageDataConfig`` (the data section of a config) and ``validate_image_batch``
  digits.py        the ``sklearn_digits`` TFDS builder (scikit-learn's digits, offline)
  prepare.py       a data set built or checked as prepared, its reader picked, this host's share
  preprocess.py    crop/resize, stored pixels -> [-1, 1], the horizontal flips
  grain_reader.py  the ``data_source`` reader (grain over ``tfds.data_source``)
  tfds_reader.py   the ``tfds_load`` reader (tf.data)
  iterator.py      ``ImageIterator``: the resumable training stream (``make_image_iterator``)
  arrays.py        whole splits in stored order (``load_image_arrays``, ``iterate_stored_images``)

The names below are imported on first use (PEP 562): ``import consistency_jax.data.spec`` loads
neither grain nor TFDS.
"""

from __future__ import annotations

import importlib

_API = {
    "consistency_jax.data.spec": ("READERS", "ImageDataConfig", "validate_image_batch"),
    "consistency_jax.data.prepare": (
        "DIGITS_NAME",
        "ensure_digits_dataset",
        "resolve_reader",
        "tensorflow_available",
    ),
    "consistency_jax.data.iterator": (
        "ImageIterator",
        "iterator_from_config",
        "make_image_iterator",
    ),
    "consistency_jax.data.arrays": ("iterate_stored_images", "load_image_arrays"),
}
_WHERE = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'consistency_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
