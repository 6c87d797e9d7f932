"""The manager of one run's checkpoints: asynchronous Orbax saves, exact resume, read-only readers.

Saves are committed atomically (a step directory appears only once it is complete). A run resumes
from the newest readable checkpoint of its workdir; a checkpoint that cannot be read, or whose arrays
do not match the checksums stored at save time (``integrity``), is reported by step and directory,
moved to ``checkpoints_unreadable/`` and the previous one used. A failed asynchronous save is raised
at once (``check_save``, polled after every step) as ``CheckpointSaveError`` with its cause.
Temporary directories of interrupted saves are removed only by the holder of the workdir's lease
(``workdir_lock``).

Readers (``loading``) open a manager read-only and use its public read API: ``read_config``,
``array_metadata`` and ``read_arrays`` (which verifies the checksums of what it read). How a failed
save is noticed, reported once and its threads let go: ``checkpoint.failures``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from consistency_jax import fs
from consistency_jax.checkpoint import failures
from consistency_jax.checkpoint.errors import (
    CheckpointError,
    CheckpointSaveError,
    NonFiniteStateError,
    brief,
)
from consistency_jax.checkpoint.integrity import (
    checksums,
    nonfinite_parts,
    read_clean_mark,
    verify,
    write_checksums,
)
from consistency_jax.checkpoint.layout import (
    ARRAY_ITEMS,
    CHECKPOINT_SUBDIR,
    CHECKSUM_SUBDIR,
    CONFIG_ITEM,
    DATA_ITEM,
    EMA_ITEM,
    STATE_ITEM,
    UNHEALTHY_SUBDIR,
    UNREADABLE_SUBDIR,
    item_handlers,
    metadata_tree,
    pytree_restore,
    saved_arrays,
    student_part,
)
from consistency_jax.checkpoint.stored_config import (
    config_to_dict,
    differing_fields,
    is_dynamics,
)
from consistency_jax.train_state import TrainState
from consistency_jax.trees import abstract_tree, flatten_mapping

PyTree = Any


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
        self._protected: int | None = None  # the newest healthy step: never rotated out
        policies = [ocp.checkpoint_managers.LatestN(n=int(keep)), _KeepProtected(self)]
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
            self.directory, item_handlers=item_handlers(read_only), options=options
        )
        self._closed = False
        self._failed = False  # a save failed: nothing more is written or waited for
        self._pending: int | None = None  # the step of a save that may still be in flight
        self._sums: threading.Thread | None = None  # writes the checksums of the last save
        self.resumed_config: dict | None = None  # the checkpoint's config, set by check_config
        if not read_only:
            self._protected = self._newest_healthy_on_disk()

    @classmethod
    def from_config(
        cls,
        workdir: str,
        config: ml_collections.ConfigDict,
        *,
        defaults: Mapping[str, Any] | None = None,
        pinned: Sequence[str] = (),
        clean_tmp: bool = False,
    ) -> Checkpointer:
        """Opens the run's checkpoints and checks that they were written by ``config``
        (``check_config``; ``defaults`` and ``pinned`` as there), before anything is built or
        compiled. ``clean_tmp`` as in the constructor: True only for the holder of the workdir's
        lease."""
        c = config.checkpoint
        ckpt = cls(
            workdir, every=c.every, keep=c.keep, keep_every=c.keep_every, clean_tmp=clean_tmp
        )
        try:
            ckpt.check_config(config, defaults=defaults, pinned=pinned)
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

    def read_config(self, step: int) -> dict:
        """The config stored in checkpoint ``step`` (a ``config_to_dict`` dict).

        Raises:
          CheckpointError: it is not a JSON object (other read failures propagate).
        """
        cfg = self.read_json(step, CONFIG_ITEM)
        if not isinstance(cfg, dict):
            raise CheckpointError(
                f"The config stored in {self.step_dir(step)} is a {type(cfg).__name__}, not a dict."
            )
        return cfg

    def array_metadata(self, step: int, items: Sequence[str] = ARRAY_ITEMS) -> dict[str, PyTree]:
        """{item: tree of ShapeDtypeStructs (no sharding)} of the array items ``items`` ("state",
        "ema") of checkpoint ``step`` that it holds, from Orbax's metadata: nothing is read but the
        metadata, and only of the items asked for (the EMA item's alone reads ~4x faster than every
        item's: the optimizer state's arrays are left out)."""
        unknown = sorted(set(items) - set(ARRAY_ITEMS))
        if unknown:
            raise ValueError(
                f"Not array items of a checkpoint: {unknown} (those are {ARRAY_ITEMS})."
            )
        out = {}
        for name in items:
            path = fs.join(self.step_dir(step), name)
            if not fs.isdir(path):
                continue
            md = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
            if md is not None:
                out[name] = abstract_tree(metadata_tree(md), None)
        return out

    def read_arrays(
        self, step: int, targets: Mapping[str, PyTree], *, partial: bool = True
    ) -> dict[str, PyTree]:
        """Reads arrays of checkpoint ``step`` and verifies them against the checksums stored at save
        time (``integrity.verify``).

        Args:
          step: the checkpoint.
          targets: {item ("state" or "ema"): abstract tree}: ShapeDtypeStructs with a sharding
            (device arrays) or without (host NumPy arrays); a part of the item's tree (one EMA, θ
            alone) with ``partial``.
          partial: the targets may leave out arrays of the items.

        Returns:
          {item: tree of arrays} in the structure of ``targets``.

        Raises:
          CheckpointDamagedError: an array read does not match its checksum, or holds NaN/Inf.
        """
        unknown = sorted(set(targets) - set(ARRAY_ITEMS))
        if unknown:
            raise ValueError(f"Not array items of a checkpoint: {unknown}; use {ARRAY_ITEMS}.")
        got = self.restore_items(
            step, **{item: pytree_restore(t, partial=partial) for item, t in targets.items()}
        )
        out = {item: got[item] for item in targets}
        verify(step, out, self.checksum_path(step), partial=partial)
        return out

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
                return step, self.read_config(step)
            except Exception as e:  # noqa: BLE001 -- any failure to read means unreadable
                failures.READ_FAILURES.note()
                logging.warning(
                    "The config of checkpoint step %d (%s) is unreadable: %s",
                    step,
                    self.step_dir(step),
                    brief(e),
                )
                errors.append(f"step {step} ({self.step_dir(step)}): {brief(e)}")
        if steps:
            raise CheckpointError(
                f"No readable checkpoint in {self.directory}: "
                + "; ".join(errors)
                + ". Move the directory away to start afresh."
            )
        return None

    def check_config(
        self,
        config: ml_collections.ConfigDict,
        *,
        defaults: Mapping[str, Any] | None = None,
        pinned: Sequence[str] = (),
    ) -> None:
        """Refuses to resume a checkpoint written by a different config.

        ``defaults`` (``methods.default_values()``) are the values of fields that a checkpoint written
        before they existed lacks (``config_differences``). ``pinned``: resumable fields that this
        run reads on every start and that must therefore not change (e.g. TCM's
        ``init.workdir``, its frozen stage-1 model).

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
        differing = differing_fields(
            saved, current, ignore_resumable=True, defaults=defaults, pinned=pinned
        )
        changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in differing if is_dynamics(k)]
        diffs = [f"{k}: {a!r} -> {b!r}" for k, a, b in differing if not is_dynamics(k)]
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
        old_steps = flatten_mapping(saved).get("train.num_steps")
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
        clean: bool = True,
    ) -> bool:
        """Starts an asynchronous save of ``state`` as checkpoint ``step``.

        The teacher is not saved. A step that already exists is not overwritten (Orbax would skip
        it silently; this logs it).

        Args:
          state: the train state after ``step`` optimizer steps.
          step: the step number (``int(state.step)``; passed to avoid a device sync).
          data_state: the data iterator's ``get_state()`` after ``step`` batches.
          config: the run's config.
          clean: the state passed the health checks with no step skipped since the previous save
            (``periodic.HealthCheck``): it becomes the newest healthy checkpoint, which the keep
            policy never removes; a checkpoint saved while steps were skipped is kept too, but
            does not replace it.

        Returns:
          True when a save was started.

        Raises:
          NonFiniteStateError: the state holds NaN/Inf (nothing is written).
          CheckpointSaveError: the previous save, or the start of this one, failed (with the
            cause, e.g. "No space left on device").
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only.")
        if self._failed:
            raise CheckpointSaveError(
                f"A save into {self.directory} failed: not saving step {step}."
            )
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
            STATE_ITEM: ocp.args.StandardSave(student_part(state)),
            DATA_ITEM: ocp.args.JsonSave(dict(data_state or {})),
            CONFIG_ITEM: ocp.args.JsonSave(config_to_dict(config)),
        }
        if state.ema_params:
            items[EMA_ITEM] = ocp.args.StandardSave(dict(state.ema_params))
        t0 = time.time()
        self.wait()  # the previous save: committed, or its failure raised here
        names, sums = checksums(state)  # dispatched before the state can be donated to a step
        failures.SAVE_FAILURES.clear()
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 -- the synchronous part of the save failed
            self._failed = True
            self._join_save_threads()
            raise self._save_error(step, e) from e
        self._pending = step
        if clean:
            self._protected = step
        self._sums = threading.Thread(
            target=self._write_checksums,
            args=(step, names, sums, clean),
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

    def _write_checksums(self, step: int, names: list[str], sums: list, clean: bool) -> None:
        """Fetches the checksums of checkpoint ``step`` (off the training thread) and writes them
        to ``checkpoint_checksums/<step>.json`` (atomically); removes the files of steps that are
        gone. A failure is logged: the checkpoint then restores unverified."""
        try:
            values = [int(v) for v in jax.device_get(sums)]
            if jax.process_index() != 0:
                return
            fs.makedirs(fs.join(self.workdir, CHECKSUM_SUBDIR))
            write_checksums(self.checksum_path(step), step, names, values, clean=clean)
        except Exception as e:  # noqa: BLE001
            logging.warning(
                "Could not write the checksums of checkpoint step %d: %s", step, brief(e)
            )

    def _newest_healthy_on_disk(self) -> int | None:
        """The newest step whose checksum file does not say it was saved while steps were skipped
        (a checkpoint without a checksum file, or written before the mark existed, counts as
        healthy)."""
        for step in reversed(self.all_steps()):
            if read_clean_mark(self.checksum_path(step)):
                return step
        return None

    @property
    def newest_healthy_step(self) -> int | None:
        """The newest checkpoint saved from a healthy state with no step skipped since the one
        before: the keep policy never removes it."""
        return self._protected

    def set_aside_unhealthy(self) -> tuple[int | None, list[int]]:
        """Moves the checkpoints newer than the newest healthy one (saved while steps were skipped)
        to ``<workdir>/checkpoints_unhealthy/`` so that a resumed run starts from the healthy one
        (nothing is deleted). Call after ``wait``.

        Returns:
          (the newest healthy step or None, the steps moved).
        """
        newest = self._protected
        moved = [s for s in self.all_steps() if newest is None or s > newest]
        if moved and not self.read_only:
            self._move_aside(moved, UNHEALTHY_SUBDIR, "saved while steps were skipped")
        return newest, moved

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
        text = f"{cause}{where}" if cause else brief(e, 200)
        if not cause:  # TensorStore's errors put the cause after kilobytes of spec: name it first
            known = failures.known_cause(e)
            text = f"{known} ({text})" if known else text
        return CheckpointSaveError(
            f"Saving checkpoint step {step} into {self.directory} failed: "
            f"{text}. Stopping the run; {newest}."
        )

    def check_save(self) -> None:
        """Raises CheckpointSaveError at once when the asynchronous save in flight has failed (a
        thread of it failed, even while others still run); returns immediately otherwise (cheap:
        called after every train step)."""
        if self._pending is None:
            return
        self._raise_if_failed()
        if not self._manager.is_saving_in_progress():
            self.wait()

    def _raise_if_failed(self) -> None:
        failure = failures.SAVE_FAILURES.first
        if failure is None:
            try:
                self._manager.check_for_errors()
            except Exception as e:  # noqa: BLE001
                failure = e
        if failure is not None:
            step, self._pending, self._failed = self._pending, None, True
            self._join_save_threads()
            raise self._save_error(step if step is not None else -1, failure) from failure

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed.

        Raises:
          CheckpointSaveError: the save failed (naming its step and cause), raised as soon as one
            of its threads fails.
        """
        if self._pending is not None:
            while self._manager.is_saving_in_progress():
                self._raise_if_failed()
                time.sleep(0.02)
            self._raise_if_failed()
        step, self._pending = self._pending, None
        if self._failed:
            return  # the failure was raised; nothing of that save will complete
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._failed = True
            self._join_save_threads()
            raise self._save_error(step if step is not None else -1, e) from e
        if self._sums is not None:
            self._sums.join()
            self._sums = None
            self._prune_checksums()

    def _join_save_threads(self) -> None:
        left = failures.join_save_threads()
        if left:
            logging.warning(
                "%d thread(s) of the failed save of %s are still waiting (%s); not waiting for "
                "them.",
                len(left),
                self.directory,
                ", ".join(left),
            )

    def close(self) -> None:
        """Waits for pending saves and releases the manager (idempotent; the manager is released
        also when the pending save failed, whose error is then raised; after a failed save nothing
        waits for its threads)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if not self._failed:
                try:
                    self._manager.close()
                except Exception as e:  # noqa: BLE001 -- the save's error was raised by wait()
                    logging.warning(
                        "Closing the checkpoint manager of %s: %s", self.directory, brief(e)
                    )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring

    def _restore_step(self, step: int, state: TrainState) -> tuple[TrainState, dict]:
        student = student_part(state)
        items = {
            STATE_ITEM: ocp.args.StandardRestore(abstract_tree(student)),
            DATA_ITEM: ocp.args.JsonRestore(),
        }
        if state.ema_params:
            items[EMA_ITEM] = ocp.args.StandardRestore(abstract_tree(dict(state.ema_params)))
        got = self._manager.restore(step, args=ocp.args.Composite(**items))
        # Orbax returns containers of the target's types; unflattening with the live treedef also
        # restores optax's NamedTuples and makes the jitted step see exactly the same structure.
        restored = jax.tree.unflatten(jax.tree.structure(student), jax.tree.leaves(got[STATE_ITEM]))
        ema = dict(state.ema_params)
        if state.ema_params:
            ema = jax.tree.unflatten(jax.tree.structure(ema), jax.tree.leaves(got[EMA_ITEM]))
        restored = restored.replace(
            ema_params=ema, teacher_params=state.teacher_params, distance=state.distance
        )
        self._verify(step, restored)
        saved_step = int(jax.device_get(restored.step))
        if saved_step != step:
            raise CheckpointError(
                f"Checkpoint directory {self.step_dir(step)} holds a state of step {saved_step}."
            )
        data_state = got[DATA_ITEM]
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
        """Compares the restored arrays with the checksums stored at save time and checks that they
        are finite (``integrity.verify``).

        Raises:
          CheckpointDamagedError: naming the first array whose checksum differs, or the parts
            holding NaN/Inf.
        """
        groups = {
            "params": restored.params,
            "target_params": restored.target_params,
            "opt_state": restored.opt_state,
        }
        groups.update({f"ema_params[{k!r}]": v for k, v in restored.ema_params.items()})
        verify(step, saved_arrays(restored), self.checksum_path(step), groups=groups)

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
                failures.READ_FAILURES.note()
                logging.warning(
                    "Checkpoint step %d in %s is unreadable (%s); trying the previous one.",
                    step,
                    self.step_dir(step),
                    brief(e),
                )
                bad.append(step)
                errors.append(f"step {step} ({self.step_dir(step)}): {brief(e)}")
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
        self._move_aside(steps, UNREADABLE_SUBDIR, "unreadable")

    def _move_aside(self, steps: Sequence[int], subdir: str, why: str) -> None:
        dest_root = fs.join(self.workdir, subdir)
        if jax.process_index() == 0:
            fs.makedirs(dest_root)
            for step in steps:
                dest = fs.join(dest_root, f"{step}-{int(time.time())}")
                fs.move(self.step_dir(step), dest)
                if fs.exists(self.checksum_path(step)):
                    fs.move(self.checksum_path(step), fs.join(dest, "checksums.json"))
                logging.warning(
                    "Moved the checkpoint %s (%s) to %s.", self.step_dir(step), why, dest
                )
        ocp.multihost.sync_global_processes(f"consistency_jax_checkpoint_{subdir}")
        self._manager.reload()


class _KeepProtected(ocp.checkpoint_managers.PreservationPolicy):
    """Orbax preservation policy: keeps the checkpointer's newest healthy step."""

    def __init__(self, owner: Checkpointer):
        self._owner = owner

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [c.step == self._owner._protected for c in checkpoints]
