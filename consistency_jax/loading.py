"""Loading trained parameters, read-only: a run's eval EMA, a CD teacher, every array of a checkpoint.

Everything here opens a run's ``checkpoints/`` through a read-only ``checkpoint.Checkpointer``: nothing
is ever written into the directory read. It needs no training code (no losses, no methods' maths), so a
sampling or evaluation command can use it alone. The teacher of consistency distillation (CM
Algorithm 2) is another run's EDM checkpoint, wrapped with that run's own preconditioning (EDM Eq. 7).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from consistency_jax import fs, networks
from consistency_jax import parameterization as param_lib
from consistency_jax.checkpoint import (
    CHECKPOINT_SUBDIR,
    EMA_ITEM,
    READ_FAILURES,
    STATE_ITEM,
    CheckpointDamagedError,
    Checkpointer,
    CheckpointError,
    brief,
    config_from_dict,
)
from consistency_jax.sharding import replicated
from consistency_jax.train_state import ema_key
from consistency_jax.trees import abstract_tree

PyTree = Any

# Method families whose runs can teach consistency distillation (``methods.MethodSpec.family``).
TEACHER_FAMILIES = ("denoiser",)


ShardingSpec = None | jax.sharding.Sharding | Callable[[PyTree], PyTree]


def _with_shardings(abstract: PyTree, sharding: ShardingSpec) -> PyTree:
    if sharding is None:
        sharding = replicated(jax.sharding.Mesh(np.array(jax.devices()), ("devices",)))
    return abstract_tree(abstract, sharding)


def load_eval_params(
    workdir: str,
    ema_rate: float | None = None,
    *,
    step: int | None = None,
    sharding: ShardingSpec = None,
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
    return _newest_readable(
        workdir, step, lambda ckpt, s: _read_eval_params(ckpt, s, ema_rate, sharding)
    )


def load_model_params(
    workdir: str,
    ema_rate: float | None = None,
    *,
    step: int | None = None,
    sharding: ShardingSpec = None,
) -> tuple[ml_collections.ConfigDict, PyTree, int]:
    """``load_eval_params``, then the parameters of the run's model as its method's consistency
    function reads them: for a method whose model includes its frozen teacher
    (``MethodSpec.model_params``, TCM's stage-1 model below t′) the teacher is read too, from where
    the run's config names it (read-only, like the run)."""
    from consistency_jax import methods  # the registry says which models include their teacher

    config, params, step = load_eval_params(workdir, ema_rate, step=step, sharding=sharding)
    spec = methods.get(config.method)
    if spec.model_params is None:
        return config, params, step
    teacher = None
    if spec.teacher is not None:
        teacher = load_teacher_source(config, spec.teacher, sharding=sharding)[0]
    return config, spec.model_params(config, params, teacher), step


def _saved_config(workdir: str) -> tuple[int, dict] | None:
    """(step, config as JSON) of a run's newest saved config, read-only (no array is read), or None
    when it has saved none."""
    ckpt = Checkpointer(workdir, every=1, keep=1, read_only=True)
    try:
        return ckpt.saved_config()
    finally:
        ckpt.close()


def _field(config: ml_collections.ConfigDict, path: str) -> Any:
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def teacher_source_config(config: ml_collections.ConfigDict, source) -> ml_collections.ConfigDict:
    """The config of the run a method's ``TeacherSource`` names (JSON only: no array is read),
    checked to hold a checkpoint of a method the source accepts.

    Raises:
      ValueError: the field is empty.
      CheckpointError: no checkpoint there, or a run of a method the source does not accept.
    """
    from consistency_jax import methods

    field = f"config.{source.workdir}"
    workdir = _field(config, source.workdir)
    if not workdir:
        raise ValueError(
            f"method={config.method!r} reads a frozen model from {field}: set it to that run."
        )
    workdir = fs.resolve(workdir, field)
    found = None  # JSON only: the arrays are verified when loaded
    if fs.isdir(fs.join(workdir, CHECKPOINT_SUBDIR)):
        found = _saved_config(workdir)
    if found is None:
        raise CheckpointError(f"{field}={workdir!r} holds no checkpoint.")
    theirs = config_from_dict(found[1])
    method = theirs.get("method")
    why = (
        f"method={method!r} is not a method of this library"
        if method not in methods.registered()
        else source.accepts(methods.get(method))
    )
    if why:
        raise CheckpointError(
            f"{field}={workdir!r} is a method={method!r} run, which method={config.method!r} "
            f"cannot read as its frozen model: {why}"
        )
    return theirs


def load_teacher_source(
    config: ml_collections.ConfigDict, source, *, sharding: ShardingSpec = None
) -> tuple[PyTree, int]:
    """(the frozen parameters a method's ``TeacherSource`` names, the step read): the source run's
    eval EMA, read-only, placed as ``sharding`` says (see ``load_eval_params``)."""
    teacher_source_config(config, source)
    workdir = fs.resolve(_field(config, source.workdir), f"config.{source.workdir}")
    theirs, params, step = load_eval_params(
        workdir, _field(config, source.ema_rate) or None, sharding=sharding
    )
    logging.info(
        "Frozen model: method=%s run %s, step %d (%.3fM parameters).",
        theirs.method,
        workdir,
        step,
        sum(x.size for x in jax.tree.leaves(params)) / 1e6,
    )
    return params, step


def eval_params_metadata(
    workdir: str, ema_rate: float | None = None
) -> tuple[ml_collections.ConfigDict, int, PyTree]:
    """What ``load_eval_params`` would read: (the run's config, the step, the parameters as a tree
    of ``jax.ShapeDtypeStruct``) of the newest checkpoint whose evaluation parameters are intact.

    The parameters are read once (to host memory) and verified against their checksums, so that the
    step named is one that ``load_eval_params`` can use: a damaged newer step is set aside here,
    with a warning, not only when the command that asked loads it.

    Raises:
      CheckpointError: as ``load_eval_params``.
    """

    def read(ckpt, s):
        config = config_from_dict(ckpt.read_config(s))
        item, key, abstract = _eval_item(ckpt, s, ema_rate)
        ckpt.read_arrays(s, {item: {key: abstract}}, partial=True)
        return config, s, abstract

    return _newest_readable(workdir, None, read)


def _newest_readable(workdir: str, step: int | None, read: Callable[[Checkpointer, int], Any]):
    """``read(checkpointer, step)`` of the given step, else of the newest step it succeeds on.

    Every read verifies what it reads (``Checkpointer.read_arrays``). Without ``step``, a damaged or
    unreadable step is set aside with a warning naming it and the previous one is tried; a step
    asked for by number is never replaced: its damage is a CheckpointDamagedError naming it and the
    intact alternatives. A CheckpointError that is not damage (no EMA of the rate asked for, not an
    EDM run) is final.
    """
    workdir = fs.resolve(workdir)
    ckpt = Checkpointer(workdir, every=1, keep=1, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"No checkpoint in {ckpt.directory}.")
        if step is not None and step not in steps:
            raise CheckpointError(
                f"No checkpoint of step {step} in {ckpt.directory}; saved steps: {steps}."
            )
        if step is not None:
            try:
                return read(ckpt, step)
            except CheckpointDamagedError as e:
                others = [s for s in steps if s != step]
                raise CheckpointDamagedError(
                    f"{e} Refusing to use the step asked for ({step}); the other saved steps are "
                    f"{others or 'none'} (leave the step out to use the newest intact one)."
                ) from e
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 -- unreadable
                READ_FAILURES.note()
                raise CheckpointError(
                    f"Checkpoint step {step} in {ckpt.step_dir(step)} is unreadable: {brief(e)}."
                ) from e
        errors, set_aside = [], []
        for s in reversed(steps):
            try:
                out = read(ckpt, s)
            except CheckpointDamagedError as e:
                why = str(e)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 -- unreadable: try the previous step
                READ_FAILURES.note()
                why = f"unreadable: {brief(e)}"
            else:
                if set_aside:
                    logging.warning(
                        "Using checkpoint step %d of %s; set aside (not used, left in place): %s.",
                        s,
                        ckpt.directory,
                        ", ".join(set_aside),
                    )
                return out
            logging.warning(
                "Checkpoint step %d in %s is set aside: %s Trying the previous one.",
                s,
                ckpt.step_dir(s),
                why,
            )
            set_aside.append(f"step {s}")
            errors.append(f"step {s} ({ckpt.step_dir(s)}): {why}")
        raise CheckpointError(f"No intact checkpoint in {ckpt.directory}: " + "; ".join(errors))
    finally:
        ckpt.close()


def _eval_item(ckpt: Checkpointer, step: int, ema_rate: float | None) -> tuple[str, str, PyTree]:
    """(item, key, abstract parameters) of the eval parameters of checkpoint ``step``: the EMA of
    ``ema_rate`` (None: the slowest), or θ ("state", "params") when the run saved no EMA."""
    emas = ckpt.array_metadata(step, (EMA_ITEM,)).get(EMA_ITEM)  # the state's only if no EMA
    if emas:
        saved = {k: float(k) for k in emas}
        if ema_rate is None:
            key = max(saved, key=float)
        else:
            key = ema_key(ema_rate)
            if key not in saved:
                raise CheckpointError(
                    f"{ckpt.step_dir(step)} has no EMA of rate {ema_rate}; "
                    f"saved EMA rates: {sorted(saved.values())}."
                )
        return EMA_ITEM, key, emas[key]
    if ema_rate is not None:
        raise CheckpointError(f"{ckpt.step_dir(step)} has no eval EMAs (asked for {ema_rate}).")
    return STATE_ITEM, "params", ckpt.array_metadata(step, (STATE_ITEM,))[STATE_ITEM]["params"]


def _read_eval_params(
    ckpt: Checkpointer, step: int, ema_rate: float | None, sharding: ShardingSpec
) -> tuple[ml_collections.ConfigDict, PyTree, int]:
    config = config_from_dict(ckpt.read_config(step))
    item, key, abstract = _eval_item(ckpt, step, ema_rate)
    # Read only these parameters (verified against their checksums): the other EMAs and the
    # optimizer state are left out of the target (partial restore).
    target = {key: _with_shardings(abstract, sharding)}
    got = ckpt.read_arrays(step, {item: target}, partial=True)
    logging.info(
        "Read %s of %s (checksums verified).",
        f"the EMA {key}" if item == EMA_ITEM else "θ (no eval EMA saved)",
        ckpt.step_dir(step),
    )
    return config, got[item][key], step


def teacher_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of a CD teacher run, checked to be an EDM run with a readable checkpoint.

    Reads only the JSON config (no arrays), so ``build.validate`` can call it before
    anything is built.

    Args:
      workdir: the teacher run's directory (never written to).

    Returns:
      The teacher run's config.

    Raises:
      CheckpointError: no checkpoint in ``workdir``, none readable, or not a run of a denoiser
        method (method='edm').
    """
    workdir = fs.resolve(workdir, "config.teacher.workdir") if workdir else workdir
    if not workdir or not fs.isdir(fs.join(workdir, CHECKPOINT_SUBDIR)):
        raise CheckpointError(
            f"config.teacher.workdir={workdir!r} holds no checkpoints (no {CHECKPOINT_SUBDIR}/ "
            "directory); train an EDM teacher there first (method='edm')."
        )
    found = _saved_config(workdir)  # JSON only: the arrays are verified by load_teacher
    if found is None:
        raise CheckpointError(
            f"config.teacher.workdir={workdir!r} holds no checkpoint (the "
            f"{CHECKPOINT_SUBDIR}/ directory is empty); train an EDM teacher "
            "first."
        )
    config = config_from_dict(found[1])
    _check_teacher_method(config, workdir)
    return config


def _check_teacher_method(config: ml_collections.ConfigDict, where: str) -> None:
    from consistency_jax import methods  # the registry says which methods train denoisers

    method = config.get("method")
    teachers = tuple(n for n, s in methods.registered().items() if s.family in TEACHER_FAMILIES)
    if method not in teachers:
        raise CheckpointError(
            f"The teacher {where} is a method={method!r} run; consistency distillation needs an EDM "
            f"teacher (a run of a denoiser method: {teachers})."
        )


def load_teacher(
    workdir: str, ema_rate: float | None = None, *, sharding: ShardingSpec = None
) -> tuple[param_lib.TeacherDenoise, PyTree]:
    """The CD teacher D_φ (CM §3, Algorithm 2) from an EDM run's workdir, read-only.

    Reads the teacher run's saved config, builds its network (``networks.from_config`` of its
    ``config.model``), restores its eval EMA (the slowest by default) and wraps it with the
    teacher's own EDM preconditioning (its ``config.sigmas``, EDM Eq. 7) as
    ``parameterization.network_teacher``.

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
    # The step read may differ from the one checked above.
    _check_teacher_method(config, f"{workdir} (step {step})")
    module = networks.from_config(config.model)
    sigmas = param_lib.SigmaConfig(**config.sigmas.to_dict())
    logging.info(
        "Teacher: %s network of %s step %d (%.3fM parameters).",
        config.model.name,
        workdir,
        step,
        sum(x.size for x in jax.tree.leaves(params)) / 1e6,
    )
    return param_lib.network_teacher(networks.make_apply_fn(module), sigmas), params


def read_arrays(workdir: str, step: int | None = None) -> dict[str, np.ndarray]:
    """Every array of a checkpoint as host NumPy arrays, keyed "state/params/Dense_0/kernel",
    "ema/0.999/..." (for inspection and tests; read-only; verified against the checksums).

    Args:
      workdir: the run's directory.
      step: which checkpoint; None: the newest intact one.

    Returns:
      A flat dict name -> array.
    """

    def read(ckpt, s):
        got = ckpt.read_arrays(s, ckpt.array_metadata(s), partial=False)
        out = {}
        for name, tree in got.items():
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                key = "/".join(
                    str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path
                )
                out[f"{name}/{key}"] = np.asarray(leaf)
        return out

    return _newest_readable(workdir, step, read)
