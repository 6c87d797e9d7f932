"""The ``tfds_load`` reader: ``tfds.load`` (tf.data) over tfrecord files (needs TensorFlow)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from consistency_jax.data.prepare import host_range, import_tensorflow
from consistency_jax.data.preprocess import center_crop_resize
from consistency_jax.data.spec import ImageDataConfig


class TfdsLoadStream:
    """Local batches of the ``tfds_load`` reader: ``tfds.load`` (tf.data) over tfrecord files.

    The same stream definition as the grain reader: the host's contiguous share (read as its own
    sub-split, so a host reads only its files' ranges), a fresh shuffle per epoch seeded from
    ``(seed, process_index, epoch)`` (a full permutation when ``shuffle_buffer`` is 0), repeated
    without end; step ``k`` starts by skipping ``k * B mod share`` undecoded records of its epoch
    (images are decoded after the skip). The batch at step ``k`` is therefore again a pure function
    of ``(seed, k, process_index, process_count)``, although tf.data's permutation differs from
    grain's. Resizing, when needed, runs PIL in parallel ``tf.numpy_function`` calls.
    """

    def __init__(
        self,
        builder: tfds.core.DatasetBuilder,
        cfg: ImageDataConfig,
        *,
        process_index: int,
        per_host: int,
        shuffle_seed: int,
        local_batch_size: int,
    ):
        self._builder = builder
        self._cfg = cfg
        self._per_host = per_host
        self._shuffle_seed = shuffle_seed
        self._local_batch_size = local_batch_size
        start, stop = host_range(process_index, per_host)
        instructions = tfds.core.ReadInstruction.from_spec(cfg.split).to_absolute(
            builder.info.splits
        )
        if len(instructions) == 1:  # Read only this host's records.
            base = instructions[0].from_ or 0
            self._split, self._skip = (
                f"{instructions[0].splitname}[{base + start}:{base + stop}]",
                0,
            )
        else:  # A union of splits: read it whole and keep this host's block.
            self._split, self._skip = cfg.split, start

    def _records(self):
        """This host's share as undecoded records, in stored order."""
        cfg = self._cfg
        records = tfds.load(
            cfg.name,
            split=self._split,
            data_dir=cfg.data_dir,
            download=False,
            shuffle_files=False,
            read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False),
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        if self._skip:
            records = records.skip(self._skip)
        return records.take(self._per_host)

    def _decode(self, tf):
        """Record -> {"image": (S, S, C), "label": int32} inside tf.data (resizing through PIL)."""
        cfg, size = self._cfg, self._cfg.image_size
        image_feature = self._builder.info.features["image"]
        stored = tuple(image_feature.shape)
        needs_resize = stored[:2] != (size, size)
        channels = stored[2] if stored[2] is not None else cfg.num_channels

        def decode(example):
            image = image_feature.decode_example(example["image"])
            if needs_resize:
                image = tf.numpy_function(
                    lambda x: center_crop_resize(x, size), [image], image.dtype
                )
                image.set_shape((size, size, channels))
            out = {"image": image}
            if cfg.use_labels:
                out["label"] = tf.cast(example["label"], tf.int32)
            return out

        return decode

    def first_example(self) -> dict[str, np.ndarray]:
        """The host's first stored example, prepared (a cheap read to validate the data)."""
        tf = import_tensorflow()
        return next(self._records().take(1).map(self._decode(tf)).as_numpy_iterator())

    def open(self, step: int) -> Iterator[dict[str, np.ndarray]]:
        tf = import_tensorflow()
        cfg = self._cfg
        epoch, within = divmod(step * self._local_batch_size, self._per_host)
        records = self._records()
        buffer = min(self._per_host, cfg.shuffle_buffer or self._per_host)
        seed = tf.constant(self._shuffle_seed, tf.int64)

        def one_epoch(e):
            return records.shuffle(buffer, seed=seed + e, reshuffle_each_iteration=False)

        stream = tf.data.Dataset.range(epoch, 2**62).flat_map(one_epoch).skip(within)
        stream = stream.map(
            self._decode(tf), num_parallel_calls=cfg.num_threads or None, deterministic=True
        )
        stream = stream.batch(self._local_batch_size, drop_remainder=True)
        if cfg.prefetch_batches:
            stream = stream.prefetch(cfg.prefetch_batches)
        options = tf.data.Options()
        options.deterministic = True
        return stream.with_options(options).as_numpy_iterator()
