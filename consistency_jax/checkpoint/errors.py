"""What can go wrong with a checkpoint, as exception types, and a one-line form of any error."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, or written by a different config."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint's arrays do not match the checksums stored at save time, or hold NaN/Inf (a
    checkpoint is never saved with them): its files are damaged. A reader of the newest checkpoint
    falls back to an older one; a reader asking for this step is refused."""


class NonFiniteStateError(FloatingPointError):
    """A train state holding NaN or Inf was about to be checkpointed."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a lost mount, ...): the run must stop."""


def brief(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` cut to its first line and ``limit`` characters (TensorStore errors carry
    kilobytes of spec)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(e).__name__}: {text}"
