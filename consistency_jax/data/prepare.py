"""A TFDS data set made ready to read: built (the digits) or checked as prepared, its features checked
against the config, its reader picked by the format it is stored in, and this host's share of it.

Host ``p`` of ``P`` reads the contiguous block ``[p * m, (p + 1) * m)`` of the split, ``m = n // P``
(``host_range``; at most ``P - 1`` examples are dropped so that every host sees the same number per
epoch). The shares are disjoint, their union is the split, and both readers use the same shares.
"""

from __future__ import annotations

import importlib.util

import tensorflow_datasets as tfds

from consistency_jax.data import digits as digits_builder  # Registers "sklearn_digits" with TFDS.
from consistency_jax.data.spec import ImageDataConfig

DIGITS_NAME = digits_builder.SklearnDigits.name


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported (``tfds.load`` needs it; nothing else here does)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["tensorflow"] set to None to hide it.
        return False


def import_tensorflow():
    """TensorFlow for tf.data only: it must never take the accelerators JAX is using."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # Already initialised, or no such device type.
            pass
    return tf


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
    if image_size not in digits_builder.IMAGE_SIZES:
        raise ValueError(
            f"sklearn_digits image_size must be one of {digits_builder.IMAGE_SIZES}, got {image_size}."
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


def prepared_builder(cfg: ImageDataConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder of ``cfg.name``, prepared (digits: built here; others: if download)."""
    if cfg.name.split("/")[0] == DIGITS_NAME:
        # A bare "sklearn_digits" means the config of the requested image size.
        config_name = cfg.name.split("/")[1] if "/" in cfg.name else str(cfg.image_size)
        if not config_name.isdigit():
            raise ValueError(
                f"Digits data set names are '{DIGITS_NAME}/<size>' with size in "
                f"{digits_builder.IMAGE_SIZES}, "
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


def image_feature_shape(builder: tfds.core.DatasetBuilder, cfg: ImageDataConfig) -> tuple:
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


def open_data_source(builder: tfds.core.DatasetBuilder, cfg: ImageDataConfig):
    """Random-access source of decoded examples (``array_record`` only, no TensorFlow)."""
    try:
        return builder.as_data_source(split=cfg.split)
    except Exception as e:  # TFDS raises several types for tfrecord-prepared data / bad splits.
        raise ValueError(
            f"Cannot open split {cfg.split!r} of TFDS data set {cfg.name!r} as an array_record data "
            f"source ({type(e).__name__}: {e}). Data sets prepared as tfrecord must be re-prepared with "
            "download_and_prepare(file_format='array_record')."
        ) from e


def host_range(process_index: int, per_host: int) -> tuple[int, int]:
    """Positions [start, stop) of this host's share within the split: contiguous equal blocks."""
    return process_index * per_host, (process_index + 1) * per_host


def host_share(total: int, process_count: int, cfg: ImageDataConfig) -> int:
    """Examples per host, ``total // process_count``; a split with fewer examples than hosts fails."""
    per_host = total // process_count
    if per_host == 0:
        raise ValueError(
            f"Split {cfg.split!r} of {cfg.name!r} has {total} examples, fewer than the "
            f"{process_count} processes."
        )
    return per_host
