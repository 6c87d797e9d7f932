"""``train_and_evaluate(config, workdir)``: the training loop around the pure train step.

The config is validated (``build.validate``) before anything is compiled or written; the run takes
the workdir's lease (``workdir_lock``: one writer per workdir) before it writes anything; the run is
built by ``build`` (the train state born sharded on the mesh), evaluated by ``evaluators`` and
checkpointed by ``checkpoint``. The loop logs progress (step, loss, the method's schedule, steps/s,
ETA), evaluates every ``train.eval_every`` steps and at the end, and writes ``metrics.jsonl`` (one JSON
object per evaluation), PNG pictures of samples and TensorBoard scalars into the workdir.

Failures keep what was saved: whatever stops the loop (an error, a failed save, Ctrl-C), the save in
flight is committed, the checkpointer, the signal handlers, the writer and the lease are closed in
that order, an error while closing is logged in one line, and the first error is the one raised.
SIGTERM and Ctrl-C finish the step, save and stop (SIGTERM: a clean return; Ctrl-C:
``RunInterrupted``); a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from consistency_jax import build, fs
from consistency_jax import checkpoint as ckpt_lib
from consistency_jax import config as config_lib
from consistency_jax import methods as methods_lib
from consistency_jax import sharding as sharding_lib
from consistency_jax.evaluators import build_evaluator
from consistency_jax.periodic import (
    MIN_STEPS_FOR_SKIP_FRACTION,
    Evaluate,
    HealthCheck,
    Heartbeat,
    MetricsBuffer,
    NonFiniteError,
    NormWatch,
    ReportProgress,
    SaveCheckpoint,
    SkipCounter,
    SkipLimitError,
    UnhealthyStateError,
    check_finite,
    format_time,
)
from consistency_jax.preemption import PreemptionWatcher
from consistency_jax.train import make_multi_step, make_train_step
from consistency_jax.train_state import TrainState
from consistency_jax.trees import flatten_mapping
from consistency_jax.workdir_lock import WorkdirLock, WorkdirLockedError
from consistency_jax.writer import MetricWriter

__all__ = [
    "MIN_STEPS_FOR_SKIP_FRACTION",
    "NonFiniteError",
    "RunInterrupted",
    "SkipCounter",
    "SkipLimitError",
    "UnhealthyStateError",
    "WorkdirError",
    "check_finite",
    "check_workdir",
    "resume_command",
    "train_and_evaluate",
]


class WorkdirError(ValueError):
    """The workdir cannot be used (empty, an unsupported URL, a file)."""


class RunInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped the run after its state was saved; ``main`` exits with status 130."""


def resume_command(
    workdir: str, flags: Sequence[str] = (), argv: Sequence[str] | None = None
) -> str:
    """The command line that resumes the run in ``workdir`` with ``flags`` ("--config.X=V") added.

    Args:
      workdir: the run's directory.
      flags: ``--config.X=V`` flags; a flag of the same field in ``argv`` is replaced.
      argv: the command-line arguments of the run (``sys.argv[1:]`` of ``main``); None when the run
        was started from Python: the config file is then a placeholder.
    """
    names = {f.split("=", 1)[0] for f in flags}
    if argv is None:
        args = ["--config=<your config file>", f"--workdir={workdir}"]
    else:
        args = [a for a in argv if a.split("=", 1)[0] not in names]
    return shlex.join(["python", "-m", "consistency_jax.main", *args, *flags])


class _Closers:
    """What a run must close, closed in reverse order of opening, each exactly once. While an error
    propagates, an error of a closer is logged in one line and the first error stays the one raised;
    otherwise the first closer's error is raised after all were tried."""

    def __init__(self):
        self._items: list[tuple[str, Callable[[], None]]] = []

    def add(self, name: str, fn: Callable[[], None]) -> None:
        self._items.append((name, fn))

    def close(self, failing: bool) -> None:
        first = None
        while self._items:
            name, fn = self._items.pop()
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 -- a KeyboardInterrupt too: close the rest
                if failing:
                    logging.warning(
                        "While stopping: closing the %s failed: %s", name, ckpt_lib.brief(e)
                    )
                elif first is None:
                    first = e
        if first is not None:
            raise first


def _take_lease(workdir: str, is_main: bool) -> WorkdirLock | None:
    """The workdir's lease, taken by process 0 (the other processes learn whether it got it).

    Raises:
      WorkdirLockedError: another run holds the lease (named by process 0).
    """
    lock, error = None, None
    if is_main:
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            lock, error = None, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = WorkdirLockedError(
                f"Process 0 could not take the lease of the workdir "
                f"{workdir}; its log names the run holding it."
            )
    if error is not None:
        raise error
    return lock


def check_workdir(workdir: str) -> str:
    """The workdir, resolved (``fs.resolve``: an absolute local path or a ``gs://`` URL), before
    anything is built.

    Raises:
      WorkdirError: an empty workdir, an unsupported URL scheme, gs:// without a GCS client, or a
        path that is (or lies below) a file.
    """
    if not workdir:
        raise WorkdirError(
            "The workdir is empty: give --workdir=DIR (a local path or gs://BUCKET/PATH)."
        )
    try:
        workdir = fs.resolve(workdir, "workdir")
    except ValueError as e:
        raise WorkdirError(str(e)) from None
    if not fs.is_url(workdir):
        # The first existing directory on the way: a file there can never become the workdir.
        path = workdir
        while not os.path.isdir(path):
            if os.path.lexists(path):
                raise WorkdirError(
                    f"The workdir {workdir} cannot be created: {path} is a file, not a directory. "
                    "Give another --workdir."
                )
            path = os.path.dirname(path)
    return workdir


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, argv: Sequence[str] | None = None
) -> TrainState:
    """Trains the configured model, evaluating and writing to ``workdir``; returns the final state.

    Args:
      config: the run config (validated first).
      workdir: the run's directory: resumed if it holds checkpoints.
      argv: the command-line arguments of ``main`` (for the resume commands that errors suggest).

    Raises:
      ValueError: a bad config field, or a workdir of another config (before anything is built).
      WorkdirLockedError: another run holds the workdir's lease (before anything is written).
      NonFiniteError, SkipLimitError: the training diverged (the newest checkpoint is finite; the
        message names the command that resumes it with a lower learning rate).
      checkpoint.CheckpointSaveError: a save failed (the run stops at once).
      RunInterrupted: Ctrl-C; the state was saved first.
    """
    workdir = check_workdir(workdir)
    # The runs it reads are stored absolute: resuming and sampling work from any directory.
    config = config_lib.with_absolute_sources(config)
    setup = build.validate(config)  # every field, the mesh and the batch, before compiling
    logging.info("%s", sharding_lib.describe(setup.mesh))
    is_main = jax.process_index() == 0
    lock = _take_lease(workdir, is_main)  # before anything is written into the workdir
    closers = _Closers()
    if lock is not None:
        closers.add("workdir lease", lock.release)
    try:
        return _train(config, workdir, setup, is_main, lock, closers, argv)
    except BaseException:
        closers.close(failing=True)
        raise


def _train(config, workdir, setup, is_main, lock, closers, argv) -> TrainState:
    mesh, spec = setup.mesh, setup.spec
    # Refuses a workdir holding checkpoints of another config (or none readable) before anything
    # is built, compiled or overwritten. Only the lease holder removes temporary directories.
    # The run a method reads on every start (TCM's frozen stage 1) must not change on resume.
    pinned = (spec.teacher.workdir, spec.teacher.ema_rate) if spec.teacher is not None else ()
    checkpointer = ckpt_lib.Checkpointer.from_config(
        workdir,
        config,
        defaults=methods_lib.default_values(),
        pinned=pinned,
        clean_tmp=lock is not None,
    )
    closers.add("checkpointer", checkpointer.close)  # commits the save in flight
    # From here Ctrl-C and SIGTERM mean "save and stop" (also while compiling).
    preemption = PreemptionWatcher(checkpointer)
    closers.add("signal handlers", preemption.close)
    data_it, example_shape = build.build_data(config)
    teacher, teacher_params = build.build_teacher(config, spec, mesh)
    distance = build.build_distance(config, spec, example_shape)
    saved = checkpointer.resumed_config
    # A resumed run keeps the optimizer-state layout of its checkpoint (grad_clip may change).
    clip_layout = (
        None
        if saved is None
        else float(flatten_mapping(saved).get("optim.grad_clip", 0.0) or 0.0) > 0
    )
    tx, lr_schedule = build.make_optimizer(config, clip_layout=clip_layout)

    rng = jax.random.key(config.seed)
    init_rng, step_rng, eval_rng = jax.random.split(rng, 3)
    _, apply_fn, init_params = build.build_network(config, example_shape)
    method = build.build_method(
        config, spec, apply_fn, setup.sigmas, example_shape, distance, teacher
    )
    # config.init: a fresh run starts from another run's EMA (ECT tunes an EDM denoiser); a run that
    # resumes from its own checkpoint does not read it.
    start_params = None
    if config.init.workdir:
        if checkpointer.all_steps():
            if "init.workdir" not in pinned:
                logging.info("Resuming: config.init.workdir=%s is not read.", config.init.workdir)
        else:
            start_params = build.load_init_params(config, init_params, mesh)
    # Born on the mesh: replicated over "data"; θ, θ⁻, EMAs, optimizer state, the teacher and LPIPS
    # weights split over "fsdp".
    state, state_shardings = build.init_state(
        init_params,
        tx,
        method,
        setup.ema_rates,
        init_rng,
        mesh,
        min_size=config.mesh.fsdp_min_size,
        teacher_params=teacher_params,
        distance=distance,
        params=start_params,
    )
    step_rng = sharding_lib.place(step_rng, sharding_lib.replicated(mesh))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "method=%s network=%s (%.3fM parameters) data=%s batch=%d steps=%d",
        spec.name,
        config.model.name,
        n_params / 1e6,
        config.data.name,
        config.data.batch_size,
        setup.num_steps,
    )

    fs.makedirs(workdir)
    evaluator = build_evaluator(config, spec, setup.sigmas, example_shape)
    step_fn = make_train_step(
        method,
        tx,
        lr_schedule=lr_schedule,
        skip_nonfinite=config.train.skip_nonfinite,
        microbatches=setup.microbatches,
    )
    schedule_keys = tuple(jax.eval_shape(method.schedule, jnp.int32(0)))
    per_call = setup.steps_per_call
    # in/out shardings, state donated; a scan of `per_call` steps per call when > 1.
    train_step = sharding_lib.jit_train_step(step_fn, mesh, state_shardings)
    multi_step = (
        train_step
        if per_call == 1
        else sharding_lib.jit_train_step(
            make_multi_step(step_fn, per_call), mesh, state_shardings, steps_per_call=per_call
        )
    )

    # Resume: the newest readable checkpoint, restored into the live (sharded) state; the teacher
    # is re-attached, never read from the student's checkpoint.
    restored = checkpointer.restore(state)
    if restored is not None:
        state, data_state = restored
        data_it.set_state(data_state)
    start = int(state.step)
    # Rows of metrics.jsonl after the restored step (written after the last save) are dropped.
    writer = MetricWriter(workdir, is_main, start_step=start)
    closers.add("metric writer", writer.close)

    def eval_params_of(s: TrainState):
        """The evaluated model's parameters: an eval EMA (with the frozen teacher, for a method whose
        model includes it: ``MethodSpec.model_params``)."""
        params = s.eval_params(config.eval.ema_rate or None)
        if spec.model_params is not None:
            params = spec.model_params(config, params, s.teacher_params)
        return params

    def evaluate(step: int, state: TrainState) -> dict:
        """One row of metrics.jsonl and one picture: part of the step (a resumed run makes up a
        missing one first, ``missing_evaluation``)."""
        figures, samples = evaluator(apply_fn, eval_params_of(state), eval_rng)
        writer.evaluation(step, figures)
        if is_main:
            evaluator.plot(samples, picture(step), f"{spec.name} step {step}")
        logging.info(
            "eval step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(figures.items()))
        )
        return figures

    def picture(step: int) -> str:
        return fs.join(workdir, f"samples_{step:08d}.png")

    t = config.train
    ran_before = None if saved is None else flatten_mapping(saved).get("train.num_steps")
    if restored is not None and _evaluation_missing(
        start,
        due=start % t.eval_every == 0 or start in (setup.num_steps, ran_before),
        has_row=writer.has_evaluation(start),
        has_picture=not is_main or fs.exists(picture(start)),
    ):
        logging.info("Step %d was checkpointed but not evaluated: evaluating it first.", start)
        evaluate(start, state)

    def advice() -> str:
        """How to resume after a divergence: the newest healthy checkpoint and the command. The
        checkpoints saved after it while steps were skipped are set aside first, so that the
        command resumes the healthy one."""
        try:
            checkpointer.wait()
            newest, moved = checkpointer.set_aside_unhealthy()
        except Exception:  # noqa: BLE001 -- the advice must not hide the error
            newest, moved = None, []
        where = (
            f"The newest healthy checkpoint is step {newest}"
            if newest is not None
            else "There is no healthy checkpoint yet (the command starts afresh)"
        )
        if moved:
            where += (
                f" (the step(s) {', '.join(map(str, moved))} saved while steps were skipped "
                f"were moved to {fs.join(workdir, ckpt_lib.UNHEALTHY_SUBDIR)})"
            )
        return (
            f"{where}; to resume it with a 10x lower learning rate run\n  "
            f"{resume_command(workdir, [f'--config.optim.lr={_lower_lr(config.optim.lr)}'], argv)}"
            "\noptim.lr, optim.warmup_steps, optim.decay, optim.grad_clip (e.g. "
            "--config.optim.grad_clip=1.0), train.skip_nonfinite and loss.huber_c may change on "
            "resume."
        )

    def save(step: int, clean: bool) -> None:
        with preemption.saving(step):  # a second Ctrl-C now stops after this save, not in it
            checkpointer.save(
                state, step=step, data_state=data_it.get_state(), config=config, clean=clean
            )

    buffer = MetricsBuffer()
    health = HealthCheck(
        buffer,
        skip_nonfinite=t.skip_nonfinite,
        skips=SkipCounter(start, int(t.max_consecutive_skips), float(t.max_skip_fraction), advice),
        norms=NormWatch(
            float(t.get("max_norm_jump", 0.0) or 0.0), _param_norm(state.params), advice
        ),
        advice=advice,
    )
    saver = SaveCheckpoint(config.checkpoint.every, health=health, save=save)
    if restored is not None:
        saver.saved.add(start)
    actions = [
        Heartbeat(checkpointer, lock),
        ReportProgress(
            t.log_every,
            health=health,
            writer=writer,
            num_steps=setup.num_steps,
            batch_size=config.data.batch_size,
            schedule_keys=schedule_keys,
            start=start,
        ),
        saver,
        Evaluate(t.eval_every, evaluate),
    ]
    t_start = time.time()
    k = start
    while k < setup.num_steps:
        if preemption.received:  # a signal during an evaluation, the restore or the compilation
            break
        # `per_call` steps in one call when aligned and enough remain, else one (a resumed run whose
        # step is not a multiple of per_call, or the tail of the run).
        n = per_call if k % per_call == 0 and k + per_call <= setup.num_steps else 1
        if n == 1:
            batch = sharding_lib.global_batch(next(data_it), mesh)  # this host's rows -> global
            state, metrics = train_step(state, batch, step_rng)
        else:
            local = [next(data_it) for _ in range(n)]
            stacked = jax.tree.map(lambda *rows: np.stack(rows), *local)
            state, metrics = multi_step(
                state, sharding_lib.global_batch(stacked, mesh, stacked=True), step_rng
            )
        buffer.add(k, n, metrics)
        k += n
        stopping = preemption.reached(k, n)
        for action in actions:
            action(k, state, final=k == setup.num_steps, stopping=stopping)
        if stopping:
            break
    if preemption.received and k > start:
        saver.run(k, state)  # the signal came during an evaluation (a step already saved is kept)
    closers.close(failing=False)  # waits until the last checkpoint is committed
    saved_here = k in saver.saved
    if preemption.received == "SIGINT":
        where = (
            f"checkpoint step {k} saved in {checkpointer.directory}"
            if saved_here
            else "nothing new to save"
        )
        raise RunInterrupted(
            f"Interrupted by Ctrl-C (SIGINT) at step {k}: {where}; run the same "
            "command again to resume."
        )
    if preemption.received:
        logging.info(
            "Stopped by %s after step %d: %s; exiting cleanly.",
            preemption.received,
            k,
            f"checkpoint saved in {checkpointer.directory}"
            if saved_here
            else "nothing new to save",
        )
    else:
        logging.info("finished %d steps in %s", setup.num_steps, format_time(time.time() - t_start))
    return state


def _evaluation_missing(step: int, *, due: bool, has_row: bool, has_picture: bool) -> bool:
    """Whether a resumed run must evaluate its restored step first: the evaluation was due there
    and its row of metrics.jsonl or its picture is missing (the run died between the commit of the
    checkpoint and the end of the evaluation). Process 0 decides for all processes."""
    missing = due and not (has_row and has_picture)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        missing = bool(int(multihost_utils.broadcast_one_to_all(np.int32(missing))))
    return missing


@jax.jit
def _norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _param_norm(params) -> float:
    """‖θ‖ of the state a process starts from (the first sample of ``NormWatch``'s average)."""
    return float(jax.device_get(_norm(params)))


def _lower_lr(lr: float) -> str:
    """The learning rate a divergence advice suggests: 10x lower; a finite value even when the
    configured one is not."""
    lr = float(lr)
    return f"{lr / 10:g}" if math.isfinite(lr) and lr > 0 else "1e-4"
