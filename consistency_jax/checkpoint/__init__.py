"""Checkpoints that never lose a run: Orbax saves, exact resume, preemption and read-only readers.

One idea per module:

  - ``layout``: the directories of a workdir and the items of a checkpoint step (``state``,
    ``ema``, ``data``, ``config``), and the abstract trees arrays are restored into;
  - ``stored_config``: the config stored in a checkpoint and its comparison with a resuming run's;
  - ``integrity``: finiteness of a state and the checksums of the saved arrays;
  - ``manager``: ``Checkpointer``, the manager of one run's checkpoints (saves, restores, the
    public read API of ``loading``);
  - ``errors``: what can go wrong, as exception types.

A run is resumed from the newest readable checkpoint of its workdir. The train step folds the step
into its base key (``train.make_train_step``) and the data iterators are pure functions of the
step, so a resumed run continues bitwise identically (same devices). The teacher of consistency
distillation (CM Algorithm 2) is another run's EDM checkpoint, read through a read-only manager
(``loading``): nothing is ever written into the teacher's directory, and the student's checkpoints
never contain φ. The SIGTERM watcher is ``preemption``.

Nothing here unpickles: arrays go through Orbax/TensorStore, everything else through JSON.
"""

from consistency_jax.checkpoint.errors import (
    CheckpointDamagedError,
    CheckpointError,
    CheckpointSaveError,
    NonFiniteStateError,
    brief,
)
from consistency_jax.checkpoint.failures import READ_FAILURES, orbax_threads
from consistency_jax.checkpoint.integrity import checksums, nonfinite_parts, verify
from consistency_jax.checkpoint.layout import (
    CHECKPOINT_SUBDIR,
    CHECKSUM_SUBDIR,
    CONFIG_ITEM,
    DATA_ITEM,
    EMA_ITEM,
    STATE_ITEM,
    UNHEALTHY_SUBDIR,
    UNREADABLE_SUBDIR,
)
from consistency_jax.checkpoint.manager import Checkpointer, check_cadence
from consistency_jax.checkpoint.stored_config import (
    DYNAMICS_KEYS,
    RESUMABLE_KEYS,
    config_differences,
    config_from_dict,
    config_to_dict,
    differing_fields,
)

__all__ = [
    "CHECKPOINT_SUBDIR",
    "CHECKSUM_SUBDIR",
    "CONFIG_ITEM",
    "DATA_ITEM",
    "DYNAMICS_KEYS",
    "EMA_ITEM",
    "READ_FAILURES",
    "RESUMABLE_KEYS",
    "STATE_ITEM",
    "UNHEALTHY_SUBDIR",
    "UNREADABLE_SUBDIR",
    "CheckpointDamagedError",
    "CheckpointError",
    "CheckpointSaveError",
    "Checkpointer",
    "NonFiniteStateError",
    "brief",
    "check_cadence",
    "checksums",
    "config_differences",
    "config_from_dict",
    "config_to_dict",
    "differing_fields",
    "nonfinite_parts",
    "orbax_threads",
    "verify",
]
