"""Device mesh, shardings of the train state and of batches, and the sharded train step.

One program for one device, one host or a TPU pod (jit + Mesh + NamedSharding; the pattern of
big_vision ``sharding.py`` and maxtext ``create_device_mesh``). The mesh has two axes:

  - ``data``: data parallelism. The train state is replicated along it and the batch split over it.
  - ``fsdp``: fully sharded data parallelism (ZeRO-3). θ, θ⁻, the eval EMAs, the optimizer state and
    a CD teacher's φ are split along their largest dimension divisible by the ``fsdp`` size (leaves
    without such a dimension are replicated); XLA all-gathers each weight where it is used. The batch
    is split over ``data`` *and* ``fsdp``, so every device sees different examples.

The consistency-model step itself (``train.make_train_step``) knows nothing about devices: under
``jax.jit`` the shardings of its arguments decide the parallelism (gradients and the loss mean are
reduced by XLA), and inside a user's own ``jax.shard_map`` / ``jax.pmap`` the step averages over the
named axis it is given. Everything that can be wrong with a mesh or a batch size is reported as a
ValueError *before* anything is compiled.

Multi-host: every process runs the same program (``launch/run.sh``); ``jax.distributed.initialize()``
must run first (``main.py`` does when ``CONSISTENCY_JAX_DISTRIBUTED=1``, which ``launch/run.sh
--tpu=...`` sets). Each host loads only its share of every batch (``global_batch_size //
process_count`` rows) and ``global_batch`` assembles the global array with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Array = jax.Array
PyTree = Any

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# The batch dimension is split over both axes (maxtext / big_vision): data × fsdp devices in all.
BATCH_SPEC = PartitionSpec(MESH_AXES)


# ----------------------------------------------------------------------------------------------------
# The mesh


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolves and checks the (data, fsdp) mesh shape for ``num_devices`` devices.

    Args:
      data: data-parallel size; −1 means "all devices not used by fsdp" (num_devices // fsdp).
      fsdp: parameter-sharding size (1: parameters replicated).
      num_devices: the number of devices of the job (all processes together).

    Returns:
      (data, fsdp) with data·fsdp == num_devices.

    Raises:
      ValueError: naming the config field when the shape does not fit the devices.
    """
    data, fsdp = int(data), int(fsdp)
    if fsdp < 1:
        raise ValueError(f"config.mesh.fsdp must be at least 1, got {fsdp}.")
    if data == -1:
        if num_devices % fsdp:
            raise ValueError(
                f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices of "
                f"this job; choose an fsdp size that divides {num_devices}."
            )
        data = num_devices // fsdp
    elif data < 1:
        raise ValueError(
            f"config.mesh.data must be positive or -1 (all remaining devices), got {data}."
        )
    if data * fsdp != num_devices:
        raise ValueError(
            f"The mesh config.mesh.data={data} × config.mesh.fsdp={fsdp} = {data * fsdp} "
            f"devices does not fit the {num_devices} devices of this job (data × fsdp "
            f"must equal the device count; data=-1 takes all remaining devices)."
        )
    return data, fsdp


def _auto_axis_types(n: int) -> dict:
    # New JAX makes Explicit mesh axes by default; this library uses the classic automatic (GSPMD)
    # partitioning, so ask for Auto axes wherever the AxisType API exists.
    axis_type = getattr(jax.sharding, "AxisType", None)
    return {} if axis_type is None else {"axis_types": (axis_type.Auto,) * n}


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") device mesh.

    ``jax.make_mesh`` orders the devices for the physical topology (TPU ICI rings, NVLink islands)
    so that the inner ``fsdp`` axis, which carries the most traffic, is the best connected.

    Args:
      data: data-parallel size, −1 for all devices not used by fsdp.
      fsdp: parameter-sharding size.
      devices: the devices to use (default: all devices of all processes).

    Returns:
      a Mesh with Auto axes ("data", "fsdp").
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    return jax.make_mesh(shape, MESH_AXES, devices=devices, **_auto_axis_types(len(shape)))


def mesh_from_config(config) -> Mesh:
    """The mesh of ``config.mesh`` (data, fsdp) over all devices of the job."""
    return make_mesh(config.mesh.data, config.mesh.fsdp)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """The sharding of every batch leaf: the example dimension over data × fsdp.

    Args:
      mesh: the mesh.
      stacked: batches of several steps stacked on a new leading axis (``make_multi_step``): the
        step axis stays whole, the example axis (the second) is split.
    """
    return NamedSharding(mesh, PartitionSpec(None, MESH_AXES) if stacked else BATCH_SPEC)


# ----------------------------------------------------------------------------------------------------
# Train-state shardings


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int = 0) -> PartitionSpec:
    """The PartitionSpec of one state leaf: its largest dimension divisible by ``fsdp`` over "fsdp".

    Args:
      shape: the leaf's shape.
      fsdp: the size of the fsdp mesh axis.
      min_size: leaves with fewer elements stay replicated (sharding a bias saves nothing and costs
        an all-gather).

    Returns:
      PartitionSpec() (replicated) when fsdp == 1, the leaf is small, or no dimension is divisible;
      else a spec with "fsdp" at that dimension (ties: the last such dimension, the output features
      of a Dense / conv kernel).
    """
    shape = tuple(int(d) for d in shape)
    if fsdp <= 1 or not shape or math.prod(shape) < max(min_size, 1):
        return PartitionSpec()
    candidates = [i for i, d in enumerate(shape) if d % fsdp == 0 and d >= fsdp]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda i: (shape[i], i))
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return PartitionSpec(*spec)


def state_shardings(state: PyTree, mesh: Mesh, *, min_size: int = 0) -> PyTree:
    """NamedShardings for every leaf of a train state (or of any pytree of arrays / ShapeDtypeStructs).

    Replicated over "data"; with an fsdp axis larger than 1 every leaf (θ, θ⁻, the EMAs, the optimizer
    moments and a CD teacher's φ) is split by ``fsdp_spec``; scalars such as the step stay replicated.
    Works on ``jax.eval_shape`` output, so a large state can be created directly sharded.

    Args:
      state: a TrainState (or any pytree) of arrays or ShapeDtypeStructs.
      mesh: the ("data", "fsdp") mesh.
      min_size: see ``fsdp_spec``.

    Returns:
      a pytree of the same structure with a NamedSharding at every leaf.
    """
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, min_size)), state
    )


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """Puts a pytree that every process holds in full (same values) onto the devices of ``shardings``.

    Single process: ``jax.device_put``. Several processes: each process builds its own shards from
    its host copy (``jax.make_array_from_callback``), which needs no cross-host transfer. Typed PRNG
    keys are handled through their key data.

    Args:
      tree: arrays (identical on every process), e.g. a freshly initialised TrainState or a key.
      shardings: a matching pytree (or prefix) of Shardings.

    Returns:
      the tree as global jax.Arrays with the given shardings.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        if _is_key(x):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=impl)
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


# ----------------------------------------------------------------------------------------------------
# Batches


def check_global_batch(
    batch_size: int, mesh: Mesh, *, name: str = "config.data.batch_size"
) -> None:
    """Raises ValueError unless the global batch splits evenly over the devices and the processes.

    Args:
      batch_size: global batch (all hosts, all devices).
      mesh: the mesh; the batch is split over data × fsdp devices.
      name: what to call the batch size in the message.
    """
    n = mesh.size
    procs = jax.process_count()
    if batch_size < 1:
        raise ValueError(f"{name} must be positive, got {batch_size}.")
    if batch_size % n:
        raise ValueError(
            f"{name}={batch_size} is not divisible by the {n} devices it is split over "
            f"(mesh data={mesh.shape[DATA_AXIS]} × fsdp={mesh.shape[FSDP_AXIS]}); use a "
            f"multiple of {n}, e.g. {max(n, batch_size // n * n)}."
        )
    if batch_size % procs:
        raise ValueError(
            f"{name}={batch_size} is not divisible by the {procs} processes (hosts) "
            "that each load an equal share."
        )


def global_batch(local_batch: PyTree, mesh: Mesh, stacked: bool = False) -> PyTree:
    """Assembles the global batch from this process's share (``jax.make_array_from_process_local_data``).

    Args:
      local_batch: a pytree of host arrays whose leading dimension is this process's rows
        (global batch // process_count), e.g. {"image": (B_local, H, W, C), "label": (B_local,)};
        with ``stacked``, shaped (steps, B_local, ...).
      mesh: the mesh; rows are split over data × fsdp.
      stacked: the batches of several steps stacked on a leading axis (``train.make_multi_step``).

    Returns:
      the same pytree of global jax.Arrays (rows B_local × process_count), sharded by
      ``batch_sharding(mesh, stacked)``. The host-to-device copies are asynchronous.

    Raises:
      ValueError: when the leaves disagree on the number of rows (or steps) or the global batch does
        not split evenly over the devices.
    """
    leaves = jax.tree.leaves(local_batch)
    if not leaves:
        raise ValueError("The batch is empty.")
    axis = 1 if stacked else 0
    rows = {np.shape(x)[: axis + 1] if np.ndim(x) > axis else None for x in leaves}
    if len(rows) != 1 or None in rows:
        what = "(steps, examples) dimensions" if stacked else "leading (example) dimension"
        raise ValueError(
            f"Every batch entry needs the same {what}, got {jax.tree.map(np.shape, local_batch)}."
        )
    procs = jax.process_count()
    check_global_batch(rows.pop()[axis] * procs, mesh, name="The global batch size")
    sharding = batch_sharding(mesh, stacked)
    if procs == 1:
        return jax.device_put(local_batch, sharding)

    def assemble(x):
        shape = list(np.shape(x))
        shape[axis] *= procs
        return jax.make_array_from_process_local_data(sharding, np.asarray(x), tuple(shape))

    return jax.tree.map(assemble, local_batch)


def prefetch_to_mesh(iterator: Iterable[PyTree], mesh: Mesh, size: int = 2) -> Iterator[PyTree]:
    """Yields global batches while the next ``size − 1`` are already being copied to the devices.

    flax's ``jax_utils.prefetch_to_device`` is pmap-style (a leading device axis), hence this small
    mesh version. Note that it reads ahead of the consumer: an iterator whose state is checkpointed
    must be saved at the consumer's position, not the producer's.

    Args:
      iterator: host batches (this process's share).
      mesh: the mesh.
      size: how many batches live on the devices at once (≥ 1).
    """
    if size < 1:
        raise ValueError(f"The prefetch size must be at least 1, got {size}.")
    queue: collections.deque = collections.deque()
    it = iter(iterator)
    for batch in it:
        queue.append(global_batch(batch, mesh))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


# ----------------------------------------------------------------------------------------------------
# The sharded train step


@dataclasses.dataclass(frozen=True)
class ShardedTrainStep:
    """``train_step`` compiled for a mesh: ``(state, batch, rng) -> (state, metrics)``.

    The state is donated (its buffers are reused for the new state), the batch is expected sharded
    by ``batch_sharding``, the key and the metrics are replicated. Calling it checks the batch shape
    first, so a batch that does not split over the devices fails with a ValueError, not an XLA error.

    Attributes:
      jitted: the ``jax.jit`` function (``.lower(...)`` for cost analysis).
      mesh: the mesh.
      state_shardings: the shardings of the state (input and output).
      steps_per_call: train steps per call (> 1: a ``make_multi_step`` scan taking stacked batches
        and returning stacked metrics).
    """

    jitted: Callable
    mesh: Mesh
    state_shardings: PyTree
    steps_per_call: int = 1

    def __call__(self, state, batch, rng):
        axis = 0 if self.steps_per_call == 1 else 1
        for x in jax.tree.leaves(batch):
            if np.ndim(x) <= axis or np.shape(x)[axis] % self.mesh.size:
                raise ValueError(
                    f"A batch entry of shape {np.shape(x)} does not split over the "
                    f"{self.mesh.size} devices of the mesh {dict(self.mesh.shape)}; the "
                    "global batch size must be a multiple of the device count."
                )
            if axis and np.shape(x)[0] != self.steps_per_call:
                raise ValueError(
                    f"A batch entry of shape {np.shape(x)} does not stack "
                    f"steps_per_call={self.steps_per_call} batches on its leading axis."
                )
        return self.jitted(state, batch, rng)

    def lower(self, state, batch, rng):
        return self.jitted.lower(state, batch, rng)


def jit_train_step(
    train_step: Callable,
    mesh: Mesh,
    state_shardings: PyTree,
    *,
    donate: bool = True,
    steps_per_call: int = 1,
) -> ShardedTrainStep:
    """``jax.jit`` of a train step with explicit shardings and donation of the state.

    Args:
      train_step: from ``train.make_train_step`` with ``axis_name=None``.
      mesh: the mesh.
      state_shardings: from ``state_shardings``; used for the input and the output state, so the
        state keeps its layout from step to step (no resharding).
      donate: donate the input state (its buffers become the new state's; the caller must not use the
        old state afterwards).
      steps_per_call: > 1: ``train_step`` is ``train.make_multi_step(step, steps_per_call)``, that
        many steps per call on batches stacked on a leading axis (``global_batch(..., stacked=True)``);
        the batches are laid out (and checked) for it. Sharding does not import the train step.

    Returns:
      a ShardedTrainStep.
    """
    rep = replicated(mesh)
    stacked = steps_per_call > 1
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding(mesh, stacked), rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=0 if donate else (),
    )
    return ShardedTrainStep(
        jitted=jitted, mesh=mesh, state_shardings=state_shardings, steps_per_call=steps_per_call
    )


def describe(mesh: Mesh) -> str:
    """One line for the log: mesh shape, device kind and process count."""
    d = mesh.devices.flat[0]
    return (
        f"mesh data={mesh.shape[DATA_AXIS]} × fsdp={mesh.shape[FSDP_AXIS]} over {mesh.size} "
        f"{d.platform} device(s) ({d.device_kind}), {jax.process_count()} process(es)"
    )
