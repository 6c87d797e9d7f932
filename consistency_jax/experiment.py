"""``train_and_evaluate(config, workdir)``: the training loop around the pure train step.

The config is validated (``config.validate``) before anything is compiled or written; the run is built
by ``build`` (the train state born sharded on the mesh), evaluated by ``evaluation`` and checkpointed
by ``checkpoint``. The loop logs progress (step, loss, the method's schedule, steps/s, ETA),
evaluates every ``train.eval_every`` steps and at the end, and writes ``metrics.jsonl`` (one JSON
object per evaluation), PNG pictures of samples and TensorBoard scalars into the workdir.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from consistency_jax import build
from consistency_jax import checkpoint as ckpt_lib
from consistency_jax import config as config_lib
from consistency_jax import sharding as sharding_lib
from consistency_jax.evaluation import build_evaluator
from consistency_jax.preemption import PreemptionWatcher
from consistency_jax.train import make_train_step
from consistency_jax.train_state import TrainState
from consistency_jax.writer import MetricWriter


class NonFiniteError(FloatingPointError):
    """Raised when a train step produced a NaN or Inf loss or gradient."""


def check_finite(history: list[tuple[int, dict]],
                 before_raise: Optional[Callable[[], None]] = None) -> None:
    """Raises NonFiniteError naming the first step and quantity that is NaN or Inf; calls
    ``before_raise()`` first (the loop commits its pending, finite checkpoint there)."""
    for step, m in history:
        for name in ("loss", "grad_norm"):
            if not np.isfinite(m[name]):
                if before_raise is not None:
                    before_raise()
                raise NonFiniteError(f"Non-finite {name} ({m[name]}) at step {step}; the state of this "
                                     "step was not checkpointed. Lower the learning rate, enable "
                                     "config.optim.grad_clip, or set config.train.skip_nonfinite.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains the configured model, evaluating and writing to ``workdir``; returns the final state."""
    setup = config_lib.validate(config)  # every field, the mesh and the batch, before compiling
    mesh, spec = setup.mesh, setup.spec
    logging.info("%s", sharding_lib.describe(mesh))
    workdir = os.path.abspath(workdir)
    # Refuses a workdir holding checkpoints of another config (or none readable) before anything
    # is built, compiled or overwritten.
    checkpointer = ckpt_lib.Checkpointer.from_config(workdir, config,
                                                     defaults=config_lib.default_values())
    is_main = jax.process_index() == 0
    data_it, example_shape = build.build_data(config)
    teacher, teacher_params = build.build_teacher(config, spec, mesh)
    distance = build.build_distance(config, spec, example_shape)
    tx, lr_schedule = build.make_optimizer(config)

    rng = jax.random.key(config.seed)
    init_rng, step_rng, eval_rng = jax.random.split(rng, 3)
    _, apply_fn, init_params = build.build_network(config, example_shape)
    method = build.build_method(config, spec, apply_fn, setup.sigmas, example_shape, distance,
                                teacher)
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
        init_params, tx, method, setup.ema_rates, init_rng, mesh,
        min_size=config.mesh.fsdp_min_size, teacher_params=teacher_params, distance=distance,
        params=start_params)
    step_rng = sharding_lib.place(step_rng, sharding_lib.replicated(mesh))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("method=%s network=%s (%.3fM parameters) data=%s batch=%d steps=%d",
                 spec.name, config.model.name, n_params / 1e6, config.data.name,
                 config.data.batch_size, setup.num_steps)

    os.makedirs(workdir, exist_ok=True)
    evaluator = build_evaluator(config, spec, setup.sigmas, example_shape)
    writer = MetricWriter(workdir, is_main)
    step_fn = make_train_step(method, tx, lr_schedule=lr_schedule,
                              skip_nonfinite=config.train.skip_nonfinite,
                              microbatches=setup.microbatches)
    schedule_keys = tuple(jax.eval_shape(method.schedule, jnp.int32(0)))
    per_call = setup.steps_per_call
    # in/out shardings, state donated; a scan of `per_call` steps per call when > 1.
    train_step = sharding_lib.jit_train_step(step_fn, mesh, state_shardings)
    multi_step = (train_step if per_call == 1 else
                  sharding_lib.jit_train_step(step_fn, mesh, state_shardings, steps_per_call=per_call))

    def run_eval(state):
        figures, samples = evaluator(apply_fn, state.eval_params(config.eval.ema_rate or None),
                                     eval_rng)
        step = int(state.step)
        writer.evaluation(step, figures)
        if is_main:
            evaluator.plot(samples, os.path.join(workdir, f"samples_{step:08d}.png"),
                           f"{spec.name} step {step}")
        logging.info("eval step %d: %s", step,
                     " ".join(f"{k}={v:.4g}" for k, v in sorted(figures.items())))
        return figures

    # Resume: the newest readable checkpoint, restored into the live (sharded) state; the teacher
    # is re-attached, never read from the student's checkpoint. SIGTERM -> save and stop.
    restored = checkpointer.restore(state)
    if restored is not None:
        state, data_state = restored
        data_it.set_state(data_state)
    preemption = PreemptionWatcher(checkpointer)
    start = int(state.step)
    history: list[tuple[int, int, Any]] = []  # (first step, steps, device metrics)
    skipped = 0
    t_last, k_last = time.time(), start
    t_start = t_last
    k = start
    while k < setup.num_steps:
        # `per_call` steps in one call when aligned and enough remain, else one (a resumed run whose
        # step is not a multiple of per_call, or the tail of the run).
        n = per_call if k % per_call == 0 and k + per_call <= setup.num_steps else 1
        if n == 1:
            batch = sharding_lib.global_batch(next(data_it), mesh)  # this host's rows -> global
            state, metrics = train_step(state, batch, step_rng)
        else:
            local = [next(data_it) for _ in range(n)]
            stacked = jax.tree.map(lambda *rows: np.stack(rows), *local)
            state, metrics = multi_step(state, sharding_lib.global_batch(stacked, mesh, stacked=True),
                                        step_rng)
        history.append((k, n, metrics))
        k = done = k + n
        if done % config.train.log_every == 0 or done == setup.num_steps:
            fetched = _unstack_history(history)
            history = []
            if not config.train.skip_nonfinite:
                check_finite(fetched, before_raise=checkpointer.close)
            skipped += sum(int(m["finite"] == 0) for _, m in fetched)
            last = fetched[-1][1]
            now = time.time()
            rate = (done - k_last) / max(now - t_last, 1e-9)
            eta = (setup.num_steps - done) / max(rate, 1e-9)
            img_s = rate * config.data.batch_size
            schedule = "".join(f" {key}={float(last[key]):.6g}" for key in schedule_keys)
            logging.info("step %d/%d loss=%.5g grad_norm=%.3g%s lr=%.3g | %.1f steps/s "
                         "%.0f img/s | ETA %s%s", done, setup.num_steps, last["loss"],
                         last["grad_norm"], schedule, last.get("lr", 0.0), rate,
                         img_s, _fmt_time(eta), f" | skipped {skipped}" if skipped else "")
            means = {k2: float(np.mean([m[k2] for _, m in fetched])) for k2 in last}
            writer.scalars(done, {**means, "steps_per_s": rate, "img_per_s": img_s,
                                  "skipped_steps": skipped}, "train")
            t_last, k_last = now, done
        preempted = preemption.reached(done, n)
        if checkpointer.should_save(done, final=done == setup.num_steps or preempted):
            if history and not config.train.skip_nonfinite:  # never checkpoint a broken state
                check_finite(_unstack_history(history), checkpointer.close)
            checkpointer.save(state, step=done, data_state=data_it.get_state(), config=config)
        if preempted:
            break
        if done % config.train.eval_every == 0 or done == setup.num_steps:
            run_eval(state)
    preemption.close()
    checkpointer.close()  # waits until the last checkpoint is committed
    if preemption.received:
        logging.info("Stopped by %s after step %d: checkpoint saved in %s; exiting cleanly.",
                     preemption.received, int(state.step), checkpointer.directory)
    else:
        logging.info("finished %d steps in %s", setup.num_steps, _fmt_time(time.time() - t_start))
    writer.close()
    return state


def _unstack_history(history: list[tuple[int, int, Any]]) -> list[tuple[int, dict]]:
    """(first step, steps, device metrics) entries -> host (step, metrics) pairs, one per step."""
    out = []
    for first, n, metrics in history:
        host = jax.device_get(metrics)
        if n == 1:
            out.append((first, host))
        else:
            out.extend((first + i, {key: value[i] for key, value in host.items()}) for i in range(n))
    return out


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
