"""What a run writes besides checkpoints: ``metrics.jsonl`` (one JSON object per evaluation) and
TensorBoard scalars (tensorboardX: event files without TensorFlow; for a ``gs://`` workdir through
its google-cloud-storage writer).

A resumed run continues the files of the run it resumes: rows of ``metrics.jsonl`` after the
restored step (written after the last checkpoint by a run that then died) are dropped when the
writer opens, and TensorBoard is told to purge its events after that step, so no step appears twice.
"""

from __future__ import annotations

import json

from absl import logging

from consistency_jax import fs


class MetricWriter:
    """Writes on the main process only (``enabled``); the others are silent.

    Args:
      workdir: the run's directory.
      enabled: True on the main process.
      start_step: the step the run starts from (the restored step; 0 for a new run): rows of
        ``metrics.jsonl`` after it are dropped and TensorBoard events after it purged. None keeps
        everything.
    """

    def __init__(self, workdir: str, enabled: bool, start_step: int | None = None):
        self.enabled = enabled
        self.path = fs.join(workdir, "metrics.jsonl")
        self._url = fs.is_url(self.path)
        self.tb = None
        self._evaluated: set[int] = set()  # the steps with a row in metrics.jsonl
        if enabled:
            if start_step is not None:
                self._drop_rows_after(int(start_step))
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(
                    fs.join(workdir, "tensorboard"), purge_step=start_step or None
                )
            except ImportError:  # TensorBoard is optional
                logging.warning("tensorboardX is not installed: no TensorBoard scalars.")

    def _drop_rows_after(self, step: int) -> None:
        """Rewrites metrics.jsonl without its rows after ``step`` (atomically: a new file replaces
        it). A line that is not JSON (a row cut short by a kill) is dropped too."""
        try:
            lines = fs.read_text(self.path).splitlines()
        except FileNotFoundError:
            return
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
                if int(row["step"]) <= step:
                    kept.append(line)
                    self._evaluated.add(int(row["step"]))
            except (ValueError, KeyError, TypeError):
                pass
        dropped = len(lines) - len(kept)
        if not dropped:
            return
        fs.write_text(self.path, "".join(line + "\n" for line in kept))
        logging.info(
            "Dropped %d row(s) of %s after step %d (the run resumes from that step).",
            dropped,
            self.path,
            step,
        )

    def has_evaluation(self, step: int) -> bool:
        """True when metrics.jsonl holds a row of ``step`` (known when the writer opened with a
        ``start_step``, or written since)."""
        return int(step) in self._evaluated

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def evaluation(self, step: int, values: dict) -> None:
        """One line of metrics.jsonl (not a second one for a step that has one: a resumed run that
        makes up a missing picture) and the eval/ TensorBoard scalars."""
        if not self.enabled:
            return
        if int(step) in self._evaluated:
            self.scalars(step, values, "eval")
            return
        self._evaluated.add(int(step))
        row = json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n"
        if self._url:  # an object store has no append: the (small) file is replaced whole
            try:
                old = fs.read_text(self.path)
            except FileNotFoundError:
                old = ""
            fs.write_text(self.path, old + row)
        else:
            with open(self.path, "a") as f:
                f.write(row)
        self.scalars(step, values, "eval")

    def close(self):
        """Flushes and closes TensorBoard's file (idempotent)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
