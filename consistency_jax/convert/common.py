"""What the converters share: the error, the listings of missing, unexpected and mis-shaped tensors,
and the check that a converted tree has the shapes of the network's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PyTree = Any

CM_GROUPS = 32  # cm's GroupNorm32


class ConvertError(ValueError):
    """A checkpoint that cannot be converted (unreadable, or not the network described), or an output
    that would be overwritten; raised before anything is written."""


def listing(names: Sequence[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def refuse_mismatch(
    source: str,
    described: str,
    missing: Sequence[str],
    extra: Sequence[str],
    wrong: Sequence[str],
    flags: str,
) -> None:
    """Raises a ConvertError naming the missing, unexpected and mis-shaped tensors, if any."""
    if missing or extra or wrong:
        ddp = [k for k in extra if k.startswith(DDP_PREFIX)]
        hint = (
            f" {len(ddp)} name(s) start with {DDP_PREFIX!r} (DistributedDataParallel's prefix): "
            "strip it from every name (it is stripped by itself only when all names have it)."
            if ddp
            else ""
        )
        parts = [
            f"{len(missing)} missing tensor(s): {listing(missing)}" if missing else "",
            f"{len(extra)} unexpected tensor(s): {listing(extra)}" if extra else "",
            f"{len(wrong)} of the wrong shape: {listing(wrong)}" if wrong else "",
        ]
        raise ConvertError(
            f"{source} is not {described}: "
            + "; ".join(p for p in parts if p)
            + f". Check --config and the architecture flags ({flags})."
            + hint
        )


def plain(tree: Any) -> Any:
    return {k: plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def check_tree(params: PyTree, abstract: PyTree) -> None:
    import jax

    got = {
        jax.tree_util.keystr(p): tuple(a.shape)
        for p, a in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    want = {
        jax.tree_util.keystr(p): tuple(a.shape)
        for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    assert got == want, f"conversion bug: {sorted(set(got.items()) ^ set(want.items()))[:5]}"


def describe_adm(kwargs: Mapping[str, Any], image_size: int) -> str:
    keys = (
        "model_channels",
        "channel_mult",
        "num_res_blocks",
        "attention_resolutions",
        "num_head_channels",
        "num_heads",
        "num_classes",
        "use_scale_shift_norm",
        "resblock_updown",
    )
    return f"image_size={image_size}, " + ", ".join(f"{k}={kwargs[k]}" for k in keys if k in kwargs)


def check_finite(value: np.ndarray, source: str, name: str) -> None:
    """Raises ConvertError naming the file and the tensor if ``value`` holds a NaN or an infinity."""
    bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
    if bad:
        raise ConvertError(
            f"{source}: tensor {name} holds {bad} non-finite value(s) (NaN or ±inf) among "
            f"{np.size(value)}; a run cannot start from it (was the checkpoint saved after the "
            "training diverged?). Nothing was written."
        )


DDP_PREFIX = "module."


def strip_ddp_prefix(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The state dict without the ``module.`` that ``DistributedDataParallel`` puts before every
    name (a note is logged), or unchanged if not every name has it."""
    if state_dict and all(k.startswith(DDP_PREFIX) for k in state_dict):
        from absl import logging

        logging.warning(
            "%s: every tensor name starts with %r (a DistributedDataParallel state dict); "
            "the prefix is stripped.",
            source,
            DDP_PREFIX,
        )
        return {k[len(DDP_PREFIX) :]: v for k, v in state_dict.items()}
    return dict(state_dict)
