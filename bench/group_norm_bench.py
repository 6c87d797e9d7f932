"""``layers.GroupNorm``: the one-pass E[x²] − μ² statistics it had before issue 29 against the shifted
one-pass statistics it has now, in whole networks (same parameters, same inputs, one process).

  python bench/group_norm_bench.py --network=adm --nf=64 --image_size=32 --batch=8
  python bench/group_norm_bench.py --network=ncsnpp --nf=32 --image_size=32 --batch=8
  python bench/group_norm_bench.py --network=digits   # the digits config's DDPM++ (8x8x1)

Prints the largest output difference between the two and the forward and forward+backward times,
timed round-robin after compiling (see bench/layers_before_after.py, whose helpers it uses).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from bench.layers_before_after import build, passes, random_params  # noqa: E402
from consistency_jax.networks import layers as L  # noqa: E402
from consistency_jax.networks.ncsnpp import NCSNpp  # noqa: E402


class GroupNorm(nn.Module):  # named as the layer it stands in for (flax names scopes by class)
    """The layer before issue 29: σ² = E[x²] − μ², y = x·a + (β − μ·a)."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: object = None
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, g = x.shape[-1], self.num_groups
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        batch = x.shape[0]
        xf = x.astype(jnp.float32)
        xg = xf.reshape(batch, -1, g, c // g)
        mean = jnp.mean(xg, axis=(1, 3))
        var = jnp.maximum(jnp.mean(jnp.square(xg), axis=(1, 3)) - jnp.square(mean), 0.0)
        inv = jax.lax.rsqrt(var + self.epsilon)
        a = inv[:, :, None] * scale.astype(jnp.float32).reshape(g, c // g)
        b = bias.astype(jnp.float32).reshape(g, c // g) - mean[:, :, None] * a
        bshape = (batch,) + (1,) * (x.ndim - 2) + (c,)
        return (xf * a.reshape(bshape) + b.reshape(bshape)).astype(self.dtype or x.dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--network", default="adm", choices=["ncsnpp", "adm", "digits"])
    p.add_argument("--nf", type=int, default=64)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    channels = 3
    if args.network == "digits":
        module = NCSNpp(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
        args.image_size, channels = 8, 1
    else:
        module = build(args)
    rs = np.random.RandomState(0)
    x = jnp.asarray(
        rs.normal(size=(args.batch, args.image_size, args.image_size, channels)), jnp.float32
    )
    c = jnp.asarray(rs.uniform(-1.5, 1.0, args.batch), jnp.float32)
    params = random_params(module, x, c)
    built = {}
    new = L.GroupNorm
    try:
        L.GroupNorm = GroupNorm
        built["before"] = passes(module, params, x, c)
    finally:
        L.GroupNorm = new
    built["after"] = passes(module, params, x, c)
    ya, yb = built["after"][0](params), built["before"][0](params)
    diff = float(jnp.max(jnp.abs(ya.astype(jnp.float32) - yb.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(yb.astype(jnp.float32))))
    fns = {}
    for side in ("before", "after"):
        fwd, fwd_bwd = built[side]
        fns[f"{side}_fwd"] = lambda fwd=fwd: fwd(params)
        fns[f"{side}_fwd_bwd"] = lambda fwd_bwd=fwd_bwd: fwd_bwd(params)
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    print(
        f"# {args.network} {args.image_size}x{args.image_size}x{channels} batch {args.batch} "
        f"{args.dtype}; {L.count_params(params) / 1e6:.3f}M params; {jax.devices()[0].platform}, "
        f"JAX {jax.__version__}"
    )
    print(f"max |shifted - one-pass| = {diff:.2e} (output scale {scale:.2e})")
    for pas in ("fwd", "fwd_bwd"):
        b, a = med[f"before_{pas}"], med[f"after_{pas}"]
        print(f"{pas:8s} one-pass {b:9.1f} ms   shifted {a:9.1f} ms   ratio {a / b:5.2f}")


if __name__ == "__main__":
    main()
