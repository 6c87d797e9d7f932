"""Network passes with the fast layers against the formulations they replaced, same parameters.

  python bench/layers_before_after.py --network=ncsnpp --nf=32 --image_size=32 --batch=8
  python bench/layers_before_after.py --network=adm --nf=64 --image_size=32 --batch=8

"before" swaps back, in this process, the three formulations that issue 18 replaced —
``flax.linen.GroupNorm``, FIR resampling as a depthwise convolution with the 2-D kernel, and
``jax.nn.dot_product_attention`` — and "after" is the library as it is (``layers.GroupNorm``, the
separable strided-slice FIR, einsum attention). Both run the same parameter tree (checked) on the same
inputs; the script prints the largest output difference and the forward and forward+backward times,
timed round-robin (before, after, before, after, ...) after compiling.

NCSN++ uses all three (GroupNorm everywhere, FIR in every up/down block, attention at 16);
the ADM UNet uses GroupNorm and attention (its resampling is nearest / average pooling).
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

from consistency_jax.networks import fir  # noqa: E402
from consistency_jax.networks import layers as L  # noqa: E402
from consistency_jax.networks.ncsnpp import NCSNpp  # noqa: E402
from consistency_jax.networks.unet import ADMUNet  # noqa: E402

# (module, name) -> the formulation it replaced.
OLD = {
    (L, "GroupNorm"): nn.GroupNorm,
    (fir, "_fir_taps"): lambda k, scale=1.0: fir.setup_fir_kernel(k) * np.float32(scale),
    (L, "_attention"): lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
}


def build(args):
    dtype = jnp.dtype(args.dtype)
    if args.network == "ncsnpp":
        return NCSNpp(
            nf=args.nf, ch_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dtype=dtype
        )
    return ADMUNet(
        model_channels=args.nf,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16, 8),
        num_head_channels=32,
        num_classes=None,
        dtype=dtype,
    )


def random_params(module, x, c):
    """The initial parameters plus N(0, 0.02²) noise: the zero-initialised output layers would
    otherwise make every output exactly 0 and the comparison of values empty."""
    params = module.init(jax.random.PRNGKey(0), x[:1], c[:1])["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(
        tree, [a + 0.02 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    )


def passes(module, params, x, c):
    """Forward and forward+backward, compiled now (so that the layers in effect now are used)."""
    f = lambda p: module.apply({"params": p}, x, c)
    g = jax.grad(lambda p: jnp.mean(f(p).astype(jnp.float32) ** 2))
    return jax.jit(f).lower(params).compile(), jax.jit(g).lower(params).compile()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--network", default="ncsnpp", choices=["ncsnpp", "adm"])
    p.add_argument("--nf", type=int, default=32)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.normal(size=(args.batch, args.image_size, args.image_size, 3)), jnp.float32)
    c = jnp.asarray(rs.uniform(-1.5, 1.0, args.batch), jnp.float32)
    module = build(args)
    params = random_params(module, x, c)
    built = {}
    saved = {(mod, name): getattr(mod, name) for mod, name in OLD}
    try:
        for (mod, name), v in OLD.items():
            setattr(mod, name, v)
        pb = module.init(jax.random.PRNGKey(0), x[:1], c[:1])["params"]
        assert jax.tree.structure(pb) == jax.tree.structure(params), "parameter trees differ"
        built["before"] = passes(module, params, x, c)
    finally:
        for (mod, name), v in saved.items():
            setattr(mod, name, v)
    built["after"] = passes(module, params, x, c)
    pa = params
    ya, yb = built["after"][0](pa), built["before"][0](pa)
    diff = float(jnp.max(jnp.abs(ya.astype(jnp.float32) - yb.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(yb.astype(jnp.float32))))
    fns = {}
    for side in ("before", "after"):
        fwd, fwd_bwd = built[side]
        fns[f"{side}_fwd"] = lambda fwd=fwd: fwd(pa)
        fns[f"{side}_fwd_bwd"] = lambda fwd_bwd=fwd_bwd: fwd_bwd(pa)
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    n = L.count_params(pa)
    print(
        f"# {args.network} nf={args.nf} {args.image_size}x{args.image_size} batch {args.batch} "
        f"{args.dtype}; {n / 1e6:.3f}M params; {jax.devices()[0].platform}, JAX {jax.__version__}"
    )
    print(f"max |after - before| = {diff:.2e} (output scale {scale:.2e})")
    for pas in ("fwd", "fwd_bwd"):
        b, a = med[f"before_{pas}"], med[f"after_{pas}"]
        print(f"{pas:8s} before {b:9.1f} ms   after {a:9.1f} ms   speedup {b / a:5.2f}x")
    return med, diff


if __name__ == "__main__":
    main()
