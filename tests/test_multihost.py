"""Two real JAX processes (2 CPU devices each) joined by ``jax.distributed.initialize``.

This is the multi-host path of a TPU pod or a multi-node GPU job, on one machine: each process
reads its own share of the data, ``sharding.global_batch`` assembles the global batch with
``jax.make_array_from_process_local_data``, and the jitted, sharded train step runs over the 4
devices of the 2 processes (XLA:CPU's cross-process collectives go through gloo).

References are independent: the same train step in this (single) process on one device, fed the
concatenation of the two hosts' local batches; and the two hosts' data shares read here with
explicit ``process_index``/``process_count``. This file run as a script is the worker.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from consistency_jax import loading

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES, LOCAL_DEVICES, LOCAL_BATCH, STEPS = 2, 2, 8, 3


def _toy_step_pieces():
    import optax

    from consistency_jax import losses, schedules
    from consistency_jax.methods.ct import ConsistencyTraining
    from consistency_jax.networks import get_network, make_apply_fn
    from consistency_jax.parameterization import SigmaConfig

    module = get_network("mlp", hidden=32, depth=1)
    curriculum = schedules.Curriculum(kind="cm", s0=2, s1=150, mu0=0.9, total_steps=100)
    loss_fn = ConsistencyTraining(
        apply_fn=make_apply_fn(module),
        sigmas=SigmaConfig(),
        curriculum=curriculum,
        loss_cfg=losses.LossConfig(),
        distance=losses.l2_distance,
    )
    # SGD: updates linear in the gradients, so reduction-order rounding stays at float32 level.
    return module, loss_fn, optax.sgd(0.1, momentum=0.9), curriculum


def _initial_state(module, tx, curriculum):
    import jax
    import jax.numpy as jnp

    from consistency_jax.train_state import TrainState

    params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    return TrainState.create(params, tx, ema_rates=(0.9,), use_target=curriculum.uses_target_ema)


def _local_toy_batches(process_index: int) -> list[dict]:
    from consistency_jax import toy

    it = toy.ToyIterator(toy.ring_mixture(), LOCAL_BATCH, seed=0, process_index=process_index)
    return [next(it) for _ in range(STEPS)]


def _digits_cfg(data_dir: str):
    from consistency_jax import data as data_lib

    return data_lib.ImageDataConfig(
        name="sklearn_digits/8",
        data_dir=data_dir,
        image_size=8,
        num_channels=1,
        random_flip=True,
        use_labels=True,
    )


def _worker(coordinator: str, process_id: int, out_dir: str, data_dir: str) -> None:
    import jax

    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=NUM_PROCESSES, process_id=process_id
    )
    from jax.experimental import multihost_utils

    from consistency_jax import data as data_lib
    from consistency_jax import sharding
    from consistency_jax.train import make_train_step

    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
    }
    module, loss_fn, tx, curriculum = _toy_step_pieces()
    train_step = make_train_step(loss_fn, tx)
    rng = jax.random.key(3)
    arrays = {}
    for name, (data, fsdp) in {"data4": (-1, 1), "data2_fsdp2": (2, 2)}.items():
        mesh = sharding.make_mesh(data, fsdp)
        shardings = sharding.state_shardings(
            _initial_state(module, tx, curriculum), mesh, min_size=0
        )
        state = sharding.place(_initial_state(module, tx, curriculum), shardings)
        step = sharding.jit_train_step(train_step, mesh, shardings)
        losses = []
        for local in _local_toy_batches(jax.process_index()):
            state, metrics = step(state, sharding.global_batch(local, mesh), rng)
            losses.append(float(metrics["loss"]))
        gathered = multihost_utils.process_allgather(state.params, tiled=True)
        for path, leaf in jax.tree_util.tree_leaves_with_path(gathered):
            arrays[f"{name}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        arrays[f"{name}/loss"] = np.asarray(losses)
        report[f"{name}_params_split"] = sum(
            int(x.addressable_shards[0].data.size < x.size) for x in jax.tree.leaves(state.params)
        )

    # The image pipeline: this host's share (its process index/count from JAX), assembled into the
    # global batch; gathered back to compare with the shares read in the parent.
    mesh = sharding.make_mesh(-1, 1)
    it = data_lib.make_image_iterator(_digits_cfg(data_dir), NUM_PROCESSES * LOCAL_BATCH, seed=5)
    report["examples_per_host"] = it.examples_per_host
    for k in range(2):
        batch = sharding.global_batch(next(it), mesh)
        report["global_batch_shape"] = list(batch["image"].shape)
        full = multihost_utils.process_allgather(batch, tiled=True)
        arrays[f"digits/{k}/image"], arrays[f"digits/{k}/label"] = full["image"], full["label"]
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "arrays.npz"), **arrays)
    with open(os.path.join(out_dir, f"report_{process_id}.json"), "w") as f:
        json.dump(report, f)
    multihost_utils.sync_global_devices("done")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Starts the two worker processes and waits for them."""
    from conftest import SLOW_CPU_COLLECTIVES, subprocess_xla_flags

    from consistency_jax import data as data_lib

    out = tmp_path_factory.mktemp("multihost")
    data_dir = str(out / "tfds")
    data_lib.ensure_digits_dataset(data_dir, 8)  # built once here: the workers only read it
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS=subprocess_xla_flags(
            f"--xla_force_host_platform_device_count={LOCAL_DEVICES}", SLOW_CPU_COLLECTIVES
        ),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
    )
    coordinator = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, coordinator, str(i), str(out), data_dir],
            env=env,
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(NUM_PROCESSES)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=420)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-6000:]
    reports = [json.loads((out / f"report_{i}.json").read_text()) for i in range(NUM_PROCESSES)]
    return reports, dict(np.load(out / "arrays.npz")), data_dir


@pytest.mark.slow
def test_processes_join_into_one_job(run):
    reports, _, _ = run
    assert [r["process_index"] for r in reports] == [0, 1]
    for r in reports:
        assert r["process_count"] == 2 and r["device_count"] == 4 and r["local_device_count"] == 2
        assert r["data2_fsdp2_params_split"] > 0 and r["data4_params_split"] == 0


@pytest.mark.slow
def test_two_process_step_equals_single_device_step(run):
    import jax

    _, arrays, _ = run
    module, loss_fn, tx, curriculum = _toy_step_pieces()
    from consistency_jax.train import make_train_step

    step = jax.jit(make_train_step(loss_fn, tx))
    state = _initial_state(module, tx, curriculum)
    hosts = [_local_toy_batches(p) for p in range(NUM_PROCESSES)]
    losses = []
    for k in range(STEPS):
        # make_array_from_process_local_data: process 0's rows, then process 1's.
        batch = jax.tree.map(lambda *x: np.concatenate(x), *[h[k] for h in hosts])
        state, metrics = step(state, batch, jax.random.key(3))
        losses.append(float(metrics["loss"]))
    reference = {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(state.params)
    }
    initial = _initial_state(module, tx, curriculum).params
    moved = max(
        float(np.max(np.abs(reference[jax.tree_util.keystr(p)] - np.asarray(x))))
        for p, x in jax.tree_util.tree_leaves_with_path(initial)
    )
    assert moved > 1e-3  # the steps changed the parameters, so equality below means something
    for layout in ("data4", "data2_fsdp2"):
        for key, value in reference.items():
            np.testing.assert_allclose(
                arrays[f"{layout}/{key}"], value, rtol=1e-5, atol=1e-6, err_msg=f"{layout} {key}"
            )
        np.testing.assert_allclose(arrays[f"{layout}/loss"], losses, rtol=1e-5)


@pytest.mark.slow
def test_each_process_reads_its_own_share_into_the_global_batch(run):
    from consistency_jax import data as data_lib

    reports, arrays, data_dir = run
    assert all(r["global_batch_shape"] == [NUM_PROCESSES * LOCAL_BATCH, 8, 8, 1] for r in reports)
    assert all(r["examples_per_host"] == 750 for r in reports)
    shares = [
        data_lib.make_image_iterator(
            _digits_cfg(data_dir),
            NUM_PROCESSES * LOCAL_BATCH,
            seed=5,
            process_index=p,
            process_count=NUM_PROCESSES,
        )
        for p in range(NUM_PROCESSES)
    ]
    for k in range(2):
        local = [next(s) for s in shares]
        np.testing.assert_array_equal(
            arrays[f"digits/{k}/image"], np.concatenate([b["image"] for b in local])
        )
        np.testing.assert_array_equal(
            arrays[f"digits/{k}/label"], np.concatenate([b["label"] for b in local])
        )
    # Host p's rows are (possibly mirrored) images of its block [750 p, 750 (p + 1)) of the split.
    stored = data_lib.load_image_arrays(_digits_cfg(data_dir))["image"]
    blocks = [
        {x.tobytes() for img in stored[p * 750 : (p + 1) * 750] for x in (img, img[:, ::-1])}
        for p in range(NUM_PROCESSES)
    ]
    for k in range(2):
        rows = arrays[f"digits/{k}/image"]
        for p in range(NUM_PROCESSES):
            assert all(
                r.tobytes() in blocks[p] for r in rows[p * LOCAL_BATCH : (p + 1) * LOCAL_BATCH]
            )


def test_distributed_arguments_from_the_environment():
    from absl import app

    from consistency_jax.main import distributed_args

    assert distributed_args({}) == {}
    assert distributed_args({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}) == dict(
        num_processes=4, process_id=3
    )
    for env, message in (
        ({"JAX_NUM_PROCESSES": "4"}, "both JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "0 <= JAX_PROCESS_ID"),
        ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be an integer"),
    ):
        with pytest.raises(app.UsageError, match=message):
            distributed_args(env)


# ----------------------------------------------------------------------------------------------------
# The main job on two processes: preempted (SIGTERM), resumed, bitwise equal to an uninterrupted run.

JOB_STEPS, JOB_EVERY = 160, 20
JOB_FLAGS = [
    "--config=configs/toy.py:method=ct",
    "--config.model.kwargs.hidden=16",
    "--config.model.kwargs.depth=2",
    "--config.data.batch_size=32",
    f"--config.train.num_steps={JOB_STEPS}",
    "--config.train.log_every=20",
    "--config.train.eval_every=100000",
    "--config.eval.num_samples=64",
    f"--config.checkpoint.every={JOB_EVERY}",
    "--config.checkpoint.keep=2",
    # Batches of 4 steps stacked per call: global_batch(stacked=True) assembled across processes.
    "--config.train.steps_per_call=4",
]


def _launch_job(workdir: pathlib.Path, logs: pathlib.Path, *extra: str) -> list[subprocess.Popen]:
    from conftest import SLOW_CPU_COLLECTIVES, subprocess_xla_flags

    coordinator = f"localhost:{_free_port()}"
    procs = []
    for i in range(NUM_PROCESSES):
        env = dict(os.environ)
        env.update(
            JAX_PLATFORMS="cpu",
            TF_CPP_MIN_LOG_LEVEL="3",
            CONSISTENCY_JAX_DISTRIBUTED="1",
            JAX_COORDINATOR_ADDRESS=coordinator,
            JAX_NUM_PROCESSES=str(NUM_PROCESSES),
            JAX_PROCESS_ID=str(i),
            XLA_FLAGS=subprocess_xla_flags(
                f"--xla_force_host_platform_device_count={LOCAL_DEVICES}", SLOW_CPU_COLLECTIVES
            ),
        )
        with open(f"{logs}.{i}", "ab") as f:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "consistency_jax.main",
                        *JOB_FLAGS,
                        *extra,
                        f"--workdir={workdir}",
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def _log(logs: pathlib.Path) -> str:
    return "\n".join(
        pathlib.Path(f"{logs}.{i}").read_text()
        for i in range(NUM_PROCESSES)
        if pathlib.Path(f"{logs}.{i}").exists()
    )


def _wait_all(procs, logs, timeout=300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"timed out:\n{_log(logs)[-6000:]}")


def _saved_steps(workdir: pathlib.Path) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_two_process_job_preempted_and_resumed_equals_uninterrupted(tmp_path):
    import time

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _launch_job(ref_dir, tmp_path / "ref.log", f"--config.checkpoint.every={JOB_STEPS}")
    run_log = tmp_path / "run.log"
    procs = _launch_job(run_dir, run_log)
    t0 = time.time()
    while max(_saved_steps(run_dir), default=0) < 2 * JOB_EVERY:
        if any(p.poll() is not None for p in procs) or time.time() - t0 > 300:
            for p in procs:
                p.kill()
            pytest.fail(
                f"the run ended or stalled before step {2 * JOB_EVERY}:\n{_log(run_log)[-6000:]}"
            )
        time.sleep(0.01)
    # The preemption notice reaches one host; JAX's preemption sync service makes every host stop
    # after the same step.
    procs[1].send_signal(signal.SIGTERM)
    assert _wait_all(procs, run_log) == [0, 0], _log(run_log)[-6000:]
    stopped = sorted(
        {
            int(s)
            for s in re.findall(r"Stopped by .* after step (\d+): checkpoint saved", _log(run_log))
        }
    )
    assert len(stopped) == 1, _log(run_log)[-6000:]
    assert _log(run_log).count("checkpoint saved") == NUM_PROCESSES  # both hosts said so
    stopped = stopped[0]
    assert stopped < JOB_STEPS and max(_saved_steps(run_dir)) == stopped

    procs = _launch_job(run_dir, run_log)
    assert _wait_all(procs, run_log) == [0, 0], _log(run_log)[-6000:]
    assert f"(step {stopped})" in _log(run_log)  # resumed from the preemption checkpoint
    assert _wait_all(ref, tmp_path / "ref.log") == [0, 0], _log(tmp_path / "ref.log")[-6000:]
    want = loading.read_arrays(str(ref_dir), JOB_STEPS)
    got = loading.read_arrays(str(run_dir), JOB_STEPS)
    assert sorted(got) == sorted(want) and any(k.startswith("state/opt_state/") for k in got)
    for k in want:
        assert np.array_equal(got[k], want[k]), k


# ----------------------------------------------------------------------------------------------------
# The quick forms, in this process: what each host computes, with this process holding every row.
# (The preempted-and-resumed job's quick form is test_resume's test_preempted_in_process_resumes_bitwise.)


def test_sharded_step_over_both_hosts_rows_equals_single_device_step():
    """The worker's layouts (data over every device; data × fsdp where the devices allow) on this
    process's devices, fed the two hosts' local batches concatenated, equal the plain jitted step."""
    import jax

    from consistency_jax import sharding
    from consistency_jax.train import make_train_step

    module, loss_fn, tx, curriculum = _toy_step_pieces()
    train_step = make_train_step(loss_fn, tx)
    rng = jax.random.key(3)
    hosts = [_local_toy_batches(p) for p in range(NUM_PROCESSES)]
    batches = [
        jax.tree.map(lambda *x: np.concatenate(x), *[h[k] for h in hosts]) for k in range(STEPS)
    ]
    plain = jax.jit(train_step)
    ref = _initial_state(module, tx, curriculum)
    ref_losses = []
    for b in batches:
        ref, m = plain(ref, b, rng)
        ref_losses.append(float(m["loss"]))
    mesh = sharding.make_mesh(-1, 1)
    shardings = sharding.state_shardings(_initial_state(module, tx, curriculum), mesh, min_size=0)
    state = sharding.place(_initial_state(module, tx, curriculum), shardings)
    step = sharding.jit_train_step(train_step, mesh, shardings)
    losses = []
    for b in batches:
        gb = sharding.global_batch(b, mesh)
        assert gb["image"].shape == (NUM_PROCESSES * LOCAL_BATCH, 2)
        state, m = step(state, gb, rng)
        losses.append(float(m["loss"]))
    moved = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(ref.params),
            jax.tree.leaves(_initial_state(module, tx, curriculum).params),
        )
    )
    assert moved > 1e-3
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # The two hosts draw different rows.
    assert not np.array_equal(hosts[0][0]["image"], hosts[1][0]["image"])


def test_each_host_share_lies_in_its_block_of_the_split(digits_data_dir):
    """What each worker reads (its process index of two), read here: 750 examples per host, host
    p's rows (possibly mirrored) images of its block [750 p, 750 (p + 1)) of the split."""
    from consistency_jax import data as data_lib

    shares = [
        data_lib.make_image_iterator(
            _digits_cfg(digits_data_dir),
            NUM_PROCESSES * LOCAL_BATCH,
            seed=5,
            process_index=p,
            process_count=NUM_PROCESSES,
        )
        for p in range(NUM_PROCESSES)
    ]
    assert [s.examples_per_host for s in shares] == [750, 750]
    stored = data_lib.load_image_arrays(_digits_cfg(digits_data_dir))["image"]
    blocks = [
        {x.tobytes() for img in stored[p * 750 : (p + 1) * 750] for x in (img, img[:, ::-1])}
        for p in range(NUM_PROCESSES)
    ]
    for _ in range(2):
        for p, s in enumerate(shares):
            rows = next(s)["image"]
            assert rows.shape == (LOCAL_BATCH, 8, 8, 1)
            assert all(r.tobytes() in blocks[p] for r in rows)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
