"""How long does a checkpoint save block the training loop?

For the CIFAR-10 NCSN++ of CM (about 56 M parameters; θ, θ⁻, one eval EMA and RAdam's two moments
make a state of about 1.1 GB) this times ``checkpoint.Checkpointer.save`` — the finiteness check
of the state plus Orbax's blocking part (copying the arrays off the devices, starting the write) —
with asynchronous and with synchronous saving, the time until the checkpoint is committed, a
restore into the live state, and one train step of the same model for comparison.

  python bench/checkpoint_bench.py                      # NCSN++ (falls back to a synthetic state)
  python bench/checkpoint_bench.py --synthetic          # a synthetic state of the same size
  python bench/checkpoint_bench.py --step_batch=0       # skip timing the train step

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from consistency_jax import checkpoint as ckpt_lib  # noqa: E402
from consistency_jax import losses as losses_lib  # noqa: E402
from consistency_jax import parameterization as param_lib  # noqa: E402
from consistency_jax import schedules  # noqa: E402
from consistency_jax.methods.ct import ConsistencyTraining  # noqa: E402
from consistency_jax.networks import get_network, make_apply_fn  # noqa: E402
from consistency_jax.train import make_train_step  # noqa: E402
from consistency_jax.train_state import TrainState  # noqa: E402

NCSNPP_CIFAR10 = dict(nf=128, ch_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,))


def _ncsnpp_params(image_size: int):
    module = get_network("ncsnpp", **NCSNPP_CIFAR10)
    x = jnp.zeros((1, image_size, image_size, 3))
    init = jax.jit(lambda r: module.init({"params": r, "dropout": r}, x, jnp.zeros((1,)))["params"])
    return module, init(jax.random.key(0))


def _synthetic_params(num_params: int):
    """Leaves of conv-like shapes (3x3 kernels of 256 channels) adding up to ``num_params``."""
    rng = np.random.default_rng(0)
    leaves, left, i = {}, num_params, 0
    while left > 0:
        n = min(left, 3 * 3 * 256 * 256)
        leaves[f"w{i}"] = jnp.asarray(rng.standard_normal(n).astype(np.float32) * 0.02)
        left, i = left - n, i + 1
    return leaves


def _trained_looking(state: TrainState) -> TrainState:
    """Distinct random values in every float leaf: after training θ⁻, the EMA and the moments differ
    from θ and from zero, so none of them compresses or deduplicates on disk."""
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = jax.jit(lambda k, x: x + 1e-3 * jax.random.normal(k, x.shape, x.dtype))
    leaves = [
        noisy(k, x) if jnp.issubdtype(x.dtype, jnp.floating) else x for k, x in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, leaves)


def _state_bytes(state: TrainState) -> int:
    return sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(state.replace(teacher_params=None))
    )


def _time_step(module, state, tx, batch_size: int, image_size: int, reps: int) -> float:
    sigmas = param_lib.SigmaConfig()
    cur = schedules.Curriculum(kind="constant", num_scales=18)
    shape = (image_size, image_size, 3)
    method = ConsistencyTraining(
        apply_fn=make_apply_fn(module),
        sigmas=sigmas,
        curriculum=cur,
        loss_cfg=losses_lib.LossConfig(distance="l2"),
        distance=losses_lib.make_distance("l2", shape),
    )
    step = jax.jit(make_train_step(method, tx), donate_argnums=0)
    batch = {
        "image": jnp.asarray(
            np.random.default_rng(1).uniform(-1, 1, (batch_size,) + shape), jnp.float32
        )
    }
    state = jax.tree.map(jnp.array, state)  # a private copy: the step donates it
    rng = jax.random.key(0)
    state, m = step(state, batch, rng)  # compile
    jax.block_until_ready(m)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, m = step(state, batch, rng)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="skip NCSN++, use random leaves")
    parser.add_argument(
        "--num_params",
        type=int,
        default=56_395_651,
        help="parameters of the synthetic state (NCSN++ CIFAR-10: 56.4 M)",
    )
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3, help="saves per mode")
    parser.add_argument(
        "--step_batch", type=int, default=4, help="batch of the timed train step; 0 skips it"
    )
    parser.add_argument("--dir", default="", help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)

    module, what = None, "synthetic"
    if not args.synthetic:
        try:
            t0 = time.perf_counter()
            module, params = _ncsnpp_params(args.image_size)
            what = f"NCSN++ CIFAR-10 (init {time.perf_counter() - t0:.0f}s)"
        except Exception as e:  # noqa: BLE001 -- any failure: fall back to a synthetic state
            print(f"NCSN++ unavailable ({type(e).__name__}: {e}); using a synthetic state.")
    if module is None:
        params = _synthetic_params(args.num_params)
    tx = optax.radam(2e-4)
    state = _trained_looking(TrainState.create(params, tx, ema_rates=(0.9999,), use_target=True))
    jax.block_until_ready(state)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    size = _state_bytes(state)
    config = ml_collections.ConfigDict({"bench": "checkpoint", "num_params": int(n_params)})

    root = args.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
    rows = []
    for mode in ("async", "sync"):
        workdir = os.path.join(root, mode)
        shutil.rmtree(workdir, ignore_errors=True)
        ckpt = ckpt_lib.Checkpointer(workdir, every=1, keep=2, async_save=mode == "async")
        check, block, total = [], [], []
        for i in range(args.reps + 1):  # the first save also creates directories: not counted
            state = state.replace(step=jnp.asarray(i + 1, jnp.int32))
            jax.block_until_ready(state.step)
            t0 = time.perf_counter()
            ckpt_lib.nonfinite_parts(state)
            t1 = time.perf_counter()
            ckpt.save(state, step=i + 1, data_state={"step": i + 1}, config=config)
            t2 = time.perf_counter()
            ckpt.wait()
            t3 = time.perf_counter()
            if i:
                check.append(t1 - t0)
                block.append(t2 - t0)  # what the loop waits for: the check + Orbax's blocking part
                total.append(t3 - t0)
        ckpt.close()
        rows.append(
            (mode, statistics.median(check), statistics.median(block), statistics.median(total))
        )
    ckpt = ckpt_lib.Checkpointer(os.path.join(root, "async"), every=1, keep=2)
    t0 = time.perf_counter()
    restored, _ = ckpt.restore(state)
    jax.block_until_ready(restored)
    t_restore = time.perf_counter() - t0
    ckpt.close()
    disk = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(os.path.join(root, "async", "checkpoints", str(args.reps + 1)))
        for f in fs
    )

    step_s = None
    if module is not None and args.step_batch > 0:
        step_s = _time_step(module, state, tx, args.step_batch, args.image_size, reps=2)

    dev = jax.devices()[0]
    print(
        f"\nCheckpoint save cost: {what}, {n_params / 1e6:.1f} M parameters; state (θ, θ⁻, 1 EMA, "
        f"RAdam μ and ν) {size / 1e9:.2f} GB in memory, {disk / 1e9:.2f} GB on disk; "
        f"{dev.platform} ({dev.device_kind}), {os.cpu_count()} CPU threads, jax {jax.__version__}; "
        f"median of {args.reps} saves.\n"
    )
    print(
        "| mode | finite check (s) | loop blocked by save() (s) | until committed (s) | "
        "write GB/s |"
    )
    print("|---|---|---|---|---|")
    for mode, check, block, total in rows:
        print(f"| {mode} | {check:.3f} | {block:.3f} | {total:.2f} | {size / 1e9 / total:.2f} |")
    print(f"\nrestore into the live state: {t_restore:.2f} s")
    if step_s is not None:
        print(
            f"one CT train step of this network, batch {args.step_batch} on {dev.platform}: "
            f"{step_s:.2f} s"
        )
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
