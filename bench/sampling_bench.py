"""One-step and two-step consistency sampling throughput against the bare network forward.

  python bench/sampling_bench.py --network=ncsnpp --image_size=16 --batch=64
  python bench/sampling_bench.py --network=ncsnpp --image_size=32 --batch=512 --dtype=bfloat16 \
      --nf=128 --ch_mult=2,2,2 --num_res_blocks=4 --attn=16

The samplers are ``consistency_jax.samplers.multistep_sample`` (CM Algorithm 1) jitted end to end:
noise drawn on the device, f_θ = c_skip·x + c_out·F_θ(c_in·x, c_noise), the boundary select and the
[−1, 1] clip. The baseline is the raw network F_θ(x, c) on a pre-drawn input, k times for k steps.
efficiency = k · t_forward / t_sampler (images/s of the sampler ÷ images/s of k bare forwards); the
aim is ≥ 0.95.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import timing  # noqa: E402

from consistency_jax import samplers  # noqa: E402
from consistency_jax.networks import make_apply_fn  # noqa: E402
from consistency_jax.parameterization import SigmaConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    timing.add_network_args(p, batch=64)
    p.add_argument("--method", default="ct", help="unused (the sampler is the same); for the log")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
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
    sigmas = SigmaConfig()
    apply_fn = make_apply_fn(module)
    shape = (args.batch,) + example_shape
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    params = jax.jit(lambda r: module.init(r, x[:1], jnp.zeros((1,)))["params"])(jax.random.key(1))
    c = jnp.full((args.batch,), 0.25 * jnp.log(sigmas.sigma_max), jnp.float32)
    clip = 1.0 if len(example_shape) == 3 else None

    forward = jax.jit(lambda p, x, c: apply_fn(p, x, c))
    rng = jax.random.key(2)
    cases = {"forward": (timing.stateless(forward), None, (params, x, c))}
    steps = {"1-step": (sigmas.sigma_max,), "2-step": (sigmas.sigma_max, 0.8)}
    for name, ts in steps.items():
        sampler = jax.jit(
            lambda p, r, ts=ts: samplers.multistep_sample(
                apply_fn, p, r, shape, ts, sigmas, clip=clip
            )
        )
        cases[name] = (timing.stateless(sampler), None, (params, rng))
    times, _ = timing.time_interleaved(cases, iters=args.iters, repeats=args.repeats)
    t_fwd = times["forward"]
    print(f"# {timing.describe_device()}")
    print(f"# network={args.network} {example_shape} dtype={args.dtype} batch={args.batch}")
    print(f"forward        {1e3 * t_fwd:8.3f} ms  {args.batch / t_fwd:10.1f} img/s")
    rows = [{"name": "forward", "s": t_fwd}]
    for name, ts in steps.items():
        t = times[name]
        eff = len(ts) * t_fwd / t
        rows.append({"name": name, "s": t, "efficiency": eff})
        print(f"{name:14s} {1e3 * t:8.3f} ms  {args.batch / t:10.1f} img/s  efficiency {eff:.3f}")
    timing.write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
