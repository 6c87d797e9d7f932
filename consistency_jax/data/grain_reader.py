"""The ``data_source`` reader: ``tfds.data_source`` (array_record files, no TensorFlow) through a grain
``MapDataset`` chain; small data sets are decoded once into NumPy arrays (``InMemorySource``).

    source -> this host's share -> per-example crop/resize -> shuffle -> repeat
           -> element prefetch on threads (grain) -> batch

``MapDataset`` is index based, so element ``i`` of the stream is a pure function of ``i``:
``shuffle`` draws a fresh permutation of the host's share per epoch from ``(seed, process_index,
epoch)`` (grain seeds epoch ``e`` with ``s + e``), ``repeat`` makes the stream infinite, slicing
``[k * B:]`` starts at step ``k`` without reading the steps before it, and ``to_iter_dataset``
prefetches on a thread pool while keeping the order.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from consistency_jax.data.prepare import DIGITS_NAME
from consistency_jax.data.spec import ImageDataConfig


def uses_memory(cfg: ImageDataConfig) -> bool:
    """Whether this host's share is decoded once and kept in memory (``cfg.in_memory``; None: digits)."""
    if cfg.in_memory is None:
        return cfg.name.split("/")[0] == DIGITS_NAME
    return bool(cfg.in_memory)


class InMemorySource:
    """Prepared examples stacked into arrays; random access returns per-example dicts (views)."""

    def __init__(self, examples: list[dict[str, np.ndarray]]):
        self._arrays = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        self._len = len(examples)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self._arrays.items()}


class GrainStream:
    """Local batches of the ``data_source`` reader: a grain chain over ``tfds.data_source``.

    ``elements`` is the host's share, shuffled per epoch and repeated; slicing it at element
    ``step * B`` starts the stream at any step without reading the steps before it.
    """

    def __init__(
        self,
        elements: grain.MapDataset,
        cfg: ImageDataConfig,
        local_batch_size: int,
        in_memory: bool,
    ):
        self._elements = elements
        self._cfg = cfg
        self._local_batch_size = local_batch_size
        self._in_memory = in_memory

    def open(self, step: int) -> Iterator[dict[str, np.ndarray]]:
        read_options = grain.ReadOptions(
            num_threads=0 if self._in_memory else self._cfg.num_threads,
            prefetch_buffer_size=self._cfg.prefetch_batches * self._local_batch_size,
        )
        stream = self._elements[step * self._local_batch_size :]
        return iter(
            stream.to_iter_dataset(read_options).batch(self._local_batch_size, drop_remainder=True)
        )
