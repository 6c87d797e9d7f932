"""The config stored in every checkpoint (JSON), and its comparison with the config of a run that
resumes it: which fields may differ (``RESUMABLE_KEYS``, ``DYNAMICS_KEYS``) and which may not."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from consistency_jax import config as config_lib
from consistency_jax.trees import flatten_mapping

# Config fields that may differ between a checkpoint and the run resuming it: they change how long
# the run is and what it logs, evaluates or keeps, not the trajectory of the train state. A prefix
# ending in "." covers a whole block. mesh.*: Orbax restores onto the live shardings, so a run may
# resume on another mesh (the reduction order, hence the last bits, then differ).
RESUMABLE_KEYS: tuple[str, ...] = (
    "train.num_steps",
    "train.log_every",
    "train.eval_every",
    "train.steps_per_call",
    "checkpoint.",
    "eval.",
    "mesh.",
    "data.data_dir",
    "init.",  # config.init is read only when a run starts
)

# Config fields that change the training dynamics but not the structure of the saved state: the
# knobs of NaN recovery. They may change on resume (a warning lists them); the run then continues
# on another trajectory from the restored state. optim.grad_clip keeps the optimizer state's layout
# of the checkpoint (``build.make_optimizer(clip_layout=...)``).
DYNAMICS_KEYS: tuple[str, ...] = (
    "optim.lr",
    "optim.warmup_steps",
    "optim.decay",
    "optim.grad_clip",
    "train.skip_nonfinite",
    "train.max_consecutive_skips",
    "train.max_skip_fraction",
    "train.max_norm_jump",
    "loss.huber_c",
)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as a JSON-able dict (tuples become lists), as stored in every checkpoint."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _as_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_tuples(v) for k, v in value.items()}
    return value


def config_from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds a ConfigDict from ``config_to_dict`` output (JSON lists become tuples)."""
    return ml_collections.ConfigDict(_as_tuples(dict(d)))


def is_resumable(key: str) -> bool:
    """True for a field of ``RESUMABLE_KEYS`` (a prefix ending in "." covers its block)."""
    return any(key.startswith(p) if p.endswith(".") else key == p for p in RESUMABLE_KEYS)


def is_dynamics(key: str) -> bool:
    """True for a field of ``DYNAMICS_KEYS``."""
    return key in DYNAMICS_KEYS


def config_differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    ignore_resumable: bool = True,
    defaults: Mapping[str, Any] | None = None,
    pinned: Sequence[str] = (),
) -> list[str]:
    """Lists the fields in which two configs (``config_to_dict`` dicts) differ.

    Args:
      saved: the config stored in a checkpoint.
      current: the config of the run that wants to resume it.
      ignore_resumable: leave out the fields of ``RESUMABLE_KEYS`` (number of steps, logging,
        evaluation and checkpoint cadence, mesh, data directory).
      defaults: a config dict of default values (``methods.default_values()``): a field absent from
        ``saved`` (a checkpoint written before the field existed) counts as holding its default, the
        value every earlier run had.
      pinned: fields compared even when ``ignore_resumable`` would leave them out (the source
        runs a method reads on every start, ``MethodSpec.teacher``).

    Returns:
      Sorted strings "key: saved -> current" (``<absent>`` for a missing field).
    """
    return [
        f"{key}: {va!r} -> {vb!r}"
        for key, va, vb in differing_fields(
            saved, current, ignore_resumable=ignore_resumable, defaults=defaults, pinned=pinned
        )
    ]


def differing_fields(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    ignore_resumable: bool,
    defaults: Mapping[str, Any] | None,
    pinned: Sequence[str] = (),
) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every differing field, as ``config_differences`` lists them."""
    a, b = flatten_mapping(saved), flatten_mapping(current)
    defaults = flatten_mapping(defaults or {})
    out = []
    for key in sorted(set(a) | set(b)):
        if ignore_resumable and is_resumable(key) and key not in pinned:
            continue
        va, vb = a.get(key, defaults.get(key, "<absent>")), b.get(key, "<absent>")
        if va != vb and not _same_source_run(key, va, vb):
            out.append((key, va, vb))
    return out


def _same_source_run(key: str, saved: Any, now: Any) -> bool:
    """A source run saved as a relative path (before ``config.with_absolute_sources`` stored them
    absolute) is the same as its absolute form at the current directory."""
    if key not in config_lib.SOURCE_RUN_FIELDS or not isinstance(saved, str):
        return False
    return config_lib.absolute_source(saved) == now
