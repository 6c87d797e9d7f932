"""Throughput of the sampling command on a trained run: its compiled generator against the bare
network forward, and the export writers (TFDS shards, .npz) against the images they write.

  python bench/sample_command_bench.py --workdir=runs/digits_ict --batch=512 --num_samples=10000

* generator: ``sample.make_generator`` (per-example noise from (seed, i), f_θ with its
  preconditioning, clip, uint8 quantisation on the device, indices put on the devices) for one
  batch; baseline: the raw network F_θ(x, c) on a pre-drawn batch, k times for k steps.
  efficiency = k · t_forward / t_generator (the aim is >= 0.95).
* export: ``export.TfdsExport.write_shard`` (PNG encoding, tf.train.Example serialisation, ArrayRecord
  and TFRecord files) and ``export.save_npz``, in images written per second.
* end to end: ``sample.run`` with --export_tfds on --num_samples samples (sampling + parts + shards +
  metadata + npz + grid), in images per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import timing  # noqa: E402

from consistency_jax import export, loading, methods, networks  # noqa: E402
from consistency_jax import sample as sample_lib  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--num_samples", type=int, default=10000)
    p.add_argument("--ts", default="", help="multistep times, e.g. 80,0.719 (default: one step)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    ts = tuple(float(v) for v in args.ts.split(",") if v)
    tmp = tempfile.mkdtemp()
    request = sample_lib.SampleRequest(
        workdir=args.workdir,
        out=os.path.join(tmp, "out"),
        per_device_batch=args.batch // jax.local_device_count(),
        sampler="multistep" if ts else "auto",
        ts=ts,
        num_samples=args.num_samples,
        examples_per_shard=2500,
        export_tfds="bench_samples",
        data_dir=os.path.join(tmp, "tfds"),
    )
    model = sample_lib.describe_run(request)
    _, params, _ = loading.load_eval_params(args.workdir)
    apply_fn = networks.make_apply_fn(methods.network(model.config))
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    generate = sample_lib.make_generator(request, model, apply_fn, mesh)
    k = max(1, len(sample_lib.sample_times(request, model)))
    x = jax.random.normal(jax.random.key(0), (args.batch,) + model.example_shape)
    c = jnp.full((args.batch,), 0.25 * np.log(80.0), jnp.float32)
    kw = {"labels": jnp.zeros((args.batch,), jnp.int32)} if model.num_classes else {}
    forward = jax.jit(lambda p, x, c: apply_fn(p, x, c, **kw))
    indices = np.arange(args.batch, dtype=np.int32)
    times, _ = timing.time_interleaved(
        {
            "forward": (timing.stateless(forward), None, (params, x, c)),
            "generator": (timing.stateless(lambda p, i: generate(p, i)), None, (params, indices)),
        },
        iters=args.iters,
        repeats=args.repeats,
    )
    print(
        f"# {timing.describe_device()}; run {args.workdir} ({model.config.method}), "
        f"{model.example_shape}, batch {args.batch}, {k} step(s)"
    )
    print(
        f"forward     {1e3 * times['forward']:9.2f} ms  {args.batch / times['forward']:10.1f} img/s"
    )
    print(
        f"generator   {1e3 * times['generator']:9.2f} ms  {args.batch / times['generator']:10.1f} img/s"
        f"  efficiency {k * times['forward'] / times['generator']:.3f}"
    )

    rng = np.random.default_rng(0)
    n = 2500
    images = (
        np.asarray(generate(params, np.arange(n, dtype=np.int32))[0])[:n]
        if n <= args.batch
        else np.concatenate(
            [
                np.asarray(generate(params, np.arange(b, b + args.batch, dtype=np.int32))[0])
                for b in range(0, n, args.batch)
            ]
        )[:n]
    )
    labels = rng.integers(0, model.num_classes or 1, n)
    exp = export.TfdsExport(
        os.path.join(tmp, "tfds_w"), "writer_bench", model.example_shape, model.num_classes, n, n
    )
    t0 = time.perf_counter()
    exp.write_shard(0, images, labels if model.num_classes else None)
    t_shard = time.perf_counter() - t0
    t0 = time.perf_counter()
    export.save_npz(os.path.join(tmp, "x.npz"), images, labels)
    t_npz = time.perf_counter() - t0
    print(f"tfds shard  {n / t_shard:10.1f} img/s written (array_record + tfrecord, PNG-encoded)")
    print(f"npz         {n / t_npz:10.1f} img/s written")
    t0 = time.perf_counter()
    summary = sample_lib.run(request)
    t_all = time.perf_counter() - t0
    print(
        f"end to end  {args.num_samples / t_all:10.1f} img/s ({args.num_samples} samples, export, npz, "
        f"grid; compile included: {t_all:.1f} s); generator alone {summary['images_per_s']} img/s"
    )


if __name__ == "__main__":
    main()
