"""``train_and_evaluate(config, workdir)``: the training loop around the pure train step.

The config is validated (``config.validate``) before anything is compiled or written; the run takes
the workdir's lease (``workdir_lock``: one writer per workdir) before it writes anything; the run is
built by ``build`` (the train state born sharded on the mesh), evaluated by ``evaluation`` and
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
import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from consistency_jax import build, fs
from consistency_jax import checkpoint as ckpt_lib
from consistency_jax import config as config_lib
from consistency_jax import sharding as sharding_lib
from consistency_jax.evaluation import build_evaluator
from consistency_jax.preemption import PreemptionWatcher
from consistency_jax.train import make_train_step
from consistency_jax.train_state import TrainState
from consistency_jax.workdir_lock import WorkdirLock, WorkdirLockedError
from consistency_jax.writer import MetricWriter

# Skip fractions (config.train.max_skip_fraction) are judged from this many steps of a process on.
MIN_STEPS_FOR_SKIP_FRACTION = 100


class NonFiniteError(FloatingPointError):
    """Raised when a train step produced a NaN or Inf loss or gradient."""


class SkipLimitError(FloatingPointError):
    """``train.skip_nonfinite`` skipped more steps than ``train.max_consecutive_skips`` or
    ``train.max_skip_fraction`` allow: the training has diverged."""


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


def check_finite(
    history: list[tuple[int, dict]],
    before_raise: Callable[[], None] | None = None,
    advice: Callable[[], str] | None = None,
) -> None:
    """Raises NonFiniteError naming the first step and quantity that is NaN or Inf; calls
    ``before_raise()`` first, and appends ``advice()`` (how to resume) to the message."""
    for step, m in history:
        for name in ("loss", "grad_norm"):
            if not np.isfinite(m[name]):
                if before_raise is not None:
                    before_raise()
                tail = (
                    advice()
                    if advice is not None
                    else (
                        "Lower the learning rate, enable config.optim.grad_clip, or set "
                        "config.train.skip_nonfinite."
                    )
                )
                raise NonFiniteError(
                    f"Non-finite {name} ({m[name]}) at step {step}; the state of "
                    f"this step was not checkpointed. {tail}"
                )


class SkipCounter:
    """Counts the steps that ``train.skip_nonfinite`` skipped and enforces its limits.

    Args:
      start: the step this process started from.
      max_consecutive: stop after this many skipped steps in a row (0: no limit).
      max_fraction: stop when more than this fraction of the steps this process ran were skipped,
        judged from ``MIN_STEPS_FOR_SKIP_FRACTION`` steps on and at the end (1.0: no limit).
      advice: how to resume (appended to the error message).
    """

    def __init__(
        self,
        start: int,
        max_consecutive: int,
        max_fraction: float,
        advice: Callable[[], str] = lambda: "",
    ):
        self.start, self.max_consecutive, self.max_fraction = start, max_consecutive, max_fraction
        self.advice = advice
        self.skipped = self.run = 0

    def update(self, fetched: list[tuple[int, dict]], done: int, final: bool) -> None:
        """Counts the steps of ``fetched`` ((step, metrics) pairs, ``finite`` = 0 for a skipped one)
        after which ``done`` steps are done.

        Raises:
          SkipLimitError: a limit is exceeded (naming the steps and the config field).
        """
        for step, m in fetched:
            bad = int(m["finite"]) == 0
            self.skipped, self.run = self.skipped + bad, (self.run + 1 if bad else 0)
            if self.max_consecutive and self.run >= self.max_consecutive:
                raise SkipLimitError(
                    f"config.train.skip_nonfinite skipped {self.run} steps in a row (steps "
                    f"{step - self.run + 1}..{step}; config.train.max_consecutive_skips="
                    f"{self.max_consecutive}): the training has diverged. {self.advice()}"
                )
        ran = done - self.start
        if (
            self.max_fraction < 1
            and self.skipped > self.max_fraction * ran
            and (ran >= MIN_STEPS_FOR_SKIP_FRACTION or final)
        ):
            raise SkipLimitError(
                f"config.train.skip_nonfinite skipped {self.skipped} of the {ran} steps this run "
                f"made (steps {self.start + 1}..{done}), more than config.train.max_skip_fraction="
                f"{self.max_fraction}: the training has diverged. {self.advice()}"
            )


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
      ValueError: an empty workdir, an unsupported URL scheme, or gs:// without a GCS client.
    """
    if not workdir:
        raise ValueError(
            "The workdir is empty: give --workdir=DIR (a local path or gs://BUCKET/PATH)."
        )
    return fs.resolve(workdir, "workdir")


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
    setup = config_lib.validate(config)  # every field, the mesh and the batch, before compiling
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
    checkpointer = ckpt_lib.Checkpointer.from_config(
        workdir, config, defaults=config_lib.default_values(), clean_tmp=lock is not None
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
        else float(ckpt_lib.flatten_config(saved).get("optim.grad_clip", 0.0) or 0.0) > 0
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
        else sharding_lib.jit_train_step(step_fn, mesh, state_shardings, steps_per_call=per_call)
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

    def run_eval(state):
        figures, samples = evaluator(
            apply_fn, state.eval_params(config.eval.ema_rate or None), eval_rng
        )
        step = int(state.step)
        writer.evaluation(step, figures)
        if is_main:
            evaluator.plot(
                samples, fs.join(workdir, f"samples_{step:08d}.png"), f"{spec.name} step {step}"
            )
        logging.info(
            "eval step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(figures.items()))
        )
        return figures

    def advice() -> str:
        """How to resume after a divergence: the newest checkpoint and the command."""
        try:
            checkpointer.wait()
            newest = checkpointer.latest_step()
        except Exception:  # noqa: BLE001 -- the advice must not hide the error
            newest = None
        lr = float(config.optim.lr) / 10
        where = (
            f"The newest checkpoint is step {newest}"
            if newest is not None
            else "There is no checkpoint yet"
        )
        return (
            f"{where}; to resume it with a 10x lower learning rate run\n  "
            f"{resume_command(workdir, [f'--config.optim.lr={lr:g}'], argv)}\n"
            "optim.lr, optim.warmup_steps, optim.decay, optim.grad_clip (e.g. "
            "--config.optim.grad_clip=1.0), train.skip_nonfinite and loss.huber_c may change on "
            "resume."
        )

    def save(step: int) -> None:
        if history and not config.train.skip_nonfinite:  # never checkpoint a broken state
            check_finite(_unstack_history(history), advice=advice)
        checkpointer.save(state, step=step, data_state=data_it.get_state(), config=config)
        saved_steps.add(step)

    t = config.train
    skips = SkipCounter(
        start,
        int(t.get("max_consecutive_skips", 0)),
        float(t.get("max_skip_fraction", 1.0)),
        advice,
    )
    history: list[tuple[int, int, Any]] = []  # (first step, steps, device metrics)
    saved_steps: set[int] = {start} if restored is not None else set()
    t_last, k_last = time.time(), start
    t_start = t_last
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
        history.append((k, n, metrics))
        k = done = k + n
        checkpointer.check_save()  # a failed asynchronous save stops the run at once
        if lock is not None:
            lock.check()
        if done % t.log_every == 0 or done == setup.num_steps:
            fetched = _unstack_history(history)
            history = []
            if not t.skip_nonfinite:
                check_finite(fetched, advice=advice)
            skips.update(fetched, done, final=done == setup.num_steps)
            skipped = skips.skipped
            last = fetched[-1][1]
            now = time.time()
            rate = (done - k_last) / max(now - t_last, 1e-9)
            eta = (setup.num_steps - done) / max(rate, 1e-9)
            img_s = rate * config.data.batch_size
            schedule = "".join(f" {key}={float(last[key]):.6g}" for key in schedule_keys)
            logging.info(
                "step %d/%d loss=%.5g grad_norm=%.3g%s lr=%.3g | %.1f steps/s "
                "%.0f img/s | ETA %s%s",
                done,
                setup.num_steps,
                last["loss"],
                last["grad_norm"],
                schedule,
                last.get("lr", 0.0),
                rate,
                img_s,
                _fmt_time(eta),
                f" | skipped {skipped}" if skipped else "",
            )
            means = {k2: float(np.mean([m[k2] for _, m in fetched])) for k2 in last}
            writer.scalars(
                done,
                {**means, "steps_per_s": rate, "img_per_s": img_s, "skipped_steps": skipped},
                "train",
            )
            t_last, k_last = now, done
        preempted = preemption.reached(done, n)
        if checkpointer.should_save(done, final=done == setup.num_steps or preempted):
            save(done)
        if preempted:
            break
        if done % t.eval_every == 0 or done == setup.num_steps:
            run_eval(state)
    if preemption.received and k > start and k not in saved_steps:
        save(k)  # the signal came during an evaluation
    closers.close(failing=False)  # waits until the last checkpoint is committed
    if preemption.received == "SIGINT":
        where = (
            f"checkpoint step {k} saved in {checkpointer.directory}"
            if k in saved_steps
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
            if k in saved_steps
            else "nothing new to save",
        )
    else:
        logging.info("finished %d steps in %s", setup.num_steps, _fmt_time(time.time() - t_start))
    return state


def _unstack_history(history: list[tuple[int, int, Any]]) -> list[tuple[int, dict]]:
    """(first step, steps, device metrics) entries -> host (step, metrics) pairs, one per step."""
    out = []
    for first, n, metrics in history:
        host = jax.device_get(metrics)
        if n == 1:
            out.append((first, host))
        else:
            out.extend(
                (first + i, {key: value[i] for key, value in host.items()}) for i in range(n)
            )
    return out


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
