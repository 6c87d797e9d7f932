"""Writing generated images where others read them: a TFDS dataset written without TensorFlow, the
``.npz`` of the official evaluation scripts, PNG grids.

A TFDS dataset ``NAME`` exported here lives in ``DATA_DIR/NAME/1.0.0/`` and holds

* ``NAME-train.array_record-SSSSS-of-NNNNN``: the shards as ArrayRecord files (random access; read by
  ``tfds.data_source`` / ``builder.as_data_source`` and by this project's data pipeline, no
  TensorFlow);
* ``NAME-train.tfrecord-SSSSS-of-NNNNN`` (unless ``formats`` leaves it out): the same records as
  TFRecord files, written here in pure Python (the TFRecord framing is a length, a masked CRC-32C of
  the length, the record and its masked CRC-32C), so that ``tfds.load`` reads the dataset where
  TensorFlow is installed (tf.data cannot read ArrayRecord);
* ``dataset_info.json`` and ``features.json``, written last, after every shard is complete.

Records are ``tf.train.Example`` protos serialised by the dataset's own ``FeaturesDict``: ``image``
(uint8 H×W×C, PNG-encoded here with Pillow) and, for class-conditional samples, ``label``
(``ClassLabel``). Example i of the dataset is generated sample i; the dataset is stored unshuffled
(``disable_shuffling``), so every reader sees the samples in index order.

Shards are the unit of work and of atomicity: a shard is written under a temporary name in
``.incomplete/`` and renamed into place when its file is closed, so a shard file under its final name
is complete, a killed export never leaves a half-written shard where a reader looks, and a rerun
writes only the missing shards. With several hosts each writes its own shards; one host writes the
metadata after a barrier (the caller's).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
from collections.abc import Sequence

import numpy as np

VERSION = "1.0.0"
SPLIT = "train"
FORMATS = ("array_record", "tfrecord")
_INCOMPLETE = ".incomplete"


class ExportError(ValueError):
    """An export that cannot proceed: a bad name, an existing dataset, a plan that differs."""


def check_dataset_name(name: str) -> str:
    """A TFDS dataset name: lower-case letters, digits and underscores, starting with a letter."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ExportError(
            f"A TFDS dataset name is lower_snake_case (letters, digits, '_', starting "
            f"with a letter), got {name!r}."
        )
    return name


def png_bytes(image: np.ndarray) -> bytes:
    """The PNG file of one uint8 (H, W, C) image, C in {1, 3}."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"Expected a uint8 (H, W, 1|3) image, got {image.dtype} {image.shape}.")
    pil = Image.fromarray(
        image[..., 0] if image.shape[-1] == 1 else image,
        mode="L" if image.shape[-1] == 1 else "RGB",
    )
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _masked_crc32c(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord(path: str, records: Sequence[bytes]) -> None:
    """Writes TFRecord framing around each record (no TensorFlow needed)."""
    with open(path, "wb") as f:
        for rec in records:
            length = struct.pack("<Q", len(rec))
            f.write(length)
            f.write(struct.pack("<I", _masked_crc32c(length)))
            f.write(rec)
            f.write(struct.pack("<I", _masked_crc32c(rec)))


def write_array_record(path: str, records: Sequence[bytes]) -> None:
    """Writes an ArrayRecord file with one record per group (random access, as TFDS writes them)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    try:
        for rec in records:
            writer.write(rec)
    finally:
        writer.close()


# The file writer of each format (tests replace one to simulate a crash mid-export).
WRITERS = {"array_record": write_array_record, "tfrecord": write_tfrecord}


class TfdsExport:
    """The TFDS dataset ``name`` in ``data_dir`` of ``num_examples`` generated images, in shards.

    Args:
      data_dir: the TFDS data directory (the dataset goes to ``data_dir/name/1.0.0``).
      name: the dataset name (see ``check_dataset_name``).
      image_shape: (H, W, C) of every image, C in {1, 3}.
      num_classes: the number of classes of the ``label`` feature; None: no label feature.
      num_examples: the size of the ``train`` split.
      examples_per_shard: examples per shard (the last shard holds the rest).
      formats: which files to write: "array_record" (always; the data pipeline's format) and
        optionally "tfrecord" (for ``tfds.load``).
      description: the dataset description (shown by TFDS).
    """

    def __init__(
        self,
        data_dir: str,
        name: str,
        image_shape: Sequence[int],
        num_classes: int | None,
        num_examples: int,
        examples_per_shard: int,
        formats: Sequence[str] = FORMATS,
        description: str = "",
    ):
        self.name = check_dataset_name(name)
        self.data_dir = os.path.abspath(data_dir)
        self.dir = os.path.join(self.data_dir, name, VERSION)
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3 or self.image_shape[-1] not in (1, 3):
            raise ExportError(
                f"TFDS export writes (H, W, 1|3) images, got shape {self.image_shape}."
            )
        self.num_classes = num_classes
        self.num_examples = int(num_examples)
        self.examples_per_shard = int(examples_per_shard)
        if self.num_examples < 1 or self.examples_per_shard < 1:
            raise ExportError(
                f"Need num_examples >= 1 and examples_per_shard >= 1, got "
                f"{self.num_examples} and {self.examples_per_shard}."
            )
        formats = tuple(formats)
        bad = [f for f in formats if f not in FORMATS]
        if bad or "array_record" not in formats:
            raise ExportError(
                f"TFDS export formats are {FORMATS} (array_record always), got {formats}."
            )
        self.formats = formats
        self.description = description
        self._features = None

    # -- layout ------------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.examples_per_shard)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """[start, stop) of the example indices in ``shard``."""
        start = shard * self.examples_per_shard
        return start, min(start + self.examples_per_shard, self.num_examples)

    def shard_path(self, shard: int, fmt: str) -> str:
        return os.path.join(
            self.dir, f"{self.name}-{SPLIT}.{fmt}-{shard:05d}-of-{self.num_shards:05d}"
        )

    def shard_done(self, shard: int) -> bool:
        return all(os.path.exists(self.shard_path(shard, f)) for f in self.formats)

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.shard_done(s)]

    def is_complete(self) -> bool:
        """Whether the metadata is written (it is written after every shard)."""
        return os.path.exists(os.path.join(self.dir, "dataset_info.json"))

    def exists(self) -> bool:
        return os.path.isdir(self.dir) and bool(os.listdir(self.dir))

    def remove(self) -> None:
        """Deletes the dataset directory (``--overwrite``)."""
        if os.path.isdir(self.dir):
            shutil.rmtree(self.dir)

    # -- writing -----------------------------------------------------------------------------------
    @property
    def features(self):
        if self._features is None:
            import tensorflow_datasets as tfds

            spec = {
                "image": tfds.features.Image(
                    shape=self.image_shape, dtype=np.uint8, encoding_format="png"
                )
            }
            if self.num_classes:
                spec["label"] = tfds.features.ClassLabel(num_classes=int(self.num_classes))
            self._features = tfds.features.FeaturesDict(spec)
        return self._features

    def serialize(self, image: np.ndarray, label: int | None = None) -> bytes:
        example = {"image": png_bytes(image)}
        if self.num_classes:
            example["label"] = int(label)
        return self.features.serialize_example(example)

    def write_shard(self, shard: int, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Writes ``shard`` (every format) from its uint8 images (and labels), atomically per file.

        Raises:
          ValueError: images of the wrong count, shape or dtype, or labels missing/out of range.
        """
        start, stop = self.shard_range(shard)
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape != (stop - start,) + self.image_shape:
            raise ValueError(
                f"Shard {shard} needs uint8 images of shape {(stop - start,) + self.image_shape}, "
                f"got {images.dtype} {images.shape}."
            )
        if self.num_classes:
            labels = np.asarray(labels) if labels is not None else None
            if (
                labels is None
                or labels.shape != (stop - start,)
                or labels.min() < 0
                or labels.max() >= self.num_classes
            ):
                raise ValueError(
                    f"Shard {shard} needs {stop - start} labels in [0, {self.num_classes})."
                )
        records = [
            self.serialize(images[i], None if not self.num_classes else labels[i])
            for i in range(stop - start)
        ]
        tmp_dir = os.path.join(self.dir, _INCOMPLETE)
        os.makedirs(tmp_dir, exist_ok=True)
        for fmt in self.formats:
            final = self.shard_path(shard, fmt)
            tmp = os.path.join(tmp_dir, f"{os.path.basename(final)}.{os.getpid()}")
            with writing(final, tmp):
                WRITERS[fmt](tmp, records)
                os.replace(tmp, final)

    def write_metadata(self, metadata: dict | None = None) -> None:
        """Writes ``dataset_info.json``/``features.json`` once every shard is complete.

        The primary format is TFRecord when written (``tfds.load`` reads the primary format) with
        ArrayRecord as the alternative that ``tfds.data_source`` picks; else ArrayRecord alone.

        Raises:
          ExportError: a shard is missing.
        """
        import tensorflow_datasets as tfds
        from etils import epath
        from tensorflow_datasets.core import dataset_info as dataset_info_lib
        from tensorflow_datasets.core import naming

        missing = self.missing_shards()
        if missing:
            raise ExportError(
                f"Cannot write the metadata of {self.dir}: shards {missing} are missing."
            )
        primary = "tfrecord" if "tfrecord" in self.formats else "array_record"
        identity = dataset_info_lib.DatasetIdentity(
            name=self.name, version=tfds.core.Version(VERSION), data_dir=self.dir, module_name=""
        )
        info = tfds.core.DatasetInfo(
            builder=identity,
            description=self.description,
            features=self.features,
            supervised_keys=("image", "label") if self.num_classes else None,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(metadata or {}),
            alternative_file_formats=[f for f in self.formats if f != primary],
        )
        info.set_file_format(primary)
        template = naming.ShardedFileTemplate(
            data_dir=epath.Path(self.dir),
            dataset_name=self.name,
            split=SPLIT,
            filetype_suffix=primary,
        )
        lengths = [self.shard_range(s)[1] - self.shard_range(s)[0] for s in range(self.num_shards)]
        num_bytes = sum(
            os.path.getsize(self.shard_path(s, primary)) for s in range(self.num_shards)
        )
        split = tfds.core.SplitInfo(
            name=SPLIT, shard_lengths=lengths, num_bytes=num_bytes, filename_template=template
        )
        info.set_splits(tfds.core.SplitDict([split]))
        info.write_to_directory(self.dir)
        shutil.rmtree(os.path.join(self.dir, _INCOMPLETE), ignore_errors=True)


def save_npz(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """The layout the official evaluation scripts read: uint8 NHWC images under ``arr_0`` and, for
    class-conditional samples, int labels under ``arr_1``; written atomically."""
    tmp = path + ".tmp.npz"
    arrays = {"arr_0": np.asarray(images, np.uint8)}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, np.int64)
    with writing(path, tmp):
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def write_json_atomic(path: str, value: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with writing(path, tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


@contextlib.contextmanager
def writing(path: str, tmp: str):
    """Turns a failed write of ``path`` (through ``tmp``: a full disk, a directory that is a file)
    into an ExportError naming the file and the cause; the partial ``tmp`` is removed."""
    try:
        yield
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ExportError(
            f"Writing {path} failed: {e.strerror or e}. Fix that (free space) and run the same "
            "command again: what was written completely is kept."
        ) from e
