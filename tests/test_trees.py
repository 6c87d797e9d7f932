"""The shared pytree helpers (``consistency_jax.trees``), against hand-written expectations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import trees


def test_flatten_mapping_joins_keys_and_keeps_empty_mappings():
    tree = {"a": {"b": 1, "c": {"d": "x"}}, "e": {}, "f": (1, 2)}
    assert trees.flatten_mapping(tree) == {"a.b": 1, "a.c.d": "x", "e": {}, "f": (1, 2)}
    assert trees.flatten_mapping(tree, "/") == {"a/b": 1, "a/c/d": "x", "e": {}, "f": (1, 2)}
    assert trees.flatten_mapping({}) == {}
    # An empty sub-mapping and an absent one differ.
    assert trees.flatten_mapping({"k": {}}) != trees.flatten_mapping({})


def test_leaf_shapes_by_path():
    tree = {"net": {"w": np.zeros((3, 2), np.float32), "b": jnp.zeros(2, jnp.bfloat16)}, "s": 1.0}
    assert trees.leaf_shapes(tree) == {"['net']['b']": (2,), "['net']['w']": (3, 2), "['s']": ()}
    assert trees.leaf_shapes(tree, dtypes=True)["['net']['b']"] == ((2,), "bfloat16")
    assert trees.leaf_shapes(tree, dtypes=True)["['s']"] == ((), "float64")
    arrays = tree["net"]
    abstract = jax.eval_shape(lambda: arrays)
    assert trees.leaf_shapes(abstract, dtypes=True) == trees.leaf_shapes(arrays, dtypes=True)
    other = {"net": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2)}, "s": 1.0}
    assert trees.leaf_shapes(other) != trees.leaf_shapes(tree)


@dataclasses.dataclass
class _Metadata:  # what a checkpoint's metadata tree holds: a shape and a dtype, no data
    shape: tuple
    dtype: np.dtype


def test_abstract_tree_keeps_or_sets_shardings():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    live = {"w": jax.device_put(jnp.ones((4, 2)), rep), "step": jnp.int32(3)}
    kept = trees.abstract_tree(live)
    assert kept["w"] == jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=rep)
    assert kept["step"].shape == () and kept["step"].dtype == jnp.int32

    md = {"w": _Metadata((4, 2), np.dtype("float32")), "note": "text"}
    bare = trees.abstract_tree(md, None)
    assert bare["w"] == jax.ShapeDtypeStruct((4, 2), np.float32) and bare["w"].sharding is None
    assert bare["note"] == "text"  # not an array: left as it is

    every = trees.abstract_tree(md, rep)
    assert every["w"].sharding == rep
    seen = []

    def by_shape(abstract):
        seen.append(abstract)
        return jax.tree.map(lambda a: rep, abstract)

    mapped = trees.abstract_tree({"w": _Metadata((4, 2), np.dtype("float32"))}, by_shape)
    assert mapped["w"] == jax.ShapeDtypeStruct((4, 2), np.float32, sharding=rep)
    assert seen[0]["w"] == jax.ShapeDtypeStruct((4, 2), np.float32)
    with pytest.raises(ValueError, match='sharding must be "keep"'):
        trees.abstract_tree(md, "replicated")
