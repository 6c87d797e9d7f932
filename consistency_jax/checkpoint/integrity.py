"""Is a state whole? Finiteness of a train state, and checksums of the saved arrays.

Every save stores one checksum per array (``checkpoint_checksums/<step>.json``, computed on the
devices while the arrays are written); every read compares them (``verify``): a flipped bit is
named by array and step, never used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from consistency_jax import fs
from consistency_jax.checkpoint.errors import CheckpointDamagedError, brief
from consistency_jax.checkpoint.layout import saved_arrays
from consistency_jax.train_state import TrainState

PyTree = Any
ALGORITHM = "wsum32"


def _float_leaves(tree: PyTree) -> list:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


@jax.jit
def _all_finite(groups: dict) -> dict:
    return {
        k: jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in _float_leaves(v)] or [True]))
        for k, v in groups.items()
    }


def nonfinite_groups(groups: Mapping[str, PyTree]) -> list[str]:
    """The names of the trees of ``groups`` that hold a NaN or Inf (one fused reduction)."""
    flags = jax.device_get(_all_finite({k: v for k, v in groups.items() if v is not None}))
    return sorted(k for k, ok in flags.items() if not ok)


def nonfinite_parts(state: TrainState) -> list[str]:
    """Names the parts of the train state (params, target_params, ema_params['r'], opt_state) that
    hold a NaN or Inf; an empty list when all are finite. One fused reduction on the devices."""
    groups = {
        "params": state.params,
        "target_params": state.target_params,
        "opt_state": state.opt_state,
    }
    groups.update({f"ema_params[{k!r}]": v for k, v in state.ema_params.items()})
    return nonfinite_groups(groups)


def _bits(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (one per element; 64-bit elements as two words)."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)


@jax.jit
def _checksums(tree: PyTree) -> list:
    """One uint32 per array: Σ w_i·b_i mod 2³² over its words b_i with odd weights w_i, so that any
    one flipped bit changes it (and random damage with probability 1 − 2⁻³²). Runs on the devices,
    asynchronously: the training thread only dispatches it."""
    out = []
    for x in jax.tree.leaves(tree):
        b = _bits(x)
        i = jnp.arange(b.size, dtype=jnp.uint32)
        w = i * jnp.uint32(2654435761) | jnp.uint32(1)
        out.append(jnp.sum(w * b, dtype=jnp.uint32) ^ jnp.uint32(b.size))
    return out


def array_names(tree: PyTree) -> list[str]:
    """ "state/params/Dense_0/kernel"-like names of the leaves, in ``jax.tree.leaves`` order."""
    return [
        "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def tree_checksums(items: Mapping[str, PyTree]) -> tuple[list[str], list]:
    """(array names, device checksums) of {item: tree}; the checksums are still being computed on
    the devices when this returns (``jax.device_get`` waits)."""
    items = dict(items)
    return array_names(items), _checksums(items)


def checksums(state: TrainState) -> tuple[list[str], list]:
    """(array names, device checksums) of the arrays a checkpoint of ``state`` holds."""
    return tree_checksums(saved_arrays(state))


def write_checksums(
    path: str, step: int, names: list[str], values: list[int], *, clean: bool = True
) -> None:
    """Writes the checksums of checkpoint ``step`` to ``path`` (atomically), with the mark of a
    checkpoint saved while steps were skipped (``"clean": false``)."""
    record = {"step": step, "algorithm": ALGORITHM, "clean": bool(clean)}
    fs.write_text(path, json.dumps({**record, "arrays": dict(zip(names, values))}))


def read_clean_mark(path: str) -> bool:
    """False only when the checksum file at ``path`` says its checkpoint was saved while steps
    were skipped; True otherwise (no file, an older file without the mark, an unreadable one: the
    checksums themselves judge those)."""
    try:
        return bool(json.loads(fs.read_text(path)).get("clean", True))
    except Exception:  # noqa: BLE001
        return True


def read_checksums(path: str) -> dict[str, int] | None:
    """The stored checksums {array name: value}; None when the file does not exist (a checkpoint
    written before checksums existed, or whose checksum file was never written).

    Raises:
      CheckpointDamagedError: the file exists but is unreadable.
    """
    try:
        return {k: int(v) for k, v in json.loads(fs.read_text(path))["arrays"].items()}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointDamagedError(f"The checksum file {path} is unreadable: {brief(e)}") from e


def verify(
    step: int,
    items: Mapping[str, PyTree],
    path: str,
    *,
    partial: bool = False,
    groups: Mapping[str, PyTree] | None = None,
) -> int:
    """Compares restored arrays ({item: tree}, named as at save time) with the checksums stored in
    ``path`` and checks that they are finite.

    Args:
      step: the checkpoint's step (for the messages).
      items: the restored arrays, {"state": ..., "ema": ...} or a part of them.
      path: the checksum file of the step.
      partial: only a part of the saved arrays was read (no warning about the others).
      groups: named parts of the arrays to check for finiteness (default: the items), so that the
        message names e.g. "params" or "ema_params['0.999']".

    Returns:
      The number of arrays whose checksum was compared.

    Raises:
      CheckpointDamagedError: naming the first array whose checksum differs, or the items holding
        NaN/Inf (a checkpoint is never saved with them).
    """
    stored = read_checksums(path)
    compared = 0
    if stored is not None:
        names, sums = tree_checksums(items)
        for name, value in zip(names, jax.device_get(sums)):
            if name in stored:
                compared += 1
                if stored[name] != int(value):
                    raise CheckpointDamagedError(
                        f"Checkpoint step {step}: the array {name} does not match "
                        f"its checksum ({path}): the files are damaged."
                    )
        missing = sorted(set(stored) - set(names))
        if missing and not partial:
            logging.warning(
                "Checkpoint step %d: %d saved array(s) not restored: %s",
                step,
                len(missing),
                ", ".join(missing[:5]),
            )
    else:
        logging.info(
            "Checkpoint step %d has no checksums (%s); checked for finiteness only.", step, path
        )
    bad = nonfinite_groups(items if groups is None else groups)
    if bad:
        raise CheckpointDamagedError(
            f"Checkpoint step {step} holds NaN or Inf in {', '.join(bad)}: the "
            "files are damaged (a non-finite state is never saved)."
        )
    return compared
