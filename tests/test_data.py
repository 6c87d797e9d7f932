"""Tests of the bundled digits data set and the per-host, exactly resumable image pipeline."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from consistency_jax import data as data_lib
from consistency_jax.data import digits as digits_ds
from consistency_jax.data import preprocess


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def _cfg(data_dir: str, size: int = 8, **kwargs) -> data_lib.ImageDataConfig:
    values = dict(
        name=f"sklearn_digits/{size}",
        data_dir=data_dir,
        split="train",
        image_size=size,
        num_channels=1,
        random_flip=False,
        use_labels=True,
    )
    values.update(kwargs)
    return data_lib.ImageDataConfig(**values)


def _row_keys(batch: dict[str, np.ndarray]) -> list[bytes]:
    """One hashable key per example: its pixels and its label."""
    return [img.tobytes() + bytes([lab]) for img, lab in zip(batch["image"], batch["label"])]


def _take(iterator, steps: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(steps)]


def test_digits_builder_offline_and_matches_sklearn(data_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the digits builder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    builder = data_lib.ensure_digits_dataset(data_dir, 8)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 1500
    assert builder.info.splits["test"].num_examples == 297

    # Independent reference: scikit-learn's arrays, rescaled 0..16 -> 0..255 in float64.
    raw = load_digits()
    expected = np.rint(raw.images * 255.0 / 16.0).astype(np.uint8)
    for split, rows in (("train", slice(0, 1500)), ("test", slice(1500, 1797))):
        source = tfds.data_source(
            "sklearn_digits/8", data_dir=data_dir, split=split, download=False
        )
        got = sorted(e["image"][..., 0].tobytes() + bytes([e["label"]]) for e in source)
        want = sorted(
            im.tobytes() + bytes([lab]) for im, lab in zip(expected[rows], raw.target[rows])
        )
        assert got == want


def test_digits_16_is_an_upsampled_8(data_dir):
    data_lib.ensure_digits_dataset(data_dir, 16)
    small = data_lib.load_image_arrays(_cfg(data_dir, 8, split="test"))
    large = data_lib.load_image_arrays(_cfg(data_dir, 16, split="test"))
    assert large["image"].shape == (297, 16, 16, 1)
    # Both splits are stored in TFDS's (deterministic) shuffled order; match them by label order and
    # by the 2x2 average pooling of the 16x16 images, which must be close to the 8x8 originals.
    pooled = large["image"].reshape(297, 8, 2, 8, 2, 1).mean(axis=(2, 4))
    dist = ((pooled[:, None] - small["image"][None]) ** 2).sum(axis=(2, 3, 4))
    nearest = dist.argmin(axis=1)
    np.testing.assert_array_equal(large["label"], small["label"][nearest])
    assert np.median(dist.min(axis=1) / 64) < 0.05


def test_batches_shape_dtype_range(data_dir):
    it = data_lib.make_image_iterator(_cfg(data_dir), global_batch_size=16, seed=0)
    batch = next(it)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0  # Both ends occur.
    assert it.step == 1
    no_labels = data_lib.make_image_iterator(
        _cfg(data_dir, use_labels=False), global_batch_size=4, seed=0
    )
    assert set(next(no_labels)) == {"image"}


def test_host_shares_are_disjoint_and_cover_the_split(data_dir):
    process_count, local = 3, 20  # 1500 / 3 = 500 examples = 25 local steps per epoch.
    all_rows = []
    for p in range(process_count):
        it = data_lib.make_image_iterator(
            _cfg(data_dir),
            global_batch_size=local * process_count,
            seed=7,
            process_index=p,
            process_count=process_count,
        )
        assert it.local_batch_size == local and it.examples_per_host == 500
        rows = [k for b in _take(it, 25) for k in _row_keys(b)]
        assert len(set(rows)) == 500  # One epoch of this host's share, no repeats.
        all_rows += rows
    reference = data_lib.load_image_arrays(_cfg(data_dir))
    assert sorted(all_rows) == sorted(_row_keys(reference))


def test_epochs_are_reshuffled(data_dir):
    it = data_lib.make_image_iterator(_cfg(data_dir), global_batch_size=100, seed=3)
    epoch1 = [k for b in _take(it, 15) for k in _row_keys(b)]
    epoch2 = [k for b in _take(it, 15) for k in _row_keys(b)]
    assert sorted(epoch1) == sorted(epoch2)
    assert epoch1 != epoch2
    other_seed = data_lib.make_image_iterator(_cfg(data_dir), global_batch_size=100, seed=4)
    assert [k for b in _take(other_seed, 15) for k in _row_keys(b)] != epoch1


def test_exact_resume(data_dir):
    cfg = _cfg(data_dir, random_flip=True)
    make = lambda **kw: data_lib.make_image_iterator(cfg, global_batch_size=12, seed=11, **kw)
    reference = _take(make(), 140)  # Crosses an epoch boundary (125 steps of 12 per epoch).

    started = make(start_step=130)
    for k in range(130, 140):
        batch = next(started)
        np.testing.assert_array_equal(batch["image"], reference[k]["image"])
        np.testing.assert_array_equal(batch["label"], reference[k]["label"])

    it = make()
    _take(it, 57)
    state = json.loads(json.dumps(it.get_state()))  # Must survive a JSON round trip.
    assert state["step"] == 57
    _take(it, 5)
    resumed = make()
    resumed.set_state(state)
    assert resumed.step == 57
    for k in range(57, 62):
        np.testing.assert_array_equal(next(resumed)["image"], reference[k]["image"])

    with pytest.raises(ValueError, match="seed"):
        data_lib.make_image_iterator(cfg, global_batch_size=12, seed=12).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        data_lib.make_image_iterator(cfg, global_batch_size=24, seed=11).set_state(state)


def test_in_memory_and_streaming_paths_agree(data_dir):
    batches = []
    for in_memory in (True, False):
        it = data_lib.make_image_iterator(
            _cfg(data_dir, random_flip=True, in_memory=in_memory, num_threads=2),
            global_batch_size=8,
            seed=5,
            process_index=1,
            process_count=2,
        )
        batches.append(_take(it, 6))
    for a, b in zip(*batches):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_flips_follow_the_config(data_dir):
    plain = _take(data_lib.make_image_iterator(_cfg(data_dir), global_batch_size=64, seed=2), 3)
    flipped = _take(
        data_lib.make_image_iterator(
            _cfg(data_dir, random_flip=True), global_batch_size=64, seed=2
        ),
        3,
    )
    n_flipped = 0
    for a, b in zip(plain, flipped):
        np.testing.assert_array_equal(a["label"], b["label"])
        same = np.all(a["image"] == b["image"], axis=(1, 2, 3))
        mirrored = np.all(a["image"][:, :, ::-1] == b["image"], axis=(1, 2, 3))
        assert np.all(same | mirrored)
        n_flipped += int(np.sum(mirrored & ~same))
    assert 40 < n_flipped < 152  # About half of 192 rows (binomial sd ~7).


def test_validate_image_batch_errors():
    good = {"image": np.zeros((2, 8, 8, 1), np.float32), "label": np.zeros((2,), np.int32)}
    data_lib.validate_image_batch(good, 8, 1)
    cases = [
        ({"image": np.zeros((8, 8, 1))}, "rank 4"),
        ({"image": np.zeros((2, 8, 8, 3))}, "3 channels"),
        ({"image": np.zeros((2, 16, 16, 1))}, "spatial size 16x16"),
        ({"image": np.zeros((2, 1, 8, 8))}, "spatial size"),
        ({"image": np.full((2, 8, 8, 1), "a")}, "numeric dtype"),
        ({"image": np.zeros((2, 8, 8, 1), bool)}, "numeric dtype"),
        ({"label": np.zeros((2,))}, "no 'image'"),
        ({"image": np.zeros((2, 8, 8, 1)), "label": np.zeros((2,), np.float32)}, "integer dtype"),
        ({"image": np.zeros((2, 8, 8, 1)), "label": np.zeros((3,), np.int32)}, r"shape \(2,\)"),
    ]
    for batch, message in cases:
        with pytest.raises(ValueError, match=message):
            data_lib.validate_image_batch(batch, 8, 1)


def test_iterator_creation_errors(data_dir):
    make = data_lib.make_image_iterator
    with pytest.raises(ValueError, match="num_channels=3"):
        make(_cfg(data_dir, num_channels=3), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="8x8 images"):
        make(_cfg(data_dir, image_size=16), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="multiple of process_count"):
        make(_cfg(data_dir), global_batch_size=10, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        make(_cfg(data_dir), global_batch_size=8, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed"):
        make(_cfg(data_dir), global_batch_size=8, seed=-1)
    with pytest.raises(ValueError, match="must be one of"):
        make(_cfg(data_dir, name="sklearn_digits/12", image_size=12), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="not prepared"):
        make(_cfg(data_dir, name="mnist"), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        data_lib.ImageDataConfig(name="cifar10", image_size=0)
    with pytest.raises(ValueError, match="Unknown image data config keys"):
        data_lib.ImageDataConfig.from_mapping({"name": "cifar10", "imagesize": 32})
    # Explicit resizing is allowed and reaches the requested size.
    resized = make(_cfg(data_dir, image_size=16, resize=True), global_batch_size=4, seed=0)
    assert next(resized)["image"].shape == (4, 16, 16, 1)


def test_center_crop_resize_against_block_images():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    # Every 2x2 block of `big` is one pixel of `small`: box halving recovers `small` exactly, and
    # the centre crop of a 16x24 image to 16x16 keeps columns 4..19.
    big = np.kron(small, np.ones((2, 2, 1), np.uint8))
    out = preprocess.center_crop_resize(big, 16)
    np.testing.assert_array_equal(out, small[:, 4:20])
    gray = preprocess.center_crop_resize(big[..., :1], 16)
    np.testing.assert_array_equal(gray, small[:, 4:20, :1])
    # A non-integer factor goes through bicubic resampling: compare with PIL on the cropped image.
    odd = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(odd).resize((24, 16), Image.BICUBIC))[:, 4:20]
    np.testing.assert_array_equal(preprocess.center_crop_resize(odd, 16), want)


def test_to_unit_range():
    np.testing.assert_allclose(
        preprocess.to_unit_range(np.array([0, 255], np.uint8)),
        [-1.0, 1.0],
    )
    np.testing.assert_allclose(
        preprocess.to_unit_range(np.array([0, 65535], np.uint16)),
        [-1.0, 1.0],
    )
    np.testing.assert_allclose(
        preprocess.to_unit_range(np.array([0.0, 0.5, 1.0])), [-1.0, 0.0, 1.0]
    )


def test_digits_images_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        digits_ds.digits_images(12)


def test_iterator_from_experiment_config(data_dir):
    import ml_collections  # pylint: disable=g-import-not-at-top

    config = ml_collections.ConfigDict()
    config.seed = 3
    config.data = ml_collections.ConfigDict(
        dict(
            name="sklearn_digits",
            data_dir=data_dir,
            image_size=8,
            num_channels=1,
            random_flip=False,
            use_labels=True,
            batch_size=16,
        )
    )
    it, shape = data_lib.iterator_from_config(config, start_step=4)
    assert shape == (8, 8, 1) and it.step == 4
    direct = data_lib.make_image_iterator(
        _cfg(data_dir, name="sklearn_digits"), 16, seed=3, start_step=4
    )
    np.testing.assert_array_equal(next(it)["image"], next(direct)["image"])


@pytest.mark.slow
def test_concurrent_builds_of_the_digits_all_succeed(tmp_path):
    """The hosts of a job sharing data_dir (or two jobs) build the digits at the same moment: the
    first to finish wins, the others use its copy instead of failing on the rename."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from consistency_jax import data as d; "
        "b = d.ensure_digits_dataset(sys.argv[1], 8); print('EXAMPLES', len(b.as_data_source('train')))"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "tfds")],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "EXAMPLES 1500" in out, out[-3000:]
    assert os.listdir(tmp_path / "tfds" / "sklearn_digits" / "8") == ["1.0.0"]  # nothing left over


def test_a_build_that_loses_the_race_uses_the_winners_copy(tmp_path, digits_data_dir, monkeypatch):
    """The quick form of test_concurrent_builds_of_the_digits_all_succeed, in this process: another
    process renames its finished copy into place first (copied here from the session's digits), so
    this build's rename fails with FileExistsError: the winner's copy is used. A FileExistsError
    with no prepared copy in place is not hidden."""
    import os
    import shutil

    target = tmp_path / "tfds"
    real = tfds.core.DatasetBuilder.download_and_prepare

    def loses_the_race(self, *args, **kwargs):
        shutil.copytree(os.path.join(digits_data_dir, "sklearn_digits"), target / "sklearn_digits")
        raise FileExistsError("the winner renamed its copy first")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", loses_the_race)
    builder = data_lib.ensure_digits_dataset(str(target), 8)
    assert builder.is_prepared() and len(builder.as_data_source("train")) == 1500

    def fails(self, *args, **kwargs):
        raise FileExistsError("something else")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fails)
    with pytest.raises(FileExistsError, match="something else"):
        data_lib.ensure_digits_dataset(str(tmp_path / "other"), 8)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", real)
