"""Whole splits in stored order, unshuffled and unflipped: for metrics (digits-FD, FID reference
statistics) and for reading samples written as a TFDS data set."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from consistency_jax.data.prepare import (
    image_feature_shape,
    import_tensorflow,
    open_data_source,
    prepared_builder,
    resolve_reader,
)
from consistency_jax.data.preprocess import prepare_example, to_unit_range
from consistency_jax.data.spec import ImageDataConfig, validate_image_batch


def load_image_arrays(
    cfg: ImageDataConfig, max_examples: int | None = None
) -> dict[str, np.ndarray]:
    """A whole split in stored order, unshuffled and unflipped (for metrics on small data sets).

    Args:
      cfg: the data config (``random_flip`` is ignored).
      max_examples: read at most this many examples.

    Returns:
      {"image": float32 (N, S, S, C) in [-1, 1], "label": int32 (N,) if ``cfg.use_labels``}.
    """
    builder = prepared_builder(cfg)
    image_feature_shape(builder, cfg)
    if resolve_reader(builder, cfg) == "tfds_load":
        import_tensorflow()
        records = tfds.load(
            cfg.name,
            split=cfg.split,
            data_dir=cfg.data_dir,
            download=False,
            shuffle_files=False,
            read_config=tfds.ReadConfig(interleave_cycle_length=1),
        )
        if max_examples is not None:
            records = records.take(max_examples)
        examples = [prepare_example(e, cfg) for e in records.as_numpy_iterator()]
    else:
        source = open_data_source(builder, cfg)
        count = len(source) if max_examples is None else min(len(source), max_examples)
        examples = [prepare_example(e, cfg) for e in source.__getitems__(list(range(count)))]
    out = {"image": to_unit_range(np.stack([e["image"] for e in examples]))}
    if cfg.use_labels:
        out["label"] = np.stack([e["label"] for e in examples]).astype(np.int32)
    validate_image_batch(out, cfg.image_size, cfg.num_channels)
    return out


def iterate_stored_images(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    batch_size: int = 500,
    *,
    process_index: int = 0,
    process_count: int = 1,
    with_labels: bool = False,
    reader: str = "auto",
) -> Iterator[dict[str, np.ndarray]]:
    """A whole split as stored (no crop, resize, shuffle or flip), in order, batch by batch.

    For evaluation: reference statistics of a data set, or samples written as a TFDS data set.
    Host ``p`` of ``P`` reads the contiguous block [p·n/P, (p+1)·n/P) (every example once across
    hosts; the blocks differ by at most one example).

    Args:
      name: TFDS name with config ("cifar10", "sklearn_digits/8", ...); must be prepared (the
        digits are built on demand).
      split: TFDS split string.
      data_dir: TFDS data directory (None: the TFDS default).
      batch_size: examples per yielded batch (the last one may be shorter).
      process_index, process_count: this host's block.
      with_labels: also yield "label" (int32); the data set must have a "label" feature.
      reader: as ``ImageDataConfig.reader``.

    Yields:
      {"image": (B, H, W, C) stored dtype (uint8 for TFDS images), "label": int32 (B,)}.

    Raises:
      ValueError: an unprepared data set, no "image" (or "label") feature, variable-size images.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    # image_size only picks the digits config of a bare "sklearn_digits"; nothing is resized here.
    cfg = ImageDataConfig(
        name=name,
        data_dir=data_dir,
        split=split,
        reader=reader,
        use_labels=with_labels,
        image_size=8,
    )
    builder = prepared_builder(cfg)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(
            f"TFDS data set {name!r} has no 'image' feature; features: {list(features)}."
        )
    if with_labels and "label" not in features:
        raise ValueError(
            f"TFDS data set {name!r} has no 'label' feature; features: {list(features)}."
        )
    shape = tuple(features["image"].shape)
    if len(shape) != 3 or None in shape:
        raise ValueError(
            f"TFDS data set {name!r} stores images of shape {shape}; evaluation reads fixed-size images "
            "(write centre-cropped, resized copies of a variable-size data set first)."
        )

    def batch_of(examples: list) -> dict[str, np.ndarray]:
        out = {"image": np.stack([np.asarray(e["image"]) for e in examples])}
        if with_labels:
            out["label"] = np.asarray([e["label"] for e in examples], np.int32)
        return out

    if resolve_reader(builder, cfg) == "tfds_load":
        import_tensorflow()
        total = builder.info.splits[split].num_examples
        start, stop = (
            process_index * total // process_count,
            (process_index + 1) * total // process_count,
        )
        records = tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            shuffle_files=False,
            read_config=tfds.ReadConfig(interleave_cycle_length=1),
        )
        examples = []
        for e in records.skip(start).take(stop - start).as_numpy_iterator():
            examples.append(e)
            if len(examples) == batch_size:
                yield batch_of(examples)
                examples = []
        if examples:
            yield batch_of(examples)
        return
    source = open_data_source(builder, cfg)
    total = len(source)
    start, stop = (
        process_index * total // process_count,
        (process_index + 1) * total // process_count,
    )
    for first in range(start, stop, batch_size):
        yield batch_of(source.__getitems__(list(range(first, min(first + batch_size, stop)))))
