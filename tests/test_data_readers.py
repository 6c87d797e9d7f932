"""Both readers of the image pipeline, and the real TFDS ``cifar10`` builder read by name.

``data_source``: array_record through ``tfds.data_source`` and grain, no TensorFlow.
``tfds_load``: tfrecord through ``tfds.load`` and tf.data (TensorFlow is a test dependency).
The same data prepared in both formats must give the same host shares, the same stored-order
arrays, and each reader an exactly resumable stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import real_tfds

from consistency_jax import data as data_lib
from consistency_jax.data import prepare, preprocess


@pytest.fixture(scope="module")
def digits_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for fmt in ("array_record", "tfrecord"):
        dirs[fmt] = str(tmp_path_factory.mktemp(f"digits_{fmt}"))
        builder = data_lib.ensure_digits_dataset(dirs[fmt], 8, file_format=fmt)
        assert builder.info.file_format.value == fmt
    return dirs


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    written = real_tfds.write_cifar10_binaries(str(root / "source"))
    dirs = {}
    for fmt in ("array_record", "tfrecord"):
        dirs[fmt] = str(root / fmt)
        builder = real_tfds.prepare_cifar10(dirs[fmt], str(root / "source"), fmt)
        assert builder.info.splits["train"].num_examples == 60
    return dirs, written


def _cfg(data_dir: str, **kwargs) -> data_lib.ImageDataConfig:
    values = dict(
        name="sklearn_digits/8",
        data_dir=data_dir,
        image_size=8,
        num_channels=1,
        random_flip=False,
        use_labels=True,
    )
    values.update(kwargs)
    return data_lib.ImageDataConfig(**values)


def _rows(batches) -> list[bytes]:
    return [
        img.tobytes() + bytes([lab]) for b in batches for img, lab in zip(b["image"], b["label"])
    ]


def _take(iterator, steps):
    return [next(iterator) for _ in range(steps)]


def _unflip(batch: dict, seed: int, step: int) -> dict:
    """The batch of ``step`` with the pipeline's random horizontal flips undone (host 0)."""
    flip = preprocess.flip_mask(seed, 0, step, batch["image"].shape[0])
    return {
        "image": np.where(flip[:, None, None, None], batch["image"][:, :, ::-1], batch["image"]),
        "label": batch["label"],
    }


def test_auto_reader_follows_the_prepared_format(digits_dirs):
    for fmt, reader in (("array_record", "data_source"), ("tfrecord", "tfds_load")):
        it = data_lib.make_image_iterator(_cfg(digits_dirs[fmt]), global_batch_size=4, seed=0)
        assert it.reader == reader
        batch = next(it)
        assert batch["image"].shape == (4, 8, 8, 1) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32


def test_both_readers_give_the_same_host_shares(digits_dirs):
    process_count, local = 3, 20  # 1500 / 3 = 500 examples per host = 25 local steps per epoch.
    union = []
    for p in range(process_count):
        shares = []
        for fmt in ("array_record", "tfrecord"):
            it = data_lib.make_image_iterator(
                _cfg(digits_dirs[fmt]),
                global_batch_size=local * process_count,
                seed=7,
                process_index=p,
                process_count=process_count,
            )
            assert it.examples_per_host == 500
            rows = _rows(_take(it, 25))
            assert len(set(rows)) == 500  # one epoch: a permutation of the share
            shares.append(sorted(rows))
        assert shares[0] == shares[1]
        union += shares[0]
    reference = data_lib.load_image_arrays(_cfg(digits_dirs["array_record"]))
    assert sorted(union) == sorted(_rows([reference]))


def test_stored_order_arrays_agree_between_readers(digits_dirs):
    for split in ("train", "test[:50%]"):
        a = data_lib.load_image_arrays(_cfg(digits_dirs["array_record"], split=split))
        b = data_lib.load_image_arrays(_cfg(digits_dirs["tfrecord"], split=split))
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_tfds_load_stream_resumes_exactly_and_reshuffles(digits_dirs):
    cfg = _cfg(digits_dirs["tfrecord"], random_flip=True, split="train[:600]")
    make = lambda **kw: data_lib.make_image_iterator(cfg, global_batch_size=12, seed=11, **kw)
    reference = _take(make(), 105)  # 50 steps per epoch: crosses two epoch boundaries.
    unflipped = [_rows([_unflip(b, 11, k)]) for k, b in enumerate(reference[:100])]
    first, second = sum(unflipped[:50], []), sum(unflipped[50:], [])
    stored = sorted(
        _rows([data_lib.load_image_arrays(_cfg(digits_dirs["tfrecord"], split="train[:600]"))])
    )
    assert sorted(first) == sorted(second) == stored  # each epoch is a permutation of the split
    assert first != second  # a new permutation every epoch

    started = make(start_step=97)
    for k in range(97, 105):
        batch = next(started)
        np.testing.assert_array_equal(batch["image"], reference[k]["image"])
        np.testing.assert_array_equal(batch["label"], reference[k]["label"])
    it = make()
    _take(it, 37)
    state = json.loads(json.dumps(it.get_state()))
    assert state["reader"] == "tfds_load" and state["step"] == 37
    resumed = make()
    resumed.set_state(state)
    for k in range(37, 41):
        np.testing.assert_array_equal(next(resumed)["image"], reference[k]["image"])
    other = data_lib.make_image_iterator(cfg, global_batch_size=12, seed=12)
    assert _rows(_take(other, 3)) != _rows(reference[:3])


def test_reader_errors_name_the_problem(digits_dirs, monkeypatch):
    with pytest.raises(
        ValueError, match="prepared as tfrecord; tfds.data_source reads array_record"
    ):
        data_lib.make_image_iterator(_cfg(digits_dirs["tfrecord"], reader="data_source"), 4, 0)
    with pytest.raises(ValueError, match="prepared as array_record; tfds.load reads tfrecord only"):
        data_lib.make_image_iterator(_cfg(digits_dirs["array_record"], reader="tfds_load"), 4, 0)
    with pytest.raises(ValueError, match="reader must be one of"):
        _cfg(digits_dirs["tfrecord"], reader="tf")
    with pytest.raises(ValueError, match="shuffle_buffer must be a non-negative integer"):
        _cfg(digits_dirs["tfrecord"], shuffle_buffer=-1)
    grain_state = data_lib.make_image_iterator(_cfg(digits_dirs["array_record"]), 4, 0).get_state()
    tf_it = data_lib.make_image_iterator(_cfg(digits_dirs["tfrecord"]), 4, 0)
    with pytest.raises(
        ValueError, match="reader='data_source' but this iterator has reader='tfds_load'"
    ):
        tf_it.set_state(grain_state)
    monkeypatch.setattr(prepare, "tensorflow_available", lambda: False)
    with pytest.raises(ValueError, match="needs TensorFlow, and TensorFlow is not installed"):
        data_lib.make_image_iterator(_cfg(digits_dirs["tfrecord"]), 4, 0)


def _pixel_rows(batches) -> list[bytes]:
    """Rows mapped back to 8-bit pixels, (x + 1) 255 / 2 in float64, after checking the range."""
    out = []
    for b in batches:
        pixels = (b["image"].astype(np.float64) + 1.0) * 255.0 / 2.0
        np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-4)  # exactly k / 255 steps
        out += [
            p.tobytes() + bytes([int(lab)])
            for p, lab in zip(np.rint(pixels).astype(np.uint8), b["label"])
        ]
    return sorted(out)


def test_cifar10_by_name_through_both_readers(cifar):
    from conftest import load_config

    dirs, written = cifar
    for fmt, reader in (("array_record", "data_source"), ("tfrecord", "tfds_load")):
        config = load_config("cifar10", "method=ct")
        config.data.data_dir = dirs[fmt]
        config.data.batch_size = 12
        config.data.use_labels = True  # cifar10 has labels; the paper's CIFAR models ignore them
        assert config.data.name == "cifar10" and config.data.random_flip
        it, shape = data_lib.iterator_from_config(config)
        assert it.reader == reader and shape == (32, 32, 3)
        batches = _take(it, 5)  # one epoch of 60
        assert all(
            b["image"].shape == (12, 32, 32, 3) and b["image"].dtype == np.float32 for b in batches
        )
        seed = config.data.get("seed", config.seed)
        restored = [_unflip(b, seed, k) for k, b in enumerate(batches)]
        images, labels = written["train"]
        assert _pixel_rows(restored) == _pixel_rows(
            [{"image": images / 127.5 - 1.0, "label": labels}]
        )
        test = data_lib.load_image_arrays(
            data_lib.ImageDataConfig(
                name="cifar10",
                data_dir=dirs[fmt],
                split="test",
                image_size=32,
                num_channels=3,
                use_labels=True,
            )
        )
        images, labels = written["test"]
        assert _pixel_rows([test]) == _pixel_rows(
            [{"image": images / 127.5 - 1.0, "label": labels}]
        )


def test_resized_cifar10_is_the_same_through_both_readers(cifar):
    dirs, _ = cifar
    cfgs = {
        fmt: data_lib.ImageDataConfig(
            name="cifar10",
            data_dir=dirs[fmt],
            image_size=16,
            num_channels=3,
            resize=True,
            random_flip=False,
            use_labels=True,
        )
        for fmt in dirs
    }
    arrays = {fmt: data_lib.load_image_arrays(cfg) for fmt, cfg in cfgs.items()}
    np.testing.assert_array_equal(arrays["array_record"]["image"], arrays["tfrecord"]["image"])
    assert arrays["tfrecord"]["image"].shape == (60, 16, 16, 3)
    streams = {
        fmt: _rows(_take(data_lib.make_image_iterator(cfg, 10, seed=1), 6))
        for fmt, cfg in cfgs.items()
    }  # the tf.data stream resizes in tf.numpy_function
    assert (
        sorted(streams["tfrecord"])
        == sorted(streams["array_record"])
        == sorted(_rows([arrays["array_record"]]))
    )
    with pytest.raises(ValueError, match="set resize=True"):
        data_lib.make_image_iterator(
            data_lib.ImageDataConfig(name="cifar10", data_dir=dirs["tfrecord"], image_size=16), 4, 0
        )


_WITHOUT_TF = r"""
import importlib.util, site, sys
site.addsitedir(sys.argv[1])  # the environment's packages, TensorFlow left out (python -S)
assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is still importable"
from consistency_jax import data as data_lib
assert not data_lib.tensorflow_available()
cfg = data_lib.ImageDataConfig(name="sklearn_digits/8", data_dir=sys.argv[2], image_size=8,
                               num_channels=1, random_flip=True, use_labels=True)
it = data_lib.make_image_iterator(cfg, global_batch_size=16, seed=0)
batches = [next(it) for _ in range(3)]
assert it.reader == "data_source" and batches[2]["image"].shape == (16, 8, 8, 1)
test = data_lib.load_image_arrays(data_lib.ImageDataConfig(
    name="sklearn_digits/8", data_dir=sys.argv[2], split="test", image_size=8, num_channels=1))
assert test["image"].shape == (297, 8, 8, 1)
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
print("OK without tensorflow")
"""


@pytest.mark.slow
def test_data_source_reader_needs_no_tensorflow(tmp_path):
    from conftest import site_without_tensorflow

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    result = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            _WITHOUT_TF,
            site_without_tensorflow(tmp_path),
            str(tmp_path / "tfds"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK without tensorflow" in result.stdout


def test_no_module_imports_tensorflow_when_it_is_imported():
    """The quick form of test_data_source_reader_needs_no_tensorflow (which needs a fresh
    interpreter without TensorFlow): no module of the package imports TensorFlow at module level
    (only inside the tfds_load reader), so importing the package and reading through data_source
    never needs it. The in-process data_source tests above read the same data."""
    import ast
    import pathlib

    pkg = pathlib.Path(data_lib.__file__).resolve().parent
    if pkg.name != "consistency_jax":  # data/ as a package
        pkg = pkg.parent
    found, inside = [], []
    for path in sorted(pkg.rglob("*.py")):
        tree = ast.parse(path.read_text())
        functions = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "tensorflow" or n.startswith("tensorflow.") for n in names):
                (inside if id(node) in functions else found).append(f"{path.name}:{node.lineno}")
    assert found == []
    assert inside  # the tfds_load reader does import it: the walk sees imports in functions
