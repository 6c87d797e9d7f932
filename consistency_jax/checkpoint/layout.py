"""Where a run's checkpoints live and what one holds: the directories of a workdir, the items of a
checkpoint step, and the abstract trees (shapes, dtypes, shardings) that arrays are restored into.

A step directory ``checkpoints/<step>/`` holds one sub-item each:

  - ``state``: the TrainState without its eval EMAs and *without the teacher*: step k, θ, θ⁻ and the
    optimizer state (``StandardSave``);
  - ``ema``: the eval EMAs {ema_key(rate): tree} (``StandardSave``), a separate item so that a
    sampler, or a CD run using this run as its teacher, reads only the EMA it needs;
  - ``data``: the data iterator's position (``iterator.get_state()``, a small JSON dict);
  - ``config``: the run's config (JSON), compared with the config of a resumed run.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from consistency_jax.train_state import TrainState

PyTree = Any

CHECKPOINT_SUBDIR = "checkpoints"
UNREADABLE_SUBDIR = "checkpoints_unreadable"
UNHEALTHY_SUBDIR = "checkpoints_unhealthy"  # saved while a diverging run skipped its steps
CHECKSUM_SUBDIR = "checkpoint_checksums"  # <step>.json: a checksum of every saved array

# The items of a checkpoint step.
STATE_ITEM, EMA_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "ema", "data", "config"
ARRAY_ITEMS = (STATE_ITEM, EMA_ITEM)


def student_part(state: TrainState) -> TrainState:
    """What the ``state`` item holds: no EMAs (own item) and never the teacher."""
    return state.replace(ema_params={}, teacher_params=None, distance=None)


def saved_arrays(state: TrainState) -> dict:
    """The arrays a checkpoint holds, as {item: tree}: the student state and its eval EMAs."""
    out = {STATE_ITEM: student_part(state)}
    if state.ema_params:
        out[EMA_ITEM] = dict(state.ema_params)
    return out


def metadata_tree(md: Any) -> PyTree:
    """The tree of an item's Orbax metadata (newer Orbax wraps it in an object with ``.tree``)."""
    return md.tree if hasattr(md, "tree") else md


def item_handlers(read_only: bool) -> dict:
    """Orbax handlers of the items. Read-only managers read the array items with the PyTree handler
    (the on-disk format of StandardSave), which can restore a part of an item (one EMA, or θ
    alone)."""
    arrays = ocp.PyTreeCheckpointHandler if read_only else ocp.StandardCheckpointHandler
    return {
        STATE_ITEM: arrays(),
        EMA_ITEM: arrays(),
        DATA_ITEM: ocp.JsonCheckpointHandler(),
        CONFIG_ITEM: ocp.JsonCheckpointHandler(),
    }


def pytree_restore(target: PyTree, partial: bool) -> ocp.args.PyTreeRestore:
    """PyTreeRestore args of an abstract target (ShapeDtypeStructs with or without shardings;
    without: host NumPy arrays)."""

    def arg(a):
        if a.sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype)
        return ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)

    return ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(arg, target), partial_restore=partial
    )
