"""The pure train step, generic over training methods (CM Algorithms 2 and 3; EDM).

``make_train_step(method, tx)`` returns ``train_step(state, batch, rng) -> (state, metrics)``: pure,
jittable, shardable, and usable inside a user's own ``jax.pmap`` / ``jax.shard_map`` by naming the
mapped axis (gradients and metrics are then averaged over it). One optimizer update of θ with the
gradient of ``method.loss`` is followed by the method's target update θ⁻ ← μ(k)·θ⁻ + (1 − μ(k))·θ (if it
keeps a target) and the eval EMA updates. The method (``methods.base.Method``) owns everything specific:
its loss, its schedule of the step, which frozen trees it reads (θ⁻, a teacher, distance weights).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from consistency_jax.methods.base import Method, frozen_inputs
from consistency_jax.train_state import TrainState, ema_update

Array = jax.Array
TrainStep = Callable[[TrainState, dict, Array], tuple[TrainState, dict]]


def make_train_step(
    method: Method,
    tx: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    lr_schedule: optax.Schedule | None = None,
    skip_nonfinite: bool = False,
    microbatches: int = 1,
) -> TrainStep:
    """Builds the train step.

    Args:
      method: the training method (``methods.get(name).build(...)``, or a ``methods.Method`` of
        one's own): ``method.loss(params, frozen, batch, rng, step)``.
      tx: the optax optimizer of θ.
      axis_name: when the step runs inside a ``pmap``/``shard_map`` over this named axis, gradients and
        metrics are averaged over it and each device draws its own noise. None under ``jax.jit``
        (sharding is then expressed by the shardings of the arguments).
      lr_schedule: only for logging the learning rate in the metrics.
      skip_nonfinite: if True, a step whose loss or gradients are not finite leaves θ, θ⁻, the EMAs and
        the optimizer state unchanged (the step counter still advances) and reports ``finite = 0``;
        if False the update is applied and the caller must stop on ``finite = 0``.
      microbatches: split the batch into this many equal microbatches whose gradients are summed in
        a ``lax.scan`` (gradient accumulation): one update with the mean gradient of the whole batch
        (its noise drawn per microbatch), with the activation memory of one microbatch.
        Microbatch ``i`` takes rows
        ``i, i + m, i + 2m, ...``
        (so that on a mesh every device keeps its share of every microbatch) and draws its noise
        with ``fold_in(key, i)``; the loss and metrics are the mean over microbatches (equal sizes,
        so the mean of the per-example losses of the batch).

    Returns:
      ``train_step(state, batch, rng) -> (new_state, metrics)``; ``rng`` is a base key: the step folds
      in ``state.step`` (and the device index under ``axis_name``), so the same key can be passed every
      step and a resumed run draws exactly the same noise. The metrics hold the loss, the gradient,
      parameter and update norms, ``finite``, the method's ``schedule(step)`` and its aux scalars.
    """
    if not callable(getattr(method, "loss", None)):
        raise TypeError(
            f"make_train_step needs a method with a loss(params, frozen, batch, rng, step) "
            f"(consistency_jax.methods.Method), got {type(method).__name__}."
        )
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}.")

    def train_step(state: TrainState, batch: dict, rng: Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        frozen = frozen_inputs(
            method, state.params, state.target_params, state.teacher_params, state.distance
        )

        def objective(params, rows, key):
            loss, aux = method.loss(params, frozen, rows, key, state.step)
            if axis_name is not None:
                # Differentiate the loss of the global batch. Under shard_map's replication checking
                # the gradient of a replicated θ is then already the mean over the axis (autodiff sums
                # it); under pmap (no checking) the pmean of the gradients below averages it.
                loss, aux = jax.lax.pmean((loss, aux), axis_name)
            return loss, aux

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if microbatches == 1:
            (loss, aux), grads = grad_fn(state.params, batch, rng)
        else:
            chunks = jax.tree.map(lambda x: split_microbatches(x, microbatches), batch)

            def accumulate(total, inputs):
                i, rows = inputs
                (loss, aux), grads = grad_fn(state.params, rows, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, total, (loss, aux, grads)), None

            first = jax.tree.map(lambda x: x[0], chunks)
            shapes = jax.eval_shape(grad_fn, state.params, first, rng)
            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[0][1], shapes[1])
            )
            total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), chunks))
            loss, aux, grads = jax.tree.map(lambda x: x / microbatches, total)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        target_params = (
            method.update_target(state.target_params, params, state.step)
            if state.target_params is not None
            else None
        )
        ema_params = {k: ema_update(v, params, float(k)) for k, v in state.ema_params.items()}
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            target_params=target_params,
            ema_params=ema_params,
            opt_state=opt_state,
        )

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_state = keep(new_state, state.replace(step=state.step + 1))
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
            "finite": finite.astype(jnp.int32),
            **method.schedule(state.step),
            **aux,
        }
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        return new_state, metrics

    return train_step


def split_microbatches(x: Array, microbatches: int) -> Array:
    """(B, ...) -> (m, B / m, ...) with microbatch i = rows i, i + m, i + 2m, ... (strided, so that a
    batch split over devices in contiguous blocks gives every device an equal part of each)."""
    if x.shape[0] % microbatches:
        raise ValueError(
            f"A batch of {x.shape[0]} rows does not split into {microbatches} equal microbatches."
        )
    return jnp.swapaxes(x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]), 0, 1)


def make_multi_step(train_step: TrainStep, steps_per_call: int) -> TrainStep:
    """``steps_per_call`` train steps in one call: a ``jax.lax.scan`` of ``train_step``.

    ``multi_step(state, batches, rng) -> (state, metrics)`` takes batches stacked on a new leading
    axis of length ``steps_per_call`` and returns the metrics stacked the same way. The steps are
    exactly the steps of ``train_step`` (each folds ``state.step`` into ``rng``), so a run is the same
    whatever the number of steps per call. One dispatch and one host round trip per call instead of
    per step: worth it where the host's dispatch is a visible share of a step (small networks on
    GPU/TPU). On XLA:CPU a scan around convolutions runs several times slower (the loop body loses
    the fast convolution layouts), so keep 1 there.

    Args:
      train_step: from ``make_train_step``.
      steps_per_call: the scan length, at least 1 (1 returns ``train_step`` itself).
    """
    if (
        not isinstance(steps_per_call, int)
        or isinstance(steps_per_call, bool)
        or steps_per_call < 1
    ):
        raise ValueError(f"steps_per_call must be a positive integer, got {steps_per_call!r}.")
    if steps_per_call == 1:
        return train_step

    def multi_step(state: TrainState, batches: dict, rng: Array) -> tuple[TrainState, dict]:
        leading = {x.shape[0] for x in jax.tree.leaves(batches)}
        if leading != {steps_per_call}:
            raise ValueError(
                f"multi_step needs batches stacked on a leading axis of {steps_per_call} "
                f"steps, got leading sizes {sorted(leading)}."
            )
        return jax.lax.scan(lambda s, b: train_step(s, b, rng), state, batches)

    return multi_step
