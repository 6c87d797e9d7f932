"""Checkpoints that never lose a run: Orbax saves, exact resume, preemption and read-only teachers.

A run's workdir holds ``checkpoints/<step>/`` written by an Orbax ``CheckpointManager`` (async saves
committed atomically: a step directory appears only once it is complete), one sub-item each:

  - ``state``: the TrainState without its eval EMAs and *without the teacher*: step k, θ, θ⁻ and the
    optimizer state (``StandardSave``);
  - ``ema``: the eval EMAs {ema_key(rate): tree} (``StandardSave``), a separate item so that a
    sampler, or a CD run using this run as its teacher, reads only the EMA it needs;
  - ``data``: the data iterator's position (``iterator.get_state()``, a small JSON dict);
  - ``config``: the run's config (JSON), compared with the config of a resumed run.

A run is resumed from the newest readable checkpoint of its workdir. The train step folds the step
into its base key (``train.make_train_step``) and the data iterators are pure functions of the
step, so a resumed run continues bitwise identically (same devices). A checkpoint that cannot be
read is reported by step and directory, moved to ``checkpoints_unreadable/`` and the previous one
is used. SIGTERM (a preemption notice) makes the loop finish its step, save and exit cleanly.

The teacher of consistency distillation (CM §3, Algorithm 2) is another run's EDM checkpoint, read
through a read-only manager: nothing is ever written into the teacher's directory, and the
student's checkpoints never contain φ (``TrainState.teacher_params`` is dropped before saving and
re-attached after a restore).

Nothing here unpickles: arrays go through Orbax/TensorStore, everything else through JSON.
"""
from __future__ import annotations

import json
import logging as logging_std
import os
import shutil
import signal
import threading
import time
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from consistency_jax import losses as losses_lib
from consistency_jax import parameterization as param_lib
from consistency_jax.networks import get_network, make_apply_fn
from consistency_jax.train_state import TrainState, ema_key

PyTree = Any

CHECKPOINT_SUBDIR = "checkpoints"
UNREADABLE_SUBDIR = "checkpoints_unreadable"
_STATE, _EMA, _DATA, _CONFIG = "state", "ema", "data", "config"

# Config fields that may differ between a checkpoint and the run resuming it: they change how long
# the run is and what it logs, evaluates or keeps, not the trajectory of the train state. A prefix
# ending in "." covers a whole block. mesh.*: Orbax restores onto the live shardings, so a run may
# resume on another mesh (the reduction order, hence the last bits, then differ).
RESUMABLE_KEYS: tuple[str, ...] = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.steps_per_call", "checkpoint.",
    "eval.", "mesh.", "data.data_dir",
)


class _QuietOrbax(logging_std.Filter):
    """Drops Orbax's per-file INFO chatter from the absl log; its warnings and errors still show."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


_QUIET_ORBAX = _QuietOrbax()
if not any(isinstance(f, _QuietOrbax) for f in logging_std.getLogger("absl").filters):
    logging_std.getLogger("absl").addFilter(_QUIET_ORBAX)


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, or written by a different config."""


class NonFiniteStateError(FloatingPointError):
    """A train state holding NaN or Inf was about to be checkpointed."""


# ----------------------------------------------------------------------------------------------------
# Configs as JSON


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as a JSON-able dict (tuples become lists), as stored in every checkpoint."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _as_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_tuples(v) for k, v in value.items()}
    return value


def config_from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds a ConfigDict from ``config_to_dict`` output (JSON lists become tuples)."""
    return ml_collections.ConfigDict(_as_tuples(dict(d)))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _resumable(key: str) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in RESUMABLE_KEYS)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                       ignore_resumable: bool = True) -> list[str]:
    """Lists the fields in which two configs (``config_to_dict`` dicts) differ.

    Args:
      saved: the config stored in a checkpoint.
      current: the config of the run that wants to resume it.
      ignore_resumable: leave out the fields of ``RESUMABLE_KEYS`` (number of steps, logging,
        evaluation and checkpoint cadence, mesh, data directory).

    Returns:
      Sorted strings "key: saved -> current" (``<absent>`` for a missing field).
    """
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if ignore_resumable and _resumable(key):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


# ----------------------------------------------------------------------------------------------------
# Finiteness of a state


def _float_leaves(tree: PyTree) -> list:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


@jax.jit
def _all_finite(groups: dict) -> dict:
    return {k: jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in _float_leaves(v)] or [True]))
            for k, v in groups.items()}


def nonfinite_parts(state: TrainState) -> list[str]:
    """Names the parts of the train state (params, target_params, ema_params['r'], opt_state) that
    hold a NaN or Inf; an empty list when all are finite. One fused reduction on the devices."""
    groups = {"params": state.params, "target_params": state.target_params,
              "opt_state": state.opt_state}
    groups.update({f"ema_params[{k!r}]": v for k, v in state.ema_params.items()})
    flags = jax.device_get(_all_finite({k: v for k, v in groups.items() if v is not None}))
    return sorted(k for k, ok in flags.items() if not ok)


# ----------------------------------------------------------------------------------------------------
# Abstract targets


def abstract_like(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs with the shardings of a live pytree: the restore target (Orbax restores
    every array straight into the sharding of the live state, also across hosts)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _abstract_from_metadata(tree: PyTree, sharding: Optional[jax.sharding.Sharding]) -> PyTree:
    def leaf(m):
        if hasattr(m, "shape") and hasattr(m, "dtype"):
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)
        return m

    return jax.tree.map(leaf, tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _brief(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` cut to its first line and ``limit`` characters (TensorStore errors carry
    kilobytes of spec)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(e).__name__}: {text}"


def _metadata_tree(md: Any) -> PyTree:
    return md.tree if hasattr(md, "tree") else md


def _student_part(state: TrainState) -> TrainState:
    """What the ``state`` item holds: no EMAs (own item) and never the teacher."""
    return state.replace(ema_params={}, teacher_params=None, distance=None)


# ----------------------------------------------------------------------------------------------------
# The manager of a run


def _item_handlers(read_only: bool) -> dict:
    # Read-only managers read the array items with the PyTree handler (the on-disk format of
    # StandardSave), which can restore a part of an item (one EMA, or θ alone).
    arrays = ocp.PyTreeCheckpointHandler if read_only else ocp.StandardCheckpointHandler
    return {_STATE: arrays(), _EMA: arrays(), _DATA: ocp.JsonCheckpointHandler(),
            _CONFIG: ocp.JsonCheckpointHandler()}


def _pytree_restore(target: PyTree, partial: bool) -> ocp.args.PyTreeRestore:
    """PyTreeRestore args of an abstract target (ShapeDtypeStructs with or without shardings)."""

    def arg(a):
        if a.sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype)
        return ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)

    return ocp.args.PyTreeRestore(item=target, restore_args=jax.tree.map(arg, target),
                                  partial_restore=partial)


class Checkpointer:
    """Saves and restores the train state of one run (``<workdir>/checkpoints``).

    Saves are asynchronous: ``save`` returns once the arrays are copied off the devices and the
    files are written in the background (the next ``save``, ``wait`` or ``close`` waits for them).
    Orbax keeps the newest ``keep`` checkpoints and, if ``keep_every`` > 0, every checkpoint whose
    step is a multiple of ``keep_every``.
    """

    def __init__(self, workdir: str, *, every: int, keep: int, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        """Opens (or, unless read-only, creates) ``<workdir>/checkpoints``.

        Args:
          workdir: the run's directory.
          every: save every ``every`` steps (the loop also saves at the end and on SIGTERM).
          keep: number of newest checkpoints to keep (≥ 1).
          keep_every: also keep every checkpoint whose step is a multiple of this; 0 disables.
          async_save: write in a background thread.
          read_only: never write or delete anything (teachers, inspection).

        Raises:
          ValueError: a bad ``every``, ``keep`` or ``keep_every`` (named as config.checkpoint.*).
        """
        if every < 1:
            raise ValueError(f"config.checkpoint.every must be positive, got {every}.")
        if keep < 1:
            raise ValueError(f"config.checkpoint.keep must be at least 1, got {keep}.")
        if keep_every < 0:
            raise ValueError(f"config.checkpoint.keep_every must be >= 0 (0 disables), got "
                             f"{keep_every}.")
        # Orbax needs absolute paths.
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_SUBDIR)
        self.every = int(every)
        self.read_only = read_only
        policies = [ocp.checkpoint_managers.LatestN(n=int(keep))]
        if keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=int(keep_every)))
        options = ocp.CheckpointManagerOptions(
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
            # A save killed half-way leaves a temporary directory: removed on start.
            cleanup_tmp_directories=not read_only,
            preservation_policy=(None if read_only else
                                 ocp.checkpoint_managers.AnyPreservationPolicy(policies)),
        )
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"No checkpoints in {self.workdir}: {self.directory} does not "
                                  "exist.")
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=_item_handlers(read_only),
                                              options=options)
        self._closed = False

    @classmethod
    def from_config(cls, workdir: str, config: ml_collections.ConfigDict) -> "Checkpointer":
        """Opens the run's checkpoints and checks that they were written by ``config``
        (``check_config``), before anything is built or compiled."""
        c = config.checkpoint
        ckpt = cls(workdir, every=c.every, keep=c.keep, keep_every=c.keep_every)
        ckpt.check_config(config)
        return ckpt

    # -- inspection

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _read_json(self, step: int, item: str) -> Any:
        return self._manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.JsonRestore()}))[item]

    def saved_config(self) -> Optional[tuple[int, dict]]:
        """(step, config dict) of the newest checkpoint whose config is readable; None when there
        is no checkpoint.

        Raises:
          CheckpointError: there are checkpoints but none has a readable config.
        """
        steps = self.all_steps()
        errors = []
        for step in reversed(steps):
            try:
                cfg = self._read_json(step, _CONFIG)
                if not isinstance(cfg, dict):
                    raise ValueError(f"the stored config is a {type(cfg).__name__}, not a dict")
                return step, cfg
            except Exception as e:  # noqa: BLE001 -- any failure to read means unreadable
                logging.warning("The config of checkpoint step %d (%s) is unreadable: %s", step,
                                self.step_dir(step), _brief(e))
                errors.append(f"step {step} ({self.step_dir(step)}): {_brief(e)}")
        if steps:
            raise CheckpointError(
                f"No readable checkpoint in {self.directory}: " + "; ".join(errors) +
                ". Move the directory away to start afresh.")
        return None

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        """Refuses to resume a checkpoint written by a different config.

        Differences in ``RESUMABLE_KEYS`` are allowed (extending a run changes schedules that
        depend on train.num_steps: a warning says so). With ``config.checkpoint.override_config``
        the differences are logged and the run resumes anyway.

        Raises:
          CheckpointError: listing the differing fields, or when no checkpoint is readable.
        """
        found = self.saved_config()
        if found is None:
            return
        step, saved = found
        current = config_to_dict(config)
        diffs = config_differences(saved, current)
        if diffs:
            if config.checkpoint.override_config:
                logging.warning("Resuming step %d of %s with a different config "
                                "(config.checkpoint.override_config=True): %s", step,
                                self.directory, "; ".join(diffs))
            else:
                raise CheckpointError(
                    f"{self.directory} holds a checkpoint (step {step}) of a different config; "
                    f"differing fields (saved -> now): {'; '.join(diffs)}. Use another workdir, or "
                    "set config.checkpoint.override_config=True to resume it anyway.")
        old_steps = _flatten(saved).get("train.num_steps")
        if old_steps is not None and old_steps != config.train.num_steps:
            depends = [name for name, yes in (
                ("the curriculum N(k), μ(k) (curriculum.total_steps = 0)",
                 not config.curriculum.total_steps and config.curriculum.kind != "constant"),
                ("the cosine learning-rate decay", config.optim.decay == "cosine")) if yes]
            logging.warning("Resuming with train.num_steps=%d (was %s)%s.", config.train.num_steps,
                            old_steps, ("; this changes " + " and ".join(depends)) if depends else "")

    # -- saving

    def should_save(self, step: int, final: bool = False) -> bool:
        """True every ``every`` steps and at the final step."""
        return final or step % self.every == 0

    def save(self, state: TrainState, *, step: int, data_state: Optional[Mapping[str, Any]],
             config: ml_collections.ConfigDict) -> bool:
        """Starts an asynchronous save of ``state`` as checkpoint ``step``.

        The teacher is not saved. A step that already exists is not overwritten (Orbax would skip
        it silently; this logs it).

        Args:
          state: the train state after ``step`` optimizer steps.
          step: the step number (``int(state.step)``; passed to avoid a device sync).
          data_state: the data iterator's ``get_state()`` after ``step`` batches.
          config: the run's config.

        Returns:
          True when a save was started.

        Raises:
          NonFiniteStateError: the state holds NaN/Inf (nothing is written).
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only.")
        if step in self._manager.all_steps():
            logging.info("Checkpoint step %d already exists in %s; not overwritten.", step,
                         self.directory)
            return False
        bad = nonfinite_parts(state)
        if bad:
            self.wait()  # the previous, finite checkpoint is committed
            raise NonFiniteStateError(
                f"Refusing to checkpoint step {step}: non-finite values in {', '.join(bad)}. The "
                f"checkpoints in {self.directory} hold only earlier steps.")
        items = {
            _STATE: ocp.args.StandardSave(_student_part(state)),
            _DATA: ocp.args.JsonSave(dict(data_state or {})),
            _CONFIG: ocp.args.JsonSave(config_to_dict(config)),
        }
        if state.ema_params:
            items[_EMA] = ocp.args.StandardSave(dict(state.ema_params))
        t0 = time.time()
        started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        logging.info("Checkpoint step %d -> %s (the loop was blocked %.2fs).", step,
                     self.step_dir(step), time.time() - t0)
        return bool(started)

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring

    def _restore_step(self, step: int, state: TrainState) -> tuple[TrainState, dict]:
        student = _student_part(state)
        items = {_STATE: ocp.args.StandardRestore(abstract_like(student)),
                 _DATA: ocp.args.JsonRestore()}
        if state.ema_params:
            items[_EMA] = ocp.args.StandardRestore(abstract_like(dict(state.ema_params)))
        got = self._manager.restore(step, args=ocp.args.Composite(**items))
        # Orbax returns containers of the target's types; unflattening with the live treedef also
        # restores optax's NamedTuples and makes the jitted step see exactly the same structure.
        restored = jax.tree.unflatten(jax.tree.structure(student), jax.tree.leaves(got[_STATE]))
        ema = dict(state.ema_params)
        if state.ema_params:
            ema = jax.tree.unflatten(jax.tree.structure(ema), jax.tree.leaves(got[_EMA]))
        restored = restored.replace(ema_params=ema, teacher_params=state.teacher_params,
                                    distance=state.distance)
        saved_step = int(jax.device_get(restored.step))
        if saved_step != step:
            raise CheckpointError(f"Checkpoint directory {self.step_dir(step)} holds a state of "
                                  f"step {saved_step}.")
        data_state = got[_DATA]
        if not isinstance(data_state, dict):
            raise CheckpointError(f"The data iterator state of {self.step_dir(step)} is not a dict.")
        if "step" in data_state and int(data_state["step"]) != step:
            logging.warning("Checkpoint step %d stored the data iterator at step %s; using step %d.",
                            step, data_state["step"], step)
            data_state = {**data_state, "step": step}
        return restored, data_state

    def restore(self, state: TrainState) -> Optional[tuple[TrainState, dict]]:
        """Restores the newest readable checkpoint into the structure and shardings of ``state``.

        A checkpoint that fails to load is named in a warning; when an older one loads, the newer
        unreadable ones are moved to ``<workdir>/checkpoints_unreadable/`` (so that the run can
        write those steps again). ``state.teacher_params`` is carried over, never read from disk.

        Args:
          state: a freshly initialised (possibly sharded) train state: the restore target.

        Returns:
          (restored state, data iterator state), or None when the workdir has no checkpoint.

        Raises:
          CheckpointError: there are checkpoints but none can be restored into ``state`` (corrupt,
            or written for another network or optimizer); nothing is moved in that case.
        """
        steps = self.all_steps()
        if not steps:
            return None
        bad: list[int] = []
        errors: list[str] = []
        for step in reversed(steps):
            try:
                restored, data_state = self._restore_step(step, state)
            except Exception as e:  # noqa: BLE001 -- any failure to read means unreadable
                logging.warning("Checkpoint step %d in %s is unreadable (%s); trying the previous "
                                "one.", step, self.step_dir(step), _brief(e))
                bad.append(step)
                errors.append(f"step {step} ({self.step_dir(step)}): {_brief(e)}")
                continue
            if bad and not self.read_only:
                self._quarantine(bad)
            logging.info("Resumed from %s (step %d).", self.step_dir(step), step)
            return restored, data_state
        raise CheckpointError(
            f"None of the checkpoints in {self.directory} can be restored: " + "; ".join(errors) +
            ". If the network or optimizer changed, use another workdir; if the files are damaged, "
            "move the directory away to start afresh.")

    def _quarantine(self, steps: Sequence[int]) -> None:
        dest_root = os.path.join(self.workdir, UNREADABLE_SUBDIR)
        if jax.process_index() == 0:
            os.makedirs(dest_root, exist_ok=True)
            for step in steps:
                dest = os.path.join(dest_root, f"{step}-{int(time.time())}")
                shutil.move(self.step_dir(step), dest)
                logging.warning("Moved the unreadable checkpoint %s to %s.", self.step_dir(step),
                                dest)
        ocp.multihost.sync_global_processes("consistency_jax_checkpoint_quarantine")
        self._manager.reload()


# ----------------------------------------------------------------------------------------------------
# Preemption


class PreemptionWatcher:
    """Turns SIGTERM (the preemption notice of TPU/GPU clouds) into "save and stop".

    Single process: a SIGTERM handler sets a flag and the loop, at the end of the current step,
    sees ``reached(step)``, saves and returns (exit code 0). The handler is installed when the
    watcher is created (from the main thread only) and the previous one is restored by ``close``.
    A second SIGTERM, one after ``close``, or one after the watcher was dropped without ``close``
    (the loop died with an exception) goes to the previous handler. Multiple processes: JAX's
    preemption sync service (started by ``jax.distributed.initialize``) catches the signal and
    ``reached`` returns True on every host at the same step (Orbax ``reached_preemption``).
    """

    def __init__(self, checkpointer: Optional[Checkpointer] = None,
                 signals: Sequence[int] = (signal.SIGTERM,)):
        self._checkpointer = checkpointer
        self.received: Optional[str] = None
        self._active = True
        self._previous: dict[int, Any] = {}
        self._handler = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            # The handler holds the watcher weakly, so a watcher that is never closed does not keep
            # swallowing signals after it is gone.
            self._handler = _make_handler(weakref.ref(self), self._previous)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _take(self, signum: int) -> bool:
        if not self._active or self.received is not None:
            return False
        self.received = signal.Signals(signum).name
        logging.warning("Received %s: finishing the current step, saving a checkpoint and exiting.",
                        self.received)
        return True

    def reached(self, step: int, steps: int = 1) -> bool:
        """True when the loop should save and stop after ``step``.

        Args:
          step: the number of steps done.
          steps: how many steps the last call of the train step ran (``train.steps_per_call``).
            JAX's preemption sync point is agreed as one step number and must be asked about every
            step, so steps ``step − steps + 1 … step`` are all checked; every host then sees it in
            the same call and stops after ``step``.
        """
        if self.received is not None:
            return True
        if jax.process_count() > 1 and self._checkpointer is not None:
            for s in range(step - steps + 1, step + 1):
                if self._checkpointer._manager.reached_preemption(s):
                    self.received = "preemption notice"
                    return True
        return False

    def close(self) -> None:
        """Restores the signal handlers that were installed before (idempotent)."""
        self._active = False
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                if signal.getsignal(sig) is self._handler:
                    signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _make_handler(watcher_ref: "weakref.ref[PreemptionWatcher]", previous: dict[int, Any]):
    def handler(signum, frame):
        watcher = watcher_ref()
        if watcher is not None and watcher._take(signum):
            return
        prev = previous.get(signum)
        prev = signal.SIG_DFL if prev is None else prev
        signal.signal(signum, prev)
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    return handler


# ----------------------------------------------------------------------------------------------------
# Reading a finished run: eval parameters and CD teachers


def _replicated() -> jax.sharding.Sharding:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


ShardingSpec = Union[None, jax.sharding.Sharding, Callable[[PyTree], PyTree]]


def _with_shardings(abstract: PyTree, sharding: ShardingSpec) -> PyTree:
    if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
        shardings = sharding(abstract)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    s = sharding if sharding is not None else _replicated()
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract)


def load_eval_params(workdir: str, ema_rate: Optional[float] = None, *,
                     step: Optional[int] = None, sharding: ShardingSpec = None
                     ) -> tuple[ml_collections.ConfigDict, PyTree, int]:
    """Reads the evaluation parameters of a run, read-only (nothing is written into ``workdir``).

    Args:
      workdir: the run's directory.
      ema_rate: which eval EMA; None: the slowest one saved (θ itself if the run kept none).
      step: which checkpoint; None: the newest readable one.
      sharding: a Sharding for every array (default: replicated over all devices), or a function
        from the abstract parameter tree (ShapeDtypeStructs) to a tree of shardings (FSDP).

    Returns:
      (the run's config, the parameters, the step they were read from).

    Raises:
      CheckpointError: no checkpoint, no readable one, or no EMA of ``ema_rate``.
    """
    workdir = os.path.abspath(workdir)
    ckpt = Checkpointer(workdir, every=1, keep=1, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"No checkpoint in {ckpt.directory}.")
        if step is not None and step not in steps:
            raise CheckpointError(f"No checkpoint of step {step} in {ckpt.directory}; saved steps: "
                                  f"{steps}.")
        errors = []
        for s in ([step] if step is not None else list(reversed(steps))):
            try:
                return _read_eval_params(ckpt, s, ema_rate, sharding)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 -- unreadable: try the previous step
                logging.warning("Checkpoint step %d in %s is unreadable (%s).", s,
                                ckpt.step_dir(s), _brief(e))
                errors.append(f"step {s} ({ckpt.step_dir(s)}): {_brief(e)}")
        raise CheckpointError(f"No readable checkpoint in {ckpt.directory}: " + "; ".join(errors))
    finally:
        ckpt.close()


def _read_eval_params(ckpt: Checkpointer, step: int, ema_rate: Optional[float],
                      sharding: ShardingSpec) -> tuple[ml_collections.ConfigDict, PyTree, int]:
    config = config_from_dict(ckpt._read_json(step, _CONFIG))
    metadata = ckpt._manager.item_metadata(step)
    ema_md = metadata.get(_EMA) if hasattr(metadata, "get") else None
    ema_md = _metadata_tree(ema_md) if ema_md is not None else None
    if ema_md:
        saved = {k: float(k) for k in ema_md}
        if ema_rate is None:
            key = max(saved, key=float)
        else:
            key = ema_key(ema_rate)
            if key not in saved:
                raise CheckpointError(f"{ckpt.step_dir(step)} has no EMA of rate {ema_rate}; "
                                      f"saved EMA rates: {sorted(saved.values())}.")
        target = {key: _with_shardings(_abstract_from_metadata(ema_md[key], None), sharding)}
        # Read only this EMA: the other EMAs are left out of the target (partial restore).
        got = ckpt._manager.restore(step, args=ocp.args.Composite(
            **{_EMA: _pytree_restore(target, partial=True)}))
        params = got[_EMA][key]
        logging.info("Read the EMA %s of %s.", key, ckpt.step_dir(step))
    else:
        if ema_rate is not None:
            raise CheckpointError(f"{ckpt.step_dir(step)} has no eval EMAs (asked for {ema_rate}).")
        state_md = _metadata_tree(metadata[_STATE])
        target = {"params": _with_shardings(_abstract_from_metadata(state_md["params"], None),
                                            sharding)}
        got = ckpt._manager.restore(step, args=ocp.args.Composite(
            **{_STATE: _pytree_restore(target, partial=True)}))
        params = got[_STATE]["params"]
        logging.info("Read θ (no eval EMA saved) of %s.", ckpt.step_dir(step))
    return config, params, step


def teacher_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of a CD teacher run, checked to be an EDM run with a readable checkpoint.

    Reads only the JSON config (no arrays), so ``experiment.parse_config`` can call it before
    anything is built.

    Args:
      workdir: the teacher run's directory (never written to).

    Returns:
      The teacher run's config.

    Raises:
      CheckpointError: no checkpoint in ``workdir``, none readable, or not a method='edm' run.
    """
    workdir = os.path.abspath(workdir) if workdir else workdir
    if not workdir or not os.path.isdir(os.path.join(workdir, CHECKPOINT_SUBDIR)):
        raise CheckpointError(
            f"config.teacher.workdir={workdir!r} holds no checkpoints (no {CHECKPOINT_SUBDIR}/ "
            "directory); train an EDM teacher there first (method='edm').")
    ckpt = Checkpointer(workdir, every=1, keep=1, read_only=True)
    try:
        found = ckpt.saved_config()
    finally:
        ckpt.close()
    if found is None:
        raise CheckpointError(f"config.teacher.workdir={workdir!r} holds no checkpoint (the "
                              f"{CHECKPOINT_SUBDIR}/ directory is empty); train an EDM teacher "
                              "first.")
    config = config_from_dict(found[1])
    if config.get("method") != "edm":
        raise CheckpointError(
            f"The teacher {workdir} is a method={config.get('method')!r} run; consistency "
            "distillation needs an EDM teacher (a run with method='edm').")
    return config


def load_teacher(workdir: str, ema_rate: Optional[float] = None, *,
                 sharding: ShardingSpec = None) -> tuple[losses_lib.TeacherDenoise, PyTree]:
    """The CD teacher D_φ (CM §3, Algorithm 2) from an EDM run's workdir, read-only.

    Reads the teacher run's saved config, builds its network (``networks.get_network`` with its
    ``config.model``), restores its eval EMA (the slowest by default) and wraps it with the
    teacher's own EDM preconditioning (its ``config.sigmas``, EDM Eq. 7) as
    ``losses.network_teacher``.

    Args:
      workdir: the teacher run's directory (never written to).
      ema_rate: which of the teacher's EMAs; None: its slowest.
      sharding: see ``load_eval_params``.

    Returns:
      (teacher_denoise(teacher_params, x, t, labels=None) -> D_φ(x, t), teacher_params).

    Raises:
      CheckpointError: no (readable) checkpoint in ``workdir``, or the run is not an EDM teacher.
    """
    teacher_config(workdir)
    config, params, step = load_eval_params(workdir, ema_rate, sharding=sharding)
    if config.get("method") != "edm":  # the step read may differ from the one checked above
        raise CheckpointError(f"The teacher {workdir} (step {step}) is not a method='edm' run.")
    kwargs = dict(config.model.kwargs)
    if config.model.dtype != "float32":
        kwargs["dtype"] = jnp.dtype(config.model.dtype)
    module = get_network(config.model.name, **kwargs)
    sigmas = param_lib.SigmaConfig(**config.sigmas.to_dict())
    logging.info("Teacher: %s network of %s step %d (%.3fM parameters).", config.model.name, workdir,
                 step, sum(x.size for x in jax.tree.leaves(params)) / 1e6)
    return losses_lib.network_teacher(make_apply_fn(module), sigmas), params


def read_arrays(workdir: str, step: Optional[int] = None) -> dict[str, np.ndarray]:
    """Every array of a checkpoint as host NumPy arrays, keyed "state/params/Dense_0/kernel",
    "ema/0.999/..." (for inspection and tests; read-only).

    Args:
      workdir: the run's directory.
      step: which checkpoint; None: the newest.

    Returns:
      A flat dict name -> array.
    """
    ckpt = Checkpointer(workdir, every=1, keep=1, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {ckpt.directory}.")
        metadata = ckpt._manager.item_metadata(step)
        items = {}
        for name in (_STATE, _EMA):
            md = metadata.get(name) if hasattr(metadata, "get") else None
            if md is None:
                continue
            target = _abstract_from_metadata(_metadata_tree(md), None)
            items[name] = _pytree_restore(target, partial=False)
        got = ckpt._manager.restore(step, args=ocp.args.Composite(**items))
        out = {}
        for name in items:
            for path, leaf in jax.tree_util.tree_flatten_with_path(got[name])[0]:
                key = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))))
                               for p in path)
                out[f"{name}/{key}"] = np.asarray(leaf)
        return out
    finally:
        ckpt.close()
