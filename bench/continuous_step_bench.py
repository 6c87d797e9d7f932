"""Cost of the continuous-time methods (issue 13): step time over the bare network passes each needs.

  python bench/continuous_step_bench.py --network=ddpmpp --image_size=8 --channels=1 --batch=64
  python bench/continuous_step_bench.py --network=ncsnpp --image_size=32 --batch=128 --dtype=bfloat16 \
      --nf=128 --ch_mult=2,2,2 --num_res_blocks=4 --attn=16        # the CIFAR-10 NCSN++ on a GPU

For each method the full jitted train step (sampling of t and noise, preconditioning, the jvp, the loss,
gradients, RAdam, the eval EMA; state donated; ``sharding.jit_train_step`` over all local devices) is
timed against a baseline that runs the same network passes in one jitted function without any of it:

  cm_continuous_ct: one jvp of F (forward + tangent) whose primal output is differentiated (backward)
  cm_continuous_cd: the same plus one teacher forward
  sct:              one jvp of F at θ⁻ (forward + tangent), plus forward + backward of F at θ towards
                    a target made from the jvp (the backward depends on it, as in the method)
  scd:              the same plus one teacher forward
  ect:              forward + backward, plus one forward (the stop-gradient target), as iCT
  tcm:              ECT's passes plus one forward of the frozen stage-1 model (the combined target)
  meanflow:         one jvp of u (forward + tangent, the network seeing (t, t − r)) whose primal
                    output is differentiated (backward) towards the target made from the tangent
  ict:              forward + backward, plus one forward (reference for images/s)

ratio = step / baseline (aim ≤ 1.10): what the method's maths, the optimizer and the EMA cost on top of
the network. Steps and baselines are timed in round-robin (``timing.time_interleaved``). The XLA FLOP
ratio of the two compiled programs is printed beside it: near 1 when the step does no network work
beyond the baseline's, so a larger time ratio is scheduling, not computation.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import timing  # noqa: E402

from consistency_jax import losses, schedules, sharding  # noqa: E402
from consistency_jax.methods.cm_continuous import ContinuousConsistency  # noqa: E402
from consistency_jax.methods.ct import ConsistencyTraining  # noqa: E402
from consistency_jax.methods.ect import EasyConsistencyTuning  # noqa: E402
from consistency_jax.methods.meanflow import MeanFlow  # noqa: E402
from consistency_jax.methods.scm import SCM  # noqa: E402
from consistency_jax.methods.tcm import TruncatedConsistency, truncated_student_t_table  # noqa: E402
from consistency_jax.networks import make_apply_fn  # noqa: E402
from consistency_jax.networks.logvar import WithLogVar, make_logvar_fn  # noqa: E402
from consistency_jax.parameterization import SigmaConfig, network_teacher  # noqa: E402
from consistency_jax.train import make_train_step  # noqa: E402
from consistency_jax.train_state import TrainState  # noqa: E402

METHODS = ("ict", "ect", "tcm", "meanflow", "cm_continuous_ct", "cm_continuous_cd", "sct", "scd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    timing.add_network_args(p, batch=64)
    p.add_argument("--channels", type=int, default=3, help="image channels (1: the digits)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def baseline(kind: str, apply_fn, teacher_fn):
    """The network passes of ``kind`` on the raw network, no consistency maths, no optimizer."""
    sg = jax.lax.stop_gradient

    def loss(params, teacher, x, t, v):
        if kind.endswith("cd"):  # one teacher forward
            v = v + sg(teacher_fn(teacher, x, t)).astype(v.dtype)
        if kind.startswith("cm_continuous"):
            f, df = jax.jvp(lambda x_, t_: apply_fn(params, x_, t_), (x, t), (v, jnp.ones_like(t)))
            return jnp.mean(f.astype(jnp.float32) * sg(df).astype(jnp.float32))
        if kind in ("sct", "scd"):
            # the regression target comes from the jvp, so the backward waits for it (as in sCM)
            fm, dfm = jax.jvp(
                lambda x_, t_: apply_fn(sg(params), x_, t_), (x, t), (v, jnp.ones_like(t))
            )
            return jnp.mean((apply_fn(params, x, t) - sg(fm + dfm)).astype(jnp.float32) ** 2)
        if (
            kind == "meanflow"
        ):  # u(z, r, t) = F(z, t, t − r), tangents (v, 0, 1): (v, 1, 1) on (z, t, t − r)
            d = 0.5 * t
            u = lambda x_, t_, d_: apply_fn(params, x_, t_, c_noise_2=d_)
            f, df = jax.jvp(u, (x, t, d), (v, jnp.ones_like(t), jnp.ones_like(t)))
            target = sg(v - d[:, None, None, None] * df)
            return jnp.mean((f - target).astype(jnp.float32) ** 2)
        other = sg(apply_fn(params, x + v, t))  # ict / ect: the stop-gradient target forward
        if kind == "tcm":  # the frozen stage-1 model's forward at the same point
            other = other + sg(apply_fn(teacher, x + v, t))
        return jnp.mean((apply_fn(params, x, t) - other).astype(jnp.float32) ** 2)

    def step(carry, x, t, v):
        params, teacher = carry
        value, grads = jax.value_and_grad(loss)(params, teacher, x, t, v)
        return (jax.tree.map(lambda p, g: p - 0.0 * g, params, grads), teacher), value

    return step


def build(method: str, module, example_shape, args, mesh):
    sigmas = SigmaConfig()
    b = args.batch
    x0 = jax.random.uniform(jax.random.key(0), (b,) + example_shape, jnp.float32, -1, 1)
    if method == "meanflow":
        module = module.clone(second_time=True)
    net = WithLogVar(net=module) if method in ("sct", "scd") else module
    apply_fn = make_apply_fn(net)
    init = lambda m: (
        lambda r: m.init({"params": r, "dropout": r}, x0[:1], jnp.zeros((1,)))["params"]
    )
    params = jax.jit(init(net))(jax.random.key(1))
    frozen = method.endswith("cd") or method == "tcm"  # a teacher, or TCM's stage-1 model
    teacher_params = jax.jit(init(module))(jax.random.key(2)) if frozen else None
    teacher = network_teacher(make_apply_fn(module), sigmas) if method.endswith("cd") else None
    if method == "ict":
        m = ConsistencyTraining(
            apply_fn=apply_fn,
            sigmas=sigmas,
            curriculum=schedules.Curriculum(kind="ict", s0=10, s1=1280, total_steps=400_000),
            loss_cfg=losses.LossConfig(
                distance="pseudo_huber", weighting="ict", index_sampling="lognormal"
            ),
            distance=losses.make_distance("pseudo_huber", example_shape),
        )
    elif method == "ect":
        m = EasyConsistencyTuning(apply_fn=apply_fn, sigmas=sigmas)
    elif method == "tcm":
        table = truncated_student_t_table(0.0, 0.2, 0.01, 0.0, float(np.log(sigmas.sigma_max)))
        m = TruncatedConsistency(apply_fn=apply_fn, sigmas=sigmas, table=tuple(table.tolist()))
    elif method == "meanflow":
        m = MeanFlow(apply_fn=apply_fn)
    elif method.startswith("cm_continuous"):
        m = ContinuousConsistency(apply_fn=apply_fn, sigmas=sigmas, stopgrad=True, teacher=teacher)
    else:
        m = SCM(apply_fn=apply_fn, logvar_fn=make_logvar_fn(net), sigmas=sigmas, teacher=teacher)
    tx = optax.radam(1e-4)
    state = TrainState.create(
        params, tx, ema_rates=(0.9999,), use_target=m.keeps_target, teacher_params=teacher_params
    )
    shardings = sharding.state_shardings(state, mesh)
    state = sharding.place(state, shardings)
    step = sharding.jit_train_step(make_train_step(m, tx), mesh, shardings)
    batch = sharding.global_batch({"image": np.asarray(x0)}, mesh)
    rng = sharding.place(jax.random.key(3), sharding.replicated(mesh))
    base = jax.jit(
        baseline(method, make_apply_fn(module), lambda p, x, t: make_apply_fn(module)(p, x, t)),
        donate_argnums=0,
    )
    t = jax.device_put(jnp.full((b,), 0.5, jnp.float32), sharding.batch_sharding(mesh))
    v = jax.device_put(jnp.asarray(x0), sharding.batch_sharding(mesh))
    carry = (
        jax.tree.map(jnp.copy, state.params["net"] if method in ("sct", "scd") else state.params),
        None if teacher_params is None else jax.tree.map(jnp.copy, state.teacher_params),
    )
    return {"step": (step, state, (batch, rng)), "baseline": (base, carry, (batch["image"], t, v))}


def main(argv=None):
    args = parse_args(argv)
    ints = lambda s: tuple(int(v) for v in s.split(",") if v)
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
    if len(example_shape) == 3:
        example_shape = example_shape[:-1] + (args.channels,)
    mesh = sharding.make_mesh(-1, 1)
    print(
        f"device: {timing.describe_device()}; network {args.network} {example_shape} batch {args.batch} "
        f"{args.dtype}"
    )
    rows = []
    for method in args.methods.split(","):
        cases = build(method, module, example_shape, args, mesh)
        # XLA's FLOP count of both programs (before timing: the states are donated by the timer)
        flops = {k: timing.xla_flops(fn, state, *extra) for k, (fn, state, extra) in cases.items()}
        times, _ = timing.time_interleaved(cases, iters=args.iters, repeats=args.repeats)
        row = {
            "method": method,
            "step_ms": 1e3 * times["step"],
            "baseline_ms": 1e3 * times["baseline"],
            "ratio": times["step"] / times["baseline"],
            "images_per_s": args.batch / times["step"],
            "flops_ratio": (
                flops["step"] / flops["baseline"] if flops["step"] and flops["baseline"] else None
            ),
        }
        rows.append(row)
        fr = "n/a" if row["flops_ratio"] is None else f"{row['flops_ratio']:.3f}"
        print(
            f"{method:18s} step {row['step_ms']:8.2f} ms  bare passes {row['baseline_ms']:8.2f} ms  "
            f"ratio {row['ratio']:.3f}  {row['images_per_s']:8.1f} img/s  XLA flops ratio {fr}",
            flush=True,
        )
    timing.write_json(args.json, args, rows)


if __name__ == "__main__":
    main()
