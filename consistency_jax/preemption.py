"""Preemption: SIGTERM (the notice of TPU/GPU clouds) becomes "finish the step, save, exit cleanly";
Ctrl-C (SIGINT) the same, and a second Ctrl-C aborts at once.

On several hosts JAX's preemption sync service (started by ``jax.distributed.initialize``) makes every
host stop at the same step; the checkpoint manager answers where that step is
(``checkpoint.Checkpointer.reached_preemption``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
from absl import logging

if TYPE_CHECKING:  # only for the annotation: preemption needs no checkpoint code to run
    from consistency_jax.checkpoint import Checkpointer


class PreemptionWatcher:
    """Turns SIGTERM (the preemption notice of TPU/GPU clouds) and SIGINT (Ctrl-C) into "save and stop".

    Single process: the handler sets a flag (``received``: "SIGTERM" or "SIGINT") and the loop, at
    the end of the current step, sees ``reached(step)``, saves and stops (after SIGTERM with exit
    code 0, after SIGINT with an error: ``experiment.RunInterrupted``). The handlers are installed
    when the watcher is created (from the main thread only) and the previous ones are restored by
    ``close``. A second signal (a second Ctrl-C: Python's KeyboardInterrupt, at once), one after
    ``close``, or one after the watcher was dropped without ``close`` goes to the previous handler.
    Multiple processes: only SIGTERM is watched, by JAX's
    preemption sync service (started by ``jax.distributed.initialize``) catches the signal and
    ``reached`` returns True on every host at the same step (Orbax ``reached_preemption``).
    """

    def __init__(
        self,
        checkpointer: Checkpointer | None = None,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
    ):
        self._checkpointer = checkpointer
        self.received: str | None = None
        self._active = True
        self._previous: dict[int, Any] = {}
        self._handler = None
        self._saving: int | None = None  # the step whose checkpoint is being prepared
        self._held = False  # a second Ctrl-C came while it was
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            # The handler holds the watcher weakly, so a watcher that is never closed does not keep
            # swallowing signals after it is gone.
            self._handler = _make_handler(weakref.ref(self), self._previous)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _take(self, signum: int) -> bool:
        if (
            self._active
            and self.received is not None
            and self._saving is not None
            and signum == signal.SIGINT
            and not self._held
        ):
            self._held = True
            logging.warning(
                "Ctrl-C again: the checkpoint of step %d is being prepared; the run stops right "
                "after it (press Ctrl-C once more to abort at once, without it).",
                self._saving,
            )
            return True
        if not self._active or self.received is not None:
            return False
        self.received = signal.Signals(signum).name
        logging.warning(
            "Received %s: finishing the current step, saving a checkpoint and exiting%s.",
            self.received,
            " (press Ctrl-C again to abort at once)" if signum == signal.SIGINT else "",
        )
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
                if self._checkpointer.reached_preemption(s):
                    self.received = "preemption notice"
                    return True
        return False

    @contextlib.contextmanager
    def saving(self, step: int):
        """While a checkpoint of ``step`` is prepared (its arrays copied off the devices, checksum
        code compiled): a second Ctrl-C after the first is held (the run stops right after the
        save), a third aborts at once."""
        self._saving = step
        try:
            yield
        finally:
            self._saving = None

    def close(self) -> None:
        """Restores the signal handlers that were installed before (idempotent)."""
        self._active = False
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                if signal.getsignal(sig) is self._handler:
                    signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _make_handler(watcher_ref: weakref.ref[PreemptionWatcher], previous: dict[int, Any]):
    def handler(signum, frame):
        watcher = watcher_ref()
        if watcher is not None and watcher._take(signum):
            return
        prev = previous.get(signum)
        prev = signal.SIG_DFL if prev is None else prev
        signal.signal(signum, prev)
        if callable(prev):
            prev(signum, frame)
        elif signum == signal.SIGINT:
            # A second Ctrl-C aborts at once even where SIGINT was ignored before the watcher
            # (a background job, a pytest-xdist worker): the user asked twice.
            raise KeyboardInterrupt
        elif prev == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    return handler
