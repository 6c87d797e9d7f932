"""What a run writes besides checkpoints: ``metrics.jsonl`` (one JSON object per evaluation) and
TensorBoard scalars (tensorboardX: event files without TensorFlow)."""
from __future__ import annotations

import json
import os

from absl import logging


class MetricWriter:
    """Writes on the main process only (``enabled``); the others are silent."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional
                logging.warning("tensorboardX is not installed: no TensorBoard scalars.")

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def evaluation(self, step: int, values: dict) -> None:
        """One line of metrics.jsonl and the eval/ TensorBoard scalars."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
        self.scalars(step, values, "eval")

    def close(self):
        if self.tb is not None:
            self.tb.close()
