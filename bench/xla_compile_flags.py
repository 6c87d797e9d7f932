"""XLA:CPU compile time under the flag sets the tests might use (tests/conftest.py sets XLA_FLAGS).

  python bench/xla_compile_flags.py --repeats=2

For each flag set, in a fresh process (XLA reads XLA_FLAGS once): the mean compile time of 20
one-multiply-add programs of new shapes (what every eager op and small jit pays), the compile time of
the gradient of the digits config's tiny DDPM++ (nf=4, batch 8, 8x8x1, the tests' usual network),
and that gradient's run time (mean of 5 after a warm-up). The flag sets alternate, ``--repeats``
rounds. Compilation runs partly on XLA's own threads: these are wall-clock times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
FLAG_SETS = {
    "default build": "",
    "tests before (opt level 0)": BASE,
    "tests now (+ no fusion emitters)": f"{BASE} --xla_cpu_use_fusion_emitters=false",
}

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp
from consistency_jax import build
from consistency_jax.config import load_config
import os
c = load_config(os.path.join(sys.argv[1], "configs", "digits.py"), "method=ect")
c.model.kwargs = dict(nf=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
_, apply_fn, _ = build.build_network(c, (8, 8, 1))
shapes = build.network_shapes(c, (8, 8, 1))
x = jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32)
s = jax.ShapeDtypeStruct((8,), jnp.float32)
grad = lambda p, x, s: jax.grad(lambda p: jnp.sum(apply_fn(p, x, s, train=False)))(p)
lowered = jax.jit(grad).trace(shapes, x, s).lower()
small = lambda a: a * 2 + 1
jax.jit(small).lower(jnp.zeros(3)).compile()
t = time.perf_counter()
for i in range(20):
    jax.jit(small).lower(jax.ShapeDtypeStruct((i + 100,), jnp.float32)).compile()
small_s = (time.perf_counter() - t) / 20
t = time.perf_counter()
compiled = lowered.compile()
grad_s = time.perf_counter() - t
params = jax.tree.map(lambda a: jnp.full(a.shape, 0.1, a.dtype), shapes)
args = (params, jnp.ones(x.shape), jnp.ones(s.shape))
jax.block_until_ready(compiled(*args))
t = time.perf_counter()
for _ in range(5):
    jax.block_until_ready(compiled(*args))
run_s = (time.perf_counter() - t) / 5
print(json.dumps({"small_ms": small_s * 1e3, "grad_compile_s": grad_s, "grad_run_ms": run_s * 1e3}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import json

    results = {name: [] for name in FLAG_SETS}
    for _ in range(args.repeats):
        for name, flags in FLAG_SETS.items():
            env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
            out = subprocess.run(
                [sys.executable, "-c", CHILD, ROOT],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    print("| XLA_FLAGS | small program compile | digits gradient compile | its run |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        cell = lambda key, fmt: " / ".join(fmt.format(r[key]) for r in rows)
        print(
            f"| {name} | {cell('small_ms', '{:.0f}')} ms | {cell('grad_compile_s', '{:.2f}')} s "
            f"| {cell('grad_run_ms', '{:.1f}')} ms |"
        )


if __name__ == "__main__":
    main()
