"""The training stream: an infinite, exactly resumable iterator over this host's share of a split.

With either reader the batch at step ``k`` is a pure function of
``(seed, k, process_index, process_count)``, so the whole iterator state is the step counter
(``ImageIterator.get_state``), which a checkpoint stores as a small JSON dict. Each host yields
``global_batch_size // P`` rows, the local share that ``jax.make_array_from_process_local_data``
assembles into the global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from consistency_jax.data.grain_reader import GrainStream, InMemorySource, uses_memory
from consistency_jax.data.prepare import (
    host_range,
    host_share,
    image_feature_shape,
    open_data_source,
    prepared_builder,
    resolve_reader,
)
from consistency_jax.data.preprocess import flip_mask, prepare_example, to_unit_range
from consistency_jax.data.spec import ImageDataConfig, validate_image_batch
from consistency_jax.data.tfds_reader import TfdsLoadStream

# Its own stream tag, so that the shuffle never shares random bits with the flips (``preprocess``).
_SHUFFLE_STREAM = 0x5EED


class ImageIterator(Iterator[dict[str, np.ndarray]]):
    """Infinite iterator over this host's local batches; its state is the step counter.

    Yields {"image": float32 (B, S, S, C) in [-1, 1], "label": int32 (B,) if use_labels}, with
    B = global_batch_size // process_count. The batch at step k depends only on
    (seed, k, process_index, process_count), the data and the reader.
    """

    def __init__(
        self,
        stream: GrainStream | TfdsLoadStream,
        cfg: ImageDataConfig,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int,
        process_count: int,
        start_step: int,
        examples_per_host: int,
        reader: str,
    ):
        self._stream = stream
        self._cfg = cfg
        self._global_batch_size = global_batch_size
        self._local_batch_size = global_batch_size // process_count
        self._seed = seed
        self._process_index = process_index
        self._process_count = process_count
        self.examples_per_host = examples_per_host
        self.reader = reader
        self._batches = None
        self._step = 0
        self._restart(start_step)

    @property
    def step(self) -> int:
        """Index of the next batch this iterator yields."""
        return self._step

    @property
    def local_batch_size(self) -> int:
        return self._local_batch_size

    @property
    def epoch(self) -> float:
        """Passes over this host's share consumed so far."""
        return self._step * self._local_batch_size / self.examples_per_host

    def _restart(self, step: int) -> None:
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(
                f"The data iterator step must be a non-negative integer, got {step!r}."
            )
        self.close()
        self._batches = self._stream.open(int(step))
        self._step = int(step)

    def __iter__(self) -> ImageIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        raw = next(self._batches)
        image = to_unit_range(np.asarray(raw["image"]))
        if self._cfg.random_flip:
            flip = flip_mask(self._seed, self._process_index, self._step, image.shape[0])
            image = np.where(flip[:, None, None, None], image[:, :, ::-1], image)
        batch = {"image": np.ascontiguousarray(image, dtype=np.float32)}
        if self._cfg.use_labels:
            batch["label"] = np.asarray(raw["label"], dtype=np.int32)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able position of the iterator, shared by all hosts (to store in a checkpoint)."""
        return {
            "step": self._step,
            "seed": self._seed,
            "global_batch_size": self._global_batch_size,
            "process_count": self._process_count,
            "name": self._cfg.name,
            "split": self._cfg.split,
            "reader": self.reader,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Moves the iterator to ``state["step"]``; the next batch is exactly that step's batch.

        Args:
          state: a dict from ``get_state``.

        Raises:
          ValueError: if the state is malformed or was written by a stream with another seed, global
            batch size, data set or split (the positions would not correspond).
        """
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(
                f"Data iterator state must be a dict with a 'step' entry, got {state!r}."
            )
        for key, mine in (
            ("seed", self._seed),
            ("global_batch_size", self._global_batch_size),
            ("name", self._cfg.name),
            ("split", self._cfg.split),
            ("reader", self.reader),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"Data iterator state has {key}={state[key]!r} but this iterator has {key}={mine!r}; "
                    "resuming would not reproduce the saved stream."
                )
        if "process_count" in state and state["process_count"] != self._process_count:
            logging.warning(
                "Resuming a data stream written with process_count=%s on %s processes: batches from "
                "step %s on differ from the uninterrupted run.",
                state["process_count"],
                self._process_count,
                state["step"],
            )
        self._restart(state["step"])

    def close(self) -> None:
        """Stops the prefetch threads (the iterator can be restarted by ``set_state``)."""
        if self._batches is not None:
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()
            self._batches = None


def make_image_iterator(
    cfg: ImageDataConfig,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
) -> ImageIterator:
    """Infinite, exactly resumable iterator over this host's share of ``cfg.split``.

    Args:
      cfg: the data config.
      global_batch_size: rows per step over all hosts; divisible by ``process_count``.
      seed: non-negative integer seed of the per-epoch shuffles and the flips.
      process_index: this host (default ``jax.process_index()``).
      process_count: number of hosts (default ``jax.process_count()``).
      start_step: the step of the first batch yielded (resume point).

    Returns:
      An ``ImageIterator``; its first batch has been checked with ``validate_image_batch``.

    Raises:
      ValueError: on a bad batch size, seed or host index, a missing or unprepared data set, or
        images whose rank, size or channels disagree with the config.
    """
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count, got {process_index}, {process_count}."
        )
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}."
        )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"The data seed must be a non-negative integer, got {seed!r}.")

    builder = prepared_builder(cfg)
    image_feature_shape(builder, cfg)
    reader = resolve_reader(builder, cfg)
    shuffle_seed = int(
        np.random.SeedSequence([_SHUFFLE_STREAM, int(seed), process_index]).generate_state(1)[0]
    )
    local_batch_size = global_batch_size // process_count
    if reader == "tfds_load":
        total = builder.info.splits[cfg.split].num_examples
        per_host = host_share(total, process_count, cfg)
        stream = TfdsLoadStream(
            builder,
            cfg,
            process_index=process_index,
            per_host=per_host,
            shuffle_seed=shuffle_seed,
            local_batch_size=local_batch_size,
        )
        first = stream.first_example()  # not a whole shuffle buffer: one record, stored order
        validate_image_batch(
            {k: np.asarray(v)[None] for k, v in first.items()}, cfg.image_size, cfg.num_channels
        )
    else:
        source = open_data_source(builder, cfg)
        per_host = host_share(len(source), process_count, cfg)
        start, stop = host_range(process_index, per_host)
        in_memory = uses_memory(cfg)
        if in_memory:
            examples = [
                prepare_example(e, cfg) for e in source.__getitems__(list(range(start, stop)))
            ]
            share = grain.MapDataset.source(InMemorySource(examples))
        else:
            share = grain.MapDataset.source(source)[start:stop]
            share = share.map(lambda example: prepare_example(example, cfg))
        # A new permutation every epoch: grain seeds epoch e with shuffle_seed + e.
        elements = share.shuffle(seed=shuffle_seed).repeat()
        first = elements[0]
        validate_image_batch(
            {k: np.asarray(v)[None] for k, v in first.items()}, cfg.image_size, cfg.num_channels
        )
        stream = GrainStream(elements, cfg, local_batch_size, in_memory)
    return ImageIterator(
        stream,
        cfg,
        global_batch_size=global_batch_size,
        seed=int(seed),
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        examples_per_host=per_host,
        reader=reader,
    )


def iterator_from_config(
    config: Any, start_step: int = 0
) -> tuple[ImageIterator, tuple[int, int, int]]:
    """The training iterator of an experiment config (the ``config.data`` block and ``config.seed``).

    Reads ``config.data.{name, data_dir, image_size, num_channels, random_flip, use_labels,
    batch_size}`` and, where present, ``split``, ``resize``, ``download``, ``num_threads``,
    ``prefetch_batches``, ``in_memory`` and ``seed`` (default ``config.seed``); an empty
    ``data_dir`` means the TFDS default.

    Args:
      config: an ``ml_collections.ConfigDict`` (or any object with those attributes).
      start_step: the step of the first batch.

    Returns:
      ``(iterator, (image_size, image_size, num_channels))``, the iterator yielding this host's share
      of ``config.data.batch_size`` rows per step.
    """
    data = config.data
    optional = {}
    for key in (
        "split",
        "resize",
        "download",
        "num_threads",
        "prefetch_batches",
        "in_memory",
        "reader",
        "shuffle_buffer",
    ):
        if key in data:
            optional[key] = data[key]
    cfg = ImageDataConfig(
        name=data.name,
        data_dir=data.data_dir or None,
        image_size=int(data.image_size),
        num_channels=int(data.num_channels),
        random_flip=bool(data.random_flip),
        use_labels=bool(data.use_labels),
        **optional,
    )
    seed = data.seed if "seed" in data else config.seed
    iterator = make_image_iterator(cfg, int(data.batch_size), int(seed), start_step=start_step)
    return iterator, (cfg.image_size, cfg.image_size, cfg.num_channels)
