"""Small pytree helpers used across the package: flat names of nested mappings, leaf shapes by path,
and abstract trees (``jax.ShapeDtypeStruct`` leaves) to restore or trace into.

One home for each: the checkpoint, loading, conversion, metric and config code call these instead
of keeping their own copies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

PyTree = Any


def flatten_mapping(tree: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Nested mappings as one flat dict: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (``sep`` between keys).

    An empty mapping is a value of its own (``{"a": {}}`` -> ``{"a": {}}``), so that a field that is
    an empty dict in one tree and absent from another still differs.

    Args:
      tree: a mapping whose values may be mappings (a config as a dict, a parameter tree).
      sep: the separator of the joined keys ("." for config fields, "/" for tensor names).

    Returns:
      {joined key: leaf value}, in the iteration order of the mappings.
    """
    out: dict[str, Any] = {}

    def visit(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping) and v:
                visit(v, f"{prefix}{k}{sep}")
            else:
                out[f"{prefix}{k}"] = v

    visit(tree, "")
    return out


def leaf_shapes(tree: PyTree, *, dtypes: bool = False) -> dict[str, Any]:
    """``{jax.tree_util.keystr(path): shape}`` of every leaf (arrays, ShapeDtypeStructs, anything
    ``np.shape`` takes); with ``dtypes``, ``(shape, dtype name)``. Two trees hold the same arrays
    shape for shape exactly when these dicts are equal.
    """

    def describe(leaf):
        shape = tuple(np.shape(leaf))
        if not dtypes:
            return shape
        return shape, str(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)

    return {
        jax.tree_util.keystr(path): describe(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def abstract_tree(
    tree: PyTree,
    sharding: jax.sharding.Sharding | Callable[[PyTree], PyTree] | None | str = "keep",
) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves in place of every array-like leaf (arrays, ShapeDtypeStructs,
    checkpoint metadata: anything with ``shape`` and ``dtype``); other leaves are kept as they are.

    Args:
      tree: the pytree.
      sharding: "keep": each leaf's own ``sharding`` (None where it has none: the restore target of
        a live state); a ``Sharding`` (or None) for every leaf; or a function from the abstract tree
        to a tree of shardings (e.g. FSDP shardings by shape).

    Returns:
      The abstract tree.
    """
    if isinstance(sharding, str) and sharding != "keep":
        raise ValueError(
            f'sharding must be "keep", a Sharding, None or a function, got {sharding!r}.'
        )
    if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
        abstract = abstract_tree(tree, None)
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            sharding(abstract),
        )

    def leaf(x):
        if not _is_array_like(x):
            return x
        s = getattr(x, "sharding", None) if isinstance(sharding, str) else sharding
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=s)

    return jax.tree.map(leaf, tree, is_leaf=_is_array_like)
