"""FID Inception-v3 feature throughput: the batched extractor against the bare network forward.

  python bench/inception_bench.py --batch=8 --image_size=32 --batches=2
  python bench/inception_bench.py --batch=500 --image_size=32 --batches=20   # an accelerator

Two figures, timed in round-robin (``timing.time_interleaved``):

* bare: ``InceptionV3.apply`` compiled as the extractor compiles it (``CompiledOnDevices``) on a
  preprocessed (B, 299, 299, 3) float32 batch already on the device (the network alone);
* extractor: ``InceptionFeatureExtractor`` on ``--batches`` uint8 NumPy batches of
  ``--image_size``² images (host→device transfer, TF1 resize, padding, the network, device→host
  of pool features and logits), the way evaluation runs.

efficiency = extractor images/s ÷ bare images/s (aim ≥ 0.9 on an accelerator; on CPU the resize and
transfers are a small part of a 5.7 GFLOP forward). The time for 50 000 images is extrapolated
from the extractor's rate per device. Weights are random (``tools/make_inception_fixture.py``):
speed does not depend on them; FIDs do, and need the real weights.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import timing  # noqa: E402

from consistency_jax.metrics import inception_v3 as I  # noqa: E402


def fixture_tool():
    """``tools/make_inception_fixture.py`` as a module."""
    import importlib.util

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "tools",
        "make_inception_fixture.py",
    )
    spec = importlib.util.spec_from_file_location("_make_inception_fixture", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def random_state_dict() -> dict:
    """The random FID Inception-v3 state dict of ``tools/make_inception_fixture.py`` (pytorch-fid's
    names, drawn from the library's table of names and shapes)."""
    return fixture_tool().random_inception_state_dict(I.inception_tensor_shapes())


def _random_variables():
    return I.variables_from_tensors(random_state_dict())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images per compiled batch (all devices)")
    p.add_argument("--batches", type=int, default=2, help="batches per extractor call")
    p.add_argument("--image_size", type=int, default=32, help="side of the uint8 input images")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    variables = _random_variables()
    extractor = I.InceptionFeatureExtractor(variables, batch_size=args.batch)
    batch = extractor.batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(
        0, 256, (batch * args.batches, args.image_size, args.image_size, 3), dtype=np.uint8
    )
    x = jax.device_put(I.preprocess(images[:batch]), extractor._batch_sharding)
    flops = timing.xla_flops(jax.jit(I.InceptionV3().apply), extractor.variables, x)
    # Built as the extractor builds it (on CPU with its XLA options, else its CPU forms), so that
    # the two figures differ only by what the extractor adds around the network.
    bare = I.CompiledOnDevices(
        I.InceptionV3().apply,
        extractor._batch_sharding,
        I.CPU_COMPILER_OPTIONS,
        I.InceptionV3(cpu_forms=True).apply,
    )
    times, _ = timing.time_interleaved(
        {
            "bare": (timing.stateless(bare), None, (extractor.variables, x)),
            "extractor": (timing.stateless(lambda: extractor(images).pool), None, ()),
        },
        iters=args.iters,
        repeats=args.repeats,
        warmup=1,
    )
    bare_rate = batch / times["bare"]
    ext_rate = images.shape[0] / times["extractor"]
    devices = extractor.num_devices
    print(f"device: {timing.describe_device()}")
    print(
        f"batch {batch}, {args.batches} batches of {args.image_size}x{args.image_size} uint8 per call"
    )
    if flops:
        print(f"XLA FLOPs per image (forward at 299x299): {flops / batch / 1e9:.2f} G")
    print(
        f"bare network forward: {bare_rate:.2f} images/s ({times['bare'] * 1e3:.0f} ms per batch)"
    )
    print(
        f"extractor (uint8 in, features out): {ext_rate:.2f} images/s; efficiency {ext_rate / bare_rate:.3f}"
    )
    per_device = ext_rate / devices
    print(
        f"50k images: {50000 / ext_rate / 60:.1f} min on these {devices} device(s) "
        f"({50000 / per_device / 60:.1f} min per device at {per_device:.2f} images/s/device)"
    )


if __name__ == "__main__":
    main()
