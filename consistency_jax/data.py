"""Per-host image pipelines over TFDS data sets, with exact resume; with or without TensorFlow.

Any TFDS image data set (``cifar10``, ``downsampled_imagenet/64x64``, ``imagenet_resized/64x64``,
``lsun/bedroom``, the bundled ``sklearn_digits/8`` and ``sklearn_digits/16``) is read by one of two
readers, picked by the format the data set is prepared in (``ImageDataConfig.reader``):

* ``data_source`` (array_record files, no TensorFlow): ``tfds.builder(name).as_data_source(split)``
  gives random access to decoded examples, and a ``grain.MapDataset`` chain turns it into an
  infinite stream of batches:

      source -> this host's share -> per-example crop/resize -> shuffle -> repeat
             -> element prefetch on threads (grain) -> batch -> [-1, 1] floats, horizontal flips.

  ``MapDataset`` is index based, so element ``i`` of the stream is a pure function of ``i``:
  ``shuffle`` draws a fresh permutation of the host's share per epoch from
  ``(seed, process_index, epoch)`` (grain seeds epoch ``e`` with ``s + e``), ``repeat`` makes the
  stream infinite, slicing ``[k * B:]`` starts at step ``k`` without reading the steps before it,
  and ``to_iter_dataset`` prefetches on a thread pool while keeping the order.

* ``tfds_load`` (tfrecord files, the TFDS default when TensorFlow is installed): ``tfds.load`` of
  the host's sub-split, shuffled per epoch with seeds from ``(seed, process_index, epoch)``,
  repeated, decoded and batched by tf.data (deterministic); starting at step ``k`` skips the
  undecoded records of the current epoch before it.

With either reader the batch at step ``k`` is a pure function of
``(seed, k, process_index, process_count)``, so the whole iterator state is the step counter
(``ImageIterator.get_state``), which a checkpoint stores as a small JSON dict. Random flips are
drawn per batch from ``(seed, process_index, step)``.

Per-host sharding: host ``p`` of ``P`` reads the contiguous block ``[p * m, (p + 1) * m)`` of the
split, ``m = n // P`` (at most ``P - 1`` examples are dropped so that every host sees the same
number per epoch). The shares are disjoint, their union is the split, and both readers give the
same shares; each host yields ``global_batch_size // P`` rows, the local share that
``jax.make_array_from_process_local_data`` assembles into the global batch.

Small data sets (the digits by default, others with ``in_memory=True``) are decoded once into
NumPy arrays and then read without threads (measured on a loaded 2-core CPU, 8x8 digits with
flips: about 13k examples/s against 6k/s when every PNG is decoded on the fly).

The data set must already be prepared under ``data_dir`` (or ``download=True``). The bundled digits
are built on demand (``ensure_digits_dataset``), offline.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from consistency_jax.datasets import digits as _digits  # Registers "sklearn_digits" with TFDS.

DIGITS_NAME = _digits.SklearnDigits.name

READERS = ("auto", "data_source", "tfds_load")

# Distinct stream tags so that the shuffle and the flips never share random bits.
_SHUFFLE_STREAM = 0x5EED
_FLIP_STREAM = 0xF11B


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


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported (``tfds.load`` needs it; nothing else here does)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["tensorflow"] set to None to hide it.
        return False


def ensure_digits_dataset(
    data_dir: str | None, image_size: int, file_format: str = "array_record"
) -> tfds.core.DatasetBuilder:
    """Builds ``sklearn_digits/<image_size>`` if it is missing.

    Offline (the digits ship with scikit-learn) and fast (well under a second).

    Args:
      data_dir: TFDS data directory (None: the TFDS default).
      image_size: 8 or 16.
      file_format: "array_record" (read by ``tfds.data_source``, no TensorFlow) or "tfrecord"
        (read by ``tfds.load``; writing it needs TensorFlow). A data set already prepared keeps its
        format.

    Returns:
      The prepared TFDS builder.
    """
    if image_size not in _digits.IMAGE_SIZES:
        raise ValueError(
            f"sklearn_digits image_size must be one of {_digits.IMAGE_SIZES}, got {image_size}."
        )
    if file_format not in ("array_record", "tfrecord"):
        raise ValueError(f"file_format must be 'array_record' or 'tfrecord', got {file_format!r}.")
    if file_format == "tfrecord" and not tensorflow_available():
        raise ValueError(
            "Writing the digits as tfrecord (reader='tfds_load') needs TensorFlow; install "
            "tensorflow-cpu or use reader='data_source'."
        )
    name = f"{DIGITS_NAME}/{image_size}"
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare(
                file_format=file_format,
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
        except FileExistsError:
            # Several processes (the hosts of a job sharing data_dir, or two jobs) built it at once:
            # the first to finish renamed its copy into place; use that one.
            builder = tfds.builder(name, data_dir=data_dir)
            if not builder.is_prepared():
                raise
    return builder


def _prepared_builder(cfg: ImageDataConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder of ``cfg.name``, prepared (digits: built here; others: if download)."""
    if cfg.name.split("/")[0] == DIGITS_NAME:
        # A bare "sklearn_digits" means the config of the requested image size.
        config_name = cfg.name.split("/")[1] if "/" in cfg.name else str(cfg.image_size)
        if not config_name.isdigit():
            raise ValueError(
                f"Digits data set names are '{DIGITS_NAME}/<size>' with size in {_digits.IMAGE_SIZES}, "
                f"got {cfg.name!r}."
            )
        fmt = "tfrecord" if cfg.reader == "tfds_load" else "array_record"
        return ensure_digits_dataset(cfg.data_dir, int(config_name), file_format=fmt)
    if cfg.reader == "tfds_load" and not tensorflow_available():
        raise ValueError(_NO_TF_MESSAGE.format(name=cfg.name))
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    if not builder.is_prepared():
        fmt = {"data_source": "array_record", "tfds_load": "tfrecord"}.get(
            cfg.reader, "tfrecord" if tensorflow_available() else "array_record"
        )
        if not cfg.download:
            raise ValueError(
                f"TFDS data set {cfg.name!r} is not prepared in data_dir={cfg.data_dir!r}. Prepare it "
                f"with tfds.builder(name, data_dir=...).download_and_prepare(file_format='{fmt}') "
                "or set download=True in the data config."
            )
        builder.download_and_prepare(file_format=fmt)
    return builder


_NO_TF_MESSAGE = (
    "TFDS data set {name!r} is read with tfds.load (reader='tfds_load', or a data set prepared as "
    "tfrecord), which needs TensorFlow, and TensorFlow is not installed. Install tensorflow-cpu, or "
    "re-prepare the data set with download_and_prepare(file_format='array_record') and use "
    "reader='data_source' (no TensorFlow)."
)


def resolve_reader(builder: tfds.core.DatasetBuilder, cfg: ImageDataConfig) -> str:
    """The reader of a prepared data set: "data_source" (array_record) or "tfds_load" (tfrecord).

    Raises:
      ValueError: when the requested reader cannot read the prepared files, or ``tfds.load`` is
        needed and TensorFlow is not installed.
    """
    fmt = getattr(builder.info.file_format, "value", builder.info.file_format) or "tfrecord"
    # A data set may hold its records in several formats (the sampling command's exports: tfrecord
    # for tfds.load, array_record as the alternative that tfds.data_source picks).
    formats = {getattr(f, "value", f) for f in builder.info.alternative_file_formats} | {fmt}
    reader = cfg.reader
    if reader == "auto":
        reader = "data_source" if "array_record" in formats else "tfds_load"
    if reader == "data_source" and "array_record" not in formats:
        raise ValueError(
            f"TFDS data set {cfg.name!r} is prepared as {fmt}; tfds.data_source reads array_record "
            "only. Use reader='tfds_load' (or 'auto') with TensorFlow installed, or re-prepare it with "
            "download_and_prepare(file_format='array_record') in another data_dir."
        )
    if reader == "tfds_load":
        if "tfrecord" not in formats:
            raise ValueError(
                f"TFDS data set {cfg.name!r} is prepared as {fmt}; tfds.load reads tfrecord only. Use "
                "reader='data_source' (or 'auto'), or prepare it as tfrecord in another data_dir."
            )
        if not tensorflow_available():
            raise ValueError(_NO_TF_MESSAGE.format(name=cfg.name))
    return reader


def _image_feature_shape(builder: tfds.core.DatasetBuilder, cfg: ImageDataConfig) -> tuple:
    """Checks the declared features against the config; returns the stored image shape."""
    features = builder.info.features
    if "image" not in features:
        raise ValueError(
            f"TFDS data set {cfg.name!r} has no 'image' feature; features: {list(features)}."
        )
    if cfg.use_labels and "label" not in features:
        raise ValueError(
            f"use_labels=True but TFDS data set {cfg.name!r} has no 'label' feature "
            f"(features: {list(features)}); use a labelled variant or set use_labels=False."
        )
    shape = tuple(features["image"].shape)
    if len(shape) != 3:
        raise ValueError(
            f"TFDS data set {cfg.name!r} stores images of rank {len(shape)} {shape}; expected (H, W, C)."
        )
    if shape[2] is not None and shape[2] != cfg.num_channels:
        raise ValueError(
            f"TFDS data set {cfg.name!r} has {shape[2]}-channel images but the config/network expects "
            f"num_channels={cfg.num_channels}."
        )
    fixed = shape[0] is not None and shape[1] is not None
    if fixed and (shape[0], shape[1]) != (cfg.image_size, cfg.image_size) and not cfg.resize:
        raise ValueError(
            f"TFDS data set {cfg.name!r} stores {shape[0]}x{shape[1]} images but the config/network "
            f"expects image_size={cfg.image_size}; set resize=True to resize them."
        )
    return shape


def _data_source(builder: tfds.core.DatasetBuilder, cfg: ImageDataConfig):
    """Random-access source of decoded examples (``array_record`` only, no TensorFlow)."""
    try:
        return builder.as_data_source(split=cfg.split)
    except Exception as e:  # TFDS raises several types for tfrecord-prepared data / bad splits.
        raise ValueError(
            f"Cannot open split {cfg.split!r} of TFDS data set {cfg.name!r} as an array_record data "
            f"source ({type(e).__name__}: {e}). Data sets prepared as tfrecord must be re-prepared with "
            "download_and_prepare(file_format='array_record')."
        ) from e


def _uses_memory(cfg: ImageDataConfig) -> bool:
    if cfg.in_memory is None:
        return cfg.name.split("/")[0] == DIGITS_NAME
    return bool(cfg.in_memory)


class _InMemorySource:
    """Prepared examples stacked into arrays; random access returns per-example dicts (views)."""

    def __init__(self, examples: list[dict[str, np.ndarray]]):
        self._arrays = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        self._len = len(examples)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self._arrays.items()}


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre crop to a square and resize to ``size`` (box halving, then bicubic; as ADM's loader)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    if image.dtype != np.uint8:
        raise ValueError(f"Resizing is supported for uint8 images only, got {image.dtype}.")
    squeeze = image.shape[2] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(max(size, round(s * scale)) for s in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    if squeeze:
        arr = arr[..., None]
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def _prepare_example(example: Mapping[str, Any], cfg: ImageDataConfig) -> dict[str, np.ndarray]:
    """One decoded TFDS example -> {"image": (S, S, C) stored dtype, "label": int32 ()}."""
    image = np.asarray(example["image"])
    if image.ndim != 3:
        raise ValueError(
            f"Decoded image of {cfg.name!r} has shape {image.shape}; expected (H, W, C)."
        )
    if image.shape[:2] != (cfg.image_size, cfg.image_size):
        image = _center_crop_resize(image, cfg.image_size)
    out = {"image": image}
    if cfg.use_labels:
        out["label"] = np.asarray(example["label"], dtype=np.int32)
    return out


def _to_unit_range(image: np.ndarray) -> np.ndarray:
    """Stored pixels -> float32 in [-1, 1] (integers by their dtype's range, floats from [0, 1])."""
    if image.dtype == np.bool_ or not np.issubdtype(image.dtype, np.number):
        raise ValueError(f"Images must have a numeric dtype, got {image.dtype}.")
    if np.issubdtype(image.dtype, np.integer):
        top = float(np.iinfo(image.dtype).max)
        return (image.astype(np.float32) * np.float32(2.0 / top) - 1.0).astype(np.float32)
    return (image.astype(np.float32) * 2.0 - 1.0).astype(np.float32)


def _flip_mask(seed: int, process_index: int, step: int, rows: int) -> np.ndarray:
    """Boolean (rows,) mask of horizontal flips, a pure function of (seed, process, step)."""
    rng = np.random.default_rng(np.random.SeedSequence([_FLIP_STREAM, seed, process_index, step]))
    return rng.random(rows) < 0.5


def _host_range(process_index: int, per_host: int) -> tuple[int, int]:
    """Positions [start, stop) of this host's share within the split: contiguous equal blocks."""
    return process_index * per_host, (process_index + 1) * per_host


class _GrainStream:
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


def _import_tensorflow():
    """TensorFlow for tf.data only: it must never take the accelerators JAX is using."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # Already initialised, or no such device type.
            pass
    return tf


class _TfdsLoadStream:
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
        start, stop = _host_range(process_index, per_host)
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
                    lambda x: _center_crop_resize(x, size), [image], image.dtype
                )
                image.set_shape((size, size, channels))
            out = {"image": image}
            if cfg.use_labels:
                out["label"] = tf.cast(example["label"], tf.int32)
            return out

        return decode

    def first_example(self) -> dict[str, np.ndarray]:
        """The host's first stored example, prepared (a cheap read to validate the data)."""
        tf = _import_tensorflow()
        return next(self._records().take(1).map(self._decode(tf)).as_numpy_iterator())

    def open(self, step: int) -> Iterator[dict[str, np.ndarray]]:
        tf = _import_tensorflow()
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


class ImageIterator(Iterator[dict[str, np.ndarray]]):
    """Infinite iterator over this host's local batches; its state is the step counter.

    Yields {"image": float32 (B, S, S, C) in [-1, 1], "label": int32 (B,) if use_labels}, with
    B = global_batch_size // process_count. The batch at step k depends only on
    (seed, k, process_index, process_count), the data and the reader.
    """

    def __init__(
        self,
        stream: _GrainStream | _TfdsLoadStream,
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
        image = _to_unit_range(np.asarray(raw["image"]))
        if self._cfg.random_flip:
            flip = _flip_mask(self._seed, self._process_index, self._step, image.shape[0])
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

    builder = _prepared_builder(cfg)
    _image_feature_shape(builder, cfg)
    reader = resolve_reader(builder, cfg)
    shuffle_seed = int(
        np.random.SeedSequence([_SHUFFLE_STREAM, int(seed), process_index]).generate_state(1)[0]
    )
    local_batch_size = global_batch_size // process_count
    if reader == "tfds_load":
        total = builder.info.splits[cfg.split].num_examples
        per_host = _check_share(total, process_count, cfg)
        stream = _TfdsLoadStream(
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
        source = _data_source(builder, cfg)
        per_host = _check_share(len(source), process_count, cfg)
        start, stop = _host_range(process_index, per_host)
        in_memory = _uses_memory(cfg)
        if in_memory:
            examples = [
                _prepare_example(e, cfg) for e in source.__getitems__(list(range(start, stop)))
            ]
            share = grain.MapDataset.source(_InMemorySource(examples))
        else:
            share = grain.MapDataset.source(source)[start:stop]
            share = share.map(lambda example: _prepare_example(example, cfg))
        # A new permutation every epoch: grain seeds epoch e with shuffle_seed + e.
        elements = share.shuffle(seed=shuffle_seed).repeat()
        first = elements[0]
        validate_image_batch(
            {k: np.asarray(v)[None] for k, v in first.items()}, cfg.image_size, cfg.num_channels
        )
        stream = _GrainStream(elements, cfg, local_batch_size, in_memory)
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


def _check_share(total: int, process_count: int, cfg: ImageDataConfig) -> int:
    per_host = total // process_count
    if per_host == 0:
        raise ValueError(
            f"Split {cfg.split!r} of {cfg.name!r} has {total} examples, fewer than the "
            f"{process_count} processes."
        )
    return per_host


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
    builder = _prepared_builder(cfg)
    _image_feature_shape(builder, cfg)
    if resolve_reader(builder, cfg) == "tfds_load":
        _import_tensorflow()
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
        examples = [_prepare_example(e, cfg) for e in records.as_numpy_iterator()]
    else:
        source = _data_source(builder, cfg)
        count = len(source) if max_examples is None else min(len(source), max_examples)
        examples = [_prepare_example(e, cfg) for e in source.__getitems__(list(range(count)))]
    out = {"image": _to_unit_range(np.stack([e["image"] for e in examples]))}
    if cfg.use_labels:
        out["label"] = np.stack([e["label"] for e in examples]).astype(np.int32)
    validate_image_batch(out, cfg.image_size, cfg.num_channels)
    return out


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
    builder = _prepared_builder(cfg)
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
        _import_tensorflow()
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
    source = _data_source(builder, cfg)
    total = len(source)
    start, stop = (
        process_index * total // process_count,
        (process_index + 1) * total // process_count,
    )
    for first in range(start, stop, batch_size):
        yield batch_of(source.__getitems__(list(range(first, min(first + batch_size, stop)))))
