"""The training loop's periodic actions: heartbeat, health check (finite, skip limits, norm jumps),
progress report, checkpoint and evaluation, each called after every call of the train step.

The loop of ``experiment`` is then the loop of the flax examples::

    while step < num_steps:
        state, metrics = train_step(state, next(batches))
        step += n
        for action in actions:
            action(step, state, final=step == num_steps, stopping=preempted)

An action runs when ``step % every == 0``, at the final step (``at_final``), and, for the checkpoint,
when the run is stopping (SIGTERM, Ctrl-C). CLU's ``periodic_actions`` is not used: importing it
imports ``clu.metric_writers``, whose summary writer imports TensorFlow at module level, and its
``PeriodicAction`` insists on being called after every single step, which a call of
``train.steps_per_call`` steps is not (bench/RESULTS.md and notes say more).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

# Skip fractions (config.train.max_skip_fraction) are judged from this many steps of a process on.
MIN_STEPS_FOR_SKIP_FRACTION = 100
# Update-norm jumps are judged once this many applied steps have set the running average.
MIN_STEPS_FOR_UPDATE_JUMP = 10


class NonFiniteError(FloatingPointError):
    """Raised when a train step produced a NaN or Inf loss or gradient."""


class SkipLimitError(FloatingPointError):
    """``train.skip_nonfinite`` skipped more steps than ``train.max_consecutive_skips`` or
    ``train.max_skip_fraction`` allow: the training has diverged."""


class UnhealthyStateError(FloatingPointError):
    """The parameter norm or the update norm of a step jumped beyond ``train.max_norm_jump`` times
    its running average: the training has diverged (the state is finite but garbage)."""


class PeriodicAction:
    """Runs ``run(step, state)`` after the calls of the train step that end at a multiple of
    ``every`` (0: never), and at the final step when ``at_final``."""

    def __init__(self, every: int, *, at_final: bool = True):
        self.every, self.at_final = int(every), at_final

    def due(self, step: int, final: bool) -> bool:
        return (self.every > 0 and step % self.every == 0) or (final and self.at_final)

    def __call__(self, step: int, state: Any, *, final: bool, stopping: bool) -> None:
        if self.due(step, final):
            self.run(step, state)

    def run(self, step: int, state: Any) -> None:
        raise NotImplementedError


class MetricsBuffer:
    """The device metrics of the steps since they were last fetched, and the fetched host rows
    since they were last reported."""

    def __init__(self):
        self._device: list[tuple[int, int, Any]] = []  # (first step, steps, device metrics)
        self._rows: list[tuple[int, dict]] = []

    def add(self, first: int, steps: int, metrics: Any) -> None:
        self._device.append((first, steps, metrics))

    def fetch(self) -> list[tuple[int, dict]]:
        """Moves the pending device metrics to the host: the new (step, metrics) rows, one per step
        (they also stay for ``take``)."""
        new = []
        for first, n, metrics in self._device:
            host = jax.device_get(metrics)
            if n == 1:
                new.append((first, host))
            else:
                new.extend(
                    (first + i, {key: value[i] for key, value in host.items()}) for i in range(n)
                )
        self._device = []
        self._rows.extend(new)
        return new

    def take(self) -> list[tuple[int, dict]]:
        """Every row fetched since the last ``take`` (fetching what is pending first)."""
        self.fetch()
        rows, self._rows = self._rows, []
        return rows


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


class NormWatch:
    """Stops a run whose parameter norm ‖θ‖ or update norm ‖Δθ‖ jumps beyond ``factor`` times its
    running average (the mean over the applied steps of this process; ‖θ‖ starts from the norm of
    the state the process started from). Skipped steps (``finite`` = 0) do not count. A finite
    update that throws θ far away (a learning rate 10⁶ times too large) is caught at the first
    check after it, before it is checkpointed.

    Args:
      factor: the allowed jump (``config.train.max_norm_jump``); 0 disables the check.
      start_norm: ‖θ‖ of the state the process started from.
      advice: how to resume (appended to the error message).
    """

    def __init__(self, factor: float, start_norm: float, advice: Callable[[], str] = lambda: ""):
        self.factor, self.advice = float(factor), advice
        self._p_sum, self._p_n = float(start_norm), 1
        self._u_sum, self._u_n = 0.0, 0

    def update(self, fetched: list[tuple[int, dict]]) -> None:
        """Raises UnhealthyStateError at the first applied step of ``fetched`` whose norms jump."""
        if not self.factor:
            return
        for step, m in fetched:
            if int(m.get("finite", 1)) == 0 or "param_norm" not in m:
                continue
            p, u = float(m["param_norm"]), float(m["update_norm"])
            p_avg = self._p_sum / self._p_n
            u_avg = self._u_sum / self._u_n if self._u_n else math.inf
            jumps = []
            if p_avg > 0 and not p <= self.factor * p_avg:
                jumps.append(f"parameter norm {p:.4g} (running average {p_avg:.4g})")
            if self._u_n >= MIN_STEPS_FOR_UPDATE_JUMP and not u <= self.factor * u_avg:
                jumps.append(f"update norm {u:.4g} (running average {u_avg:.4g})")
            if jumps:
                raise UnhealthyStateError(
                    f"Step {step}: the {' and the '.join(jumps)} jumped beyond "
                    f"config.train.max_norm_jump={self.factor:g} times its running average: the "
                    f"training has diverged; this state is not checkpointed. {self.advice()}"
                )
            self._p_sum, self._p_n = self._p_sum + p, self._p_n + 1
            self._u_sum, self._u_n = self._u_sum + u, self._u_n + 1


class HealthCheck:
    """The health of the steps run so far, judged from their fetched metrics: finite (unless
    ``train.skip_nonfinite``), within the skip limits, no norm jump. ``clean`` is False once a step
    was skipped since the last ``mark_saved``: a checkpoint saved then may hold a state that stopped
    learning, so the previous clean one is kept from rotation."""

    def __init__(
        self,
        buffer: MetricsBuffer,
        *,
        skip_nonfinite: bool,
        skips: SkipCounter,
        norms: NormWatch,
        advice: Callable[[], str],
    ):
        self.buffer, self.skip_nonfinite, self.skips, self.norms = (
            buffer,
            skip_nonfinite,
            skips,
            norms,
        )
        self.advice = advice
        self.clean = True

    def check(self, step: int, final: bool) -> None:
        """Fetches the metrics of the steps up to ``step`` and judges them.

        Raises:
          NonFiniteError, SkipLimitError, UnhealthyStateError: naming the step and how to resume.
        """
        new = self.buffer.fetch()
        if not new:
            return
        if not self.skip_nonfinite:
            check_finite(new, advice=self.advice)
        self.norms.update(new)
        before = self.skips.skipped
        self.skips.update(new, step, final=final)
        if self.skips.skipped > before:
            self.clean = False

    def mark_saved(self) -> None:
        self.clean = True


class Heartbeat(PeriodicAction):
    """Every step: a failed asynchronous save stops the run at once; the workdir's lease is renewed
    (and its loss noticed)."""

    def __init__(self, checkpointer, lock):
        super().__init__(1)
        self.checkpointer, self.lock = checkpointer, lock

    def run(self, step, state):
        self.checkpointer.check_save()
        if self.lock is not None:
            self.lock.check()


class ReportProgress(PeriodicAction):
    """Every ``train.log_every`` steps: the health check, one log line (step, loss, the method's
    schedule, steps/s, ETA) and the train/ TensorBoard scalars (means over the steps since the last
    report)."""

    def __init__(
        self,
        every: int,
        *,
        health: HealthCheck,
        writer,
        num_steps: int,
        batch_size: int,
        schedule_keys: tuple[str, ...],
        start: int,
    ):
        super().__init__(every)
        self.health, self.writer = health, writer
        self.num_steps, self.batch_size, self.schedule_keys = num_steps, batch_size, schedule_keys
        self.t_last, self.k_last = time.time(), start

    def run(self, step, state):
        self.health.check(step, final=step == self.num_steps)
        fetched = self.health.buffer.take()
        if not fetched:
            return
        skipped = self.health.skips.skipped
        last = fetched[-1][1]
        now = time.time()
        rate = (step - self.k_last) / max(now - self.t_last, 1e-9)
        eta = (self.num_steps - step) / max(rate, 1e-9)
        img_s = rate * self.batch_size
        schedule = "".join(f" {key}={float(last[key]):.6g}" for key in self.schedule_keys)
        logging.info(
            "step %d/%d loss=%.5g grad_norm=%.3g%s lr=%.3g | %.1f steps/s %.0f img/s | ETA %s%s",
            step,
            self.num_steps,
            last["loss"],
            last["grad_norm"],
            schedule,
            last.get("lr", 0.0),
            rate,
            img_s,
            format_time(eta),
            f" | skipped {skipped}" if skipped else "",
        )
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in last}
        self.writer.scalars(
            step,
            {**means, "steps_per_s": rate, "img_per_s": img_s, "skipped_steps": skipped},
            "train",
        )
        self.t_last, self.k_last = now, step


class SaveCheckpoint(PeriodicAction):
    """Every ``checkpoint.every`` steps, at the final step and when the run stops: the health check,
    then an asynchronous save (``save(step, clean)``) of a state that passed it."""

    def __init__(self, every: int, *, health: HealthCheck, save: Callable[[int, bool], None]):
        super().__init__(every)
        self.health, self.save = health, save
        self.saved: set[int] = set()

    def __call__(self, step, state, *, final, stopping):
        if self.due(step, final) or stopping:
            self.run(step, state)

    def run(self, step, state):
        if step in self.saved:
            return
        self.health.check(step, final=False)
        self.save(step, self.health.clean)
        self.health.mark_saved()
        self.saved.add(step)


class Evaluate(PeriodicAction):
    """Every ``train.eval_every`` steps and at the final step (not when stopping early):
    ``evaluate(step, state)`` writes a row of metrics.jsonl and a picture."""

    def __init__(self, every: int, evaluate: Callable[[int, Any], Any]):
        super().__init__(every)
        self.evaluate = evaluate

    def __call__(self, step, state, *, final, stopping):
        if not stopping and self.due(step, final):
            self.evaluate(step, state)


def format_time(seconds: float) -> str:
    """h:mm:ss, or "?" for an unknown (infinite) time."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
