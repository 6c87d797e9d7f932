"""This project's NCSN++ against the official JAX code's (jcm), side by side: passes and train steps.

  python bench/network_vs_jcm.py --jcm=.anchor/jcm --jcm_python=/tmp/jcmenv/bin/python --rounds=2

``--jcm`` is a checkout of openai/consistency_models_cifar10 (the directory holding its ``jcm/`` and
``configs/``; e.g. ``git -C MIRROR archive HEAD configs jcm | tar -x -C .anchor/jcm``).
``--jcm_python`` is an interpreter that can import it (jax, flax, optax, ml_collections, dm-haiku;
default: this one). Both networks are built at the same configuration — jcm's CIFAR-10 NCSN++ config
(``configs/cifar10_ve_ct_adaptive.py``) with ``--nf``/``--image_size`` overridden, and this project's
``NCSNpp`` with the same width, multipliers, blocks, attention and dropout — and each round runs one
child process per code base, alternating (jcm, ours, jcm, ours, ...), so that a slow spell of the
machine hits both. Each child times, interleaved, after compiling:

  fwd      the network's forward pass in training mode (dropout key given), on (B, H, W, 3) images
  fwd_bwd  the gradient of the mean output with respect to the parameters
  ct/cd    the real train step: jcm's ``losses.get_step_fn`` under ``jax.pmap`` (its length-1
           ``lax.scan`` left out: on XLA:CPU that wrapper makes jcm's convolutions tens of times
           slower, which would flatter us), RAdam, l2, CT = ``cifar10_ve_ct_adaptive``,
           CD = ``cifar10_ve_cd`` with the Heun EDM teacher (``ref_config``, initial weights: same
           cost); ours: ``bench/train_step_bench.py``'s step (``make_train_step`` under
           ``sharding.jit_train_step``, Adam, l2; CD with the Heun teacher).

and prints one JSON line; the parent prints a table with our throughput over jcm's per round.

Edits the official code needs on today's stack (jax ≥ 0.6, flax ≥ 0.7), applied here in memory, its
files untouched: ``jax.tree_map`` (removed) is aliased to ``jax.tree.map``, and ``mutils.init_model``
is replaced by a copy that splits the variables with ``flax.core.pop`` (``dict.pop`` returns only the
value now that ``Module.init`` returns plain dicts). Nothing numeric changes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--jcm",
        default=os.path.join(ROOT, ".anchor", "jcm"),
        help="checkout of openai/consistency_models_cifar10 (holds jcm/ and configs/)",
    )
    p.add_argument("--jcm_python", default=sys.executable, help="interpreter for the jcm side")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nf", type=int, default=32, help="base width (CIFAR-10: 128)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="ours only: jcm's NCSN++ has no compute-dtype option",
    )
    p.add_argument("--methods", default="ct,cd", help="train steps to time: ct, cd, or none")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds inside a child")
    p.add_argument("--json", default="", help="write all rows to this file")
    p.add_argument("--_child", choices=["jcm", "ours"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1 or args.batch < 1 or args.nf < 1:
        p.error("--rounds, --repeats, --batch and --nf must be >= 1")
    methods = [m for m in args.methods.split(",") if m and m != "none"]
    bad = sorted(set(methods) - {"ct", "cd"})
    if bad:
        p.error(f"--methods: unknown {bad}; use ct, cd or none")
    args.method_list = methods
    if not os.path.isdir(os.path.join(args.jcm, "jcm")):
        p.error(
            f"--jcm={args.jcm}: no jcm/ package there (give a checkout of "
            "openai/consistency_models_cifar10)"
        )
    return args


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median ms per call of no-argument callables, compiled first, then timed round-robin."""
    import jax
    import numpy as np

    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())  # a pmapped step may compile again at its second call
        first[name] = time.perf_counter() - t0
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - t0)
    out = {f"{k}_ms": 1e3 * float(np.median(v)) for k, v in samples.items()}
    out["compile_s"] = {k: round(v, 1) for k, v in first.items()}
    return out


def _inputs(args):
    """The same images in [-1, 1] and time inputs c_noise = 0.25·ln σ (σ log-uniform in
    [0.002, 80], as in jcm's EDM conditioning) on both sides."""
    import jax.numpy as jnp
    import numpy as np

    rs = np.random.RandomState(0)
    x = rs.uniform(-1, 1, (args.batch, args.image_size, args.image_size, 3))
    log_sigma = rs.uniform(np.log(0.002), np.log(80.0), args.batch)
    return jnp.asarray(x, jnp.float32), jnp.asarray(0.25 * log_sigma, jnp.float32)


# ------------------------------------------------------------------------------------------------
# The official code's side.
# ------------------------------------------------------------------------------------------------
def _jcm_child(args) -> dict:
    sys.path.insert(0, os.path.abspath(args.jcm))
    import flax
    import flax.jax_utils
    import jax
    import jax.numpy as jnp
    import numpy as np

    if not hasattr(jax, "tree_map"):  # edit 1: removed alias
        jax.tree_map = jax.tree.map
    import importlib

    from jcm import losses, sde_lib

    for name in ("ddpm", "ncsnpp", "ncsnv2"):  # importing registers the models
        importlib.import_module(f"jcm.models.{name}")
    from jcm.models import utils as mutils

    def init_model(rng, config):  # edit 2: flax.core.pop instead of variables.pop
        model = mutils.get_model(config.model.name)(config=config)
        size = config.data.image_size
        fake = jnp.zeros((1, size, size, config.data.num_channels))
        k1, k2 = jax.random.split(rng)
        variables = model.init({"params": k1, "dropout": k2}, fake, jnp.zeros((1,), jnp.int32))
        state, params = flax.core.pop(variables, "params")
        return model, state, params

    mutils.init_model = init_model

    def config_for(method):
        if method == "cd":
            from configs.cifar10_ve_cd import get_config
        else:
            from configs.cifar10_ve_ct_adaptive import get_config
        c = get_config()
        c.training.loss_norm = "l2"
        c.training.batch_size = args.batch
        c.optim.lr = 4e-4
        for cc in (c, c.training.ref_config):
            cc.model.nf = args.nf
            cc.data.image_size = args.image_size
        return c

    config = config_for("ct")
    model, model_state, params = init_model(jax.random.PRNGKey(0), config)
    x, c_noise = _inputs(args)

    def net(p, z, c, key):
        out, _ = mutils.get_model_fn(model, p, model_state, train=True)(z, c, rng=key)
        return out

    fwd = jax.jit(net)
    fwd_bwd = jax.jit(jax.grad(lambda p, z, c, k: jnp.mean(net(p, z, c, k))))
    key = jax.random.PRNGKey(1)
    fns = {
        "fwd": lambda: fwd(params, x, c_noise, key),
        "fwd_bwd": lambda: fwd_bwd(params, x, c_noise, key),
    }

    import haiku as hk

    for method in args.method_list:
        cfg = config_for(method)
        rng = hk.PRNGSequence(cfg.seed)
        m, mstate, p0 = init_model(next(rng), cfg)
        optimizer, optimize_fn = losses.get_optimizer(cfg)
        common = dict(
            step=0,
            lr=cfg.optim.lr,
            ema_rate=cfg.model.ema_rate,
            params=p0,
            params_ema=p0,
            model_state=mstate,
            opt_state=optimizer.init(p0),
            rng_state=rng.internal_state,
        )
        if cfg.training.loss.lower().endswith(("ema", "adaptive", "progressive_distillation")):
            state = mutils.StateWithTarget(target_params=p0, **common)
        else:
            state = mutils.State(**common)
        sde = sde_lib.get_sde(cfg)
        loss_fn, _, state = losses.get_loss_fn(cfg, sde, m, state, next(rng))
        step_fn = losses.get_step_fn(
            loss_fn,
            train=True,
            optimize_fn=optimize_fn,
            ema_scales_fn=losses.get_ema_scales_fn(cfg),
        )
        p_step = jax.pmap(step_fn, axis_name="batch")
        nd = jax.local_device_count()
        batch = {
            "image": np.asarray(x).reshape((nd, -1) + x.shape[1:]),
            "label": np.zeros((nd, args.batch // nd), np.int32),
            "mask": np.ones((nd, args.batch // nd), np.int32),
        }
        batch = jax.tree.map(jax.pmap(lambda a: a), batch)
        holder = {"state": flax.jax_utils.replicate(state), "i": 0}
        keys = jax.pmap(lambda a: a)(jax.random.split(jax.random.PRNGKey(2), nd))

        def one_step(p_step=p_step, holder=holder, batch=batch, keys=keys):
            (_, holder["state"]), (loss, _) = p_step((keys, holder["state"]), batch)
            return loss

        fns[f"{method}_step"] = one_step
    out = _interleaved(fns, args.repeats)
    out["params_M"] = sum(np.size(a) for a in jax.tree.leaves(params)) / 1e6
    return out


# ------------------------------------------------------------------------------------------------
# This project's side.
# ------------------------------------------------------------------------------------------------
def _ours_child(args) -> dict:
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import timing
    import train_step_bench as tsb

    from consistency_jax import sharding
    from consistency_jax.networks.layers import count_params

    module, shape = timing.build_network(
        "ncsnpp",
        args.image_size,
        args.dtype,
        nf=args.nf,
        ch_mult=(2, 2, 2),
        num_res_blocks=4,
        attn=(16,),
    )
    x, c_noise = _inputs(args)
    params = module.init(jax.random.PRNGKey(0), x[:1], c_noise[:1])["params"]

    def net(p, z, c, key):
        return module.apply({"params": p}, z, c, train=True, rngs={"dropout": key})

    fwd = jax.jit(net)
    fwd_bwd = jax.jit(jax.grad(lambda p, z, c, k: jnp.mean(net(p, z, c, k))))
    key = jax.random.PRNGKey(1)
    fns = {
        "fwd": lambda: fwd(params, x, c_noise, key),
        "fwd_bwd": lambda: fwd_bwd(params, x, c_noise, key),
    }
    mesh = sharding.make_mesh(-1, 1)
    step_args = tsb.parse_args(
        [
            f"--batch={args.batch}",
            f"--image_size={args.image_size}",
            f"--nf={args.nf}",
            "--ch_mult=2,2,2",
            "--num_res_blocks=4",
            "--attn=16",
            f"--dtype={args.dtype}",
        ]
    )
    for method in args.method_list:
        built = tsb.build_step(method, step_args, module, shape, mesh)
        holder = {"state": built["state"]}

        def one_step(built=built, holder=holder):
            holder["state"], aux = built["step"](holder["state"], built["batch"], built["rng"])
            return aux

        fns[f"{method}_step"] = one_step
    out = _interleaved(fns, args.repeats)
    out["params_M"] = count_params(params) / 1e6
    return out


def main(argv=None):
    args = parse_args(argv)
    if args._child:
        res = _jcm_child(args) if args._child == "jcm" else _ours_child(args)
        import jax

        res.update(side=args._child, jax=jax.__version__, device=jax.devices()[0].device_kind)
        print(json.dumps(res), flush=True)
        return res
    passthrough = [
        f"--jcm={args.jcm}",
        f"--nf={args.nf}",
        f"--image_size={args.image_size}",
        f"--batch={args.batch}",
        f"--dtype={args.dtype}",
        f"--methods={','.join(args.method_list) or 'none'}",
        f"--repeats={args.repeats}",
    ]
    rows = []
    names = ["fwd", "fwd_bwd"] + [f"{m}_step" for m in args.method_list]
    print(
        f"# NCSN++ nf={args.nf} ch_mult=2,2,2 4 res blocks attn 16, {args.image_size}x"
        f"{args.image_size}, batch {args.batch}; ours {args.dtype}; jcm {args.jcm}"
    )
    for r in range(1, args.rounds + 1):
        pair = {}
        for side, py in (("jcm", args.jcm_python), ("ours", sys.executable)):
            cmd = [py, os.path.abspath(__file__), f"--_child={side}"] + passthrough
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"network_vs_jcm: the {side} side failed:\n{proc.stderr[-4000:]}")
            pair[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            pair[side]["round"] = r
            rows.append(pair[side])
        print(
            f"round {r}: params jcm {pair['jcm']['params_M']:.3f}M ours {pair['ours']['params_M']:.3f}M"
        )
        for n in names:
            j, o = pair["jcm"][f"{n}_ms"], pair["ours"][f"{n}_ms"]
            print(
                f"  {n:8s} jcm {j:9.1f} ms   ours {o:9.1f} ms   ours/jcm throughput {j / o:5.2f}x",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return rows


if __name__ == "__main__":
    main()
