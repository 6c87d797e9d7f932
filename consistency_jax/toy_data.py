"""The toy's data iterator: exact mixture samples, a pure function of (seed, step)."""

from __future__ import annotations

import numpy as np

from consistency_jax import toy

# The names of ``config.data.name`` served by this module instead of TFDS.
TOY_DATASETS = ("toy_ring",)


class ToyIterator:
    """Yields {"image": float32 (B, 2)} batches of the ring mixture.

    The batch of step k depends only on (seed, k, process_index), so a resumed run sees exactly the
    batches an uninterrupted run would have seen; ``get_state``/``set_state`` carry the position.
    """

    def __init__(
        self,
        mixture: toy.GaussianMixture,
        batch_size: int,
        seed: int,
        *,
        process_index: int = 0,
        start_step: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.mixture = mixture
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.step = start_step

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step, self.process_index])
        return {"image": self.mixture.sample(rng, self.batch_size).astype(np.float32)}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.batch(self.step)
        self.step += 1
        return b

    def get_state(self) -> dict:
        return {"step": int(self.step)}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
