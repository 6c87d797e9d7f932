"""Shared pytest set-up: small, deterministic, CPU-only.

Two tiers (pytest.ini): tests marked ``slow`` launch subprocesses (8 virtual devices, two JAX
processes, killed and resumed jobs, fresh interpreters) or run long training loops; each has a quick
in-process form of the same check that runs by default. The README's command (and CI) runs the
default tier (``-m "not slow"``); ``-m slow`` runs the slow one, no ``-m`` both.
"""

import os

import pytest

# Tests run on CPU; keep XLA from grabbing every core thread pool it can and keep output quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# XLA:CPU runs LLVM at its full optimisation level by default. The tests' networks are tiny, so
# compiling dominates their time (a tiny NCSN++'s initialiser: 37 s at the default level, 7 s at
# level 0) while running them at level 0 costs little; HLO optimisations are unchanged. XLA:CPU's
# MLIR fusion emitters compile slower than its older LLVM-IR ones (the digits network's gradient:
# 1.4-1.7 s instead of 2.5-3.2 s, a one-multiply program 31 instead of 50 ms; bench/RESULTS.md
# §17), so the tests use the older ones where this XLA still has them: an XLA that does not know a
# flag aborts, so that one is tried first in a subprocess. Subprocesses inherit the flags; those
# that set device counts build XLA_FLAGS with `subprocess_xla_flags`, which keeps them. Set
# XLA_FLAGS yourself (any value, even empty) to test otherwise.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
OPTIONAL_FAST_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flags: str) -> bool:
    """Whether this jaxlib's XLA:CPU starts with ``flags`` (it aborts on a flag it does not know)."""
    import subprocess
    import sys

    probe = "import jax.numpy as jnp; (jnp.arange(3.0) * 2).block_until_ready()"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


if "XLA_FLAGS" not in os.environ:
    _flags = f"{FAST_COMPILE_FLAGS} {OPTIONAL_FAST_COMPILE_FLAGS}"
    os.environ["XLA_FLAGS"] = _flags if _xla_accepts(_flags) else FAST_COMPILE_FLAGS


def subprocess_xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a test's subprocess: this process's (the fast-compile flags above, unless set
    by hand) followed by ``flags``, which win where they set the same flag again (XLA keeps a
    flag's last value), e.g. ``subprocess_xla_flags("--xla_force_host_platform_device_count=4")``."""
    return " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *flags]))


# XLA:CPU aborts a collective whose participants do not all arrive within about 40 s. On a busy
# 2-core machine the threads of 8 virtual devices can be that late, so the multi-device subprocesses
# of the tests raise the limit (these flags exist in jaxlib >= 0.4.3x; an unknown flag aborts XLA).
SLOW_CPU_COLLECTIVES = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
    "--xla_cpu_collective_timeout_seconds=900 "
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
)


def _remove_at_exit(directory: str) -> None:
    """Removes ``directory`` when this process exits (not in a forked child, which inherits the
    exit handlers; a process that imports this module outside pytest, e.g. a test's subprocess
    script importing a test module, removes what it made too)."""
    import atexit
    import shutil

    pid = os.getpid()
    atexit.register(lambda: os.getpid() == pid and shutil.rmtree(directory, ignore_errors=True))


# A persistent XLA compilation cache shared by the test processes of one run (both xdist workers and
# every subprocess they start: the 8-device sharding scripts, the killed-and-resumed jobs, the
# multi-process jobs compile the same programs again and again). The first process of the run (the
# xdist controller, which loads this file before it starts its workers) makes it and removes it when
# the run ends, so nothing carries over between runs and nothing is left in the temporary directory;
# set JAX_COMPILATION_CACHE_DIR yourself to choose the place (then it is kept).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="consistency_jax_xla_cache_")
    _remove_at_exit(os.environ["JAX_COMPILATION_CACHE_DIR"])
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Under pytest-xdist (the README's test command runs two workers), each worker builds the default
# TFDS datasets (the digits) in its own directory, so that two workers never write one dataset at
# once; the worker removes it when it ends.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import tempfile

    os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(
        prefix=f"tfds_{os.environ['PYTEST_XDIST_WORKER']}_"
    )
    _remove_at_exit(os.environ["TFDS_DATA_DIR"])


def file_order_seconds(items) -> dict:
    """Expected seconds of each test file of ``items`` (its tests that ``items`` holds), from
    tests/file_seconds.json (bench/test_file_seconds.py writes it): the file's measured default-tier
    seconds if ``items`` holds a default test of it, plus its slow-tier seconds if a slow one. A file
    not measured yet counts as the median measured one."""
    import json
    import statistics

    with open(os.path.join(os.path.dirname(__file__), "file_seconds.json")) as f:
        table = json.load(f)
    unknown = statistics.median(sum(t.values()) for t in table.values()) if table else 0.0
    tiers = {}
    for item in items:
        tier = "slow" if item.get_closest_marker("slow") else "default"
        tiers.setdefault(item.path.name, set()).add(tier)
    return {
        name: (sum(table[name][t] for t in ts) if name in table else unknown)
        for name, ts in tiers.items()
    }


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what this run leaves out
def pytest_collection_modifyitems(config, items):
    """The heaviest test files first, each file's tests in their own order. pytest-xdist's
    `--dist loadfile` hands out whole files in this order (pytest.ini turns off its own reordering
    by test count), so the two workers of the README's command end together instead of one running a
    long file alone at the end (longest processing time first)."""
    seconds = file_order_seconds(items)
    items.sort(key=lambda item: -seconds[item.path.name])  # stable: a file's own order is kept


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = None):
    """The repository's configs/<name>.py, loaded by path like ``--config=configs/<name>.py:arg``."""
    from consistency_jax.config import load_config as load

    return load(os.path.join(ROOT, "configs", f"{name}.py"), arg)


def site_without_tensorflow(root) -> str:
    """A copy (symlinks) of this environment's site-packages without the TensorFlow package."""
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top

    site_packages = os.path.dirname(os.path.dirname(tensorflow_datasets.__file__))
    farm = root / "site-packages"
    farm.mkdir()
    for entry in os.listdir(site_packages):
        if entry == "tensorflow" or entry.startswith(("tensorflow-", "tensorflow_cpu-")):
            continue
        os.symlink(os.path.join(site_packages, entry), farm / entry)
    return str(farm)


def load_tool(name: str):
    """tools/<name>.py as a module (the weight converters and fixture generators; no torch needed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_npz(path) -> dict:
    """Every array of an .npz fixture (no pickle)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return dict(data)


def x64(on: bool = True):
    """A context manager enabling float64 in JAX (``jax.enable_x64`` in new JAX, ``jax.experimental``
    before), or doing nothing when ``on`` is False."""
    import contextlib

    import jax

    if not on:
        return contextlib.nullcontext()
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX

    return enable_x64()


def dead_pid() -> int:
    """The pid of a process that has exited (a lease holder that is gone)."""
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def tiny_toy_config(method: str, **train):
    """configs/toy.py with ``method`` on a tiny MLP (8 wide, 1 deep), batch 16, 4 steps."""
    c = load_config("toy", f"method={method}")
    c.model.kwargs = dict(hidden=8, depth=1)
    c.data.batch_size = 16
    c.train.update(**{**dict(num_steps=4, log_every=2, eval_every=4, ema_rates=(0.9,)), **train})
    c.optim.update(warmup_steps=0, decay="constant")
    c.eval.num_samples = 32
    c.checkpoint.every = 4
    return c


def write_toy_edm_run(workdir) -> None:
    """A toy EDM run's checkpoint at step 3 (``tiny_toy_config``) whose eval EMA differs from θ,
    written directly: what ``config.init`` reads is the checkpoint, not how it was trained."""
    import jax
    import jax.numpy as jnp

    from consistency_jax import build, checkpoint
    from consistency_jax.build import validate
    from consistency_jax.train_state import TrainState

    cfg = tiny_toy_config("edm")
    setup = validate(cfg)
    tx, _ = build.make_optimizer(cfg)
    _, _, init = build.build_network(cfg, (2,))
    params = init(jax.random.key(1))
    ema = jax.tree.map(lambda a: a + 0.5, params)
    state = TrainState.create(params, tx, ema_rates=setup.ema_rates, use_target=False)
    state = state.replace(step=jnp.int32(3), ema_params={"0.9": ema})
    with checkpoint.Checkpointer(str(workdir), every=1, keep=1) as ckpt:
        ckpt.save(state, step=3, data_state={"step": 3}, config=cfg)


# ---------------------------------------------------------------------------------------------------
# Fixtures shared by the test files: what several files set up again and again, built once per
# session (once per pytest-xdist worker).


def tiny_ct_config(**train):
    """The session's reference toy run: ``tiny_toy_config("ct")`` for 8 steps, logging every 2,
    evaluating at the end, a checkpoint every 4 (the cadence is not part of the trajectory)."""
    c = tiny_toy_config("ct", **{**dict(num_steps=8, log_every=2, eval_every=8), **train})
    c.checkpoint.update(every=4, keep=3)
    return c


@pytest.fixture(scope="session")
def toy_ct_run(tmp_path_factory):
    """An uninterrupted ``tiny_ct_config()`` run, trained once per session: the reference of the
    quick resume, preemption and scan checks. ``arrays`` are its step-8 checkpoint's arrays."""
    import types

    from consistency_jax import experiment, loading

    workdir = str(tmp_path_factory.mktemp("toy_ct_run") / "run")
    state = experiment.train_and_evaluate(tiny_ct_config(), workdir)
    assert int(state.step) == 8
    return types.SimpleNamespace(workdir=workdir, arrays=loading.read_arrays(workdir, 8))


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """A TFDS data directory holding ``sklearn_digits/8`` (array_record), built once per session;
    read only (a test that writes data sets there uses its own directory)."""
    from consistency_jax import data as data_lib

    data_dir = str(tmp_path_factory.mktemp("digits_tfds"))
    data_lib.ensure_digits_dataset(data_dir, 8)
    return data_dir


@pytest.fixture
def signal_at_step(monkeypatch):
    """``signal_at_step(signum, step)``: the running ``train_and_evaluate`` of this process receives
    ``signum`` (SIGTERM: preemption, SIGINT: Ctrl-C) when it logs ``step`` (a multiple of
    ``train.log_every``), as if from outside; what a killed-and-resumed subprocess test does, in
    this process."""
    import signal as signal_lib

    from consistency_jax.writer import MetricWriter

    def arm(signum: int, step: int) -> list[int]:
        real = MetricWriter.scalars
        sent = []

        def scalars(self, done, values, *args, **kwargs):
            out = real(self, done, values, *args, **kwargs)
            if done == step and not sent:
                sent.append(done)
                os.kill(os.getpid(), signum)
            return out

        monkeypatch.setattr(MetricWriter, "scalars", scalars)
        assert signum in (signal_lib.SIGTERM, signal_lib.SIGINT)
        return sent

    return arm


# ---------------------------------------------------------------------------------------------------
# Runs written directly (no training): what the sampling command, ``config.init`` and the teachers
# read is a run's checkpoint and config, not how it was trained.


def random_params(shapes, seed: int = 0):
    """Parameters of the given shapes (a tree of ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape`` of
    a network's init: no compilation of the network) drawn with NumPy: kernels N(0, 1/fan_in), norm
    scales 1 + N(0, 0.1²), everything else N(0, 0.1²). Unlike a real init, no layer is zero (NCSN++
    zero-initialises its last convolutions, which would make the network's output vanish)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        if len(a.shape) >= 2:
            value = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(a.shape)
        else:
            value = 0.1 * rng.standard_normal(a.shape)
        return value.astype(a.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def write_run(workdir, config, *, step: int = 1, seed: int = 0) -> str:
    """A run of ``config`` written directly into ``workdir``: its checkpoint at ``step`` holds
    ``random_params`` θ (θ⁻ where the method keeps one, and the optimizer state, as a training run's
    does) and eval EMAs that differ from θ. Returns ``workdir`` as a string."""
    import jax
    import jax.numpy as jnp

    from consistency_jax import build, checkpoint
    from consistency_jax.build import validate
    from consistency_jax.train_state import TrainState

    setup = validate(config)
    d = config.data
    example_shape = (d.image_size, d.image_size, d.num_channels) if d.image_size else (2,)
    tx, _ = build.make_optimizer(config)
    _, apply_fn, _ = build.build_network(config, example_shape)
    method = build.build_method(
        config,
        setup.spec,
        apply_fn,
        setup.sigmas,
        example_shape,
        build.build_distance(config, setup.spec, example_shape),
        None,
    )
    params = random_params(build.network_shapes(config, example_shape), seed)
    state = TrainState.create(
        jax.tree.map(jnp.asarray, params),
        tx,
        ema_rates=setup.ema_rates,
        use_target=method.keeps_target,
    )
    ema = {
        k: jax.tree.map(lambda a, b: jnp.asarray(a + 0.05 * b), params, random_params(params, s))
        for s, k in enumerate(state.ema_params, start=seed + 1)
    }
    state = state.replace(step=jnp.int32(step), ema_params=ema)
    with checkpoint.Checkpointer(str(workdir), every=1, keep=1) as ckpt:
        ckpt.save(state, step=step, data_state={"step": step}, config=config)
    return str(workdir)


def tiny_nan_config():
    """A toy CT run whose linear warm-up to an absurd learning rate turns the loss NaN after a few
    dozen steps (about 50), saving every 5 steps and keeping them all; no norm-jump check, which
    would stop the run earlier (test_never_lose_a_run): the NaN path itself."""
    c = load_config("toy", "method=ct")
    c.model.kwargs = dict(hidden=16, depth=1)
    c.data.batch_size = 32
    c.optim.update(lr=3e7, warmup_steps=500, decay="constant")
    c.train.update(num_steps=200, log_every=5, eval_every=1000, max_norm_jump=0.0)
    c.eval.num_samples = 32
    c.checkpoint.update(every=5, keep=100)
    return c


@pytest.fixture(scope="session")
def toy_nan_run(tmp_path_factory):
    """A ``tiny_nan_config()`` run that diverged, trained once per session (read only: a test that
    resumes it copies ``workdir`` first). ``error`` is the exception that stopped it."""
    import types

    from consistency_jax import experiment

    workdir = str(tmp_path_factory.mktemp("toy_nan_run") / "run")
    with pytest.raises(FloatingPointError) as err:
        experiment.train_and_evaluate(tiny_nan_config(), workdir)
    return types.SimpleNamespace(workdir=workdir, error=err.value)
