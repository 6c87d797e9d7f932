"""Device memory of the train step, and the largest batch that fits, for CT, CD-Heun and EDM.

  python bench/memory_bench.py --network=ncsnpp --image_size=16 --batches=8,32 --method=all
  # the CIFAR-10 NCSN++ on a GPU: memory at batch 128 and 512, and the largest batch per method
  python bench/memory_bench.py --network=ncsnpp --image_size=32 --nf=128 --ch_mult=2,2,2 \
      --num_res_blocks=4 --attn=16 --dtype=bfloat16 --batches=128,512 --find_max --method=all

For each batch it compiles the sharded, state-donating train step (the one the training loop runs)
and reports XLA's buffer plan from ``compiled.memory_analysis()``: arguments (state + batch), outputs,
temporaries, the bytes the donated state aliases, and the planned peak = arguments + outputs +
temporaries − aliased. With ``--run`` (default on GPU/TPU) it also runs the step twice and reads the
device allocator's ``peak_bytes_in_use`` (not available on CPU). All sizes are per device.

``--find_max`` searches the largest global batch (a multiple of the device count) whose planned peak
stays within the device's ``bytes_limit`` (or ``--limit_gb``): doubling from the largest batch listed,
then bisection; on an accelerator the answer is confirmed by running the step at that batch.
The buffer plan is the compiler's and is platform specific: figures from XLA:CPU describe XLA:CPU.

``--init=CONFIG[:ARGS],...`` instead plans the *creation* of the train state of paper configs (θ, θ⁻,
eval EMAs, optimizer state; nothing is run or allocated, only compiled) on a mesh with ``--fsdp``:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python bench/memory_bench.py \
      --init=cifar10:method=ct,lsun256:method=ct --fsdp=8

"whole on one device" is the state initialised on one device and then copied onto the mesh (what the
loop did before ``build.init_state``: the peak of device 0 is at least the whole state); "born sharded"
is ``build.init_state``: one jit whose ``out_shardings`` write every device's share directly. Both are
XLA's planned peak of device 0 (outputs + temporaries) in GiB.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import timing  # noqa: E402
import train_step_bench  # noqa: E402

from consistency_jax import sharding  # noqa: E402

GB = 1024**3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="all", choices=["ct", "cd", "edm", "all"])
    timing.add_network_args(p, batch=32)
    p.add_argument("--batches", default="", help="global batches to report (default: --batch)")
    p.add_argument("--fsdp", type=int, default=1, help="fsdp size of the mesh")
    p.add_argument(
        "--microbatches", type=int, default=1, help="gradient accumulation (train.microbatches)"
    )
    p.add_argument("--find_max", action="store_true", help="search the largest batch that fits")
    p.add_argument(
        "--limit_gb",
        type=float,
        default=0.0,
        help="memory per device for --find_max (default: the device's bytes_limit)",
    )
    p.add_argument("--max_search", type=int, default=1 << 16, help="largest batch --find_max tries")
    p.add_argument(
        "--run",
        default="auto",
        choices=["auto", "yes", "no"],
        help="also run the step and read the allocator's peak (auto: not on CPU)",
    )
    p.add_argument(
        "--init",
        default="",
        help="plan the creation of the train state of these configs (e.g. "
        "cifar10:method=ct,lsun256:method=ct) instead of the step",
    )
    p.add_argument(
        "--min_size", type=int, default=-1, help="--init: fsdp_min_size (default: the config's)"
    )
    p.add_argument("--json", default="", help="write the results to this file")
    return p.parse_args(argv)


def init_plan(config_arg: str, fsdp: int, min_size: int = -1) -> dict:
    """Planned device-0 peak of creating a paper config's train state, whole vs born sharded."""
    from consistency_jax import build, methods
    from consistency_jax.config import load_config
    from consistency_jax.train_state import TrainState

    name, _, arg = config_arg.partition(":")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", f"{name}.py"), arg or None)
    spec = methods.get(config.method)
    size = config.data.image_size
    shape = (size, size, config.data.num_channels)
    _, apply_fn, init = build.build_network(config, shape)
    tx, _ = build.make_optimizer(config)
    config.loss.distance = (
        "l2"  # the distance (LPIPS weights) and a teacher do not change the state
    )
    method = build.build_method(
        config,
        spec,
        apply_fn,
        None,
        shape,
        build.build_distance(config, spec, shape),
        lambda *a: None,
    )
    rates = tuple(float(r) for r in config.train.ema_rates)
    rng = jax.random.key(0)

    def create():
        return TrainState.create(init(rng), tx, ema_rates=rates, use_target=method.keeps_target)

    abstract = jax.eval_shape(create)
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    mesh = sharding.make_mesh(-1, fsdp)
    min_size = config.mesh.fsdp_min_size if min_size < 0 else min_size
    out = {
        "config": config_arg,
        "params": n_params,
        "fsdp": fsdp,
        "min_size": min_size,
        "copies": 1 + int(method.keeps_target) + len(rates),
        "state_bytes": whole,
    }
    for key, shardings in (
        ("whole", None),
        ("born_sharded", sharding.state_shardings(abstract, mesh, min_size=min_size)),
    ):
        jitted = jax.jit(create) if shardings is None else jax.jit(create, out_shardings=shardings)
        ma = jitted.lower().compile().memory_analysis()
        out[key] = None if ma is None else int(ma.output_size_in_bytes + ma.temp_size_in_bytes)
    return out


def _device_stats() -> dict:
    try:
        return jax.local_devices()[0].memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (platforms without allocator statistics)
        return {}


def measure(method: str, batch: int, args, module, example_shape, mesh, run: bool) -> dict:
    """Compiles (and optionally runs) the step at ``batch``; per-device bytes."""
    built = train_step_bench.build_step(method, args, module, example_shape, mesh, batch_size=batch)
    compiled = built["step"].jitted.lower(built["state"], built["batch"], built["rng"]).compile()
    ma = compiled.memory_analysis()
    out = {"method": method, "batch": batch}
    if ma is None:
        out["planned_peak_bytes"] = None
    else:
        out.update(
            argument_bytes=ma.argument_size_in_bytes,
            output_bytes=ma.output_size_in_bytes,
            temp_bytes=ma.temp_size_in_bytes,
            alias_bytes=ma.alias_size_in_bytes,
        )
        out["planned_peak_bytes"] = (
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes
        )
    out["state_bytes"] = sum(
        x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(built["state"])
    )
    if run:
        state = built["state"]
        for _ in range(2):
            state, metrics = built["step"](state, built["batch"], built["rng"])
        jax.block_until_ready((state, metrics))
        out["allocator_peak_bytes"] = _device_stats().get("peak_bytes_in_use")
    return out


def find_max(
    method: str, args, module, example_shape, mesh, limit: int, start: int, run: bool
) -> dict:
    """Largest multiple of the device count whose planned peak fits in ``limit`` bytes."""
    n = mesh.size
    fits = lambda b: (
        (
            measure(method, b, args, module, example_shape, mesh, run=False)["planned_peak_bytes"]
            or 0
        )
        <= limit
    )
    lo = max(n, start // n * n)
    if not fits(lo):
        hi = lo
        lo = 0
    else:
        hi = lo * 2
        while hi <= args.max_search and fits(hi):
            lo, hi = hi, hi * 2
    while hi - lo > n:  # bisection over multiples of n
        mid = (lo + hi) // 2 // n * n
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    out = {"method": method, "max_batch": lo, "limit_bytes": limit}
    if lo and run:  # confirm on the device
        out["confirmed"] = measure(method, lo, args, module, example_shape, mesh, run=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.init:
        print(
            f"# {timing.describe_device()}; {jax.device_count()} devices; fsdp={args.fsdp}; "
            "planned peak of device 0, GiB"
        )
        rows = []
        for config_arg in args.init.split(","):
            r = init_plan(config_arg, args.fsdp, args.min_size)
            rows.append(r)
            print(
                f"{r['config']:22s} {r['params'] / 1e6:7.1f}M params × {r['copies']} copies + optimizer "
                f"state = {r['state_bytes'] / GB:6.2f} GiB | whole on one device "
                f"{r['whole'] / GB:6.2f} | born sharded (min_size {r['min_size']}) "
                f"{r['born_sharded'] / GB:6.3f}",
                flush=True,
            )
        timing.write_json(args.json, args, rows)
        return rows
    module, example_shape = timing.build_network(
        args.network,
        args.image_size,
        args.dtype,
        nf=args.nf,
        ch_mult=train_step_bench._ints(args.ch_mult),
        num_res_blocks=args.num_res_blocks,
        attn=train_step_bench._ints(args.attn),
        hidden=args.hidden,
    )
    mesh = sharding.make_mesh(-1, args.fsdp)
    platform = jax.devices()[0].platform
    run = args.run == "yes" or (args.run == "auto" and platform != "cpu")
    batches = train_step_bench._ints(args.batches) or (args.batch,)
    for b in batches:
        sharding.check_global_batch(b, mesh, name="--batches")
    methods = ["ct", "cd", "edm"] if args.method == "all" else [args.method]
    print(f"# {timing.describe_device()}; {sharding.describe(mesh)}")
    print(
        f"# network={args.network} {example_shape} dtype={args.dtype} microbatches={args.microbatches}; "
        "GiB per device"
    )
    rows = []
    for m in methods:
        for b in batches:
            r = measure(m, b, args, module, example_shape, mesh, run)
            rows.append(r)
            gib = lambda key: f"{r[key] / GB:7.3f}" if r.get(key) is not None else "    n/a"
            print(
                f"{m:4s} batch {b:6d}  planned peak {gib('planned_peak_bytes')}  (args "
                f"{gib('argument_bytes')}, temps {gib('temp_bytes')}, out {gib('output_bytes')}, "
                f"aliased {gib('alias_bytes')}; state {gib('state_bytes')})  allocator peak "
                f"{gib('allocator_peak_bytes')}",
                flush=True,
            )
        if args.find_max:
            limit = (
                int(args.limit_gb * GB) if args.limit_gb > 0 else _device_stats().get("bytes_limit")
            )
            if not limit:
                raise SystemExit(
                    "--find_max needs --limit_gb on a device without bytes_limit (CPU)."
                )
            r = find_max(m, args, module, example_shape, mesh, limit, max(batches), run)
            rows.append(r)
            print(f"{m:4s} largest batch within {limit / GB:.2f} GiB: {r['max_batch']}", flush=True)
    timing.write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
