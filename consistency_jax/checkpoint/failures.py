"""A failed asynchronous checkpoint save: noticed at once, reported once, its threads let go.

Orbax logs the first error of a failed save from the thread that saw it, long before the save's
other threads give up; ``SAVE_FAILURES`` keeps that first error for ``Checkpointer.check_save`` to
raise after the next step. The rest of what a failed save leaves is kept out of the log: Orbax's
copies of the traceback (``_QuietOrbax`` on the absl logger, its warnings one line each), asyncio's
"Task exception was never retrieved" for each failed write task (``_QuietAsyncio``), and the
abandoned writes' "Event loop is closed" errors (``quiet_closed_loop``, the unraisable-exception
hook). All three are installed when this module is imported, once, and drop only what follows a
noted failure (Orbax's INFO chatter is always dropped). ``join_save_threads`` then lets the save's
threads that wait for a signal of the failed part go on, and waits for them a few seconds at most.
"""

from __future__ import annotations

import logging as logging_std
import sys
import threading
import time

import jax
from absl import logging

from consistency_jax.checkpoint.errors import brief


class _QuietOrbax(logging_std.Filter):
    """Drops Orbax's per-file INFO chatter from the absl log; its warnings and errors still show, as
    one line each: a failed save is re-raised by ``Checkpointer`` with its cause, so Orbax's copies
    of the traceback (one per thread that saw it) would only bury the error."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.levelno < logging_std.WARNING:
            return False
        if record.levelno >= logging_std.ERROR and SAVE_FAILURES.first is not None:
            return False  # a consequence of the failure noted first, which is raised once
        if record.exc_info:
            e = record.exc_info[1]
            if record.levelno >= logging_std.ERROR and isinstance(e, Exception):
                SAVE_FAILURES.note(e)
            record.msg = f"{record.getMessage()} ({brief(e) if e is not None else 'error'})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


class SaveFailures:
    """The first error that a thread of Orbax logs while a save is in flight (Orbax logs it the
    moment a write fails, long before its other threads give up waiting): ``check_save`` raises it
    after the next step."""

    def __init__(self):
        self._lock = threading.Lock()
        self.first: BaseException | None = None

    def note(self, e: BaseException) -> None:
        with self._lock:
            if self.first is None:
                self.first = e

    def clear(self) -> None:
        with self._lock:
            self.first = None


SAVE_FAILURES = SaveFailures()


class ReadFailures:
    """Whether this process has given up a checkpoint read (a damaged step set aside, a fallback to
    the previous one): the abandoned read's TensorStore futures complain later, at garbage
    collection, that asyncio's loop is closed (dozens of tracebacks for one damaged step), after the
    library has already named the step in one warning."""

    def __init__(self):
        self._seen = threading.Event()

    def note(self) -> None:
        self._seen.set()

    def clear(self) -> None:
        self._seen.clear()

    @property
    def seen(self) -> bool:
        return self._seen.is_set()


READ_FAILURES = ReadFailures()


def io_abandoned() -> bool:
    """A save failed (until the next save starts) or a read was given up (for the process)."""
    return SAVE_FAILURES.first is not None or READ_FAILURES.seen


class _QuietAsyncio(logging_std.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" reports of a failed save's write
    tasks (hundreds on a full disk; the save's error is raised once by ``Checkpointer``) and of an
    abandoned read's futures (the unreadable step is named once in a warning)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if not io_abandoned():
            return True
        return "exception was never retrieved" not in str(record.msg)


_QUIET_ORBAX = _QuietOrbax()
if not any(isinstance(f, _QuietOrbax) for f in logging_std.getLogger("absl").filters):
    logging_std.getLogger("absl").addFilter(_QUIET_ORBAX)


if not any(isinstance(f, _QuietAsyncio) for f in logging_std.getLogger("asyncio").filters):
    logging_std.getLogger("asyncio").addFilter(_QuietAsyncio())


def quiet_closed_loop(previous):
    """A ``sys.unraisablehook`` that drops, once a save has failed or a read was given up, the
    "Event loop is closed" errors of the abandoned writes' or reads' callbacks completing after
    Orbax closed its loop (the save's error is raised once by ``Checkpointer``, the unreadable step
    named once in a warning); everything else goes to ``previous``."""

    def hook(unraisable):
        value = getattr(unraisable, "exc_value", None)
        if (
            io_abandoned()
            and isinstance(value, RuntimeError)
            and "Event loop is closed" in str(value)
        ):
            return
        previous(unraisable)

    hook.quiet_closed_loop = True
    return hook


if not getattr(sys.unraisablehook, "quiet_closed_loop", False):
    sys.unraisablehook = quiet_closed_loop(sys.unraisablehook)

# Causes of failed writes that TensorStore reports deep inside its error text.
KNOWN_CAUSES = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Permission denied",
    "Operation not permitted",
)


def known_cause(e: BaseException) -> str | None:
    """The first of ``KNOWN_CAUSES`` named in ``e``'s text (any case), or None."""
    text = str(e).lower()
    return next((c for c in KNOWN_CAUSES if c.lower() in text), None)


# How long a failed save's other threads are waited for (they may wait minutes for a signal that
# never comes): the run stops within seconds; ``main`` then exits without waiting for them.
FAILED_SAVE_JOIN_SECONDS = 3.0


def orbax_threads() -> list[threading.Thread]:
    """The live non-daemon threads of Orbax other than the caller (the threads of a save)."""
    return [
        t
        for t in threading.enumerate()
        if t is not threading.current_thread()
        and not t.daemon
        and t.is_alive()
        and type(t).__module__.startswith("orbax")
    ]


def release_waiters() -> None:
    """Lets the threads of a failed save that wait for a signal of its failed part (e.g. "step
    directory created", for Orbax's async timeout of minutes) go on at once, so that they end
    (with an error of their own, dropped from the log). Single process only, best effort: this
    reaches into Orbax's signalling, which has no public way to cancel a failed save."""
    if jax.process_count() != 1:
        return
    try:
        from orbax.checkpoint._src.futures import future as ofuture
        from orbax.checkpoint._src.futures import signaling_client, synchronization

        op = synchronization.OperationIdGenerator.get_current_operation_id()
        client = signaling_client.get_signaling_client()
        for sig in synchronization.HandlerAwaitableSignal:
            key = ofuture.AwaitableSignalsContract.get_unique_awaitable_singal_key(sig, op)
            client.key_value_set(key, "failed", allow_overwrite=True)
    except Exception as e:  # noqa: BLE001 -- the threads then end at Orbax's timeout
        logging.info("Could not release the threads of the failed save: %s", brief(e))


def join_save_threads(timeout: float = FAILED_SAVE_JOIN_SECONDS) -> list[str]:
    """Gives Orbax's worker threads of a failed save ``timeout`` seconds in all to end (the parts
    that did not fail run on, or wait for a signal of the failed part until Orbax's timeout).

    Returns:
      The sorted names of the threads still running (left behind).
    """
    release_waiters()
    deadline = time.time() + timeout
    left = []
    for t in orbax_threads():
        try:  # Orbax's threads re-raise their own failure on join: another part of the
            t.join(max(deadline - time.time(), 0.0))  # same failed save, reported already
        except Exception:  # noqa: BLE001
            pass
        if t.is_alive():
            left.append(t.name)
    return sorted(set(left))
