"""Sharding, multi-device and mixed-precision tests (jit + Mesh, shard_map, pmap, bfloat16).

The multi-device checks need 8 CPU devices, which XLA only creates when
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before JAX starts, so they run in a
subprocess: this file run as a script (``python tests/test_sharding.py``) performs them and prints one
JSON object; the tests below assert on it. A second subprocess runs the real job through
``launch/run.sh`` on the 8 devices with a (data=4, fsdp=2) mesh. Both start when the module starts
(an autouse fixture) and run while the in-process tests (fsdp rule, bfloat16) do.

References are independent computations: the same step on one device without any sharding, and, for
``axis_name``, the single-device step on the full batch with an explicitly chunked loss that draws
each chunk's noise with the key the corresponding device derives (mean of chunk means = full mean).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_DEVICES = 8


# ----------------------------------------------------------------------------------------------------
# Shared by the subprocess (script mode) and the in-process tests.


def _toy_pieces(method: str, hidden: int = 32, depth: int = 1, dtype=None):
    """Toy MLP, loss, optimizer and curriculum for CT (with a target EMA) or CD (exact teacher)."""
    import jax.numpy as jnp
    import optax

    from consistency_jax import losses, schedules, toy
    from consistency_jax.methods.cd import ConsistencyDistillation
    from consistency_jax.methods.ct import ConsistencyTraining
    from consistency_jax.networks import get_network, make_apply_fn
    from consistency_jax.parameterization import SigmaConfig

    sigmas = SigmaConfig()
    kwargs = dict(hidden=hidden, depth=depth)
    if dtype is not None:
        kwargs["dtype"] = dtype
    module = get_network("mlp", **kwargs)
    apply_fn = make_apply_fn(module)
    if method == "ct":
        curriculum = schedules.Curriculum(kind="cm", s0=2, s1=150, mu0=0.9, total_steps=100)
        teacher, teacher_params = None, None
    else:
        curriculum = schedules.Curriculum(kind="constant", num_scales=18, mu0=0.5)
        teacher, teacher_params = toy.exact_denoiser, toy.ring_mixture().as_params()
    parts = dict(
        apply_fn=apply_fn,
        sigmas=sigmas,
        curriculum=curriculum,
        loss_cfg=losses.LossConfig(solver="heun"),
        distance=losses.l2_distance,
    )
    method_obj = (
        ConsistencyTraining(**parts)
        if method == "ct"
        else ConsistencyDistillation(**parts, teacher=teacher)
    )
    # SGD with momentum: a per-parameter optimizer state to shard, and updates linear in the
    # gradients, so float32 reduction-order differences stay at rounding level (Adam's first steps
    # divide g by |g| and amplify them where g ≈ 0).
    tx = optax.sgd(0.1, momentum=0.9)
    init = lambda rng: module.init(rng, jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    return dict(
        module=module,
        apply_fn=apply_fn,
        method=method_obj,
        tx=tx,
        curriculum=curriculum,
        teacher_params=teacher_params,
        init=init,
        sigmas=sigmas,
    )


# The continuous-time methods (issue 13): one file's registry name -> how to build it on the toy.
CONTINUOUS = ("cm_continuous_ct", "cm_continuous_cd", "sct", "scd", "ect", "meanflow", "tcm")


def _continuous_pieces(method: str, hidden: int = 32):
    """Toy MLP (with the weighting head for sCM), the method object and SGD for a continuous method."""
    import jax
    import jax.numpy as jnp
    import optax

    from consistency_jax import toy
    from consistency_jax.methods.cm_continuous import ContinuousConsistency
    from consistency_jax.methods.ect import EasyConsistencyTuning
    from consistency_jax.methods.scm import SCM
    from consistency_jax.networks import get_network, make_apply_fn
    from consistency_jax.networks.logvar import WithLogVar, make_logvar_fn
    from consistency_jax.parameterization import SigmaConfig

    sigmas = SigmaConfig()
    module = get_network("mlp", hidden=hidden, depth=1)
    teacher = toy.exact_denoiser if method.endswith("cd") else None
    if method in ("sct", "scd"):
        module = WithLogVar(net=module, features=16)
        method_obj = SCM(
            apply_fn=make_apply_fn(module),
            logvar_fn=make_logvar_fn(module),
            sigmas=sigmas,
            warmup_steps=4,
            teacher=teacher,
        )
    elif method == "meanflow":  # half the batch with r != t: both kinds of example are split
        from consistency_jax.methods.meanflow import MeanFlow

        module = get_network("mlp", hidden=hidden, depth=1, second_time=True)
        method_obj = MeanFlow(apply_fn=make_apply_fn(module), fraction_distinct=0.5)
    elif method == "tcm":  # 4 of 16 rows at t′; stage-1 parameters of another init as the teacher
        from consistency_jax.methods import tcm

        table = tcm.truncated_student_t_table(0.0, 0.2, 0.01, 0.0, float(np.log(sigmas.sigma_max)))
        method_obj = tcm.TruncatedConsistency(
            apply_fn=make_apply_fn(module),
            sigmas=sigmas,
            table=tuple(float(v) for v in table),
            stage_steps=1,
            start_stage=0,
            huber_c=0.03,
        )
    elif method == "ect":  # stages of one step: the two steps see two different Δt
        method_obj = EasyConsistencyTuning(
            apply_fn=make_apply_fn(module), sigmas=sigmas, stage_steps=1, huber_c=0.03
        )
    else:
        method_obj = ContinuousConsistency(
            apply_fn=make_apply_fn(module), sigmas=sigmas, stopgrad=True, teacher=teacher
        )
    init = lambda rng: module.init(rng, jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    return dict(
        module=module,
        apply_fn=make_apply_fn(module),
        method=method_obj,
        tx=optax.sgd(0.1, momentum=0.9),
        curriculum=None,
        init=init,
        sigmas=sigmas,
        teacher_params=(
            toy.ring_mixture().as_params()
            if teacher
            else init(jax.random.key(7))
            if method == "tcm"
            else None
        ),
    )


def _toy_state(pieces, seed: int = 0):
    import jax

    from consistency_jax.train_state import TrainState

    params = pieces["init"](jax.random.key(seed))
    # A fresh teacher copy per state: a donated state takes its teacher buffers with it.
    teacher = jax.tree.map(np.array, pieces["teacher_params"])
    return TrainState.create(
        params,
        pieces["tx"],
        ema_rates=(0.9,),
        use_target=pieces["method"].keeps_target,
        teacher_params=teacher,
    )


def _toy_batches(num: int, size: int = 16, seed: int = 0) -> list[dict]:
    from consistency_jax import toy

    rng = np.random.default_rng(seed)
    return [{"image": toy.ring_mixture().sample(rng, size).astype(np.float32)} for _ in range(num)]


def _max_diff(a, b) -> float:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(la, lb)
    )


# ----------------------------------------------------------------------------------------------------
# Script mode: the 8-device checks.


def _run_steps(step, state, batches, rng):
    import jax

    metrics = []
    for b in batches:
        state, m = step(state, b, rng)
        # One program at a time on the virtual CPU devices: XLA:CPU collectives of overlapping
        # executions can starve each other on a small, busy machine.
        jax.block_until_ready(state)
        metrics.append(m)
    return state, metrics


_LAYOUTS = {"data8": (-1, 1), "fsdp": (4, 2)}  # the 8-device layouts: (data, fsdp)
LOCAL = {"local": (-1, 1)}  # the quick in-process checks: this process's devices (one)


def _check_jit_sharding(method: str, layouts=None) -> dict:
    """1 device vs data=8 vs (data=4, fsdp=2) for two steps of the real train step (or vs
    ``layouts``)."""
    import jax
    from jax.sharding import PartitionSpec

    from consistency_jax import sharding
    from consistency_jax.train import make_train_step

    p = _toy_pieces(method)
    train_step = make_train_step(p["method"], p["tx"])
    batches = _toy_batches(2)
    rng = jax.random.key(3)
    init_state = _toy_state(p)
    ref_state, ref_metrics = _run_steps(jax.jit(train_step), init_state, batches, rng)
    out = {"moved": _max_diff(ref_state.params, init_state.params)}
    for name, (data, fsdp) in (layouts or _LAYOUTS).items():
        mesh = sharding.make_mesh(data, fsdp)
        shardings = sharding.state_shardings(_toy_state(p), mesh)
        state = sharding.place(_toy_state(p), shardings)
        step = sharding.jit_train_step(train_step, mesh, shardings)
        gbatches = [sharding.global_batch(b, mesh) for b in batches]
        state, metrics = _run_steps(step, state, gbatches, rng)
        out[name] = {
            "state_diff": _max_diff(state, ref_state),
            "metrics_diff": _max_diff(metrics, ref_metrics),
            "batch_shards": len(gbatches[0]["image"].addressable_shards),
            "batch_shard_rows": int(gbatches[0]["image"].addressable_shards[0].data.shape[0]),
            # Leaves whose shards are smaller than the leaf (split over fsdp), and the teacher's.
            "split_leaves": sum(
                int(x.addressable_shards[0].data.size < x.size) for x in jax.tree.leaves(state)
            ),
            "num_leaves": len(jax.tree.leaves(state)),
            "kernel_spec": list(state.params["Dense_0"]["kernel"].sharding.spec),
            "opt_spec": list(state.opt_state[0].trace["Dense_0"]["kernel"].sharding.spec),
            "ema_spec": list(state.ema_params["0.9"]["Dense_0"]["kernel"].sharding.spec),
            "teacher_split": (
                None
                if state.teacher_params is None
                else int(state.teacher_params["means"].sharding.spec == PartitionSpec("fsdp", None))
            ),
            "all_float32": all(
                str(x.dtype) in ("float32", "int32") for x in jax.tree.leaves(state)
            ),
        }
    return out


def _check_continuous(method: str, layout=(4, 2)) -> dict:
    """A continuous-time method (jvp inside the step): 1 device vs (data=4, fsdp=2) for two steps."""
    import jax

    from consistency_jax import sharding
    from consistency_jax.train import make_train_step

    p = _continuous_pieces(method)
    train_step = make_train_step(p["method"], p["tx"])
    batches = _toy_batches(2)
    rng = jax.random.key(3)
    ref_state, ref_metrics = _run_steps(jax.jit(train_step), _toy_state(p), batches, rng)
    mesh = sharding.make_mesh(*layout)
    shardings = sharding.state_shardings(_toy_state(p), mesh, min_size=64)
    state = sharding.place(_toy_state(p), shardings)
    step = sharding.jit_train_step(train_step, mesh, shardings)
    state, metrics = _run_steps(step, state, [sharding.global_batch(b, mesh) for b in batches], rng)
    return {
        "moved": _max_diff(ref_state.params, _toy_state(p).params),
        "state_diff": _max_diff(state, ref_state),
        "metrics_diff": _max_diff(metrics, ref_metrics),
        "split_leaves": sum(
            int(x.addressable_shards[0].data.size < x.size) for x in jax.tree.leaves(state.params)
        ),
    }


def _check_axis_name(method: str, pmap: bool = True, unchecked: bool = True) -> dict:
    """make_train_step(axis_name=...) inside jax.shard_map and jax.pmap vs the explicit reference."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from consistency_jax.train import make_train_step

    p = _continuous_pieces(method) if method in CONTINUOUS else _toy_pieces(method)
    n = jax.device_count()  # NUM_DEVICES in the subprocess
    batches = _toy_batches(2)
    rng = jax.random.key(5)

    inner = p["method"]

    class Chunked(type(inner)):
        def loss(self, params, frozen, batch, rng, step):
            # What device d computes: its rows, with the step's key folded with d; then the plain
            # mean over devices (no collectives anywhere in the reference).
            chunks = batch["image"].reshape((n, -1) + batch["image"].shape[1:])
            one = lambda chunk, d: inner.loss(
                params, frozen, {"image": chunk}, jax.random.fold_in(rng, d), step
            )
            loss, aux = jax.vmap(one)(chunks, jnp.arange(n))
            return jnp.mean(loss), jax.tree.map(jnp.mean, aux)

    chunked = Chunked(**{f.name: getattr(inner, f.name) for f in dataclasses.fields(inner)})
    ref_step = jax.jit(make_train_step(chunked, p["tx"]))
    ref_state, ref_metrics = _run_steps(ref_step, _toy_state(p), batches, rng)
    axis_step = make_train_step(p["method"], p["tx"], axis_name="batch")
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    out = {}
    # check_vma=True is shard_map's default (replication tracking: the gradient of a replicated θ
    # of a per-device loss is summed over the axis automatically); False is the pmap-like mode.
    for check_vma in (True, False) if method == "ct" and unchecked else (True,):
        sm = jax.jit(
            jax.shard_map(
                axis_step,
                mesh=mesh,
                in_specs=(P(), P("batch"), P()),
                out_specs=(P(), P()),
                check_vma=check_vma,
            ),
            donate_argnums=0,
        )
        sm_state, sm_metrics = _run_steps(sm, _toy_state(p), batches, rng)
        out[f"shard_map_vma{int(check_vma)}"] = {
            "state": _max_diff(sm_state, ref_state),
            "metrics": _max_diff(sm_metrics, ref_metrics),
            "grad_norm_ratio": float(sm_metrics[0]["grad_norm"] / ref_metrics[0]["grad_norm"]),
        }

    if method != "ct" or not pmap:
        return out
    pm = jax.pmap(axis_step, axis_name="batch", in_axes=(0, 0, None))
    stack = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), t)
    pm_state, pm_metrics = stack(_toy_state(p)), []
    for b in batches:
        pm_state, m = pm(pm_state, {"image": b["image"].reshape(n, -1, 2)}, rng)
        pm_metrics.append(m)
    replica = lambda t, i: jax.tree.map(lambda x: x[i], t)
    out["pmap"] = {
        "state": _max_diff(replica(pm_state, 0), ref_state),
        "metrics": _max_diff([replica(m, 0) for m in pm_metrics], ref_metrics),
        "grad_norm_ratio": float(pm_metrics[0]["grad_norm"][0] / ref_metrics[0]["grad_norm"]),
        "replicas": max(_max_diff(replica(pm_state, i), replica(pm_state, 0)) for i in range(n)),
    }
    return out


def _check_microbatches(layouts=None) -> dict:
    """Gradient accumulation (microbatches=2: 8 rows each, one per device) sharded over data=8 and
    over data=4 x fsdp=2 equals the same microbatched step on one device."""
    import jax

    from consistency_jax import sharding
    from consistency_jax.train import make_train_step

    p = _toy_pieces("ct")
    train_step = make_train_step(p["method"], p["tx"], microbatches=2)
    batches = _toy_batches(2)
    rng = jax.random.key(3)
    ref_state, ref_metrics = _run_steps(jax.jit(train_step), _toy_state(p), batches, rng)
    out = {"moved": _max_diff(ref_state.params, _toy_state(p).params)}
    for name, (data, fsdp) in (layouts or _LAYOUTS).items():
        mesh = sharding.make_mesh(data, fsdp)
        shardings = sharding.state_shardings(_toy_state(p), mesh)
        step = sharding.jit_train_step(train_step, mesh, shardings)
        state, metrics = _run_steps(
            step,
            sharding.place(_toy_state(p), shardings),
            [sharding.global_batch(b, mesh) for b in batches],
            rng,
        )
        out[name] = {
            "state_diff": _max_diff(state, ref_state),
            "metrics_diff": _max_diff(metrics, ref_metrics),
        }
    return out


def _check_born_sharded(layout=(4, 2)) -> dict:
    """build.init_state on (data=4, fsdp=2): the state is created by one jit with out_shardings, equal
    bit for bit to TrainState.create on one device, every leaf already in its final sharding, small
    leaves replicated, and XLA's buffer plan for the init holds only each device's share."""
    import jax

    from consistency_jax import build, sharding
    from consistency_jax.train_state import TrainState

    p = _toy_pieces("ct")
    mesh = sharding.make_mesh(*layout)
    rng, min_size = jax.random.key(0), 64
    state, shardings = build.init_state(
        p["init"], p["tx"], p["method"], (0.9,), rng, mesh, min_size=min_size
    )
    leaves = jax.tree.leaves(state)
    split = [int(x.addressable_shards[0].data.size < x.size) for x in leaves]

    def create():
        return TrainState.create(
            p["init"](rng), p["tx"], ema_rates=(0.9,), use_target=p["method"].keeps_target
        )

    abstract = jax.eval_shape(create)
    plan = (
        jax.jit(create, out_shardings=sharding.state_shardings(abstract, mesh, min_size=min_size))
        .lower()
        .compile()
        .memory_analysis()
    )
    share = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    return {
        "diff": _max_diff(state, _toy_state(p)),
        "in_final_shardings": all(
            x.sharding == s for x, s in zip(leaves, jax.tree.leaves(shardings))
        ),
        "split": sum(split),
        "num_leaves": len(leaves),
        "small_replicated": all(not s for x, s in zip(leaves, split) if x.size < min_size),
        "has_target": state.target_params is not None,
        "plan_output_bytes": None if plan is None else int(plan.output_size_in_bytes),
        "share_bytes": int(share),
        "whole_bytes": int(sum(x.nbytes for x in leaves)),
    }


def _expect_error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


def _check_errors(tmp: str) -> dict:
    """Bad meshes and batch sizes: ValueErrors raised before anything is traced or compiled."""
    import jax
    from conftest import load_config

    from consistency_jax import experiment, sharding
    from consistency_jax.train import make_train_step

    out = {
        "mesh_3x2": _expect_error(lambda: sharding.make_mesh(3, 2)),
        "mesh_fsdp3": _expect_error(lambda: sharding.make_mesh(-1, 3)),
        "mesh_fsdp0": _expect_error(lambda: sharding.make_mesh(-1, 0)),
        "mesh_data0": _expect_error(lambda: sharding.make_mesh(0, 1)),
        "mesh_4x2_shape": dict(sharding.make_mesh(-1, 2).shape),
    }
    mesh = sharding.make_mesh(-1, 1)
    out["batch_12"] = _expect_error(lambda: sharding.check_global_batch(12, mesh))
    out["global_batch_12"] = _expect_error(
        lambda: sharding.global_batch({"image": np.zeros((12, 2), np.float32)}, mesh)
    )
    out["ragged"] = _expect_error(
        lambda: sharding.global_batch(
            {"image": np.zeros((16, 2), np.float32), "label": np.zeros((8,), np.int32)}, mesh
        )
    )

    p = _toy_pieces("ct")
    traces = []
    inner = make_train_step(p["method"], p["tx"])

    def counted(state, batch, rng):
        traces.append(1)
        return inner(state, batch, rng)

    shardings = sharding.state_shardings(_toy_state(p), mesh)
    step = sharding.jit_train_step(counted, mesh, shardings)
    state = sharding.place(_toy_state(p), shardings)
    out["step_12"] = _expect_error(
        lambda: step(state, {"image": np.zeros((12, 2), np.float32)}, jax.random.key(0))
    )
    out["step_12_traces"] = len(traces)

    # The job itself stops before building data, model or workdir.
    for name, overrides in {
        "job_batch_12": {"data.batch_size": 12},
        "job_mesh_3x2": {"mesh.data": 3, "mesh.fsdp": 2},
    }.items():
        config = load_config("toy", "method=ct")
        for k, v in overrides.items():
            section, field = k.split(".")
            config[section][field] = v
        workdir = os.path.join(tmp, name)
        out[name] = _expect_error(lambda: experiment.train_and_evaluate(config, workdir))
        out[name + "_workdir"] = os.path.exists(workdir)
    return out


def _script_main() -> None:
    import tempfile

    import jax

    assert jax.device_count() == NUM_DEVICES, jax.devices()
    results = {"devices": jax.device_count()}
    t0 = time.time()
    for method in ("ct", "cd"):
        results[f"jit_{method}"] = _check_jit_sharding(method)
        print(f"jit_{method} {time.time() - t0:.1f}s", file=sys.stderr)
        results[f"axis_{method}"] = _check_axis_name(method)
        print(f"axis_{method} {time.time() - t0:.1f}s", file=sys.stderr)
    for method in CONTINUOUS:
        results[f"continuous_{method}"] = _check_continuous(method)
        print(f"continuous_{method} {time.time() - t0:.1f}s", file=sys.stderr)
    results["axis_sct"] = _check_axis_name("sct")
    print(f"axis_sct {time.time() - t0:.1f}s", file=sys.stderr)
    results["microbatches"] = _check_microbatches()
    print(f"microbatches {time.time() - t0:.1f}s", file=sys.stderr)
    results["born_sharded"] = _check_born_sharded()
    print(f"born_sharded {time.time() - t0:.1f}s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        results["errors"] = _check_errors(tmp)
    print(f"errors {time.time() - t0:.1f}s", file=sys.stderr)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    _script_main()
    sys.exit(0)


# ----------------------------------------------------------------------------------------------------
# The tests (pytest).

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from conftest import (  # noqa: E402
    FAST_COMPILE_FLAGS,
    SLOW_CPU_COLLECTIVES,
    subprocess_xla_flags,
)

from consistency_jax import parameterization as param_lib  # noqa: E402
from consistency_jax import sharding  # noqa: E402
from consistency_jax.networks import get_network, make_apply_fn  # noqa: E402
from consistency_jax.train import make_train_step  # noqa: E402

# Sharded results equal the single-device ones up to float32 reduction-order rounding.
TOL = 1e-5


def _device_env(extra_flags: str = "") -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = subprocess_xla_flags(
        f"--xla_force_host_platform_device_count={NUM_DEVICES}", SLOW_CPU_COLLECTIVES, extra_flags
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


class _Background:
    """The two 8-device subprocesses, started together and awaited on demand."""

    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        env = _device_env()
        self.checks = subprocess.Popen(
            [sys.executable, __file__],
            cwd=REPO,
            # Cheaper XLA:CPU compiles for the equivalence checks (both sides of every comparison
            # use them), even where XLA_FLAGS was set by hand.
            env=_device_env(FAST_COMPILE_FLAGS),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        job_args = [
            "--config=configs/toy.py:method=cd",
            f"--workdir={workdir}",
            "--config.train.num_steps=2",
            "--config.data.batch_size=16",
            "--config.train.log_every=1",
            "--config.train.eval_every=2",
            "--config.eval.num_samples=64",
            "--config.model.kwargs.hidden=32",
            "--config.mesh.data=4",
            "--config.mesh.fsdp=2",
        ]
        self.job = subprocess.Popen(
            ["bash", str(REPO / "launch" / "run.sh"), "--", *job_args],
            cwd="/",
            env={**env, "PYTHON": sys.executable},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._results = None
        self._job_out = None

    def results(self) -> dict:
        if self._results is None:
            out, err = self.checks.communicate(timeout=600)
            assert self.checks.returncode == 0, f"8-device checks failed:\n{err[-6000:]}"
            line = [ln for ln in out.splitlines() if ln.startswith("RESULTS ")][-1]
            self._results = json.loads(line[len("RESULTS ") :])
        return self._results

    def job_output(self) -> tuple[int, str]:
        if self._job_out is None:
            out, _ = self.job.communicate(timeout=300)
            self._job_out = (self.job.returncode, out)
        return self._job_out

    def close(self):
        for proc in (self.checks, self.job):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def _background_started(request, tmp_path_factory):
    """Starts both subprocesses when the module starts, when a selected test of this module needs
    them (the 8-device tests are slow: ``-m "not slow"`` starts nothing); the in-process tests run
    meanwhile."""
    wanted = any(
        "background" in item.fixturenames
        for item in request.session.items
        if getattr(item, "module", None) is request.module
    )
    if not wanted:
        yield None
        return
    bg = _Background(tmp_path_factory.mktemp("sharded_job"))
    yield bg
    bg.close()


@pytest.fixture
def background(_background_started):
    """The two 8-device subprocesses (started with the module)."""
    return _background_started


# ----------------------------------------------------------------------------------------------------
# In-process (one device): fsdp placement rules and mixed precision.


def test_fsdp_spec_rule():
    P = jax.sharding.PartitionSpec
    assert sharding.fsdp_spec((128, 256), 1) == P()
    assert sharding.fsdp_spec((128, 256), 2) == P(None, "fsdp")
    assert sharding.fsdp_spec((3, 3, 64, 64), 4) == P(None, None, None, "fsdp")  # tie -> last
    assert sharding.fsdp_spec((96, 10), 4) == P("fsdp", None)
    assert sharding.fsdp_spec((10, 6), 4) == P()  # nothing divisible: replicated
    assert sharding.fsdp_spec((), 4) == P()
    assert sharding.fsdp_spec((256,), 4, min_size=1024) == P()
    assert sharding.fsdp_spec((2,), 4) == P()


def test_bfloat16_step_keeps_float32_state_and_tracks_float32_loss():
    p32 = _toy_pieces("ct")
    p16 = _toy_pieces("ct", dtype=jnp.bfloat16)
    batch = _toy_batches(1, size=16)[0]
    rng = jax.random.key(1)
    state = _toy_state(p16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))

    step16 = jax.jit(make_train_step(p16["method"], p16["tx"]))
    new, m16 = step16(state, batch, rng)
    _, m32 = jax.jit(make_train_step(p32["method"], p32["tx"]))(_toy_state(p32), batch, rng)
    for tree in (new.params, new.target_params, new.ema_params, new.opt_state):
        assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(tree))
    assert _max_diff(new.params, state.params) > 1e-4
    assert bool(m16["finite"])
    # Same parameters, same noise: bf16 activations change the loss only by bf16 rounding.
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=0.05)
    assert float(m16["loss"]) != float(m32["loss"])  # ... but bf16 was used

    # The dense layers really compute in bfloat16.
    x = jnp.asarray(batch["image"])
    jaxpr = str(jax.make_jaxpr(lambda q: p16["apply_fn"](q, x, jnp.zeros((16,))))(state.params))
    assert "dot_general" in jaxpr and "bf16" in jaxpr


@pytest.mark.parametrize("network", ["mlp", "ncsnpp"])
def test_bfloat16_boundary_condition_is_exact(network):
    sigmas = param_lib.SigmaConfig()
    if network == "mlp":
        module = get_network("mlp", hidden=32, depth=2, dtype=jnp.bfloat16)
        shape = (8, 2)
    else:
        module = get_network(
            "ncsnpp",
            nf=8,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(),
            dtype=jnp.bfloat16,
        )
        shape = (2, 8, 8, 3)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    # Random float32 weights everywhere (NCSN++ zero-initialises its output convolutions, and its
    # init is slow to compile on CPU): F_θ ≠ 0, so exactness at ε is not an accident.
    abstract = jax.eval_shape(
        lambda r: module.init(r, x, jnp.zeros((shape[0],)))["params"], jax.random.key(1)
    )
    rs = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: jnp.asarray(0.1 * rs.standard_normal(a.shape), a.dtype), abstract
    )
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    apply_fn = make_apply_fn(module)
    f = jax.jit(lambda q, x, t: param_lib.consistency_fn(apply_fn, q, x, t, sigmas))
    at_eps = f(params, x, jnp.full((shape[0],), sigmas.sigma_min))
    assert at_eps.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(at_eps), np.asarray(x))
    # Away from ε the network matters (otherwise the check above would be vacuous).
    at_one = f(params, x, jnp.full((shape[0],), 1.0))
    c_skip = sigmas.sigma_data**2 / ((1.0 - sigmas.sigma_min) ** 2 + sigmas.sigma_data**2)
    assert bool(jnp.all(jnp.isfinite(at_one)))
    assert float(jnp.max(jnp.abs(at_one - c_skip * x))) > 1e-2


# ----------------------------------------------------------------------------------------------------
# The 8-device checks (subprocesses).


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ct", "cd"])
@pytest.mark.parametrize("layout", ["data8", "fsdp"])
def test_sharded_step_equals_single_device_step(background, method, layout):
    r = background.results()
    assert r["devices"] == NUM_DEVICES
    got = r[f"jit_{method}"]
    assert got["moved"] > 1e-3  # two SGD steps changed θ: the comparison is not trivial
    g = got[layout]
    assert g["state_diff"] < TOL, g
    assert g["metrics_diff"] < TOL, g
    assert g["all_float32"]
    # The batch really is split: 16 rows over 8 devices.
    assert g["batch_shards"] == NUM_DEVICES and g["batch_shard_rows"] == 2
    if layout == "data8":
        assert g["split_leaves"] == 0  # everything replicated
        assert g["kernel_spec"] == g["opt_spec"] == g["ema_spec"] == []
    else:
        # θ, θ⁻, EMA and momentum split over fsdp along their largest divisible dimension
        # (Dense_0 is the 64 → 32 time-embedding kernel).
        assert g["kernel_spec"] == g["opt_spec"] == g["ema_spec"] == ["fsdp", None]
        assert g["split_leaves"] >= g["num_leaves"] // 2
        if method == "cd":
            assert g["teacher_split"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", CONTINUOUS)
def test_continuous_method_sharded_equals_single_device(background, method):
    """The jvp of the continuous-time methods under data 4 × fsdp 2 (θ split, the batch split) gives
    the single-device step up to float32 rounding."""
    got = background.results()[f"continuous_{method}"]
    assert got["moved"] > 1e-4, got  # two steps changed θ: the comparison is not trivial
    assert got["split_leaves"] >= 2, got  # the MLP's kernels really are split over fsdp
    assert got["state_diff"] < TOL and got["metrics_diff"] < TOL, got


@pytest.mark.slow
def test_sct_step_inside_shard_map_averages_over_the_axis(background):
    """sCT's step (jvp included) inside a user's jax.shard_map with a named axis equals the reference."""
    got = background.results()["axis_sct"]["shard_map_vma1"]
    assert got["grad_norm_ratio"] == pytest.approx(1.0, rel=1e-4), got
    assert got["state"] < TOL and got["metrics"] < TOL, got


@pytest.mark.slow
def test_state_is_born_sharded(background):
    r = background.results()["born_sharded"]
    assert r["diff"] == 0.0, r  # the same values as TrainState.create on one device
    assert r["in_final_shardings"] and r["has_target"], r
    assert r["split"] >= 3 and r["small_replicated"], r  # kernels of θ, θ⁻, EMA, moments split
    assert r["share_bytes"] < 0.75 * r["whole_bytes"], r
    if r["plan_output_bytes"] is not None:  # the compiled init writes only this device's share
        assert r["plan_output_bytes"] < r["whole_bytes"], r
        assert r["plan_output_bytes"] <= r["share_bytes"] + 16 * r["num_leaves"], r


@pytest.mark.slow
def test_microbatched_sharded_step_equals_single_device_step(background):
    r = background.results()["microbatches"]
    assert r["moved"] > 1e-3
    for layout in ("data8", "fsdp"):
        assert r[layout]["state_diff"] < TOL and r[layout]["metrics_diff"] < TOL, r


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, mode",
    [("ct", "shard_map_vma1"), ("ct", "shard_map_vma0"), ("ct", "pmap"), ("cd", "shard_map_vma1")],
)
def test_axis_name_step_averages_over_the_axis(background, method, mode):
    """Inside shard_map (with and without replication checking) and pmap, the update equals the
    single-device update on the full batch with the per-device noise draws."""
    got = background.results()[f"axis_{method}"][mode]
    # The mean, not the sum, of the per-device gradients. (Under shard_map's default replication
    # checking, the gradient of a replicated θ is summed over the axis by autodiff itself, so the
    # step must average the *loss* over the axis inside the differentiated objective.)
    assert got["grad_norm_ratio"] == pytest.approx(1.0, rel=1e-4), got
    assert got["state"] < TOL, got
    assert got["metrics"] < TOL, got
    if mode == "pmap":
        assert got["replicas"] == 0.0  # every replica holds the same state


@pytest.mark.slow
def test_bad_mesh_or_batch_fails_before_compiling(background):
    e = background.results()["errors"]
    assert "does not fit the 8 devices" in e["mesh_3x2"] and "config.mesh.data=3" in e["mesh_3x2"]
    assert "config.mesh.fsdp=3" in e["mesh_fsdp3"] and "does not divide" in e["mesh_fsdp3"]
    assert "config.mesh.fsdp must be at least 1" in e["mesh_fsdp0"]
    assert "config.mesh.data must be positive" in e["mesh_data0"]
    assert e["mesh_4x2_shape"] == {"data": 4, "fsdp": 2}
    assert "config.data.batch_size=12 is not divisible by the 8 devices" in e["batch_12"]
    assert "The global batch size=12 is not divisible by the 8 devices" in e["global_batch_12"]
    assert "same leading" in e["ragged"]
    assert "does not split over the 8 devices" in e["step_12"]
    assert e["step_12_traces"] == 0  # never traced, so never compiled
    assert "config.data.batch_size=12" in e["job_batch_12"] and not e["job_batch_12_workdir"]
    assert "does not fit the 8 devices" in e["job_mesh_3x2"] and not e["job_mesh_3x2_workdir"]


@pytest.mark.slow
def test_main_job_through_launcher_on_8_devices_with_fsdp(background):
    rc, out = background.job_output()
    assert rc == 0, out[-6000:]
    assert "mesh data=4 × fsdp=2 over 8 cpu device(s)" in out
    assert "step 2/2" in out
    lines = (background.workdir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["step"] == 2 and np.isfinite(last["sw2_1step"]) and np.isfinite(last["map_error"])


def test_launcher_rejects_bad_usage_and_prints_tpu_commands(tmp_path):
    script = str(REPO / "launch" / "run.sh")
    bad = subprocess.run(["bash", script, "--config=x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option '--config=x'" in bad.stderr
    none = subprocess.run(["bash", script, "--tpu=pod"], capture_output=True, text=True)
    assert none.returncode == 2 and "no job arguments" in none.stderr
    nozone = subprocess.run(
        ["bash", script, "--tpu=pod", "--", "--workdir=x"], capture_output=True, text=True
    )
    assert nozone.returncode == 2 and "--zone" in nozone.stderr
    dry = subprocess.run(
        [
            "bash",
            script,
            "--dry_run",
            "--tpu=pod",
            "--zone=us-central2-b",
            "--",
            "--config=configs/toy.py:method=ct",
            "--workdir=gs://b/run 1",
        ],
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    scp, ssh = dry.stdout.strip().splitlines()
    assert scp.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in scp
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh pod --worker=all --zone=us-central2-b")
    assert "CONSISTENCY_JAX_DISTRIBUTED=1" in ssh and "pip\\ install\\ -q\\ -e" in ssh
    # The job's arguments survive two rounds of shell quoting (space in the workdir).
    assert "--workdir=gs://b/run\\\\\\ 1" in ssh


# ----------------------------------------------------------------------------------------------------
# The quick forms of the 8-device checks: the same helpers, in this process, on its own devices
# (one CPU device: a mesh of data=1 × fsdp=1, a named axis of one member). They run the sharded
# code paths (NamedSharding placement, the jitted step with in/out shardings, shard_map, pmap, the
# born-sharded init) against the same independent references. One method each (the others, and
# microbatches, are slow here; test_train checks microbatches and every method's step on one
# device).


def test_sharded_step_on_this_process_equals_single_device_step():
    got = _check_jit_sharding("ct", LOCAL)
    assert got["moved"] > 1e-3  # two SGD steps changed θ: the comparison is not trivial
    g = got["local"]
    assert g["state_diff"] < TOL and g["metrics_diff"] < TOL and g["all_float32"], g
    assert g["batch_shards"] == jax.device_count()
    assert g["batch_shard_rows"] == 16 // jax.device_count()


def test_continuous_method_sharded_on_this_process_equals_single_device():
    got = _check_continuous("cm_continuous_ct", layout=(-1, 1))
    assert got["moved"] > 1e-4, got
    assert got["state_diff"] < TOL and got["metrics_diff"] < TOL, got


def test_axis_name_step_on_this_process_averages_over_the_axis():
    """shard_map with replication checking (the default; pmap and the unchecked mode: slow)."""
    got = _check_axis_name("ct", pmap=False, unchecked=False)
    assert set(got) == {"shard_map_vma1"}
    for mode, g in got.items():
        assert g["grad_norm_ratio"] == pytest.approx(1.0, rel=1e-4), (mode, g)
        assert g["state"] < TOL and g["metrics"] < TOL, (mode, g)


def test_state_is_born_sharded_on_this_process():
    r = _check_born_sharded(layout=(-1, 1))
    assert r["diff"] == 0.0, r
    assert r["in_final_shardings"] and r["has_target"], r


def test_bad_mesh_or_batch_fails_before_compiling_on_this_process(tmp_path):
    from conftest import load_config

    from consistency_jax import experiment

    n = jax.device_count()
    errors = {
        "mesh": _expect_error(lambda: sharding.make_mesh(n + 2, 2)),
        "fsdp": _expect_error(lambda: sharding.make_mesh(-1, n + 2)),
        "fsdp0": _expect_error(lambda: sharding.make_mesh(-1, 0)),
        "data0": _expect_error(lambda: sharding.make_mesh(0, 1)),
        "ragged": _expect_error(
            lambda: sharding.global_batch(
                {"image": np.zeros((16, 2), np.float32), "label": np.zeros((8,), np.int32)},
                sharding.make_mesh(-1, 1),
            )
        ),
    }
    assert f"does not fit the {n} device" in errors["mesh"], errors
    assert f"config.mesh.data={n + 2}" in errors["mesh"], errors
    assert f"config.mesh.fsdp={n + 2}" in errors["fsdp"] and "does not divide" in errors["fsdp"]
    assert "config.mesh.fsdp must be at least 1" in errors["fsdp0"]
    assert "config.mesh.data must be positive" in errors["data0"]
    assert "same leading" in errors["ragged"]
    config = load_config("toy", "method=ct")
    config.mesh.data, config.mesh.fsdp = n + 2, 2
    workdir = tmp_path / "never"
    message = _expect_error(lambda: experiment.train_and_evaluate(config, str(workdir)))
    assert f"does not fit the {n} device" in message and not workdir.exists()


def test_main_job_on_this_process_mesh(toy_ct_run):
    """The quick form of the launcher job: the session's toy run (conftest) trained on this
    process's mesh and evaluated."""
    mesh = sharding.make_mesh(-1, 1)
    assert sharding.describe(mesh).startswith(f"mesh data={jax.device_count()} × fsdp=1 over ")
    last = json.loads(
        (pathlib.Path(toy_ct_run.workdir) / "metrics.jsonl").read_text().splitlines()[-1]
    )
    assert last["step"] == 8 and np.isfinite(last["sw2_1step"])
