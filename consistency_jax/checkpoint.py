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
is used; so is one whose arrays do not match the checksums stored at save time
(``checkpoint_checksums/<step>.json``) or hold NaN/Inf. A failed asynchronous save is raised at once
(``check_save``, polled after every step) as ``CheckpointSaveError`` with its cause. Temporary
directories of interrupted saves are removed only by the holder of the workdir's lease
(``workdir_lock``). SIGTERM (a preemption notice) makes the loop finish its step, save and exit
cleanly.

The teacher of consistency distillation (CM Algorithm 2) is another run's EDM checkpoint, read
through a read-only manager (``loading.py``): nothing is ever written into the teacher's directory,
and the student's checkpoints never contain φ (``TrainState.teacher_params`` is dropped before
saving and re-attached after a restore). The SIGTERM watcher is ``preemption.py``.

Nothing here unpickles: arrays go through Orbax/TensorStore, everything else through JSON.
"""

from __future__ import annotations

import json
import logging as logging_std
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from consistency_jax import fs
from consistency_jax.train_state import TrainState

PyTree = Any

CHECKPOINT_SUBDIR = "checkpoints"
UNREADABLE_SUBDIR = "checkpoints_unreadable"
CHECKSUM_SUBDIR = "checkpoint_checksums"  # <step>.json: a checksum of every saved array
_STATE, _EMA, _DATA, _CONFIG = "state", "ema", "data", "config"

# Config fields that may differ between a checkpoint and the run resuming it: they change how long
# the run is and what it logs, evaluates or keeps, not the trajectory of the train state. A prefix
# ending in "." covers a whole block. mesh.*: Orbax restores onto the live shardings, so a run may
# resume on another mesh (the reduction order, hence the last bits, then differ).
RESUMABLE_KEYS: tuple[str, ...] = (
    "train.num_steps",
    "train.log_every",
    "train.eval_every",
    "train.steps_per_call",
    "checkpoint.",
    "eval.",
    "mesh.",
    "data.data_dir",
    "init.",  # config.init is read only when a run starts
)

# Config fields that change the training dynamics but not the structure of the saved state: the
# knobs of NaN recovery. They may change on resume (a warning lists them); the run then continues
# on another trajectory from the restored state. optim.grad_clip keeps the optimizer state's layout
# of the checkpoint (``build.make_optimizer(clip_layout=...)``).
DYNAMICS_KEYS: tuple[str, ...] = (
    "optim.lr",
    "optim.warmup_steps",
    "optim.decay",
    "optim.grad_clip",
    "train.skip_nonfinite",
    "train.max_consecutive_skips",
    "train.max_skip_fraction",
    "loss.huber_c",
)


class _QuietOrbax(logging_std.Filter):
    """Drops Orbax's per-file INFO chatter from the absl log; its warnings and errors still show, as
    one line each: a failed save is re-raised by ``Checkpointer`` with its cause, so Orbax's copies
    of the traceback (one per thread that saw it) would only bury the error."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.levelno < logging_std.WARNING:
            return False
        if record.exc_info:
            e = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({_brief(e) if e is not None else 'error'})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


_QUIET_ORBAX = _QuietOrbax()
if not any(isinstance(f, _QuietOrbax) for f in logging_std.getLogger("absl").filters):
    logging_std.getLogger("absl").addFilter(_QUIET_ORBAX)


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, or written by a different config."""


class NonFiniteStateError(FloatingPointError):
    """A train state holding NaN or Inf was about to be checkpointed."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a lost mount, ...): the run must stop."""


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


def config_differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    ignore_resumable: bool = True,
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """Lists the fields in which two configs (``config_to_dict`` dicts) differ.

    Args:
      saved: the config stored in a checkpoint.
      current: the config of the run that wants to resume it.
      ignore_resumable: leave out the fields of ``RESUMABLE_KEYS`` (number of steps, logging,
        evaluation and checkpoint cadence, mesh, data directory).
      defaults: a config dict of default values (``methods.default_values()``): a field absent from
        ``saved`` (a checkpoint written before the field existed) counts as holding its default, the
        value every earlier run had.

    Returns:
      Sorted strings "key: saved -> current" (``<absent>`` for a missing field).
    """
    return [
        f"{key}: {va!r} -> {vb!r}"
        for key, va, vb in differing_fields(
            saved, current, ignore_resumable=ignore_resumable, defaults=defaults
        )
    ]


def differing_fields(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    ignore_resumable: bool,
    defaults: Mapping[str, Any] | None,
) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every differing field, as ``config_differences`` lists them."""
    a, b, defaults = _flatten(saved), _flatten(current), _flatten(defaults or {})
    out = []
    for key in sorted(set(a) | set(b)):
        if ignore_resumable and _resumable(key):
            continue
        va, vb = a.get(key, defaults.get(key, "<absent>")), b.get(key, "<absent>")
        if va != vb:
            out.append((key, va, vb))
    return out


def _dynamics(key: str) -> bool:
    return key in DYNAMICS_KEYS


# ----------------------------------------------------------------------------------------------------
# Finiteness of a state


def _float_leaves(tree: PyTree) -> list:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


@jax.jit
def _all_finite(groups: dict) -> dict:
    return {
        k: jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in _float_leaves(v)] or [True]))
        for k, v in groups.items()
    }


def nonfinite_parts(state: TrainState) -> list[str]:
    """Names the parts of the train state (params, target_params, ema_params['r'], opt_state) that
    hold a NaN or Inf; an empty list when all are finite. One fused reduction on the devices."""
    groups = {
        "params": state.params,
        "target_params": state.target_params,
        "opt_state": state.opt_state,
    }
    groups.update({f"ema_params[{k!r}]": v for k, v in state.ema_params.items()})
    flags = jax.device_get(_all_finite({k: v for k, v in groups.items() if v is not None}))
    return sorted(k for k, ok in flags.items() if not ok)


# ----------------------------------------------------------------------------------------------------
# Checksums of the saved arrays


def _bits(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (one per element; 64-bit elements as two words)."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)


@jax.jit
def _checksums(tree: PyTree) -> list:
    """One uint32 per array: Σ w_i·b_i mod 2³² over its words b_i with odd weights w_i, so that any
    one flipped bit changes it (and random damage with probability 1 − 2⁻³²). Runs on the devices,
    asynchronously: the training thread only dispatches it."""
    out = []
    for x in jax.tree.leaves(tree):
        b = _bits(x)
        i = jnp.arange(b.size, dtype=jnp.uint32)
        w = i * jnp.uint32(2654435761) | jnp.uint32(1)
        out.append(jnp.sum(w * b, dtype=jnp.uint32) ^ jnp.uint32(b.size))
    return out


def _array_names(tree: PyTree) -> list[str]:
    """ "state/params/Dense_0/kernel"-like names of the leaves, in ``jax.tree.leaves`` order."""
    return [
        "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _saved_arrays(state: TrainState) -> dict:
    """The arrays a checkpoint holds, as {item: tree}: the student state and its eval EMAs."""
    out = {_STATE: _student_part(state)}
    if state.ema_params:
        out[_EMA] = dict(state.ema_params)
    return out


def checksums(state: TrainState) -> tuple[list[str], list]:
    """(array names, device checksums) of the arrays a checkpoint of ``state`` holds; the checksums
    are still being computed on the devices when this returns (``jax.device_get`` waits)."""
    arrays = _saved_arrays(state)
    return _array_names(arrays), _checksums(arrays)


# ----------------------------------------------------------------------------------------------------
# Abstract targets


def abstract_like(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs with the shardings of a live pytree: the restore target (Orbax restores
    every array straight into the sharding of the live state, also across hosts)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _abstract_from_metadata(tree: PyTree, sharding: jax.sharding.Sharding | None) -> PyTree:
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


def check_cadence(every: int, keep: int, keep_every: int = 0) -> None:
    """The one check of a checkpoint cadence (``config.checkpoint.every/keep/keep_every``).

    Raises:
      ValueError: naming the field: every >= 1, keep >= 1, keep_every >= 0 (0 disables).
    """
    for name, value, low in (("every", every, 1), ("keep", keep, 1), ("keep_every", keep_every, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(
                f"config.checkpoint.{name} must be an integer >= {low}, got {value!r} "
                "(every: save every N steps; keep: newest checkpoints kept; keep_every: "
                "also keep every M-th step, 0 disables)."
            )


def _item_handlers(read_only: bool) -> dict:
    # Read-only managers read the array items with the PyTree handler (the on-disk format of
    # StandardSave), which can restore a part of an item (one EMA, or θ alone).
    arrays = ocp.PyTreeCheckpointHandler if read_only else ocp.StandardCheckpointHandler
    return {
        _STATE: arrays(),
        _EMA: arrays(),
        _DATA: ocp.JsonCheckpointHandler(),
        _CONFIG: ocp.JsonCheckpointHandler(),
    }


def _pytree_restore(target: PyTree, partial: bool) -> ocp.args.PyTreeRestore:
    """PyTreeRestore args of an abstract target (ShapeDtypeStructs with or without shardings)."""

    def arg(a):
        if a.sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype)
        return ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)

    return ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(arg, target), partial_restore=partial
    )


class Checkpointer:
    """Saves and restores the train state of one run (``<workdir>/checkpoints``).

    Saves are asynchronous: ``save`` returns once the arrays are copied off the devices and the
    files are written in the background (the next ``save``, ``wait`` or ``close`` waits for them).
    Orbax keeps the newest ``keep`` checkpoints and, if ``keep_every`` > 0, every checkpoint whose
    step is a multiple of ``keep_every``.
    """

    def __init__(
        self,
        workdir: str,
        *,
        every: int,
        keep: int,
        keep_every: int = 0,
        async_save: bool = True,
        read_only: bool = False,
        clean_tmp: bool = False,
    ):
        """Opens (or, unless read-only, creates) ``<workdir>/checkpoints``.

        Args:
          workdir: the run's directory.
          every: save every ``every`` steps (the loop also saves at the end and on SIGTERM).
          keep: number of newest checkpoints to keep (≥ 1).
          keep_every: also keep every checkpoint whose step is a multiple of this; 0 disables.
          async_save: write in a background thread.
          read_only: never write or delete anything (teachers, inspection).
          clean_tmp: remove the temporary directories of saves that never completed
            (``STEP.orbax-checkpoint-tmp``). Only the holder of the workdir's lease
            (``workdir_lock.WorkdirLock``) may: in another run's workdir such a directory may be a
            save in progress.

        Raises:
          ValueError: a bad ``every``, ``keep`` or ``keep_every`` (named as config.checkpoint.*).
        """
        check_cadence(every, keep, keep_every)
        # Orbax needs absolute paths (or gs:// URLs).
        self.workdir = fs.resolve(workdir)
        self.directory = fs.join(self.workdir, CHECKPOINT_SUBDIR)
        self.every = int(every)
        self.read_only = read_only
        policies = [ocp.checkpoint_managers.LatestN(n=int(keep))]
        if keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=int(keep_every)))
        options = ocp.CheckpointManagerOptions(
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
            # A save killed half-way leaves a temporary directory: removed on start by the lease
            # holder only.
            cleanup_tmp_directories=clean_tmp and not read_only,
            preservation_policy=(
                None if read_only else ocp.checkpoint_managers.AnyPreservationPolicy(policies)
            ),
        )
        if read_only and not fs.isdir(self.directory):
            raise CheckpointError(
                f"No checkpoints in {self.workdir}: {self.directory} does not exist."
            )
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=_item_handlers(read_only), options=options
        )
        self._closed = False
        self._pending: int | None = None  # the step of a save that may still be in flight
        self._sums: threading.Thread | None = None  # writes the checksums of the last save
        self.resumed_config: dict | None = None  # the checkpoint's config, set by check_config

    @classmethod
    def from_config(
        cls,
        workdir: str,
        config: ml_collections.ConfigDict,
        *,
        defaults: Mapping[str, Any] | None = None,
        clean_tmp: bool = False,
    ) -> Checkpointer:
        """Opens the run's checkpoints and checks that they were written by ``config``
        (``check_config``; ``defaults`` as there), before anything is built or compiled.
        ``clean_tmp`` as in the constructor: True only for the holder of the workdir's lease."""
        c = config.checkpoint
        ckpt = cls(
            workdir, every=c.every, keep=c.keep, keep_every=c.keep_every, clean_tmp=clean_tmp
        )
        try:
            ckpt.check_config(config, defaults=defaults)
        except BaseException:
            ckpt.close()
            raise
        return ckpt

    # -- inspection

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return fs.join(self.directory, str(step))

    def read_json(self, step: int, item: str) -> Any:
        """One JSON item ("config" or "data") of checkpoint ``step``."""
        return self._manager.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
        )[item]

    def item_metadata(self, step: int) -> Any:
        """Orbax's metadata of every item of checkpoint ``step`` (shapes and dtypes, no arrays)."""
        return self._manager.item_metadata(step)

    def restore_items(self, step: int, **items: Any) -> Any:
        """Restores the named items of checkpoint ``step`` with the given Orbax restore args."""
        return self._manager.restore(step, args=ocp.args.Composite(**items))

    def reached_preemption(self, step: int) -> bool:
        """JAX's preemption sync point (multi-host): True on every host at the same step."""
        return self._manager.reached_preemption(step)

    def saved_config(self) -> tuple[int, dict] | None:
        """(step, config dict) of the newest checkpoint whose config is readable; None when there
        is no checkpoint.

        Raises:
          CheckpointError: there are checkpoints but none has a readable config.
        """
        steps = self.all_steps()
        errors = []
        for step in reversed(steps):
            try:
                cfg = self.read_json(step, _CONFIG)
                if not isinstance(cfg, dict):
                    raise ValueError(f"the stored config is a {type(cfg).__name__}, not a dict")
                return step, cfg
            except Exception as e:  # noqa: BLE001 -- any failure to read means unreadable
                logging.warning(
                    "The config of checkpoint step %d (%s) is unreadable: %s",
                    step,
                    self.step_dir(step),
                    _brief(e),
                )
                errors.append(f"step {step} ({self.step_dir(step)}): {_brief(e)}")
        if steps:
            raise CheckpointError(
                f"No readable checkpoint in {self.directory}: "
                + "; ".join(errors)
                + ". Move the directory away to start afresh."
            )
        return None

    def check_config(
        self, config: ml_collections.ConfigDict, *, defaults: Mapping[str, Any] | None = None
    ) -> None:
        """Refuses to resume a checkpoint written by a different config.

        ``defaults`` (``methods.default_values()``) are the values of fields that a checkpoint written
        before they existed lacks (``config_differences``).

        Differences in ``RESUMABLE_KEYS`` are allowed (extending a run changes schedules that
        depend on train.num_steps: a warning says so); differences in ``DYNAMICS_KEYS`` (learning
        rate and its schedule, gradient clipping, skipping non-finite steps, huber_c) are allowed
        with a warning naming them. With ``config.checkpoint.override_config`` the other differences
        are logged and the run resumes anyway. The saved config is kept in ``self.resumed_config``.

        Raises:
          CheckpointError: listing the differing fields; when no checkpoint is readable; or when
            ``config.train.num_steps`` is below the step of the newest checkpoint.
        """
        found = self.saved_config()
        if found is None:
            return
        step, saved = found
        self.resumed_config = saved
        current = config_to_dict(config)
        differing = differing_fields(saved, current, ignore_resumable=True, defaults=defaults)
        changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in differing if _dynamics(k)]
        diffs = [f"{k}: {a!r} -> {b!r}" for k, a, b in differing if not _dynamics(k)]
        if changed:
            logging.warning(
                "Resuming step %d of %s with changed training dynamics (allowed: the "
                "state's structure is the same, the trajectory from here differs): %s",
                step,
                self.directory,
                "; ".join(changed),
            )
        if config.train.num_steps < step:
            raise CheckpointError(
                f"config.train.num_steps={config.train.num_steps} is below the step of the newest "
                f"checkpoint in {self.directory} (step {step}): this run is already past it. Set "
                f"--config.train.num_steps to at least {step} (more to train on), or use another "
                "workdir."
            )
        if diffs:
            if config.checkpoint.override_config:
                logging.warning(
                    "Resuming step %d of %s with a different config "
                    "(config.checkpoint.override_config=True): %s",
                    step,
                    self.directory,
                    "; ".join(diffs),
                )
            else:
                raise CheckpointError(
                    f"{self.directory} holds a checkpoint (step {step}) of a different config; "
                    f"differing fields (saved -> now): {'; '.join(diffs)}. Use another workdir, or "
                    "set config.checkpoint.override_config=True to resume it anyway."
                )
        old_steps = _flatten(saved).get("train.num_steps")
        if old_steps is not None and old_steps != config.train.num_steps:
            depends = [
                name
                for name, yes in (
                    (
                        "the curriculum N(k), μ(k) (curriculum.total_steps = 0)",
                        not config.curriculum.total_steps and config.curriculum.kind != "constant",
                    ),
                    ("the cosine learning-rate decay", config.optim.decay == "cosine"),
                )
                if yes
            ]
            logging.warning(
                "Resuming with train.num_steps=%d (was %s)%s.",
                config.train.num_steps,
                old_steps,
                ("; this changes " + " and ".join(depends)) if depends else "",
            )

    # -- saving

    def should_save(self, step: int, final: bool = False) -> bool:
        """True every ``every`` steps and at the final step."""
        return final or step % self.every == 0

    def save(
        self,
        state: TrainState,
        *,
        step: int,
        data_state: Mapping[str, Any] | None,
        config: ml_collections.ConfigDict,
    ) -> bool:
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
          CheckpointSaveError: the previous save, or the start of this one, failed (with the
            cause, e.g. "No space left on device").
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only.")
        if step in self._manager.all_steps():
            logging.info(
                "Checkpoint step %d already exists in %s; not overwritten.", step, self.directory
            )
            return False
        bad = nonfinite_parts(state)
        if bad:
            self.wait()  # the previous, finite checkpoint is committed
            raise NonFiniteStateError(
                f"Refusing to checkpoint step {step}: non-finite values in {', '.join(bad)}. The "
                f"checkpoints in {self.directory} hold only earlier steps."
            )
        items = {
            _STATE: ocp.args.StandardSave(_student_part(state)),
            _DATA: ocp.args.JsonSave(dict(data_state or {})),
            _CONFIG: ocp.args.JsonSave(config_to_dict(config)),
        }
        if state.ema_params:
            items[_EMA] = ocp.args.StandardSave(dict(state.ema_params))
        t0 = time.time()
        self.wait()  # the previous save: committed, or its failure raised here
        names, sums = checksums(state)  # dispatched before the state can be donated to a step
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 -- the synchronous part of the save failed
            self._join_save_threads()
            raise self._save_error(step, e) from e
        self._pending = step
        self._sums = threading.Thread(
            target=self._write_checksums,
            args=(step, names, sums),
            name="checkpoint_checksums",
            daemon=True,
        )
        self._sums.start()
        logging.info(
            "Checkpoint step %d -> %s (the loop was blocked %.2fs).",
            step,
            self.step_dir(step),
            time.time() - t0,
        )
        return bool(started)

    def checksum_path(self, step: int) -> str:
        return fs.join(self.workdir, CHECKSUM_SUBDIR, f"{step}.json")

    def _write_checksums(self, step: int, names: list[str], sums: list) -> None:
        """Fetches the checksums of checkpoint ``step`` (off the training thread) and writes them
        to ``checkpoint_checksums/<step>.json`` (atomically); removes the files of steps that are
        gone. A failure is logged: the checkpoint then restores unverified."""
        try:
            values = [int(v) for v in jax.device_get(sums)]
            if jax.process_index() != 0:
                return
            path = self.checksum_path(step)
            fs.makedirs(fs.join(self.workdir, CHECKSUM_SUBDIR))
            fs.write_text(
                path,
                json.dumps(
                    {"step": step, "algorithm": "wsum32", "arrays": dict(zip(names, values))}
                ),
            )
        except Exception as e:  # noqa: BLE001
            logging.warning(
                "Could not write the checksums of checkpoint step %d: %s", step, _brief(e)
            )

    def _prune_checksums(self) -> None:
        folder = fs.join(self.workdir, CHECKSUM_SUBDIR)
        if jax.process_index() != 0:
            return
        keep = {f"{s}.json" for s in self._manager.all_steps()}
        for name in fs.listdir(folder):
            if name.endswith(".json") and name not in keep:
                try:
                    fs.remove(fs.join(folder, name))
                except OSError:
                    pass

    def _save_error(self, step: int, e: BaseException) -> CheckpointSaveError:
        try:
            done = [s for s in self._manager.all_steps() if s != step]
        except Exception:  # noqa: BLE001
            done = []
        newest = (
            f"the newest complete checkpoint is step {max(done)}"
            if done
            else "no checkpoint is complete"
        )
        cause = e.strerror if isinstance(e, OSError) and e.strerror else None
        where = f": {e.filename}" if isinstance(e, OSError) and e.filename else ""
        text = f"{cause}{where}" if cause else _brief(e)
        return CheckpointSaveError(
            f"Saving checkpoint step {step} into {self.directory} failed: "
            f"{text}. Stopping the run; {newest}."
        )

    def check_save(self) -> None:
        """Raises CheckpointSaveError at once when the asynchronous save in flight has failed;
        returns immediately otherwise (cheap: called after every train step)."""
        if self._pending is None:
            return
        if not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed.

        Raises:
          CheckpointSaveError: the save failed (naming its step and cause).
        """
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._join_save_threads()
            raise self._save_error(step if step is not None else -1, e) from e
        if self._sums is not None:
            self._sums.join()
            self._sums = None
            self._prune_checksums()

    def _join_save_threads(self, timeout: float = 60.0) -> None:
        """Waits for Orbax's worker threads of a failed save (the parts that did not fail run on):
        left running they die at interpreter exit with a cascade of tracebacks."""
        for t in threading.enumerate():
            if (
                t is not threading.current_thread()
                and not t.daemon
                and t.is_alive()
                and type(t).__module__.startswith("orbax")
            ):
                try:  # Orbax's threads re-raise their own failure on join: another part of the
                    t.join(timeout)  # same failed save, whose first error is being reported
                except Exception as e:  # noqa: BLE001
                    logging.warning(
                        "A thread of the failed save of %s: %s", self.directory, _brief(e)
                    )

    def close(self) -> None:
        """Waits for pending saves and releases the manager (idempotent; the manager is released
        also when the pending save failed, whose error is then raised)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as e:  # noqa: BLE001 -- the save's error was raised by wait()
                logging.warning(
                    "Closing the checkpoint manager of %s: %s", self.directory, _brief(e)
                )
            self._join_save_threads()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring

    def _restore_step(self, step: int, state: TrainState) -> tuple[TrainState, dict]:
        student = _student_part(state)
        items = {
            _STATE: ocp.args.StandardRestore(abstract_like(student)),
            _DATA: ocp.args.JsonRestore(),
        }
        if state.ema_params:
            items[_EMA] = ocp.args.StandardRestore(abstract_like(dict(state.ema_params)))
        got = self._manager.restore(step, args=ocp.args.Composite(**items))
        # Orbax returns containers of the target's types; unflattening with the live treedef also
        # restores optax's NamedTuples and makes the jitted step see exactly the same structure.
        restored = jax.tree.unflatten(jax.tree.structure(student), jax.tree.leaves(got[_STATE]))
        ema = dict(state.ema_params)
        if state.ema_params:
            ema = jax.tree.unflatten(jax.tree.structure(ema), jax.tree.leaves(got[_EMA]))
        restored = restored.replace(
            ema_params=ema, teacher_params=state.teacher_params, distance=state.distance
        )
        self._verify(step, restored)
        saved_step = int(jax.device_get(restored.step))
        if saved_step != step:
            raise CheckpointError(
                f"Checkpoint directory {self.step_dir(step)} holds a state of step {saved_step}."
            )
        data_state = got[_DATA]
        if not isinstance(data_state, dict):
            raise CheckpointError(
                f"The data iterator state of {self.step_dir(step)} is not a dict."
            )
        if "step" in data_state and int(data_state["step"]) != step:
            logging.warning(
                "Checkpoint step %d stored the data iterator at step %s; using step %d.",
                step,
                data_state["step"],
                step,
            )
            data_state = {**data_state, "step": step}
        return restored, data_state

    def _verify(self, step: int, restored: TrainState) -> None:
        """Compares the restored arrays with the checksums stored at save time (a checkpoint
        written before checksums existed, or whose checksum file was never written, is only checked
        for finiteness).

        Raises:
          CheckpointError: naming the first array whose checksum differs, or the parts holding
            NaN/Inf (a checkpoint is never saved with them).
        """
        path = self.checksum_path(step)
        try:
            stored = json.loads(fs.read_text(path))["arrays"]
        except FileNotFoundError:
            stored = None
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"The checksum file {path} is unreadable: {_brief(e)}") from e
        if stored is not None:
            names, sums = checksums(restored)
            for name, value in zip(names, jax.device_get(sums)):
                if name in stored and int(stored[name]) != int(value):
                    raise CheckpointError(
                        f"Checkpoint step {step}: the array {name} does not match "
                        f"its checksum ({path}): the files are damaged."
                    )
            missing = sorted(set(stored) - set(names))
            if missing:
                logging.warning(
                    "Checkpoint step %d: %d saved array(s) not restored: %s",
                    step,
                    len(missing),
                    ", ".join(missing[:5]),
                )
        else:
            logging.info(
                "Checkpoint step %d has no checksums (%s); checked for finiteness only.", step, path
            )
        bad = nonfinite_parts(restored)
        if bad:
            raise CheckpointError(
                f"Checkpoint step {step} holds NaN or Inf in {', '.join(bad)}: the "
                "files are damaged (a non-finite state is never saved)."
            )

    def restore(self, state: TrainState) -> tuple[TrainState, dict] | None:
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
                logging.warning(
                    "Checkpoint step %d in %s is unreadable (%s); trying the previous one.",
                    step,
                    self.step_dir(step),
                    _brief(e),
                )
                bad.append(step)
                errors.append(f"step {step} ({self.step_dir(step)}): {_brief(e)}")
                continue
            if bad and not self.read_only:
                self._quarantine(bad)
            logging.info("Resumed from %s (step %d).", self.step_dir(step), step)
            return restored, data_state
        raise CheckpointError(
            f"None of the checkpoints in {self.directory} can be restored: "
            + "; ".join(errors)
            + ". If the network or optimizer changed, use another workdir; if the files are damaged, "
            "move the directory away to start afresh."
        )

    def _quarantine(self, steps: Sequence[int]) -> None:
        dest_root = fs.join(self.workdir, UNREADABLE_SUBDIR)
        if jax.process_index() == 0:
            fs.makedirs(dest_root)
            for step in steps:
                dest = fs.join(dest_root, f"{step}-{int(time.time())}")
                fs.move(self.step_dir(step), dest)
                if fs.exists(self.checksum_path(step)):
                    fs.move(self.checksum_path(step), fs.join(dest, "checksums.json"))
                logging.warning(
                    "Moved the unreadable checkpoint %s to %s.", self.step_dir(step), dest
                )
        ocp.multihost.sync_global_processes("consistency_jax_checkpoint_quarantine")
        self._manager.reload()
