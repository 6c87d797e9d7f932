"""Step time of the sharded train step on 1, 2, 4 and 8 devices at the same global batch.

  python bench/scaling_bench.py --network=ncsnpp --image_size=16 --batch=32       # forced CPU devices
  python bench/scaling_bench.py --devices=1,2,4,8 --platform=gpu --network=ncsnpp --batch=256

On CPU each device count runs in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (XLA fixes the device count when it starts).
The virtual CPU devices share the machine's cores, so on CPU the table measures the cost of
partitioning and collectives, not a speed-up. With ``--platform=gpu`` / ``tpu`` each process sees
the first N real devices (``CUDA_VISIBLE_DEVICES`` / ``TPU_VISIBLE_CHIPS`` are not touched: the
mesh is built from ``jax.devices()[:N]``). ``--fsdp=2`` shards the state over pairs of devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--platform", default="cpu", choices=["cpu", "gpu", "tpu"])
    p.add_argument("--method", default="ct", choices=["ct", "cd", "edm"])
    sys.path.insert(0, HERE)
    import timing  # the parent never starts a JAX backend: each device count runs in a subprocess

    timing.add_network_args(p, batch=32)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def worker(args) -> dict:
    """Runs inside the subprocess: times the train step on the first ``args.worker`` devices."""
    sys.path.insert(0, HERE)
    sys.path.insert(0, REPO)
    import jax
    import timing
    import train_step_bench

    from consistency_jax import sharding

    n = args.worker
    if jax.device_count() < n:
        raise SystemExit(f"Only {jax.device_count()} devices, {n} requested.")
    ints = lambda s: tuple(int(v) for v in s.split(",") if v.strip())
    module, example_shape = timing.build_network(
        args.network,
        args.image_size,
        args.dtype,
        nf=args.nf,
        ch_mult=ints(args.ch_mult),
        num_res_blocks=args.num_res_blocks,
        attn=ints(args.attn),
        hidden=args.hidden,
    )
    fsdp = min(args.fsdp, n)
    mesh = sharding.make_mesh(n // fsdp, fsdp, devices=jax.devices()[:n])
    sharding.check_global_batch(args.batch, mesh, name="--batch")
    r = train_step_bench.bench_method(
        args.method, args, module, example_shape, mesh, baselines=False
    )
    return {
        "devices": n,
        "mesh": dict(mesh.shape),
        "step_s": r["step_s"],
        "images_per_s": r["images_per_s"],
    }


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        args.loop = False
        args.peak_tflops = 0.0
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    counts = [int(v) for v in args.devices.split(",")]
    passthrough = [
        a
        for a in (argv if argv is not None else sys.argv[1:])
        if not a.startswith(("--devices", "--json"))
    ]
    rows = []
    for n in counts:
        env = dict(os.environ)
        if args.platform == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = " ".join(
                filter(
                    None, [env.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={n}"]
                )
            )
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *passthrough, f"--worker={n}"],
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{n} devices failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
        r = rows[-1]
        print(f"{n} device(s) done: {1e3 * r['step_s']:.2f} ms/step", file=sys.stderr, flush=True)
    base = rows[0]["step_s"]
    print(
        f"# {args.method} {args.network} image={args.image_size} batch={args.batch} "
        f"dtype={args.dtype} fsdp={args.fsdp} platform={args.platform}"
    )
    print(f"| devices | mesh (data×fsdp) | step ms | images/s | step time / {counts[0]}-device |")
    print("|---|---|---|---|---|")
    for r in rows:
        m = r["mesh"]
        print(
            f"| {r['devices']} | {m['data']}×{m['fsdp']} | {1e3 * r['step_s']:.2f} | "
            f"{r['images_per_s']:.1f} | {r['step_s'] / base:.3f} |"
        )
    import timing

    timing.write_json(args.json, args, rows, device=False)
    return rows


if __name__ == "__main__":
    main()
