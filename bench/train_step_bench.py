"""Train-step throughput of CT, CD (Heun teacher) and EDM, and the cost of the consistency machinery.

  python bench/train_step_bench.py --network=ncsnpp --image_size=16 --batch=32 --method=all
  python bench/train_step_bench.py --network=ncsnpp --image_size=32 --batch=128 --dtype=bfloat16 \
      --nf=128 --ch_mult=2,2,2 --num_res_blocks=4 --attn=16        # the CIFAR-10 NCSN++ on a GPU

For each method it times the full jitted train step (loss, gradients, optimizer, θ⁻ and eval-EMA
updates; state donated; ``consistency_jax.sharding.jit_train_step`` over all local devices) and a
baseline that runs the same network with the same batch in one jitted function:

  CT:  forward + backward, plus one forward        (the online f_θ and the stop-gradient target)
  CD:  the CT baseline plus two teacher forwards   (a Heun step of the teacher ODE)
  EDM: forward + backward

ratio = step time / baseline time is what the consistency machinery (noise and index sampling,
preconditioning, the Karras grid, the loss) plus the optimizer and EMA updates cost on top of the
network (the aim is ≤ 1.10); ``ratio_with_opt`` divides by the baseline plus the same optimizer and
EMA updates, i.e. it isolates the cost of the consistency maths. FLOPs come from XLA's cost analysis of
the compiled step; MFU is printed where the device's peak is known (``--peak_tflops`` to set it).

``--loop`` also times a realistic loop (host batch -> global array -> step) with and without device
prefetch of the next batch (``sharding.prefetch_to_mesh``), against pre-staged device batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import timing  # noqa: E402

from consistency_jax import losses, schedules, sharding  # noqa: E402
from consistency_jax.methods.cd import ConsistencyDistillation  # noqa: E402
from consistency_jax.methods.ct import ConsistencyTraining  # noqa: E402
from consistency_jax.methods.edm import EDMDenoiser  # noqa: E402
from consistency_jax.networks import make_apply_fn  # noqa: E402
from consistency_jax.parameterization import SigmaConfig, network_teacher  # noqa: E402
from consistency_jax.train import make_multi_step, make_train_step  # noqa: E402
from consistency_jax.train_state import TrainState, ema_update  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="all", choices=["ct", "cd", "edm", "all"])
    timing.add_network_args(p, batch=32)
    p.add_argument("--iters", type=int, default=5, help="calls per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fsdp", type=int, default=1, help="fsdp size of the mesh")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="override the device peak")
    p.add_argument("--loop", action="store_true", help="also time the host->device input loop")
    p.add_argument(
        "--microbatches", type=int, default=1, help="gradient accumulation (train.microbatches)"
    )
    p.add_argument(
        "--steps_per_call",
        type=int,
        default=1,
        help="> 1: also time a lax.scan of this many steps per call (train.steps_per_call)",
    )
    p.add_argument("--no_donate", action="store_true", help="do not donate the state (to compare)")
    p.add_argument("--json", default="", help="write the results to this file")
    return p.parse_args(argv)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _adam_and_emas(params, grads, opt_state, tx, target, emas):
    """What every step does after the gradients: optimizer, θ⁻ and eval-EMA updates."""
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    target = ema_update(target, params, 0.99) if target is not None else None
    emas = {k: ema_update(v, params, 0.9999) for k, v in emas.items()}
    return params, opt_state, target, emas


def make_baseline(kind: str, apply_fn, tx, with_opt: bool):
    """The same network work as a train step of ``kind`` without the consistency maths."""

    def net(p, x, t):
        return apply_fn(p, x, t)

    def loss(params, target, teacher, x, t):
        out = net(params, x, t)
        if kind == "edm":
            return jnp.mean(out.astype(jnp.float32) ** 2)
        x_lo = x
        if kind == "cd":  # two teacher forwards, as in a Heun step
            d1 = net(teacher, x, t)
            d2 = net(teacher, x + d1, t)
            x_lo = jax.lax.stop_gradient(x + 0.5 * (d1 + d2))
        other = jax.lax.stop_gradient(net(target, x_lo, t))
        return jnp.mean((out.astype(jnp.float32) - other.astype(jnp.float32)) ** 2)

    def step(carry, x, t):
        params, opt_state, target, teacher, emas = carry
        tgt = target if target is not None else params
        value, grads = jax.value_and_grad(loss)(params, tgt, teacher, x, t)
        if with_opt:
            params, opt_state, target, emas = _adam_and_emas(
                params, grads, opt_state, tx, target, emas
            )
        else:  # keep the gradients alive without an update
            params = jax.tree.map(lambda p, g: p - 0.0 * g, params, grads)
        return (params, opt_state, target, teacher, emas), value

    return step


def build_step(method: str, args, module, example_shape, mesh, batch_size: int | None = None):
    """The sharded train step of ``method`` with its placed state, a global batch and the key.

    Returns:
      dict(step, state, batch, rng, x0, apply_fn, tx, loss_fn, curriculum, shardings).
    """
    sigmas = SigmaConfig()
    apply_fn = make_apply_fn(module)
    b = args.batch if batch_size is None else batch_size
    x0 = jax.random.uniform(jax.random.key(0), (b,) + example_shape, jnp.float32, -1, 1)
    init = lambda r: module.init({"params": r, "dropout": r}, x0[:1], jnp.zeros((1,)))["params"]
    params = jax.jit(init)(jax.random.key(1))
    tx = optax.radam(2e-4)
    if method == "ct":  # CM's CT: adaptive N(k), target EMA μ(k)
        curriculum = schedules.Curriculum(kind="cm", s0=2, s1=150, mu0=0.9, total_steps=800_000)
    else:  # CD (N = 18, θ⁻ = θ as in CM's CIFAR-10 LPIPS CD) and EDM: no target tree
        curriculum = schedules.Curriculum(kind="constant", num_scales=18, mu0=0.0)
    teacher_params = jax.jit(init)(jax.random.key(2)) if method == "cd" else None
    if method == "edm":
        loss_fn = EDMDenoiser(apply_fn=apply_fn, sigmas=sigmas)
    else:
        parts = dict(
            apply_fn=apply_fn,
            sigmas=sigmas,
            curriculum=curriculum,
            loss_cfg=losses.LossConfig(solver="heun"),
            distance=losses.l2_distance,
        )
        loss_fn = (
            ConsistencyTraining(**parts)
            if method == "ct"
            else ConsistencyDistillation(**parts, teacher=network_teacher(apply_fn, sigmas))
        )
    state = TrainState.create(
        params,
        tx,
        ema_rates=(0.9999,),
        use_target=loss_fn.keeps_target,
        teacher_params=teacher_params,
    )
    shardings = sharding.state_shardings(state, mesh)
    state = sharding.place(state, shardings)
    micro = getattr(args, "microbatches", 1)
    step = sharding.jit_train_step(
        make_train_step(loss_fn, tx, microbatches=micro),
        mesh,
        shardings,
        donate=not getattr(args, "no_donate", False),
    )
    batch = sharding.global_batch({"image": np.asarray(x0)}, mesh)
    rng = sharding.place(jax.random.key(3), sharding.replicated(mesh))
    return dict(
        step=step,
        state=state,
        batch=batch,
        rng=rng,
        x0=x0,
        apply_fn=apply_fn,
        tx=tx,
        loss_fn=loss_fn,
        curriculum=curriculum,
        shardings=shardings,
    )


def bench_method(method: str, args, module, example_shape, mesh, baselines: bool = True) -> dict:
    built = build_step(method, args, module, example_shape, mesh)
    step, state, batch, rng, x0 = (built[k] for k in ("step", "state", "batch", "rng", "x0"))
    apply_fn, tx, loss_fn, curriculum, shardings = (
        built[k] for k in ("apply_fn", "tx", "loss_fn", "curriculum", "shardings")
    )
    b = args.batch

    t0 = time.perf_counter()
    # XLA's cost analysis of an SPMD program counts one device's share.
    flops_per_device = timing.xla_flops(step.jitted, state, batch, rng)
    flops = flops_per_device * mesh.size if flops_per_device else None
    compile_s = time.perf_counter() - t0
    cases = {"step": (step, state, (batch, rng))}
    k = getattr(args, "steps_per_call", 1)
    micro = getattr(args, "microbatches", 1)
    if k > 1:  # the same steps, k per call (its own copy of the state: states are donated)
        multi = sharding.jit_train_step(
            make_multi_step(make_train_step(loss_fn, tx, microbatches=micro), k),
            mesh,
            shardings,
            steps_per_call=k,
        )
        stacked = sharding.global_batch(
            {"image": np.stack([np.asarray(x0)] * k)}, mesh, stacked=True
        )
        cases["scan"] = (
            multi,
            sharding.place(jax.tree.map(np.asarray, state), shardings),
            (stacked, rng),
        )
    if baselines:
        # Same network, same batch, same shardings of parameters and data.
        t = jax.device_put(jnp.zeros((b,), jnp.float32), sharding.batch_sharding(mesh))
        for with_opt in (False, True):
            carry = (
                state.params,
                state.opt_state,
                state.target_params,
                state.teacher_params,
                dict(state.ema_params),
            )
            carry = jax.tree.map(jnp.copy, carry)  # the train step's state stays intact
            base = jax.jit(make_baseline(method, apply_fn, tx, with_opt), donate_argnums=0)
            cases["baseline_opt" if with_opt else "baseline"] = (base, carry, (batch["image"], t))
    times, states = timing.time_interleaved(cases, iters=args.iters, repeats=args.repeats)
    state = states["step"]
    out = {
        "method": method,
        "step_s": times["step"],
        "images_per_s": b / times["step"],
        "compile_s": compile_s,
        "flops_per_step": flops,
    }
    if k > 1:
        out["scan_step_s"] = times["scan"] / k
        out["scan_speedup"] = times["step"] / out["scan_step_s"]
    if baselines:
        out["baseline_s"] = times["baseline"]
        out["baseline_opt_s"] = times["baseline_opt"]
        out["ratio"] = out["step_s"] / out["baseline_s"]
        out["ratio_with_opt"] = out["step_s"] / out["baseline_opt_s"]
    peak = timing.peak_flops(args.dtype, args.peak_tflops)
    if flops_per_device and peak:
        out["mfu"] = flops_per_device / out["step_s"] / peak
    if args.loop:
        out.update(bench_loop(step, state, rng, mesh, x0, args))
    return out


def bench_loop(step, state, rng, mesh, x0, args) -> dict:
    """Steps/s of the input loop: numpy batch on the host -> global array -> step."""
    host = np.asarray(x0)
    n = args.iters * args.repeats

    def batches():
        rs = np.random.default_rng(0)
        while True:  # a host-side "data pipeline": a fresh array per step
            yield {
                "image": host
                + rs.standard_normal(host.shape[:1] + (1,) * (host.ndim - 1), dtype=np.float32)
                * 1e-3
            }

    def run(it, state):
        state, m = step(state, next(it), rng)  # warm
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(n):
            state, m = step(state, next(it), rng)
        jax.block_until_ready(state)
        return (time.perf_counter() - t0) / n, state

    plain = (sharding.global_batch(b, mesh) for b in batches())
    t_plain, state = run(plain, state)
    t_pref, state = run(iter(sharding.prefetch_to_mesh(batches(), mesh, size=2)), state)
    staged = sharding.global_batch(next(batches()), mesh)
    t_staged, state = run(iter(lambda: staged, None), state)
    return {"loop_s": t_plain, "loop_prefetch_s": t_pref, "loop_staged_s": t_staged}


def main(argv=None):
    args = parse_args(argv)
    module, example_shape = timing.build_network(
        args.network,
        args.image_size,
        args.dtype,
        nf=args.nf,
        ch_mult=_ints(args.ch_mult),
        num_res_blocks=args.num_res_blocks,
        attn=_ints(args.attn),
        hidden=args.hidden,
    )
    mesh = sharding.make_mesh(-1, args.fsdp)
    sharding.check_global_batch(args.batch, mesh, name="--batch")
    methods = ["ct", "cd", "edm"] if args.method == "all" else [args.method]
    print(f"# {timing.describe_device()}; {sharding.describe(mesh)}")
    print(f"# network={args.network} {example_shape} dtype={args.dtype} batch={args.batch}")
    rows = []
    for m in methods:
        r = bench_method(m, args, module, example_shape, mesh)
        rows.append(r)
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        gflop = f"{r['flops_per_step'] / 1e9:.2f}" if r["flops_per_step"] else "n/a"
        line = (
            f"{m:4s} step {1e3 * r['step_s']:8.2f} ms  {r['images_per_s']:9.1f} img/s  "
            f"baseline {1e3 * r['baseline_s']:8.2f} ms  ratio {r['ratio']:.3f}  "
            f"(vs baseline+opt {r['ratio_with_opt']:.3f})  GFLOP/step {gflop}  MFU {mfu}"
        )
        if "scan_step_s" in r:
            line += (
                f"\n     scan of {args.steps_per_call} steps per call: "
                f"{1e3 * r['scan_step_s']:.2f} ms/step ({r['scan_speedup']:.2f}x)"
            )
        if "loop_s" in r:
            line += (
                f"\n     loop: plain {1e3 * r['loop_s']:.2f} ms, prefetch "
                f"{1e3 * r['loop_prefetch_s']:.2f} ms, staged {1e3 * r['loop_staged_s']:.2f} ms"
            )
        print(line, flush=True)
    timing.write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
